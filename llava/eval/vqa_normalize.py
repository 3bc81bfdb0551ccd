"""The two official VQA answer processors, written from their reference code.

- ``vqa_eval_process`` -- the official VQA API, ``vqaEval.py`` (GT-Vision-Lab/VQA
  a013f0043c1e2cdc995922dfe257f7149aa9af06, PythonEvaluationTools/vqaEvaluation/vqaEval.py):
  ``processPunctuation`` then ``processDigitArticle``. The VQAv2 metric applies it only to questions
  whose human answers disagree (see ``eval_vqa.vqa_accuracy``).
- ``evalai_process`` -- the EvalAI answer processor (``EvalAIAnswerProcessor`` of upstream LLaVA
  c121f0432da27facab705978f83c4ada465e46fd, llava/eval/m4c_evaluator.py, itself from mmf): lowercase,
  delete "," and "?", split "'s" into " 's", then the same punctuation / digit-article steps. Used for
  TextVQA (both sides, always) and for the VQAv2 submission strings
  (scripts/convert_vqav2_for_submission.py).

The steps, as the reference code does them:
 1. punctuation: each mark of PUNCT is deleted when it touches a space in the input or when the input
    has a digit,digit comma anywhere; otherwise it becomes a space ("yes/no" -> "yes no");
 2. a "." not followed by a digit is deleted -- the reference passes ``re.UNICODE`` (= 32) as the
    ``count`` argument of ``re.sub``, so at most the first 32 are;
 3. lowercase, split on whitespace; per word the number words none/zero..ten become digits, the
    articles a/an/the are dropped, then words found in CONTRACTIONS are replaced. The lookup is
    on lowercased words, so the map's capitalised keys ("Im", "Ive", "Id've", "I'dve") never match:
    "im" stays "im". The map is the official one, quirks included ("somebody'd" -> "somebodyd";
    no "lets", "id", "ill").
"""
import re

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}

# The official contraction map (identical in vqaEval.py and m4c_evaluator.py, 120 entries), as
# "key>value" pairs (GT-Vision-Lab/VQA vqaEval.py self.contractions).
_CONTRACTION_TABLE = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've
hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's
howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd
itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't
mightnt've>mightn't've mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've
neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's shouldve>should've
shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've somebody'd>somebodyd
somebodyd've>somebody'd've somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's
someoned>someone'd someoned've>someone'd've someone'dve>someone'd've someonell>someone'll
someones>someone's somethingd>something'd somethingd've>something'd've something'dve>something'd've
somethingll>something'll thats>that's thered>there'd thered've>there'd've there'dve>there'd've
therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's
whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've
wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're whys>why's wont>won't
wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all
yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've
youd>you'd youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
"""
CONTRACTIONS = dict(pair.split(">") for pair in _CONTRACTION_TABLE.split())

_VQA_COMMA = re.compile(r"(\d)(,)(\d)")        # vqaEval.py commaStrip
_EVALAI_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")  # m4c_evaluator.py COMMA_STRIP
_PERIOD = re.compile(r"\.(?!\d)")              # the reference's "(?!<=\d)(\.)(?!\d)": its "(?!<=\d)" is always true
_PERIOD_COUNT = int(re.UNICODE)                # passed as re.sub's count by the reference (see the module doc)


def process_punctuation(s, comma=_VQA_COMMA):
    out = s
    strip_all = comma.search(s) is not None
    for p in PUNCT:
        if p + " " in s or " " + p in s or strip_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(s):
    words = [NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_eval_process(s):
    """vqaEval.py's processing of an answer whose question has disagreeing human answers."""
    return process_digit_article(process_punctuation(s))


def clean_whitespace(s):
    """vqaEval.py's first step, applied to every answer: newlines/tabs -> spaces, strip."""
    return str(s).replace("\n", " ").replace("\t", " ").strip()


def evalai_process(s):
    """EvalAIAnswerProcessor.__call__ (m4c_evaluator.py)."""
    s = str(s).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = clean_whitespace(s)
    return process_digit_article(process_punctuation(s, _EVALAI_COMMA))

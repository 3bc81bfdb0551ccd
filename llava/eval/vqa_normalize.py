"""Answer normalisation of the standard VQA evaluation (VQA API / EvalAI answer processor).

normalize_answer(s) applies, in the official order:
 1. newlines/tabs -> spaces, lowercase, strip;
 2. punctuation: each mark in PUNCT is deleted when it touches a space or when the answer has a
    digit,digit comma anywhere ("1,000" -> "1000"); otherwise it becomes a space ("yes/no" -> "yes no");
 3. a period is deleted unless a digit follows ("dog." -> "dog", "3.5" stays);
 4. per word: number words zero..ten (and "none") -> digits, articles a/an/the dropped;
 5. apostrophe-less contractions get their apostrophes back ("dont" -> "don't").
"""
import itertools
import re

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = {"a", "an", "the"}

# Contracted forms; CONTRACTIONS maps every spelling with some apostrophes missing to the full form.
_FULL = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he'll he's how'd how'll how's i'd've i'll i'm i've isn't it'd it'd've it'll it's
let's ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'twas shan't
she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll something's that'd
that'd've that'll that's there'd there'd've there're there's there'll they'd they'd've they'll they're
they've wasn't we'd've we'll we're we've weren't what'd what'll what're what's what've when's where'd
where's where've who'd who'd've who'll who's who've why'd why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()
# Apostrophe-less spellings that are ordinary words are left alone ("cant", "wont", "lets" are
# restored, as in the standard VQA map).
_REAL_WORDS = {"ill", "hell", "shell", "well", "were", "wed", "shed", "its", "id", "whore"}


def _variants(full):
    parts = full.split("'")
    for keep in itertools.product((False, True), repeat=len(parts) - 1):
        if not all(keep):
            yield parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:]))


CONTRACTIONS = {v: full for full in _FULL for v in _variants(full) if v not in _REAL_WORDS}

_COMMA_NUM = re.compile(r"(\d),(\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def process_punctuation(s):
    out = s
    strip_all = _COMMA_NUM.search(s) is not None
    for p in PUNCT:
        if strip_all or p + " " in s or " " + p in s:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(s):
    words = [NUMBERS.get(w, w) for w in s.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(s):
    s = str(s).replace("\n", " ").replace("\t", " ").lower().strip()
    return process_digit_article(process_punctuation(s))

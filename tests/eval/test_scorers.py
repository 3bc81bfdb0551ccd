"""The benchmark scorers (llava/eval/eval_*.py) against the official rules, on tiny hand-made fixtures.

Each rule test names the official file and commit it follows; the expected values are worked by hand from
that definition in the docstring. The references (read, not copied):
  LLaVA  = haotian-liu/LLaVA c121f0432da27facab705978f83c4ada465e46fd
  VQA    = GT-Vision-Lab/VQA a013f0043c1e2cdc995922dfe257f7149aa9af06, PythonEvaluationTools/vqaEvaluation/vqaEval.py
  MME    = BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation dd2950902889cd614d4edf606827240166d29381,
           tools/eval_tool.zip: eval_tool/calculation.py
  VLMEval = open-compass/VLMEvalKit c6bdffd3a3f2772ce9eaa157d7d31ec741b245b0, vlmeval/utils/matching_util.py and
           vlmeval/evaluate/multiple_choice.py
"""
import csv
import json
import os
import subprocess
import sys

import pytest

from llava.eval import (eval_gqa, eval_mmbench, eval_mme, eval_pope, eval_science_qa, eval_textvqa, eval_toy, eval_vqa,
                        merge_answers)
from llava.eval._io import EvalError, check_same_run, read_jsonl
from llava.eval.benchmarks import BENCHMARKS
from llava.eval.eval_textvqa import textvqa_accuracy
from llava.eval.eval_vqa import vqa_accuracy
from llava.eval.vqa_normalize import evalai_process, vqa_eval_process

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---------------------------------------------------------------- the two official answer processors

@pytest.mark.parametrize("raw,vqa_eval,evalai", [
    ("Two", "2", "2"), ("the dog.", "dog", "dog"), ("dont", "don't", "don't"), ("isnt", "isn't", "isn't"),
    ("1,000", "1000", "1000"), ("3.5", "3.5", "3.5"), ("Yes/No", "yes no", "yes no"),
    ("red, white", "red white", "red white"),
    ("What?", "what", "what"), ("hello,world", "hello world", "helloworld"), ("whats up", "what's up", "what's up"),
    ("what's up", "what's up", "what 's up"), ("lets go", "lets go", "lets go"), ("im open", "im open", "im open"),
    ("somebody'd", "somebodyd", "somebodyd"), ("x" + "." * 40, "x" + "." * 8, "x" + "." * 8),
])
def test_answer_processors(raw, vqa_eval, evalai):
    """vqa_eval_process = VQA vqaEval.py processPunctuation + processDigitArticle; evalai_process = LLaVA
    llava/eval/m4c_evaluator.py EvalAIAnswerProcessor (word_tokenize first: lowercase, delete "," and "?",
    "'s" -> " 's"). Worked by hand:
    - "hello,world": vqaEval: the comma touches no space and there is no digit,digit -> a space; EvalAI: the
      comma is deleted by word_tokenize -> "helloworld";
    - "what's up": only EvalAI splits "'s" -> "what 's up"; "whats" is in the official map -> "what's";
    - "lets", "im": not keys of the official map (it has "let's" and the capitalised "Im", which never
      matches a lowercased word) -> unchanged; "somebody'd" -> "somebodyd" is the map's own entry;
    - "What?": vqaEval turns "?" (touching no space) into a space, EvalAI deletes it -> both "what";
    - 40 trailing periods: the period regex runs with count=re.UNICODE=32 -> 8 periods are left.
    """
    assert vqa_eval_process(raw) == vqa_eval
    assert evalai_process(raw) == evalai


# ---------------------------------------------------------------- VQAv2 (vqaEval.py)

@pytest.mark.parametrize("pred,gts,acc", [
    ("Two", ["2"] * 10, 0.0), ("Yes", ["yes"] * 10, 0.0), ("2", ["2"] * 10, 1.0), ("dog\n", ["dog"] * 10, 1.0),
    ("Two", ["2"] * 9 + ["3"], 1.0), ("Two", ["2"] * 2 + ["3"] * 8, 0.6), ("Two", ["2"] + ["3"] * 9, 0.3),
    ("The Dog.", ["dog"] * 3 + ["cat"] * 7, 0.9),
])
def test_vqa_accuracy_official(pred, gts, acc):
    """VQA vqaEval.py VQAEval.evaluate: answers are only stripped (newline/tab -> space); they are processed
    only if len(set(gtAnswers)) > 1. acc = mean over the 10 leave-one-out subsets of min(1, matches/3).
    - "Two" vs ten "2": humans agree -> no processing, "Two" != "2" -> 0 (the old scorer gave 1.0);
      "Yes" vs ten "yes" -> 0 likewise; "dog\\n" is stripped -> equal -> 1.0;
    - "Two" vs 9x"2"+"3": processed, "2" matches m=9: (9*min(1,8/3) + 1*min(1,9/3))/10 = 1.0;
    - m=2: (2*min(1,1/3) + 8*min(1,2/3))/10 = (2/3 + 16/3)/10 = 0.6; m=1: (1*0 + 9*(1/3))/10 = 0.3;
    - "The Dog." -> "dog", m=3: (3*(2/3) + 7*1)/10 = 0.9.
    """
    assert vqa_accuracy(pred, gts) == pytest.approx(acc)


def test_vqav2_submission_and_local_accuracy(tmp_path, capsys):
    """Submission strings: LLaVA scripts/convert_vqav2_for_submission.py applies EvalAIAnswerProcessor:
    " Yes. " -> "yes", "Two" -> "2", "the dog" -> "dog"; a question without an answer gets "".
    Local accuracy (vqaEval.py) against ten "2" / ten "dog" / ten "yes": "Yes." vs ten "yes" (humans agree,
    no processing, "Yes." != "yes") -> 0; "Two" -> 0; "the dog" -> 0; accuracy = 0. On the submission
    strings ("yes", "2", "dog") every one matches -> accuracy_as_submitted = 100."""
    q = jsonl(tmp_path / "q.jsonl", [{"question_id": i, "text": "?"} for i in (1, 2, 3, 4)])
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": " Yes. "}, {"question_id": 3, "text": "Two"},
                                     {"question_id": 4, "text": "the dog"}])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": i, "answers": [{"answer": a}] * 10}
                                               for i, a in ((1, "yes"), (3, "2"), (4, "dog"))]}))
    out = tmp_path / "up" / "test-dev.json"
    eval_vqa.main(["--question-file", q, "--result-file", r, "--submission-out", str(out), "--annotation-file",
                   str(ann), "--json"])
    assert json.loads(out.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": ""},
                                           {"question_id": 3, "answer": "2"}, {"question_id": 4, "answer": "dog"}]
    m = last_json(capsys)
    assert m["submission_unanswered"] == 1 and m["accuracy"] == 0.0 and m["accuracy_as_submitted"] == 100.0
    bad = jsonl(tmp_path / "b.jsonl", [{"question_id": 9, "text": "x"}])
    with pytest.raises(EvalError, match="9"):
        eval_vqa.main(["--question-file", q, "--result-file", bad, "--submission-out", str(out)])


# ---------------------------------------------------------------- TextVQA (m4c_evaluator.py)

@pytest.mark.parametrize("pred,human,acc", [
    ("whats up", "what's up", 0.0), ("what's up", "what's up", 1.0), ("hello world", "hello,world", 0.0),
    ("hello,world", "helloworld", 1.0), ("lets go", "let's go", 0.0), ("im open", "i'm open", 0.0),
    ("Im open", "im open", 1.0), ("Two", "2", 1.0),
])
def test_textvqa_accuracy_official(pred, human, acc):
    """LLaVA llava/eval/m4c_evaluator.py TextVQAAccuracyEvaluator: prediction and all 10 answers through
    EvalAIAnswerProcessor, then leave-one-out min(1, matches/3); ten equal human answers -> 1.0 or 0.
    - "whats up" -> "what's up" but the human "what's up" -> "what 's up" -> 0 (old scorer: 1.0);
    - "hello world" stays, the human "hello,world" -> "helloworld" -> 0; "hello,world" -> "helloworld" -> 1;
    - "lets"/"im" are not in the official map: "lets go" vs "let 's go" -> 0, "im open" vs "i'm open" -> 0
      (old scorer expanded both -> 1.0); "Im open" lowercases to "im open" -> 1;
    - "Two" -> "2", always processed here (unlike vqaEval.py) -> 1."""
    assert textvqa_accuracy(pred, [human] * 10) == pytest.approx(acc)


def textvqa_fixture(tmp_path):
    data = [{"question_id": 100, "image_id": "img1", "question": "What brand is it?", "answers": ["nike"] * 2 + ["adidas"] * 8},
            {"question_id": 101, "image_id": "img2", "question": "What number?", "answers": ["3"] * 10}]
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return str(ann)


def test_textvqa_by_question_id(tmp_path, capsys):
    """"Nike" -> "nike", m=2 of 10: (2*(1/3) + 8*(2/3))/10 = 0.6; "three" -> "3", m=10 -> 1.0; mean 80."""
    ann = textvqa_fixture(tmp_path)
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": 100, "prompt": "x", "text": "Nike"},
                                     {"question_id": 101, "prompt": "x", "text": "three"}])
    eval_textvqa.main(["--annotation-file", ann, "--result-file", r, "--json"])
    assert last_json(capsys)["accuracy"] == pytest.approx(80.0)


def test_textvqa_by_prompt(tmp_path):
    """Matched by (image_id, question) from LLaVA's OCR prompt: "adidas" m=8 -> 1.0, "4" m=0 -> 0; mean 50."""
    ann = textvqa_fixture(tmp_path)
    ocr = "What brand is it?\nReference OCR token: NIKE, shoe\nAnswer the question using a single word or phrase."
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "img1", "prompt": ocr, "text": "adidas"},
                                     {"question_id": "img2", "prompt": "What number?", "text": "4"}])
    m = eval_textvqa.score_textvqa(read_jsonl(r), json.load(open(ann))["data"])
    assert m["accuracy"] == pytest.approx(50.0) and m["n"] == 2


def test_textvqa_unknown_question(tmp_path):
    ann = textvqa_fixture(tmp_path)
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "img9", "prompt": "Who?", "text": "x"}])
    with pytest.raises(EvalError, match=r"a\.jsonl:1"):
        eval_textvqa.main(["--annotation-file", ann, "--result-file", r])


# ---------------------------------------------------------------- GQA

def test_gqa(tmp_path, capsys):
    """LLaVA scripts/convert_gqa_for_eval.py: text.rstrip('.').lower(), exact match with the answer:
    " Left." -> "left" = "left" (we also strip spaces), "No" -> "no" = "no", "dark red" != "red": 2/3."""
    qs = tmp_path / "testdev_balanced_questions.json"
    qs.write_text(json.dumps({"201": {"answer": "left", "question": "?", "imageId": "n1"},
                              "202": {"answer": "no", "question": "?", "imageId": "n2"},
                              "203": {"answer": "red", "question": "?", "imageId": "n3"}}))
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "201", "text": " Left."}, {"question_id": "202", "text": "No"},
                                     {"question_id": "203", "text": "dark red"}])
    out = tmp_path / "testdev_balanced_predictions.json"
    eval_gqa.main(["--question-file", str(qs), "--result-file", r, "--predictions-out", str(out), "--json"])
    m = last_json(capsys)
    assert m["correct"] == 2 and m["accuracy"] == pytest.approx(200 / 3)
    assert json.loads(out.read_text())[0] == {"questionId": "201", "prediction": "left"}


# ---------------------------------------------------------------- POPE (LLaVA eval_pope.py)

def test_pope_confusion_counts():
    """TP=3, FP=1, TN=4, FN=2: precision 3/4, recall 3/5, accuracy 7/10, yes-ratio (predicted yes) 4/10."""
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = eval_pope.confusion_metrics(preds, labels)
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (3, 1, 4, 2)
    assert m["precision"] == 0.75 and m["recall"] == 0.6 and m["accuracy"] == 0.7 and m["yes_ratio"] == 0.4
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


@pytest.mark.parametrize("text,ans", [
    ("NO", "yes"), ("No!", "yes"), ("Not visible.", "yes"), ("no\nthere is none", "yes"), ("Nothing here", "yes"),
    ("No.", "no"), ("No, there is not.", "no"), ("There is no dog.", "no"), ("It is not", "no"), ("no", "no"),
    ("Yes. No cat though.", "yes"), ("Yes, there is a dog.", "yes"),
])
def test_pope_parse(text, ans):
    """LLaVA llava/eval/eval_pope.py: first sentence (before the first "."), commas deleted, split on " ";
    "no" iff a word is exactly "No", "not" or "no". So "NO" (case), "No!" (word "No!"), "Not visible" (word
    "Not") and "no\\nthere is none" (word "no\\nthere"; "none" is not "no") read as yes; "No," loses its
    comma -> "No" -> no; "Yes. No cat" keeps only "Yes" -> yes."""
    assert eval_pope.parse_yes_no(text) == ans


def test_pope_cli(tmp_path, capsys):
    """random: preds = labels -> F1 1; popular: labels y,n, preds n,n -> TP 0 -> F1 0; adversarial:
    labels y,n, preds y,y -> P 1/2, R 1 -> F1 2/3; f1_mean = 100 * (1 + 0 + 2/3) / 3."""
    d = tmp_path / "coco"
    d.mkdir()
    qlines, results = [], []
    for c, (labels, preds) in {"random": ("yyn", "yyn"), "popular": ("yn", "nn"), "adversarial": ("yn", "yy")}.items():
        ann = [{"question_id": i + 1, "image": f"COCO_{i}.jpg", "text": f"Is there a {c}{i} in the image?",
                "label": {"y": "yes", "n": "no"}[l]} for i, l in enumerate(labels)]
        jsonl(d / f"coco_pope_{c}.json", ann)
        for a, p in zip(ann, preds):
            qid = len(qlines)
            qlines.append({"question_id": qid, "image": a["image"], "category": c,
                           "text": a["text"] + "\nAnswer the question using a single word or phrase."})
            results.append({"question_id": qid, "text": {"y": "Yes", "n": "No"}[p]})
    q = jsonl(tmp_path / "llava_pope_test.jsonl", qlines)
    r = jsonl(tmp_path / "a.jsonl", results)
    eval_pope.main(["--annotation-dir", str(d), "--question-file", q, "--result-file", r, "--json"])
    m = last_json(capsys)
    assert m["random"]["f1"] == 1.0 and m["popular"]["f1"] == 0.0
    assert m["adversarial"]["f1"] == pytest.approx(2 / 3)
    assert m["f1_mean"] == pytest.approx(100 * (1 + 0 + 2 / 3) / 3)
    (d / "coco_pope_random.json").unlink()
    with pytest.raises(EvalError, match="coco_pope_random.json"):
        eval_pope.main(["--annotation-dir", str(d), "--question-file", q, "--result-file", r])


# ---------------------------------------------------------------- MME (calculation.py)

@pytest.mark.parametrize("text,ans", [
    ("yes", "yes"), ("No", "no"), ("None", "no"), ("Nope", "no"), ("Not sure", "no"), ("Snow", "no"),
    ("Yesterday", "yes"), ("no, yes", "no"), (" Yes", "yes"), ("**Yes**", "other"), ("I think so", "other"),
    ("  yes", "other"), ("", "other"),
])
def test_mme_parse(text, ans):
    """MME calculation.py parse_pred_ans on the lowercased response: "yes" if its first 4 characters contain
    "yes", else "no" if they contain "no", else "other". "none"/"nope"/"not "/"snow" contain "no";
    "yest" contains "yes"; "no, " has no "yes" -> no; " yes" fits in 4 characters, "  yes" does not
    ("  ye"); "**ye" and "i th" contain neither -> other."""
    assert eval_mme.parse_yes_no(text) == ans


def test_mme_acc_plus_pairs(tmp_path, capsys):
    """existence: img1 both right ("no, there is not" -> "no, " -> no), img2 one of two right -> acc 3/4 = 75,
    acc+ 1/2 = 50, score 125. code_reasoning: "I think so" -> other (wrong, counted), "Yes" vs No -> 0."""
    qs = [("existence/1.png", "Is there a dog? Please answer yes or no.", "Yes", "Yes"),
          ("existence/1.png", "Is there a cat? Please answer yes or no.", "No", "no, there is not"),
          ("existence/2.png", "Is there a car? Please answer yes or no.", "Yes", "yes"),
          ("existence/2.png", "Is there a bus? Please answer yes or no.", "No", "Yes"),
          ("code_reasoning/3.png", "Is the output 3? Please answer yes or no.", "Yes", "I think so"),
          ("code_reasoning/3.png", "Is the output 4? Please answer yes or no.", "No", "Yes")]
    q = jsonl(tmp_path / "llava_mme.jsonl", [{"question_id": i, "image": i, "text": t, "category": i.split("/")[0],
                                              "answer": a} for i, t, a, _ in qs])
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": t, "text": p} for i, t, _, p in qs])
    eval_mme.main(["--question-file", q, "--result-file", r, "--json"])
    m = last_json(capsys)
    ex = m["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert m["perception"] == 125.0 and m["cognition"] == 0.0 and m["total"] == 125.0
    assert m["other"] == 1 and m["subtasks"]["code_reasoning"]["other"] == 1


def test_mme_release_layout(tmp_path):
    """The release layout as upstream's convert_answer_to_mme.py reads it: artwork/images/10.jpg with
    artwork/questions_answers_YN/10.txt, and OCR/5.png with OCR/5.txt beside it. artwork both right -> 200;
    OCR: "No" right, "No" vs Yes wrong -> acc 50, acc+ 0 -> 50; perception 250."""
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    (root / "OCR").mkdir()
    (root / "OCR" / "5.txt").write_text("Is the word 'hi'? Please answer yes or no.\tNo\n"
                                        "Is the word 'ho'? Please answer yes or no.\tYes\n")
    qs = [("artwork/10.jpg", "artwork/images/10.jpg", "Is this by Monet? Please answer yes or no.", "Yes"),
          ("artwork/10.jpg", "artwork/images/10.jpg", "Is this by Dali? Please answer yes or no.", "No"),
          ("OCR/5.png", "OCR/5.png", "Is the word 'hi'? Please answer yes or no.", "No"),
          ("OCR/5.png", "OCR/5.png", "Is the word 'ho'? Please answer yes or no.", "No")]
    questions = [{"question_id": i, "image": img, "text": t} for i, img, t, _ in qs]
    results = [{"question_id": i, "prompt": t, "text": p} for i, _, t, p in qs]
    m = eval_mme.score_mme(results, questions, eval_mme.MMEAnnotations(str(root)))
    assert m["subtasks"]["artwork"]["score"] == 200.0
    assert m["subtasks"]["OCR"]["score"] == 50.0
    assert m["perception"] == 250.0
    (root / "artwork" / "questions_answers_YN" / "10.txt").unlink()
    with pytest.raises(EvalError, match="questions_answers_YN"):
        eval_mme.score_mme(results, questions, eval_mme.MMEAnnotations(str(root)))


# ---------------------------------------------------------------- ScienceQA (LLaVA eval_science_qa.py)

@pytest.mark.parametrize("text,parsed", [
    ("A", "A"), ("E", "E"), ("B. a frog", "B"), ("A. ", "A"), ("The answer is C.", "C"), ("The answer is B,", "B"),
    ("A.", "FAILED"), ("(C)", "FAILED"), ("C)", "FAILED"), ("A: cat", "FAILED"), ("Answer: C", "FAILED"),
    ("The answer is B", "FAILED"), ("The answer is A. The answer is B.", "FAILED"), ("a", "FAILED"), (" A", "FAILED"),
    ("F", "FAILED"),
])
def test_science_qa_parse(text, parsed):
    """LLaVA llava/eval/eval_science_qa.py, options A-E: (1) the text is one of them; (2) len >= 3, text[0]
    is one and text[1:3] == ". "; (3) re.findall(r'The answer is ([A-Z]).') has exactly one match (the "."
    is any character, so "B," counts, but "The answer is B" with nothing after the letter does not).
    Everything else is FAILED: "A." is 2 characters, "(C)"/"C)"/"A: cat"/"Answer: C" fit no form, two
    matches are not one, "a" is lowercase, " A" is not stripped (the generators strip), "F" is no option."""
    assert eval_science_qa.parse_answer(text) == parsed


def test_science_qa(tmp_path, capsys):
    """pids 1, 2, 4, 5 have images. 1: "B" = B right; 2: "The answer is A." right; 3 (no image): "A" right;
    4: "no idea" FAILED; 5: "(A)" FAILED though A is the answer (the old scorer credited it); 6: "C" with 2
    choices -> upstream's index -1 -> wrong, not FAILED. SQA-I = 2/4 = 50; all = 3/6 = 50; failed = 2."""
    problems = {"1": {"question": "?", "choices": ["x", "y"], "answer": 1, "image": "image.png", "split": "test"},
                "2": {"question": "?", "choices": ["x", "y", "z"], "answer": 0, "image": "image.png", "split": "test"},
                "3": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "test"},
                "4": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"},
                "5": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"},
                "6": {"question": "?", "choices": ["x", "y"], "answer": 1, "image": None, "split": "test"},
                "9": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "val"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6"], "val": ["9"]}))
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "text": "B"}, {"question_id": "2", "text": "The answer is A."},
                                     {"question_id": "3", "text": "A"}, {"question_id": "4", "text": "no idea"},
                                     {"question_id": "5", "text": "(A)"}, {"question_id": "6", "text": "C"}])
    out = tmp_path / "res.json"
    eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", r, "--output-file", str(out), "--json"])
    m = last_json(capsys)
    assert m["img_accuracy"] == 50.0 and m["img_n"] == 4
    assert m["accuracy"] == 50.0 and m["failed"] == 2
    per_q = json.loads(out.read_text())["results"]
    assert per_q["4"]["pred"] == "FAILED" and per_q["6"] == {"pred": "C", "answer": "B", "correct": False,
                                                            "has_image": False}


# ---------------------------------------------------------------- MMBench (VLMEvalKit)

@pytest.mark.parametrize("text,letter", [
    ("A is correct", "A"), ("Option C", "C"), ("I think A", "A"), ("(B) sky", "B"), ("D. bird", "D"),
    ("The answer is B.", "B"), ("**C**", "C"), ("A trout", "A"), ("A or B", None), ("trout", "C"),
    ("It is a fish, trout", "C"), ("bobcat", "A"), ("cat or dog", None), ("E", None), ("Z", "Z"),
    ("Cannot determine the answer", "Z"), ("I can't tell", None),
])
def test_mmbench_infer_letter(text, letter):
    """VLMEval matching_util.py can_infer, options A cat, B dog, C trout, D bird.
    Step 1 (can_infer_option): ".()[],:;!*#{}" -> spaces, split on whitespace; if exactly one option letter is
    a word, that letter: "A is correct", "Option C", "I think A" ("I" is no option), "(B) sky", "D. bird",
    "The answer is B.", "**C**", and "A trout" (the article "A" is read as the letter, as officially). Two
    letters ("A or B") -> no; no letter but the word "Z" -> "Z" (refused); "Cannot determine the answer" is one
    of the fixed refusals -> "Z". Step 2 (can_infer_text): exactly one option text inside the lowercased
    answer: "trout" / "It is a fish, trout" -> C, "bobcat" contains "cat" -> A (substring), "cat or dog" has
    two -> no. "E" (no such option), "A or B", "I can't tell" -> no match (None)."""
    texts = {"A": "cat", "B": "dog", "C": "trout", "D": "bird"}
    assert eval_mmbench.infer_letter(text, texts) == letter


def write_tsv(path, rows, cols=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
                                "split", "image")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([list(cols)] + rows)
    return str(path)


def rotated_tsv(path, answers=True):
    """Official dev-TSV layout: the circular copies of question i are rows i + k*1e6 with the options rotated
    (and the answer letter moved with them). Q0: apple/sky/grass, answer A (copies C, B); Q1: cat/dog/trout/bird,
    answer C (copies B, A, D); Q2: 猫/狗, answer A (copy B)."""
    q0 = ["apple", "sky", "grass"]
    q1 = ["cat", "dog", "trout", "bird"]
    q2 = ["猫", "狗"]
    rows = []
    for i, (opts, gt, cat) in enumerate([(q0, 0, "color"), (q1, 2, "animal"), (q2, 0, "animal")]):
        n = len(opts)
        for k in range(n):
            shown = opts[k:] + opts[:k]
            letter = "ABCD"[(gt - k) % n]
            rows.append([i + k * 10**6, f"Q{i}?", "nan", *shown, *[""] * (4 - n), letter if answers else "", cat,
                         "perception", "dev", "iVBOR"])
    return write_tsv(path, rows)


def test_mmbench_official_circular(tmp_path, capsys):
    """Rows grouped by index mod 1e6 (VLMEval multiple_choice.py multiple_choice_eval, exact matching):
    Q0 rows 0, 1e6, 2e6 answered "A", "C", "Option B" -> all their row's answer -> hit.
    Q1 rows 1, 1e6+1, 2e6+1, 3e6+1 answered "C", "B", "B" (answer A), "D" -> one wrong -> miss.
    Q2 rows 2, 1e6+2 answered "I think A", "猫" (the copy shows 狗, 猫: text of its answer B) -> hit.
    Circular accuracy = 2/3; by category color 1/1, animal 1/2; single pass (main rows, round 0) 3/3.
    (The old scorer took each row as a question of its own: 8 right rows of 9, less the two it could not read,
    "Option B" and "I think A": 6/9 = 66.7.)"""
    tsv = rotated_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    said = {0: "A", 10**6: "C", 2 * 10**6: "Option B", 1: "C", 10**6 + 1: "B", 2 * 10**6 + 1: "B", 3 * 10**6 + 1: "D",
            2: "I think A", 10**6 + 2: "猫"}
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": "...", "text": t} for i, t in said.items()])
    up = tmp_path / "upload"
    eval_mmbench.main(["--annotation-file", tsv, "--result-file", r, "--upload-dir", str(up), "--experiment", "exp",
                       "--json"])
    m = last_json(capsys)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["accuracy_single"] == 100.0
    assert m["n"] == 3 and m["rows"] == 9 and m["missing"] == 0 and m["no_match"] == 0 and m["incomplete_rounds"] == 0
    assert m["by_category"] == {"animal": 50.0, "color": 100.0}
    assert os.path.isfile(m["submission"])


def test_mmbench_no_match_fails_the_question(tmp_path, capsys):
    """Q0 copy 2e6 answered "I don't know" (no letter, no option text) -> no_match 1 and Q0 fails: in
    exact-matching mode an unreadable round is a miss. Q1 missing rows -> incomplete; Q2 unanswered -> missing.
    Accuracy = Q0 miss, Q1 (rows 1 and 1e6+1 right) hit = 1/2 = 50."""
    tsv = rotated_tsv(tmp_path / "t.tsv")
    said = {0: "A", 10**6: "C", 2 * 10**6: "I don't know", 1: "C", 10**6 + 1: "B"}
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": i, "prompt": "...", "text": t} for i, t in said.items()])
    eval_mmbench.main(["--annotation-file", tsv, "--result-file", r, "--upload-dir", str(tmp_path), "--experiment",
                       "e", "--json"])
    m = last_json(capsys)
    assert (m["accuracy"], m["no_match"], m["incomplete_rounds"], m["missing"], m["n"]) == (50.0, 1, 1, 1, 2)


def mmbench_tsv(path):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = [[0, "Which is red?", "nan", "apple", "sky", "grass", "", "A", "color", "perception", "dev", "iVBOR"],
            [1, "Which is a fish?", "", "cat", "dog", "trout", "bird", "C", "animal", "reasoning", "dev", "iVBOR"],
            [2, "哪个是猫?", "nan", "猫", "狗", "", "", "A", "animal", "reasoning", "dev", "iVBOR"]]
    return write_tsv(path, rows, cols)


def mmbench_answers(rows):
    """rows: (index, n_options, answer_letter_original, wrong_rounds) -> answer lines, generator-style rotation."""
    lines = []
    for idx, n, gt, wrong in rows:
        for r in range(n):
            shown = [(k + r) % n for k in range(n)]         # displayed position p holds original option (p + r) % n
            p = shown.index("ABCD".index(gt))
            if r in wrong:
                p = (p + 1) % n
            lines.append({"question_id": idx, "round_id": r, "prompt": "...", "text": "ABCD"[p]})
    return lines


def test_mmbench_generator_rounds(tmp_path, capsys):
    """Our --all-rounds lines: item 0 all 3 rounds right -> hit; item 1 round 2 of 4 wrong -> miss; item 2 both
    right -> hit: 2/3; first rounds all right -> single 100; categories animal 1/2, color 1/1."""
    tsv = mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    r = jsonl(tmp_path / "a.jsonl", mmbench_answers([(0, 3, "A", ()), (1, 4, "C", (2,)), (2, 2, "A", ())]))
    up = tmp_path / "upload"
    eval_mmbench.main(["--annotation-file", tsv, "--result-file", r, "--upload-dir", str(up), "--experiment", "exp",
                       "--json"])
    m = last_json(capsys)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["accuracy_single"] == 100.0
    assert m["by_category"] == {"animal": 50.0, "color": 100.0} and m["incomplete_rounds"] == 0
    sub = m["submission"]
    assert os.path.isfile(sub) and os.path.dirname(sub) == str(up)
    if sub.endswith(".tsv"):
        with open(sub, encoding="utf-8", newline="") as f:
            got = list(csv.DictReader(f, delimiter="\t"))
    else:
        import openpyxl

        ws = openpyxl.load_workbook(sub).active
        head, *body = [list(v) for v in ws.iter_rows(values_only=True)]
        got = [dict(zip(head, v)) for v in body]
    assert [g["prediction"] for g in got] == ["A", "C", "A"] and "image" not in got[0]
    assert got[2]["question"] == "哪个是猫?"


def test_mmbench_rotation_maps_back():
    """Round r shows opts[r:] + opts[:r]: round 1 shows x, y, z, w, so "D" is original A; round 3 shows
    z, w, x, y, so "A" is original D; round 2 shows y, z, w, x, so the text "y" is shown A = original C."""
    row = {"index": "5", "A": "w", "B": "x", "C": "y", "D": "z"}
    assert eval_mmbench.original_letter({"text": "D", "round_id": 1}, eval_mmbench.options(row)) == "A"
    assert eval_mmbench.original_letter({"text": "A", "round_id": 3}, eval_mmbench.options(row)) == "D"
    assert eval_mmbench.original_letter({"text": "y", "round_id": 2}, eval_mmbench.options(row)) == "C"


def test_mmbench_test_split(tmp_path, capsys):
    """The test TSV has no answers: no accuracy, the submission still holds one prediction per row."""
    tsv = rotated_tsv(tmp_path / "mmbench_test.tsv", answers=False)
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "prompt": "...", "text": "grass"}])
    eval_mmbench.main(["--annotation-file", tsv, "--result-file", r, "--upload-dir", str(tmp_path), "--experiment",
                       "t", "--json"])
    m = last_json(capsys)
    assert m["accuracy"] is None and os.path.isfile(m["submission"])


# ---------------------------------------------------------------- one run per answer file

RUN = {"method": "learnpruner", "budget": 64, "model_id": "llava-v1.5-7b", "model_fingerprint": "3f2a9c"}


@pytest.mark.parametrize("line3,needle", [
    ({**RUN, "budget": 128}, "budget=128, but .*a.jsonl:1 has budget=64"),
    ({**RUN, "method": "fastv"}, "method='fastv'"),
    ({**RUN, "model_fingerprint": "77aa01"}, "model_fingerprint='77aa01'"),
    ({k: v for k, v in RUN.items() if k != "model_id"}, "no 'model_id'"),
])
def test_check_same_run_refuses(tmp_path, line3, needle):
    """Lines 1-2 come from one run; line 3 differs in one field (or lacks it) -> refused at a.jsonl:3."""
    p = jsonl(tmp_path / "a.jsonl", [{"question_id": i, "text": "x", **RUN} for i in (1, 2)] +
              [{"question_id": 3, "text": "x", **line3}])
    with pytest.raises(EvalError, match=r"a\.jsonl:3: ") as e:
        check_same_run(read_jsonl(p))
    assert __import__("re").search(needle, str(e.value)) and "Score each run" in str(e.value)


def test_check_same_run_accepts():
    """One run's lines, and plain upstream lines with none of the fields, are fine."""
    check_same_run([{"question_id": i, "text": "x", **RUN} for i in range(3)])
    check_same_run([{"question_id": i, "text": "x"} for i in range(3)])


@pytest.mark.parametrize("bench", [b for b in BENCHMARKS if b != "toy"])
def test_every_scorer_refuses_mixed_runs(bench, eval_root, tmp_path):
    """Each benchmark's scorer CLI, with its real arguments on the mini benchmark, refuses a mixed file."""
    b = BENCHMARKS[bench]
    r = jsonl(tmp_path / "mixed.jsonl", [{"question_id": 1, "text": "x", **RUN},
                                         {"question_id": 2, "text": "x", **RUN, "budget": 32}])
    module = __import__(f"llava.eval.{b.scorer}", fromlist=["main"])
    with pytest.raises(EvalError, match=r"mixed\.jsonl:2: budget=32"):
        module.main(b.scorer_args(b.dir(str(eval_root)), r, str(tmp_path), "run"))


def test_toy_scorer_refuses_mixed_runs(tmp_path):
    key = jsonl(tmp_path / "key.jsonl", [{"question_id": 1, "answer": "red", "type": "color"}])
    r = jsonl(tmp_path / "mixed.jsonl", [{"question_id": 1, "text": "red", **RUN},
                                         {"question_id": 2, "text": "red", **RUN, "model_id": "other"}])
    with pytest.raises(EvalError, match=r"mixed\.jsonl:2: model_id='other'"):
        eval_toy.main(["--answer-file", key, "--result-file", r])
    with pytest.raises(EvalError, match="mixes answers"):  # the report's path (correct_by_question) checks too
        eval_toy.correct_by_question(read_jsonl(r), read_jsonl(key, required=("question_id",)))


# ---------------------------------------------------------------- chunk merger

def test_merge_answers(tmp_path):
    """Chunks in order, an empty chunk allowed, MME-style reuse of a question_id with another prompt allowed."""
    a = jsonl(tmp_path / "2_0.jsonl", [{"question_id": "x/1.png", "prompt": "p1", "text": "Yes", **RUN},
                                       {"question_id": "x/1.png", "prompt": "p2", "text": "No", **RUN}])
    empty = tmp_path / "2_1.jsonl"
    empty.write_text("")
    c = jsonl(tmp_path / "3.jsonl", [{"question_id": 7, "round_id": 1, "text": "A", **RUN}])
    out = tmp_path / "merge.jsonl"
    merge_answers.main(["--out", str(out), a, str(empty), c])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(g["question_id"], g["text"]) for g in got] == [("x/1.png", "Yes"), ("x/1.png", "No"), (7, "A")]
    assert got[0] == {"question_id": "x/1.png", "prompt": "p1", "text": "Yes", **RUN}
    assert sorted(os.listdir(tmp_path)) == ["2_0.jsonl", "2_1.jsonl", "3.jsonl", "merge.jsonl"]  # no temp file left
    video = [jsonl(tmp_path / f"v{i}.jsonl", [{"id": f"v{i}", "question": "q", "answer": "a", "pred": "p", **RUN}])
             for i in range(2)]  # Video-LLaVA's answer layout: keyed by id  # fmt: skip
    merge_answers.main(["--out", str(tmp_path / "vm.jsonl"), *video])
    assert [json.loads(line)["id"] for line in open(tmp_path / "vm.jsonl")] == ["v0", "v1"]
    with pytest.raises(EvalError, match="question 'v0' answered twice"):
        merge_answers.main(["--out", str(tmp_path / "vm2.jsonl"), video[0], video[0]])


def test_merge_answers_refuses(tmp_path):
    a = jsonl(tmp_path / "2_0.jsonl", [{"question_id": 1, "prompt": "p", "text": "A", **RUN}])
    dup = jsonl(tmp_path / "2_1.jsonl", [{"question_id": 2, "prompt": "p", "text": "B", **RUN},
                                         {"question_id": 1, "prompt": "p", "text": "C", **RUN}])
    mixed = jsonl(tmp_path / "m.jsonl", [{"question_id": 5, "text": "B", **RUN, "method": "fastv"}])
    out = str(tmp_path / "merge.jsonl")
    with pytest.raises(EvalError, match=r"2_1\.jsonl:2: question '1' answered twice \(also at .*2_0\.jsonl:1\)"):
        merge_answers.main(["--out", out, a, dup])
    with pytest.raises(EvalError, match=r"m\.jsonl:1: method='fastv'"):
        merge_answers.main(["--out", out, a, mixed])
    with pytest.raises(EvalError, match=r"not found: .*2_9\.jsonl"):
        merge_answers.main(["--out", out, a, str(tmp_path / "2_9.jsonl")])
    with pytest.raises(EvalError, match="also one of the chunk files"):
        merge_answers.main(["--out", a, a])
    nothing = jsonl(tmp_path / "n.jsonl", [{"question_id": 3, **RUN}])  # neither text nor (id, pred)
    with pytest.raises(EvalError, match=r"n\.jsonl:1: line lacks 'question_id' and 'text'"):
        merge_answers.main(["--out", out, a, nothing])
    assert not os.path.exists(out)
    cmd = [sys.executable, "-m", "llava.eval.merge_answers", "--out", out, a, str(tmp_path / "2_9.jsonl")]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: chunk file(s) not found")


# ---------------------------------------------------------------- bad input, CLI

def test_malformed_and_empty_results(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": \n')
    with pytest.raises(EvalError, match=r"a\.jsonl:2: malformed"):
        read_jsonl(str(p))
    p.write_text("\n")
    with pytest.raises(EvalError, match="empty"):
        read_jsonl(str(p))
    with pytest.raises(EvalError, match="not found"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_cli_json_last_line(tmp_path):
    qs = tmp_path / "q.json"
    qs.write_text(json.dumps({"1": {"answer": "yes"}}))
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "text": "Yes"}])
    cmd = [sys.executable, "-m", "llava.eval.eval_gqa", "--question-file", str(qs), "--result-file", r]
    out = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == 100.0
    bad = subprocess.run(cmd[:-1] + [str(tmp_path / "missing.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and "missing.jsonl" in bad.stderr

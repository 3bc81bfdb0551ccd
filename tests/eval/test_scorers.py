"""Hand-worked checks of the benchmark scorers (llava/eval/eval_*.py) on tiny fixtures in the official formats."""
import csv
import json
import os
import subprocess
import sys

import pytest

from llava.eval import eval_gqa, eval_mmbench, eval_mme, eval_pope, eval_science_qa, eval_textvqa, eval_vqa
from llava.eval._io import EvalError, parse_letter, read_jsonl
from llava.eval.eval_vqa import soft_accuracy
from llava.eval.vqa_normalize import normalize_answer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ---------------------------------------------------------------- VQA normalisation / soft accuracy

@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("a cat", "cat"), ("1,000", "1000"),
    ("3.5", "3.5"), ("Yes/No", "yes no"), ("red, white", "red white"), ("  An Apple\n", "apple"),
    ("isnt", "isn't"), ("couldntve", "couldn't've"), ("well", "well"), ("ten!", "10"),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("m,acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_leave_one_out(m, acc):
    gts = ["two"] * m + ["three"] * (10 - m)
    assert soft_accuracy("2", gts) == pytest.approx(acc)   # "2" matches "two" after normalisation


def test_vqav2_submission_covers_all_questions(tmp_path, capsys):
    q = jsonl(tmp_path / "q.jsonl", [{"question_id": i, "text": "?"} for i in (1, 2, 3)])
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": " Yes. "}, {"question_id": 3, "text": "Two"}])
    out = tmp_path / "up" / "test-dev.json"
    eval_vqa.main(["--question-file", q, "--result-file", r, "--submission-out", str(out), "--json"])
    assert json.loads(out.read_text()) == [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": ""},
                                           {"question_id": 3, "answer": "two"}]
    assert last_json(capsys)["submission_unanswered"] == 1
    bad = jsonl(tmp_path / "b.jsonl", [{"question_id": 9, "text": "x"}])
    with pytest.raises(EvalError, match="9"):
        eval_vqa.main(["--question-file", q, "--result-file", bad, "--submission-out", str(out)])


# ---------------------------------------------------------------- TextVQA

def textvqa_fixture(tmp_path):
    data = [{"question_id": 100, "image_id": "img1", "question": "What brand is it?", "answers": ["nike"] * 2 + ["adidas"] * 8},
            {"question_id": 101, "image_id": "img2", "question": "What number?", "answers": ["3"] * 10}]
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return str(ann)


def test_textvqa_by_question_id(tmp_path, capsys):
    ann = textvqa_fixture(tmp_path)
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": 100, "prompt": "x", "text": "Nike"},
                                     {"question_id": 101, "prompt": "x", "text": "three"}])
    eval_textvqa.main(["--annotation-file", ann, "--result-file", r, "--json"])
    assert last_json(capsys)["accuracy"] == pytest.approx(80.0)   # (0.6 + 1.0) / 2


def test_textvqa_by_prompt(tmp_path):
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


# ---------------------------------------------------------------- POPE

def test_pope_confusion_counts():
    # TP=3, FP=1, TN=4, FN=2
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    m = eval_pope.confusion_metrics(preds, labels)
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (3, 1, 4, 2)
    assert m["precision"] == 0.75 and m["recall"] == 0.6 and m["accuracy"] == 0.7 and m["yes_ratio"] == 0.4
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


@pytest.mark.parametrize("text,ans", [("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a cat.", "no"),
                                      ("Yes. No cat though.", "yes"), ("no", "no"), ("Nothing here", "yes")])
def test_pope_parse(text, ans):
    assert eval_pope.parse_yes_no(text) == ans


def test_pope_cli(tmp_path, capsys):
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


# ---------------------------------------------------------------- MME

def test_mme_acc_plus_pairs(tmp_path, capsys):
    # existence: img1 both right, img2 one of two right -> acc 75, acc+ 50, score 125
    # code_reasoning: one image, both wrong (one unreadable) -> 0
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


def test_mme_annotation_dir(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    (root / "artwork" / "questions_answer_YES_or_NO").mkdir(parents=True)
    (root / "artwork" / "questions_answer_YES_or_NO" / "10.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\nIs this by Dali? Please answer yes or no.\tNo\n")
    (root / "OCR").mkdir()
    (root / "OCR" / "5.txt").write_text("Is the word 'hi'? Please answer yes or no.\tNo\n"
                                        "Is the word 'ho'? Please answer yes or no.\tYes\n")
    qs = [("artwork/10.jpg", "Is this by Monet? Please answer yes or no.", "Yes"),
          ("artwork/10.jpg", "Is this by Dali? Please answer yes or no.", "No"),
          ("OCR/5.png", "Is the word 'hi'? Please answer yes or no.", "No"),
          ("OCR/5.png", "Is the word 'ho'? Please answer yes or no.", "No")]
    questions = [{"question_id": i, "text": t} for i, t, _ in qs]
    results = [{"question_id": i, "prompt": t, "text": p} for i, t, p in qs]
    m = eval_mme.score_mme(results, questions, eval_mme.MMEAnnotations(str(root)))
    assert m["subtasks"]["artwork"]["score"] == 200.0
    assert m["subtasks"]["OCR"]["score"] == 50.0        # acc 50, acc+ 0
    assert m["perception"] == 250.0


# ---------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("text,n,letter", [("A", 4, "A"), ("B.", 4, "B"), ("(C)", 4, "C"), ("D. a frog", 4, "D"),
                                           ("The answer is B.", 3, "B"), ("A cat", 4, None), ("E", 4, None),
                                           ("I am not sure", 4, None), ("Answer: C", 3, "C")])
def test_parse_letter(text, n, letter):
    assert parse_letter(text, n) == letter


def test_science_qa(tmp_path, capsys):
    problems = {"1": {"question": "?", "choices": ["x", "y"], "answer": 1, "image": "image.png", "split": "test"},
                "2": {"question": "?", "choices": ["x", "y", "z"], "answer": 0, "image": "image.png", "split": "test"},
                "3": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "test"},
                "4": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "test"},
                "9": {"question": "?", "choices": ["x", "y"], "answer": 0, "image": None, "split": "val"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["9"]}))
    r = jsonl(tmp_path / "a.jsonl", [{"question_id": "1", "text": "B"}, {"question_id": "2", "text": "The answer is A."},
                                     {"question_id": "3", "text": "A"}, {"question_id": "4", "text": "no idea"}])
    out = tmp_path / "res.json"
    eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", r, "--output-file", str(out), "--json"])
    m = last_json(capsys)
    assert m["img_accuracy"] == pytest.approx(200 / 3) and m["img_n"] == 3
    assert m["accuracy"] == 75.0 and m["unparseable"] == 1
    assert json.loads(out.read_text())["results"]["4"]["pred"] is None


# ---------------------------------------------------------------- MMBench

def mmbench_tsv(path):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]
    rows = [[0, "Which is red?", "nan", "apple", "sky", "grass", "", "A", "color", "perception", "dev", "iVBOR"],
            [1, "Which is a fish?", "", "cat", "dog", "trout", "bird", "C", "animal", "reasoning", "dev", "iVBOR"],
            [2, "哪个是猫?", "nan", "猫", "狗", "", "", "A", "animal", "reasoning", "dev", "iVBOR"]]
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([cols] + rows)
    return str(path)


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


def test_mmbench_circular(tmp_path, capsys):
    tsv = mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv")
    # item 0: all 3 rounds right; item 1: round 2 of 4 wrong -> fails; item 2: both rounds right
    r = jsonl(tmp_path / "a.jsonl", mmbench_answers([(0, 3, "A", ()), (1, 4, "C", (2,)), (2, 2, "A", ())]))
    up = tmp_path / "upload"
    eval_mmbench.main(["--annotation-file", tsv, "--result-file", r, "--upload-dir", str(up), "--experiment", "exp",
                       "--json"])
    m = last_json(capsys)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["accuracy_single"] == 100.0
    assert m["by_category"] == {"animal": 50.0, "color": 100.0}
    sub = m["submission"]
    assert os.path.isfile(sub) and os.path.dirname(sub) == str(up)
    if sub.endswith(".tsv"):
        with open(sub, encoding="utf-8", newline="") as f:
            got = list(csv.DictReader(f, delimiter="\t"))
        assert [g["prediction"] for g in got] == ["A", "C", "A"] and "image" not in got[0]
        assert got[2]["question"] == "哪个是猫?"


def test_mmbench_rotation_maps_back():
    row = {"index": "5", "A": "w", "B": "x", "C": "y", "D": "z"}
    # round 1 shows x, y, z, w as A..D: answering "D" means original "A"
    assert eval_mmbench.original_letter({"text": "D", "round_id": 1}, eval_mmbench.options(row)) == "A"
    assert eval_mmbench.original_letter({"text": "A", "round_id": 3}, eval_mmbench.options(row)) == "D"
    assert eval_mmbench.original_letter({"text": "y", "round_id": 2}, eval_mmbench.options(row)) == "C"


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

"""Paired-bootstrap differences of the toy report, checked against hand-computed answers."""
import json

from toyworld.report import paired_differences


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(tmp_path, correct_by_method, n=200):
    key = _write(tmp_path / "key.jsonl", [{"question_id": i, "answer": "yes", "type": "existence"} for i in range(n)])
    rows = []
    for method, correct in correct_by_method.items():
        answers = [{"question_id": i, "text": "Yes." if i in correct else "no"} for i in range(n)]
        rows.append({"method": method, "budget": 16, "status": "ok",
                     "answers_file": _write(tmp_path / f"{method}.jsonl", answers)})
    return rows, key


def test_difference_and_interval(tmp_path):
    n = 200
    rows, key = _rows(tmp_path, {"learnpruner": set(range(150)), "random": set(range(50)),
                                 "visionzip": set(range(150))}, n)
    [line] = paired_differences(rows, [16], key)
    # 150/200 vs 50/200 correct: +50 points, far outside noise; identical answers: exactly 0 with a [0, 0] interval
    assert "random +50.0 [" in line and "random +50.0 [+4" in line and "within noise" not in line.split("random")[1].split(";")[0]
    assert "visionzip +0.0 [+0.0, +0.0, within noise]" in line


def test_small_difference_is_within_noise(tmp_path):
    rows, key = _rows(tmp_path, {"learnpruner": set(range(101)), "cls": set(range(1, 101))}, 200)
    [line] = paired_differences(rows, [16], key)
    assert line.startswith("T=16:") and "cls +0.5 [" in line and "within noise" in line


def test_missing_learnpruner_gives_no_line(tmp_path):
    rows, key = _rows(tmp_path, {"cls": {1}}, 10)
    assert paired_differences(rows, [16], key) == []

"""Difficulty split (VTC-Bench; issue #21 item 6), worked out by hand, and its toy-report columns."""

import json

import pytest

from llava.eval.difficulty import difficulty_split
from toyworld.report import main as report

QIDS = ["1", "2", "3", "4", "5", "6"]


def _correct(right):
    return {q: q in right for q in QIDS}


def test_split_by_hand():
    """Six items; the reference (downsample) is right on 1, 2, 3, so easy = {1, 2, 3}, hard = {4, 5, 6}.
    Method X is right on 1, 4, 5, 6: easy accuracy 1/3 = 33.3 %, hard 3/3 = 100 % (overall 4/6 = 66.7 % would
    hide that X adds its value exactly where downsampling fails). Method Y right on 1, 2, 3 (= the reference):
    easy 100 %, hard 0 %. The reference against itself is always 100 / 0."""
    reference = _correct({"1", "2", "3"})
    x = difficulty_split(_correct({"1", "4", "5", "6"}), reference)
    assert x == {"easy": pytest.approx(100 / 3), "easy_n": 3, "hard": 100.0, "hard_n": 3}
    assert difficulty_split(_correct({"1", "2", "3"}), reference) == {"easy": 100.0, "easy_n": 3, "hard": 0.0, "hard_n": 3}
    # reference right on everything: no hard item, so no hard accuracy (None, not 0)
    split = difficulty_split(_correct({"2"}), _correct(set(QIDS)))
    assert split["hard"] is None and split["hard_n"] == 0 and split["easy"] == pytest.approx(100 / 6)


def test_split_refuses_different_questions():
    with pytest.raises(ValueError, match=r"different questions \(1 in only one, e.g. \['6'\]\)"):
        difficulty_split({q: True for q in QIDS[:5]}, _correct({"1"}))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sweep(tmp_path, runs):
    """A toy sweep over the six questions (gold answer "yes"); ``runs``: (method, budget, status, right ids)."""
    key = _write(tmp_path / "key.jsonl", [{"question_id": q, "answer": "yes", "type": "existence"} for q in QIDS])
    rows = []
    for method, budget, status, right in runs:
        answers = None
        if status == "ok":
            answers = _write(tmp_path / f"{method}-{budget}.jsonl",
                             [{"question_id": q, "text": "Yes" if q in right else "no"} for q in QIDS])  # fmt: skip
        rows.append({"benchmark": "toy", "method": method, "budget": budget, "status": status,
                     "value": 100 * len(right) / len(QIDS) if status == "ok" else None,
                     "extra": {"by_type": {"existence": 100 * len(right) / len(QIDS)}} if status == "ok" else {},
                     "avg_vision_tokens": budget, "note": "grid too small" if status != "ok" else "",
                     "answers_file": answers})  # fmt: skip
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text(json.dumps({"model_id": "toy", "num_vision_tokens": 144, "budgets": [16, 8],
                                                    "rows": rows}))  # fmt: skip
    return str(sweep), key


def test_report_columns_and_skip_line(tmp_path, capsys):
    """T=16: downsample right on 1-3, learnpruner on 1, 4, 5, 6 -> learnpruner Easy 33.3, Hard 100.0; downsample
    100.0 / 0.0. T=8: downsample infeasible -> one line says so, and T=8 rows show "–" (no silent number)."""
    sweep, key = _sweep(tmp_path, [
        ("none", None, "ok", set(QIDS)), ("learnpruner", 16, "ok", {"1", "4", "5", "6"}),
        ("downsample", 16, "ok", {"1", "2", "3"}), ("learnpruner", 8, "ok", {"1"}), ("downsample", 8, "infeasible", set()),
    ])  # fmt: skip
    out = report(["--sweep", sweep, "--answer-key", key, "--difficulty-reference", "downsample"])
    assert out["difficulty"] == [
        "T=16: Easy = the 3 questions downsample at T=16 answers right, Hard = the 3 it answers wrong",
        "T=8: difficulty split skipped: downsample has no answers at this budget (status infeasible: grid too small)",
    ]
    table = (tmp_path / "sweep" / "table_toy.md").read_text()
    assert "| Loyalty | R→W | W→R | Easy | Hard |" in table
    lines = table.splitlines()
    t16, t8 = lines.index(next(x for x in lines if "Retain Averaged 16" in x)), lines.index(
        next(x for x in lines if "Retain Averaged 8" in x))  # fmt: skip
    learnpruner_16 = next(x for x in lines[t16:t8] if x.startswith("| learnpruner |"))
    assert learnpruner_16.endswith("| 33.3 | 100.0 |")
    assert next(x for x in lines[t16:t8] if x.startswith("| downsample |")).endswith("| 100.0 | 0.0 |")
    assert next(x for x in lines[t8:] if x.startswith("| learnpruner |")).endswith("| – | – |")
    assert next(x for x in lines if x.startswith("| Vanilla")).endswith("| – | – |")  # no budget, no reference
    assert "- T=8: difficulty split skipped" in table and "T=8: difficulty split skipped" in capsys.readouterr().out


def test_report_without_the_reference_method(tmp_path):
    sweep, key = _sweep(tmp_path, [("none", None, "ok", set(QIDS)), ("learnpruner", 16, "ok", {"1"})])
    out = report(["--sweep", sweep, "--answer-key", key, "--difficulty-reference", "downsampel"])
    assert out["difficulty"] == ["difficulty split skipped: no 'downsampel' rows in the sweep (methods: none, "
                                 "learnpruner); add it to the sweep or pick one of these with --difficulty-reference"]  # fmt: skip
    assert "Easy" not in (tmp_path / "sweep" / "table_toy.md").read_text()
    with pytest.raises(SystemExit):
        report(["--sweep", sweep, "--difficulty-reference", "downsample"])  # needs --answer-key

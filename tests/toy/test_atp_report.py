"""toyworld.atp_report on a hand-made sweep: per-type token statistics and ATP's paired differences."""
import json

import pytest

from toyworld.atp_report import report, tokens_by_type


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sweep(tmp_path):
    """4 questions: 0, 1 count; 2, 3 color. ATP keeps [8, 6] then [8, 2] / [8, 4], [8, 4] (layers 0-1 of 2);
    learnpruner keeps [8, 2] everywhere (average 5). ATP answers all right, learnpruner only 0 and 2."""
    data = tmp_path / "toy"
    data.mkdir()
    types = ["count", "count", "color", "color"]
    _write(data / "test_questions.jsonl", [{"question_id": i, "category": t, "text": "q"} for i, t in enumerate(types)])
    _write(data / "test_answers.jsonl", [{"question_id": i, "answer": "two", "type": t} for i, t in enumerate(types)])
    atp_counts = [[8, 6], [8, 2], [8, 4], [8, 4]]
    atp = _write(tmp_path / "atp.jsonl", [{"question_id": i, "text": "two", "vision_tokens_per_layer": c}
                                          for i, c in enumerate(atp_counts)])  # fmt: skip
    lp = _write(tmp_path / "lp.jsonl", [{"question_id": i, "text": "two" if i in (0, 2) else "one",
                                         "vision_tokens_per_layer": [8, 2]} for i in range(4)])  # fmt: skip
    rows = [
        {"method": "atp", "budget": 5, "benchmark": "toy", "status": "ok", "value": 100.0, "avg_vision_tokens": 5.5,
         "extra": {"by_type": {"count": 100.0, "color": 100.0}}, "note": "", "answers_file": atp, "tokens_std": 1.0},
        {"method": "learnpruner", "budget": 5, "benchmark": "toy", "status": "ok", "value": 50.0,
         "avg_vision_tokens": 5.0, "extra": {"by_type": {"count": 50.0, "color": 50.0}}, "note": "",
         "answers_file": lp, "tokens_std": 0.0},
    ]  # fmt: skip
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text(json.dumps({"rows": rows}))
    return sweep, data


def test_tokens_by_type_by_hand(tmp_path):
    """count: prompt averages (8+6)/2 = 7 and (8+2)/2 = 5 -> mean 6, p10 = 5 + 0.1 * (7 - 5) = 5.2, p90 = 6.8;
    layer means [8, 4]. color: 6 and 6 -> mean 6, p10 = p90 = 6, layers [8, 4]."""
    sweep, data = _sweep(tmp_path)
    categories = {i: t for i, t in enumerate(["count", "count", "color", "color"])}
    stats = tokens_by_type(str(tmp_path / "atp.jsonl"), categories)
    assert stats["count"] == {"mean": 6.0, "p10": pytest.approx(5.2), "p90": pytest.approx(6.8), "n": 2, "layers": [8.0, 4.0]}
    assert stats["color"]["mean"] == 6.0 and stats["color"]["p10"] == 6.0 and stats["color"]["layers"] == [8.0, 4.0]


def test_report_table_differences_and_match_flag(tmp_path):
    """ATP 4/4 right, learnpruner 2/4: ATP − X = +50 points; averages 5.5 vs 5.0 are matched within 1.5 tokens but
    not within 0.25 (then marked †). Files are written."""
    sweep, data = _sweep(tmp_path)
    text = report(sweep, data)
    assert "| 5 | atp | 5.5 | 100.0 | 100.0 | 100.0 |  |" in text
    lp_line = next(line for line in text.splitlines() if line.startswith("| 5 | learnpruner"))
    assert lp_line.startswith("| 5 | learnpruner | 5.0 | 50.0 | 50.0 | 50.0 | +50.0 [")
    assert "| 5 | count | 8.0 | 4.0 |" in text and "6.0 [5.2, 6.8]" in text
    assert (sweep / "atp_report.md").read_text() == text and (sweep / "atp_tokens_by_type.png").stat().st_size > 0
    assert "| 5 | learnpruner | 5.0 † |" in report(sweep, data, match_tol=0.25)


def test_report_needs_an_atp_run(tmp_path):
    sweep, data = _sweep(tmp_path)
    results = json.loads((sweep / "results.json").read_text())
    results["rows"] = results["rows"][1:]
    (sweep / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="no successful atp run"):
        report(sweep, data)


def test_matched_sweep_rows_join_the_nearest_atp_budget(tmp_path):
    """A second sweep with learnpruner at budget 6 (average 6.0, 0.5 from ATP's 5.5): listed under T=5 as
    "learnpruner@6" with its own paired difference; a row 3 tokens away is left out."""
    sweep, data = _sweep(tmp_path)
    other = tmp_path / "matched"
    other.mkdir()
    rows = json.loads((sweep / "results.json").read_text())["rows"]
    near = {**rows[1], "budget": 6, "avg_vision_tokens": 6.0}
    far = {**rows[1], "method": "vispruner", "budget": 9, "avg_vision_tokens": 8.5}
    (other / "results.json").write_text(json.dumps({"rows": [near, far]}))
    text = report(sweep, data, extra_sweeps=[other])
    assert "| 5 | learnpruner@6 | 6.0 | 50.0 |" in text and "vispruner" not in text
    line = next(line for line in text.splitlines() if "learnpruner@6" in line)
    assert "+50.0 [" in line

"""The LPM cross-task matrix (toyworld.cross_task), checked against values worked out by hand."""
import json

import pytest

from toyworld.cross_task import GROUPS, main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """10 questions: ids 0-3 are colour (attributes), 4-9 are count (layout); every answer is "2"."""
    types = ["color"] * 4 + ["count"] * 6
    key = _write(tmp_path / "key.jsonl", [{"question_id": i, "answer": "2", "type": t} for i, t in enumerate(types)])

    def answers(name, right):
        return _write(tmp_path / f"{name}.jsonl", [{"question_id": i, "text": "2." if i in right else "3"} for i in range(10)])

    return {
        "key": key,
        "vanilla": answers("none", {0, 1, 2, 3, 4, 5, 6, 7}),  # colour 4/4, count 4/6
        "all": answers("all", {0, 1, 2, 4, 5, 6}),  # colour 3/4, count 3/6
        "attributes": answers("attr", {0, 1, 2, 3, 4}),  # colour 4/4, count 1/6
    }


def test_matrix_values(files):
    """Hand-worked RelAcc = run's correct / unpruned correct on the column's questions:

    * all-types LPM: attributes 3/4 = 75.0 %, layout 3/4 = 75.0 %, all 6/8 = 75.0 %;
    * attributes-only LPM: attributes 4/4 = 100.0 %, layout 1/4 = 25.0 %, all 5/8 = 62.5 %;
    * difference to the all-types row: +25.0 / -50.0 / -12.5 RelAcc points.
    Accuracy (not relative): attributes-only on layout = 1/6 = 16.7 %.
    """
    result = main(["--answer-key", files["key"], "--vanilla", files["vanilla"], "--lpm", f"all={files['all']}",
                   "--lpm", f"attributes={files['attributes']}"])  # fmt: skip
    assert result["relacc"]["all"] == pytest.approx({"attributes": 75.0, "layout": 75.0, "all": 75.0})
    assert result["relacc"]["attributes"] == pytest.approx({"attributes": 100.0, "layout": 25.0, "all": 62.5})
    assert result["acc"]["attributes"]["layout"] == pytest.approx(100 / 6)
    means = {c: d[0] for c, d in result["diff"]["attributes"].items()}
    assert means == pytest.approx({"attributes": 25.0, "layout": -50.0, "all": -12.5})
    assert result["n"] == {"attributes": 4, "layout": 6, "all": 10}
    assert result["diff"]["all"] == {}
    for m, lo, hi in result["diff"]["attributes"].values():
        assert lo <= m <= hi


def test_groups_are_disjoint_and_cover_the_toy_types():
    from toyworld.report import TYPES

    members = [t for g in GROUPS.values() for t in g]
    assert sorted(members) == sorted(TYPES) and len(set(members)) == len(members)


def test_bad_arguments(files):
    with pytest.raises(ValueError, match="unknown question-type group 'colour'"):
        main(["--answer-key", files["key"], "--vanilla", files["vanilla"], "--lpm", f"colour={files['all']}"])
    with pytest.raises(SystemExit):
        main(["--answer-key", files["key"], "--vanilla", files["vanilla"], "--lpm", files["all"]])

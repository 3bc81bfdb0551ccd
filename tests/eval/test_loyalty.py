"""Answer loyalty, worked out by hand."""

import json

import pytest

from llava.eval.eval_toy import normalize_prediction
from llava.eval.loyalty import loyalty


def _answers(path, texts):
    path.write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return str(path)


def test_loyalty_by_hand(tmp_path):
    """Unpruned: red, Yes., 3, left; pruned: Red, no, 3, (missing). Normalised (strip, drop '.', lowercase): the
    three shared questions agree on 0 and 2 -> loyalty 2/3 = 66.7 %. Correctness (key red, yes, 2, left): unpruned
    right on 0, 1, 3; pruned right on 0 only -> right->wrong on 1 and 3: 2/4 = 50 %; wrong->right: none, 0 %."""
    base = _answers(tmp_path / "a.jsonl", ["red", "Yes.", "3", "left"])
    pruned = _answers(tmp_path / "b.jsonl", ["Red", "no", "3"])
    base_correct = {"0": True, "1": True, "2": False, "3": True}
    pruned_correct = {"0": True, "1": False, "2": False, "3": False}
    out = loyalty(base, pruned, normalize_prediction, base_correct, pruned_correct)
    assert out["loyalty"] == pytest.approx(200 / 3) and out["questions"] == 3
    assert out["right_to_wrong"] == 50.0 and out["wrong_to_right"] == 0.0


def test_loyalty_refuses_disjoint_runs(tmp_path):
    base = _answers(tmp_path / "a.jsonl", ["x"])
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps({"question_id": 7, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="share no question_id"):
        loyalty(base, str(other), normalize_prediction)

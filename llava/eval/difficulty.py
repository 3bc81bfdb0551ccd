"""Difficulty split: accuracy on the items a reference method gets right ("easy") and wrong ("hard").

VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation Framework for Visual Token Compression
Methods", arXiv:2510.07143) uses plain image downsampling as a discriminator of simple and difficult samples:
an item that downsampling at the same compression answers correctly does not test what a pruning method keeps.
Issue #21 (item 6) asks for the plain split: the reference is any method of the sweep (``downsample`` by
default) at the same budget, items are partitioned by its per-question correctness (e.g.
:func:`llava.eval.eval_toy.correct_by_question`), and a method's accuracy is computed on each part.
"""

from __future__ import annotations


def difficulty_split(correct: dict, reference: dict) -> dict:
    """``{"easy", "hard"}`` accuracy (%) of ``correct`` on the questions ``reference`` got right / wrong, and the
    part sizes ``easy_n`` / ``hard_n``; an empty part's accuracy is None.

    Both map question id -> answered correctly (bool), over the same questions (unanswered questions are
    False, as the scorers count them); a question missing from either is an error, not a silent "wrong".
    """
    missing = sorted(set(reference) ^ set(correct), key=str)
    if missing:
        raise ValueError(f"the method and the reference were scored on different questions ({len(missing)} in only "
                         f"one, e.g. {missing[:3]}); split runs of the same benchmark and answer key")  # fmt: skip
    out = {}
    for part, wanted in (("easy", True), ("hard", False)):
        ids = [q for q, ok in reference.items() if bool(ok) is wanted]
        out[part] = 100 * sum(bool(correct[q]) for q in ids) / len(ids) if ids else None
        out[f"{part}_n"] = len(ids)
    return out

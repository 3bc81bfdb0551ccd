"""Answer loyalty (EffiVLM-Bench): how often a pruned model answers exactly as the unpruned one.

For one benchmark, with both runs' answers files and the benchmark's own answer normalisation:

* ``loyalty``: share of questions whose normalised answers are identical (over the questions both runs answered);
* ``right_to_wrong``: share of all questions the unpruned model got right and the pruned one wrong;
* ``wrong_to_right``: the reverse (needs per-question correctness, e.g. the scorer's ``correct_by_question``).

Values are percentages.
"""

from __future__ import annotations

from typing import Callable

from ._io import key, read_jsonl


def loyalty(base_file: str, pruned_file: str, normalize: Callable[[str], str],
            base_correct: dict | None = None, pruned_correct: dict | None = None) -> dict:  # fmt: skip
    """``base_file`` (unpruned) vs ``pruned_file`` answers jsonl (``question_id``, ``text``)."""
    base = {key(r["question_id"]): normalize(r["text"]) for r in read_jsonl(base_file, "answers", ("question_id", "text"))}
    pruned = {key(r["question_id"]): normalize(r["text"]) for r in read_jsonl(pruned_file, "answers", ("question_id", "text"))}
    shared = [q for q in base if q in pruned]
    if not shared:
        raise ValueError(f"{base_file} and {pruned_file} share no question_id; compare runs of the same benchmark")
    out = {"loyalty": 100 * sum(base[q] == pruned[q] for q in shared) / len(shared), "questions": len(shared)}
    if base_correct is not None and pruned_correct is not None:
        n = len(base_correct)
        out["right_to_wrong"] = 100 * sum(base_correct[q] and not pruned_correct.get(q, False) for q in base_correct) / n
        out["wrong_to_right"] = 100 * sum(not base_correct[q] and pruned_correct.get(q, False) for q in base_correct) / n
    return out

"""LPM cross-task generalisation on the toy world: trained-on x evaluated-on, as RelAcc at one budget.

    python -m toyworld.cross_task --answer-key DATA/test_answers.jsonl --vanilla NONE_ANSWERS.jsonl \
        --lpm all=ANSWERS.jsonl --lpm attributes=ANSWERS.jsonl --lpm layout=ANSWERS.jsonl [--out matrix.md]

Each ``--lpm NAME=FILE`` is LearnPruner's answers with an LPM trained on the question types of group NAME
(``all``: every type), all at the same budget (``scripts/toy/cross_task.sh`` trains and runs them). The matrix
cell (trained on A, evaluated on B) is RelAcc = accuracy of that run on B's test questions / accuracy of the
unpruned model on the same questions, in %. Off the diagonal the LPM never saw the evaluated types. A second
table gives each row's difference to the ``all`` row, in RelAcc points, with a 95 % paired-bootstrap interval
(test questions of the column resampled with replacement), so a cross-task drop is not read into noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

# The two disjoint groups of the matrix: what an object or the image looks like, and where / how many objects are.
GROUPS = {
    "attributes": ("color", "shape", "background", "text"),
    "layout": ("existence", "count", "position"),
}
ALL = "all"


def group_types(name: str) -> tuple[str, ...] | None:
    """The question types of a group (None = every type)."""
    if name == ALL:
        return None
    if name not in GROUPS:
        raise ValueError(f"unknown question-type group {name!r}; valid: {ALL}, {', '.join(GROUPS)}")
    return GROUPS[name]


def correct_vector(answers_file: str, answer_key: list[dict]) -> np.ndarray:
    """0/1 per answer-key question (key order) for one answers file, scored by the toy scorer."""
    from llava.eval._io import key, read_jsonl
    from llava.eval.eval_toy import correct_by_question

    by_key = correct_by_question(read_jsonl(answers_file), answer_key)[0]
    return np.array([by_key[key(a["question_id"])] for a in answer_key], dtype=np.float64)


def matrix(vanilla: np.ndarray, runs: dict[str, np.ndarray], types: list[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """``{"relacc": {row: {col: %}}, "acc": {...}, "diff": {row: {col: (mean, lo, hi)}}, "n": {col: questions}}``.

    ``vanilla`` and every run are 0/1 vectors over the same questions; ``types`` their question types. Columns
    are the groups plus ``all``; ``diff`` is ``row - all`` in RelAcc points with a paired-bootstrap 95 % interval.
    """
    types = np.asarray(types)
    cols = [*GROUPS, ALL]
    rng = np.random.default_rng(seed)
    out = {"relacc": {}, "acc": {}, "diff": {}, "n": {}}
    masks = {c: np.ones(len(types), bool) if c == ALL else np.isin(types, GROUPS[c]) for c in cols}
    draws = {c: rng.integers(0, masks[c].sum(), (n_boot, masks[c].sum())) for c in cols}
    for c in cols:
        out["n"][c] = int(masks[c].sum())
        if vanilla[masks[c]].sum() == 0:
            raise ValueError(f"the unpruned model answers no {c} question right: RelAcc is undefined")
    for row, correct in runs.items():
        out["relacc"][row], out["acc"][row], out["diff"][row] = {}, {}, {}
        for c in cols:
            base, mine = vanilla[masks[c]], correct[masks[c]]
            out["acc"][row][c] = 100 * mine.mean()
            out["relacc"][row][c] = 100 * mine.sum() / base.sum()
            if row != ALL and ALL in runs:
                ref = runs[ALL][masks[c]]
                idx = draws[c]
                base_n = base[idx].sum(1)
                ok = base_n > 0  # a resample without one unpruned-right question has no RelAcc: left out
                boot = 100 * (mine[idx].sum(1) - ref[idx].sum(1))[ok] / base_n[ok]
                lo, hi = np.percentile(boot, [2.5, 97.5])
                out["diff"][row][c] = (100 * (mine.sum() - ref.sum()) / base.sum(), lo, hi)
    return out


def markdown(result: dict, budget: int | None = None, vanilla_acc: dict | None = None) -> str:
    cols = [*GROUPS, ALL]
    head = "| LPM trained on \\ evaluated on | " + " | ".join(f"{c} ({result['n'][c]} q)" for c in cols) + " |"
    sep = "|---" * (len(cols) + 1) + "|"
    what = f"LearnPruner at T = {budget}, " if budget is not None else ""
    lines = [f"RelAcc (%) = {what}accuracy / unpruned accuracy on the same questions (accuracy in brackets)", "",
             head, sep]  # fmt: skip
    for row in result["relacc"]:
        label = row if row == ALL else f"{row} only"
        cells = [f"{result['relacc'][row][c]:.1f} ({result['acc'][row][c]:.1f})" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if vanilla_acc:
        lines.append("| *unpruned* | " + " | ".join(f"100 ({vanilla_acc[c]:.1f})" for c in cols) + " |")
    diffs = {row: d for row, d in result["diff"].items() if d}
    if diffs:
        lines += ["", "Difference to the LPM trained on all types, RelAcc points [95 % paired-bootstrap interval]:", "",
                  head, sep]  # fmt: skip
        for row, d in diffs.items():
            cells = [f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in (d[c] for c in cols)]
            lines.append(f"| {row} only | " + " | ".join(cells) + " |")
    lines += ["", "Groups: " + "; ".join(f"{g} = {', '.join(t)}" for g, t in GROUPS.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from llava.eval._io import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answer-key", required=True, help="toy test_answers.jsonl (question_id, answer, type)")
    ap.add_argument("--vanilla", required=True, help="the unpruned model's answers jsonl on the same questions")
    ap.add_argument("--lpm", action="append", required=True, metavar="GROUP=ANSWERS",
                    help=f"LearnPruner's answers with an LPM trained on GROUP ({ALL}, {', '.join(GROUPS)}); repeatable")
    ap.add_argument("--budget", type=int, default=None, help="the budget of the runs (for the table's caption)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    answer_key = read_jsonl(args.answer_key, "answer key", ("question_id", "answer", "type"))
    runs = {}
    for item in args.lpm:
        name, sep, path = item.partition("=")
        if not sep or not path:
            ap.error(f"--lpm wants GROUP=ANSWERS_FILE, got {item!r}")
        group_types(name)
        if name in runs:
            ap.error(f"--lpm {name} is given twice")
        runs[name] = correct_vector(path, answer_key)
    vanilla = correct_vector(args.vanilla, answer_key)
    types = [a["type"] for a in answer_key]
    result = matrix(vanilla, runs, types)
    masks = {c: [t in GROUPS[c] for t in types] if c != ALL else [True] * len(types) for c in [*GROUPS, ALL]}
    vanilla_acc = {c: 100 * vanilla[np.array(m)].mean() for c, m in masks.items()}
    text = markdown(result, args.budget, vanilla_acc)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return result


if __name__ == "__main__":
    main()

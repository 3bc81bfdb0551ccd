"""Toy-world comparison report: Table-1-shaped markdown with per-question-type accuracy, plots, Fig.-6 figure.

    python -m toyworld.report --sweep outputs/toy/sweep [--after-layer outputs/toy/sweep_after_layer] \
        [--figure-model checkpoints/toy-llava --data playground/data/toy --figure-budget 16 --figure-images 4]

Reads the sweep's ``results.json`` (``python -m llava.eval.sweep --benchmarks toy ...``; each toy row carries
the scorer's per-type accuracies) and writes into the sweep folder:

* ``table_toy.md``: rows = methods grouped by budget (the paper's Table 1 layout), columns = the seven
  question types, overall accuracy and RelAcc (overall / unpruned overall); infeasible (method, budget)
  pairs stay in the table as "infeasible"; an optional second sweep with FastV/DART's ``after_layer``
  budget convention is appended as separately labelled rows; a row whose vision tokens vary per instance (an
  adaptive method such as ATP) shows its budget and achieved average, "T (achieved A)", when they differ by > 0.5;
* ``verdict`` lines: at each budget, does LearnPruner beat every feasible baseline on overall accuracy?
  With ``--answer-key``, each verdict line is followed by LearnPruner's paired difference to every baseline
  (same questions) with a 95 % paired-bootstrap interval, so a 0.5-point "win" on 1000 questions is not
  mistaken for a real one, and the table gains loyalty columns (``llava.eval.loyalty``): answers identical to
  the unpruned run's after the scorer's normalisation, and the shares turned right → wrong / wrong → right;
* with ``--answer-key`` and ``--difficulty-reference downsample``: Easy / Hard columns (VTC-Bench's difficulty
  split, ``llava.eval.difficulty``), each row's accuracy on the questions the reference method at the same
  budget answers right / wrong, and one line per budget with the part sizes (or why that budget is skipped);
* ``accuracy_by_type.png``: accuracy against the budget, one panel per question type and overall;
* ``kept_patches.png`` (with ``--figure-model``): kept patches (stage 1 importance / diversity, stage 2) of
  several methods on a few test images, drawn by :mod:`llava.serve.visualize`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

TYPES = ("existence", "color", "shape", "count", "position", "background", "text")


def adaptive(row: dict) -> bool:
    """A row whose vision-token count varies across instances (the sweep's ``tokens_std`` > 0, e.g. ATP) and whose
    achieved average is more than 0.5 from its budget: its Avg. tokens cell reads ``"T (achieved A)"``, as the
    sweep's table.md. Fixed-budget rows (std 0, or a results.json without the field) keep the plain average."""
    return (bool(row.get("tokens_std")) and row["budget"] is not None and row["avg"] is not None
            and abs(row["avg"] - row["budget"]) > 0.5)  # fmt: skip


def load_rows(sweep_dir: str | Path, label_suffix: str = "") -> tuple[dict, list[dict]]:
    results = json.loads((Path(sweep_dir) / "results.json").read_text())
    rows = []
    for r in results["rows"]:
        if r["benchmark"] != "toy":
            continue
        rows.append({"method": r["method"] + label_suffix, "budget": r["budget"], "status": r["status"],
                     "overall": r["value"], "by_type": (r.get("extra") or {}).get("by_type", {}),
                     "avg": r["avg_vision_tokens"], "note": r["note"], "answers_file": r.get("answers_file"),
                     "tokens_std": r.get("tokens_std")})  # per-instance spread (sweeps before it: absent)
    return results, rows


def _contenders(rows: list[dict], budget: int, reference: str = "learnpruner") -> tuple[dict | None, list[dict]]:
    """(the reference method's row, the other feasible methods' rows) at one budget."""
    ok = [r for r in rows if r["budget"] == budget and r["status"] == "ok"]
    mine = next((r for r in ok if r["method"] == reference), None)
    return mine, [r for r in ok if r["method"] not in (reference, "none")]


def verdicts(rows: list[dict], budgets: list[int]) -> list[str]:
    """One line per budget: LearnPruner's overall accuracy against every feasible baseline."""
    out = []
    for b in budgets:
        mine, others = _contenders(rows, b)
        if mine is None or not others:
            out.append(f"T={b}: not comparable (LearnPruner or baselines missing)")
            continue
        best = max(others, key=lambda r: r["overall"])
        beaten = [r["method"] for r in others if r["overall"] >= mine["overall"]]
        if beaten:
            out.append(f"T={b}: LearnPruner {mine['overall']:.1f}% does NOT beat every baseline: "
                       + ", ".join(f"{r['method']} {r['overall']:.1f}%" for r in others if r["method"] in beaten)
                       + " are equal or better")
        else:
            out.append(f"T={b}: LearnPruner {mine['overall']:.1f}% beats every feasible baseline "
                       f"(best baseline: {best['method']} {best['overall']:.1f}%)")
    return out


def paired_stats(rows: list[dict], budgets: list[int], answer_key: str | Path, n_boot: int = 2000, seed: int = 0,
                 reference: str = "learnpruner") -> dict[int, list[tuple[str, float, float, float]]]:
    """``{budget: [(method, mean, low, high), ...]}``: ``reference`` minus each other feasible method in overall
    accuracy (points), on the same questions, with a 95 % paired-bootstrap interval (questions resampled with
    replacement, ``n_boot`` times, fixed seed). Budgets without the reference or other methods are left out."""
    import numpy as np

    from llava.eval._io import read_jsonl
    from llava.eval.eval_toy import correct_by_question

    answers = read_jsonl(answer_key, "answer key", ("question_id", "answer"))

    def correct(path: str) -> np.ndarray:  # 0/1 per question, questions in sorted-key order
        by_key = correct_by_question(read_jsonl(path), answers)[0]
        return np.array([by_key[k] for k in sorted(by_key)], dtype=np.float64)

    resample = np.random.default_rng(seed).integers(0, len(answers), (n_boot, len(answers)))
    out = {}
    for b in budgets:
        mine, others = _contenders(rows, b, reference)
        if mine is None or not mine.get("answers_file") or not others:
            continue
        ours = correct(mine["answers_file"])
        out[b] = []
        for r in others:
            diff = 100 * (ours - correct(r["answers_file"]))
            lo, hi = np.percentile(diff[resample].mean(1), [2.5, 97.5])
            out[b].append((r["method"], float(diff.mean()), float(lo), float(hi)))
    return out


def format_difference(mean: float, lo: float, hi: float) -> str:
    """``+1.0 [+0.2, +1.9]``, with ", within noise" when the interval holds 0."""
    sign = "" if lo > 0 or hi < 0 else ", within noise"
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}{sign}]"


def paired_differences(rows: list[dict], budgets: list[int], answer_key: str | Path, n_boot: int = 2000,
                       seed: int = 0) -> list[str]:
    """One line per budget: LearnPruner minus each feasible baseline (:func:`paired_stats`)."""
    return [f"T={b}: LearnPruner minus baseline, points [95% paired-bootstrap CI]: "
            + "; ".join(f"{method} {format_difference(*stats)}" for method, *stats in diffs)
            for b, diffs in paired_stats(rows, budgets, answer_key, n_boot, seed).items()]  # fmt: skip


LOYALTY = ("Loyalty", "R→W", "W→R")


def add_loyalty(rows: list[dict], answer_key: str | Path) -> None:
    """Each ok row gets ``loyalty`` (``llava.eval.loyalty``): identical normalised answers to the unpruned run
    (``none``), and the shares of questions turned right -> wrong and wrong -> right, in %."""
    from llava.eval._io import read_jsonl
    from llava.eval.eval_toy import correct_by_question, normalize_prediction
    from llava.eval.loyalty import loyalty

    answers = read_jsonl(answer_key, "answer key", ("question_id", "answer"))
    vanilla = next((r for r in rows if r["method"] == "none" and r["status"] == "ok" and r.get("answers_file")), None)
    if vanilla is None:
        return
    base_correct = correct_by_question(read_jsonl(vanilla["answers_file"]), answers)[0]
    for r in rows:
        if r["status"] == "ok" and r.get("answers_file"):
            correct = correct_by_question(read_jsonl(r["answers_file"]), answers)[0]
            r["loyalty"] = loyalty(vanilla["answers_file"], r["answers_file"], normalize_prediction, base_correct, correct)


DIFFICULTY = ("Easy", "Hard")


def add_difficulty(rows: list[dict], answer_key: str | Path, reference: str = "downsample") -> list[str]:
    """Each ok row at budget T gets ``difficulty`` (``llava.eval.difficulty.difficulty_split``): its accuracy on
    the questions ``reference`` at T answers right ("easy") and wrong ("hard"), in %.

    Returns one line per budget: the two part sizes, or, where the reference has no answers at that budget
    (not run, infeasible, no answers file), why the budget is skipped; its rows then get no split.
    """
    from llava.eval._io import read_jsonl
    from llava.eval.difficulty import difficulty_split
    from llava.eval.eval_toy import correct_by_question

    if not any(r["method"] == reference for r in rows):
        methods = ", ".join(dict.fromkeys(r["method"] for r in rows))
        return [f"difficulty split skipped: no {reference!r} rows in the sweep (methods: {methods}); add it to the "
                "sweep or pick one of these with --difficulty-reference"]  # fmt: skip
    answers = read_jsonl(answer_key, "answer key", ("question_id", "answer"))
    scored = {}

    def correct(path: str) -> dict:
        if path not in scored:
            scored[path] = correct_by_question(read_jsonl(path), answers)[0]
        return scored[path]

    lines = []
    for b in dict.fromkeys(r["budget"] for r in rows if r["budget"] is not None):
        ref = next((r for r in rows if r["method"] == reference and r["budget"] == b), None)
        if ref is None or ref["status"] != "ok" or not ref.get("answers_file"):
            why = ("not run at this budget" if ref is None else f"status {ref['status']}: {ref['note']}"
                   if ref["status"] != "ok" else "its row has no answers_file")  # fmt: skip
            lines.append(f"T={b}: difficulty split skipped: {reference} has no answers at this budget ({why})")
            continue
        for r in rows:
            if r["budget"] == b and r["status"] == "ok" and r.get("answers_file"):
                r["difficulty"] = difficulty_split(correct(r["answers_file"]), correct(ref["answers_file"]))
        split = ref["difficulty"]
        lines.append(f"T={b}: Easy = the {split['easy_n']} questions {reference} at T={b} answers right, "
                     f"Hard = the {split['hard_n']} it answers wrong")  # fmt: skip
    return lines


def markdown(results: dict, rows: list[dict], extra_rows: list[dict]) -> str:
    n = results["num_vision_tokens"]
    budgets = results["budgets"]
    vanilla = next((r for r in rows if r["method"] == "none" and r["status"] == "ok"), None)
    with_loyalty = any("loyalty" in r for r in rows + extra_rows)
    with_difficulty = any("difficulty" in r for r in rows + extra_rows)
    header = ["Method", "Avg. tokens", *TYPES, "Overall", "RelAcc.", *(LOYALTY if with_loyalty else ()),
              *(DIFFICULTY if with_difficulty else ())]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|"]

    def row_line(r, label):
        extra = (len(LOYALTY) if with_loyalty else 0) + (len(DIFFICULTY) if with_difficulty else 0)
        if r["status"] == "infeasible":
            return "| " + " | ".join([label, "–"] + ["infeasible"] * (len(TYPES) + 2) + ["–"] * extra) + " |"
        cells = [f"{r['by_type'].get(t, float('nan')):.1f}" for t in TYPES]
        rel = f"{100 * r['overall'] / vanilla['overall']:.1f}%" if vanilla and vanilla["overall"] else "–"
        avg = "–" if r["avg"] is None else f"{r['avg']:.1f}"
        if adaptive(r):  # the counts vary per instance: the target beside the achieved average
            avg = f"{r['budget']} (achieved {r['avg']:.1f})"
        loyal = r.get("loyalty")
        tail = ([f"{loyal['loyalty']:.1f}", f"{loyal['right_to_wrong']:.1f}", f"{loyal['wrong_to_right']:.1f}"]
                if loyal else ["–"] * len(LOYALTY)) if with_loyalty else []  # fmt: skip
        if with_difficulty:
            split = r.get("difficulty") or {}
            tail += ["–" if split.get(part) is None else f"{split[part]:.1f}" for part in ("easy", "hard")]
        return "| " + " | ".join([label, avg, *cells, f"**{r['overall']:.1f}**", rel, *tail]) + " |"

    if vanilla:
        lines.append(f"| *Upper Bound, {n} Tokens (100%)* |" + " |" * (len(header) - 1))
        lines.append(row_line(vanilla, "Vanilla (none)"))
    for b in budgets:
        lines.append(f"| *Retain Averaged {b} Tokens (↓ {100 * (1 - b / n):.1f}%)* |" + " |" * (len(header) - 1))
        for r in [r for r in rows if r["budget"] == b and r["method"] != "none"] + \
                 [r for r in extra_rows if r["budget"] == b]:
            lines.append(row_line(r, r["method"]))
    notes = sorted({f"{r['method']} @ {r['budget']}: {r['note']}" for r in rows + extra_rows if r["status"] == "infeasible"})
    if notes:
        lines += ["", "Infeasible (recorded, not adjusted):"] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


def plot_by_type(results: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(results["budgets"])
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))
    vanilla = next((r for r in rows if r["method"] == "none" and r["status"] == "ok"), None)
    panels = list(TYPES) + ["overall"]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for m in methods:
            pts = [(r["budget"], r["overall"] if panel == "overall" else r["by_type"].get(panel))
                   for r in rows if r["method"] == m and r["status"] == "ok"]
            pts = sorted(p for p in pts if p[1] is not None)
            if pts:
                style = dict(linewidth=2.5, color="black") if m == "learnpruner" else {}
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, **style)
        if vanilla:
            ref = vanilla["overall"] if panel == "overall" else vanilla["by_type"].get(panel)
            if ref is not None:
                ax.axhline(ref, color="gray", linestyle="--", label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_title(panel)
        ax.set_xlabel("avg. vision tokens per layer")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Toy world: accuracy vs. visual-token budget ({results['model_id']}, N={results['num_vision_tokens']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def kept_patches_figure(model_path: str, data_dir: str, budget: int, num_images: int, methods: list[str], out: str) -> str:
    """Fig.-6-style overlays for the first test questions of distinct types, stacked vertically."""
    from PIL import Image, ImageDraw

    from learnpruner_ext.visualize import _font
    from llava.serve.visualize import main as visualize

    questions = [json.loads(line) for line in open(os.path.join(data_dir, "test_questions.jsonl"))]
    gold = {a["question_id"]: a["answer"] for a in map(json.loads, open(os.path.join(data_dir, "test_answers.jsonl")))}
    picked, seen = [], set()
    for q in questions:  # one question per type, object-centred types first
        if q["category"] not in seen and q["category"] in ("color", "shape", "count", "position", "text", "existence"):
            seen.add(q["category"])
            picked.append(q)
        if len(picked) == num_images:
            break
    parts = []
    for i, q in enumerate(picked):
        part = f"{out}.part{i}.png"
        visualize(["--model-path", model_path, "--image-file", os.path.join(data_dir, "images", q["image"]),
                   "--query", q["text"], "--methods", ",".join(methods), "--budget", str(budget),
                   "--out", part, "--max-new-tokens", "4", "--device", "cpu"])
        panel = Image.open(part).convert("RGB")
        captioned = Image.new("RGB", (panel.width, panel.height + 28), (255, 255, 255))
        captioned.paste(panel, (0, 28))
        ImageDraw.Draw(captioned).text((8, 4), f"{q['image']}  Q: {q['text'].splitlines()[0]}  (gold answer: "
                                       f"{gold.get(q['question_id'])})", fill=(0, 0, 0), font=_font(18))
        parts.append(captioned)
    width = max(p.width for p in parts)
    canvas = Image.new("RGB", (width, sum(p.height for p in parts)), (255, 255, 255))
    y = 0
    for p in parts:
        canvas.paste(p, (0, y))
        y += p.height
    canvas.save(out)
    for i in range(len(parts)):
        os.remove(f"{out}.part{i}.png")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True, help="sweep output folder (results.json) with the toy benchmark")
    ap.add_argument("--after-layer", default=None, help="optional second sweep (FastV/DART, budget_mode=after_layer)")
    ap.add_argument("--figure-model", default=None, help="draw kept_patches.png with this checkpoint")
    ap.add_argument("--data", default="playground/data/toy", help="toy data folder (test questions and images)")
    ap.add_argument("--answer-key", default=None,
                    help="the toy test_answers.jsonl the sweep was scored with: adds paired-bootstrap intervals")
    ap.add_argument("--difficulty-reference", default=None, metavar="METHOD",
                    help="with --answer-key: Easy/Hard columns, accuracy on the questions METHOD (e.g. downsample) "
                    "at the same budget answers right/wrong")
    ap.add_argument("--figure-budget", type=int, default=16)
    ap.add_argument("--figure-images", type=int, default=4)
    ap.add_argument("--figure-methods", default="learnpruner,vispruner,visionzip,divprune,random,cls")
    args = ap.parse_args(argv)
    if args.difficulty_reference and not args.answer_key:
        ap.error("--difficulty-reference needs --answer-key (the toy test_answers.jsonl the sweep was scored with)")
    results, rows = load_rows(args.sweep)
    extra = load_rows(args.after_layer, " (after_layer)")[1] if args.after_layer else []
    extra = [r for r in extra if r["method"] != "none (after_layer)"]
    if args.answer_key:
        add_loyalty(rows + extra, args.answer_key)
    difficulty = []
    if args.difficulty_reference:
        difficulty = add_difficulty(rows + extra, args.answer_key, args.difficulty_reference)
    table = markdown(results, rows, extra)
    verdict = verdicts(rows, results["budgets"])
    if args.answer_key:
        verdict += paired_differences(rows, results["budgets"], args.answer_key)
    Path(args.sweep, "table_toy.md").write_text(table + "\n" + "\n".join(f"- {v}" for v in verdict + difficulty) + "\n")
    plot_by_type(results, rows + extra, os.path.join(args.sweep, "accuracy_by_type.png"))
    out = {"table": os.path.join(args.sweep, "table_toy.md"), "plot": os.path.join(args.sweep, "accuracy_vs_budget.png"),
           "plot_by_type": os.path.join(args.sweep, "accuracy_by_type.png"), "verdict": verdict,
           "difficulty": difficulty}
    if args.figure_model:
        out["figure"] = kept_patches_figure(args.figure_model, args.data, args.figure_budget, args.figure_images,
                                            args.figure_methods.split(","), os.path.join(args.sweep, "kept_patches.png"))
    print(table)
    print("\n".join(verdict + difficulty))
    print(json.dumps({k: v for k, v in out.items() if k not in ("verdict", "difficulty")}))
    return out


if __name__ == "__main__":
    main()

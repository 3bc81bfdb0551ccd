"""ATP-LLaVA on the toy world: adaptive thresholds against fixed budgets at the same achieved average (issue 19).

    python -m toyworld.atp_report --sweep outputs/toy_atp/sweep --data outputs/toy_atp/eval/toy \
        [--matched outputs/toy_atp/sweep_matched]

Reads a sweep with ``atp`` and the methods to compare (``scripts/toy/train_atp.sh``) and the toy test split
(``test_questions.jsonl`` for the question types, ``test_answers.jsonl`` for the paired bootstrap), and writes
``atp_report.md`` and ``atp_tokens_by_type.png`` into the sweep folder:

* per budget: each method's achieved average (measured), overall and per-type accuracy, and ATP minus each method
  with a 95 % paired-bootstrap interval (:func:`toyworld.report.paired_stats`); a method whose achieved
  average is more than ``--match-tol`` tokens from ATP's is flagged as not matched; ``--matched SWEEP`` adds the
  rows of a sweep run at ATP's achieved averages (e.g. budget 69 where ATP's target 72 achieved 68.9), each under
  the ATP budget it matches, labelled ``method@budget``;
* ATP's vision tokens per question type: the mean and the 10th / 90th percentiles of each prompt's average over
  the layers, and the mean count at each module layer, so one sees whether and where the thresholds adapt;
* the plot: those per-type distributions, one panel per budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llava.eval._io import read_jsonl
from llava.eval.sweep import percentile

from .report import TYPES, format_difference, load_rows, paired_stats


def tokens_by_type(answers_file: str, categories: dict) -> dict[str, dict]:
    """{type: {"mean", "p10", "p90", "n", "layers": [mean count per layer]}} of one run's image prompts."""
    per_type: dict[str, list] = {}
    for rec in read_jsonl(answers_file):
        per_layer = rec.get("vision_tokens_per_layer")
        if per_layer:
            per_type.setdefault(categories[rec["question_id"]], []).append(per_layer)
    out = {}
    for kind, rows in per_type.items():
        averages = [sum(r) / len(r) for r in rows]
        out[kind] = {"mean": sum(averages) / len(averages), "p10": percentile(averages, 10),
                     "p90": percentile(averages, 90), "n": len(rows),
                     "layers": [sum(col) / len(col) for col in zip(*rows)]}  # fmt: skip
    return out


def matched(atp_avg: float, other_avg: float | None, tol: float) -> bool:
    return other_avg is not None and abs(atp_avg - other_avg) <= tol


def matched_rows(atp_rows: list[dict], extra_sweeps, match_tol: float) -> list[dict]:
    """Rows of other sweeps (fixed budgets chosen to meet ATP's achieved averages), each placed under the ATP
    budget whose achieved average is nearest and within ``match_tol``, labelled ``method@budget``."""
    out = []
    for folder in extra_sweeps or ():
        for r in load_rows(folder)[1]:
            if r["status"] != "ok" or r["method"] == "none":
                continue
            nearest = min(atp_rows, key=lambda a: abs(a["avg"] - r["avg"]))
            if matched(nearest["avg"], r["avg"], match_tol):
                out.append({**r, "method": f"{r['method']}@{r['budget']}", "budget": nearest["budget"]})
    return out


def report(sweep: str | Path, data: str | Path, match_tol: float = 1.5, extra_sweeps=None) -> str:
    sweep, data = Path(sweep), Path(data)
    _, rows = load_rows(sweep)
    categories = {q["question_id"]: q["category"] for q in read_jsonl(data / "test_questions.jsonl")}
    atp_rows = sorted((r for r in rows if r["method"] == "atp" and r["status"] == "ok"), key=lambda r: -r["budget"])
    if not atp_rows:
        raise SystemExit(f"error: {sweep}/results.json has no successful atp run; run the sweep with --methods atp,...")
    rows = rows + matched_rows(atp_rows, extra_sweeps, match_tol)
    types = [t for t in TYPES if any(t in r["by_type"] for r in rows)]
    lines = ["# ATP-LLaVA on the toy world", "",
             "Avg. = measured vision tokens per LLM layer (mean over the test prompts). ATP − X: overall accuracy "
             "points of ATP minus method X on the same questions, 95 % paired-bootstrap interval (2,000 resamples). "
             f"A method whose average is more than {match_tol:g} token(s) from ATP's is marked † (not matched).", ""]  # fmt: skip
    lines += ["| T | Method | Avg. | Overall | " + " | ".join(types) + " | ATP − X |",
              "|--:|:--|--:|--:|" + "--:|" * len(types) + ":--|"]
    budgets = [r["budget"] for r in atp_rows]
    diffs = {(b, method): format_difference(*stats)
             for b, rows_b in paired_stats(rows, budgets, data / "test_answers.jsonl", reference="atp").items()
             for method, *stats in rows_b}  # fmt: skip
    for atp in atp_rows:
        b = atp["budget"]
        for r in sorted((r for r in rows if r["budget"] == b), key=lambda r: r["method"] != "atp"):
            if r["status"] != "ok":
                lines.append(f"| {b} | {r['method']} | – | {r['status']} |" + " |" * len(types) + " |")
                continue
            mark = "" if r is atp or matched(atp["avg"], r["avg"], match_tol) else " †"
            cells = " | ".join(f"{r['by_type'][t]:.1f}" if t in r["by_type"] else "–" for t in types)
            lines.append(f"| {b} | {r['method']} | {r['avg']:.1f}{mark} | {r['overall']:.1f} | {cells} | "
                         f"{diffs.get((b, r['method']), '')} |")  # fmt: skip
    none = next((r for r in rows if r["method"] == "none" and r["status"] == "ok"), None)
    if none is not None:
        cells = " | ".join(f"{none['by_type'][t]:.1f}" if t in none["by_type"] else "–" for t in types)
        lines.append(f"| 144 | none (unpruned) | {none['avg']:.1f} | {none['overall']:.1f} | {cells} | |")

    lines += ["", "## ATP's vision tokens per question type", "",
              "Each prompt's vision tokens per LLM layer averaged over the layers: mean [10th, 90th percentile]; then the "
              "mean count in each layer from the first module on.", ""]  # fmt: skip
    stats = {a["budget"]: tokens_by_type(a["answers_file"], categories) for a in atp_rows}
    lines += ["| T | " + " | ".join(types) + " |", "|--:|" + ":--|" * len(types)]
    for b, by_type in stats.items():
        lines.append(f"| {b} | " + " | ".join(
            f"{by_type[t]['mean']:.1f} [{by_type[t]['p10']:.1f}, {by_type[t]['p90']:.1f}]" if t in by_type else "–"
            for t in types) + " |")  # fmt: skip
    depth = len(next(iter(stats[budgets[0]].values()))["layers"])
    lines += ["", "| T | type | " + " | ".join(f"layer {k}" for k in range(depth)) + " |", "|--:|:--|" + "--:|" * depth]
    for b, by_type in stats.items():
        for t in types:
            if t in by_type:
                lines.append(f"| {b} | {t} | " + " | ".join(f"{c:.1f}" for c in by_type[t]["layers"]) + " |")
    _plot(sweep / "atp_tokens_by_type.png", atp_rows, categories, types)
    lines += ["", "Plot: `atp_tokens_by_type.png`; all prompts together: `tokens_histogram.png` (llava.eval.sweep)."]
    text = "\n".join(lines) + "\n"
    (sweep / "atp_report.md").write_text(text)
    return text


def _plot(path: Path, atp_rows: list[dict], categories: dict, types: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(atp_rows), figsize=(3.6 * len(atp_rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], atp_rows):
        values = {t: [] for t in types}
        for rec in read_jsonl(row["answers_file"]):
            per_layer = rec.get("vision_tokens_per_layer")
            if per_layer:
                values[categories[rec["question_id"]]].append(sum(per_layer) / len(per_layer))
        ax.boxplot([values[t] for t in types], showfliers=False)
        ax.set_xticks(range(1, len(types) + 1), types, rotation=45, ha="right", fontsize=8)
        ax.axhline(row["budget"], color="grey", ls="--", lw=0.8)
        ax.set_title(f"ATP, target {row['budget']} (achieved {row['avg']:.1f})", fontsize=9)
        ax.set_ylabel("vision tokens per layer (per prompt)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help="sweep folder with results.json (atp and the methods to compare)")
    p.add_argument("--data", required=True, help="toy test split folder (test_questions.jsonl, test_answers.jsonl)")
    p.add_argument("--matched", action="append", default=[], metavar="SWEEP", help="another sweep whose fixed budgets "
                   "were chosen to meet ATP's achieved averages: its rows join the ATP budget they match (repeatable)")
    p.add_argument("--match-tol", type=float, default=1.5, help="tokens within which two averages count as matched")
    args = p.parse_args(argv)
    text = report(args.sweep, args.data, args.match_tol, args.matched)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""The toy video table: accuracy per question type of each run, against the unpruned base, with loyalty and a
paired-bootstrap interval of the accuracy difference.

    python -m toyworld.video_table --answers DATA/test_a.json --vanilla ANSWERS/none-full.jsonl \
        --runs ANSWERS/*.jsonl --out table.md

Answers files are ``llava.eval.model_video_qa``'s (``id``, ``pred``, run identity); a prediction is correct when,
normalised as the toy scorer does (``llava.eval.eval_toy.normalize_prediction``: strip, drop trailing periods,
lowercase), it equals the key's one-word answer. Chance levels: direction 1/4, appear 1/2, frames 1/5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from llava.eval._io import read_jsonl
from llava.eval.eval_toy import normalize_prediction

from .video import FRAME_COUNTS, TYPES

CHANCE = {"direction": 1 / 4, "appear": 1 / 2, "frames": 1 / len(FRAME_COUNTS)}


def predictions(path: str, answer_key: list[dict]) -> tuple[dict, list[str]]:
    """(run identity, normalised prediction per answer-key question, key order); every question must be answered
    and the file must hold one run."""
    recs = read_jsonl(path, "video QA answers", ("id", "pred"))
    runs = {(r.get("method"), r.get("budget"), r.get("model_fingerprint")) for r in recs}
    if len(runs) != 1:
        raise ValueError(f"{path} mixes runs {sorted(map(str, runs))}; give one run's answers file")
    by_id = {str(r["id"]): normalize_prediction(r["pred"]) for r in recs}
    missing = [a["question_id"] for a in answer_key if str(a["question_id"]) not in by_id]
    if missing:
        raise ValueError(f"{path} has no answer for {len(missing)} questions (e.g. {missing[0]}); finish the run first")
    first = recs[0]
    identity = {"method": first.get("method"), "budget": first.get("budget"),
                "video_stage1": ((first.get("metadata") or {}).get("settings") or {}).get("pruning", {}).get("video_stage1"),
                "avg_tokens": float(np.mean([np.mean(r["vision_tokens_per_layer"]) for r in recs]))}  # fmt: skip
    return identity, [by_id[str(a["question_id"])] for a in answer_key]


def table(answer_key: list[dict], vanilla: str, runs: list[str], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """One row per run (the vanilla run first): accuracy overall and per type, loyalty, and the paired-bootstrap
    95 % interval of (run - vanilla) accuracy over the questions."""
    gold = [str(a["answer"]).lower() for a in answer_key]
    types = np.array([a["type"] for a in answer_key])
    _, base = predictions(vanilla, answer_key)
    base_ok = np.array([p == g for p, g in zip(base, gold)], dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(gold), (n_boot, len(gold)))
    rows = []
    for path in [vanilla] + [r for r in runs if Path(r).resolve() != Path(vanilla).resolve()]:
        identity, pred = predictions(path, answer_key)
        ok = np.array([p == g for p, g in zip(pred, gold)], dtype=float)
        diff = (ok[draws] - base_ok[draws]).mean(1) * 100
        rows.append({
            **identity, "run": Path(path).stem, "n": len(gold), "accuracy": 100 * ok.mean(),
            "by_type": {t: 100 * ok[types == t].mean() for t in TYPES if (types == t).any()},
            "loyalty": 100 * np.mean([p == b for p, b in zip(pred, base)]),
            "diff": (100 * (ok.mean() - base_ok.mean()), *np.percentile(diff, [2.5, 97.5])),
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    types = list(rows[0]["by_type"])
    head = ("| run | T | avg tokens | " + " | ".join(f"{t} (chance {100 * CHANCE[t]:.0f})" for t in types)
            + " | all | Δ vs unpruned [95% CI] | loyalty |")  # fmt: skip
    lines = [head, "|---" * (len(types) + 6) + "|"]
    for r in rows:
        d, lo, hi = r["diff"]
        cells = [f"{r['by_type'][t]:.1f}" for t in types]
        delta = "–" if r["method"] == "none" else f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
        lines.append(f"| {r['run']} | {r['budget'] or 'all'} | {r['avg_tokens']:.1f} | " + " | ".join(cells)
                     + f" | **{r['accuracy']:.1f}** | {delta} | {r['loyalty']:.1f} |")  # fmt: skip
    return "\n".join(lines) + f"\n\n{rows[0]['n']} questions; accuracy in %, loyalty = % of answers identical to the unpruned base's.\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", required=True, help="the toy video test_a.json (answer, question_id, type)")
    p.add_argument("--vanilla", required=True, help="answers of the unpruned base (method none)")
    p.add_argument("--runs", nargs="+", required=True, help="answers files of the pruned runs")
    p.add_argument("--out", help="write the markdown table here (and the rows as .json beside it)")
    args = p.parse_args(argv)
    answer_key = json.loads(Path(args.answers).read_text())
    rows = table(answer_key, args.vanilla, args.runs)
    text = markdown(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

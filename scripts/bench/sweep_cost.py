"""How much of a sweep goes to the vision tower, and what the vision cache saves (issue: sweep cost).

    .venv/bin/python scripts/bench/sweep_cost.py [--rounds 2] [--out outputs/bench_sweep_cost] [-- SWEEP FLAGS]

Runs the same sweep (default: the quickstart's toy sweep, 300 questions, 19 (method, budget) runs) with the
vision cache off and on, alternating, ``--rounds`` times each, every run a fresh process into a fresh folder
with ``--profile``. Reports per pair: the sweep's wall time, the vision tower's seconds (the profile's
``vision_tower`` section, summed over jobs) and its share, the cached / uncached wall-time ratio, and whether
every answer is identical (answer lines compared without their random ``answer_id``). Ratios from the same
machine in one invocation are what to compare; absolute times are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY_SWEEP = ["--model-path", "checkpoints/toy-llava", "--methods",
             "none,learnpruner,vispruner,visionzip,divprune,random,cls", "--budgets", "32,16,8", "--benchmarks", "toy",
             "--batch-size", "50", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]  # fmt: skip


def toy_eval_root(out: Path, questions: int) -> Path:
    """The quickstart's test split (first ``questions`` of the 1000 held-out questions)."""
    root = out / "data"
    if not (root / "toy" / "test_questions.jsonl").exists():
        subprocess.run([sys.executable, "-m", "toyworld.generate", "--out", str(root / "toy"), "--seed", "0",
                        "--num-train", "1", "--num-test", "1000"], check=True, capture_output=True)  # fmt: skip
        for name in ("test_questions.jsonl", "test_answers.jsonl"):
            path = root / "toy" / name
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:questions]))
    return root


def sweep(flags: list[str], out: Path, cache_gb: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llava.eval.sweep", *flags, "--out", str(out), "--profile",
                    "--vision-cache-gb", str(cache_gb)], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - start
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    tower = sum(j.get("stage_seconds", {}).get("vision_tower", 0.0) for j in jobs)
    hits = sum(j.get("vision_cache", {}).get("hits", 0) for j in jobs)
    misses = sum(j.get("vision_cache", {}).get("misses", 0) for j in jobs)
    return {"wall": wall, "tower": tower, "jobs_seconds": sum(j.get("seconds", 0.0) for j in jobs), "hits": hits,
            "misses": misses}  # fmt: skip


def answers(out: Path) -> dict:
    found = {}
    for path in sorted((out / "answers").rglob("answers.jsonl")):
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        found[str(path.relative_to(out))] = [{k: v for k, v in r.items() if k != "answer_id"} for r in lines]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--questions", type=int, default=300, help="toy questions (default sweep only)")
    ap.add_argument("--cache-gb", type=float, default=2.0)
    ap.add_argument("--out", default="outputs/bench_sweep_cost")
    ap.add_argument("sweep_flags", nargs="*", help="sweep flags after --, instead of the toy sweep (no --out)")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    flags = args.sweep_flags or TOY_SWEEP + ["--eval-root", str(toy_eval_root(out, args.questions))]
    rows = []
    for r in range(args.rounds):
        plain = sweep(flags, out / "uncached", 0)
        cached = sweep(flags, out / "cached", args.cache_gb)
        same = answers(out / "uncached") == answers(out / "cached")
        rows.append((plain, cached, same))
        print(f"round {r + 1}: uncached {plain['wall']:.1f} s (vision tower {plain['tower']:.1f} s = "
              f"{100 * plain['tower'] / plain['wall']:.1f} % of the sweep), cached {cached['wall']:.1f} s "
              f"(tower {cached['tower']:.1f} s, {cached['hits']} hits / {cached['misses']} misses): "
              f"cached/uncached = {cached['wall'] / plain['wall']:.3f}, saved "
              f"{100 * (1 - cached['wall'] / plain['wall']):.1f} %; answers identical: {same}")  # fmt: skip
    if not all(same for _, _, same in rows):
        sys.exit("error: the cached sweep answered differently from the uncached one")


if __name__ == "__main__":
    main()

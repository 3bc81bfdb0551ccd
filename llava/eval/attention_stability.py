"""Does layer k's text->vision attention stay predictive after stage 1? (issue 21, the reviewers' question 1)

    python -m llava.eval.attention_stability --model-path checkpoints/toy-llava \
        --question-file Q.jsonl --image-folder DIR --budget 16 --layers 2,3,4 --stage1 lpm,cls,random,none \
        [--num-questions 200] [--batch-size 20] [--out DIR]

For every stage 1 (LearnPruner's ``stage1`` option; ``lpm`` reads the checkpoint's LPM or ``--lpm-path``) and
every layer k, the mean over prompts of Spearman's rho, Kendall's tau-b and the top-R2 overlap between layer k's
exact scores on the pruned and on the full sequence (``learnpruner_ext.analysis.attention_stability``). Prints a
Markdown table; with ``--out`` also writes ``stability.json`` (every prompt) and ``stability.png`` (rho vs k).
The question file is the eval generators' jsonl (``image``, ``text``). The module lives in ``llava.eval`` rather
than ``learnpruner_ext.analysis`` (the issue's name) because it loads checkpoints and data, which the core does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, replace

from tqdm import tqdm

from learnpruner_ext.analysis.attention_stability import STAGE1_CHOICES, prompt_stability
from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args, run_main
from learnpruner_ext.config import default_stage2_layer
from learnpruner_ext.lpm import shipped_lpm_path

from ..inference import build_prompt, prepare_batch
from ..mm_utils import load_image
from ..model.builder import load_pretrained_model

METRICS = ("spearman", "kendall", "overlap")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="checkpoint folder (default: the built-in toy model)")
    p.add_argument("--question-file", required=True, help="jsonl with 'image' and 'text' per line")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--budget", type=int, required=True, help="T of the pruned runs (LearnPruner's R1/R2 mapping)")
    p.add_argument("--layers", default=None, help="comma-separated k (default: LearnPruner's k)")
    p.add_argument("--stage1", default=",".join(STAGE1_CHOICES), help=f"comma-separated, of {', '.join(STAGE1_CHOICES)}")
    p.add_argument("--num-questions", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="folder for stability.json and stability.png")
    p.add_argument("--no-progress", action="store_true")
    add_pruning_args(p, exclude=("method", "budget", "layer", "options"))
    return p


def _questions(path: str, limit: int | None) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"question file not found: {path}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    missing = [i for i, r in enumerate(rows) if "image" not in r or "text" not in r]
    if missing:
        raise ValueError(f"{path}: lines {missing[:5]} lack 'image' or 'text' (this analysis needs image questions)")
    return rows[:limit] if limit else rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of each metric per (stage1, layer), NaNs (constant scores) left out and counted."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["stage1"], row["layer"]), []).append(row)
    out = []
    for (stage1, layer), items in sorted(groups.items(), key=lambda kv: (STAGE1_CHOICES.index(kv[0][0]), kv[0][1])):
        summary = {"stage1": stage1, "layer": layer, "r1": items[0]["r1"], "r2": items[0]["r2"], "prompts": len(items)}
        for m in METRICS:
            values = [r[m] for r in items if not math.isnan(r[m])]
            summary[m] = sum(values) / len(values) if values else float("nan")
        out.append(summary)
    return out


def markdown(summary: list[dict], budget: int) -> str:
    lines = [f"Layer-k text->vision scores, pruned vs full sequence (T = {budget}; means over prompts)", "",
             "| stage 1 | k | R1 | R2 | prompts | Spearman | Kendall tau-b | top-R2 overlap |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        lines.append(f"| {s['stage1']} | {s['layer']} | {s['r1']} | {s['r2']} | {s['prompts']} | {s['spearman']:.3f} | "
                     f"{s['kendall']:.3f} | {s['overlap']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for stage1 in dict.fromkeys(s["stage1"] for s in summary):
        points = [(s["layer"], s["spearman"]) for s in summary if s["stage1"] == stage1]
        ax.plot(*zip(*points), marker="o", label=f"stage 1 = {stage1}")
    ax.set_xticks(sorted({s["layer"] for s in summary}))
    ax.set_xlabel("layer k")
    ax.set_ylabel("Spearman rho, pruned vs full")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    stages = [s.strip() for s in args.stage1.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE1_CHOICES]
    if unknown:
        raise ValueError(f"--stage1 {unknown} unknown; choose from {', '.join(STAGE1_CHOICES)}")
    base = pruning_config_from_args(args, method="learnpruner", budget=args.budget)
    questions = _questions(args.question_file, args.num_questions)
    tokenizer, model, processor, _ = load_pretrained_model(args.model_path, device=args.device, dtype=args.dtype)
    if base.lpm_path is None and "lpm" in stages:  # resolve the checkpoint's LPM once (apply_pruning would say so per run)
        shipped = shipped_lpm_path(getattr(model.config, "_name_or_path", None))
        base = replace(base, lpm_path=shipped) if shipped else base
        print(f"note: stage 1 'lpm' reads {shipped or 'an UNTRAINED LPM (pass --lpm-path)'}", file=sys.stderr)

    layers = [int(k) for k in args.layers.split(",")] if args.layers else [default_stage2_layer(model.config.text_config.num_hidden_layers)]
    rows = []
    batches = [questions[i : i + args.batch_size] for i in range(0, len(questions), args.batch_size)]
    for chunk in tqdm(batches, desc="attention stability", disable=args.no_progress):
        images = [load_image(os.path.join(args.image_folder, q["image"])) for q in chunk]
        batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q["text"], args.conv_mode) for q in chunk])
        for stage1 in stages:
            for layer in layers:
                for q, r in zip(chunk, prompt_stability(model, batch, stage1, args.budget, layer, base)):
                    rows.append({"question_id": q.get("question_id"), **asdict(r)})
    summary = summarise(rows)
    print(markdown(summary, args.budget))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "stability.json"), "w") as f:
            json.dump({"summary": summary, "prompts": rows}, f, indent=1)
        plot(summary, os.path.join(args.out, "stability.png"))
    return summary


if __name__ == "__main__":
    run_main(main)

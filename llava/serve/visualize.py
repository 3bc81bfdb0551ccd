"""Command line for the kept-patch figure: load a model, answer with several methods, draw them side by side.

    python -m llava.serve.visualize --model-path P --image-file F --query Q \
        --methods learnpruner,vispruner,fastv --budget T --out fig.png [--lpm-path L] [--layer K] [--crop]

One panel per method (title: method, budget, the real R1/R2 of its trace; the answer below). The drawing
itself (overlay looks, padding geometry, panel layout) is :mod:`learnpruner_ext.visualize`, which needs no
model; this module adds what needs ``llava``: loading the checkpoint and generating the answers.
Prints a JSON summary (per panel: method, answer, marked counts, layer, vision tokens per layer).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from learnpruner_ext.config import BudgetError, PruningConfig
from learnpruner_ext.methods import available_methods, get_method_class
from learnpruner_ext.modeling import apply_pruning
from learnpruner_ext.visualize import PatchMarks, check_single_grid, compose_panels, draw_overlay, model_grid, processor_background

from ..inference import GenerationSettings, generate_answers
from ..mm_utils import load_image
from ..model.builder import load_pretrained_model


def check_methods(methods: list[str]) -> None:
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise SystemExit(
            f"error: pruning method(s) {', '.join(unknown)} are not registered; available: {', '.join(available_methods())}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Render kept-patch overlays of several pruning methods side by side.")
    parser.add_argument("--model-path", default=None, help="checkpoint (default: the built-in toy checkpoint)")
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--methods", default="learnpruner", help="comma-separated registered methods")
    parser.add_argument("--budget", type=int, required=True, help="average vision tokens per LLM layer")
    parser.add_argument("--layer", type=int, default=None, help="stage-2 layer k (default: each method's own)")
    parser.add_argument("--lpm-path", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--crop", action="store_true", help="cut the square padding off the overlays")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        parser.error("--methods is empty")
    check_methods(methods)

    try:
        image = load_image(args.image_file)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    tokenizer, model, processor, _ = load_pretrained_model(args.model_path, device=args.device)
    try:
        check_single_grid(model)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    grid, background = model_grid(model), processor_background(processor)
    panels, summary = [], {"panels": []}
    for name in methods:
        layer = args.layer if args.layer is not None and "decoder" in get_method_class(name).acts_at else None
        budget = None if name == "none" else args.budget  # the unpruned panel keeps every token
        config = PruningConfig(method=name, budget=budget, layer=layer, lpm_path=args.lpm_path if get_method_class(name).uses_lpm else None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply_pruning(model, config)
        except (BudgetError, ValueError) as err:
            raise SystemExit(f"error: {name} at budget {args.budget}: {err}") from err
        answer = generate_answers(model, tokenizer, processor, [image], [args.query],
                                  settings=GenerationSettings(max_new_tokens=args.max_new_tokens))[0]  # fmt: skip
        trace = model.last_pruning_trace()
        marks = PatchMarks.from_trace(trace, grid)
        overlay = draw_overlay(image, marks, background, crop=args.crop)
        counts = marks.counts()
        title = f"{name}  T={args.budget}  R1={trace.r1}" + (f"  R2={trace.r2} (k={trace.layer})" if trace.r2 is not None else "")
        if counts["r1"] != trace.r1:  # tokens without a patch of their own ([CLS], merged tokens) share a cell
            title += f"  ({counts['r1']} patches marked)"
        panels.append((overlay, title, answer))
        summary["panels"].append({"method": name, "answer": answer, **counts, "layer": trace.layer,
                                  "vision_tokens_per_layer": list(trace.vision_tokens_per_layer)})  # fmt: skip
    figure = compose_panels(panels)
    figure.save(args.out)
    summary["out"] = args.out
    summary["panel_width"] = figure.width // len(panels)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)

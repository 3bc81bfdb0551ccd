"""Command-line flags shared by every entry point that runs a pruned model."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from .config import POSITION_MODES, PruningConfig
from .methods import available_methods


def add_pruning_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("visual-token pruning")
    group.add_argument("--pruning-method", default="none", help=f"one of: {', '.join(available_methods())}")
    group.add_argument("--visual-token-budget", type=int, default=None,
                       help="T, average vision tokens per LLM layer (default: all tokens)")  # fmt: skip
    group.add_argument("--pruning-layer", type=int, default=None, help="decoder layer k of the in-LLM stage")
    group.add_argument("--pruning-ratio", type=float, default=3.0, help="R1/R2 for two-stage methods")
    group.add_argument("--diversity-ratio", type=float, default=0.1, help="LearnPruner's lambda")
    group.add_argument("--position-mode", choices=POSITION_MODES, default="contiguous")
    group.add_argument("--lpm-path", default=None, help="trained LPM folder (LearnPruner)")
    group.add_argument("--pruning-seed", type=int, default=0)
    group.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="method hyper-parameter, e.g. important_ratio=0.5 (repeatable; VALUE parsed as JSON)")  # fmt: skip


def pruning_config_from_args(args: argparse.Namespace) -> PruningConfig:
    if args.pruning_method not in available_methods():
        raise ValueError(f"unknown --pruning-method {args.pruning_method!r}; valid methods: {', '.join(available_methods())}")
    options = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return PruningConfig(
        method=args.pruning_method,
        budget=args.visual_token_budget,
        layer=args.pruning_layer,
        ratio=args.pruning_ratio,
        diversity=args.diversity_ratio,
        position_mode=args.position_mode,
        lpm_path=args.lpm_path,
        seed=args.pruning_seed,
        options=options,
    )


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run an entry point's ``main``; bad input (``ValueError``, ``FileNotFoundError``, incl. ``BudgetError``)
    ends the process with one ``error: ...`` line and exit code 1 instead of a traceback."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")

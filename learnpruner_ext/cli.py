"""Command-line flags shared by every entry point that runs a pruned model.

The flags are generated from the fields of :class:`~learnpruner_ext.config.PruningConfig`: each field's
``metadata`` names its flag (``--pruning-method --visual-token-budget --pruning-layer --pruning-ratio
--diversity-ratio --position-mode --lpm-path --atp-path --pruning-seed --method-option``) and help; the type and
default come from the field itself. A new field therefore gets its flag, its parsing and its place in the
run identity (``dataclasses.asdict``) with no list to update.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import Field, fields
from typing import Any, Callable

from .config import PruningConfig
from .methods import available_methods


def _dest(f: Field) -> str:
    """The argparse attribute of a field's flag (``--pruning-layer`` -> ``pruning_layer``)."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def _value_type(f: Field) -> type:
    """The type a flag value is parsed to: ``int | None`` -> int, ``dict[str, Any]`` -> dict."""
    hint = typing.get_type_hints(PruningConfig)[f.name]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_origin(hint) or hint


def add_pruning_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (),
                     help_notes: dict[str, str] | None = None) -> None:  # fmt: skip
    """One flag per ``PruningConfig`` field, except the fields named in ``exclude`` (the sweep and the efficiency
    tool take lists of methods and budgets instead of ``--pruning-method`` / ``--visual-token-budget``);
    ``help_notes`` {field: text} appends a tool's own note to a flag's help."""
    group = parser.add_argument_group("visual-token pruning")
    for f in fields(PruningConfig):
        if f.name in exclude:
            continue
        kind, help_text = _value_type(f), f.metadata["help"]
        if help_notes and f.name in help_notes:
            help_text += f"; {help_notes[f.name]}"
        if f.name == "method":
            help_text += f"; one of: {', '.join(available_methods())}"
        if kind is dict:  # KEY=VALUE, repeatable
            group.add_argument(f.metadata["flag"], dest=_dest(f), action="append", default=None,
                               metavar=f.metadata["metavar"], help=help_text)  # fmt: skip
        else:
            help_text += "" if f.default is None else " (default: %(default)s)"
            group.add_argument(f.metadata["flag"], dest=_dest(f), type=kind, default=f.default,
                               choices=f.metadata.get("choices"), help=help_text)  # fmt: skip


def parse_method_options(items: list[str] | None) -> dict[str, Any]:
    """``["important_ratio=0.5", "name=x"]`` -> ``{"important_ratio": 0.5, "name": "x"}`` (VALUE as JSON, else text)."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def pruning_config_from_args(args: argparse.Namespace, **given: Any) -> PruningConfig:
    """The ``PruningConfig`` of the flags :func:`add_pruning_args` added; ``given`` sets fields directly (the
    excluded ones, e.g. ``method=`` and ``budget=`` in the sweep). A field with neither keeps its default."""
    values = dict(given)
    for f in fields(PruningConfig):
        if f.name in given or not hasattr(args, _dest(f)):
            continue
        raw = getattr(args, _dest(f))
        values[f.name] = parse_method_options(raw) if _value_type(f) is dict else raw
    method = values.get("method", PruningConfig.method)
    if method not in available_methods():
        raise ValueError(f"unknown --pruning-method {method!r}; valid methods: {', '.join(available_methods())}")
    return PruningConfig(**values)


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Run an entry point's ``main``; bad input (``ValueError``, ``FileNotFoundError``, incl. ``BudgetError``)
    ends the process with one ``error: ...`` line and exit code 1 instead of a traceback."""
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")

"""Small helpers shared by the method modules (option checks, plans)."""

from __future__ import annotations

from ..config import TokenPlan, check_layer, in_llm_plan, single_stage_plan

BUDGET_MODES = ("average", "after_layer")
REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder layers: the depth the multi-stage methods' layer schedules are given for


def check_choice(method: str, key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{method}: option {key} must be one of {list(choices)}, got {value!r}")


def check_int(method: str, key: str, value, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{method}: option {key} must be an integer >= {minimum}, got {value!r}")


def check_unit_interval(method: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{method}: option {key} must be a number in [0, 1], got {value!r}")


def vision_only_plan(method, num_vision_tokens: int, num_layers: int) -> TokenPlan:
    """Plan of a method that prunes before the LLM: ``T`` tokens in every layer."""
    if method.config.layer is not None:
        raise ValueError(
            f"method {method.name!r} prunes before the LLM and has no decoder layer; drop --pruning-layer "
            f"(got {method.config.layer})"
        )
    return single_stage_plan(method.config.budget, num_vision_tokens, num_layers)


def decoder_plan(method, num_vision_tokens: int, num_layers: int, default_layer: int) -> TokenPlan:
    """Plan of a method that sees all N tokens up to layer K and keeps R2 from there (FastV, DART)."""
    layer = method.config.layer if method.config.layer is not None else default_layer
    return in_llm_plan(method.config.budget, num_vision_tokens, num_layers, layer, method.options["budget_mode"])


def scaled_layers(reference: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Decoder layers given for :data:`REFERENCE_DEPTH` at the same relative depth of an LLM of ``num_layers``
    (rounded; layers that fall on 0 or L are dropped, duplicates merged)."""
    scaled = sorted({round(num_layers * k / REFERENCE_DEPTH) for k in reference})
    return tuple(k for k in scaled if 0 < k < num_layers)


def resolve_layers(method: str, what: str, layers: tuple[int, ...], num_layers: int, first: int | None,
                   explicit: bool) -> tuple[int, ...]:  # fmt: skip
    """A multi-stage method's decoder layers: ``layers`` with ``--pruning-layer`` ``first`` replacing the first one
    (the later ones above it stay), every layer in ``(0, L)``. ``explicit``: ``layers`` was given as an option, so a
    different ``first`` contradicts it. ``what`` names a layer in the errors, e.g. "stage boundary"."""
    if first is not None and explicit and first != layers[0]:
        raise ValueError(f"{method}: --pruning-layer {first} contradicts layers={list(layers)} (its first boundary); "
                         "give one of them")  # fmt: skip
    if first is not None:
        layers = (check_layer(first, num_layers, f"{method} {what}"),) + tuple(k for k in layers[1:] if k > first)
    if not layers:
        raise ValueError(f"{method} needs at least 2 LLM layers to place a {what}, the LLM has {num_layers}")
    for k in layers:
        check_layer(k, num_layers, f"{method} {what}")
    return layers

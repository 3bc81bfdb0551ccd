"""Small helpers shared by the method modules (option checks, plans)."""

from __future__ import annotations

from ..config import TokenPlan, in_llm_plan, single_stage_plan

BUDGET_MODES = ("average", "after_layer")


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

"""Pruning configuration and the token-budget convention shared by every method.

A budget ``T`` is always the *average number of vision tokens per LLM layer*.  A method that
prunes before the LLM keeps ``T`` tokens in every layer; a method that prunes inside the LLM at
layer ``k`` keeps ``R1`` tokens in layers ``[0, k)`` and ``R2`` in ``[k, L)`` with
``(k * R1 + (L - k) * R2) / L ~= T``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

POSITION_MODES = ("contiguous", "original")
# How a budget T applies to an image whose N_i differs from the model's reference N (LLaVA-NeXT tiles):
# "absolute" keeps T per image (the default: what LearnPruner's Table 5 NeXT rows imply, docs/efficiency.md);
# "scaled" keeps the same share, T * N_i / N (the tables' nominal "reduction ratio" 1 - T/N read per image).
BUDGET_SCOPES = ("absolute", "scaled")
# the vision stage on a video: rank all frames' candidates together, or each frame as an image with its own plan
VIDEO_STAGE1_MODES = ("joint", "per_frame")


class BudgetError(ValueError):
    """A budget that cannot be met (too small, too large, or infeasible for the method)."""


class UnsupportedMethodError(ValueError):
    """A method (or option) with no meaning on a model family, e.g. a fixed-grid method on Qwen2.5-VL images."""


@dataclass
class PruningConfig:
    """Everything that defines a pruning run; explicit, serialisable, no environment variables.

    Attributes:
        method: registered method name (``learnpruner_ext.available_methods()``).
        budget: ``T``, the average number of vision tokens per LLM layer. ``None`` = no pruning.
        layer: decoder layer ``k`` of the in-LLM stage. ``None`` = the method's default
            (LearnPruner: the layer at relative depth 12/32, FastV/DART: 2).
        ratio: ``rho = R1 / R2`` for two-stage methods (LearnPruner: 3).
        diversity: ``lambda``, share of ``R1`` filled by max-min diversity tokens (LearnPruner: 0.1).
        budget_scope: ``"absolute"`` (default; ``min(T, N_i)`` per image) or ``"scaled"`` (image ``i`` with ``N_i``
            tokens gets ``T * N_i / N``, ``N`` the model's reference count, e.g. 2880 for LLaVA-NeXT). Equal for
            models whose images all have ``N`` tokens (LLaVA-1.5).
        position_mode: ``"contiguous"`` (kept tokens get consecutive positions, as upstream LLaVA builds
            sequences) or ``"original"`` (every token keeps its unpruned position).
        video_stage1: the vision stage on videos (Video-LLaVA): ``"joint"`` (default; top-R1 over all frames'
            candidates) or ``"per_frame"`` (each frame an image with R1/F of the plan). Images ignore it.
        lpm_path: trained LPM (folder with ``lpm.safetensors`` + ``lpm_config.json``), LearnPruner only.
        atp_path: trained ATP modules (folder with ``atp.safetensors`` + ``atp_config.json``), ``atp`` only.
        seed: seed for stochastic methods (``random``).
        options: method hyper-parameters, e.g. ``{"important_ratio": 0.5}`` for VisPruner.
    """

    # ``metadata``: the CLI flag and its help; learnpruner_ext.cli builds the argparse group from these fields.
    method: str = field(default="none", metadata={"flag": "--pruning-method", "help": "pruning method"})
    budget: int | None = field(default=None, metadata={
        "flag": "--visual-token-budget", "help": "T, average vision tokens per LLM layer (default: all tokens)"})
    budget_scope: str = field(default="absolute", metadata={
        "flag": "--budget-scope", "choices": BUDGET_SCOPES,
        "help": "per-image budget when N_i differs from the model's N: T (absolute) or T*N_i/N (scaled)"})
    layer: int | None = field(default=None, metadata={
        "flag": "--pruning-layer", "help": "decoder layer k of the in-LLM stage (default: the method's)"})
    ratio: float = field(default=3.0, metadata={"flag": "--pruning-ratio", "help": "R1/R2 for two-stage methods"})
    diversity: float = field(default=0.1, metadata={"flag": "--diversity-ratio", "help": "LearnPruner's lambda"})
    position_mode: str = field(default="contiguous", metadata={
        "flag": "--position-mode", "choices": POSITION_MODES, "help": "positions of the kept vision tokens"})
    video_stage1: str = field(default="joint", metadata={
        "flag": "--video-stage1", "choices": VIDEO_STAGE1_MODES, "help": "vision stage on videos: all frames together or per frame"})
    lpm_path: str | None = field(default=None, metadata={"flag": "--lpm-path", "help": "trained LPM folder (LearnPruner)"})
    atp_path: str | None = field(default=None, metadata={
        "flag": "--atp-path", "help": "trained ATP modules folder (ATP-LLaVA; default: the checkpoint's atp/)"})
    seed: int = field(default=0, metadata={"flag": "--pruning-seed", "help": "seed of stochastic methods (random)"})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "flag": "--method-option", "metavar": "KEY=VALUE",
        "help": "method hyper-parameter, e.g. important_ratio=0.5 (repeatable; VALUE parsed as JSON)"})

    def __post_init__(self):
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget <= 0):
            raise BudgetError(
                f"visual token budget must be a positive integer, got {self.budget!r}; "
                "pass e.g. --visual-token-budget 64 (or omit it / use method 'none' for no pruning)"
            )
        if self.budget is not None and self.method == "none":
            raise BudgetError(
                f"a visual token budget ({self.budget}) was given but the pruning method is 'none', which keeps "
                "every vision token; choose a method (e.g. --pruning-method learnpruner) or drop the budget"
            )
        if self.ratio < 1:
            raise ValueError(f"pruning ratio R1/R2 must be >= 1 (LearnPruner uses 3), got {self.ratio}; pass e.g. --pruning-ratio 3")
        if not 0.0 <= self.diversity <= 1.0:
            raise ValueError(f"diversity share lambda must be in [0, 1] (LearnPruner uses 0.1), got {self.diversity}; "
                             "pass e.g. --diversity-ratio 0.1")
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        if self.video_stage1 not in VIDEO_STAGE1_MODES:
            raise ValueError(f"video_stage1 must be one of {VIDEO_STAGE1_MODES}, got {self.video_stage1!r}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")


@dataclass(frozen=True)
class TokenPlan:
    """How many vision tokens each LLM layer processes, per image.

    ``r1`` tokens enter the LLM; if ``layer`` is set, layers ``[layer, num_layers)`` keep ``r2``. A method that
    cuts several times (PyramidDrop) lists every cut in ``stages``: ``((k_1, c_1), (k_2, c_2), ...)``, ascending,
    layers ``[k_j, k_{j+1})`` keep ``c_j``; then ``layer = k_1`` and ``r2`` is the count after the last cut.
    """

    num_vision_tokens: int  # N, tokens the vision encoder produces per image
    num_layers: int  # L, LLM decoder layers
    r1: int
    r2: int | None = None
    layer: int | None = None
    # how the budget was mapped; recorded in every answers line. "adaptive" (ATP): the counts are decided per sample
    # at run time, ``stages`` list the cut layers with the upper bound N, and only the trace's counts are measured
    convention: str = "average"
    scope: str = "absolute"  # PruningConfig.budget_scope: how T became this image's budget
    stages: tuple[tuple[int, int], ...] = ()  # (layer, count) of every in-LLM cut; empty: the one cut (layer, r2)

    @property
    def tokens_per_layer(self) -> list[int]:
        if self.stages:
            bounds = [k for k, _ in self.stages] + [self.num_layers]
            counts = [self.r1] * bounds[0]
            for (k, count), end in zip(self.stages, bounds[1:]):
                counts += [count] * (end - k)
            return counts
        if self.layer is None:
            return [self.r1] * self.num_layers
        return [self.r1] * self.layer + [self.r2] * (self.num_layers - self.layer)

    @property
    def average(self) -> float:
        return sum(self.tokens_per_layer) / self.num_layers


def budget_notice(plan: TokenPlan, budget: int | None, method: str) -> str | None:
    """One line for the user when the plan's achieved average differs from the requested ``T``, else None.

    Token counts are whole numbers, so e.g. LearnPruner's ``R2 = ceil(...)``, ``R1 = rho * R2`` can give a
    little more than ``T`` (a budget of 1 keeps R1 = 3, R2 = 1).
    """
    if plan.convention == "adaptive":  # nothing to compare: the thresholds decide each sample's count
        target = "no target budget given" if budget is None else f"the budget {budget} is the target average"
        return (f"{method}: adaptive pruning, the learned thresholds decide each sample's vision tokens per layer "
                f"({target}); the achieved average is measured and reported per answer")
    if budget is None or math.isclose(plan.average, budget):
        return None
    stage2 = f", R2={plan.r2} from layer {plan.layer}" if plan.layer is not None else ""
    if plan.stages:
        stage2 = "".join(f", {count} from layer {k}" for k, count in plan.stages)
    return (f"{method}: requested an average of {budget} vision tokens per layer; the plan achieves "
            f"{plan.average:.2f} (R1={plan.r1}{stage2}, token counts are whole numbers)")


def candidate_plan(plan: TokenPlan, candidates: int) -> TokenPlan:
    """The plan of an image of ``N_i`` vision tokens of which only ``candidates`` (M) can be chosen at the vision
    stage (LLaVA-NeXT: the ``image_newline`` tokens are vision tokens but never candidates). A plan that prunes
    there (``R1 < N_i``) keeps at most the M candidates, so ``R1`` (and ``R2``) are capped at M; a plan that keeps
    all N_i at the vision stage is unchanged (the newlines stay, and in-LLM stages may prune them)."""
    if plan.r1 >= plan.num_vision_tokens or candidates >= plan.r1:
        return plan
    stages = tuple((k, min(count, candidates)) for k, count in plan.stages)
    return replace(plan, r1=candidates, r2=None if plan.r2 is None else min(plan.r2, candidates), stages=stages)


def image_budget(budget: int | None, num_tokens: int, reference_tokens: int, scope: str) -> int | None:
    """The budget of one image with ``num_tokens`` vision tokens, for a model whose budgets refer to
    ``reference_tokens`` (its nominal N): ``scaled`` -> ``round(T * N_i / N)`` (at least 1), ``absolute`` ->
    ``min(T, N_i)``. ``None`` (no pruning) stays ``None``; ``N_i == N`` gives ``T`` in both scopes."""
    if budget is None or num_tokens == reference_tokens:
        return budget
    check_budget(budget, reference_tokens)
    if scope == "scaled":
        return max(1, min(num_tokens, round(budget * num_tokens / reference_tokens)))
    if scope == "absolute":
        return min(budget, num_tokens)
    raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {scope!r}")


def check_budget(budget: int | None, num_vision_tokens: int) -> int:
    """Resolve ``None`` to "all tokens" and reject budgets outside ``(0, N]``."""
    if budget is None:
        return num_vision_tokens
    if budget <= 0:
        raise BudgetError(f"visual token budget must be > 0, got {budget}")
    if budget > num_vision_tokens:
        raise BudgetError(
            f"visual token budget {budget} exceeds the {num_vision_tokens} vision tokens this model produces "
            f"per image; use a budget <= {num_vision_tokens} (a budget of {num_vision_tokens} means no pruning)"
        )
    return budget


def check_layer(layer: int, num_layers: int, what: str = "pruning layer k") -> int:
    if not 0 < layer < num_layers:
        raise ValueError(f"{what} must satisfy 0 < k < {num_layers} (the LLM has {num_layers} layers), got {layer}")
    return layer


def default_stage2_layer(num_layers: int) -> int:
    """LearnPruner's k=12 of 32 layers, at the same relative depth for other depths."""
    return max(1, min(num_layers - 1, round(num_layers * 12 / 32)))


def two_stage_plan(budget: int | None, num_vision_tokens: int, num_layers: int, layer: int, ratio: float) -> TokenPlan:
    """LearnPruner's budget mapping (SPEC §1, reproduces Table 7a).

    ``R2 = ceil(T*L / (k*rho + L - k))`` and ``R1 = rho*R2``; when ``R1`` would exceed the ``N``
    available tokens, ``R1 = N`` and ``R2 = ceil((T*L - k*N) / (L - k))``, so ``T = N`` is no pruning.
    """
    n, big_l = num_vision_tokens, num_layers
    t = check_budget(budget, n)
    k = check_layer(layer, big_l)
    r2 = math.ceil(t * big_l / (k * ratio + big_l - k))
    r1 = round(ratio * r2)
    if r1 > n:
        r1 = n
        r2 = math.ceil((t * big_l - k * n) / (big_l - k))
    return TokenPlan(n, big_l, r1=r1, r2=r2, layer=k)


def in_llm_plan(
    budget: int | None, num_vision_tokens: int, num_layers: int, layer: int, mode: str = "average"
) -> TokenPlan:
    """Budget mapping for methods that see all ``N`` tokens up to layer ``K`` and prune there (FastV, DART).

    ``mode="average"``: ``R2 = ceil((T*L - K*N) / (L - K))`` so the per-layer average meets ``T``;
    infeasible when ``R2`` would be < 1 (FastV at K=2 on LLaVA-1.5 needs T >= 37).
    ``mode="after_layer"``: ``R2 = T``, i.e. only the tokens kept after layer K are counted, as some
    papers report FastV; the measured average is then larger than ``T`` and the row says so.
    """
    n, big_l = num_vision_tokens, num_layers
    t = check_budget(budget, n)
    k = check_layer(layer, big_l, "pruning layer K")
    if mode == "after_layer":
        return TokenPlan(n, big_l, r1=n, r2=t, layer=k, convention="after_layer")
    if mode != "average":
        raise ValueError(f"budget mode must be 'average' or 'after_layer', got {mode!r}")
    r2 = math.ceil((t * big_l - k * n) / (big_l - k))
    if r2 < 1:
        need = math.ceil((k * n + (big_l - k)) / big_l)
        raise BudgetError(
            f"an average of {t} vision tokens per layer is infeasible when pruning at layer K={k}: layers [0, {k}) "
            f"already process all {n} tokens, so the average is at least {need}. Use a budget >= {need}, a smaller K, "
            "or the explicit option budget_mode='after_layer' (counts only tokens kept after layer K)"
        )
    return TokenPlan(n, big_l, r1=n, r2=r2, layer=k)


def single_stage_plan(budget: int | None, num_vision_tokens: int, num_layers: int) -> TokenPlan:
    """Methods that prune before the LLM keep ``T`` tokens in every layer."""
    return TokenPlan(num_vision_tokens, num_layers, r1=check_budget(budget, num_vision_tokens))

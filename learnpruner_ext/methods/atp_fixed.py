"""ATP-LLaVA's fixed-ratio baseline (Ye et al., CVPR 2025; paper: atp-llava.txt, Sec. 4.3 "Pruning Strategy" and
Table 2): "the same modules with a pre-defined fixed ratio per layer".

The same module layers as ``atp`` (LLaVA-1.5-7B: 4, 14, 24 of 32; other depths: the same relative depth) and the
same redundant score ``S_redundant = (S_self + S_cross) / 2`` (Eqs. 3-4, from layer ``k - 1``'s q/k:
:meth:`learnpruner_ext.methods.atp.ATP.scores`), but instead of learned thresholds each module keeps a **fixed
count** ``c_k`` of the vision tokens still present: the top ``c_k`` by ``S_redundant`` (equal scores: the lower
index wins), in their original order. The spatial score (Eq. 5) is not used, so no raster grid is needed and the
method runs on every family (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Video-LLaVA). There are no trained parameters: no
ATP module is built or loaded, and nothing is warned about. (The paper fine-tunes the LLM with these fixed ratios;
here the LLM stays frozen, so this is the training-free version of its baseline.)

**Counts.** Option ``rate`` (default 2/3, in ``[0, 1)``) is the share of the present tokens pruned at every module
after the first: ``c_{j+1} = max(1, round_half_up(c_j * (1 - rate)))``, computed exactly on the rate as written
(its decimal ``repr``, so ``rate=0.9`` keeps ``round(15 * 0.1) = 2`` of 15, not the float's 1). ``c_1`` is solved
from the budget ``T`` (the average vision tokens per LLM layer, layers ``[0, k_1)`` holding all ``N``): the
**smallest** ``c_1`` whose plan averages at least ``T``. The average grows with ``c_1`` by at most
``(L - k_1) / L < 1`` per step (each count grows by 0 or 1), so it lands in ``[T, T + 1)``, as pyramiddrop's and
sparsevlm's solved plans do. LLaVA-1.5-7B, ``T = 144``: rate 2/3 gives the paper's ``[162, 54, 18]`` (average 144
exactly), rate 1/2 its ``[136, 68, 34]`` (144.25). A budget below the floor (``c_1 = 1``: ``k_1 N / L`` plus one
token per later layer) or above the ceiling (``c_1 = N``: what the rate still prunes after ``k_1``) raises a
:class:`BudgetError` naming the feasible budgets (and an earlier first layer, or a smaller rate, that meets it).
``T = N`` (or no budget) keeps every token (no cut). Option ``keep`` gives the counts instead, one per module
layer, non-increasing; their average must be in ``[T, T + 1)`` or the error names the budget to pass.

**Layers.** Option ``layers``, else the layers recorded in ``--atp-path``'s ``atp_config.json`` (only read, the
weights are not; the option wins over the folder), else ``atp``'s defaults; ``--pruning-layer k`` replaces the
first one (as for ``atp``). ``self_score``: ``"logits"`` (Eq. 3 as written, default) or ``"attention"``, as ``atp``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import torch

from ..atp import SELF_SCORES, ATPModules, redundant_scores
from ..config import BudgetError, TokenPlan, check_budget
from ._common import check_choice, resolve_layers
from .atp import ATP, default_layers
from .base import DecoderContext, PruningMethod, register_method

NAME = "atp_fixed"
DEFAULT_RATE = 2 / 3  # the paper's middle setting (Table 2: [162, 54, 18] at 4/14/24 for an average of 144)


def module_layers(spec, num_layers: int) -> tuple[int, ...]:
    """The layers ``atp`` would use (:func:`learnpruner_ext.methods.atp.module_layers`), named ``atp_fixed`` in the
    errors: option ``layers``, else ``--atp-path``'s recorded layers, else :func:`default_layers`; ``--pruning-layer``
    replaces the first one."""
    layers = spec.options["layers"]
    if layers is None and spec.config.atp_path:
        layers = ATPModules.read_config(spec.config.atp_path).get("layers")
    layers = tuple(layers) if layers is not None else default_layers(num_layers)
    return resolve_layers(NAME, "module layer", layers, num_layers, spec.config.layer, explicit=False)


def stage_counts(first: int, rate: float, stages: int) -> tuple[int, ...]:
    """``(c_1, ..., c_stages)`` from ``c_1 = first``: ``c_{j+1} = max(1, floor(c_j * (1 - rate) + 1/2))``, exact
    on the decimal ``repr`` of ``rate`` (half-way cases round up)."""
    keep = 1 - Fraction(repr(float(rate)))
    counts = [first]
    for _ in range(stages - 1):
        counts.append(max(1, math.floor(counts[-1] * keep + Fraction(1, 2))))
    return tuple(counts)


def fixed_plan(num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], counts: tuple[int, ...]) -> TokenPlan:
    """Cuts at ``layers`` keeping ``counts`` (pyramiddrop's multi-stage plan; convention ``average``)."""
    return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens, r2=counts[-1], layer=layers[0],
                     stages=tuple(zip(layers, counts)))  # fmt: skip


def _total(n: int, big_l: int, layers: tuple[int, ...], counts: tuple[int, ...]) -> int:
    """Vision tokens summed over the layers (the average times ``L``, an integer: compared without rounding)."""
    return sum(fixed_plan(n, big_l, layers, counts).tokens_per_layer)


def solve_first(budget: int, num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], rate: float) -> int:
    """The smallest ``c_1`` in ``[1, N]`` whose plan averages at least ``budget`` (``N`` if none does)."""
    low, high = 1, num_vision_tokens
    while low < high:
        mid = (low + high) // 2
        if _total(num_vision_tokens, num_layers, layers, stage_counts(mid, rate, len(layers))) >= budget * num_layers:
            high = mid
        else:
            low = mid + 1
    return low


def _fmt_rate(rate: float) -> str:
    return str(Fraction(repr(float(rate))).limit_denominator(1000)) if rate else "0"


def resolve_stages(spec, num_vision_tokens: int, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(module layers, counts) of ``spec`` for an image of ``num_vision_tokens``, or None for no pruning (``T = N``
    without ``keep``); raises :class:`BudgetError` for a budget it cannot meet."""
    n, big_l, rate, keep = num_vision_tokens, num_layers, spec.options["rate"], spec.options["keep"]
    layers = module_layers(spec, big_l)
    t = check_budget(spec.config.budget, n)
    if keep is not None:
        if len(keep) != len(layers):
            raise ValueError(f"{NAME}: keep={list(keep)} needs one count per module layer {list(layers)}")
        if keep[0] > n:
            raise ValueError(f"{NAME}: keep={list(keep)} keeps {keep[0]} at layer {layers[0]}, more than the {n} "
                             "vision tokens of this image")  # fmt: skip
        counts = tuple(keep)
    elif t == n:
        return None  # T = N: no pruning
    else:
        counts = stage_counts(solve_first(t, n, big_l, layers, rate), rate, len(layers))
    total = _total(n, big_l, layers, counts)
    if t * big_l <= total < (t + 1) * big_l:
        return layers, counts
    achieved = total / big_l
    if keep is not None:
        raise BudgetError(
            f"{NAME}: keep={list(keep)} at module layers {list(layers)} of {n} vision tokens averages "
            f"{achieved:.2f} per layer, not the budget {t}; pass --visual-token-budget "
            f"{math.floor(achieved)} to run these counts, or drop the keep option to solve them from the budget"
        )
    if total >= (t + 1) * big_l:  # too small: even c_1 = 1 (1 token at every module) averages >= T + 1
        first = layers[0]
        floor_avg = (first * n + big_l - first) / big_l
        earlier = [k for k in range(1, first) if math.floor((k * n + big_l - k) / big_l) <= t]
        hint = ""
        if earlier:
            suggestion = [earlier[-1]] + [k for k in layers[1:] if k > earlier[-1]]
            hint = f", or an earlier first module layer, e.g. --method-option layers=[{','.join(map(str, suggestion))}]"
        raise BudgetError(
            f"{NAME}: an average of {t} vision tokens per layer is infeasible with module layers {list(layers)}: "
            f"layers [0, {first}) process all {n} tokens and every module keeps at least 1, so the average is at "
            f"least {floor_avg:.2f}. Use a budget >= {math.floor(floor_avg)}{hint}"
        )
    # too large: c_1 = N (nothing pruned at the first module) still prunes `rate` at every later one
    ceiling = stage_counts(n, rate, len(layers))
    most = _total(n, big_l, layers, ceiling) / big_l
    fits = next(r / 100 for r in range(99, -1, -1)
                if _total(n, big_l, layers, stage_counts(n, r / 100, len(layers))) >= t * big_l)  # fmt: skip
    raise BudgetError(
        f"{NAME}: an average of {t} vision tokens per layer is infeasible at rate={_fmt_rate(rate)} with module layers "
        f"{list(layers)}: keeping all {n} at the first module still gives {list(ceiling)}, an average of at most "
        f"{most:.2f}. Use a budget <= {math.floor(most)}, a budget of {n} (no pruning), or a smaller rate, e.g. "
        f"--method-option rate={fits}"
    )


def top_redundant(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [B, Nv] -> indices [B, keep] of the ``keep`` highest, ascending; equal scores: the lower index wins
    (a stable descending sort, so the choice is deterministic)."""
    if not 0 <= keep <= scores.shape[-1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[-1]} tokens")
    return scores.argsort(dim=-1, descending=True, stable=True)[:, :keep].sort(dim=-1).values


@register_method
class ATPFixed(PruningMethod):
    name = NAME
    paper = "ATP-LLaVA's fixed-ratio baseline (Ye et al., CVPR 2025, Sec. 4.3, Table 2)"
    acts_at = "decoder"
    signals = ("text_attention",)
    defaults = {"layers": None, "rate": DEFAULT_RATE, "keep": None, "self_score": "logits"}
    # no requires: S_redundant reads only attention rows, defined on any family's vision tokens (no grid)

    @classmethod
    def validate_options(cls, options) -> None:
        layers, rate, keep = options["layers"], options["rate"], options["keep"]
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not layers
            or any(isinstance(k, bool) or not isinstance(k, int) for k in layers)
            or any(a >= b for a, b in zip(layers, layers[1:]))
        ):  # fmt: skip
            raise ValueError(f"{NAME}: option layers must be a strictly ascending list of decoder layers, "
                             f"e.g. layers=[4,14,24], got {layers!r}")  # fmt: skip
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"{NAME}: option rate must be a number in [0, 1) (the share of the present tokens "
                             f"pruned at each module after the first; the paper: 3/4, 2/3, 1/2), got {rate!r}")  # fmt: skip
        if keep is not None and (
            not isinstance(keep, (list, tuple)) or not keep
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in keep)
            or any(a < b for a, b in zip(keep, keep[1:]))
        ):  # fmt: skip
            raise ValueError(f"{NAME}: option keep must be a non-increasing list of positive token counts, one per "
                             f"module layer, e.g. keep=[162,54,18], got {keep!r}")  # fmt: skip
        check_choice(NAME, "self_score", options["self_score"], SELF_SCORES)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        stages = resolve_stages(spec, num_vision_tokens, num_layers)
        if stages is None:
            return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens)  # T = N: no pruning
        return fixed_plan(num_vision_tokens, num_layers, *stages)

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.plan.stages)

    score_layer_for = ATP.score_layer_for  # layer k - 1: "the self-attention map from the previous layer"

    def scores(self, ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_self, S_cross) [B, Nv] fp32 by :meth:`ATP.scores` (Eqs. 3-4). It reads only its modules' S_self kind,
        so it runs on a stand-in carrying this method's ``self_score``: no ATP module is built."""
        return ATP.scores(SimpleNamespace(atp=SimpleNamespace(self_score=self.options["self_score"])), ctx)

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        """The top ``c_k`` vision tokens present by ``S_redundant``, ascending (ties: the lower index)."""
        keep = min(ctx.plan.tokens_per_layer[ctx.stage_layer], ctx.vision_index.shape[1])
        s_redundant = redundant_scores(*self.scores(ctx))
        ctx.extras["scores"] = s_redundant  # the trace's stage2_scores
        return top_redundant(s_redundant, keep)

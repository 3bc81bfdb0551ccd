"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025).

The LLM is split into stages at boundaries ``k_1 < k_2 < ...`` (LLaVA-1.5-7B: 8, 16, 24 of 32, four stages).
Layers ``[0, k_1)`` see all ``N`` vision tokens; at each boundary ``k_s`` the ``int(N * lambda**s)`` vision tokens
that the **last instruction token** (the prompt's last position) attends to most are kept, so stage ``s`` keeps
``N, N*lambda, N*lambda**2, ...`` (the paper's lambda = 0.5: 576, 288, 144, 72).

* **Score.** At boundary ``k`` the reference (``pdrop_rank_drop``) takes the hidden states entering layer ``k``
  (layer ``k-1``'s output), applies layer ``k``'s own ``input_layernorm``, ``q_proj``/``k_proj`` and RoPE, and
  computes the softmax over every key of the last prompt row, head-averaged, read at the image columns. We
  compute exactly that row from layer ``k``'s input (``score_layer_for(k) = k``, ``ctx.text_attention("last")``),
  in fp32; ``torch.topk`` as the reference.
* **Budget.** ``T`` is the average number of vision tokens per layer (the toolkit's one convention). Option
  ``layers`` (default: the reference's 8/16/24 of 32 at the same relative depth, e.g. 2/4/6 of 8) fixes the
  boundaries; ``--pruning-layer k`` replaces the first one (8 -> k, the later ones above ``k`` stay). Option
  ``lambda`` (default: solved) fixes the ratio. Solved: the smallest ``lambda`` whose counts average at least ``T``;
  the average is then in ``[T, T + 1)`` (one count step moves it by at most ``(L - k_1)/L < 1``). Fixed
  ``lambda``: its average must be in ``[T, T + 1)`` or a :class:`BudgetError` names the budget to pass. The first
  stage alone averages ``k_1 * N / L``, so small budgets need an earlier ``k_1`` (the error says which).
* Every stage keeps at least one token (the reference's ``int()`` can reach 0 only at ratios far below its
  settings).

Reference: Cooperx521/PyramidDrop @ 6444f304aee4b7edcb022839fb9e8cd07859704a, ``llava/model/modeling_llama_pdrop.py``
(``pdrop_forward``: rank after layer ``layer_idx`` with ``rank_layer = layer_idx + 1`` in ``layer_list``;
``pdrop_rank_drop``: inference query row ``prompt_len + image_tokens - 1``, ``keep_length = int(N * ratio[s + 1])``)
and ``llava/eval/model_vqa_loader.py`` (``image_token_ratio_list`` with 1.0 prepended). Deviations (docs/methods.md):
lambda solved from ``T``; kept tokens keep their position ids (the reference renumbers them); fp32 scoring from
``q``/``k`` rather than eager attention; per-sample spans and left padding; KV cache supported.
"""

from __future__ import annotations

import math

import torch

from ..config import BudgetError, TokenPlan, check_budget
from ..selection import topk_indices
from ._common import resolve_layers, scaled_layers
from .base import DecoderContext, PruningMethod, register_method

REFERENCE_LAYERS = (8, 16, 24)  # its stage boundaries (the reference scripts' --layer_list)
SOLVE_STEPS = 64  # bisection steps on lambda: below float resolution, so the smallest lambda is found


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The reference boundaries at the same relative depth: 8/16/24 of 32 -> 2/4/6 of 8, 1/2/3 of 4."""
    return scaled_layers(REFERENCE_LAYERS, num_layers)


def stage_counts(num_vision_tokens: int, ratio: float, stages: int) -> tuple[int, ...]:
    """Vision tokens kept after each boundary: ``int(N * ratio**s)`` for s = 1..stages, at least 1."""
    return tuple(max(1, int(num_vision_tokens * ratio**s)) for s in range(1, stages + 1))


def pyramid_plan(num_vision_tokens: int, num_layers: int, layers: tuple[int, ...], counts: tuple[int, ...]) -> TokenPlan:
    return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens, r2=counts[-1], layer=layers[0],
                     stages=tuple(zip(layers, counts)))  # fmt: skip


def solve_ratio(budget: int, num_vision_tokens: int, num_layers: int, layers: tuple[int, ...]) -> float:
    """The smallest lambda in (0, 1] whose plan averages at least ``budget`` (the average grows with lambda)."""
    def average(ratio: float) -> float:
        counts = stage_counts(num_vision_tokens, ratio, len(layers))
        return pyramid_plan(num_vision_tokens, num_layers, layers, counts).average

    low, high = 0.0, 1.0
    for _ in range(SOLVE_STEPS):
        mid = (low + high) / 2
        low, high = (low, mid) if average(mid) >= budget else (mid, high)
    return high


def resolve_stages(spec, num_vision_tokens: int, num_layers: int) -> tuple[tuple[int, ...], float, tuple[int, ...]]:
    """(boundaries, lambda, counts) of ``spec`` for an image of ``num_vision_tokens``; raises for a budget it cannot
    meet. ``lambda`` is the option's value or the one solved from ``spec.config.budget``."""
    n, big_l = num_vision_tokens, num_layers
    layers = resolve_layers("pyramiddrop", "stage boundary", tuple(spec.options["layers"] or default_layers(big_l)),
                            big_l, spec.config.layer, spec.options["layers"] is not None)  # fmt: skip
    t = check_budget(spec.config.budget, n)
    ratio = spec.options["lambda"]
    if ratio is None:
        ratio = solve_ratio(t, n, big_l, layers)
    counts = stage_counts(n, ratio, len(layers))
    achieved = pyramid_plan(n, big_l, layers, counts).average
    if t <= achieved < t + 1:
        return layers, ratio, counts
    if spec.options["lambda"] is not None:
        raise BudgetError(
            f"pyramiddrop: lambda={ratio} at stage boundaries {list(layers)} keeps {list(counts)} of {n} vision tokens, "
            f"an average of {achieved:.2f} per layer, not the budget {t}; pass --visual-token-budget "
            f"{math.floor(achieved)} to run this lambda, or drop the lambda option to solve it from the budget"
        )
    first = layers[0]  # infeasible: even 1 token per later stage averages >= T + 1
    floor_avg = (first * n + big_l - first) / big_l
    need = math.floor(floor_avg)
    earlier = [k for k in range(1, big_l) if math.floor((k * n + big_l - k) / big_l) <= t]
    hint = ""
    if earlier:
        suggestion = [earlier[-1]] + [k for k in layers[1:] if k > earlier[-1]]
        hint = f", or an earlier first boundary, e.g. --method-option layers=[{','.join(map(str, suggestion))}]"
    raise BudgetError(
        f"pyramiddrop: an average of {t} vision tokens per layer is infeasible with stage boundaries {list(layers)}: "
        f"layers [0, {first}) process all {n} tokens, so the average is at least {floor_avg:.2f}. Use a budget >= "
        f"{need}{hint}"
    )


@register_method
class PyramidDrop(PruningMethod):
    name = "pyramiddrop"
    paper = "PyramidDrop (Xing et al., CVPR 2025)"
    acts_at = "decoder"
    signals = ("text_attention",)
    defaults = {"layers": None, "lambda": None}

    @classmethod
    def validate_options(cls, options) -> None:
        layers, ratio = options["layers"], options["lambda"]
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not layers
            or any(isinstance(k, bool) or not isinstance(k, int) for k in layers)
            or any(a >= b for a, b in zip(layers, layers[1:]))
        ):  # fmt: skip
            raise ValueError(f"pyramiddrop: option layers must be a strictly ascending list of layer indices, "
                             f"e.g. layers=[8,16,24], got {layers!r}")  # fmt: skip
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"pyramiddrop: option lambda must be a number in (0, 1] (the paper: 0.5), got {ratio!r}")

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        layers, _, counts = resolve_stages(spec, num_vision_tokens, num_layers)
        return pyramid_plan(num_vision_tokens, num_layers, layers, counts)

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.plan.stages)

    def score_layer_for(self, stage_layer: int) -> int:
        """Layer ``k`` itself: its own q/k on its input (the hidden states before the cut)."""
        return stage_layer

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        keep = min(ctx.plan.tokens_per_layer[ctx.stage_layer], ctx.vision_index.shape[1])
        return topk_indices(ctx.text_attention("last"), keep)

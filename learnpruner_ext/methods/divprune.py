"""DivPrune (Alvar et al., CVPR 2025; SPEC §4): greedy max-min diversity on the projected tokens.

Before the LLM, keep ``T`` tokens chosen by the greedy solution of the Max-Min Diversity Problem with
cosine distance on the projector's output: the first pick is the token whose largest similarity to any
other token is smallest, then repeatedly the token whose largest similarity to the picked set is
smallest (:func:`learnpruner_ext.selection.max_min_diversity` with an empty start). No options.

Reference: vbdi/divprune @ 799e2d950aa01ba7860907f5a6d86061f885dca6, ``LLaVA/llava/model/llava_arch.py``
(``DivPrune``: distance ``1 - cos`` on the projected tokens, first pick by nearest-other-token distance, then
``argmax`` of the min distance to the picked set). Deviations (docs/methods.md): similarities in fp32 and
``argmin`` of the max similarity (first index on ties; the same as ``argmax`` of ``1 - cos`` up to rounding);
picked tokens are excluded explicitly; exactly ``T`` tokens (the reference keeps ``round(ratio * N)``); each
sample's own vision tokens (the reference hard-codes 35 system tokens and batch row 0).
"""

from __future__ import annotations

import torch

from ..config import TokenPlan
from ..selection import max_min_diversity
from ._common import vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


def divprune_select(features: torch.Tensor, keep: int) -> torch.Tensor:
    """features [B, N, D] -> indices [B, keep] ascending."""
    empty = torch.zeros(features.shape[:2], dtype=torch.bool, device=features.device)
    return max_min_diversity(features, empty, keep).sort(dim=1).values


@register_method
class DivPrune(PruningMethod):
    name = "divprune"
    paper = "DivPrune (Alvar et al., CVPR 2025)"
    acts_at = "vision"
    signals = ("projected_features",)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return vision_only_plan(spec, num_vision_tokens, num_layers)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        return VisionSelection(index=divprune_select(ctx.projected_features, ctx.plan.r1))

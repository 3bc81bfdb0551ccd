"""The efficiency oracle: another method's token counts with fixed indices, no scoring.

``FixedIndexOracle(method)`` keeps exactly as many vision tokens in every layer as ``method`` does (its plan,
per image, including every cut inside the LLM) but picks the first ones: the first ``R1`` candidates at the
vision stage, the first ``R_k`` vision tokens at each cut ``k``. It runs through the same model, the same cuts
and the same cache as the method, so ``method prefill - oracle prefill`` is the cost of the method's scoring and
selection alone (``llava.eval.efficiency``). Its answers are meaningless; it is not registered as a method.
"""

from __future__ import annotations

import torch

from ..config import TokenPlan
from .base import DecoderContext, PruningMethod, VisionContext, VisionSelection


class FixedIndexOracle(PruningMethod):
    name = "oracle"
    paper = "efficiency oracle (fixed indices at the wrapped method's token counts)"
    signals = ()

    def __init__(self, method: PruningMethod):
        torch.nn.Module.__init__(self)  # no spec of its own: everything below comes from ``method``
        self.method = method
        self.spec, self.config, self.options = method.spec, method.config, method.options
        self.vision_dim, self.num_layers, self.plan = method.vision_dim, method.num_layers, method.plan
        self.acts_at = method.acts_at

    def plan_for(self, num_tokens: int) -> TokenPlan:
        return self.method.plan_for(num_tokens)

    @property
    def decoder_layer(self) -> int | None:
        return self.method.decoder_layer

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        return self.method.decoder_layers

    def score_layer_for(self, stage_layer: int) -> int:
        return stage_layer  # nothing is scored: the cut's own layer

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        batch, candidates = ctx.features.shape[:2]
        if ctx.plan.r1 >= candidates:
            return None
        index = torch.arange(ctx.plan.r1, device=ctx.features.device)
        return VisionSelection(index=index.expand(batch, -1))

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        batch, present = ctx.vision_index.shape
        keep = min(ctx.plan.tokens_per_layer[ctx.stage_layer], present)
        return torch.arange(keep, device=ctx.vision_index.device).expand(batch, -1)

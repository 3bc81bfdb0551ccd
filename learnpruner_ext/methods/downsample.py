"""Downsampling baseline (VTC-Bench's strong baseline): average-pool the patch features on the image grid.

Before the projector, the ``rows x cols`` grid of feature-layer patch features is average-pooled
(``adaptive_avg_pool2d``) to ``h x w`` cells with ``h = floor(sqrt(T))`` and ``w = min(floor(T / h), cols)``,
so ``h * w <= T`` tokens enter the LLM in every layer (24 x 24 -> 12 x 12 at T = 144, 8 x 8 at 64, 5 x 6 = 30 at
32; the plan records the achieved count and the CLI notes the shortfall). Each pooled token is projected by the
model's projector; its representative patch (for traces and figures) is the cell's centre patch. Needs the
candidates on one grid (the adapter's ``grid``): LLaVA-1.5 has one; LLaVA-NeXT's several tiles are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import TokenPlan, check_budget
from ._common import vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


def pooled_shape(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """(h, w) of the pooled grid for a budget of ``budget`` tokens on a ``rows x cols`` grid."""
    h = min(math.isqrt(budget), rows)
    return h, min(budget // h, cols)


@register_method
class Downsample(PruningMethod):
    name = "downsample"
    paper = "spatial average pooling (VTC-Bench's downsampling baseline)"
    acts_at = "vision"
    signals = ("vision_features",)
    requires = ("single_grid",)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        plan = vision_only_plan(spec, num_vision_tokens, num_layers)  # refuses --pruning-layer, checks T <= N
        side = math.isqrt(num_vision_tokens)
        if side * side != num_vision_tokens or plan.r1 == num_vision_tokens:
            return plan  # a non-square N (several tiles) is refused at selection, where the grid is known
        h, w = pooled_shape(check_budget(spec.config.budget, num_vision_tokens), side, side)
        return TokenPlan(num_vision_tokens, num_layers, r1=h * w)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        if ctx.grid is None:
            raise ValueError("downsample pools one raster grid of patches; these image tokens are not one grid")
        rows, cols = ctx.grid
        h, w = pooled_shape(ctx.plan.r1, rows, cols)
        features = ctx.vision_features  # [B, rows*cols, Dv] row-major
        grid = features.transpose(1, 2).reshape(features.shape[0], -1, rows, cols).float()
        pooled = F.adaptive_avg_pool2d(grid, (h, w)).flatten(2).transpose(1, 2).to(features.dtype)  # [B, h*w, Dv]
        centre_r = ((torch.arange(h) + 0.5) * rows / h).long().clamp(max=rows - 1)
        centre_c = ((torch.arange(w) + 0.5) * cols / w).long().clamp(max=cols - 1)
        index = (centre_r[:, None] * cols + centre_c[None]).flatten().to(features.device)
        return VisionSelection(index=index.expand(features.shape[0], -1), tokens=ctx.project(pooled))

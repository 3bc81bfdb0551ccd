"""Random baseline: keep ``T`` patches drawn uniformly at random before the LLM (no reference code: a baseline)."""

from __future__ import annotations

import torch

from ..config import TokenPlan
from ._common import vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


def random_indices(num_tokens: int, keep: int, seed: int) -> torch.Tensor:
    """[keep] ascending patch indices drawn uniformly without replacement; depends only on (N, keep, seed)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(num_tokens, generator=generator)[:keep].sort().values


@register_method
class RandomPruning(PruningMethod):
    """Keeps ``T`` patches drawn uniformly at random with ``PruningConfig.seed`` (``--pruning-seed``).

    The draw is made afresh on a CPU generator seeded with ``seed`` at every call, so it is deterministic
    and independent of batch composition: every image gets the same random subset for a given seed. Change
    the seed to draw another subset."""

    name = "random"
    paper = "random baseline"
    acts_at = "vision"

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return vision_only_plan(spec, num_vision_tokens, num_layers)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        batch = ctx.features.shape[0]
        index = random_indices(ctx.plan.num_vision_tokens, ctx.plan.r1, self.config.seed)
        return VisionSelection(index=index.to(ctx.features.device).expand(batch, -1))

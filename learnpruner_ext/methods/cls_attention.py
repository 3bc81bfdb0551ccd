"""[CLS]-only baseline: keep the ``T`` patches with the highest [CLS] attention before the LLM.

Reference: VisPruner's important-token step (Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1,
``llava/model/llava_arch.py``, ``important_ratio = 1``); ties as ``torch.topk``, attention in fp32."""

from __future__ import annotations

from ..config import TokenPlan
from ..selection import topk_indices
from ._common import vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


@register_method
class ClsPruning(PruningMethod):
    """Keeps the ``T`` patches with the highest [CLS] attention of the feature layer (head-averaged;
    mean received attention for encoders without [CLS]): VisPruner with ``important_ratio = 1``."""

    name = "cls"
    paper = "[CLS]-attention baseline (VisPruner's 'Important' ablation)"
    acts_at = "vision"
    signals = ("cls_attention",)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return vision_only_plan(spec, num_vision_tokens, num_layers)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        return VisionSelection(index=topk_indices(ctx.cls_attention, ctx.plan.r1))

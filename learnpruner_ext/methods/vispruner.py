"""VisPruner (paper: vispruner.txt, SPEC §2): important tokens by [CLS] attention plus diverse tokens.

Before the LLM, keep ``T`` tokens per image:

* ``T_imp = int(T * r)`` *important* tokens with the highest [CLS] -> patch attention of the feature
  layer (CLIP's penultimate layer, head-averaged; mean received attention for encoders without [CLS]);
* ``T - T_imp`` *diverse* tokens: the remaining tokens, sorted by descending attention, go through the
  similarity-based duplication removal of Algorithm 1 (:func:`learnpruner_ext.selection.remove_duplicates`)
  on the normalised vision-encoder features (the projector's input, as the reference code does) until
  ``T - T_imp`` are left.

Reference: Theia-4869/VisPruner @ aefa01adc7c7ce6334e880c88225e90cede760d1, ``llava/model/llava_arch.py``
(``encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py`` (attention of the feature layer).
Deviations (docs/methods.md): attention and similarities in fp32; ties in the attention ranking and in
Algorithm 1's scores are broken by a stable sort (lowest position first; the reference's ``argsort`` is not
stable); removals per round are capped at the size of set ``a``; an odd number of residual tokens works
(the reference's indexing fails when ``N - T_imp`` is odd).

Options: ``important_ratio`` (``r``, default 0.5 — the paper leaves it a hyper-parameter; the reference
README runs 128 tokens with 0.5), ``removal_step`` (tokens removed per iteration, 8 as in the reference).
"""

from __future__ import annotations

import torch

from ..config import TokenPlan
from ..cut import gather_seq
from ..selection import remove_duplicates
from ._common import check_int, check_unit_interval, vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


def vispruner_select(
    attention: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float, step: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention [B, N], features [B, N, C] -> (indices [B, keep] ascending, is_diverse [B, keep] bool)."""
    batch, n = attention.shape
    num_important = int(keep * important_ratio)
    order = attention.argsort(dim=-1, descending=True, stable=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    residual_features = gather_seq(features, residual)
    diverse = residual.gather(1, remove_duplicates(residual_features, keep - num_important, step))
    index = torch.cat([important, diverse], dim=1).sort(dim=1).values
    is_diverse = torch.zeros(batch, n, dtype=torch.bool, device=attention.device)
    is_diverse.scatter_(1, diverse, True)
    return index, is_diverse.gather(1, index)


@register_method
class VisPruner(PruningMethod):
    name = "vispruner"
    paper = "VisPruner (vispruner.txt)"
    acts_at = "vision"
    signals = ("cls_attention", "vision_features")
    defaults = {"important_ratio": 0.5, "removal_step": 8}

    @classmethod
    def validate_options(cls, options) -> None:
        check_unit_interval(cls.name, "important_ratio", options["important_ratio"])
        check_int(cls.name, "removal_step", options["removal_step"], minimum=1)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return vision_only_plan(spec, num_vision_tokens, num_layers)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        index, is_diverse = vispruner_select(
            ctx.cls_attention, ctx.vision_features, ctx.plan.r1, self.options["important_ratio"],
            self.options["removal_step"],
        )  # fmt: skip
        return VisionSelection(index=index, is_diverse=is_diverse)

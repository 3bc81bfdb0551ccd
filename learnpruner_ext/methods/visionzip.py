"""VisionZip, training-free (Yang et al., CVPR 2025; SPEC §4): dominant plus merged contextual tokens.

Before the LLM, ``T = dominant + contextual`` tokens per image:

* **Dominant**: the ``dominant`` patches with the highest [CLS] attention of the feature layer.
* **Contextual**: the other ``N - dominant`` patches (in patch order) are split into ``contextual``
  *targets*, taken uniformly (every ``max(1, (N - dominant) // contextual)``-th, the first ``contextual``
  of them) and the rest, each of which joins the target whose key is most similar (cosine of the feature
  layer's head-averaged keys, ``k_proj(layer_norm1(x))``). A contextual token is the mean of its target
  and every token assigned to it, taken on the vision features and then projected.
* **Split**: options ``dominant`` / ``contextual`` (counts; give one or both, they must add up to ``T``),
  otherwise ``contextual = round(T * contextual_ratio)`` with ``contextual_ratio = 10/64`` — 54 + 10 at
  64 tokens, 108 + 20 at 128, 162 + 30 at 192, as in the paper.

Deviations: VisionZip also keeps the [CLS] token as one of its dominant tokens; LLaVA-1.5's projector
input has no [CLS] (select strategy ``default``), so all ``dominant`` tokens are patches. Tokens enter the
LLM sorted by their representative patch (the dominant patch itself, or the contextual target) instead of
"all dominant, then all contextual".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import BudgetError, TokenPlan
from ._common import check_int, check_unit_interval, vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def visionzip_select(
    attention: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention [B, N], keys [B, N, d], features [B, N, C] ->
    (representative patch index [B, dominant + contextual] ascending, merged features [B, R, C] aligned)."""
    batch, n = attention.shape
    device = attention.device
    dominant_index = attention.topk(dominant, dim=-1).indices  # [B, D]
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, dominant_index, True)
    rest = n - dominant
    remaining = (~is_dominant).nonzero()[:, 1].view(batch, rest)  # ascending patch order
    index, tokens = dominant_index, _gather(features, dominant_index)
    if contextual:
        step = max(1, rest // contextual)
        is_target = torch.zeros(rest, dtype=torch.bool, device=device)
        is_target[torch.arange(0, rest, step, device=device)[:contextual]] = True
        target_pos, other_pos = is_target.nonzero()[:, 0], (~is_target).nonzero()[:, 0]
        target_index, other_index = remaining[:, target_pos], remaining[:, other_pos]  # patch indices
        unit = F.normalize(keys.float(), dim=-1)
        similarity = _gather(unit, other_index) @ _gather(unit, target_index).transpose(1, 2)  # [B, O, C]
        assign = F.one_hot(similarity.argmax(-1), contextual).to(features.dtype)  # [B, O, C]
        counts = 1 + assign.sum(1)[..., None]  # the target itself plus its members
        merged = (_gather(features, target_index) + assign.transpose(1, 2) @ _gather(features, other_index)) / counts
        index = torch.cat([index, target_index], dim=1)
        tokens = torch.cat([tokens, merged], dim=1)
    index, order = index.sort(dim=1)
    return index, _gather(tokens, order)


@register_method
class VisionZip(PruningMethod):
    name = "visionzip"
    paper = "VisionZip (Yang et al., CVPR 2025), training-free"
    acts_at = "vision"
    signals = ("cls_attention", "keys", "vision_features")
    defaults = {"dominant": None, "contextual": None, "contextual_ratio": 10 / 64}

    def validate_options(self) -> None:
        for key in ("dominant", "contextual"):
            if self.options[key] is not None:
                check_int(self.name, key, self.options[key])
        check_unit_interval(self.name, "contextual_ratio", self.options["contextual_ratio"])

    def make_plan(self, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        plan = vision_only_plan(self, num_vision_tokens, num_layers)
        t = plan.r1
        dominant, contextual = self.options["dominant"], self.options["contextual"]
        if dominant is None and contextual is None:
            contextual = round(t * self.options["contextual_ratio"])
        if dominant is None:
            dominant = t - contextual
        elif contextual is None:
            contextual = t - dominant
        if dominant < 0 or contextual < 0 or dominant + contextual != t:
            raise BudgetError(
                f"visionzip: dominant ({dominant}) + contextual ({contextual}) tokens must add up to the budget {t}; "
                "give one of the two counts, both adding up to the budget, or neither (contextual_ratio)"
            )
        self.split = (dominant, contextual)
        return plan

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if self.plan.r1 == self.plan.num_vision_tokens:
            return None
        dominant, contextual = self.split
        index, merged = visionzip_select(ctx.cls_attention, ctx.keys(), ctx.vision_features, dominant, contextual)
        return VisionSelection(index=index, tokens=ctx.project(merged))

"""VisionZip, training-free (Yang et al., CVPR 2025; SPEC §4): dominant plus merged contextual tokens.

Reference: dvlab-research/VisionZip @ 3151f6df4fca36a4cd1c985e5956e725b1f9ad02,
``visionzip/clip_encoder.py`` (``CLIPVisionTower_VisionZip.forward``), ``visionzip/utils.py`` (the metric)
and ``visionzip/main.py`` (``dominant_num = dominant - 1``). Everything is read from the feature layer
(CLIP's penultimate layer, ``mm_vision_select_layer = -2``), ``T = dominant + contextual`` tokens per image:

* **Dominant**: with ``cls_dominant=True`` (default, official) the [CLS] token of the feature layer plus
  the ``dominant - 1`` patches with the highest [CLS] attention (54 = [CLS] + 53 at 64 tokens). With
  ``cls_dominant=False`` all ``dominant`` tokens are patches and [CLS] is dropped (this toolkit's earlier
  convention; LLaVA-1.5's own projector input has no [CLS]). A tower with no [CLS] (SigLIP) always uses
  patches only. Dominant patches are kept in ascending patch order, as the official ``masked_select``.
* **Contextual**: the other patches, in patch order, are split into ``contextual`` *targets* — every
  ``max(1, rest // contextual)``-th, the first ``contextual`` of them — and the rest, each of which joins
  the target whose key is most similar: cosine of the feature layer's head-averaged keys
  ``k_proj(layer_norm1(x))`` (``argmax``, first target on ties). A contextual token is
  ``target + mean(members)`` on the feature-layer hidden states, the mean running over the members only;
  a target with no members stays itself (the official sum divided by ``counts.clamp(min=1)``).
* **Order into the LLM** (official): [CLS], the dominant patches ascending, then the contextual tokens in
  target order. Every token then goes through the projector.
* **Split**: options ``dominant`` / ``contextual`` (counts; give one or both, they must add up to ``T``),
  otherwise ``contextual = round(T * contextual_ratio)`` with ``contextual_ratio = 10/64`` — 54 + 10 at
  64 tokens, 108 + 20 at 128, 162 + 30 at 192, as the paper.

Deviations (docs/methods.md): similarities, the [CLS] attention and the merge are computed in fp32 (the
official code uses the model dtype); the [CLS] attention is head-averaged rather than head-summed (same
ranking); keys are normalised with ``F.normalize`` (eps 1e-12; differs only for an all-zero key, where the
official division gives NaN). In the trace the [CLS] token's representative patch index is 0 (:data:`CLS_INDEX`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import BudgetError, TokenPlan
from ..cut import gather_seq
from ._common import check_int, check_unit_interval, vision_only_plan
from .base import PruningMethod, VisionContext, VisionSelection, register_method

# Representative patch index of the [CLS] token in VisionSelection.index / the trace: [CLS] precedes patch 0
# in the encoder's sequence, and patch 0 is kept anyway whenever there are contextual tokens (it is either
# dominant or the first target), so a figure marks no extra patch; "original" positions give it patch 0's.
CLS_INDEX = 0


def visionzip_select(
    attention: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    dominant: int,
    contextual: int,
    cls_feature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """attention [B, N], keys [B, N, d], features [B, N, C], cls_feature [B, C] or None ->
    (representative patch index [B, dominant + contextual], tokens [B, dominant + contextual, C]) in the
    official order: [CLS] (if ``cls_feature`` is given and ``dominant > 0``), dominant patches ascending,
    contextual tokens in target order."""
    batch, n = attention.shape
    with_cls = cls_feature is not None and dominant > 0
    patches = dominant - int(with_cls)
    is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=attention.device)
    is_dominant.scatter_(1, attention.float().topk(patches, dim=-1).indices, True)
    dominant_index = is_dominant.nonzero()[:, 1].view(batch, patches)  # ascending patch order
    index, tokens = [dominant_index], [gather_seq(features, dominant_index)]
    if with_cls:
        index.insert(0, dominant_index.new_full((batch, 1), CLS_INDEX))
        tokens.insert(0, cls_feature[:, None].to(features.dtype))
    if contextual:
        rest = n - patches
        remaining = (~is_dominant).nonzero()[:, 1].view(batch, rest)  # ascending patch order
        step = max(1, rest // contextual)
        is_target = torch.zeros(rest, dtype=torch.bool, device=attention.device)
        is_target[torch.arange(0, rest, step, device=attention.device)[:contextual]] = True
        target_index, member_index = remaining[:, is_target], remaining[:, ~is_target]  # patch indices
        unit = F.normalize(keys.float(), dim=-1)
        similarity = gather_seq(unit, member_index) @ gather_seq(unit, target_index).transpose(1, 2)  # [B, M, C]
        assign = F.one_hot(similarity.argmax(-1), contextual).float()  # [B, M, C], first target on ties
        counts = assign.sum(1).clamp(min=1)[..., None]  # [B, C, 1] members per target; 0 -> 1 (sum is 0)
        members_mean = assign.transpose(1, 2) @ gather_seq(features, member_index).float() / counts
        index.append(target_index)
        tokens.append((gather_seq(features, target_index).float() + members_mean).to(features.dtype))
    return torch.cat(index, dim=1), torch.cat(tokens, dim=1)


@register_method
class VisionZip(PruningMethod):
    name = "visionzip"
    paper = "VisionZip (Yang et al., CVPR 2025), training-free"
    acts_at = "vision"
    signals = ("cls_attention", "keys", "vision_features", "cls_feature")
    defaults = {"dominant": None, "contextual": None, "contextual_ratio": 10 / 64, "cls_dominant": True}

    @classmethod
    def validate_options(cls, options) -> None:
        for key in ("dominant", "contextual"):
            if options[key] is not None:
                check_int(cls.name, key, options[key])
        check_unit_interval(cls.name, "contextual_ratio", options["contextual_ratio"])
        if not isinstance(options["cls_dominant"], bool):
            value = options["cls_dominant"]
            raise ValueError(f"visionzip: option cls_dominant must be true or false, got {value!r}")

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        plan = vision_only_plan(spec, num_vision_tokens, num_layers)
        cls.split_counts(spec.options, plan.r1)  # refuse an impossible split now, not at the first image
        return plan

    def __init__(self, config, num_vision_tokens, num_layers, vision_dim):
        super().__init__(config, num_vision_tokens, num_layers, vision_dim)
        self.split = self.split_counts(self.options, self.plan.r1)  # (dominant, contextual) at the reference N

    @staticmethod
    def split_counts(options, t: int) -> tuple[int, int]:
        """(dominant, contextual) token counts for a budget of ``t`` tokens."""
        dominant, contextual = options["dominant"], options["contextual"]
        if dominant is None and contextual is None:
            contextual = round(t * options["contextual_ratio"])
        if dominant is None:
            dominant = t - contextual
        elif contextual is None:
            contextual = t - dominant
        if dominant < 0 or contextual < 0 or dominant + contextual != t:
            raise BudgetError(
                f"visionzip: dominant ({dominant}) + contextual ({contextual}) tokens must add up to the budget {t}; "
                "give one of the two counts, both adding up to the budget, or neither (contextual_ratio)"
            )
        return dominant, contextual

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        dominant, contextual = self.split_counts(self.options, ctx.plan.r1)
        cls_feature = ctx.cls_feature if self.options["cls_dominant"] and ctx.has_cls else None
        index, merged = visionzip_select(
            ctx.cls_attention, ctx.keys(), ctx.vision_features, dominant, contextual, cls_feature
        )
        return VisionSelection(index=index, tokens=ctx.project(merged))

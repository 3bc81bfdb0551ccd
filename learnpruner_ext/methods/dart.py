"""DART (Wen et al., "Stop looking for important tokens ... duplication matters more"; SPEC §4).

Inside the LLM at layer ``K`` (default 2), keep ``R2`` vision tokens chosen by duplication, not importance:

1. **Pivots.** The ``image_pivots`` vision tokens and the ``text_pivots`` tokens after the image with the
   largest key norm (L1 over all heads' dimensions of the post-RoPE keys of layer ``K-1``, the keys DART's
   reference code takes from the previous layer's attention). Defaults 4 + 4 = 8 pivots, as in DART's
   LLaVA-1.5 scripts. Image pivots are kept.
2. **Duplicates of the pivots are removed.** For each pivot in turn (image pivots by descending key norm,
   then text pivots), keep its quota of the not-yet-kept vision tokens *least* cosine-similar to it, on the
   hidden states entering layer ``K`` passed through the model's final RMSNorm (as DART does).
   Quotas split the ``R2 - image_pivots`` slots as evenly as possible over the pivots (the first pivots get
   the remainder), so exactly ``R2`` tokens remain.

Budget: like FastV (``budget_mode`` ``"average"``/``"after_layer"``, see :mod:`.fastv`).

Reference: ZichenWen1/DART (no snapshot could be fetched; read through the fork xqy1111111/DART at the last
upstream commit 5a19452fc173017191c247848673e0bde755695a), ``llava/model/language_model/modeling_llama_self.py``
(``get_retained_image_token``).

Deviation: DART gives every pivot ``floor(T_max / #pivots)`` tokens, so it keeps ``image_pivots`` plus a
multiple of the pivot count (132 at "128"); we distribute the remainder to hit ``R2`` exactly. DART iterates
its pivots as a Python ``set`` (hash order); we take image pivots by descending key norm, then text pivots.
Similarities in fp32 (DART: ``F.cosine_similarity`` in the model dtype); ties among equally similar tokens go
to the lowest position (stable sort; DART: ``topk`` of the negated similarity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TokenPlan
from ..cut import gather_seq
from ._common import BUDGET_MODES, check_choice, check_int, decoder_plan
from .base import DecoderContext, PruningMethod, register_method

DEFAULT_LAYER = 2


def dart_select(
    vision_hidden: torch.Tensor,
    vision_key_norm: torch.Tensor,
    text_hidden: torch.Tensor,
    text_key_norm: torch.Tensor,
    text_valid: torch.Tensor,
    keep: int,
    image_pivots: int = 4,
    text_pivots: int = 4,
) -> torch.Tensor:
    """Pivot-based duplicate removal.

    Args:
        vision_hidden: [B, Nv, D] hidden states of the vision tokens (similarity space).
        vision_key_norm: [B, Nv] key norms of the vision tokens (pivot ranking).
        text_hidden / text_key_norm / text_valid: [B, Q, D] / [B, Q] / [B, Q] the same for the text after
            the image; invalid (padding) rows are never pivots.
        keep: R2, vision tokens to keep.
    Returns:
        [B, keep] indices into the Nv vision tokens, ascending.
    """
    batch, n = vision_key_norm.shape
    device = vision_hidden.device
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} vision tokens")
    if image_pivots < 1:
        raise ValueError("dart needs at least one image pivot")
    num_image = min(image_pivots, keep)
    image_pivot = vision_key_norm.topk(num_image, dim=-1).indices  # [B, P_img], by descending norm
    num_text = min(text_pivots, text_key_norm.shape[1])
    masked_norm = text_key_norm.float().masked_fill(~text_valid, float("-inf"))
    text_pivot = masked_norm.topk(num_text, dim=-1).indices  # [B, P_txt]
    pivots = torch.cat([gather_seq(vision_hidden, image_pivot), gather_seq(text_hidden, text_pivot)], dim=1)
    pivot_valid = torch.cat([torch.ones_like(image_pivot, dtype=torch.bool), text_valid.gather(1, text_pivot)], dim=1)
    # quota of each valid pivot: split the free slots evenly, the remainder to the first pivots
    free = keep - num_image
    num_valid = pivot_valid.sum(-1, keepdim=True).clamp(min=1)
    rank = pivot_valid.long().cumsum(-1) - 1
    quota = (free // num_valid + (rank < free % num_valid).long()) * pivot_valid  # [B, P]

    kept = torch.zeros(batch, n, dtype=torch.bool, device=device)
    kept.scatter_(1, image_pivot, True)
    unit = F.normalize(vision_hidden.float(), dim=-1)
    pivot_unit = F.normalize(pivots.float(), dim=-1)
    columns = torch.arange(n, device=device)
    for p in range(pivots.shape[1]):
        similarity = (unit @ pivot_unit[:, p, :, None])[..., 0]  # [B, Nv]
        similarity = similarity.masked_fill(kept, float("inf"))  # already kept: never picked again
        order = similarity.argsort(dim=-1, stable=True)  # least similar first
        take = columns[None, :] < quota[:, p : p + 1]  # first quota[b, p] of each row
        kept.scatter_(1, order, take | kept.gather(1, order))
    return kept.nonzero()[:, 1].view(batch, keep)


@register_method
class Dart(PruningMethod):
    name = "dart"
    paper = "DART (Wen et al., 2025)"
    acts_at = "decoder"
    signals = ("keys", "hidden_states")
    defaults = {"image_pivots": 4, "text_pivots": 4, "budget_mode": "average"}

    @classmethod
    def validate_options(cls, options) -> None:
        check_int(cls.name, "image_pivots", options["image_pivots"], minimum=1)
        check_int(cls.name, "text_pivots", options["text_pivots"], minimum=0)
        check_choice(cls.name, "budget_mode", options["budget_mode"], BUDGET_MODES)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return decoder_plan(spec, num_vision_tokens, num_layers, DEFAULT_LAYER)

    @property
    def score_layer(self) -> int | None:
        """Keys come from layer ``K-1``; hidden states are those entering layer ``K``."""
        return self.plan.layer - 1

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        rows, rows_valid = ctx.query_rows("after_image")
        hidden = ctx.stage_hidden_states()
        if "final_norm" not in ctx.extras:
            raise RuntimeError("dart needs the model's final norm in DecoderContext.extras['final_norm']")
        hidden = ctx.extras["final_norm"](hidden)
        vision_hidden = gather_seq(hidden, ctx.vision_index)
        text_hidden = gather_seq(hidden, rows)
        vision_norm = ctx.keys().float().abs().sum(dim=(1, 3))  # [B, Nv] L1 over heads x head dims
        text_norm = ctx.keys(rows).float().abs().sum(dim=(1, 3))
        return dart_select(
            vision_hidden, vision_norm, text_hidden, text_norm, rows_valid, ctx.plan.r2,
            self.options["image_pivots"], self.options["text_pivots"],
        )  # fmt: skip

"""FastV (Chen et al., "An image is worth 1/2 tokens after layer 2"; SPEC §4).

Inside the LLM: layers ``[0, K)`` process all ``N`` vision tokens; before layer ``K`` the ``R2`` vision
tokens that receive the most attention are kept and layers ``[K, L)`` see only them.

* **Score.** Head-averaged attention each vision token receives from the last position (``query="last"``,
  FastV's default) or averaged over every non-padding position (``query="all"``).
* **Which layer's attention.** FastV ranks with the attention weights of layer ``K-1``, the last layer
  that still sees every token (its reference code keeps the previous layer's ``output_attentions``). We
  recompute exactly those rows from layer ``K-1``'s own input (``score_layer = K-1``;
  ``score_with="previous"``, default). ``score_with="current"`` scores with layer ``K``'s attention instead.
* **Budget.** ``budget_mode="average"`` (default): ``R2 = ceil((T*L - K*N) / (L - K))`` so the average over
  all ``L`` layers is ``T``; a ``T`` that would need ``R2 < 1`` is infeasible and raises (K=2, N=576, L=32:
  the first two layers alone average ``K*N/L = 36``, so ``T >= 37``). ``budget_mode="after_layer"`` counts
  only the tokens kept after layer ``K`` (``R2 = T``), the way FastV's own paper reports it; the plan records
  ``convention="after_layer"``. Nothing is adjusted silently.
* ``K`` is ``PruningConfig.layer`` (``--pruning-layer``), default 2.

Reference: pkunlp-icler/FastV @ d1659729b5bf1be225e99ee15783deeea80f63b1,
``src/transformers/src/transformers/models/llama/modeling_llama.py`` (the ``fast_v_inplace`` branch: layer
``K-1``'s head-averaged attention from the last position, ``topk``, kept tokens keep their original position
ids). Deviations (docs/methods.md): per-sample vision spans and padding instead of a fixed ``SYS_LENGTH`` and
batch row 0; attention recomputed in fp32; KV cache supported; ties as ``torch.topk``.
"""

from __future__ import annotations

import torch

from ..config import TokenPlan
from ..selection import topk_indices
from ._common import BUDGET_MODES, check_choice, decoder_plan
from .base import DecoderContext, PruningMethod, register_method

DEFAULT_LAYER = 2


@register_method
class FastV(PruningMethod):
    name = "fastv"
    paper = "FastV (Chen et al., ECCV 2024)"
    acts_at = "decoder"
    signals = ("text_attention",)
    defaults = {"query": "last", "budget_mode": "average", "score_with": "previous"}

    @classmethod
    def validate_options(cls, options) -> None:
        check_choice(cls.name, "query", options["query"], ("last", "all"))
        check_choice(cls.name, "budget_mode", options["budget_mode"], BUDGET_MODES)
        check_choice(cls.name, "score_with", options["score_with"], ("previous", "current"))

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        return decoder_plan(spec, num_vision_tokens, num_layers, DEFAULT_LAYER)

    @property
    def score_layer(self) -> int | None:
        """Layer ``K-1`` (FastV) or ``K`` (``score_with="current"``)."""
        return self.plan.layer - 1 if self.options["score_with"] == "previous" else self.plan.layer

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        return topk_indices(ctx.text_attention(self.options["query"]), ctx.plan.r2)

"""LearnPruner (paper: learnpruner.txt, SPEC §1; no public reference code was found, so the paper is the reference).

Stage 1, after the vision encoder: the LPM's keep probability ranks tokens; the top ``R1 - D`` are kept
and ``D = round(lambda * R1)`` diversity tokens are added by greedy max-min cosine similarity on the
projected tokens. Stage 2, at decoder layer ``k``: keep the ``R2`` vision tokens that receive the most
attention from the instruction text (Eq. 5).
"""

from __future__ import annotations

import warnings

import torch

from ..config import TokenPlan, default_stage2_layer, two_stage_plan
from ..flops import learnpruner_overhead_flops
from ..lpm import LearnablePruningModule
from ..selection import importance_plus_diversity, topk_indices
from .base import DecoderContext, PruningMethod, VisionContext, VisionSelection, register_method


UNTRAINED_NOTICE = ("LearnPruner is running with an UNTRAINED (randomly initialised) LPM, so stage 1 ranks tokens "
                    "arbitrarily; pass --lpm-path to a trained LPM (see docs/training.md)")


@register_method
class LearnPruner(PruningMethod):
    name = "learnpruner"
    paper = "LearnPruner (learnpruner.txt)"
    acts_at = "vision+decoder"
    signals = ("vision_features", "projected_features", "text_attention")
    defaults = {"hidden_features": 512}
    uses_lpm = True

    def __init__(self, config, num_vision_tokens, num_layers, vision_dim):
        super().__init__(config, num_vision_tokens, num_layers, vision_dim)
        if config.lpm_path:
            self.lpm = LearnablePruningModule.from_pretrained(config.lpm_path)
        else:
            self.lpm = LearnablePruningModule(vision_dim, self.options["hidden_features"])
        if self.lpm.in_features != vision_dim:
            raise ValueError(
                f"the LPM at {config.lpm_path} takes {self.lpm.in_features}-d features but this model's vision "
                f"encoder gives {vision_dim}-d; train an LPM for this base (scripts/v1_5/finetune_lpm.sh)"
            )
        if not self.lpm.trained:
            warnings.warn(UNTRAINED_NOTICE, stacklevel=2)

    @property
    def notices(self) -> list[str]:
        return [] if self.lpm.trained else [UNTRAINED_NOTICE]

    @classmethod
    def plan_overhead_flops(cls, spec, plan, model_config, text_tokens: int, text_after_image: int) -> float:
        return learnpruner_overhead_flops(model_config, plan, text_tokens, text_after_image)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        config = spec.config
        layer = config.layer if config.layer is not None else default_stage2_layer(num_layers)
        return two_stage_plan(config.budget, num_vision_tokens, num_layers, layer, config.ratio)

    def num_diverse(self, plan: TokenPlan | None = None) -> int:
        """D = round(lambda * R1) of ``plan`` (default: the method's plan)."""
        return round(self.config.diversity * (plan or self.plan).r1)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        with ctx.section("lpm"):
            scores = self.lpm.keep_scores(ctx.vision_features)
        projected = ctx.projected_features
        with ctx.section("diversity"):  # top-k by score, then max-min diversity
            index, is_diverse = importance_plus_diversity(scores, projected, ctx.plan.r1, self.num_diverse(ctx.plan))
        return VisionSelection(index=index, is_diverse=is_diverse)

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        return topk_indices(ctx.text_attention("after_image"), ctx.plan.r2)

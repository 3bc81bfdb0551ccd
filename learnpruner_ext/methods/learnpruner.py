"""LearnPruner (paper: learnpruner.txt, SPEC §1; no public reference code was found, so the paper is the reference).

Stage 1, after the vision encoder: the LPM's keep probability ranks tokens; the top ``R1 - D`` are kept
and ``D = round(lambda * R1)`` diversity tokens are added by greedy max-min cosine similarity on the
projected tokens. Stage 2, at decoder layer ``k``: keep the ``R2`` vision tokens that receive the most
attention from the instruction text (Eq. 5).

Controls (options, so the sweep runs them like any configuration; the reviewers' questions of issue 21):

* ``stage1="cls"``: the [CLS] attention ranks tokens in place of the LPM (same importance + diversity rule);
* ``stage1="random"``: ``R1`` tokens drawn uniformly (``--pruning-seed``), no diversity;
* ``stage1="none"``: stage 2 only: all ``N`` enter the LLM, ``R2`` from layer ``k`` (FastV's budget mapping,
  so an average below ``k·N/L`` is infeasible);
* ``stage2=false``: stage 1 only: ``R1 = T`` in every layer.
"""

from __future__ import annotations

import warnings

import torch

from ..config import TokenPlan, default_stage2_layer, in_llm_plan, single_stage_plan, two_stage_plan
from ..flops import learnpruner_overhead_flops
from ..lpm import LearnablePruningModule
from ..selection import importance_plus_diversity, topk_indices
from ._common import check_choice
from .base import DecoderContext, PruningMethod, VisionContext, VisionSelection, register_method
from .random_pruning import random_indices

STAGE1 = ("lpm", "cls", "random", "none")


UNTRAINED_NOTICE = ("LearnPruner is running with an UNTRAINED (randomly initialised) LPM, so stage 1 ranks tokens "
                    "arbitrarily; pass --lpm-path to a trained LPM (see docs/training.md)")


@register_method
class LearnPruner(PruningMethod):
    name = "learnpruner"
    paper = "LearnPruner (learnpruner.txt)"
    acts_at = "vision+decoder"
    signals = ("vision_features", "projected_features", "text_attention", "cls_attention")
    defaults = {"hidden_features": 512, "stage1": "lpm", "stage2": True}
    uses_lpm = True

    @classmethod
    def validate_options(cls, options) -> None:
        check_choice(cls.name, "stage1", options["stage1"], STAGE1)
        if not isinstance(options["stage2"], bool):
            raise ValueError(f"learnpruner: option stage2 must be true or false, got {options['stage2']!r}")
        if options["stage1"] == "none" and not options["stage2"]:
            raise ValueError("learnpruner: stage1=none with stage2=false prunes nothing; use --pruning-method none")

    def __init__(self, config, num_vision_tokens, num_layers, vision_dim):
        super().__init__(config, num_vision_tokens, num_layers, vision_dim)
        self.lpm = None
        if self.options["stage1"] != "lpm":  # a control: no LPM is read
            return
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
        return [] if self.lpm is None or self.lpm.trained else [UNTRAINED_NOTICE]

    @classmethod
    def plan_overhead_flops(cls, spec, plan, model_config, text_tokens: int, text_after_image: int) -> float:
        if spec.options["stage1"] != "lpm" or not spec.options["stage2"]:
            return 0.0  # the controls' overhead is not modelled
        return learnpruner_overhead_flops(model_config, plan, text_tokens, text_after_image)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        config, options = spec.config, spec.options
        if not options["stage2"]:
            if config.layer is not None:
                raise ValueError(f"learnpruner with stage2=false has no decoder layer; drop --pruning-layer ({config.layer})")
            return single_stage_plan(config.budget, num_vision_tokens, num_layers)
        layer = config.layer if config.layer is not None else default_stage2_layer(num_layers)
        if options["stage1"] == "none":
            return in_llm_plan(config.budget, num_vision_tokens, num_layers, layer)
        return two_stage_plan(config.budget, num_vision_tokens, num_layers, layer, config.ratio)

    def num_diverse(self, plan: TokenPlan | None = None) -> int:
        """D = round(lambda * R1) of ``plan`` (default: the method's plan)."""
        return round(self.config.diversity * (plan or self.plan).r1)

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        if ctx.plan.r1 == ctx.plan.num_vision_tokens:
            return None
        stage1 = self.options["stage1"]
        if stage1 == "random":
            index = random_indices(ctx.plan.num_vision_tokens, ctx.plan.r1, self.config.seed).to(ctx.features.device)
            return VisionSelection(index=index.expand(ctx.features.shape[0], -1))
        with ctx.section("lpm"):
            scores = ctx.cls_attention if stage1 == "cls" else self.lpm.keep_scores(ctx.vision_features)
        projected = ctx.projected_features
        with ctx.section("diversity"):  # top-k by score, then max-min diversity
            index, is_diverse = importance_plus_diversity(scores, projected, ctx.plan.r1, self.num_diverse(ctx.plan))
        return VisionSelection(index=index, is_diverse=is_diverse)

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        return topk_indices(ctx.text_attention("after_image"), ctx.plan.r2)

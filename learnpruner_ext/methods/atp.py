"""ATP-LLaVA (Ye et al., "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models", CVPR 2025; paper:
atp-llava.txt, SPEC §3; no public code, so the paper's equations are the reference). This is inference; the modules
train with :mod:`learnpruner_ext.training.atp_model` (``scripts/v1_5/finetune_atp.sh``).

An ATP module sits before each decoder layer ``k`` of ``layers`` (LLaVA-1.5-7B: 4, 14, 24 of 32; other depths: the
same relative depth, e.g. 1, 4, 6 of 8). At ``k`` it scores the vision tokens still in the sequence with the
attention map of layer ``k - 1`` (the paper: "the self-attention map from the previous layer"; the exact rows are
recomputed from that layer's q/k on its input, so the model runs under sdpa):

* ``S_self`` (Eq. 3): the attention **logits** ``q_m . k_n / sqrt(d)`` that token ``n`` receives from the vision
  queries ``m``, averaged over the queries and the heads (option ``self_score="attention"``: the causal softmax
  probabilities instead);
* ``S_cross`` (Eq. 4): the softmax attention it receives from the text after the image (the instruction; the paper
  leaves the system prompt out), averaged over those queries and the heads;
* ``S_spatial`` (Eq. 5): fixed per patch of the image's raster grid (:func:`learnpruner_ext.atp.spatial_scores`).

The module (:class:`learnpruner_ext.atp.ATPModules`) predicts ``theta_r`` and ``theta_s`` per sample and keeps the
tokens with ``S_redundant >= theta_r`` or ``S_spatial >= theta_s``; the others leave the sequence for good (later
modules only see the survivors, so the kept sets are nested). Each sample keeps its own count (the per-sample cut of
:mod:`learnpruner_ext.llm`), and kept tokens keep their original positions (a decoder cut gathers positions).

**Budget.** The token count is decided by the thresholds, not by ``T``: ``--visual-token-budget T`` is the target
average the modules were trained for (``N_target`` of Eq. 13), recorded, never assumed; the plan lists the module
layers with the upper bound ``N`` (convention ``"adaptive"``) and the trace measures each sample's count per layer.
``T = N`` keeps every token (the toolkit's "a budget of N is no pruning"; no module runs); no budget runs the
modules. Needs one raster grid per image (``requires = ("single_grid",)``: LLaVA-1.5); LLaVA-NeXT, Qwen2.5-VL and
Video-LLaVA are refused, since the spatial samples are defined on one grid.

**Modules.** ``--atp-path DIR`` (``atp.safetensors`` + ``atp_config.json``), else the checkpoint's ``<model>/atp/``,
else an untrained module drawn with ``--pruning-seed`` (warned about). A loaded module's config (layers, hidden
width, temperature, lambda_sample, strides, S_self kind) wins; an option that contradicts it is an error.
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import scoring
from ..atp import (
    HIDDEN_FEATURES,
    LAMBDA_SAMPLE,
    SCORE_NORMS,
    SELF_SCORES,
    SPATIAL_STRIDES,
    TEMPERATURE,
    ATPModules,
    check_strides,
    redundant_scores,
    spatial_scores,
)
from ..config import TokenPlan, UnsupportedMethodError, check_budget
from ..cut import right_pad
from ._common import check_choice, resolve_layers, scaled_layers
from .base import DecoderContext, PruningMethod, register_method

REFERENCE_LAYERS = (4, 14, 24)  # the paper's module layers (Table 2: pruning before the input of these layers)
# recorded in atp_config.json: a loaded module's values win, an option that contradicts them is an error
MODULE_OPTIONS = ("layers", "hidden_features", "temperature", "lambda_sample", "strides", "self_score", "score_norm")

UNTRAINED_NOTICE = ("ATP is running with UNTRAINED (randomly initialised) ATP modules, so its thresholds are "
                    "arbitrary; pass --atp-path to trained modules (train them with scripts/v1_5/finetune_atp.sh)")  # fmt: skip


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers 4/14/24 of 32 at the same relative depth: 1/4/6 of 8, 2/3 of 4."""
    return scaled_layers(REFERENCE_LAYERS, num_layers)


def module_layers(spec, num_layers: int) -> tuple[int, ...]:
    """The module layers: option ``layers``, else the ATP folder's recorded layers, else :func:`default_layers`;
    ``--pruning-layer k`` replaces the first one (the later ones above ``k`` stay). Every layer must be in
    ``(0, L)``."""
    layers = spec.options["layers"]
    if layers is None and spec.config.atp_path:
        layers = ATPModules.read_config(spec.config.atp_path).get("layers")
    layers = tuple(layers) if layers is not None else default_layers(num_layers)
    return resolve_layers("atp", "module layer", layers, num_layers, spec.config.layer, explicit=False)


def adaptive_plan(num_vision_tokens: int, num_layers: int, layers: tuple[int, ...]) -> TokenPlan:
    """The plan of adaptive pruning: cuts at ``layers``, each with the upper bound ``N`` (the counts are measured)."""
    return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens, r2=None, layer=layers[0],
                     convention="adaptive", stages=tuple((k, num_vision_tokens) for k in layers))  # fmt: skip


@register_method
class ATP(PruningMethod):
    name = "atp"
    paper = "ATP-LLaVA (Ye et al., CVPR 2025)"
    acts_at = "decoder"
    signals = ("text_attention", "hidden_states")
    defaults = {"layers": None, "hidden_features": HIDDEN_FEATURES, "temperature": TEMPERATURE,
                "lambda_sample": LAMBDA_SAMPLE, "strides": list(SPATIAL_STRIDES), "self_score": "logits",
                "score_norm": "none"}  # fmt: skip
    requires = ("single_grid",)  # the spatial samples live on one raster grid
    uses_atp = True

    @classmethod
    def validate_options(cls, options) -> None:
        layers = options["layers"]
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not layers
            or any(isinstance(k, bool) or not isinstance(k, int) for k in layers)
            or any(a >= b for a, b in zip(layers, layers[1:]))
        ):  # fmt: skip
            raise ValueError(f"atp: option layers must be a strictly ascending list of decoder layers, "
                             f"e.g. layers=[4,14,24], got {layers!r}")  # fmt: skip
        hidden = options["hidden_features"]
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"atp: option hidden_features must be a positive integer, got {hidden!r}")
        temperature = options["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"atp: option temperature must be a positive number, got {temperature!r}")
        check_strides(options["strides"], options["lambda_sample"])
        check_choice(cls.name, "self_score", options["self_score"], SELF_SCORES)
        check_choice(cls.name, "score_norm", options["score_norm"], SCORE_NORMS)

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        layers = module_layers(spec, num_layers)
        if spec.config.budget is not None and check_budget(spec.config.budget, num_vision_tokens) == num_vision_tokens:
            return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens)  # T = N: no pruning
        return adaptive_plan(num_vision_tokens, num_layers, layers)

    def __init__(self, config, num_vision_tokens, num_layers, vision_dim):
        super().__init__(config, num_vision_tokens, num_layers, vision_dim)
        side = math.isqrt(num_vision_tokens)
        if side * side != num_vision_tokens:
            raise UnsupportedMethodError(f"atp samples one square grid of patches; this model has {num_vision_tokens} "
                                         "vision tokens per image, not a square grid")  # fmt: skip
        layers, options = module_layers(self.spec, num_layers), self.options
        if config.atp_path:
            self.atp = ATPModules.from_pretrained(config.atp_path)
            self._check_loaded(config, num_vision_tokens, layers)
        else:
            with torch.random.fork_rng(devices=[]):  # an untrained module, reproducible from --pruning-seed
                torch.manual_seed(config.seed)
                self.atp = ATPModules(layers, num_vision_tokens, options["hidden_features"], options["temperature"],
                                      options["lambda_sample"], tuple(options["strides"]), num_layers,
                                      self_score=options["self_score"], score_norm=options["score_norm"])  # fmt: skip
        if self.atp.layers != layers:
            raise ValueError(f"atp: the modules at {config.atp_path} sit before layers {list(self.atp.layers)}, but this "
                             f"run places them before {list(layers)}; drop --pruning-layer / the layers option")  # fmt: skip
        self.register_buffer("spatial", spatial_scores(side, side, self.atp.strides, self.atp.lambda_sample),
                             persistent=False)  # fmt: skip
        if not self.atp.trained:
            warnings.warn(UNTRAINED_NOTICE, stacklevel=2)

    def _check_loaded(self, config, num_vision_tokens: int, layers) -> None:
        if self.atp.num_tokens != num_vision_tokens:
            raise ValueError(f"the ATP modules at {config.atp_path} take {self.atp.num_tokens} vision tokens per image "
                             f"but this model gives {num_vision_tokens}; train ATP modules for this base")  # fmt: skip
        recorded = self.atp.config_dict()
        for key in MODULE_OPTIONS:
            if key == "layers" or key not in config.options:  # layers: compared with the resolved ones
                continue
            given = config.options[key]
            if (list(given) if isinstance(given, (list, tuple)) else given) != recorded[key]:
                raise ValueError(f"atp: option {key}={given!r} contradicts the modules at {config.atp_path} "
                                 f"({key}={recorded[key]!r}); drop the option")  # fmt: skip

    @property
    def notices(self) -> list[str]:
        out = [] if self.atp.trained else [UNTRAINED_NOTICE]
        target, budget = self.atp.target_tokens, self.config.budget
        if target is not None and budget is not None and target != budget:
            out.append(f"atp: the modules were trained for an average of {target} vision tokens per layer; the budget "
                       f"{budget} is only recorded (the thresholds decide the count)")  # fmt: skip
        return out

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.plan.stages)

    def score_layer_for(self, stage_layer: int) -> int:
        """Layer ``k - 1``: the module before layer ``k`` reads the attention map of the layer before it."""
        return stage_layer - 1

    # -- scores --------------------------------------------------------------------------------------------
    def vision_slots(self, ctx: DecoderContext) -> torch.Tensor:
        """[B, Nv] the patch index (raster order, ``[0, N)``) of each vision token present at this cut."""
        _, vision, _, origin = ctx.input_embeddings()
        rank = vision.long().cumsum(-1) - 1  # [B, S0] each LLM-input vision token's slot in its image
        return rank.gather(1, origin.gather(1, ctx.vision_index))

    def scores(self, ctx: DecoderContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(S_self, S_cross), each [B, Nv] fp32, from the scoring layer's q/k (Eqs. 3-4)."""
        if self.atp.self_score == "logits":
            s_self = scoring.vision_self_logits(ctx.layer, ctx.hidden_in, ctx.position_embeddings, ctx.vision_index)
        else:
            s_self = ctx.text_attention((ctx.vision_index, torch.ones_like(ctx.vision_index, dtype=torch.bool)))
        s_cross = ctx.text_attention("after_image")
        return s_self, s_cross

    def module_inputs(self, ctx: DecoderContext) -> dict[str, torch.Tensor]:
        """What the ATP module at ``ctx.stage_layer`` reads: ``s_self``, ``s_cross``, ``s_spatial``, ``slots``
        ([B, Nv] each); the same tensors feed :meth:`ATPLayerModule.soft_mask` (training) and ``keep_mask``."""
        slots = self.vision_slots(ctx)
        s_self, s_cross = self.scores(ctx)
        return {"s_self": s_self, "s_cross": s_cross, "s_spatial": self.spatial[slots], "slots": slots}

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        """The kept vision tokens of each sample, ascending, right-padded with -1 (samples keep different counts)."""
        batch, present = ctx.vision_index.shape
        if present == 0:
            return ctx.vision_index.new_zeros(batch, 0)
        inputs = self.module_inputs(ctx)
        keep = self.atp[ctx.stage_layer].keep_mask(**inputs)
        ctx.extras["scores"] = redundant_scores(inputs["s_self"], inputs["s_cross"])  # the trace's stage2_scores
        return right_pad([row.nonzero()[:, 0] for row in keep], -1)

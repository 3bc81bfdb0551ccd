"""The method interface and registry.

A method is a declaration (where it acts, which signals it reads, its hyper-parameters with the
papers' defaults, how it maps the budget) plus pure selection functions. The mechanics of applying a
selection (gathering tokens, positions, masks, KV cache, batches) live in ``learnpruner_ext.modeling``
and are shared by every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .. import scoring
from ..config import PruningConfig, TokenPlan, image_budget
from ..cut import gather_seq
from ..timing import StageTimer, section

# Signals a method may declare; contexts refuse to compute undeclared ones so declarations stay honest.
SIGNALS = ("cls_attention", "cls_feature", "vision_features", "projected_features", "text_attention", "keys", "hidden_states")
ACTS_AT = ("nowhere", "vision", "decoder", "vision+decoder")

_REGISTRY: dict[str, type["PruningMethod"]] = {}


def register_method(cls: type["PruningMethod"]) -> type["PruningMethod"]:
    """Class decorator: make ``cls`` available as ``--pruning-method cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"pruning method {cls.name!r} is registered twice")
    unknown = set(cls.signals) - set(SIGNALS)
    if unknown or cls.acts_at not in ACTS_AT:
        raise ValueError(f"{cls.__name__}: unknown signals {unknown} or acts_at {cls.acts_at!r}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["PruningMethod"]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; valid methods: {', '.join(available_methods())}")
    return _REGISTRY[name]


def create_method(config: PruningConfig, *, num_vision_tokens: int, num_layers: int, vision_dim: int) -> "PruningMethod":
    """Instantiate the method named by ``config.method`` for a model of the given geometry."""
    return get_method_class(config.method)(config, num_vision_tokens, num_layers, vision_dim)


@dataclass(frozen=True)
class MethodSpec:
    """What a method's plan depends on: its name, the config, and the options merged with its defaults."""

    name: str
    config: PruningConfig
    options: dict[str, Any]


@dataclass(frozen=True)
class MethodPlan:
    """A method resolved for one geometry without building it (no ``nn.Module``, no LPM loaded):
    what budget accounting, FLOP counting and the demo need."""

    method: type["PruningMethod"]
    spec: MethodSpec
    plan: TokenPlan

    def overhead_flops(self, model_config, text_tokens: int, text_after_image: int) -> float:
        return self.method.plan_overhead_flops(self.spec, self.plan, model_config, text_tokens, text_after_image)


def plan_method(config: PruningConfig, *, num_vision_tokens: int, num_layers: int) -> MethodPlan:
    """The :class:`MethodPlan` of ``config`` for a model with ``num_vision_tokens`` per image and ``num_layers``;
    raises the same errors (unknown method or option, infeasible budget) as building the method would."""
    cls = get_method_class(config.method)
    spec = cls.resolve(config)
    return MethodPlan(cls, spec, cls.image_plan(spec, num_vision_tokens, num_vision_tokens, num_layers))


@dataclass
class VisionSelection:
    """Result of a vision-stage method for a batch of images."""

    # [B, R1] patch index of each token, in the order the tokens enter the LLM: ascending for methods that
    # gather patches; merging methods (VisionZip) give a representative patch per token, in their own order;
    # -1 marks an empty slot at the end of a row (an image that keeps fewer than R1 tokens)
    index: torch.Tensor
    tokens: torch.Tensor | None = None  # [B, R1, D] replacement tokens (merging methods); None = gather
    is_diverse: torch.Tensor | None = None  # [B, R1] bool, tokens picked for diversity (for figures)


@dataclass
class VisionContext:
    """Signals available after the vision encoder, computed lazily on first use.

    The family adapter (``learnpruner_ext.adapters``) supplies the signals as callables, so a method never
    sees the family: ``importance`` is the [CLS] -> patch attention of the feature layer, or the mean attention
    each token receives where the tower has no [CLS]; ``key_states`` are the feature layer's keys.
    """

    method: "PruningMethod"
    features: torch.Tensor  # [B, N, Dv] the candidates' features (the projector's input)
    projected: torch.Tensor | None  # [B, N, D] projector output (None: computed on first use)
    has_cls: bool
    generator: torch.Generator | None = None
    # the model's projector: [B, R, Dv] vision features -> [B, R, D] LLM tokens (for merging methods)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    cls_token: torch.Tensor | None = None  # [B, Dv] the feature layer's [CLS] output; None if the tower has none
    plan: TokenPlan | None = None  # the plan of these images (default: the method's); select plan.r1 tokens
    importance: Callable[[], torch.Tensor] | None = None  # -> [B, N] head-averaged attention (see above)
    key_states: Callable[[], torch.Tensor] | None = None  # -> [B, N, d] head-averaged keys of the feature layer
    timer: StageTimer | None = None  # the model's timing hook (None: untimed)
    grid: tuple[int, int] | None = None  # (rows, cols) when the candidates are one raster grid (LLaVA-1.5), else None

    def __post_init__(self):
        if self.plan is None:
            self.plan = self.method.plan

    def section(self, name: str):
        """A named timing section inside a method's selection (:mod:`learnpruner_ext.timing`)."""
        return section(self.timer, name)

    def _check(self, signal: str) -> None:
        if signal not in self.method.signals:
            raise RuntimeError(f"method {self.method.name!r} reads {signal!r} but does not declare it in `signals`")

    def keys(self) -> torch.Tensor:
        """[B, N, d] head-averaged key states of the candidates in the feature layer (VisionZip's metric; CLIP:
        ``self_attn.k_proj(layer_norm1(x))``, [CLS] row dropped)."""
        self._check("keys")
        if "_keys" not in self.__dict__:
            self.__dict__["_keys"] = self.key_states()
        return self.__dict__["_keys"]

    @cached_property
    def cls_attention(self) -> torch.Tensor:
        """[B, N] head-averaged [CLS] -> patch attention of the feature layer (mean received attention if no
        [CLS]), each patch scored within its own encoder input (LLaVA-NeXT: its crop)."""
        self._check("cls_attention")
        return self.importance()

    @cached_property
    def cls_feature(self) -> torch.Tensor:
        """[B, Dv] the feature layer's [CLS] hidden state, in the space of ``features`` (the projector's input)."""
        self._check("cls_feature")
        if self.cls_token is None:
            raise RuntimeError(f"method {self.method.name!r} reads the [CLS] feature, but this vision tower has no [CLS] token")
        return self.cls_token

    @cached_property
    def vision_features(self) -> torch.Tensor:
        self._check("vision_features")
        return self.features

    @cached_property
    def projected_features(self) -> torch.Tensor:
        self._check("projected_features")
        return self.projected


@dataclass
class DecoderContext:
    """Signals available at the in-LLM stage, computed from the scoring layer's input."""

    method: "PruningMethod"
    layer: nn.Module  # decoder layer whose attention is used for scoring
    hidden_in: torch.Tensor  # [B, S, D] that layer's input
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    vision_index: torch.Tensor  # [B, Nv] sequence positions of the vision tokens, ascending
    key_valid: torch.Tensor | None  # [B, S] bool, False on padding
    extras: dict[str, Any] = field(default_factory=dict)
    plan: TokenPlan | None = None  # the plan of these prompts (default: the method's); keep plan.r2 tokens
    stage_layer: int | None = None  # the boundary k this selection cuts at (methods with several cuts)

    def __post_init__(self):
        if self.plan is None:
            self.plan = self.method.plan

    def _check(self, signal: str) -> None:
        if signal not in self.method.signals:
            raise RuntimeError(f"method {self.method.name!r} reads {signal!r} but does not declare it in `signals`")

    def query_rows(self, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence indices [B, Q] and validity [B, Q] of the query rows.

        ``after_image``: the text after the last vision token (the instruction; LearnPruner Eq. 5);
        ``last``: the last position; ``all``: every non-padding position.
        """
        batch, seq = self.hidden_in.shape[:2]
        device = self.hidden_in.device
        positions = torch.arange(seq, device=device).expand(batch, -1)
        valid = self.key_valid if self.key_valid is not None else torch.ones(batch, seq, dtype=torch.bool, device=device)
        if rows == "last":
            return positions[:, -1:], valid[:, -1:]
        if rows == "all":
            return positions, valid
        if rows != "after_image":
            raise ValueError(f"query rows must be 'after_image', 'last' or 'all', got {rows!r}")
        first = int(self.vision_index[:, -1].min()) + 1  # rows from here on; earlier rows are masked per sample
        rows_idx = positions[:, first:]
        rows_valid = valid[:, first:] & (rows_idx > self.vision_index[:, -1:])
        if rows_idx.shape[1] == 0 or not bool(rows_valid.any(-1).all()):
            raise ValueError("text-guided pruning needs text after the image in every prompt; put <image> before the question")
        return rows_idx, rows_valid

    def text_attention(self, rows: str | tuple[torch.Tensor, torch.Tensor] = "after_image") -> torch.Tensor:
        """[B, Nv] mean attention each vision token receives from the query rows (exact softmax over all keys).

        ``rows``: a mode of :meth:`query_rows`, or explicit ``(index [B, Q], valid [B, Q])`` query rows (SparseVLM's
        raters)."""
        self._check("text_attention")
        index, valid = rows if isinstance(rows, tuple) else self.query_rows(rows)
        scores = scoring.text_to_vision_attention(
            self.layer, self.hidden_in, self.position_embeddings, index, valid, self.vision_index, self.key_valid
        )
        self.extras["scores"] = scores  # the model records what its selection read (PruningTrace.stage2_scores)
        return scores

    def keys(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hkv, Q, d] post-RoPE keys of the scoring layer at sequence positions ``index`` [B, Q]
        (default: the vision tokens, Q = Nv)."""
        self._check("keys")
        if "_keys" not in self.extras:
            self.extras["_keys"] = scoring.key_states(self.layer, self.hidden_in, self.position_embeddings)
        k = self.extras["_keys"]
        index = self.vision_index if index is None else index
        idx = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        return k.gather(2, idx)

    def vision_hidden_states(self) -> torch.Tensor:
        """[B, Nv, D] the vision tokens' hidden states entering the scoring layer."""
        self._check("hidden_states")
        return gather_seq(self.hidden_in, self.vision_index)

    def input_embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The LLM's input, before any in-LLM cut: ``(embeddings [B, S0, D], vision [B, S0] bool, valid [B, S0] bool
        or None, origin [B, S])``; ``origin`` maps each position of ``hidden_in`` to its index in that input."""
        self._check("hidden_states")
        keys = ("embeddings", "embeddings_vision", "embeddings_valid", "origin")
        if any(k not in self.extras for k in keys):
            raise RuntimeError("input_embeddings: the model did not pass the LLM input in extras")
        return tuple(self.extras[k] for k in keys)

    def stage_hidden_states(self) -> torch.Tensor:
        """[B, S, D] hidden states entering the pruning layer ``k`` (the output of layer k-1), every position.

        Equals ``hidden_in`` when the method scores with layer k itself; the model passes it in
        ``extras["stage_input"]``."""
        self._check("hidden_states")
        if "stage_input" in self.extras:
            return self.extras["stage_input"]
        if self.method.score_layer != self.method.decoder_layer:
            raise RuntimeError("stage_hidden_states: the model did not pass extras['stage_input']")
        return self.hidden_in


class PruningMethod(nn.Module):
    """Base class. Subclasses set the class attributes and override ``make_plan`` and one or both
    of ``select_vision`` / ``select_decoder``."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    acts_at: ClassVar[str] = "nowhere"
    signals: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    uses_lpm: ClassVar[bool] = False  # reads PruningConfig.lpm_path (a trained pruning module)
    uses_atp: ClassVar[bool] = False  # reads PruningConfig.atp_path (trained ATP modules, ATP-LLaVA)
    # what the family adapter must provide (adapters' ``provides``), e.g. "single_grid": the candidates are one
    # raster grid; apply_pruning refuses the method on a family without it
    requires: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PruningConfig, num_vision_tokens: int, num_layers: int, vision_dim: int):
        super().__init__()
        spec = self.resolve(config)
        self.spec, self.config, self.options = spec, spec.config, spec.options
        self.vision_dim, self.num_layers = vision_dim, num_layers
        # the plan at the model's reference N (every image of LLaVA-1.5); plan_for(n) for other images
        self.plan: TokenPlan = self.image_plan(spec, num_vision_tokens, num_vision_tokens, num_layers)
        self._plans = {num_vision_tokens: self.plan}

    def plan_for(self, num_tokens: int) -> TokenPlan:
        """The plan of one image with ``num_tokens`` vision tokens (:meth:`image_plan`; cached)."""
        if num_tokens not in self._plans:
            self._plans[num_tokens] = self.image_plan(self.spec, num_tokens, self.plan.num_vision_tokens, self.num_layers)
        return self._plans[num_tokens]

    # -- the plan: class-level, so it can be computed without building the module ----------------------
    @classmethod
    def resolve(cls, config: PruningConfig) -> MethodSpec:
        """Merge ``config.options`` with the defaults; unknown or bad options raise ValueError."""
        unknown = set(config.options) - set(cls.defaults)
        if unknown:
            valid = ", ".join(sorted(cls.defaults)) or "none"
            raise ValueError(f"method {cls.name!r} has no option(s) {sorted(unknown)}; valid options: {valid}")
        options = {**cls.defaults, **config.options}
        cls.validate_options(options)
        return MethodSpec(cls.name, config, options)

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        """Raise ValueError for bad hyper-parameters."""

    @classmethod
    def make_plan(cls, spec: MethodSpec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        """The plan for an image of ``num_vision_tokens`` tokens under ``spec.config.budget`` (that image's T)."""
        raise NotImplementedError

    @classmethod
    def image_plan(cls, spec: MethodSpec, num_tokens: int, reference_tokens: int, num_layers: int) -> TokenPlan:
        """The plan of an image with ``num_tokens`` vision tokens on a model whose budgets refer to
        ``reference_tokens``: the budget is mapped by ``config.budget_scope`` (:func:`image_budget`), then
        :meth:`make_plan`; the plan records the scope."""
        config = spec.config
        budget = image_budget(config.budget, num_tokens, reference_tokens, config.budget_scope)
        if budget != config.budget:
            spec = replace(spec, config=replace(config, budget=budget))
        return replace(cls.make_plan(spec, num_tokens, num_layers), scope=config.budget_scope)

    @classmethod
    def plan_overhead_flops(cls, spec: MethodSpec, plan: TokenPlan, model_config, text_tokens: int,
                            text_after_image: int) -> float:  # fmt: skip
        """Prefill FLOPs the selection itself adds beyond the pruned model's forward (``learnpruner_ext.flops``).

        0.0 means "not modelled": only methods that override this report their scoring cost."""
        return 0.0

    @property
    def notices(self) -> list[str]:
        """Things the user should know about this instance (e.g. an untrained LPM); shown by the demo."""
        return []

    @property
    def decoder_layer(self) -> int | None:
        """Layer index ``k``: layers ``[k, L)`` see the reduced vision tokens."""
        return self.plan.layer

    @property
    def score_layer(self) -> int | None:
        """Layer whose attention scores the in-LLM selection (default: the pruning layer itself)."""
        return self.plan.layer

    @property
    def decoder_layers(self) -> tuple[int, ...]:
        """Every boundary k where the method cuts inside the LLM, ascending (one for LearnPruner, FastV, DART;
        several for methods that prune repeatedly). Each cut's selection gets ``ctx.stage_layer = k``."""
        return () if self.decoder_layer is None else (self.decoder_layer,)

    def score_layer_for(self, stage_layer: int) -> int:
        """The layer whose input scores the cut at ``stage_layer`` (default: :attr:`score_layer` for the single
        cut, the cut's own layer otherwise)."""
        return self.score_layer if stage_layer == self.decoder_layer else stage_layer

    def select_vision(self, ctx: VisionContext) -> VisionSelection | None:
        """Pick ``plan.r1`` tokens per image; None keeps all."""
        return None

    def select_decoder(self, ctx: DecoderContext) -> torch.Tensor:
        """Pick ``plan.r2`` of the ``Nv`` vision tokens: indices [B, R2] into ``ctx.vision_index``."""
        raise NotImplementedError(f"{self.name} does not prune inside the LLM")

    def overhead_flops(self, model_config, text_tokens: int, text_after_image: int) -> float:
        """:meth:`plan_overhead_flops` of this instance's plan."""
        spec = MethodSpec(self.name, self.config, self.options)
        return self.plan_overhead_flops(spec, self.plan, model_config, text_tokens, text_after_image)

    def extra_repr(self) -> str:
        return f"name={self.name}, plan={self.plan}"

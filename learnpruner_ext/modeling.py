"""LLaVA-family VLMs with pluggable visual-token pruning, built on transformers' native model classes.

Data flow (any batch size, left padding). Prompts always carry N_i ``<image>`` placeholders per image (N for
LLaVA-1.5, the processor's count for LLaVA-NeXT), whatever the method; both stages shorten the sequence with
one mechanism, a :class:`~learnpruner_ext.cut.SequenceCut` at a layer boundary during prefill:

    pixel_values -> FAMILY ADAPTER (learnpruner_ext.adapters): vision tower, image groups
         (candidate features, lazy [CLS] signals, slot layout; LLaVA-NeXT: crop-major + packing map)
      -> VISION STAGE per group (method picks plan_for(N_i).r1 candidates) -> projector on the kept tokens
      -> written into the first R1_i of the N_i placeholders of each image
      -> CUT AT BOUNDARY 0: the other placeholders leave the sequence (per sample, re-left-padded)
      -> LLM layers [0, k) see R1_i vision tokens          (learnpruner_ext.llm.PrunableLlamaModel)
      -> DECODER STAGE at layer k (method picks R2_i of them) -> CUT AT BOUNDARY k (hidden states, positions,
         RoPE, masks gathered together)
      -> LLM layers [k, L) see R2_i vision tokens, and their KV cache holds only what they saw.

The parameter names are those of ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``, so
``from_pretrained`` loads llava-hf checkpoints unchanged; pruning is attached explicitly with :func:`apply_pruning`.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, DynamicCache, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig
from transformers import LlavaNextForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava.modeling_llava import LlavaModel, LlavaModelOutputWithPast, LlavaMultiModalProjector
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
)
from transformers.models.video_llava.modeling_video_llava import (
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
    VideoLlavaModel,
    VideoLlavaModelOutputWithPast,
    VideoLlavaMultiModalProjector,
    VideoLlavaPreTrainedModel,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
)

from .adapters import ImageGroup, adapter_for, strips_cls
from .config import POSITION_MODES, PruningConfig, TokenPlan, UnsupportedMethodError, candidate_plan
from .cut import SequenceCut, SequenceState, gather_seq, right_pad
from .llm import PrunableLlamaModel, PrunableQwen2_5_VLTextModel
from .atp import shipped_atp_path
from .lpm import shipped_lpm_path
from .methods import PruningMethod, VisionContext, create_method, get_method_class
from .timing import StageTimer, section
from .vision_cache import VisionCache



@dataclass
class PruningTrace:
    """Token accounting of the last prefill: what each stage kept, per image in the batch."""

    method: str
    budget: int | None
    num_vision_tokens: int  # the model's reference N (budgets refer to it)
    r1: int  # the plan at the reference N
    r2: int | None
    layer: int | None
    convention: str
    budget_scope: str = "scaled"
    image_tokens: list[int] = field(default_factory=list)  # [B_img] N_i, placeholders of each image
    image_plans: list[dict] = field(default_factory=list)  # [B_img] {"r1", "r2"} of each image's plan
    vision_tokens_per_layer: list[int] = field(default_factory=list)  # measured per layer (max over the batch)
    vision_tokens_per_sample: list[list[int]] = field(default_factory=list)  # [B][L] measured per prompt
    stage1_index: torch.Tensor | None = None  # [B_img, R1] placeholder slots entering the LLM (-1: an empty slot)
    stage1_diverse: torch.Tensor | None = None  # [B_img, R1] bool, diversity tokens among them
    stage2_index: torch.Tensor | None = None  # [B_img, R2] slots kept from layer k on (-1: an empty slot)
    # [B_img, R1] text->vision attention the decoder stage read, per vision token in stage1_index order (NaN: none)
    stage2_scores: torch.Tensor | None = None

    @property
    def average_vision_tokens(self) -> float:
        return sum(self.vision_tokens_per_layer) / max(len(self.vision_tokens_per_layer), 1)

    def summary(self) -> dict:
        """JSON-friendly accounting (no tensors)."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, torch.Tensor) and not k.startswith("stage")}
        out["average_vision_tokens"] = self.average_vision_tokens
        return out


@dataclass
class VisionStageOutput(ModelOutput):
    """Output of the vision stage: the tokens that enter the LLM and which placeholder slots they fill."""

    pooler_output: torch.Tensor | None = None  # [B_img, R1, D] projected tokens (rows padded after R1_i)
    patch_index: torch.Tensor | None = None  # [B_img, R1] slot of each token (-1: padding)
    is_diverse: torch.Tensor | None = None  # [B_img, R1] bool or None
    num_tokens: torch.Tensor | None = None  # [B_img] N_i, placeholders of each image
    num_candidates: torch.Tensor | None = None  # [B_img] M_i <= N_i, the vision stage's candidates of each image




class PrunableVLMMixin:
    """The pruning mechanics shared by every family's model class: the vision stage over the adapter's image
    groups, the cut at boundary 0, decode positions and the trace. The LLM is a :class:`PrunableLlamaModel`."""

    def _init_pruning(self):
        self.adapter = adapter_for(self.config)
        self.pruner: PruningMethod | None = None
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last_trace: PruningTrace | None = None
        self.stage_timer: StageTimer | None = None
        self.vision_cache: VisionCache | None = None

    def set_stage_timer(self, timer: StageTimer | None) -> None:
        """Time the pruning machinery's sections (:mod:`learnpruner_ext.timing`); None switches timing off."""
        self.stage_timer = self.language_model.stage_timer = timer

    def set_vision_cache(self, cache: VisionCache | None) -> None:
        """Reuse the tower's output for inputs seen before (:mod:`learnpruner_ext.vision_cache`); None: off."""
        self.vision_cache = cache

    def _tower_groups(self, encode, *inputs) -> list[ImageGroup]:
        """``encode(self, *inputs)`` (an adapter's ``image_groups``/``video_groups``), through the vision cache
        when one is set and no gradient is recorded."""
        with section(self.stage_timer, "vision_tower"):
            if self.vision_cache is None or torch.is_grad_enabled():
                return encode(self, *inputs)
            return self.vision_cache.groups((encode.__name__, *inputs), lambda: encode(self, *inputs))

    @staticmethod
    def _check_llm(config) -> None:
        if config.text_config.model_type != "llama":
            raise NotImplementedError(
                f"pruning supports Llama-family language models (Vicuna); got {config.text_config.model_type!r}"
            )

    # -- geometry ------------------------------------------------------------------------------
    @property
    def has_cls_token(self) -> bool:
        return strips_cls(self.config)

    @property
    def num_vision_tokens(self) -> int:
        """N, the reference token count budgets refer to (every image for LLaVA-1.5; 2880 for LLaVA-NeXT)."""
        return self.adapter.reference_tokens(self.config)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders of an image that has the reference count (LLaVA-1.5: every image); per image:
        :meth:`image_token_counts`. Tokenisation never depends on the method."""
        return self.num_vision_tokens

    def image_token_counts(self, image_sizes=None, num_images: int = 1) -> list[int]:
        """N_i, the ``<image>`` placeholders of each image (``image_sizes`` [B, 2] (H, W); LLaVA-NeXT needs them)."""
        return self.adapter.image_token_counts(self, image_sizes, num_images)

    def vision_features(self, pixel_values: torch.Tensor, image_sizes=None):
        """The features the projector (and the LPM) consume: [B, N, Dv] (LLaVA-NeXT: a list of [M_i, Dv])."""
        return self.adapter.vision_features(self, pixel_values, image_sizes)

    # -- vision stage ----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, image_sizes=None, **kwargs) -> VisionStageOutput:
        """The vision stage; ``generate()`` calls it once before prefill and hands the result to ``forward``."""
        tokens, index, diverse, counts, candidates = self.encode_images(pixel_values, image_sizes)
        return VisionStageOutput(pooler_output=tokens, patch_index=index, is_diverse=diverse, num_tokens=counts,
                                 num_candidates=candidates)  # fmt: skip

    def encode_images(self, pixel_values: torch.Tensor, image_sizes=None):
        """-> (tokens [B_img, R1, D], slot index [B_img, R1] (-1: padding), is_diverse or None, N_i [B_img],
        M_i [B_img] candidates)."""
        return self._encode_groups(self._tower_groups(self.adapter.image_groups, pixel_values, image_sizes))

    def _encode_groups(self, groups: list[ImageGroup]):
        """The vision stage over the adapter's groups -> the rows of :meth:`encode_images`, in image order."""
        results = {}
        for group in groups:
            tokens, index, diverse = self._select_group(group)
            for j, image in enumerate(group.images):
                results[image] = (tokens[j], index[j], None if diverse is None else diverse[j], group.num_tokens,
                                  group.features.shape[1])  # fmt: skip
        rows = [results[i] for i in range(len(results))]
        tokens = right_pad([r[0] for r in rows], 0.0)
        index = right_pad([r[1] for r in rows], -1)
        any_diverse = any(r[2] is not None for r in rows)
        diverse = right_pad([r[2] if r[2] is not None else torch.zeros_like(r[1], dtype=torch.bool) for r in rows],
                            False) if any_diverse else None  # fmt: skip
        counts = torch.tensor([r[3] for r in rows], device=index.device)
        candidates = torch.tensor([r[4] for r in rows], device=index.device)
        return tokens, index, diverse, counts, candidates

    def _select_group(self, group: ImageGroup, plan: TokenPlan | None = None):
        """The method's choice for one image group -> (tokens [G, R, D], slots [G, R], is_diverse or None);
        ``plan`` overrides the pruner's ``plan_for(N_i)`` (the frames of a per-frame video stage)."""
        batch, n = group.features.shape[0], group.num_tokens
        pruner, timer = self.pruner, self.stage_timer

        def project(features):
            with section(timer, "projector"):
                return group.project(features)

        if pruner is None or "vision" not in pruner.acts_at or (plan or pruner.plan_for(n)).r1 >= n:
            with section(timer, "projector"):
                full = group.full_tokens()
            slots = group.slots if plan is not None else torch.arange(n, device=full.device).expand(batch, -1)
            return full, slots, None
        plan = plan or pruner.plan_for(n)
        candidates = group.features.shape[1]
        if candidates != n:  # newline / [CLS] slots are not candidates: choose among the M patch slots
            plan = replace(plan, num_vision_tokens=candidates, r1=min(plan.r1, candidates))
        if group.frames > 1 and pruner.config.video_stage1 == "per_frame":
            return self._select_frames(group, plan)
        projected = {}  # project all candidates lazily: only methods that read projected features pay for it
        if group.projected is not None:  # the tower already projected every candidate
            projected["all"] = group.projected

        def project_all():
            if "all" not in projected:
                projected["all"] = project(group.features)
            return projected["all"]

        ctx = _LazyVisionContext(
            method=pruner, features=group.features, projected=None, has_cls=group.has_cls,
            project=project,  # merging methods (VisionZip) project their own tokens
            cls_token=group.cls_token, plan=plan, importance=group.importance, key_states=group.key_states,
            timer=timer, grid=group.grid, project_all=project_all,
        )  # fmt: skip
        with section(timer, "stage1_select"):
            selection = pruner.select_vision(ctx)
        if selection is None:
            return project_all(), group.slots, None
        index = selection.index.clamp(min=0)  # -1 marks an empty slot (an image that keeps fewer than R1)
        if selection.tokens is not None:
            tokens = selection.tokens
        elif "all" in projected:
            tokens = gather_seq(projected["all"], index)
        else:
            tokens = project(gather_seq(group.features, index))
        return tokens, torch.where(selection.index >= 0, group.slots.gather(1, index), -1), selection.is_diverse

    def _select_frames(self, group: ImageGroup, plan: TokenPlan):
        """The per-frame vision stage of a video group: each frame is an image with its share of ``plan.r1``
        (``r1 // F``, the first ``r1 % F`` frames one more) -> the rows of :meth:`_select_group`, frame by frame."""
        videos, frames = group.features.shape[0], group.frames
        p = group.features.shape[1] // frames

        def per_frame(x, rows):  # [G, F*P, ...] -> [len(rows), P, ...] for rows = video * F + frame
            return x.reshape(videos * frames, p, *x.shape[2:])[rows]

        shares = [plan.r1 // frames + (f < plan.r1 % frames) for f in range(frames)]
        picked = {}  # (video, frame) -> (tokens [r, D], slots [r], is_diverse [r] or None)
        for share in sorted(set(shares)):
            chosen = [f for f in range(frames) if shares[f] == share]
            rows = (torch.arange(videos)[:, None] * frames + torch.tensor(chosen)).flatten().to(group.features.device)
            cache = {}

            def signal(name, rows=rows, cache=cache):
                if name not in cache:
                    cache[name] = per_frame(getattr(group, name)(), rows)
                return cache[name]

            sub = replace(
                group, images=rows.tolist(), num_tokens=p, features=per_frame(group.features, rows),
                slots=per_frame(group.slots[..., None], rows)[..., 0], cls_token=group.frame_cls.flatten(0, 1)[rows],
                importance=lambda signal=signal: signal("importance"), key_states=lambda signal=signal: signal("key_states"),
                full_tokens=lambda rows=rows: group.project(per_frame(group.features, rows)), frames=1, frame_cls=None,
                projected=None if group.projected is None else per_frame(group.projected, rows),
            )  # fmt: skip
            tokens, slots, diverse = self._select_group(sub, replace(plan, num_vision_tokens=p, r1=share))
            for j, row in enumerate(rows.tolist()):
                picked[divmod(row, frames)] = (tokens[j], slots[j], torch.zeros_like(slots[j], dtype=torch.bool)
                                               if diverse is None else diverse[j])  # fmt: skip
        rows = []
        for v in range(videos):  # each video's kept tokens, frame by frame, empty slots (-1) left out
            parts = [picked[v, f] for f in range(frames)]
            valid = [part[1] >= 0 for part in parts]
            rows.append([torch.cat([part[k][ok] for part, ok in zip(parts, valid)]) for k in range(3)])
        diverse = right_pad([r[2] for r in rows], False)
        return right_pad([r[0] for r in rows], 0.0), right_pad([r[1] for r in rows], -1), diverse if diverse.any() else None

    # -- forward ---------------------------------------------------------------------------------
    def set_pruner(self, pruner: PruningMethod | None) -> None:
        self.pruner = pruner
        self._states = weakref.WeakKeyDictionary()
        self.last_trace = None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        mm_encoder_outputs=None,
        **kwargs,
    ) -> LlavaModelOutputWithPast:
        if input_ids is None and inputs_embeds is None:
            raise ValueError("You must specify input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if kwargs.get("use_cache") and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)

        image_mask, image_tokens = None, None
        vision = (mm_encoder_outputs or {}).get("image")
        if vision is None and pixel_values is not None:
            vision = self.get_image_features(pixel_values, image_sizes)
        if vision is not None:
            if input_ids is None:
                raise ValueError("pass input_ids with pixel_values: image placeholders are found by token id")
            image_mask = self._placeholder_mask(input_ids)
            image_tokens, index, diverse = vision.pooler_output, vision.patch_index, vision.is_diverse
            counts = vision.num_tokens.tolist()
            with_image = self._check_placeholders(image_mask, counts)
            filled = self._filled_placeholders(image_mask, index, with_image)  # [B, S]: placeholders given a token
            kept_tokens = image_tokens[index >= 0]  # [Σ kept, D] in placeholder order
            inputs_embeds = inputs_embeds.masked_scatter(filled[..., None], kept_tokens.to(inputs_embeds.dtype))
            state = SequenceState(prefill_length=input_ids.shape[1], position_mode=self._position_mode())
            image_of = iter(range(len(counts)))
            state.plans = [self._image_plan(next(image_of), vision) if has and self.pruner is not None else None
                           for has in with_image.tolist()]  # fmt: skip
            if past_key_values is not None:
                self._states[past_key_values] = state
            if bool((image_mask & ~filled).any()):  # stage 1 dropped tokens: the cut at boundary 0
                inputs_embeds, attention_mask, position_ids, image_mask = self._vision_cut(
                    state, image_mask, filled, index, inputs_embeds, attention_mask, position_ids, past_key_values
                )
        else:
            state = self._states.get(past_key_values) if past_key_values is not None else None
            if state is not None and state.cuts:
                if attention_mask is None:  # the cuts may have padded: decoding needs the mask
                    attention_mask = state.implicit_mask(past_key_values, *inputs_embeds.shape[:2], inputs_embeds.device)
                if state.removed is not None:
                    position_ids = self._decode_positions(state, position_ids, attention_mask, inputs_embeds.shape[1])

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_mask=image_mask,
            pruner=self.pruner,
            sequence_state=state,
            **kwargs,
        )
        if vision is not None:
            self.last_trace = self._trace(state, index, diverse, counts, with_image)
        return LlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_tokens,
        )

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] bool, the vision placeholders (``<image>``; Video-LLaVA: ``<image>`` or ``<video>``)."""
        return input_ids == self.config.image_token_id

    def _image_plan(self, image: int, vision: VisionStageOutput) -> TokenPlan:
        """The pruner's plan of one image: ``plan_for(N_i)``, capped at its M_i candidates (``candidate_plan``)."""
        plan = self.pruner.plan_for(int(vision.num_tokens[image]))
        if vision.num_candidates is None:
            return plan
        return candidate_plan(plan, int(vision.num_candidates[image]))

    def _position_mode(self) -> str:
        return self.pruner.config.position_mode if self.pruner is not None else "contiguous"

    def _check_placeholders(self, image_mask: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """-> [B] bool, the prompts that hold an image; raises unless image i has exactly N_i placeholders."""
        per_sample = image_mask.sum(-1)
        with_image = per_sample > 0
        if per_sample[with_image].tolist() != counts:
            raise ValueError(
                f"each prompt needs exactly one image expanded to its N_i <image> placeholder tokens (the vision "
                f"tokens, whatever the pruning method): the images need {counts}, the prompts hold "
                f"{per_sample.tolist()}; tokenize with llava.mm_utils.tokenizer_image_token(..., num_image_tokens=N_i) "
                "with N_i from model.image_token_counts(image_sizes)"
            )
        return with_image

    @staticmethod
    def _filled_placeholders(image_mask: torch.Tensor, index: torch.Tensor, with_image: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: placeholder slot j of an image is filled when the vision stage kept a token for it
        (``index[:, j] >= 0``; the kept tokens go into the first R1_i slots, in the order the method gave)."""
        rank = (image_mask.long().cumsum(-1) - 1).clamp(min=0)  # slot number of each placeholder in its image
        width = int(rank.max()) + 1
        slot_kept = F.pad(index >= 0, (0, max(0, width - index.shape[1])), value=False)  # [B_img, >= max N_i]
        filled = torch.zeros_like(image_mask)
        filled[with_image] = slot_kept.gather(1, rank[with_image]) & image_mask[with_image]
        return filled

    def _vision_cut(self, state, image_mask, filled, index, inputs_embeds, attention_mask, position_ids, past_key_values):
        """The cut at boundary 0: drop the placeholders the vision stage left empty (and the left padding),
        re-left-pad, and give positions by the pruner's mode (SPEC §1):

        * ``contiguous``: kept tokens are numbered consecutively (as if the prompt had R1 placeholders);
        * ``original``: every kept token keeps its unpruned position (vision token -> its patch's position).
        """
        batch, seq = image_mask.shape
        valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        keep = ~(image_mask & ~filled) if valid is None else valid & ~(image_mask & ~filled)
        cut = SequenceCut.from_keep(0, keep)
        new_mask = cut.mask(attention_mask)
        state.removed = (image_mask & ~filled).sum(-1)
        if state.position_mode == "original":
            if position_ids is None:
                position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0) if valid is not None
                                else torch.arange(seq, device=image_mask.device).expand(batch, -1))  # fmt: skip
            position_ids = cut.gather_positions(self._source_positions(position_ids, image_mask, filled, index))
        else:  # numbered within each row's kept tokens (also without given positions: the cut may have padded)
            position_ids = (new_mask.cumsum(-1) - 1).clamp(min=0)
        if past_key_values is not None:
            state.cuts.append(cut)
        mask = new_mask if attention_mask is not None or not bool(cut.valid.all()) else None  # ragged: new padding
        return cut.gather(inputs_embeds), mask, position_ids, cut.gather(image_mask) & cut.valid

    @staticmethod
    def _source_positions(position_ids, image_mask, filled, index) -> torch.Tensor:
        """Unpruned positions ([B, S] or M-RoPE [3, B, S]) with each filled placeholder given the position of the
        placeholder its token came from: slot j of an image holds the token of slot ``index[j]``."""
        batch, seq = image_mask.shape
        source = torch.arange(seq, device=image_mask.device).expand(batch, -1).clone()  # [B, S] column -> source
        with_image = image_mask.any(-1)
        columns = right_pad([row.nonzero()[:, 0] for row in image_mask[with_image]], 0)  # [B_img, N_i] slot -> column
        source[filled] = columns.gather(1, index.clamp(min=0))[index >= 0]  # row-major order of both
        if position_ids.dim() == 3:
            return position_ids.expand(-1, batch, -1).gather(2, source[None].expand(position_ids.shape[0], -1, -1))
        return position_ids.expand(batch, -1).gather(1, source)

    @staticmethod
    def _decode_positions(state: SequenceState, position_ids, attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
        """Decode positions after a boundary-0 cut. ``generate()`` numbers new tokens from the unpruned prompt
        length: right for ``original`` positions, ``removed`` too far for ``contiguous``. Without given
        positions, each prompt's kept columns are counted (``contiguous``), plus ``removed`` (``original``)."""
        if position_ids is None:
            kept = state.decode_masks(attention_mask)[0]  # [B, kept prefill columns + later columns]
            position_ids = (kept.cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            return position_ids + state.removed[:, None] if state.position_mode == "original" else position_ids
        return position_ids - state.removed[:, None] if state.position_mode == "contiguous" else position_ids

    def _trace(self, state: SequenceState, index, diverse, counts: list[int], with_image) -> PruningTrace:
        pruner, n = self.pruner, self.num_vision_tokens
        plan = pruner.plan if pruner is not None else None
        stage2 = None
        if state.stage2_vision_keep is not None:
            keep = state.stage2_vision_keep[with_image]  # [B_img, R2] into each image's R1 kept tokens
            stage2 = torch.where(keep >= 0, index.gather(1, keep.clamp(min=0)), -1)
        scores = state.stage2_scores[with_image] if state.stage2_scores is not None else None
        per_sample = state.vision_tokens_per_layer  # [B][L]
        plans = [p for p in state.plans if p is not None]
        return PruningTrace(
            method=pruner.name if pruner is not None else "none",
            budget=pruner.config.budget if pruner is not None else None,
            num_vision_tokens=n,
            r1=plan.r1 if plan else n,
            r2=plan.r2 if plan else None,
            layer=plan.layer if plan else None,
            convention=plan.convention if plan else "average",
            budget_scope=plan.scope if plan else "scaled",
            image_tokens=counts,
            image_plans=[{"r1": p.r1, "r2": p.r2} for p in plans] if plans else [{"r1": c, "r2": None} for c in counts],
            vision_tokens_per_layer=[max(layer) for layer in zip(*per_sample)] if per_sample else [],
            vision_tokens_per_sample=per_sample,
            stage1_index=index,
            stage1_diverse=diverse,
            stage2_index=stage2,
            stage2_scores=scores,
        )


@dataclass
class _LazyVisionContext(VisionContext):
    project_all: object = None

    @property
    def projected_features(self) -> torch.Tensor:  # type: ignore[override]
        self._check("projected_features")
        return self.project_all()


class PrunableLlavaModel(PrunableVLMMixin, LlavaModel):
    """``LlavaModel`` (LLaVA-1.5) with a vision stage after the encoder and a decoder stage inside the LLM."""

    def __init__(self, config: LlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self._check_llm(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = PrunableLlamaModel(config.text_config)
        self._init_pruning()
        self.post_init()

    def forward(self, *args, image_sizes=None, **kwargs):
        if image_sizes is not None:
            raise NotImplementedError("image_sizes (LLaVA-NeXT tiling) needs a llava_next checkpoint, not a llava one")
        return super().forward(*args, **kwargs)


class PrunableLlavaNextModel(PrunableVLMMixin, LlavaNextModel):
    """``LlavaNextModel`` (LLaVA-NeXT, anyres) with the same two stages; the vision stage scores crop-major
    features and maps the kept ones through the packing map (:mod:`learnpruner_ext.adapters.llava_next`)."""

    def __init__(self, config: LlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self._check_llm(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = PrunableLlamaModel(config.text_config)
        self._init_pruning()
        self.post_init()


class PrunableQwen2_5_VLModel(PrunableVLMMixin, Qwen2_5_VLModel):
    """``Qwen2_5_VLModel`` with the same two stages. M-RoPE positions are computed by transformers'
    ``get_rope_index`` on the full prompt (all N_i placeholders) before the vision stage; the boundary-0 cut then
    gathers all three rows, so every kept token keeps its own (t, h, w) position (the adapter allows only
    ``position_mode="original"``), and decoding continues from the unpruned length through ``rope_deltas``."""

    def __init__(self, config: Qwen2_5_VLConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.language_model = PrunableQwen2_5_VLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self._init_pruning()
        self.post_init()

    @property
    def has_cls_token(self) -> bool:
        return False

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw=None, **kwargs) -> VisionStageOutput:
        return PrunableVLMMixin.get_image_features(self, pixel_values, image_grid_thw)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None, mm_encoder_outputs=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, **kwargs):  # fmt: skip
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise NotImplementedError("Qwen2.5-VL video inputs are not supported by the pruning model yet; pass images")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        vision = (mm_encoder_outputs or {}).get("image")
        if vision is None and pixel_values is not None:
            vision = self.get_image_features(pixel_values, image_grid_thw)
        if position_ids is None:
            mask = attention_mask
            state = self._states.get(past_key_values) if past_key_values is not None and vision is None else None
            if mask is None and state is not None and state.cuts:  # decoding after a cut: the unpruned length
                mask = state.implicit_mask(past_key_values, *inputs_embeds.shape[:2], inputs_embeds.device)
            if mm_token_type_ids is None and input_ids is not None and image_grid_thw is not None:
                mm_token_type_ids = (input_ids == self.config.image_token_id).int()  # 1 = image, as the processor marks
            position_ids = self.compute_3d_position_ids(
                input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=None, inputs_embeds=inputs_embeds,
                attention_mask=mask, past_key_values=past_key_values, mm_token_type_ids=mm_token_type_ids,
            )  # fmt: skip
            if position_ids is not None:  # decoding from a mask: transformers numbers every column; keep the new ones
                position_ids = position_ids[..., -inputs_embeds.shape[1] :]
        return PrunableVLMMixin.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            mm_encoder_outputs=None if vision is None else {"image": vision}, **kwargs,
        )  # fmt: skip


class PrunableVideoLlavaModel(PrunableVLMMixin, VideoLlavaModel):
    """``VideoLlavaModel`` with the same two stages over images (``image_tower``) and videos (``video_tower``,
    F x 257 tokens each, :mod:`learnpruner_ext.adapters.video_llava`). A prompt holds one image or one video; a
    batch may mix both, and the decoder stage sees both placeholder kinds as vision tokens."""

    def __init__(self, config: VideoLlavaConfig):
        VideoLlavaPreTrainedModel.__init__(self, config)
        self._check_llm(config)
        self.video_tower = AutoModel.from_config(config.vision_config)
        self.image_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = VideoLlavaMultiModalProjector(config)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = PrunableLlamaModel(config.text_config)
        self._init_pruning()
        self.post_init()

    @property
    def num_image_tokens(self) -> int:
        """Placeholders of an image (P, the image tower's patches); budgets refer to a video's F x P."""
        return self.image_token_counts(num_images=1)[0]

    def video_token_counts(self, num_frames: list[int]) -> list[int]:
        """N_i, the ``<video>`` placeholders of each video of ``num_frames[i]`` frames."""
        return self.adapter.video_token_counts(self, num_frames)

    def get_video_features(self, pixel_values_videos: torch.Tensor, **kwargs) -> VisionStageOutput:
        """The vision stage on videos [B, F, 3, H, W]; ``generate()`` calls it before prefill, as for images."""
        groups = self._tower_groups(self.adapter.video_groups, pixel_values_videos)
        tokens, index, diverse, counts, candidates = self._encode_groups(groups)
        return VisionStageOutput(pooler_output=tokens, patch_index=index, is_diverse=diverse, num_tokens=counts,
                                 num_candidates=candidates)  # fmt: skip

    def _placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def forward(self, input_ids=None, pixel_values=None, pixel_values_videos=None, mm_encoder_outputs=None, **kwargs):
        outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and outputs.get("image") is None:
            outputs["image"] = self.get_image_features(pixel_values)
        if pixel_values_videos is not None and outputs.get("video") is None:
            outputs["video"] = self.get_video_features(pixel_values_videos)
        vision = None
        if outputs.get("image") is not None or outputs.get("video") is not None:
            if input_ids is None:
                raise ValueError("pass input_ids with pixel_values/pixel_values_videos: placeholders are found by token id")
            vision = _in_prompt_order(outputs.get("image"), outputs.get("video"),
                                      (input_ids == self.config.video_token_id).any(-1)[self._placeholder_mask(input_ids).any(-1)])  # fmt: skip
        out = PrunableVLMMixin.forward(self, input_ids=input_ids, mm_encoder_outputs=None if vision is None else {"image": vision},
                                       **kwargs)  # fmt: skip
        return VideoLlavaModelOutputWithPast(**out, video_hidden_states=None)  # the pruned tokens are in image_hidden_states


def _in_prompt_order(images: VisionStageOutput | None, videos: VisionStageOutput | None,
                     is_video: torch.Tensor) -> VisionStageOutput:  # fmt: skip
    """The rows of the image and the video vision outputs interleaved as the prompts hold them (``is_video``
    [B_vis] bool, one entry per prompt with a placeholder)."""
    sources = {False: images, True: videos}
    taken = {False: 0, True: 0}
    rows = []
    for kind in is_video.tolist():
        if sources[kind] is None:
            raise ValueError(f"a prompt holds <{'video' if kind else 'image'}> placeholders but no "
                             f"{'pixel_values_videos' if kind else 'pixel_values'} were given")  # fmt: skip
        rows.append((sources[kind], taken[kind]))
        taken[kind] += 1
    for kind, source in sources.items():
        if source is not None and taken[kind] != len(source.num_tokens):
            raise ValueError(f"{len(source.num_tokens)} {'videos' if kind else 'images'} for {taken[kind]} prompts "
                             f"holding <{'video' if kind else 'image'}>; give one per prompt")  # fmt: skip
    if all(kind == is_video[0].item() for kind in is_video.tolist()):  # one kind: the rows as they are
        return sources[bool(is_video[0])]
    device = rows[0][0].patch_index.device
    diverse = [s.is_diverse[i] if s.is_diverse is not None else torch.zeros_like(s.patch_index[i], dtype=torch.bool)
               for s, i in rows]  # fmt: skip
    any_diverse = any(s.is_diverse is not None for s in sources.values() if s is not None)
    return VisionStageOutput(
        pooler_output=right_pad([s.pooler_output[i] for s, i in rows], 0.0),
        patch_index=right_pad([s.patch_index[i] for s, i in rows], -1),
        is_diverse=right_pad(diverse, False) if any_diverse else None,
        num_tokens=torch.stack([s.num_tokens[i] for s, i in rows]).to(device),
        num_candidates=torch.stack([s.num_candidates[i] for s, i in rows]).to(device),
    )


class _PrunableForConditionalGeneration:
    """What both families' generation classes add to transformers' (standard ``generate()`` types): the prunable
    inner model (``_inner_class``) under transformers' own parameter names."""

    _pretrained_class: type
    _inner_class: type

    def __init__(self, config):
        self._pretrained_class.__init__(self, config)
        self.model = self._inner_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def num_image_tokens(self) -> int:
        return self.model.num_image_tokens

    @property
    def num_vision_tokens(self) -> int:
        return self.model.num_vision_tokens

    @property
    def family(self) -> str:
        return self.model.adapter.family

    def image_token_counts(self, image_sizes=None, num_images: int = 1) -> list[int]:
        return self.model.image_token_counts(image_sizes, num_images)

    @property
    def pruner(self) -> PruningMethod | None:
        return self.model.pruner

    def last_pruning_trace(self) -> PruningTrace | None:
        """Accounting of the most recent prefill (R1, R2, tokens per layer, kept patches)."""
        return self.model.last_trace


class PrunableLlavaForConditionalGeneration(_PrunableForConditionalGeneration, LlavaForConditionalGeneration):
    """Drop-in ``LlavaForConditionalGeneration``."""

    _pretrained_class, _inner_class = LlavaPreTrainedModel, PrunableLlavaModel


class PrunableLlavaNextForConditionalGeneration(_PrunableForConditionalGeneration, LlavaNextForConditionalGeneration):
    """Drop-in ``LlavaNextForConditionalGeneration``."""

    _pretrained_class, _inner_class = LlavaNextPreTrainedModel, PrunableLlavaNextModel


class PrunableQwen2_5_VLForConditionalGeneration(_PrunableForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
    """Drop-in ``Qwen2_5_VLForConditionalGeneration``."""

    _pretrained_class, _inner_class = Qwen2_5_VLPreTrainedModel, PrunableQwen2_5_VLModel


class PrunableVideoLlavaForConditionalGeneration(_PrunableForConditionalGeneration, VideoLlavaForConditionalGeneration):
    """Drop-in ``VideoLlavaForConditionalGeneration``."""

    _pretrained_class, _inner_class = VideoLlavaPreTrainedModel, PrunableVideoLlavaModel

    def video_token_counts(self, num_frames: list[int]) -> list[int]:
        return self.model.video_token_counts(num_frames)


PRUNABLE_MODELS = (PrunableLlavaForConditionalGeneration, PrunableLlavaNextForConditionalGeneration,
                   PrunableQwen2_5_VLForConditionalGeneration, PrunableVideoLlavaForConditionalGeneration)  # fmt: skip


def with_shipped_lpm(config: PruningConfig, model_dir) -> PruningConfig:
    """``config`` with ``lpm_path`` = the checkpoint's own LPM (``<model_dir>/lpm``) when its method uses an LPM
    and none is given, and likewise ``atp_path`` = ``<model_dir>/atp`` for ATP: what :func:`apply_pruning` attaches
    (so a run's identity can be known without a model)."""
    method = get_method_class(config.method)
    if method.uses_lpm and not config.lpm_path:
        shipped = shipped_lpm_path(model_dir)
        if shipped:
            return replace(config, lpm_path=shipped)
    if method.uses_atp and not config.atp_path:
        shipped = shipped_atp_path(model_dir)
        if shipped:
            return replace(config, atp_path=shipped)
    return config


def apply_pruning(model, config: PruningConfig) -> PruningMethod:
    """Attach the method described by ``config`` to ``model`` (replacing any previous one).

    LearnPruner without ``config.lpm_path`` uses the LPM shipped with the checkpoint, ``<model folder>/lpm/``
    (as the built-in toy default ``checkpoints/toy-llava`` does), when there is one; ATP without
    ``config.atp_path`` likewise uses ``<model folder>/atp/``.
    """
    if not isinstance(model, PRUNABLE_MODELS):
        raise TypeError(
            f"apply_pruning needs a Prunable{{Llava,LlavaNext}}ForConditionalGeneration, got {type(model).__name__}; "
            "load the checkpoint with llava.model.builder.load_pretrained_model or the Prunable class's from_pretrained"
        )
    method_class, adapter = get_method_class(config.method), model.model.adapter
    missing = [need for need in method_class.requires if need not in adapter.provides]
    if missing:
        raise UnsupportedMethodError(f"method {config.method!r} needs {', '.join(missing)}, which {adapter.family} images do not "
                         "have (their tokens are not one fixed raster grid); choose another method")  # fmt: skip
    modes = getattr(adapter, "position_modes", POSITION_MODES)
    if config.position_mode not in modes and method_class.acts_at != "nowhere":
        raise UnsupportedMethodError(f"position_mode {config.position_mode!r} is not defined for {adapter.family} (its M-RoPE "
                         f"positions stay with their tokens); pass --position-mode {' or '.join(modes)}")  # fmt: skip
    resolved = with_shipped_lpm(config, getattr(model.config, "_name_or_path", None))
    if resolved.lpm_path != config.lpm_path:
        logging.getLogger(__name__).warning("learnpruner: no --lpm-path given; using the checkpoint's LPM %s",
                                            resolved.lpm_path)  # fmt: skip
    if resolved.atp_path != config.atp_path:
        logging.getLogger(__name__).warning("atp: no --atp-path given; using the checkpoint's ATP modules %s",
                                            resolved.atp_path)  # fmt: skip
    config = resolved
    method = create_method(
        config,
        num_vision_tokens=model.num_vision_tokens,
        num_layers=model.config.text_config.num_hidden_layers,
        vision_dim=adapter.feature_dim(model.config),
    )
    method.to(model.device)
    model.model.set_pruner(method)
    return method

"""LLaVA with pluggable visual-token pruning, built on transformers' native LLaVA classes.

Data flow (one image per prompt, any batch size, left padding). Prompts always carry N ``<image>``
placeholders per image, whatever the method; both stages shorten the sequence with one mechanism, a
:class:`SequenceCut` at a layer boundary during prefill:

    pixel_values -> vision tower -> feature layer [B, N, Dv] -> VISION STAGE (method picks R1 indices)
      -> projector on the kept tokens [B, R1, D] -> written into the first R1 of the N placeholders
      -> CUT AT BOUNDARY 0: the other N - R1 placeholders leave the sequence (per sample, re-left-padded)
      -> LLM layers [0, k) see R1 vision tokens
      -> DECODER STAGE at layer k (method picks R2 of them) -> CUT AT BOUNDARY k (hidden states, positions,
         RoPE, masks gathered together)
      -> LLM layers [k, L) see R2 vision tokens, and their KV cache holds only what they saw.

A cut keeps a per-sample set of positions (counts may differ between samples) and records what decoding
needs: the kept columns of the prefill mask, per cache object.

The parameter names are those of ``LlavaForConditionalGeneration``, so ``from_pretrained`` loads
llava-hf checkpoints unchanged; pruning is attached explicitly with :func:`apply_pruning`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import AutoModel, DynamicCache, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.llava.modeling_llava import (
    LlavaModel,
    LlavaModelOutputWithPast,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .config import PruningConfig
from .lpm import shipped_lpm_path
from .methods import DecoderContext, PruningMethod, VisionContext, create_method, get_method_class


@dataclass
class PruningTrace:
    """Token accounting of the last prefill: what each stage kept, per image in the batch."""

    method: str
    budget: int | None
    num_vision_tokens: int
    r1: int
    r2: int | None
    layer: int | None
    convention: str
    vision_tokens_per_layer: list[int] = field(default_factory=list)  # measured per layer (max over the batch)
    vision_tokens_per_sample: list[list[int]] = field(default_factory=list)  # [B][L] measured per prompt
    stage1_index: torch.Tensor | None = None  # [B, R1] patch indices entering the LLM (-1: an empty slot)
    stage1_diverse: torch.Tensor | None = None  # [B, R1] bool, diversity tokens among them
    stage2_index: torch.Tensor | None = None  # [B, R2] patch indices kept from layer k on (-1: an empty slot)

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
    """Output of the vision stage: the tokens that enter the LLM and which patches they came from."""

    pooler_output: torch.Tensor | None = None  # [B, R1, D] projected tokens
    patch_index: torch.Tensor | None = None  # [B, R1] patch indices
    is_diverse: torch.Tensor | None = None  # [B, R1] bool or None


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B or 1, S, ...] gathered along dim 1 with index [B, S'] -> [B, S', ...]."""
    x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


@dataclass
class SequenceCut:
    """Shortening of a batch at a layer boundary: layers ``>= boundary`` see only the kept positions.

    Each sample keeps its own set of positions (possibly of different sizes); the kept positions are
    re-left-padded to the longest, so ``index`` [B, S'] holds, per row, ``S' - len`` padding slots (pointing at
    position 0, ``valid`` False) followed by the kept positions in order.
    """

    boundary: int
    index: torch.Tensor  # [B, S'] positions in the sequence before the cut
    valid: torch.Tensor  # [B, S'] bool, False on the new left padding

    @classmethod
    def from_keep(cls, boundary: int, keep: torch.Tensor) -> "SequenceCut":
        """keep [B, S] bool -> the cut that keeps those positions of every row."""
        batch, seq = keep.shape
        lengths = keep.sum(-1)
        width = int(lengths.max()) if batch else 0
        slot = keep.long().cumsum(-1) - 1 + (width - lengths)[:, None]  # right-aligned slot of each kept position
        slot = torch.where(keep, slot, torch.full_like(slot, width))  # dropped positions go to a spare column
        index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
        index.scatter_(1, slot, torch.arange(seq, device=keep.device).expand(batch, -1))
        valid = torch.arange(width, device=keep.device)[None] >= (width - lengths)[:, None]
        return cls(boundary, index[:, :width], valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B or 1, S, ...] -> [B, S', ...] (padding slots hold row position 0: finite, always masked)."""
        return _gather_seq(x, self.index)

    def mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The 2D padding mask after the cut: the kept columns of ``attention_mask``, 0 on the new padding."""
        kept = self.valid if attention_mask is None else self.gather(attention_mask).bool() & self.valid
        return kept.long()


@dataclass
class _SequenceState:
    """What a cached generation must remember between forward calls (kept per cache object)."""

    cuts: list[SequenceCut] = field(default_factory=list)  # the prefill's cuts, in boundary order
    prefill_length: int = 0  # S before any cut: the prefill columns of the 2D mask generate() keeps growing
    removed: torch.Tensor | None = None  # [B] placeholders the boundary-0 cut dropped per sample
    position_mode: str = "contiguous"
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L], measured
    stage2_vision_keep: torch.Tensor | None = None  # [B, R2] indices into the R1 vision tokens (-1: not kept)

    def decode_masks(self, attention_mask: torch.Tensor | None) -> dict[int, torch.Tensor | None]:
        """{boundary: the 2D mask layers >= boundary need while decoding}: the kept prefill columns, then every
        later column (the tokens generated since prefill)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return {cut.boundary: attention_mask for cut in self.cuts}
        prefill, later = attention_mask[:, : self.prefill_length], attention_mask[:, self.prefill_length :]
        out = {}
        for cut in self.cuts:
            prefill = cut.mask(prefill)
            out[cut.boundary] = torch.cat([prefill, later], dim=1)
        return out


class PrunableLlamaModel(LlamaModel):
    """``LlamaModel`` whose layer loop can run a method's decoder stage at layer ``k``."""

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        vision_mask: torch.Tensor | None = None,
        pruner: PruningMethod | None = None,
        sequence_state: _SequenceState | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]

        state = sequence_state
        prefill = vision_mask is not None and bool(vision_mask.any())
        decode_masks = state.decode_masks(attention_mask) if state is not None and not prefill and state.cuts else {}
        if 0 in decode_masks:  # the boundary-0 cut shortened the cached prefill: every layer sees its columns
            attention_mask = decode_masks[0]
        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids if not decode_masks else None,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        stage_layer = pruner.decoder_layer if pruner is not None else None
        counts = vision_mask.sum(-1) if prefill else None  # [B] vision tokens each sample has in this layer
        per_layer, score_input = [], None
        for idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if stage_layer is not None and prefill and idx == pruner.score_layer:
                score_input = hidden_states
            if prefill and idx == stage_layer and int(counts.max()) > 0:
                cut = self._decoder_cut(pruner, idx, score_input, hidden_states, attention_mask, vision_mask,
                                        position_embeddings, past_key_values, state)  # fmt: skip
                if cut is not None:
                    cos, sin = position_embeddings
                    hidden_states, position_ids = cut.gather(hidden_states), cut.gather(position_ids)
                    position_embeddings = (cut.gather(cos), cut.gather(sin))
                    attention_mask, vision_mask = cut.mask(attention_mask), cut.gather(vision_mask) & cut.valid
                    counts = vision_mask.sum(-1)
                    causal_mask = create_causal_mask(
                        self.config, hidden_states, attention_mask, past_key_values, position_ids=None, layer_idx=idx
                    )
            elif idx in decode_masks and idx > 0:
                causal_mask = create_causal_mask(
                    self.config, hidden_states, decode_masks[idx], past_key_values, position_ids=None, layer_idx=idx
                )
            if prefill:
                per_layer.append(counts)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        if prefill and state is not None:
            state.vision_tokens_per_layer = torch.stack(per_layer, dim=1).tolist()
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _decoder_cut(self, pruner, idx, score_input, hidden_states, attention_mask, vision_mask, position_embeddings,
                     past_key_values, state) -> SequenceCut | None:  # fmt: skip
        """Decoder stage at layer ``idx``: the method scores and picks vision tokens; -> the cut that keeps them
        (None when every sample keeps all of its vision tokens)."""
        batch = vision_mask.shape[0]
        per_sample = vision_mask.sum(-1)
        if bool((per_sample != per_sample[0]).any()):
            raise ValueError(
                "in-LLM pruning needs the same number of vision tokens in every prompt of a batch "
                f"(got {per_sample.tolist()}); batch text-only prompts separately"
            )
        if past_key_values is not None and past_key_values.get_seq_length(idx) > 0:
            raise ValueError("in-LLM pruning runs at prefill and needs an empty KV cache for this prompt")
        num_vision = int(per_sample[0])
        if pruner.plan.r2 >= num_vision:
            return None
        vision_index = vision_mask.nonzero()[:, 1].view(batch, num_vision)
        key_valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        ctx = DecoderContext(
            pruner, self.layers[pruner.score_layer], score_input, position_embeddings, vision_index, key_valid,
            extras={"stage_input": hidden_states, "final_norm": self.norm},  # layer k's input (DART)
        )  # fmt: skip
        keep_vision = pruner.select_decoder(ctx)  # [B, R2] into the Nv vision tokens; -1 = an empty slot
        keep = ~vision_mask if key_valid is None else key_valid & ~vision_mask
        rows = torch.arange(batch, device=keep.device)[:, None].expand_as(keep_vision)
        chosen = keep_vision >= 0
        keep[rows[chosen], vision_index.gather(1, keep_vision.clamp(min=0))[chosen]] = True
        cut = SequenceCut.from_keep(idx, keep)
        if state is not None:
            state.stage2_vision_keep = keep_vision
            if past_key_values is not None:
                state.cuts.append(cut)
        return cut


class PrunableLlavaModel(LlavaModel):
    """``LlavaModel`` with a vision stage after the encoder and a decoder stage inside the LLM."""

    def __init__(self, config: LlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        if config.text_config.model_type != "llama":
            raise NotImplementedError(
                f"pruning supports Llama-family language models (LLaVA-1.5/Vicuna); got {config.text_config.model_type!r}"
            )
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = PrunableLlamaModel(config.text_config)
        self.pruner: PruningMethod | None = None
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.last_trace: PruningTrace | None = None
        self.post_init()

    # -- geometry ------------------------------------------------------------------------------
    @property
    def has_cls_token(self) -> bool:
        return self.config.vision_config.model_type in ("clip_vision_model", "clip")

    @property
    def num_vision_tokens(self) -> int:
        """N: tokens per image that reach the projector (patch tokens; [CLS] dropped by strategy 'default')."""
        vc = self.config.vision_config
        grid = (vc.image_size // vc.patch_size) ** 2
        if self.has_cls_token and self.config.vision_feature_select_strategy != "default":
            raise NotImplementedError("pruning needs vision_feature_select_strategy='default' for CLIP towers")
        return grid

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens each ``<image>`` expands to: always N, whatever the pruner (tokenisation does not
        depend on the method; the vision stage's cut at boundary 0 drops the placeholders it does not fill)."""
        return self.num_vision_tokens

    def _encoder_layers(self):
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    # -- vision stage ----------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> VisionStageOutput:
        """The vision stage; ``generate()`` calls it once before prefill and hands the result to ``forward``."""
        tokens, index, diverse = self.encode_images(pixel_values)
        return VisionStageOutput(pooler_output=tokens, patch_index=index, is_diverse=diverse)

    def _vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], int, torch.Tensor]:
        """-> (every encoder hidden state, index of the feature layer, patch features [B, N, Dv])."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("pruning supports a single vision_feature_layer")
        tower_dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(tower_dtype), output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states  # embeddings, then the output of every encoder layer
        feature_idx = layer % len(hidden)
        features = hidden[feature_idx]
        return hidden, feature_idx, features[:, 1:] if self.has_cls_token else features

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features the projector (and the LPM) consume: [B, N, Dv] patch tokens of the feature layer."""
        return self._vision_hidden_states(pixel_values)[2]

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """pixel_values [B, 3, H, W] -> (tokens [B, R1, D], patch index [B, R1], is_diverse [B, R1] or None)."""
        hidden, feature_idx, patches = self._vision_hidden_states(pixel_values)  # patches [B, N, Dv]
        batch, n = patches.shape[:2]
        all_index = torch.arange(n, device=patches.device).expand(batch, -1)
        pruner = self.pruner
        if pruner is None or "vision" not in pruner.acts_at:
            return self.multi_modal_projector(patches), all_index, None

        projected = {}  # project all N lazily: only methods that read projected features pay for it

        def project_all():
            if "all" not in projected:
                projected["all"] = self.multi_modal_projector(patches)
            return projected["all"]

        ctx = _LazyVisionContext(
            method=pruner,
            features=patches,
            projected=None,
            encoder_layer=self._encoder_layers()[feature_idx - 1],
            encoder_layer_input=hidden[feature_idx - 1],
            has_cls=self.has_cls_token,
            project=self.multi_modal_projector,  # merging methods (VisionZip) project their own tokens
            cls_token=hidden[feature_idx][:, 0] if self.has_cls_token else None,
            project_all=project_all,
        )
        selection = pruner.select_vision(ctx)
        if selection is None:
            return project_all(), all_index, None
        if selection.tokens is not None:
            tokens = selection.tokens
        elif "all" in projected:
            tokens = _gather_seq(projected["all"], selection.index)
        else:
            tokens = self.multi_modal_projector(_gather_seq(patches, selection.index))
        return tokens, selection.index, selection.is_diverse

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
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if image_sizes is not None:
            raise NotImplementedError("image_sizes (LLaVA-NeXT tiling) is not supported by this model class")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if kwargs.get("use_cache") and past_key_values is None:
            past_key_values = DynamicCache(config=self.config.text_config)

        image_mask, image_tokens = None, None
        vision = (mm_encoder_outputs or {}).get("image")
        if vision is None and pixel_values is not None:
            vision = self.get_image_features(pixel_values)
        if vision is not None:
            if input_ids is None:
                raise ValueError("pass input_ids with pixel_values: image placeholders are found by token id")
            image_mask = input_ids == self.config.image_token_id
            image_tokens, index, diverse = vision.pooler_output, vision.patch_index, vision.is_diverse
            self._check_placeholders(image_mask, image_tokens)
            filled = self._filled_placeholders(image_mask, index)  # [B, S]: placeholders that get a kept token
            kept_tokens = image_tokens[index >= 0]  # [Σ kept, D] in placeholder order
            inputs_embeds = inputs_embeds.masked_scatter(filled[..., None], kept_tokens.to(inputs_embeds.dtype))
            state = _SequenceState(prefill_length=input_ids.shape[1], position_mode=self._position_mode())
            if past_key_values is not None:
                self._states[past_key_values] = state
            if bool((image_mask & ~filled).any()):  # stage 1 dropped tokens: the cut at boundary 0
                inputs_embeds, attention_mask, position_ids, image_mask = self._vision_cut(
                    state, image_mask, filled, index, inputs_embeds, attention_mask, position_ids, past_key_values
                )
        else:
            state = self._states.get(past_key_values) if past_key_values is not None else None
            if state is not None and state.removed is not None:
                position_ids = self._decode_positions(state, position_ids, inputs_embeds, past_key_values)

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
            self.last_trace = self._trace(state, index, diverse)
        return LlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_tokens,
        )

    def _position_mode(self) -> str:
        return self.pruner.config.position_mode if self.pruner is not None else "contiguous"

    def _check_placeholders(self, image_mask: torch.Tensor, image_tokens: torch.Tensor) -> None:
        per_sample = image_mask.sum(-1)
        with_image = per_sample > 0
        expected = self.num_vision_tokens
        if int(with_image.sum()) != image_tokens.shape[0] or bool((per_sample[with_image] != expected).any()):
            raise ValueError(
                f"each prompt needs exactly one image expanded to {expected} <image> placeholder tokens (the N "
                f"vision tokens, whatever the pruning method; got {per_sample.tolist()} placeholders for "
                f"{image_tokens.shape[0]} images); tokenize with llava.mm_utils.tokenizer_image_token(..., "
                "num_image_tokens=model.num_image_tokens)"
            )

    def _filled_placeholders(self, image_mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """[B, S] bool: placeholder slot j of an image is filled when the vision stage kept a token for it
        (``index[:, j] >= 0``; the kept tokens go into the first R1 slots, in the order the method gave)."""
        rank = (image_mask.long().cumsum(-1) - 1).clamp(min=0)  # slot number of each placeholder in its image
        rows = image_mask.any(-1)
        slot_kept = F.pad(index >= 0, (0, self.num_vision_tokens - index.shape[1]), value=False)  # [B_img, N]
        filled = torch.zeros_like(image_mask)
        filled[rows] = slot_kept.gather(1, rank[rows].clamp(max=self.num_vision_tokens - 1)) & image_mask[rows]
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
            offset = torch.zeros(batch, seq, dtype=torch.long, device=image_mask.device)
            shift = index - torch.arange(index.shape[1], device=index.device)  # patch index - slot: [B_img, R1]
            offset[filled] = shift[index >= 0]  # row-major order of both: image rows, then slots
            position_ids = cut.gather(position_ids.expand(batch, -1) + offset)
        elif position_ids is not None:
            position_ids = (new_mask.cumsum(-1) - 1).clamp(min=0)
        if past_key_values is not None:
            state.cuts.append(cut)
        mask = new_mask if attention_mask is not None or not bool(cut.valid.all()) else None  # ragged: new padding
        return cut.gather(inputs_embeds), mask, position_ids, cut.gather(image_mask) & cut.valid

    @staticmethod
    def _decode_positions(state, position_ids, inputs_embeds, past_key_values) -> torch.Tensor:
        """Decode positions after a boundary-0 cut. ``generate()`` numbers new tokens from the unpruned prompt
        length: right for ``original`` positions, ``removed`` too far for ``contiguous``. Without given
        positions the cache length (the pruned prompt) is the start: right for ``contiguous``."""
        if position_ids is None:
            start = past_key_values.get_seq_length()
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + start)[None]
            return position_ids + state.removed[:, None] if state.position_mode == "original" else position_ids
        return position_ids - state.removed[:, None] if state.position_mode == "contiguous" else position_ids

    def _trace(self, state: _SequenceState, index: torch.Tensor, diverse: torch.Tensor | None) -> PruningTrace:
        pruner, n = self.pruner, self.num_vision_tokens
        plan = pruner.plan if pruner is not None else None
        stage2 = None
        if state.stage2_vision_keep is not None:
            keep = state.stage2_vision_keep
            stage2 = torch.where(keep >= 0, index.gather(1, keep.clamp(min=0)), -1)
        per_sample = state.vision_tokens_per_layer  # [B][L]
        return PruningTrace(
            method=pruner.name if pruner is not None else "none",
            budget=pruner.config.budget if pruner is not None else None,
            num_vision_tokens=n,
            r1=plan.r1 if plan else n,
            r2=plan.r2 if plan else None,
            layer=plan.layer if plan else None,
            convention=plan.convention if plan else "average",
            vision_tokens_per_layer=[max(layer) for layer in zip(*per_sample)] if per_sample else [],
            vision_tokens_per_sample=per_sample,
            stage1_index=index,
            stage1_diverse=diverse,
            stage2_index=stage2,
        )


@dataclass
class _LazyVisionContext(VisionContext):
    project_all: object = None

    @property
    def projected_features(self) -> torch.Tensor:  # type: ignore[override]
        self._check("projected_features")
        return self.project_all()


class PrunableLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """Drop-in ``LlavaForConditionalGeneration``; ``generate()`` returns the standard types."""

    def __init__(self, config: LlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = PrunableLlavaModel(config)
        self.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def num_image_tokens(self) -> int:
        return self.model.num_image_tokens

    @property
    def num_vision_tokens(self) -> int:
        return self.model.num_vision_tokens

    @property
    def pruner(self) -> PruningMethod | None:
        return self.model.pruner

    def last_pruning_trace(self) -> PruningTrace | None:
        """Accounting of the most recent prefill (R1, R2, tokens per layer, kept patches)."""
        return self.model.last_trace


def apply_pruning(model: PrunableLlavaForConditionalGeneration, config: PruningConfig) -> PruningMethod:
    """Attach the method described by ``config`` to ``model`` (replacing any previous one).

    LearnPruner without ``config.lpm_path`` uses the LPM shipped with the checkpoint, ``<model folder>/lpm/``
    (as the built-in toy default ``checkpoints/toy-llava`` does), when there is one.
    """
    if not isinstance(model, PrunableLlavaForConditionalGeneration):
        raise TypeError(
            f"apply_pruning needs a PrunableLlavaForConditionalGeneration, got {type(model).__name__}; load the "
            "checkpoint with llava.model.builder.load_pretrained_model or PrunableLlavaForConditionalGeneration.from_pretrained"
        )
    if get_method_class(config.method).uses_lpm and not config.lpm_path:
        shipped = shipped_lpm_path(getattr(model.config, "_name_or_path", None))
        if shipped:
            logging.getLogger(__name__).warning("learnpruner: no --lpm-path given; using the checkpoint's LPM %s", shipped)
            config = replace(config, lpm_path=shipped)
    method = create_method(
        config,
        num_vision_tokens=model.num_vision_tokens,
        num_layers=model.config.text_config.num_hidden_layers,
        vision_dim=model.config.vision_config.hidden_size,
    )
    method.to(model.device)
    model.model.set_pruner(method)
    return method

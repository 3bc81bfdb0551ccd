"""The LLM side of pruning: a decoder layer loop that runs a method's decoder stage at each cut boundary ``k``.

:class:`PrunableDecoderMixin` is transformers' decoder loop plus the stage (a :class:`SequenceCut`); a family's
text model adds only how it reads positions (``_positions``). :class:`PrunableLlamaModel` serves every
Llama-family VLM (LLaVA-1.5, LLaVA-NeXT-Vicuna), :class:`PrunableQwen2_5_VLTextModel` Qwen2.5-VL (M-RoPE).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cut import SequenceCut, SequenceState, right_pad
from .methods import DecoderContext, PruningMethod
from .timing import StageTimer, section


class PrunableDecoderMixin:
    """The layer loop with the decoder stage, for a transformers decoder model (``embed_tokens``, ``layers``,
    ``norm``, ``rotary_emb``, one causal mask for every layer)."""

    stage_timer: StageTimer | None = None  # set by the VLM's set_stage_timer

    def _positions(self, inputs_embeds, position_ids, past_key_values):
        """-> (positions for the rotary embedding, 2D text positions for the mask builder and the layers)."""
        raise NotImplementedError

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
        sequence_state: SequenceState | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        position_ids, text_positions = self._positions(inputs_embeds, position_ids, past_key_values)

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
            position_ids=text_positions if not decode_masks else None,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)

        stages = pruner.decoder_layers if pruner is not None and prefill else ()  # cut boundaries k, ascending
        counts = vision_mask.sum(-1) if prefill else None  # [B] vision tokens each sample has in this layer
        per_layer, score_inputs = [], {}
        llm_input = {}  # the LLM's input, and each current position's index in it (DecoderContext.input_embeddings)
        if stages:
            batch, seq = hidden_states.shape[:2]
            valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
            origin = torch.arange(seq, device=hidden_states.device).expand(batch, -1)
            llm_input = {"embeddings": hidden_states, "embeddings_vision": vision_mask, "embeddings_valid": valid,
                         "origin": origin}  # fmt: skip
        for idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            for k in stages:
                if k == idx and pruner.score_layer_for(k) == idx:
                    score_inputs[k] = hidden_states  # layer k scores its own cut: its input before that cut
            if idx in stages and int(counts.max()) > 0:
                with section(self.stage_timer, "stage2_select"):
                    cut = self._decoder_cut(pruner, idx, score_inputs[idx], hidden_states, attention_mask, vision_mask,
                                            position_embeddings, past_key_values, state, llm_input)  # fmt: skip
                if cut is not None:
                    with section(self.stage_timer, "stage2_cut"):  # hidden states, positions, RoPE, masks together
                        cos, sin = position_embeddings
                        hidden_states = cut.gather_hidden(hidden_states)  # with any merged tokens written first
                        position_ids = cut.gather_positions(position_ids)
                        cut.replace = None  # written; the cached cut keeps only what decoding needs
                        llm_input["origin"] = cut.gather(llm_input["origin"])
                        text_positions = None if text_positions is None else cut.gather(text_positions)
                        position_embeddings = (cut.gather(cos), cut.gather(sin))
                        attention_mask, vision_mask = cut.mask(attention_mask), cut.gather(vision_mask) & cut.valid
                        counts = vision_mask.sum(-1)
                        causal_mask = create_causal_mask(self.config, hidden_states, attention_mask, past_key_values,
                                                         position_ids=None, layer_idx=idx)  # fmt: skip
            for k in stages:
                if k > idx and pruner.score_layer_for(k) == idx:
                    score_inputs[k] = hidden_states  # an earlier layer scores cut k: its input after any cut here
            if idx in decode_masks and idx > 0:
                causal_mask = create_causal_mask(
                    self.config, hidden_states, decode_masks[idx], past_key_values, position_ids=None, layer_idx=idx
                )
            if prefill:
                per_layer.append(counts)
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=text_positions,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        if prefill and state is not None:
            state.vision_tokens_per_layer = torch.stack(per_layer, dim=1).tolist()
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def _decoder_cut(self, pruner, idx, score_input, hidden_states, attention_mask, vision_mask, position_embeddings,
                     past_key_values, state, llm_input=None) -> SequenceCut | None:  # fmt: skip
        """Decoder stage at layer ``idx``: the method scores and picks each prompt's ``plan.r2`` vision tokens;
        -> the cut that keeps them (None when every prompt keeps all of its vision tokens). A merging method may
        also give new hidden states for some kept tokens (``ctx.extras["merged"]``: indices into the vision tokens
        and values); the cut writes them (``SequenceCut.replace``).

        Prompts with the same vision count and plan are scored in one call; a batch whose prompts differ (LLaVA-NeXT
        images of different sizes, text-only prompts) is scored one prompt at a time, each on its own rows."""
        if past_key_values is not None and past_key_values.get_seq_length(idx) > 0:
            raise ValueError("in-LLM pruning runs at prefill and needs an empty KV cache for this prompt")
        batch = vision_mask.shape[0]
        counts = vision_mask.sum(-1).tolist()
        plans = state.plans if state is not None and state.plans else [pruner.plan] * batch
        if all(plan is None or (plan.r2 is not None and plan.r2 >= n) for plan, n in zip(plans, counts)):
            return None
        score_layer = self.layers[pruner.score_layer_for(idx)]
        key_valid = attention_mask.bool() if attention_mask is not None and attention_mask.dim() == 2 else None
        extras = {"stage_input": hidden_states, "final_norm": self.norm, **(llm_input or {})}  # layer k's input (DART)
        merged = None  # ([B, M] sequence positions before the cut, -1 = none; [B, M, D]) hidden states to write
        if len(set(counts)) == 1 and all(plan == plans[0] for plan in plans):
            vision_index = vision_mask.nonzero()[:, 1].view(batch, counts[0])
            ctx = DecoderContext(pruner, score_layer, score_input, position_embeddings, vision_index, key_valid,
                                 extras=extras, plan=plans[0], stage_layer=idx)  # fmt: skip
            keep_vision = pruner.select_decoder(ctx)  # [B, R2] into the Nv vision tokens; -1 = an empty slot
            scores = ctx.extras.get("scores")
            if "merged" in ctx.extras:
                slots, values = ctx.extras["merged"]  # [B, M] into the Nv vision tokens (-1: none), [B, M, D]
                merged = (torch.where(slots >= 0, vision_index.gather(1, slots.clamp(min=0)), -1), values)
        else:
            rows, score_rows, merged_rows = [], [], []
            for b, (plan, n) in enumerate(zip(plans, counts)):
                if plan is None or (plan.r2 is not None and plan.r2 >= n):  # r2 None: adaptive counts (ATP)
                    rows.append(torch.arange(n, device=vision_mask.device))
                    score_rows.append(torch.full((n,), float("nan"), device=vision_mask.device))
                    continue
                one = slice(b, b + 1)
                ctx = DecoderContext(
                    pruner, score_layer, score_input[one],
                    tuple(t[one] if t.shape[0] == batch else t for t in position_embeddings),
                    vision_mask[one].nonzero()[:, 1][None], None if key_valid is None else key_valid[one],
                    extras={k: v[one] if isinstance(v, torch.Tensor) else v for k, v in extras.items()}, plan=plan,
                    stage_layer=idx,
                )  # fmt: skip
                rows.append(pruner.select_decoder(ctx)[0])
                score_rows.append(ctx.extras["scores"][0] if "scores" in ctx.extras else torch.full((n,), float("nan")))
                if "merged" in ctx.extras:
                    slots, values = ctx.extras["merged"]
                    slots, values = slots[0][slots[0] >= 0], values[0][slots[0] >= 0]
                    merged_rows.append((b, ctx.vision_index[0, slots], values))
            keep_vision = right_pad(rows, -1)
            scores = right_pad([r.float().to(vision_mask.device) for r in score_rows], float("nan"))
            if merged_rows:
                found = dict((b, (where, values)) for b, where, values in merged_rows)
                dim, device = merged_rows[0][2].shape[-1], vision_mask.device
                empty = (torch.empty(0, dtype=torch.long, device=device), merged_rows[0][2].new_empty(0, dim))
                pairs = [found.get(b, empty) for b in range(batch)]
                merged = (right_pad([w for w, _ in pairs], -1), right_pad([v for _, v in pairs], 0.0))
        keep = ~vision_mask if key_valid is None else key_valid & ~vision_mask
        vision_index = right_pad([row.nonzero()[:, 0] for row in vision_mask], 0)  # [B, max Nv]
        rows_idx = torch.arange(batch, device=keep.device)[:, None].expand_as(keep_vision)
        chosen = keep_vision >= 0
        keep[rows_idx[chosen], vision_index.gather(1, keep_vision.clamp(min=0))[chosen]] = True
        cut = SequenceCut.from_keep(idx, keep)
        if merged is not None:
            where = merged[0]
            written = where >= 0
            owner = torch.arange(batch, device=keep.device)[:, None].expand_as(where)
            if not bool(keep[owner[written], where[written]].all()):
                raise RuntimeError(f"{pruner.name}: merged hidden states for vision tokens that the cut at {idx} drops")
            cut.replace = merged
        if state is not None:  # compose with an earlier cut: indices into the vision tokens that entered the LLM
            earlier = state.stage2_vision_keep  # the vision tokens now in the sequence, in sequence order:
            if earlier is not None:  # the earlier keep ascending (a cut keeps sequence order), empty slots last
                spare = torch.iinfo(earlier.dtype).max
                earlier = earlier.masked_fill(earlier < 0, spare).sort(-1).values
                earlier = earlier.masked_fill(earlier == spare, -1)
                keep_vision = torch.where(keep_vision >= 0, earlier.gather(1, keep_vision.clamp(min=0)), -1)
            state.stage2_vision_keep = keep_vision
            state.stage2_scores = scores
            if past_key_values is not None:
                state.cuts.append(cut)
        return cut


class PrunableLlamaModel(PrunableDecoderMixin, LlamaModel):
    """``LlamaModel`` whose layer loop can run a method's decoder stage at each cut boundary."""

    def _positions(self, inputs_embeds, position_ids, past_key_values):
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        return position_ids, position_ids


class PrunableQwen2_5_VLTextModel(PrunableDecoderMixin, Qwen2_5_VLTextModel):
    """``Qwen2_5_VLTextModel`` with the same layer loop. Positions are M-RoPE ``[3, B, S]`` (``[4, B, S]`` from
    ``generate()``: a text row first). The text row is dropped, so the mask builder never gets gapped 1D positions
    (a pruned sequence's positions have gaps, which transformers would read as packed sequences)."""

    def __init__(self, config):
        super().__init__(config)
        if self.has_sliding_layers:
            raise NotImplementedError("pruning supports Qwen2.5-VL text models with full attention in every layer "
                                      "(use_sliding_window=False, as the released checkpoints are)")  # fmt: skip

    def _positions(self, inputs_embeds, position_ids, past_key_values):
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_seen).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return position_ids, None

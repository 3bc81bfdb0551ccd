"""Qwen2.5-VL: a dynamic-resolution ViT with window attention, a 2x2 patch merger, no [CLS].

The candidates are the merger's outputs (the LLM tokens), one per 2x2 block of patches, in the order their
placeholders take (raster order of the merged grid). What a method reads:

* ``features`` (the projector's input, which the LPM scores): the merger's input, the last block's output of the
  2x2 patches concatenated, ``[M_i, 4 * Dv]``; ``project`` is the merger (``ln_q`` then its MLP), which the ViT
  has already run on every token (``projected``: its output is reused; merging methods project their own);
* ``importance``: the mean attention each merged token receives in the last full-attention block
  (``fullatt_block_indexes[-1]``), exact from that block's own q/k and 2D RoPE, averaged over its image's queries,
  the heads and the token's 4 patches (no [CLS]: the mean received attention, as for SigLIP towers);
* ``key_states``: that block's post-RoPE keys, averaged over the heads and the 4 patches.

The tower permutes patches into windows (``window_index``); every signal is put back into merger-output order.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from .. import scoring
from . import ImageGroup

# The paper's Table 4 input: a fixed resolution giving 1280 merged tokens per image (budgets 426/284/142 refer to it).
# A config may name another reference with ``pruning_reference_tokens`` (the tiny factory does).
QWEN_REFERENCE_TOKENS = 1280


class Qwen2_5_VLAdapter:
    family = "qwen2_5_vl"
    provides = ()  # each image is its own grid of merged tokens; methods that need one fixed grid are refused
    position_modes = ("original",)  # kept tokens keep their M-RoPE (t, h, w) positions; "contiguous" has no meaning

    def reference_tokens(self, config) -> int:
        return int(getattr(config, "pruning_reference_tokens", QWEN_REFERENCE_TOKENS))

    def feature_dim(self, config) -> int:
        """unit * Dv: the merger's input of one merged token (its 2x2 patches' features concatenated)."""
        return config.vision_config.hidden_size * config.vision_config.spatial_merge_size**2

    def image_token_counts(self, model, image_grid_thw=None, num_images: int = 1) -> list[int]:
        """N_i = t * h * w / merge^2 of each image's ``image_grid_thw`` row (the processor's placeholder count)."""
        if image_grid_thw is None:
            raise ValueError("Qwen2.5-VL images need their image_grid_thw (the processor returns it) to count tokens")
        unit = model.config.vision_config.spatial_merge_size ** 2
        return (torch.as_tensor(image_grid_thw).prod(-1) // unit).tolist()

    # -- the tower --------------------------------------------------------------------------------------------
    @staticmethod
    def _tower(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """-> (merger inputs [M, unit * Dv] and outputs [M, D] in merger-output order, signals(), per-image token
        counts). The ViT runs its merger on every token itself; its output is reused, never recomputed."""
        visual = model.visual
        out = visual(pixel_values.to(visual.dtype), grid_thw=grid_thw, output_hidden_states=True)
        unit, dv = visual.spatial_merge_unit, visual.config.hidden_size
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size,
                                                  kwargs={})  # fmt: skip
        natural = torch.argsort(window_index)  # merged token (merger-output order) -> its window position
        merged_in = out.last_hidden_state.view(-1, unit, dv)[natural].flatten(1)  # [M, unit * Dv]
        merged_out = out.pooler_output  # [M, D] the tower's own merger output, already in merger-output order

        def signals():
            block_idx = visual.fullatt_block_indexes[-1]
            block, block_in = visual.blocks[block_idx], out.hidden_states[block_idx]  # [P, Dv] window order
            rope = visual.rotary_pos_emb(block_in, get_vision_position_ids(grid_thw, visual.spatial_merge_size, kwargs={}))
            cos, sin = (visual.permute_input_for_window_attn(t, window_index, block_in.shape[0]) for t in rope)
            q, k = scoring.packed_vit_qk(block, block_in, cos, sin)
            cu_seqlens, _ = get_vision_attention_seqlens(grid_thw, visual.config, kwargs={})
            received = scoring.packed_received_attention(q, k, block.attn.scaling, cu_seqlens)  # [P]
            importance = received.view(-1, unit).mean(-1)[natural]  # [M]
            keys = k.mean(0).view(-1, unit, k.shape[-1]).mean(1)[natural]  # [M, d]
            return importance, keys

        counts = (grid_thw.prod(-1) // unit).tolist()
        return merged_in, merged_out, signals, counts

    @staticmethod
    def _project(model, features: torch.Tensor) -> torch.Tensor:
        """The merger on [..., unit * Dv] inputs -> [..., D] LLM tokens (``ln_q`` per patch, then the MLP)."""
        merger, dv = model.visual.merger, model.visual.config.hidden_size
        lead = features.shape[:-1]
        normed = merger.ln_q(features.reshape(*lead, -1, dv)).reshape(*lead, -1)
        return merger.mlp(normed)

    def vision_features(self, model, pixel_values: torch.Tensor, image_grid_thw=None) -> list[torch.Tensor]:
        """The merger's input per image: a list of [M_i, unit * Dv] (what the LPM scores and trains on)."""
        merged_in, _, _, counts = self._tower(model, pixel_values, image_grid_thw)
        return list(merged_in.split(counts))

    def image_groups(self, model, pixel_values: torch.Tensor, image_grid_thw=None) -> list[ImageGroup]:
        """One tower pass over every image (packed, as Qwen does); images with the same grid share a group."""
        grid_thw = torch.as_tensor(image_grid_thw, device=pixel_values.device)
        merged_in, merged_out, signals, counts = self._tower(model, pixel_values, grid_thw)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        cache: dict[str, tuple] = {}

        def shared():
            if "s" not in cache:
                cache["s"] = signals()
            return cache["s"]

        merge = model.visual.spatial_merge_size
        groups: dict[tuple, list[int]] = {}
        for i, thw in enumerate(grid_thw.tolist()):
            groups.setdefault(tuple(thw), []).append(i)
        out = []
        for (t, h, w), images in groups.items():
            n = counts[images[0]]
            rows = torch.stack([torch.arange(starts[i], starts[i] + n, device=merged_in.device) for i in images])
            features = merged_in[rows]  # [G, M, unit * Dv]
            out.append(ImageGroup(
                images=images, num_tokens=n, features=features,
                slots=torch.arange(n, device=features.device).expand(len(images), -1),
                has_cls=False, cls_token=None,
                importance=lambda rows=rows: shared()[0][rows], key_states=lambda rows=rows: shared()[1][rows],
                project=lambda x: self._project(model, x),
                full_tokens=lambda rows=rows: merged_out[rows],
                grid=(h // merge, w // merge) if t == 1 else None, projected=merged_out[rows],
            ))  # fmt: skip
        return out

"""LLaVA-NeXT (anyres): each image is a base crop plus a grid of crops, every crop a full CLIP pass with its own
[CLS] row; transformers' ``pack_image_features`` unpads the grid and appends one ``image_newline`` per row.

The vision stage scores crop-major features ``[Σcrops, P, Dv]`` (each patch against its own crop's [CLS]).
The packing is a pure gather, so its index map is built by packing integer ids through transformers' own
``pack_image_features``: slot ``j`` of image ``i`` holds crop-patch ``map[j] = crop * P + patch`` of that image,
or the newline (``-1``). Candidates are the patch slots; newline slots are vision tokens (placeholders, counted
in N_i and in every per-layer count) that stage 1 keeps only when it keeps everything (docs/architecture.md).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from . import ImageGroup, clip_signals, encoder_layers, patch_grid_tokens, strips_cls, tower_hidden_states

NEWLINE = -1  # packing-map entry of an ``image_newline`` slot


class LlavaNextAdapter:
    family = "llava_next"
    provides = ()  # a base crop plus an unpadded grid of crops: not one grid

    def reference_tokens(self, config) -> int:
        """The nominal N budgets refer to: (1 base + the largest grid's crops) x P, 2880 = 5 x 576 for
        llava-v1.6 (the papers' "2880 tokens"; a real image has N_i from unpadding and newlines)."""
        size = config.vision_config.image_size
        crops = max((h // size) * (w // size) for h, w in config.image_grid_pinpoints)
        return (1 + crops) * patch_grid_tokens(config)

    def feature_dim(self, config) -> int:
        """Dv, the CLIP feature width (the projector's input)."""
        return config.vision_config.hidden_size

    @staticmethod
    def crops_per_image(config, image_sizes) -> list[int]:
        return [image_size_to_num_patches(image_size=[int(v) for v in size], grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision_config.image_size) for size in image_sizes]  # fmt: skip

    def packing_maps(self, model, image_sizes) -> list[torch.Tensor]:
        """Per image, [N_i] long: the crop-major source ``crop * P + patch`` of each placeholder slot, or -1 for a
        newline, obtained by packing integer ids with transformers' ``pack_image_features``."""
        p = patch_grid_tokens(model.config)
        ids = [torch.arange(c * p, dtype=torch.float64).view(c, p, 1) for c in self.crops_per_image(model.config, image_sizes)]
        newline = torch.tensor([float(NEWLINE)], dtype=torch.float64)
        packed, _ = model.pack_image_features(ids, torch.as_tensor(image_sizes).cpu(), "default", image_newline=newline)
        return [m[:, 0].long() for m in packed]

    def image_token_counts(self, model, image_sizes, num_images: int = 1) -> list[int]:
        """N_i of each image: the length of its packing map (``image_sizes`` [B, 2] (H, W) required)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes to count an image's tokens (the processor returns them)")
        return [len(m) for m in self.packing_maps(model, image_sizes)]

    def _crop_features(self, model, pixel_values, image_sizes):
        crops = self.crops_per_image(model.config, image_sizes)
        if pixel_values.dim() == 5:  # [B, max crops, 3, H, W] as the processor pads them
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, crops)])
        if not strips_cls(model.config):
            raise NotImplementedError("LLaVA-NeXT pruning needs vision_feature_select_strategy='default' (CLIP with [CLS])")
        hidden, idx = tower_hidden_states(model.vision_tower, pixel_values, model.config.vision_feature_layer)
        return crops, hidden, idx

    def vision_features(self, model, pixel_values: torch.Tensor, image_sizes) -> list[torch.Tensor]:
        """Per image, [M_i, Dv] the candidate (patch) features in slot order."""
        return [g.features[0] for g in self.image_groups(model, pixel_values, image_sizes)]

    def image_groups(self, model, pixel_values: torch.Tensor, image_sizes) -> list[ImageGroup]:
        """One group per image (images differ in crops, unpadding and N_i)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values (the processor returns both)")
        crops, hidden, idx = self._crop_features(model, pixel_values, image_sizes)
        patches, layer_input, cls = hidden[idx][:, 1:], hidden[idx - 1], hidden[idx][:, 0]
        layer = encoder_layers(model.vision_tower)[idx - 1]
        groups, start = [], 0
        for i, (count, source) in enumerate(zip(crops, self.packing_maps(model, image_sizes))):
            source = source.to(patches.device)
            rows = slice(start, start + count)
            slots = (source != NEWLINE).nonzero()[:, 0]  # [M_i] patch slots, ascending
            src = source[slots]  # [M_i] crop-major ids

            def to_image(x, src=src):  # [C_i, P, ...] -> [1, M_i, ...]
                return x.flatten(0, 1)[src][None]

            def full_tokens(rows=rows, source=source):  # pure gather of the projected crops + the newline row
                projected = model.multi_modal_projector(patches[rows]).flatten(0, 1)
                table = torch.cat([projected, model.image_newline[None].to(projected)])
                return table[torch.where(source == NEWLINE, len(projected), source)][None]

            importance, key_states = clip_signals(layer, layer_input[rows], True, to_image)  # each crop's own [CLS]
            groups.append(ImageGroup(
                images=[i], num_tokens=len(source), features=to_image(patches[rows]), slots=slots[None], has_cls=True,
                cls_token=cls[start : start + 1],  # the base crop (the whole image) summarises the image
                importance=importance, key_states=key_states, project=model.multi_modal_projector,
                full_tokens=full_tokens,
            ))  # fmt: skip
            start += count
        return groups

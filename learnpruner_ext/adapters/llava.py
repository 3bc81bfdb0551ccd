"""LLaVA-1.5: one CLIP pass per image, a square grid of N patch tokens, each filling its own placeholder."""

from __future__ import annotations

import math

import torch

from . import ImageGroup, clip_signals, encoder_layers, patch_grid_tokens, strips_cls, tower_hidden_states


class LlavaAdapter:
    family = "llava"
    provides = ("single_grid",)  # every image is one square grid of N patches
    tower = "vision_tower"  # the model attribute of the image tower (Video-LLaVA: ``image_tower``)

    def reference_tokens(self, config) -> int:
        """N, the tokens of every image (576 for LLaVA-1.5's 336 px CLIP-L/14)."""
        return patch_grid_tokens(config)

    def feature_dim(self, config) -> int:
        """Dv, the CLIP feature width (the projector's input)."""
        return config.vision_config.hidden_size

    def image_token_counts(self, model, image_sizes=None, num_images: int = 1) -> list[int]:
        """N for every image (``image_sizes`` only gives their number)."""
        return [patch_grid_tokens(model.config)] * (num_images if image_sizes is None else len(image_sizes))

    def vision_features(self, model, pixel_values: torch.Tensor, image_sizes=None) -> torch.Tensor:
        """[B, N, Dv] the projector's input (what the LPM scores and trains on)."""
        tower = getattr(model, self.tower)
        hidden, idx = tower_hidden_states(tower, pixel_values, model.config.vision_feature_layer)
        return hidden[idx][:, 1:] if strips_cls(model.config) else hidden[idx]

    def image_groups(self, model, pixel_values: torch.Tensor, image_sizes=None) -> list[ImageGroup]:
        """One group: every image has N candidates, slot j = patch j."""
        has_cls = strips_cls(model.config)
        tower = getattr(model, self.tower)
        hidden, idx = tower_hidden_states(tower, pixel_values, model.config.vision_feature_layer)
        patches = hidden[idx][:, 1:] if has_cls else hidden[idx]  # [B, N, Dv]
        batch, n = patches.shape[:2]
        importance, key_states = clip_signals(encoder_layers(tower)[idx - 1], hidden[idx - 1], has_cls)
        return [ImageGroup(
            images=list(range(batch)), num_tokens=n, features=patches,
            slots=torch.arange(n, device=patches.device).expand(batch, -1),
            has_cls=has_cls, cls_token=hidden[idx][:, 0] if has_cls else None,
            importance=importance, key_states=key_states, project=model.multi_modal_projector,
            full_tokens=lambda: model.multi_modal_projector(patches), grid=(math.isqrt(n), math.isqrt(n)),
        )]  # fmt: skip

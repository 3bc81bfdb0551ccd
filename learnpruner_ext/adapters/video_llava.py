"""Video-LLaVA: two CLIP towers; images go through ``image_tower`` as in LLaVA-1.5, videos through ``video_tower``.

A video of F frames fills F x (P + 1) ``<video>`` placeholders: transformers' ``get_video_features`` (like the
original Video-LLaVA, PKU-YuanGroup/Video-LLaVA@984e65b, ``LanguageBindVideoTower.feature_select``: "return all")
keeps every row of the feature layer, the [CLS] row of each frame included: 8 x 257 = 2056 tokens for the 7B
model. What counts:

* **placeholders** ``N_i = F x (P + 1)``: every one is a vision token the LLM processes, so the [CLS] rows are
  counted in N_i, in every per-layer count and in FLOPs; at a full budget all of them stay (the model equals
  transformers' Video-LLaVA).
* **candidates** are the ``F x P`` patch tokens (the paper's 2048 = 8 x 256). The per-frame [CLS] rows are not
  candidates of the vision stage (as LLaVA-NeXT's newline slots are not): they summarise their frame, and the
  paper counts patches. When the vision stage prunes, they leave with the other unchosen placeholders; in-LLM
  methods (FastV, DART) see them as vision tokens at layer k.
* **reference** ``N = F x P`` (2048): budgets are the paper's absolute counts (456, 228 = 22% and 11% of 2048).

The vision stage has two modes (``PruningConfig.video_stage1``): ``joint`` (default) ranks all F x P candidates
of a video together, so the budget goes to the frames that need it, which suits the LPM, whose scores are
per token and comparable across frames; ``per_frame`` treats each frame as an image with its own plan
(R1 split evenly over the frames, the first ``R1 mod F`` frames one more), which [CLS]-attention methods need
when their scores are only comparable within a frame (each frame's softmax sums to one either way).
"""

from __future__ import annotations

import torch

from . import ImageGroup, clip_signals, encoder_layers, patch_grid_tokens, strips_cls, tower_hidden_states
from .llava import LlavaAdapter


def video_frames(config) -> int:
    """F, the frames of the model's videos: ``video_seq_length / (P + 1)`` (2056 / 257 = 8 for Video-LLaVA-7B)."""
    per_frame = patch_grid_tokens(config) + 1
    if config.video_seq_length % per_frame:
        raise ValueError(f"video_seq_length {config.video_seq_length} is not a multiple of the {per_frame} tokens "
                         "of a frame (patches + [CLS]); fix the checkpoint's config.json")  # fmt: skip
    return config.video_seq_length // per_frame


class VideoLlavaAdapter(LlavaAdapter):
    family = "video_llava"
    provides = ()  # a video is not one raster grid; methods that need one (downsample) are refused
    tower = "image_tower"  # images: LLaVA-1.5's path on the image tower

    def reference_tokens(self, config) -> int:
        """N = F x P, the video's patch tokens (2048 for Video-LLaVA-7B); budgets refer to it."""
        return video_frames(config) * patch_grid_tokens(config)

    def video_token_counts(self, model, num_frames: list[int]) -> list[int]:
        """N_i of each video: F_i x (P + 1) placeholders."""
        return [f * (patch_grid_tokens(model.config) + 1) for f in num_frames]

    def video_groups(self, model, pixel_values_videos: torch.Tensor) -> list[ImageGroup]:
        """[B, F, 3, H, W] frames -> one group of B videos, F x P candidates each, in placeholder order."""
        if not strips_cls(model.config):
            raise NotImplementedError("Video-LLaVA pruning needs vision_feature_select_strategy='default' (CLIP with [CLS])")
        videos, frames = pixel_values_videos.shape[:2]
        hidden, idx = tower_hidden_states(model.video_tower, pixel_values_videos.flatten(0, 1), model.config.vision_feature_layer)
        rows = hidden[idx]  # [B*F, P+1, Dv] every row of each frame, as the LLM receives them
        p = rows.shape[1] - 1
        patches = rows[:, 1:].reshape(videos, frames * p, -1)  # [B, F*P, Dv]
        frame_cls = rows[:, 0].reshape(videos, frames, -1)  # [B, F, Dv]
        slots = (torch.arange(frames, device=rows.device)[:, None] * (p + 1) + 1 + torch.arange(p, device=rows.device))

        def to_video(x):  # [B*F, P, ...] per frame -> [B, F*P, ...]
            return x.reshape(videos, frames * p, *x.shape[2:])

        importance, key_states = clip_signals(encoder_layers(model.video_tower)[idx - 1], hidden[idx - 1], True, to_video)
        return [ImageGroup(
            images=list(range(videos)), num_tokens=frames * (p + 1), features=patches,
            slots=slots.flatten().expand(videos, -1), has_cls=True,
            cls_token=frame_cls.mean(1),  # joint mode: the video's summary is the mean of its frames' [CLS]
            importance=importance, key_states=key_states, project=model.multi_modal_projector,
            full_tokens=lambda: model.multi_modal_projector(rows).reshape(videos, frames * (p + 1), -1),
            frames=frames, frame_cls=frame_cls,
        )]  # fmt: skip

"""Family adapters: what the pruning core needs from one VLM family, behind one small interface.

An adapter turns a family's vision inputs into :class:`ImageGroup` s: the candidate tokens a method scores
(their vision features, and lazily the importance signals of the encoder rows they came from), the projector,
and the layout that maps them to the image's placeholder slots. Methods see only the group's
:class:`~learnpruner_ext.methods.VisionContext`, never the family.

Adding a family: one module here with an adapter class (``reference_tokens``, ``image_token_counts``,
``feature_dim``, ``image_groups``), registered in :data:`ADAPTERS` under the transformers ``model_type``, and one model class in
:mod:`learnpruner_ext.modeling` that subclasses the family's transformers model with the pruning mixin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import scoring


@dataclass
class ImageGroup:
    """Images that share one vision-stage call: the same token count ``num_tokens`` (N_i), one context.

    ``features`` are the method's candidates: ``M <= N_i`` per image (LLaVA-NeXT's ``image_newline`` slots are
    placeholders but not candidates). ``slots`` says which placeholder slot each candidate fills. The signals
    are lazy: nothing beyond the tower's forward is computed unless a method reads it.
    """

    images: list[int]  # the batch's image indices in this group
    num_tokens: int  # N_i: placeholder slots per image
    features: torch.Tensor  # [G, M, Dv] candidate features (the projector's input)
    slots: torch.Tensor  # [G, M] placeholder slot (0..N_i-1) of each candidate, ascending
    has_cls: bool  # the tower has a [CLS] token (importance = [CLS] attention, cls_token set)
    cls_token: torch.Tensor | None  # [G, Dv] the [CLS] output that summarises each image (None: no [CLS])
    importance: Callable[[], torch.Tensor]  # -> [G, M] [CLS] attention, or mean received attention without [CLS]
    key_states: Callable[[], torch.Tensor]  # -> [G, M, d] head-averaged keys of the feature layer
    project: Callable[[torch.Tensor], torch.Tensor]  # [G, R, Dv] candidate features -> [G, R, D] LLM tokens
    full_tokens: Callable[[], torch.Tensor]  # -> [G, N_i, D] the unpruned tokens, exactly as the family builds them
    grid: tuple[int, int] | None = None  # (rows, cols) when the candidates are one raster grid, row-major
    # [G, M, D] the projector's output of every candidate when the tower computes it anyway (Qwen2.5-VL's merger
    # runs inside the ViT); None: projected on demand, only what a method needs
    projected: torch.Tensor | None = None
    # videos: the candidates are ``frames`` equal consecutive parts, one per frame (a per-frame vision stage treats
    # each part as an image); ``frame_cls`` [G, frames, Dv] is each frame's [CLS] output
    frames: int = 1
    frame_cls: torch.Tensor | None = None


def clip_signals(layer: nn.Module, layer_input: torch.Tensor, has_cls: bool, to_image=None):
    """(importance, key_states) callables of a CLIP/SigLIP feature layer: ``layer`` and its input [C, T, Dv] for
    the encoder rows (images or crops); ``to_image`` maps per-row results [C, P, ...] to the candidates."""
    gather = to_image or (lambda x: x)

    def importance():
        if has_cls:
            return gather(scoring.cls_attention(layer, layer_input))
        return gather(scoring.mean_received_attention(layer, layer_input))

    def key_states():
        keys = scoring.encoder_keys(layer, layer_input)
        return gather(keys[:, 1:] if has_cls else keys)

    return importance, key_states


def patch_grid_tokens(config) -> int:
    """Patch tokens of one tower input: (image_size / patch_size)^2 (576 for CLIP-L/14 at 336 px)."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def tower_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, feature_layer) -> tuple[tuple, int]:
    """Run a CLIP/SigLIP-style tower -> (every hidden state: embeddings, then each layer's output; the index of
    the feature layer in it)."""
    if not isinstance(feature_layer, int):
        raise NotImplementedError("pruning supports a single vision_feature_layer (an int), not a list of layers")
    dtype = next(tower.parameters()).dtype
    hidden = tower(pixel_values.to(dtype), output_hidden_states=True, return_dict=True).hidden_states
    return hidden, feature_layer % len(hidden)


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    return getattr(tower, "vision_model", tower).encoder.layers


def strips_cls(config) -> bool:
    """True when the projector's input drops row 0 of the feature layer: transformers' ``default`` feature
    strategy, which is defined as removing the [CLS] token (``full`` keeps every row, e.g. SigLIP towers)."""
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise NotImplementedError(f"vision_feature_select_strategy must be 'default' or 'full', got {strategy!r}")
    return strategy == "default"


from .llava import LlavaAdapter  # noqa: E402
from .llava_next import LlavaNextAdapter  # noqa: E402
from .qwen2_5_vl import Qwen2_5_VLAdapter  # noqa: E402
from .video_llava import VideoLlavaAdapter  # noqa: E402

ADAPTERS = {"llava": LlavaAdapter, "llava_next": LlavaNextAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter,
            "video_llava": VideoLlavaAdapter}  # fmt: skip


def adapter_for(config):
    """The adapter of a VLM config (by ``model_type``)."""
    if config.model_type not in ADAPTERS:
        raise NotImplementedError(f"no pruning adapter for model_type {config.model_type!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[config.model_type]()


def feature_dim(config) -> int:
    """Width of the features a method (and the LPM) reads: the projector's input of one candidate."""
    return adapter_for(config).feature_dim(config)


__all__ = ["ADAPTERS", "ImageGroup", "LlavaAdapter", "LlavaNextAdapter", "Qwen2_5_VLAdapter", "VideoLlavaAdapter",
           "adapter_for", "feature_dim"]  # fmt: skip

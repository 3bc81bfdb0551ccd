"""Image and prompt helpers with upstream LLaVA's conventions."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .constants import DEFAULT_IMAGE_TOKEN

MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused rather than decoded into many GB


def load_image(path_or_image: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image as RGB, with a clear error for missing, unreadable or absurdly large files."""
    if isinstance(path_or_image, Image.Image):
        image = path_or_image
    else:
        path = Path(path_or_image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err}. Is it a valid PNG/JPEG file?") from err
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image of {image.width}x{image.height} pixels is too large (limit {MAX_IMAGE_PIXELS} pixels)")
    return image.convert("RGB")


def expand2square(image: Image.Image, background_color: tuple[int, int, int]) -> Image.Image:
    """Pad to a square canvas of ``background_color``, image centred (upstream's 'pad' aspect)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def process_images(images: list[Image.Image], image_processor, model_cfg=None) -> torch.Tensor:
    """PIL images -> pixel_values [B, 3, H, W]; 'pad' aspect expands to square with the processor's mean colour."""
    aspect = getattr(model_cfg, "image_aspect_ratio", "pad") if model_cfg is not None else "pad"
    if aspect == "pad":
        mean = tuple(int(x * 255) for x in image_processor.image_mean)  # truncated, as upstream's process_images
        images = [expand2square(image, mean) for image in images]
    elif aspect not in (None, "square", "resize"):
        raise ValueError(f"unsupported image_aspect_ratio {aspect!r}; use 'pad' or 'square'")
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def image_inputs(images: list[Image.Image], image_processor, model_cfg=None) -> dict[str, torch.Tensor]:
    """PIL images -> the model's vision inputs: ``{"pixel_values": [B, 3, H, W]}`` for LLaVA-1.5 (with its 'pad'
    aspect), ``{"pixel_values": [B, max crops, 3, H, W], "image_sizes": [B, 2]}`` for LLaVA-NeXT (anyres, as its
    processor does it); ``{"pixel_values": [Σ patches, C*T*p*p], "image_grid_thw": [B, 3]}`` for Qwen2.5-VL."""
    if getattr(model_cfg, "model_type", "llava") == "qwen2_5_vl":
        if not hasattr(image_processor, "merge_size"):
            raise ValueError(f"a Qwen2.5-VL checkpoint needs its Qwen2-VL image processor, got {type(image_processor).__name__}")
        out = image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
    if getattr(model_cfg, "model_type", "llava") == "llava_next":
        if not hasattr(image_processor, "image_grid_pinpoints"):
            raise ValueError(f"a LLaVA-NeXT checkpoint needs its anyres image processor, got {type(image_processor).__name__}")
        out = image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
    if getattr(model_cfg, "model_type", "llava") == "video_llava":  # Video-LLaVA: its CLIP preprocessing, no padding
        return {"pixel_values": image_processor(images=images, return_tensors="pt", return_legacy_image_output=False)["pixel_values"]}
    return {"pixel_values": process_images(images, image_processor, model_cfg)}


def video_inputs(videos: list[list[Image.Image]], image_processor, model_cfg=None) -> dict[str, torch.Tensor]:
    """Videos (each a list of F frames, e.g. from ``llava.video.load_video``) -> ``{"pixel_values_videos":
    [B, F, 3, H, W]}``. Each frame is preprocessed as an image by the checkpoint's ``VideoLlavaImageProcessor``
    (resize the shortest edge, centre crop, CLIP normalisation: the settings transformers' video processor
    applies, which needs torchvision)."""
    if getattr(model_cfg, "model_type", None) != "video_llava":
        raise ValueError(f"video input needs a Video-LLaVA checkpoint (model_type video_llava), got "
                         f"{getattr(model_cfg, 'model_type', None)!r}; give an image instead")  # fmt: skip
    frames = {len(v) for v in videos}
    if len(frames) != 1 or 0 in frames:
        raise ValueError(f"every video of a batch needs the same number of frames, got {sorted(len(v) for v in videos)}; "
                         "sample them with llava.video.load_video(path, num_frames)")  # fmt: skip
    pixels = [image_inputs(list(v), image_processor, model_cfg)["pixel_values"] for v in videos]  # [F, 3, H, W] each
    return {"pixel_values_videos": torch.stack(pixels)}


def tokenizer_image_token(
    prompt: str,
    tokenizer,
    image_token_index: int | None = None,
    return_tensors: str | None = None,
    num_image_tokens: int = 1,
    expected_images: int | None = None,
):
    """Tokenise ``prompt``, replacing each ``<image>`` with ``num_image_tokens`` image placeholder ids.

    ``num_image_tokens`` is the number of vision tokens the model feeds the LLM per image
    (``model.num_image_tokens``: always N; the model's vision stage drops the placeholders it does not fill). The BOS token appears once.
    """
    chunks = prompt.split(DEFAULT_IMAGE_TOKEN)
    if expected_images is not None and len(chunks) - 1 != expected_images:
        raise ValueError(
            f"the prompt must contain exactly {expected_images} '{DEFAULT_IMAGE_TOKEN}' token(s), found {len(chunks) - 1}: {prompt!r}"
        )
    if image_token_index is None:
        image_token_index = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([image_token_index] * num_image_tokens)
        if chunk or i == 0:
            ids.extend(tokenizer(chunk, add_special_tokens=(i == 0)).input_ids)
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"unsupported return_tensors {return_tensors!r}")
    return ids


def get_model_name_from_path(model_path: str) -> str:
    parts = str(model_path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]

"""Video files <-> frames with PyAV (``av`` on PyPI: FFmpeg bindings, no CUDA, no torchvision).

``load_video(path, num_frames=8)`` samples frames as the original Video-LLaVA's evaluation does
(PKU-YuanGroup/Video-LLaVA@984e65b, ``languagebind/video/processing_video.py``, the ``decord`` backend):
``np.linspace(0, n - 1, num_frames, dtype=int)`` over the ``n`` decoded frames, so the first and the last frame
are always included. (llava-hf's model card samples ``np.arange(0, n, n / 8)`` instead, which never takes the
last frame; the paper's numbers come from the original code, so its rule is the one used here.) Frames are counted
by decoding, since a container's frame count can be missing or wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, without a video stream, or too short."""


def sample_indices(num_decoded: int, num_frames: int) -> list[int]:
    """Video-LLaVA's uniform sample: ``np.linspace(0, n - 1, num_frames, dtype=int)``."""
    return np.linspace(0, num_decoded - 1, num_frames, dtype=int).tolist()


def load_video(path: str | Path, num_frames: int = 8) -> list[Image.Image]:
    """``num_frames`` RGB frames of the video at ``path``, sampled uniformly (see the module docstring)."""
    import av

    path = Path(path)
    if num_frames < 1:
        raise VideoError(f"num_frames must be >= 1, got {num_frames}")
    if not path.is_file():
        raise VideoError(f"video {path} not found; check the path (or --video-dir)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path} has no video stream; give a video file (e.g. .mp4)")
            frames = [frame.to_image() for frame in container.decode(video=0)]
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot decode video {path} ({err}); the file is not a video or is corrupt, re-encode "
                         "or download it again") from None  # fmt: skip
    if len(frames) < num_frames:
        raise VideoError(f"video {path} has {len(frames)} decodable frames, fewer than the {num_frames} to sample; "
                         f"use a longer video or pass --num-frames {max(len(frames), 1)}")  # fmt: skip
    return [frames[i].convert("RGB") for i in sample_indices(len(frames), num_frames)]


def save_video(frames: list[Image.Image], path: str | Path, fps: int = 8) -> Path:
    """Write ``frames`` (equal sizes) as an H.264 (or MPEG-4 part 2, where the FFmpeg build lacks libx264) mp4."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = frames[0].size
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}  # near-lossless: the toy clips' colours survive the round trip
        for image in frames:
            frame = av.VideoFrame.from_image(image.convert("RGB").crop((0, 0, stream.width, stream.height)))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path

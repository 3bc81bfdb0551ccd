"""A cheap fingerprint of a checkpoint folder, so answers of two different models never share a file.

Two checkpoints can have the same folder name (``llava-v1.5-7b`` fine-tuned twice) and the same
shapes, so names, sizes and safetensors headers alone do not tell them apart. The fingerprint hashes

* every small file (configs, tokenizer, ``*.json``, ``tokenizer.model``) in full, and
* for every weight file its size plus ``SAMPLES`` evenly spaced ``CHUNK``-byte slices of its content
  (about 1 MiB read per file, whatever its size: milliseconds for a 14 GB checkpoint),

over the folder itself, its shipped ``lpm/`` folder, and, for original-format LLaVA folders, the vision
tower folder named by ``mm_vision_tower`` when it is a local path (a hub id's snapshot is not included).
Two folders with the same files give the same fingerprint wherever they live.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 64 * 1024
SAMPLES = 16
SMALL_FILE = 4 * CHUNK  # files up to this size are hashed whole
_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt"}


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        if size <= SMALL_FILE:
            h.update(f.read())
            return
        for i in range(SAMPLES):
            f.seek((size - CHUNK) * i // (SAMPLES - 1))
            h.update(f.read(CHUNK))


def _hash_folder(h: "hashlib._Hash", folder: Path, tag: str, names: tuple[str, ...] | None = None) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SUFFIXES
                   and (names is None or p.name in names))  # fmt: skip
    h.update(f"[{tag}] {len(files)}\0".encode())
    for path in files:
        _hash_file(h, path)


def _local_tower(folder: Path) -> Path | None:
    try:
        tower = json.loads((folder / "config.json").read_text()).get("mm_vision_tower")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(tower, str):
        return None
    for candidate in (Path(tower), folder / tower):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


def folder_fingerprint(folder: str | os.PathLike, length: int = 16) -> str:
    """Hex digest (``length`` characters) of a checkpoint or LPM folder; see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {folder}: not a folder")
    h = hashlib.sha256()
    _hash_folder(h, folder, "model")
    for tag, extra in (("lpm", folder / "lpm"), ("tower", _local_tower(folder))):
        if extra is not None and extra.is_dir():
            _hash_folder(h, extra, tag)
    return h.hexdigest()[:length]


def module_fingerprint(folder: str | os.PathLike, names: tuple[str, ...], length: int = 16) -> str:
    """The fingerprint of a trained-module folder (an LPM's or ATP modules'): only the files ``names`` (weights and
    config), so a training output folder, which also holds trainer state, arguments and ``checkpoint-N/``, keeps its
    fingerprint when only those change. A folder holding just ``names`` has its :func:`folder_fingerprint`."""
    h = hashlib.sha256()
    _hash_folder(h, Path(folder), "model", names)
    return h.hexdigest()[:length]

"""The Learnable Pruning Module (LPM) of LearnPruner (paper Eq. 3-4).

A two-layer MLP maps each vision-encoder feature to two logits (prune, keep). At inference the
keep probability is the token's importance score; in training a straight-through estimator
passes the hard 0/1 decision forward and the soft probability's gradient backward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file

LPM_WEIGHTS = "lpm.safetensors"
LPM_CONFIG = "lpm_config.json"
KEEP = 1  # logit index of the "keep" class
SHIPPED_LPM_DIR = "lpm"  # a checkpoint folder may ship its trained LPM here (the toy default does)


def shipped_module_path(model_dir: str | os.PathLike | None, name: str, *files: str) -> str | None:
    """``model_dir/name`` when it holds every one of ``files`` (a trained module shipped with a checkpoint), else None."""
    if not model_dir:
        return None
    folder = Path(model_dir) / name
    return str(folder) if all((folder / f).is_file() for f in files) else None


def shipped_lpm_path(model_dir: str | os.PathLike | None) -> str | None:
    """``model_dir/lpm`` when it holds a trained LPM (``lpm.safetensors`` + ``lpm_config.json``), else None."""
    return shipped_module_path(model_dir, SHIPPED_LPM_DIR, LPM_WEIGHTS, LPM_CONFIG)


class LearnablePruningModule(nn.Module):
    """``in_features -> hidden_features -> 2``; 1024 -> 512 -> 2 has 525,826 parameters."""

    def __init__(self, in_features: int, hidden_features: int = 512):
        super().__init__()
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, 2)
        self.trained = False  # set by from_pretrained / the trainer; untrained LPMs are warned about

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., in_features] -> logits [..., 2] (fp32 for a stable softmax)."""
        if features.shape[-1] != self.in_features:
            raise ValueError(
                f"LPM expects {self.in_features}-d vision features but the encoder gives {features.shape[-1]}-d; "
                "this LPM was trained for a different vision tower"
            )
        return self.fc2(self.act(self.fc1(features.to(self.fc1.weight.dtype)))).float()

    def keep_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Importance score = soft keep probability, [..., N]."""
        return self(features).softmax(-1)[..., KEEP]

    def keep_mask(self, features: torch.Tensor) -> torch.Tensor:
        """Hard 0/1 keep mask with straight-through gradients of the soft mask, [..., N]."""
        soft = self(features).softmax(-1)
        hard = nn.functional.one_hot(soft.argmax(-1), 2).to(soft.dtype)
        return (hard - soft.detach() + soft)[..., KEEP]

    # -- a small, separate file that loads onto any compatible base ---------------------------
    def save_pretrained(self, path: str | os.PathLike, **metadata) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / (LPM_WEIGHTS + ".tmp")))
        os.replace(path / (LPM_WEIGHTS + ".tmp"), path / LPM_WEIGHTS)
        config = {"in_features": self.in_features, "hidden_features": self.hidden_features, "trained": self.trained}
        (path / LPM_CONFIG).write_text(json.dumps({**config, **metadata}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LearnablePruningModule":
        path = Path(path)
        folder = path.parent if path.suffix == ".safetensors" else path
        weights = path if path.suffix == ".safetensors" else path / LPM_WEIGHTS
        if not weights.is_file() or not (folder / LPM_CONFIG).is_file():
            raise FileNotFoundError(
                f"no LPM at {path}: expected {LPM_WEIGHTS} and {LPM_CONFIG} (written by llava.train.train_lpm)"
            )
        config_file = folder / LPM_CONFIG
        try:
            config = json.loads(config_file.read_text())
            lpm = cls(int(config["in_features"]), int(config.get("hidden_features", 512)))
        except (ValueError, KeyError, TypeError) as err:  # bad JSON, a missing key, a non-integer width
            raise ValueError(
                f"bad LPM config {config_file}: {type(err).__name__}: {err}; it must be a JSON object with integer "
                "'in_features' and 'hidden_features' (re-save the LPM with llava.train.train_lpm)"
            ) from None
        try:
            state = load_file(str(weights))
            lpm.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on corrupt files
            raise ValueError(
                f"cannot load LPM weights {weights}: {str(err).splitlines()[0]}; the file is corrupt or truncated, or "
                f"does not match {config_file} ({lpm.in_features} -> {lpm.hidden_features} -> 2); re-copy or retrain it"
            ) from None
        lpm.trained = bool(config.get("trained", True))
        return lpm

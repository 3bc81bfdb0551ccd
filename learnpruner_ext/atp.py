"""The Adaptive Token Pruning (ATP) modules of ATP-LLaVA (Ye et al., CVPR 2025; paper: atp-llava.txt, SPEC §3).

One :class:`ATPLayerModule` sits before each decoder layer ``k`` of ``layers`` (LLaVA-1.5-7B: 4, 14, 24 of 32). It
reads three per-token scores of the vision tokens still in the sequence and predicts two thresholds:

* ``S_self`` (Eq. 3) and ``S_cross`` (Eq. 4), computed by the method from the previous layer's q/k
  (:mod:`learnpruner_ext.methods.atp`); ``S_redundant = (S_self + S_cross) / 2``;
* ``S_spatial`` (Eq. 5): :func:`spatial_scores`, fixed per patch of the raster grid;
* ``z = Linear(cat(S_self, S_cross))`` (Eq. 6), ``theta_r = sigmoid(Linear_r(z))``, ``theta_s = sigmoid(Linear_s(z))``
  (Eqs. 7-8). The input width is ``2 N`` with ``N`` the model's vision tokens per image (576 for LLaVA-1.5): a layer
  that sees fewer tokens (an earlier module pruned some) writes each token's scores at its patch's slot and zeros
  at the slots of pruned patches (:meth:`ATPLayerModule.thresholds`);
* the soft mask (Eqs. 9-11) ``max(sigmoid((S_r - theta_r) T), sigmoid((S_s - theta_s) T))`` for training
  (:meth:`ATPLayerModule.soft_mask`), and the hard decision at inference (:meth:`ATPLayerModule.keep_mask`):
  ``S_r >= theta_r or S_s >= theta_s``, which is ``soft mask >= 0.5`` in exact arithmetic for any ``T > 0`` (the
  sigmoid is increasing and equals 0.5 at 0), computed without the sigmoid so that neither a large ``T`` (saturation)
  nor rounding near 0.5 changes which tokens are kept.

:class:`ATPModules` holds one module per layer and saves/loads them as ``atp.safetensors`` + ``atp_config.json``
(layers, N, hidden width, temperature, lambda_sample, spatial strides, the S_self kind, the S_redundant
normalisation, whether trained, the training target).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lpm import shipped_module_path

ATP_WEIGHTS = "atp.safetensors"
ATP_CONFIG = "atp_config.json"
SHIPPED_ATP_DIR = "atp"  # a checkpoint folder may ship its trained ATP modules here (like lpm/ for LearnPruner)

LAMBDA_SAMPLE = 3.0  # the paper's lambda_sample (Sec. 4.1)
# uniform spatial samples every s-th row and column, nominal rate R_s = 1/s^2: 1/4, 1/9, 1/16 (scores 0.25, 0.667,
# 0.8125 at lambda_sample = 3); the paper names no rates, and 1 - R_s * 3 in (0, 1] needs R_s < 1/3, i.e. s >= 2
SPATIAL_STRIDES = (2, 3, 4)
TEMPERATURE = 100.0  # T of Eqs. 9-10 (the paper gives no value; only the soft mask, i.e. training, depends on it)
HIDDEN_FEATURES = 256  # width of z (Eq. 6; the paper gives none, "lightweight")
# S_self from the attention logits (Eq. 3 as written) or from the softmax probabilities (as S_cross, Eq. 4)
SELF_SCORES = ("logits", "attention")
# what theta_r = sigmoid(.) in (0, 1) is compared with: S_redundant as it is (the paper), or divided by its largest
# value among the sample's present tokens ("max": in (0, 1], the range of S_spatial; needs positive scores, i.e.
# self_score="attention"); only the comparison changes, the thresholds' input stays the raw scores (Eq. 6)
SCORE_NORMS = ("none", "max")


def shipped_atp_path(model_dir: str | os.PathLike | None) -> str | None:
    """``model_dir/atp`` when it holds ATP modules (``atp.safetensors`` + ``atp_config.json``), else None."""
    return shipped_module_path(model_dir, SHIPPED_ATP_DIR, ATP_WEIGHTS, ATP_CONFIG)


def check_strides(strides, lambda_sample: float) -> tuple[int, ...]:
    """Strictly ascending integer strides ``s >= 2`` with ``1 - lambda_sample / s^2 > 0`` (scores in (0, 1])."""
    if (not isinstance(strides, (list, tuple)) or not strides
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides)
            or any(a >= b for a, b in zip(strides, strides[1:]))):  # fmt: skip
        raise ValueError(f"atp: spatial strides must be a strictly ascending list of integers, e.g. [2, 3, 4], got {strides!r}")
    if isinstance(lambda_sample, bool) or not isinstance(lambda_sample, (int, float)) or lambda_sample <= 0:
        raise ValueError(f"atp: lambda_sample must be a positive number (the paper: 3), got {lambda_sample!r}")
    bad = [s for s in strides if 1 - lambda_sample / s**2 <= 0]
    if bad:
        raise ValueError(f"atp: strides {bad} give a spatial score 1 - R_s * lambda_sample <= 0 (R_s = 1/s^2, "
                         f"lambda_sample = {lambda_sample}); use strides s with s^2 > lambda_sample")  # fmt: skip
    return tuple(strides)


def spatial_scores(rows: int, cols: int, strides=SPATIAL_STRIDES, lambda_sample: float = LAMBDA_SAMPLE) -> torch.Tensor:
    """Eq. 5 on a ``rows x cols`` raster grid: [rows * cols] row-major.

    The sample of stride ``s`` is every patch ``(r, c)`` with ``r % s == 0`` and ``c % s == 0`` (from the top-left
    patch), at the nominal rate ``R_s = 1/s^2``; its patches score ``1 - R_s * lambda_sample``. A patch in several
    samples takes the largest score (the sparsest sample it belongs to), a patch in none scores 0. So a threshold
    ``theta_s`` keeps exactly the union of the samples whose score reaches it: the spatial threshold chooses the
    sampling rate.

    Worked by hand (4 x 4 grid, strides 2, 3, 4, lambda 3: scores 0.25, 2/3, 0.8125)::

        0.8125  0     0.25  0.6667      patch (0, 0) is in all three samples -> 0.8125 (stride 4)
        0       0     0     0           (0, 2), (2, 0), (2, 2) only in stride 2 -> 0.25
        0.25    0     0.25  0           (0, 3), (3, 0), (3, 3) in stride 3 -> 2/3
        0.6667  0     0     0.6667
    """
    strides = check_strides(strides, lambda_sample)
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    score = torch.zeros(rows, cols)
    for s in strides:
        in_sample = (r % s == 0) & (c % s == 0)
        score = torch.where(in_sample, torch.maximum(score, torch.tensor(1 - lambda_sample / s**2)), score)
    return score.flatten()


def redundant_scores(s_self: torch.Tensor, s_cross: torch.Tensor) -> torch.Tensor:
    """``S_redundant``: the mean of the self- and cross-modality scores (Sec. 3.3.1)."""
    return (s_self + s_cross) / 2


def normalized_redundant(s_self: torch.Tensor, s_cross: torch.Tensor, score_norm: str = "none",
                         present: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """[B, Nv] fp32 ``S_redundant`` as the threshold sees it (:data:`SCORE_NORMS`); ``present`` [B, Nv] bool marks the
    tokens the per-sample maximum is taken over (inference: the non-padding slots; training: mask > 0.5)."""
    s_r = redundant_scores(s_self.float(), s_cross.float())
    if score_norm == "none":
        return s_r
    top = s_r if present is None else s_r.masked_fill(~present, float("-inf"))
    return s_r / top.amax(-1, keepdim=True).clamp(min=torch.finfo(s_r.dtype).tiny)


class ATPLayerModule(nn.Module):
    """The threshold predictor of one ATP module (Eqs. 6-8) and its masks (Eqs. 9-11)."""

    def __init__(self, num_tokens: int, hidden_features: int = HIDDEN_FEATURES, score_norm: str = "none"):
        super().__init__()
        self.num_tokens, self.score_norm = num_tokens, score_norm
        self.proj = nn.Linear(2 * num_tokens, hidden_features)  # Eq. 6
        self.head_r = nn.Linear(hidden_features, 1)  # Eq. 7
        self.head_s = nn.Linear(hidden_features, 1)  # Eq. 8

    def thresholds(self, s_self: torch.Tensor, s_cross: torch.Tensor, slots: torch.Tensor,
                   valid: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(theta_r [B], theta_s [B]) from the scores [B, Nv] of the vision tokens present, ``slots`` [B, Nv] their
        patch indices in ``[0, N)``; ``valid`` [B, Nv] marks real tokens (padding slots are ignored). Each score is
        written at its patch's slot of a width-N vector; slots of pruned (or padding) tokens stay 0. ``weights``
        [B, Nv] (training: each token's soft presence, the product of the earlier modules' masks) scales each score
        written, so a token with weight 0 reads exactly as a pruned one."""
        batch = s_self.shape[0]
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_tokens):
            raise ValueError(f"atp: vision token slots must be in [0, {self.num_tokens}), got {slots.min()}..{slots.max()}")
        ok = torch.ones_like(slots, dtype=torch.bool) if valid is None else valid
        dtype = self.proj.weight.dtype
        if weights is not None:
            s_self, s_cross = s_self * weights, s_cross * weights
        x = torch.zeros(batch, 2, self.num_tokens, dtype=dtype, device=s_self.device)
        rows = torch.arange(batch, device=slots.device)[:, None].expand_as(slots)
        x = x.index_put((rows[ok], torch.zeros_like(slots[ok]), slots[ok]), s_self[ok].to(dtype))
        x = x.index_put((rows[ok], torch.ones_like(slots[ok]), slots[ok]), s_cross[ok].to(dtype))
        z = self.proj(x.flatten(1))  # cat(S_self, S_cross): [B, 2N]
        return torch.sigmoid(self.head_r(z)).squeeze(-1).float(), torch.sigmoid(self.head_s(z)).squeeze(-1).float()

    def soft_mask(self, s_self, s_cross, s_spatial, slots, temperature: float, valid=None, weights=None) -> torch.Tensor:
        """Eqs. 9-11, differentiable (training): [B, Nv] in [0, 1]; ``weights`` as in :meth:`thresholds` (they scale
        the thresholds' input only; each token's own mask compares its unscaled scores)."""
        theta_r, theta_s = self.thresholds(s_self, s_cross, slots, valid, weights)
        present = valid if weights is None else (weights > 0.5) if valid is None else valid & (weights > 0.5)
        s_r = normalized_redundant(s_self, s_cross, self.score_norm, present)
        mask_r = torch.sigmoid((s_r - theta_r[:, None]) * temperature)
        mask_s = torch.sigmoid((s_spatial.float() - theta_s[:, None]) * temperature)
        return torch.maximum(mask_r, mask_s)

    def keep_mask(self, s_self, s_cross, s_spatial, slots, valid=None) -> torch.Tensor:
        """The hard decision at inference: [B, Nv] bool, ``S_r >= theta_r or S_s >= theta_s`` (= soft mask >= 0.5)."""
        theta_r, theta_s = self.thresholds(s_self, s_cross, slots, valid)
        s_r = normalized_redundant(s_self, s_cross, self.score_norm, valid)
        return (s_r >= theta_r[:, None]) | (s_spatial.float() >= theta_s[:, None])


class ATPModules(nn.Module):
    """The ATP modules of one model: one :class:`ATPLayerModule` per decoder layer in ``layers``."""

    def __init__(self, layers, num_tokens: int, hidden_features: int = HIDDEN_FEATURES,
                 temperature: float = TEMPERATURE, lambda_sample: float = LAMBDA_SAMPLE, strides=SPATIAL_STRIDES,
                 num_layers: int | None = None, target_tokens: int | None = None, self_score: str = "logits",
                 score_norm: str = "none"):  # fmt: skip
        super().__init__()
        layers = tuple(int(k) for k in layers)
        if not layers or any(a >= b for a, b in zip(layers, layers[1:])) or layers[0] < 1:
            raise ValueError(f"atp: module layers must be strictly ascending decoder layers >= 1, got {list(layers)}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"atp: num_tokens must be a positive integer, got {num_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"atp: temperature must be a positive number, got {temperature!r}")
        self.layers, self.num_tokens, self.hidden_features = layers, num_tokens, int(hidden_features)
        self.temperature, self.lambda_sample = float(temperature), float(lambda_sample)
        self.strides = check_strides(tuple(strides), lambda_sample)
        if self_score not in SELF_SCORES:
            raise ValueError(f"atp: self_score must be one of {list(SELF_SCORES)}, got {self_score!r}")
        if score_norm not in SCORE_NORMS:
            raise ValueError(f"atp: score_norm must be one of {list(SCORE_NORMS)}, got {score_norm!r}")
        if score_norm == "max" and self_score != "attention":
            raise ValueError("atp: score_norm='max' needs positive scores: use self_score='attention' (attention "
                             "logits can be negative)")  # fmt: skip
        self.num_layers, self.target_tokens, self.self_score = num_layers, target_tokens, self_score
        self.score_norm = score_norm
        self.blocks = nn.ModuleDict({str(k): ATPLayerModule(num_tokens, self.hidden_features, score_norm) for k in layers})
        self.trained = False  # set by from_pretrained / a trainer; an untrained module is warned about

    def __getitem__(self, layer: int) -> ATPLayerModule:
        return self.blocks[str(layer)]

    def config_dict(self) -> dict:
        return {"layers": list(self.layers), "num_tokens": self.num_tokens, "hidden_features": self.hidden_features,
                "temperature": self.temperature, "lambda_sample": self.lambda_sample, "strides": list(self.strides),
                "self_score": self.self_score, "score_norm": self.score_norm, "num_layers": self.num_layers,
                "target_tokens": self.target_tokens, "trained": self.trained}  # fmt: skip

    def save_pretrained(self, path: str | os.PathLike, **metadata) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / (ATP_WEIGHTS + ".tmp")))
        os.replace(path / (ATP_WEIGHTS + ".tmp"), path / ATP_WEIGHTS)
        (path / ATP_CONFIG).write_text(json.dumps({**self.config_dict(), **metadata}, indent=2))

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        """The ``atp_config.json`` of an ATP folder (or of the folder of its ``atp.safetensors``); one clear error
        for a missing folder or file, or a config that is not a JSON object."""
        path = Path(path)
        folder = path.parent if path.suffix == ".safetensors" else path
        weights = path if path.suffix == ".safetensors" else path / ATP_WEIGHTS
        if not weights.is_file() or not (folder / ATP_CONFIG).is_file():
            raise FileNotFoundError(f"no ATP modules at {path}: expected {ATP_WEIGHTS} and {ATP_CONFIG} "
                                    "(written by ATPModules.save_pretrained)")  # fmt: skip
        try:
            config = json.loads((folder / ATP_CONFIG).read_text())
        except ValueError as err:
            raise ValueError(f"bad ATP config {folder / ATP_CONFIG}: {err}") from None
        if not isinstance(config, dict):
            raise ValueError(f"bad ATP config {folder / ATP_CONFIG}: not a JSON object")
        return config

    @classmethod
    def from_config(cls, config: dict) -> "ATPModules":
        """Fresh (untrained) modules of the shape ``config`` (:meth:`config_dict` or an ``atp_config.json``) records."""
        return cls(config["layers"], int(config["num_tokens"]), int(config.get("hidden_features", HIDDEN_FEATURES)),
                   float(config.get("temperature", TEMPERATURE)), float(config.get("lambda_sample", LAMBDA_SAMPLE)),
                   tuple(config.get("strides", SPATIAL_STRIDES)), config.get("num_layers"),
                   config.get("target_tokens"), config.get("self_score", "logits"),
                   config.get("score_norm", "none"))  # fmt: skip

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ATPModules":
        path = Path(path)
        folder = path.parent if path.suffix == ".safetensors" else path
        weights = path if path.suffix == ".safetensors" else path / ATP_WEIGHTS
        config = cls.read_config(path)
        try:
            modules = cls.from_config(config)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"bad ATP config {folder / ATP_CONFIG}: {type(err).__name__}: {err}; it needs 'layers' "
                             "(ascending decoder layers) and an integer 'num_tokens'") from None  # fmt: skip
        try:
            modules.load_state_dict(load_file(str(weights)))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type on corrupt files
            raise ValueError(f"cannot load ATP weights {weights}: {str(err).splitlines()[0]}; the file is corrupt or "
                             f"does not match {folder / ATP_CONFIG}") from None  # fmt: skip
        modules.trained = bool(config.get("trained", True))
        return modules

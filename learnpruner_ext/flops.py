"""Exact analytic FLOP and KV-cache counts for LLaVA-style models (no weights needed).

Convention (``torch.utils.flop_counter.FlopCounterMode``): 2 FLOPs per multiply-add of every matmul /
linear / convolution; biases, norms, activations, softmax, RoPE and embedding look-ups count 0.

Two figures are kept apart:

* ``tflops``: the *weight* matmuls (vision tower incl. patch convolution, projector, LLM linear layers,
  LM head at the last position only) -- exactly what ``FlopCounterMode`` reports for a prefill on CPU,
  where PyTorch's SDPA kernel has no registered FLOP formula. This is also the convention of the
  paper's Table 5 (vanilla LLaVA-1.5-7B, 60 text tokens: 8.6 TFLOPs).
* ``attn_tflops``: the attention score / value products (``QK^T`` and ``PV``, full ``S x S`` as the
  counter's SDPA formula and eager attention compute them). ``FlopCounterMode`` adds these on GPU
  (registered flash / efficient kernels) or with ``attn_implementation="eager"``.

Pruning-machinery FLOPs (LPM, diversity similarity, stage-2 scoring, projecting all tokens) are
reported apart in ``overhead_tflops``; they are known exactly for LearnPruner and for methods without
a scoring step, and are 0 (not modelled) for other methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


def _get(cfg, name, default=None):
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


@dataclass
class FlopBreakdown:
    vision: float  # vision tower weight matmuls (all layers the tower runs) + patch conv
    vision_attn: float
    projector: float
    llm: float  # decoder linear layers
    llm_attn: float
    lm_head: float
    overhead: float = 0.0  # pruning machinery (method-specific; see module docstring)

    @property
    def tflops(self) -> float:
        return (self.vision + self.projector + self.llm + self.lm_head) / 1e12

    @property
    def attn_tflops(self) -> float:
        return (self.vision_attn + self.llm_attn) / 1e12

    @property
    def overhead_tflops(self) -> float:
        return self.overhead / 1e12

    def as_dict(self) -> dict:
        out = {k: v / 1e12 for k, v in asdict(self).items()}
        out.update(tflops=self.tflops, attn_tflops=self.attn_tflops, overhead_tflops=self.overhead_tflops)
        return out


def _llm_dims(text_config):
    d = _get(text_config, "hidden_size")
    heads = _get(text_config, "num_attention_heads")
    kv_heads = _get(text_config, "num_key_value_heads") or heads
    head_dim = _get(text_config, "head_dim") or d // heads
    return d, heads, kv_heads, head_dim, _get(text_config, "intermediate_size"), _get(text_config, "vocab_size")


def vision_tower_flops(vision_config, batch: int = 1, layers_run: int | None = None) -> tuple[float, float]:
    """(weight FLOPs, attention FLOPs) of a CLIP/SigLIP-style tower on ``batch`` images."""
    dv = _get(vision_config, "hidden_size")
    inter = _get(vision_config, "intermediate_size")
    image, patch = _get(vision_config, "image_size"), _get(vision_config, "patch_size")
    channels = _get(vision_config, "num_channels", 3) or 3
    n = (image // patch) ** 2
    has_cls = _get(vision_config, "model_type", "clip_vision_model") in ("clip_vision_model", "clip")
    t = n + (1 if has_cls else 0)
    layers = _get(vision_config, "num_hidden_layers") if layers_run is None else layers_run
    conv = 2 * n * dv * channels * patch * patch
    per_layer = 2 * t * (4 * dv * dv + 2 * dv * inter)
    attn = 4 * t * t * dv
    return batch * (conv + layers * per_layer), batch * layers * attn


def qwen_vision_flops(vision_config, grid_thw: Sequence[int]) -> tuple[float, float]:
    """(weight FLOPs, attention FLOPs) of a Qwen2.5-VL ViT on one image of ``grid_thw`` patches.

    Patch embedding (a Conv3d over ``temporal_patch_size x patch x patch`` RGB voxels); per block the fused qkv,
    the output projection and the gated MLP on every patch; attention within the whole image in
    ``fullatt_block_indexes`` and within each window elsewhere (windows of ``window_size`` px: ``window_size /
    (patch * merge)`` merged tokens a side, cut at the grid's edge, as ``get_vision_window_index`` builds them);
    the merger is the projector (:func:`projector_flops_per_token`).
    """
    dv, inter, depth = _get(vision_config, "hidden_size"), _get(vision_config, "intermediate_size"), _get(vision_config, "depth")
    patch, merge = _get(vision_config, "patch_size"), _get(vision_config, "spatial_merge_size")
    voxel = _get(vision_config, "in_channels", 3) * _get(vision_config, "temporal_patch_size") * patch * patch
    t, h, w = grid_thw
    patches = t * h * w
    conv = 2 * patches * dv * voxel
    weights = conv + depth * 2 * patches * (4 * dv * dv + 3 * dv * inter)
    full = len(_get(vision_config, "fullatt_block_indexes"))
    side = _get(vision_config, "window_size") // merge // patch  # merged tokens per window side
    rows, cols = h // merge, w // merge
    windows = [min(side, rows - r) * min(side, cols - c) * merge * merge
               for r in range(0, rows, side) for c in range(0, cols, side)]  # fmt: skip
    attn = t * (full * 4 * (h * w) ** 2 * dv + (depth - full) * sum(4 * n * n * dv for n in windows))
    return weights, attn


def projector_flops_per_token(config) -> float:
    """FLOPs of the projector on one vision token: LLaVA's ``Dv -> D -> D`` MLP; Qwen2.5-VL's merger
    (``ln_q``, then ``4 Dv -> 4 Dv -> D`` on the 2x2 patches' concatenated features)."""
    from .adapters import feature_dim

    vc, tc = _get(config, "vision_config"), _get(config, "text_config")
    d, width = _get(tc, "hidden_size"), feature_dim(config)
    if _get(config, "model_type") == "qwen2_5_vl":  # ln_q, then width -> width -> out_hidden_size
        return 2 * (width * width + width * _get(vc, "out_hidden_size"))
    return 2 * (width * d + d * d)


def llm_layer_flops(text_config, seq: int) -> tuple[float, float]:
    """(linear FLOPs, attention FLOPs) of one Llama decoder layer on ``seq`` positions (prefill)."""
    d, heads, kv_heads, hd, inter, _ = _llm_dims(text_config)
    linear = 2 * seq * (d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d + 3 * d * inter)
    attn = 4 * seq * seq * heads * hd
    return linear, attn


def learnpruner_overhead_flops(config, plan, text_tokens: int, text_after_image: int) -> float:
    """FLOPs of LearnPruner's machinery beyond the model itself, exactly as the code computes them:
    LPM (Dv -> h -> 2) on all N, projecting all N tokens for diversity instead of R1, the N x N cosine
    similarity, and stage-2 scoring (q_proj on the instruction rows, k_proj on all rows, Q x S logits)."""
    from .adapters import feature_dim

    d, heads, kv_heads, hd, _, _ = _llm_dims(_get(config, "text_config"))
    dv = feature_dim(config)  # the LPM's input width
    n, r1 = plan.num_vision_tokens, plan.r1
    hidden = 512
    total = 0.0
    if r1 < n:
        total += 2 * n * (dv * hidden + hidden * 2)  # LPM
        if _get(config, "model_type") != "qwen2_5_vl":  # Qwen's ViT projects every token anyway (counted there)
            total += (n - r1) * projector_flops_per_token(config)  # projector on all N instead of R1
        total += 2 * n * n * d  # cosine similarity matrix
    if plan.layer is not None and plan.r2 is not None and plan.r2 < r1:
        s = text_tokens + r1
        q = text_after_image
        total += 2 * q * d * heads * hd + 2 * s * d * kv_heads * hd + 2 * q * s * heads * hd
    return total


def count_flops(
    config,
    tokens_per_layer: Sequence[int],
    text_tokens: int,
    *,
    batch: int = 1,
    projected_tokens: int | None = None,
    vision_layers_run: int | None = None,
    overhead: float = 0.0,
    vision_crops: int = 1,
    vision_grid: Sequence[int] | None = None,
) -> FlopBreakdown:
    """Exact prefill FLOPs of LLaVA with ``tokens_per_layer[l]`` vision tokens in LLM layer ``l``.

    ``projected_tokens``: tokens the projector maps (default: ``tokens_per_layer[0]``, i.e. R1).
    The LM head runs on the last position only (what generation needs at prefill).
    ``vision_crops``: images the vision tower runs on per sample (LLaVA-NeXT anyres: base + grid crops).
    ``vision_grid``: Qwen2.5-VL, the image's ``(t, h, w)`` patch grid; the ViT and its merger (the projector) run
    on every patch and merged token whatever the method keeps.
    """
    vc, tc = _get(config, "vision_config"), _get(config, "text_config")
    d, *_rest, vocab = _llm_dims(tc)
    if vision_grid is not None:
        vision, vision_attn = (batch * x for x in qwen_vision_flops(vc, vision_grid))
    else:
        vision, vision_attn = vision_tower_flops(vc, batch * vision_crops, vision_layers_run)
    p = tokens_per_layer[0] if projected_tokens is None else projected_tokens
    if vision_grid is not None:  # Qwen2.5-VL's merger runs inside the ViT, on every merged token
        p = vision_grid[0] * vision_grid[1] * vision_grid[2] // _get(vc, "spatial_merge_size") ** 2
    projector = batch * p * projector_flops_per_token(config)
    llm = llm_attn = 0.0
    for v in tokens_per_layer:
        lin, att = llm_layer_flops(tc, text_tokens + v)
        llm += lin
        llm_attn += att
    return FlopBreakdown(vision, vision_attn, projector, batch * llm, batch * llm_attn, batch * 2 * d * vocab, batch * overhead)


def estimate_tflops(config, tokens_per_layer: Sequence[int], text_tokens: int) -> float:
    """Prefill TFLOPs in the paper's (Table 5) convention: weight matmuls, vision tower included,
    LM head on the last position; attention products and pruning overhead excluded."""
    return count_flops(config, tokens_per_layer, text_tokens).tflops


def anyres_layout(config, height: int, width: int) -> tuple[int, int, int]:
    """(N_i, crops, newlines) of LLaVA-NeXT anyres for an ``height x width`` image: the vision tokens the LLM
    sees, the crops the vision tower runs on (1 base + grid crops), and how many of the N_i are ``image_newline``
    tokens (the rest, ``N_i - newlines``, are the vision stage's candidates).

    Follows transformers ``LlavaNextProcessor._get_number_of_features`` (with the ``default`` feature
    strategy's [CLS] drop): best pinpoint by ``select_best_resolution``; base crop ``(S/p)^2`` tokens; the
    grid's ``(S/p * rows) x (S/p * cols)`` feature map loses the padding rows/cols (``spatial_unpad``) and
    gains one ``image_newline`` token per remaining row.
    """
    from transformers.image_processing_utils import select_best_resolution

    vc = _get(config, "vision_config")
    crop, patch = _get(vc, "image_size"), _get(vc, "patch_size")
    best_h, best_w = select_best_resolution([height, width], _get(config, "image_grid_pinpoints"))
    rows, cols = best_h // crop, best_w // crop
    side = crop // patch
    cur_h, cur_w = side * rows, side * cols
    if width / height > cur_w / cur_h:  # wider than the grid: padding rows top and bottom
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return side * side + cur_h * cur_w + cur_h, 1 + rows * cols, cur_h


def anyres_num_vision_tokens(config, height: int, width: int) -> tuple[int, int]:
    """(N_i, crops) of :func:`anyres_layout`."""
    n_i, crops, _ = anyres_layout(config, height, width)
    return n_i, crops


def kv_cache_bytes(config, tokens_per_layer: Sequence[int], text_tokens: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Σ_layers (text + vision tokens) × 2 (K and V) × kv_heads × head_dim × bytes."""
    _, _, kv_heads, hd, _, _ = _llm_dims(_get(config, "text_config"))
    return batch * sum((text_tokens + v) * 2 * kv_heads * hd * bytes_per_value for v in tokens_per_layer)


def method_for(method: str, budget: int | None, num_vision_tokens: int, num_layers: int, vision_dim: int | None = None, **kw):
    """The registered method resolved for this geometry without building it (a ``MethodPlan``: its plan and
    ``overhead_flops``); ``vision_dim`` is accepted for compatibility and unused (no LPM is loaded)."""
    from .config import PruningConfig
    from .methods import plan_method

    return plan_method(PruningConfig(method, budget, **kw), num_vision_tokens=num_vision_tokens, num_layers=num_layers)


def plan_for(method: str, budget: int | None, num_vision_tokens: int, num_layers: int, vision_dim: int | None = None, **kw):
    """The method registry's TokenPlan (so every registered method is counted the same way)."""
    return method_for(method, budget, num_vision_tokens, num_layers, vision_dim, **kw).plan

"""Efficiency of visual-token pruning (paper Table 5): FLOPs, KV cache, prefill/decode time, peak memory.

    python -m llava.eval.efficiency --config-only llava-v1.5-7b --methods none,learnpruner --budgets 128,64,32
    python -m llava.eval.efficiency --analytic --config-only llava-v1.5-7b --methods none,learnpruner --budgets 128,32 --json
    python -m llava.eval.efficiency --model-path CKPT --methods none,learnpruner,fastv --budgets 192,128,64
    python -m llava.eval.efficiency --analytic --config-only llava-v1.6-vicuna-7b   # Table 5 NeXT rows

Every (method, budget) row runs in the same process on the same image+prompt pairs (POPE-style, ~60 text
tokens). ``--config-only NAME`` builds the architecture with random bf16 weights (timing only; no
checkpoint needed). ``--analytic`` needs no weights at all: FLOPs and KV size are counted per layer from
the method registry's TokenPlan (see ``learnpruner_ext.flops`` for the FLOP convention).

Measured rows also run an *oracle*: the same model fed sequences already cut to the method's per-layer
token counts by plain slicing at fixed indices (no scoring or selection), so ``prefill / oracle`` is the
cost of the pruning machinery. See docs/efficiency.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args
from learnpruner_ext.config import PruningConfig, candidate_plan, image_budget
from learnpruner_ext.flops import anyres_layout, anyres_num_vision_tokens, count_flops, kv_cache_bytes, method_for, plan_for

MIB = 2**20

# POPE-style questions; with the vicuna_v1 template they give ~60 text tokens with the LLaMA tokenizer.
POPE_QUESTIONS = [
    "Is there a dog in the image? Answer the question using a single word or phrase.",
    "Is there a traffic light in the image? Answer the question using a single word or phrase.",
    "Is there a person in the image? Answer the question using a single word or phrase.",
    "Is there a dining table in the image? Answer the question using a single word or phrase.",
]
PREFIX_TOKENS = 35  # vicuna_v1 system prompt + "USER:" (+BOS), before the image, with the LLaMA tokenizer

# LLaVA-NeXT analytic defaults that reproduce the paper's Table 5 NeXT rows (derivation: docs/efficiency.md,
# "LLaVA-NeXT"): a 640x427 COCO image (the commonest POPE/COCO val2014 size, 3:2), tokens kept in every row
# besides the vision tokens = 99 (the 60-token POPE prompt + 39; fitted from the two pruned rows, which
# pin it at 98.8 whatever the image), and budgets applied per image as ``absolute`` (the pruned rows keep
# T tokens on average; ``scaled`` would keep T * N_i / 2880): the toolkit's default scope.
NEXT_DEFAULT_IMAGE_HW = (427, 640)
NEXT_DEFAULT_TEXT_TOKENS = 99
NEXT_DEFAULT_BUDGETS = "640,160"
DEFAULT_BUDGETS = "128,64,32"
# Qwen2.5-VL-7B (paper Table 4): "1280 vision tokens, a fixed input resolution"; 896x1120 px = 64x80 patches =
# 1280 merged tokens, the processor's max_pixels capped at 1280 merged tokens (28 x 28 px each); Table 4's budgets.
QWEN_DEFAULT_IMAGE_HW = (896, 1120)
QWEN_MAX_PIXELS = 1280 * 28 * 28
QWEN_MIN_PIXELS = 56 * 56  # Qwen2-VL's processor default
QWEN_DEFAULT_BUDGETS = "426,284,142"
VIDEO_LLAVA_7B = "video-llava-7b"
VIDEO_DEFAULT_BUDGETS = "456,228"  # LearnPruner Table 3: 22% and 11% of 2048


# ---------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6 config.json


def named_config(name: str):
    """LLaVA-1.5 architectures (CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna/LLaMA) and LLaVA-NeXT-7B
    (``llava-v1.6-vicuna-7b``: the same tower and LLM, anyres over ``NEXT_GRID_PINPOINTS``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    sizes = {
        "llava-v1.5-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "llava-v1.5-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
        "llava-v1.6-vicuna-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    }
    if name == QWEN_7B:
        return qwen2_5_vl_7b_config()
    if name not in [*sizes, VIDEO_LLAVA_7B]:
        raise ValueError(f"unknown --config-only {name!r}; known: {', '.join([*sizes, QWEN_7B, VIDEO_LLAVA_7B])}")
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224 if name == VIDEO_LLAVA_7B else 336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    s = sizes.get(name, sizes["llava-v1.5-7b"])
    text = LlamaConfig(
        vocab_size=32064, num_key_value_heads=s["num_attention_heads"], max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, **s,
    )  # fmt: skip
    if name == VIDEO_LLAVA_7B:  # LanguageBind/Video-LLaVA-7B-hf: LanguageBind CLIP-L/14 224 px towers, 8 x 257 per video
        from transformers import VideoLlavaConfig

        return VideoLlavaConfig(
            vision_config=vision, text_config=text, image_token_index=32000, video_token_index=32001,
            projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
            image_seq_length=256, video_seq_length=2056, tie_word_embeddings=False,
        )  # fmt: skip
    if name.startswith("llava-v1.6"):
        return LlavaNextConfig(
            vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
            vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
            image_grid_pinpoints=NEXT_GRID_PINPOINTS, tie_word_embeddings=False,
        )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
        tie_word_embeddings=False,
    )  # fmt: skip


QWEN_7B = "qwen2.5-vl-7b"


def qwen2_5_vl_7b_config():
    """Qwen/Qwen2.5-VL-7B-Instruct's config.json: 32-block ViT (1280 wide, window 112 px, full attention in blocks
    7/15/23/31), 2x2 merger to 3584, Qwen2 LLM of 28 layers (28 heads, 4 KV heads), vocabulary 152064."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                                             "rope_theta": 1000000.0}),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=False,
    )  # fmt: skip


def geometry(config) -> tuple[int, int, int]:
    """(reference N, LLM layers, the width of the features methods read)."""
    from learnpruner_ext.adapters import adapter_for

    adapter = adapter_for(config)
    return adapter.reference_tokens(config), config.text_config.num_hidden_layers, adapter.feature_dim(config)


def is_qwen(config) -> bool:
    return config.model_type == "qwen2_5_vl"


def qwen_grid(config, image_hw: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(t, h, w) patches of one ``image_hw`` image as Qwen2-VL's processor resizes it (smart_resize to multiples of
    patch x merge px within [QWEN_MIN_PIXELS, QWEN_MAX_PIXELS]; default the 1280-token 896x1120 input)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(*(image_hw or QWEN_DEFAULT_IMAGE_HW), factor=factor, min_pixels=QWEN_MIN_PIXELS,
                        max_pixels=QWEN_MAX_PIXELS)  # fmt: skip
    return 1, h // vc.patch_size, w // vc.patch_size


def is_video(config) -> bool:
    """Video-LLaVA: the benchmark's visual input is one video (F frames, F x (P + 1) tokens)."""
    return config.model_type == "video_llava"


def is_anyres(config) -> bool:
    return getattr(config, "image_grid_pinpoints", None) is not None


def reference_tokens(config) -> int:
    """Nominal vision tokens of the model (the budget's reference N, the family adapter's): 576 for LLaVA-1.5;
    base crop + the largest grid = (1 + 4) x 576 = 2880 for llava-v1.6; 1280 for Qwen2.5-VL."""
    return geometry(config)[0]


def image_geometry(config, image_hw: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """(N_i vision tokens, LLM layers, vision width, tower crops) of one image: LLaVA-1.5 ignores ``image_hw``;
    anyres counts ``image_hw`` (default: the paper-matching 427x640) with ``anyres_num_vision_tokens``."""
    n, layers, dv = geometry(config)
    if is_qwen(config):
        t, h, w = qwen_grid(config, image_hw)
        return t * h * w // config.vision_config.spatial_merge_size**2, layers, dv, 1
    if is_video(config):  # the tower runs on every frame; N_i counts each frame's [CLS] row too
        from learnpruner_ext.adapters.video_llava import video_frames

        return config.video_seq_length, layers, dv, video_frames(config)
    if not is_anyres(config):
        return n, layers, dv, 1
    n_i, crops = anyres_num_vision_tokens(config, *(image_hw or NEXT_DEFAULT_IMAGE_HW))
    return n_i, layers, dv, crops


def build_random_model(config, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """The architecture with random weights created directly in ``dtype`` (no fp32 copy, no uninitialised
    memory): small normals drawn in place, norms set to 1, biases to 0."""
    from transformers.initialization import no_init_weights

    from llava.model.builder import PRUNABLE_CLASSES

    model_class = PRUNABLE_CLASSES[config.model_type]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def method_budgets(methods: list[str], budgets: list[int], config=None, plan_kw=None, image_hw=None) -> list[tuple[str, int | None]]:
    """(method, budget) pairs; with ``config``, pairs whose budget the method cannot meet are skipped (stderr)."""
    from learnpruner_ext.config import BudgetError

    rows = []
    for m in methods:
        for b in [None] if m == "none" else budgets:
            if config is not None:
                n, layers, dv, _ = image_geometry(config, image_hw)
                kw = dict(plan_kw or {})
                ref = reference_tokens(config)
                b_i = image_budget(b, n, ref, kw.pop("budget_scope", PruningConfig.budget_scope))
                try:  # the image's plan, and the reference plan the method is built with
                    plan_for(m, b_i, n, layers, dv, **kw)
                    plan_for(m, b, ref, layers, dv, **kw)
                except BudgetError as e:
                    print(f"[efficiency] skipping {m} T={b}: {e}", file=sys.stderr)
                    continue
            rows.append((m, b))
    return rows


def analytic_row(config, method: str, budget: int | None, text_tokens: int, text_after_image: int | None = None,
                 bytes_per_value: int = 2, image_hw: tuple[int, int] | None = None, **plan_kw) -> dict:  # fmt: skip
    """FLOPs and KV cache of one (method, budget), from the registry's TokenPlan; no weights.

    Anyres (LLaVA-NeXT): one ``image_hw`` image gives ``N_i`` tokens (``anyres_num_vision_tokens``), the
    tower runs on every crop, and ``budget`` becomes the image's budget by ``plan_kw["budget_scope"]``
    (``learnpruner_ext.config.image_budget``)."""
    n, layers, dv, crops = image_geometry(config, image_hw)
    scope = plan_kw.pop("budget_scope", PruningConfig.budget_scope)
    this_budget = image_budget(budget, n, reference_tokens(config), scope)
    pruner = method_for(method, this_budget, n, layers, dv, **plan_kw)
    plan = pruner.plan
    if is_anyres(config):  # newlines are never vision-stage candidates (learnpruner_ext.config.candidate_plan)
        n_i, _, newlines = anyres_layout(config, *(image_hw or NEXT_DEFAULT_IMAGE_HW))
        plan = candidate_plan(plan, n_i - newlines)
    elif is_video(config):  # nor are a video's per-frame [CLS] rows
        plan = candidate_plan(plan, reference_tokens(config))
    tpl = plan.tokens_per_layer
    after = text_tokens - PREFIX_TOKENS if text_after_image is None else text_after_image
    overhead = pruner.overhead_flops(config, text_tokens, after)
    grid = qwen_grid(config, image_hw) if is_qwen(config) else None
    fl = count_flops(config, tpl, text_tokens, overhead=overhead, vision_crops=crops, vision_grid=grid)
    kv = kv_cache_bytes(config, tpl, text_tokens, bytes_per_value)
    return {
        "method": method,
        "budget": budget,
        "image_budget": this_budget,
        "budget_scope": scope,
        "num_vision_tokens": n,
        "vision_crops": crops,
        "r1": plan.r1,
        "r2": plan.r2,
        "layer": plan.layer,
        "avg_vision_tokens": plan.average,
        "text_tokens": text_tokens,
        "tflops": fl.tflops,
        "attn_tflops": fl.attn_tflops,
        "overhead_tflops": fl.overhead_tflops,
        "kv_cache_mb": kv / MIB,
        "kv_cache_bytes": kv,
    }


# ---------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak memory of a block: CUDA max allocated (GPU), else peak RSS delta (VmHWM after resetting it)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            self.base = _rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(_rss_bytes("VmHWM") - self.base, 0)


def cache_nbytes(cache) -> int:
    """Bytes held by a DynamicCache's key and value tensors (read from the tensors themselves)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


@dataclass
class Sample:
    prefix: torch.Tensor  # [1, P] ids before the image
    suffix: torch.Tensor  # [1, Q] ids after the image
    pixel_values: torch.Tensor  # [1, 3, H, W] (LLaVA-NeXT: [1, crops, 3, H, W]; Qwen2.5-VL: [patches, C*T*p*p])
    num_image_tokens: int  # N_i: the image's placeholders (model.image_token_counts)
    image_hw: tuple[int, int] | None = None  # (H, W) the counts follow (LLaVA-NeXT, Qwen2.5-VL)
    extra: dict = field(default_factory=dict)  # the family's other vision inputs (image_sizes, image_grid_thw)
    is_video: bool = False  # Video-LLaVA: pixel_values are [1, F, 3, H, W] frames behind <video> placeholders

    def input_ids(self, config) -> torch.Tensor:
        token = config.video_token_id if self.is_video else config.image_token_id
        image = torch.full((1, self.num_image_tokens), token, dtype=torch.long, device=self.prefix.device)
        return torch.cat([self.prefix, image, self.suffix], dim=1)

    def vision_inputs(self) -> dict:
        return {"pixel_values_videos" if self.is_video else "pixel_values": self.pixel_values, **self.extra}


def synthetic_samples(config, num: int, text_tokens: int, device, dtype, seed: int = 0, image_hw=None) -> list[Sample]:
    """Random ids (same split as a POPE prompt: PREFIX_TOKENS before the image) and random pixels; anyres: one
    ``image_hw`` image (default 427x640) as its crops, ``N_i`` placeholders (``anyres_num_vision_tokens``);
    Qwen2.5-VL: the patches of one ``image_hw`` image (default the 1280-token 896x1120), wrapped in
    ``<|vision_start|>``/``<|vision_end|>`` (counted in the text tokens)."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    prefix_len = min(PREFIX_TOKENS, text_tokens - 1)
    n_i, _, _, crops = image_geometry(config, image_hw)
    special = {config.image_token_id, getattr(config, "video_token_id", None)}
    out = []
    for _ in range(num):
        ids = torch.randint(5, vocab, (1, text_tokens), generator=g)
        ids[torch.isin(ids, torch.tensor([t for t in special if t is not None]))] = 5
        ids[0, 0] = config.text_config.bos_token_id or 1
        extra, hw = {}, None
        if is_qwen(config):
            vc, hw = config.vision_config, image_hw or QWEN_DEFAULT_IMAGE_HW
            grid = qwen_grid(config, hw)
            ids[0, prefix_len - 1], ids[0, prefix_len] = config.vision_start_token_id, config.vision_end_token_id
            pix = torch.randn(grid[0] * grid[1] * grid[2], vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, generator=g)
            extra["image_grid_thw"] = torch.tensor([grid], device=device)
        elif is_anyres(config):
            size, hw = config.vision_config.image_size, image_hw or NEXT_DEFAULT_IMAGE_HW
            pix = torch.randn(1, crops, 3, size, size, generator=g)
            extra["image_sizes"] = torch.tensor([hw], device=device)
        elif is_video(config):
            size = config.vision_config.image_size
            pix = torch.randn(1, crops, 3, size, size, generator=g)
        else:
            size = config.vision_config.image_size
            pix = torch.randn(1, 3, size, size, generator=g)
        out.append(Sample(ids[:, :prefix_len].to(device), ids[:, prefix_len:].to(device), pix.to(device, dtype), n_i, hw,
                          extra, is_video(config)))  # fmt: skip
    return out


def checkpoint_samples(model, tokenizer, image_processor, num: int, device, dtype, image_hw=None) -> list[Sample]:
    """POPE-style prompts through the real template and tokenizer, with random-noise images (336x336, or
    ``image_hw``) preprocessed as the model's processor does it (anyres for LLaVA-NeXT)."""
    from PIL import Image

    from llava.inference import build_prompt
    from llava.mm_utils import image_inputs, tokenizer_image_token, video_inputs

    h, w = image_hw or (336, 336)
    conv = "qwen2_5_vl" if is_qwen(model.config) else "vicuna_v1"
    out = []
    for i in range(num):
        prompt = build_prompt(POPE_QUESTIONS[i % len(POPE_QUESTIONS)], conv)
        ids = tokenizer_image_token(prompt, tokenizer, model.config.image_token_id, num_image_tokens=1, expected_images=1)
        ids = torch.tensor(ids)[None]
        pos = int((ids[0] == model.config.image_token_id).nonzero()[0])
        g = torch.Generator().manual_seed(i)
        if is_video(model.config):  # one video of noise frames
            from learnpruner_ext.adapters.video_llava import video_frames

            frames = video_frames(model.config)
            clip = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(frames)]
            pixel_values = video_inputs([clip], image_processor, model.config)["pixel_values_videos"]
            out.append(Sample(ids[:, :pos].to(device), ids[:, pos + 1 :].to(device), pixel_values.to(device, dtype),
                              model.video_token_counts([frames])[0], is_video=True))  # fmt: skip
            continue
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        vision = image_inputs([Image.fromarray(pixels)], image_processor, model.config)
        pixel_values = vision.pop("pixel_values")
        layout = vision.get("image_grid_thw", vision.get("image_sizes"))
        n_i = model.image_token_counts(layout, 1)[0]
        extra = {k: v.to(device) for k, v in vision.items()}
        out.append(Sample(ids[:, :pos].to(device), ids[:, pos + 1 :].to(device), pixel_values.to(device, dtype), n_i,
                          None if layout is None else (h, w), extra))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------
@torch.inference_mode()
def run_generation(model, sample: Sample, max_new_tokens: int, device) -> dict:
    """Prefill (time to first token) then ``max_new_tokens - 1`` greedy decode steps with the KV cache."""
    from transformers import DynamicCache

    ids = sample.input_ids(model.config)
    mask = torch.ones_like(ids)
    cache = DynamicCache(config=model.config.text_config)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                **sample.vision_inputs())  # fmt: skip
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    kv = cache_nbytes(cache)
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "total_s": t2 - t0, "decode_s": t2 - t1, "kv_bytes": kv,
            "prefill_cpu_share": cpu_share(c1 - c0, t1 - t0, device)}


def cpu_share(cpu_s: float, wall_s: float, device) -> float | None:
    """CPU time this process got during a timed region / (wall time x torch threads); None on GPU. Well below 1
    means other processes took the cores: the Linux scheduler's autogroups share CPU between sessions equally
    whatever their ``nice`` value, so a niced job in another shell still halves a timing run's speed."""
    if device.type != "cpu" or wall_s <= 0:
        return None
    return cpu_s / (wall_s * torch.get_num_threads())


def oracle_prefill(model, sample: Sample, device) -> dict:
    """Prefill (``run_generation``'s dict, one token) of the attached method's token counts with fixed indices and no scoring
    (:class:`learnpruner_ext.methods.oracle.FixedIndexOracle`), through the same model, cuts and cache; vanilla
    (no method) is its own oracle and is not run twice (:func:`measure`)."""
    from learnpruner_ext.methods.oracle import FixedIndexOracle

    method = model.pruner
    model.model.set_pruner(None if method is None else FixedIndexOracle(method))
    try:
        return run_generation(model, sample, 1, device)
    finally:
        model.model.set_pruner(method)


def overhead_breakdown(model, sample: Sample, max_new_tokens: int, device) -> dict:
    """One extra prefill timed by the core's own hooks (``learnpruner_ext.timing.StageTimer``; seconds)."""
    from learnpruner_ext.timing import StageTimer

    timer = StageTimer(device)
    model.model.set_stage_timer(timer)
    try:
        run_generation(model, sample, 1, device)
    finally:
        model.model.set_stage_timer(None)
    t = timer.seconds
    out = {
        "vision_tower_s": t.get("vision_tower", 0.0),
        "lpm_s": t.get("lpm", 0.0),
        "diversity_s": t.get("diversity", 0.0),
        "projector_s": t.get("projector", 0.0),
        "stage1_total_s": t.get("stage1_select", 0.0),
        "stage2_scoring_s": t.get("stage2_select", 0.0),
        "slicing_cache_s": t.get("stage2_cut", 0.0),
    }
    out["overhead_total_s"] = out["stage1_total_s"] + out["stage2_scoring_s"] + out["slicing_cache_s"]
    return out


CPU_SHARE_WARN = 0.8  # a timed run below this share of its threads' CPU time was slowed by other processes


def _min_share(runs: list[dict]) -> float | None:
    shares = [r["prefill_cpu_share"] for r in runs if r.get("prefill_cpu_share") is not None]
    return min(shares) if shares else None


def _median(values):
    return statistics.median(values) if values else None


def measure(model, samples, method, budget, args, device, base_plan_kw) -> dict:
    from learnpruner_ext import PruningConfig, apply_pruning

    n, layers, dv = geometry(model.config)
    if method == "none":
        model.model.set_pruner(None)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*UNTRAINED.*")
            apply_pruning(model, PruningConfig(method, budget, **base_plan_kw))
    n_i = samples[0].num_image_tokens
    plan = model.pruner.plan_for(n_i) if model.pruner is not None else plan_for("none", None, n_i, layers, dv)
    runs, oracle, kv, peaks = [], [], set(), []
    for rep in range(args.warmup + args.reps):
        for sample in samples:
            o = None
            timed_oracle = not args.no_oracle and method != "none"  # vanilla is its own oracle: no second run
            if timed_oracle and rep % 2:  # alternate the order (ABBA) against drifting machine load
                o = oracle_prefill(model, sample, device)
            with PeakMemory(device) as pm:
                r = run_generation(model, sample, args.max_new_tokens, device)
            trace = model.last_pruning_trace()  # the method's own run, not the oracle's
            if timed_oracle and not rep % 2:
                o = oracle_prefill(model, sample, device)
            if not args.no_oracle and method == "none":
                o = r
            if rep >= args.warmup:
                runs.append(r)
                peaks.append(pm.peak)
                if o is not None:
                    oracle.append(o)
            kv.add(r["kv_bytes"])
    row = {
        "method": method,
        "budget": budget,
        "r1": plan.r1,
        "r2": plan.r2,
        "layer": plan.layer,
        "avg_vision_tokens": trace.average_vision_tokens if trace else plan.average,
        "prefill_s": _median([r["prefill_s"] for r in runs]),
        "oracle_prefill_s": _median([o["prefill_s"] for o in oracle]),
        "total_s": _median([r["total_s"] for r in runs]),
        "decode_ms_per_token": 1e3 * _median([r["decode_s"] for r in runs]) / max(args.max_new_tokens - 1, 1),
        "max_new_tokens": args.max_new_tokens,
        "prefill_runs_s": [r["prefill_s"] for r in runs],
        "oracle_runs_s": [o["prefill_s"] for o in oracle],
        "min_cpu_share": _min_share(runs + oracle),
        "kv_cache_mb_measured": max(kv) / MIB,
        "kv_cache_bytes_measured": max(kv),
        "peak_mem_mb": _median(peaks) / MIB,
        "peak_mem_kind": "cuda_max_allocated" if device.type == "cuda" else "rss_delta",
    }
    if method != "none" and not args.no_breakdown:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["breakdown"] = overhead_breakdown(model, samples[0], args.max_new_tokens, device)
    return row


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------
def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["method"] == "none"), rows[0])
    measured = "prefill_s" in base
    head = ["Method", "T", "R1/R2@k", "avg tok", "TFLOPs", "ratio", "KV MiB", "ratio"]
    if measured:
        head += ["Prefill s", "speedup", "Oracle s", "oracle speedup", "pruned/oracle", "Total s", "Decode ms/tok", "Peak MiB"]
    shares = measured and any(r.get("min_cpu_share") is not None for r in rows)
    if shares:
        head += ["min CPU share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        plan = f"{r['r1']}" + (f"/{r['r2']}@{r['layer']}" if r.get("layer") is not None else "")
        cells = [
            r["method"], _fmt(r["budget"], "d", str(r["r1"]) if r["method"] == "none" else "-"), plan,
            _fmt(r["avg_vision_tokens"], ".1f"), _fmt(r["tflops"]), f"{r['tflops'] / base['tflops']:.2f}x",
            _fmt(r["kv_cache_mb"], ".1f"), f"{r['kv_cache_mb'] / base['kv_cache_mb']:.2f}x",
        ]  # fmt: skip
        if measured:
            o = r.get("oracle_prefill_s")
            cells += [
                _fmt(r["prefill_s"], ".3f"), f"{base['prefill_s'] / r['prefill_s']:.2f}x",
                _fmt(o, ".3f"), _fmt(base["prefill_s"] / o if o else None, ".2f") + ("x" if o else ""),
                _fmt(r["prefill_s"] / o if o else None, ".3f"), _fmt(r["total_s"], ".3f"),
                _fmt(r["decode_ms_per_token"], ".1f"), _fmt(r["peak_mem_mb"], ".0f"),
            ]  # fmt: skip
            if shares:
                cells.append(_fmt(r.get("min_cpu_share"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    breakdowns = [r for r in rows if r.get("breakdown")]
    if breakdowns:
        keys = list(breakdowns[0]["breakdown"])
        lines += ["", "Pruning overhead breakdown (seconds, one instrumented prefill):", "",
                  "| Method | T | " + " | ".join(k[:-2] for k in keys) + " | prefill - oracle |",
                  "|" + "---|" * (len(keys) + 3)]  # fmt: skip
        for r in breakdowns:
            b = r["breakdown"]
            diff = r["prefill_s"] - r["oracle_prefill_s"] if r.get("oracle_prefill_s") else None
            lines.append(f"| {r['method']} | {r['budget']} | " + " | ".join(f"{b[k]:.3f}" for k in keys) + f" | {_fmt(diff, '.3f')} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Efficiency of visual-token pruning (Table 5).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="checkpoint folder (HF or original LLaVA format)")
    src.add_argument("--config-only", metavar="NAME", help="architecture only, random weights: llava-v1.5-7b | llava-v1.5-13b | "
                     f"llava-v1.6-vicuna-7b | {QWEN_7B} | {VIDEO_LLAVA_7B}")
    p.add_argument("--model-base", default=None)
    p.add_argument("--methods", default="none,learnpruner", help="comma-separated registered methods")
    p.add_argument("--budgets", default=None,
                   help=f"comma-separated budgets T (ignored for 'none'); default {DEFAULT_BUDGETS}, {NEXT_DEFAULT_BUDGETS} for llava-v1.6")
    p.add_argument("--analytic", action="store_true", help="count FLOPs/KV per layer; no weights, no timing")
    p.add_argument("--text-tokens", type=int, default=None,
                   help=f"text tokens per prompt for --config-only / --analytic (default 60; {NEXT_DEFAULT_TEXT_TOKENS} for llava-v1.6)")
    p.add_argument("--image-size", default=None, metavar="HxW",
                   help="image height x width for LLaVA-NeXT (anyres token count and, measured, the image's crops); default "
                        f"{NEXT_DEFAULT_IMAGE_HW[0]}x{NEXT_DEFAULT_IMAGE_HW[1]}, 336x336 for a checkpoint's noise images")
    p.add_argument("--num-prompts", type=int, default=1, help="image+prompt pairs")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8, help="N generated tokens for total/decode time")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="bf16 on GPU and for --config-only; checkpoint dtype otherwise")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    p.add_argument("--output-json", default=None, help="also write the JSON rows to this file")
    add_pruning_args(p, exclude=("method", "budget"))  # those come from --methods / --budgets
    return _apply_model_defaults(p, p.parse_args(argv))


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise SystemExit(f"--image-size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. --image-size 480x640")


def _apply_model_defaults(parser, args):
    """Defaults that depend on the model: ``--config-only llava-v1.6-*`` reproduces the paper's NeXT rows (the
    budgets follow the config once it is known: ``budgets_for`` in :func:`main`)."""
    next_named = (args.config_only or "").startswith("llava-v1.6")
    if args.text_tokens is None:
        args.text_tokens = NEXT_DEFAULT_TEXT_TOKENS if next_named else 60
    args.image_size = parse_image_size(args.image_size)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from learnpruner_ext.methods import available_methods

    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; valid methods: {', '.join(available_methods())}")
    if "none" in methods:
        methods = ["none"] + [m for m in methods if m != "none"]
    # every PruningConfig field but method and budget, from the generated flags (--pruning-layer, --lpm-path, ...)
    plan_kw = {k: v for k, v in asdict(pruning_config_from_args(args)).items() if k not in ("method", "budget")}
    if args.threads:
        torch.set_num_threads(args.threads)

    def budgets_for(config) -> list[int]:
        text = args.budgets or (NEXT_DEFAULT_BUDGETS if is_anyres(config) else QWEN_DEFAULT_BUDGETS if is_qwen(config)
                                else VIDEO_DEFAULT_BUDGETS if is_video(config) else DEFAULT_BUDGETS)  # fmt: skip
        return [int(b) for b in text.split(",") if b.strip()]

    if args.analytic:
        if args.config_only:
            config, text_tokens, after = named_config(args.config_only), args.text_tokens, None
        else:
            from transformers import AutoConfig

            from llava.model.builder import is_llava_format

            if is_llava_format(args.model_path):
                raise SystemExit("--analytic with an original-LLaVA-format checkpoint: use --config-only NAME")
            config, text_tokens, after = AutoConfig.from_pretrained(args.model_path), args.text_tokens, None
        hw = args.image_size
        todo = method_budgets(methods, budgets_for(config), config, plan_kw, hw)
        rows = [analytic_row(config, m, b, text_tokens, after, image_hw=hw, **plan_kw) for m, b in todo]
        if "none" not in methods:
            base = analytic_row(config, "none", None, text_tokens, image_hw=hw, budget_scope=plan_kw["budget_scope"])
            rows = [base] + rows
        header = f"analytic, {text_tokens} text tokens"
        if is_anyres(config):
            n, _, _, crops = image_geometry(config, hw)
            h, w = hw or NEXT_DEFAULT_IMAGE_HW
            header += f", {h}x{w} image: N_i={n} vision tokens, {crops} crops, budget scope {plan_kw['budget_scope']}"
        elif is_video(config):
            n, _, _, frames = image_geometry(config, hw)
            header += f", one video: {frames} frames, N_i={n} vision tokens ({reference_tokens(config)} patches + {frames} [CLS])"
        elif is_qwen(config):
            n, grid = image_geometry(config, hw)[0], qwen_grid(config, hw)
            h, w = hw or QWEN_DEFAULT_IMAGE_HW
            header += f", {h}x{w} image: {grid[1]}x{grid[2]} patches, N_i={n} merged vision tokens"
        _emit(rows, args, header=header)
        return rows

    from llava.model.builder import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    t0 = time.perf_counter()
    if args.config_only:
        config = named_config(args.config_only)
        dtype = torch.bfloat16 if args.dtype == "auto" else resolve_dtype(args.dtype, device)
        model = build_random_model(config, device, dtype)
        samples = synthetic_samples(config, args.num_prompts, args.text_tokens, device, dtype, image_hw=args.image_size)
    else:
        from llava.model.builder import load_pretrained_model

        tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, args.model_base, device=str(device), dtype=args.dtype)
        config, dtype = model.config, next(model.parameters()).dtype
        samples = checkpoint_samples(model, tokenizer, image_processor, args.num_prompts, device, dtype, args.image_size)
    build_s = time.perf_counter() - t0
    text_tokens = samples[0].prefix.shape[1] + samples[0].suffix.shape[1]
    after = samples[0].suffix.shape[1]
    hw = samples[0].image_hw
    print(f"[efficiency] model ready in {build_s:.1f}s on {device} ({dtype}); {text_tokens} text tokens; "
          f"threads={torch.get_num_threads()}", file=sys.stderr)  # fmt: skip

    todo = method_budgets(methods, budgets_for(config), config, plan_kw, hw)
    if "none" not in methods:
        todo = [("none", None)] + todo
    rows = []
    for m, b in todo:
        t = time.perf_counter()
        row = measure(model, samples, m, b, args, device, plan_kw)
        row.update({k: v for k, v in analytic_row(config, m, b, text_tokens, after, dtype.itemsize, hw, **plan_kw).items() if k not in row})
        rows.append(row)
        print(f"[efficiency] {m} T={b}: prefill {row['prefill_s']:.3f}s oracle {_fmt(row['oracle_prefill_s'], '.3f')}s "
              f"({time.perf_counter() - t:.0f}s)", file=sys.stderr)  # fmt: skip
    starved = [f"{r['method']} T={r['budget']}: {r['min_cpu_share']:.2f}" for r in rows
               if r.get("min_cpu_share") is not None and r["min_cpu_share"] < CPU_SHARE_WARN]  # fmt: skip
    if starved:
        print(f"[efficiency] WARNING: other processes took the CPU during timed runs (lowest CPU share {'; '.join(starved)}, "
              f"below {CPU_SHARE_WARN}); these times are not comparable: rerun on a quiet machine (see cpu_share)",
              file=sys.stderr)  # fmt: skip
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes("VmHWM")
    if device.type != "cuda":
        print(f"[efficiency] process peak RSS since last reset: {peak / 2**30:.2f} GiB; see docs/efficiency.md", file=sys.stderr)
    if args.config_only and "learnpruner" in methods and not args.lpm_path:
        print("[efficiency] note: LearnPruner ran with an untrained LPM (timing only; selections are arbitrary)", file=sys.stderr)
    image = "" if hw is None else f", {hw[0]}x{hw[1]} image: N_i={samples[0].num_image_tokens}, scope {plan_kw['budget_scope']}"
    _emit(rows, args, header=f"{device}, {dtype}, {text_tokens} text tokens{image}, {args.num_prompts} prompt(s), "
          f"warmup {args.warmup}, reps {args.reps}, median; N={args.max_new_tokens} tokens")  # fmt: skip
    return rows


def _emit(rows, args, header: str) -> None:
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"header": header, "argv": sys.argv[1:], "rows": rows}, f, indent=2)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"<!-- {header} -->")
        print(markdown(rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""Stage 1 of the toy base: per-patch pretraining of a fresh vision tower (what CLIP gives LLaVA).

    python -m toyworld.pretrain_vision --data playground/data/toy --out checkpoints/toy-init \
        [--family llava|qwen2_5_vl] [--epochs 10] [--batch-size 64] [--lr 2e-3] [--text-layers 4] [--seed 0]

Builds a randomly initialised tiny VLM and trains only its vision tower so that every vision token's
feature (the projector's input) says what lies under its cell of the image:

* ``--family llava`` (default): 192 px, 16-px patches -> 12x12 = 144 vision tokens; CLIP ViT 4x96, Llama
  ``--text-layers`` x 128; the feature is the patch token of ``vision_feature_layer = -2`` (as LLaVA);
* ``--family qwen2_5_vl``: 192 px, 12-px patches (16x16 = 256) through a window-attention ViT 4x64 (windows of
  8x8 patches as the real model's, full attention in blocks 1 and 3), merged 2x2 into 8x8 = 64 LLM tokens of
  24x24 px each; Qwen2 LLM ``--text-layers`` x 128 with M-RoPE; the feature is the merger's input (the 2x2
  patches' last-block outputs concatenated), the one the LPM scores on Qwen (``docs/methods.md``). 8-px
  patches (144 merged tokens, as the LLaVA toy) measured 27 img/s here against 100 img/s for 12-px ones.

Targets come from the scene metadata of ``train_scenes.jsonl`` (rendered to per-pixel object masks), per cell:

* ``color`` / ``shape``: the object covering most of the patch (>= 24 of 256 pixels), else "none";
* ``center``: whether an object's bounding-box centre falls in the patch (helps counting);
* ``background``: the background colour (patches not mostly covered by an object or the label);
* ``label`` + ``glyph``: whether the printed label covers the patch, and which letter's glyph covers most
  of the patch (>= 8 glyph pixels; else "none");
* ``row`` / ``col``: the patch's own grid position (keeps position information in the features).

Most patches are plain background, so for ``color``, ``shape``, ``glyph`` and ``center`` the loss adds a
second cross-entropy over only the patches that show something (logged as ``<head>@obj``); with the plain
per-patch loss alone the tower learned colour but stayed near chance on shape and letters.

All targets are local to the patch (no image-level count or answer is pushed into every token), so the
information a question needs stays in the few patches that show it. The linear heads are thrown away;
the whole model (trained tower, random projector and LLM) is saved in HF format as the initialisation of
the VQA stage (``llava.train.train_full``). bf16 autocast + eager attention (training-speed choice on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from learnpruner_ext.tiny import CLIP_MEAN, CLIP_STD, build_qwen_tokenizer, build_tokenizer
from learnpruner_ext.tiny import image_processor_for, qwen_image_processor, tiny_configs, tiny_qwen_config
from learnpruner_ext.modeling import PrunableLlavaForConditionalGeneration, PrunableQwen2_5_VLForConditionalGeneration
from . import generate as G
from llava.train.threads import AdaptiveThreads

COLORS, SHAPES, BACKGROUNDS, LETTERS = list(G.COLORS), list(G.SHAPES), list(G.BACKGROUNDS), G.LETTERS
# head name -> number of classes (the last class of color/shape/letter2 is "none")
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "center": 2, "background": len(BACKGROUNDS),
         "label": 2, "glyph": len(LETTERS) + 1, "row": None, "col": None}
NONE_CLASS = {"color": len(COLORS), "shape": len(SHAPES), "glyph": len(LETTERS), "center": 0}
MIN_OBJECT_PIXELS = 24
IGNORE = -100

# The toy base's geometry (docs/results_toy.md): 144 vision tokens, ViT 4x96, Llama L x 128.
# rope_theta 1e6 (as long-context Llamas): with 32-dim heads, the default 1e4 leaves only a few rotary
# dimensions slow enough for a question token to match image tokens 20-170 positions back by content;
# measured, the VQA stage then learned about 1.5x faster per step (docs/results_toy.md).
TOY_GEOMETRY = dict(image_size=192, patch_size=16, vision_layers=4, vision_hidden=96, text_hidden=128,
                    rope_theta=1e6)
# The Qwen2.5-VL-shaped toy: 64 LLM tokens per 192-px image (12-px patches, 2x2 merge, 24-px cells), a narrower
# ViT (64) as it sees 256 patches; the processor's pixel range admits exactly 64 merged tokens, the fixed input
# resolution of the paper's Table 4 (there 1280), so budgets 21/14/7 are Table 4's 426/284/142 of 1280.
TOY_QWEN_GEOMETRY = dict(patch_size=12, window_patches=8, vision_layers=4, vision_hidden=64, text_hidden=128, rope_theta=1e6)
TOY_QWEN_TOKENS = 64
FAMILIES = ("llava", "qwen2_5_vl")


def patch_targets(scene: dict, image_size: int = 192, patch: int = 16) -> np.ndarray:
    """[grid*grid, len(HEADS)] int64 targets for one scene (IGNORE where a head does not apply)."""
    grid = image_size // patch
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(scene["objects"]):
        G._draw_shape(draw, obj["shape"], obj["bbox"], i + 1)
    label = scene.get("label")
    glyphs = None
    if label:
        x0, y0, x1, y1 = label["bbox"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
        # each letter's ink, drawn where draw_scene puts the text (letter j -> value j + 1)
        gmask = Image.new("L", (image_size, image_size), 0)
        gdraw = ImageDraw.Draw(gmask)
        font = G._font(label["font_size"])
        l, t, r, b = font.getbbox(label["text"])
        x, y = (x0 + x1 - (r - l)) / 2 - l, (y0 + y1 - (b - t)) / 2 - t
        for j, ch in enumerate(label["text"]):
            gdraw.text((x + font.getlength(label["text"][:j]), y), ch, fill=j + 1, font=font)
        glyphs = _patches(np.asarray(gmask), grid, patch)
    m = _patches(np.asarray(mask), grid, patch)
    n_obj = len(scene["objects"])
    counts = np.stack([(m == i + 1).sum(1) for i in range(n_obj)], 1) if n_obj else np.zeros((grid * grid, 0), int)
    label_px = (m == 255).sum(1)
    out = np.full((grid * grid, len(HEADS)), IGNORE, dtype=np.int64)
    col = {k: j for j, k in enumerate(HEADS)}
    best = counts.argmax(1) if n_obj else np.zeros(grid * grid, int)
    has_obj = counts.max(1) >= MIN_OBJECT_PIXELS if n_obj else np.zeros(grid * grid, bool)
    for p in range(grid * grid):
        if has_obj[p]:
            obj = scene["objects"][best[p]]
            out[p, col["color"]], out[p, col["shape"]] = COLORS.index(obj["color"]), SHAPES.index(obj["shape"])
        else:
            out[p, col["color"]], out[p, col["shape"]] = len(COLORS), len(SHAPES)
    covered = (counts.sum(1) if n_obj else 0) + label_px
    out[covered < patch * patch // 2, col["background"]] = BACKGROUNDS.index(scene["background"]["color"])
    out[:, col["center"]] = 0
    for obj in scene["objects"]:
        cx, cy = (obj["bbox"][0] + obj["bbox"][2]) // 2, (obj["bbox"][1] + obj["bbox"][3]) // 2
        out[min(cy // patch, grid - 1) * grid + min(cx // patch, grid - 1), col["center"]] = 1
    on_label = label_px >= 32
    out[:, col["label"]] = on_label.astype(np.int64)
    out[:, col["glyph"]] = len(LETTERS)
    if glyphs is not None:
        ink = np.stack([(glyphs == j + 1).sum(1) for j in range(len(label["text"]))], 1)
        has_ink = ink.max(1) >= 8
        letters = np.array([LETTERS.index(ch) for ch in label["text"]])
        out[has_ink, col["glyph"]] = letters[ink.argmax(1)[has_ink]]
    out[:, col["row"]] = np.arange(grid * grid) // grid
    out[:, col["col"]] = np.arange(grid * grid) % grid
    return out


def _patches(a: np.ndarray, grid: int, patch: int) -> np.ndarray:
    """[H, W] -> [grid*grid, patch*patch], patches in raster order."""
    return a.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)


def load_split(data_dir: str | Path, limit: int | None = None, split: str = "train", cell: int = 16):
    """uint8 images [N, 3, S, S] and per-cell targets [N, grid², heads] for the ``split`` scenes (train/test),
    one row per ``cell`` x ``cell`` pixels (a vision token's share of the image)."""
    data_dir = Path(data_dir)
    scenes = [json.loads(line) for line in (data_dir / f"{split}_scenes.jsonl").read_text().splitlines() if line.strip()]
    scenes = scenes[:limit] if limit else scenes
    size = scenes[0]["image_size"]
    images = np.empty((len(scenes), 3, size, size), dtype=np.uint8)
    targets = []
    for i, scene in enumerate(scenes):
        images[i] = np.asarray(Image.open(data_dir / "images" / scene["image"]).convert("RGB")).transpose(2, 0, 1)
        targets.append(patch_targets(scene, size, cell))
    return torch.from_numpy(images), torch.from_numpy(np.stack(targets))


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> CLIP-normalised float (what the toy image processor gives for 192-px images)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


class PatchHeads(nn.Module):
    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n if n is not None else grid) for k, n in HEADS.items()})

    def forward(self, feats: torch.Tensor, targets: torch.Tensor):
        losses, accs = {}, {}
        for j, (name, head) in enumerate(self.heads.items()):
            logits = head(feats).float().flatten(0, 1)
            t = targets[..., j].flatten()
            valid = t != IGNORE
            if valid.any():
                losses[name] = F.cross_entropy(logits, t, ignore_index=IGNORE)
                accs[name] = (logits[valid].argmax(-1) == t[valid]).float().mean().item()
            # "none" dominates these heads (objects cover ~5% of the patches, letters ~0.5%): without a separate
            # term for the patches that show something, the tower learns colour but never shape or glyph.
            rare = t != NONE_CLASS[name] if name in NONE_CLASS else None
            if rare is not None and (rare & valid).any():
                losses[name + "@obj"] = F.cross_entropy(logits[rare & valid], t[rare & valid])
                accs[name + "@obj"] = (logits[rare & valid].argmax(-1) == t[rare & valid]).float().mean().item()
        return sum(losses.values()), losses, accs


def build_model(text_layers: int, seed: int, family: str = "llava"):
    """A random toy base -> (model, tokenizer, image processor). The LLaVA toy keeps the BPE tokenizer the
    shipped ``checkpoints/toy-llava`` was trained with; the Qwen toy uses the tiny Qwen factory's tokenizer."""
    if family == "qwen2_5_vl":
        tokenizer = build_qwen_tokenizer()
        config = tiny_qwen_config(tokenizer, text_layers=text_layers, reference_tokens=TOY_QWEN_TOKENS, **TOY_QWEN_GEOMETRY)
        torch.manual_seed(seed)
        processor = qwen_image_processor(TOY_QWEN_TOKENS, TOY_QWEN_TOKENS, patch_size=TOY_QWEN_GEOMETRY["patch_size"])
        return PrunableQwen2_5_VLForConditionalGeneration(config), tokenizer, processor
    if family != "llava":
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    tokenizer = build_tokenizer()
    config = tiny_configs(tokenizer, text_layers=text_layers, **TOY_GEOMETRY)
    torch.manual_seed(seed)
    model = PrunableLlavaForConditionalGeneration(config)
    return model, tokenizer, image_processor_for(config.vision_config.image_size)


def toy_cell_size(config) -> int:
    """Pixels per side of one vision token: the patch (LLaVA) or the 2x2-merged patch block (Qwen2.5-VL)."""
    vision = config.vision_config
    return vision.patch_size * getattr(vision, "spatial_merge_size", 1)


def qwen_patches(pixels: torch.Tensor, patch: int, merge: int = 2, temporal: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [B, 3, H, W] -> Qwen2-VL's packed patches [B * gh * gw, 3 * temporal * patch²] and
    ``image_grid_thw`` [B, 3], laid out as ``Qwen2VLImageProcessor`` lays out a still image (repeated ``temporal``
    times, patches ordered by 2x2 merge block; a test checks equality with the processor)."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [B, gh/m, gw/m, m, m, C, T, p, p]
    grid = torch.tensor([[1, gh, gw]] * b)
    return x.reshape(b * gh * gw, c * temporal * patch * patch), grid


def cell_features(model, images_u8: torch.Tensor) -> torch.Tensor:
    """[B, M, D] the feature of each vision token's cell (the projector's input), for either toy family."""
    pixels = normalize(images_u8)
    if model.config.model_type == "qwen2_5_vl":
        flat, grid = qwen_patches(pixels, model.config.vision_config.patch_size)
        return torch.stack(model.model.adapter.vision_features(model.model, flat.to(pixels.dtype), grid))
    return model.model.vision_features(pixels)


def pretrain(data: str, out: str, epochs: float = 10.0, batch_size: int = 64, lr: float = 2e-3, text_layers: int = 4,
             seed: int = 0, limit: int | None = None, bf16: bool = True, log_every: int = 50, max_steps: int | None = None,
             num_threads: int | None = None, family: str = "llava"):
    t0 = time.time()
    threads = AdaptiveThreads(num_threads)
    model, tokenizer, processor = build_model(text_layers, seed, family)
    model.set_attn_implementation({"vision_config": "eager"}) if bf16 else None
    images, targets = load_split(data, limit, cell=toy_cell_size(model.config))
    print(f"[pretrain_vision] {len(images)} images loaded in {time.time() - t0:.0f}s", flush=True)
    inner = model.model
    tower = inner.visual if family == "qwen2_5_vl" else inner.vision_tower
    grid = math.isqrt(targets.shape[1])
    heads = PatchHeads(inner.adapter.feature_dim(model.config), grid)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = max_steps or max(1, math.ceil(epochs * len(images) / batch_size))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(seed)
    tower.train()
    order, pos, step, t1 = torch.randperm(len(images), generator=gen), 0, 0, time.time()
    while step < steps:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            feats = cell_features(model, images[idx])
            loss, parts, accs = heads(feats, targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 10 == 0:
            threads.update()
        if step % log_every == 0 or step == steps:
            rate = step * batch_size / (time.time() - t1)
            print(f"[pretrain_vision] step {step}/{steps} loss {loss.item():.3f} "
                  + " ".join(f"{k}={v:.2f}" for k, v in accs.items()) + f" ({rate:.0f} img/s, {torch.get_num_threads()} threads)", flush=True)
    model.eval()
    if bf16:
        model.set_attn_implementation({"vision_config": "sdpa"})
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "pretrain_vision.json").write_text(json.dumps(
        {"family": family, "data": str(data), "images": len(images), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
         "final_accuracy": accs, "seconds": round(time.time() - t0, 1)}, indent=1))
    print(f"[pretrain_vision] wrote {out} in {time.time() - t0:.0f}s", flush=True)
    return accs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="toy data folder (train_scenes.jsonl + images/)")
    ap.add_argument("--out", required=True, help="where the initialised model is written (HF format)")
    ap.add_argument("--family", choices=FAMILIES, default="llava", help="toy base to build (default: llava)")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--no-bf16", action="store_true", help="train in fp32 (slower)")
    ap.add_argument("--num-threads", type=int, default=None,
                    help="at most this many torch threads (default: all cores; fewer while other processes are busy)")
    args = ap.parse_args(argv)
    pretrain(args.data, args.out, args.epochs, args.batch_size, args.lr, args.text_layers, args.seed, args.limit,
             not args.no_bf16, max_steps=args.max_steps, num_threads=args.num_threads, family=args.family)


if __name__ == "__main__":
    main()

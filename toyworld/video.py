"""Toy video world: 8-frame clips of the toy world's shapes whose questions need time.

    python -m toyworld.video --out playground/data/toy_video [--num-train 3000] [--num-test 300] [--seed 0]

Each clip has 2-3 objects of distinct (colour, shape) on a toy background, drawn by the image world's
``draw_scene`` frame by frame, and three events, one per question type:

* ``direction``: one object moves in a straight line by :data:`STEP` px per frame: "Which way does the red
  circle move?" -> left / right / up / down. Its start is random along its path, so no single frame tells the
  direction; the first and the last frame do.
* ``appear``: one object is present only from frame t0 on (appears) or only until t1 (disappears): "Does the
  green star appear or disappear?" -> appear / disappear. Every single frame is consistent with both.
* ``frames``: one object is visible in k of the 8 frames (k in 2..6, random frames): "In how many frames is the
  blue square visible?" -> "k". It needs every frame.

Layout: ``videos/<id>.mp4`` (exactly 8 frames, so Video-LLaVA's uniform sample takes each), ``train.json``
(LLaVA-665K conversations with ``"video"`` and a ``question_type`` per human turn, for ``train_full`` and
``finetune_lpm``), and the test split in Video-LLaVA's video-QA layout: ``test_q.json`` ``[{video_name,
question, question_id}]``, ``test_a.json`` ``[{answer, question_id, type}]`` (one question per test clip, types
balanced), plus ``test_scenes.jsonl`` (each clip's frames as scene dicts). Deterministic from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import os
from copy import deepcopy

import numpy as np
from tqdm import tqdm

from .generate import BACKGROUNDS, COLORS, SHAPES, SUFFIX, _pick, draw_scene

FRAMES = 8
TYPES = ("direction", "appear", "frames")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
STEP = 12  # px per frame of the moving object at 192 px (7 steps = 84 px: about 5 patches of 16 px)
SIDE = (24, 34)  # object side in px (large toy objects: the motion must be visible at 12x12 patches)
FRAME_COUNTS = (2, 3, 4, 5, 6)


def _box(x, y, side):
    return [int(x), int(y), int(x) + side, int(y) + side]


def _overlaps(a, b, gap=4):
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def sample_clip(rng, image_size: int = 192) -> dict:
    """A clip: background, three objects (mover, event, blinker) and their per-frame boxes (None = absent)."""
    bg = {"color": _pick(rng, list(BACKGROUNDS)), "pattern": _pick(rng, ("plain", "stripes"))}
    if bg["pattern"] == "stripes":
        bg.update(axis=_pick(rng, ("horizontal", "vertical")), width=int(rng.integers(6, 13)))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=3, replace=False)]
    for _ in range(200):
        side = int(rng.integers(SIDE[0], SIDE[1] + 1))
        direction = _pick(rng, list(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        travel = STEP * (FRAMES - 1)
        lo_x, hi_x = (travel if dx < 0 else 0), image_size - side - (travel if dx > 0 else 0)
        lo_y, hi_y = (travel if dy < 0 else 0), image_size - side - (travel if dy > 0 else 0)
        x0, y0 = rng.integers(lo_x, hi_x + 1), rng.integers(lo_y, hi_y + 1)
        path = [_box(x0 + dx * STEP * t, y0 + dy * STEP * t, side) for t in range(FRAMES)]
        swept = [min(b[0] for b in path), min(b[1] for b in path), max(b[2] for b in path), max(b[3] for b in path)]
        statics = []
        for _ in range(2):
            s2 = int(rng.integers(SIDE[0], SIDE[1] + 1))
            for _ in range(100):
                box = _box(rng.integers(0, image_size - s2), rng.integers(0, image_size - s2), s2)
                if not _overlaps(box, swept) and all(not _overlaps(box, b) for b in statics):
                    statics.append(box)
                    break
        if len(statics) == 2:
            break
    else:
        raise RuntimeError("could not place a clip's objects; use a larger image size")
    appear = rng.random() < 0.5
    cut = int(rng.integers(2, FRAMES - 1))  # appears at frame cut (present in cut..7) / disappears after cut - 1
    k = int(_pick(rng, FRAME_COUNTS))
    shown = sorted(rng.choice(FRAMES, size=k, replace=False).tolist())
    objects = [
        {"shape": chosen[0][0], "color": chosen[0][1], "role": "direction", "answer": direction, "boxes": path},
        {"shape": chosen[1][0], "color": chosen[1][1], "role": "appear", "answer": "appear" if appear else "disappear",
         "boxes": [statics[0] if (t >= cut) == appear else None for t in range(FRAMES)]},
        {"shape": chosen[2][0], "color": chosen[2][1], "role": "frames", "answer": str(k),
         "boxes": [statics[1] if t in shown else None for t in range(FRAMES)]},
    ]  # fmt: skip
    return {"background": bg, "objects": objects, "image_size": image_size}


def frame_scene(clip: dict, t: int) -> dict:
    """The toy image scene of frame ``t`` (the objects present in it)."""
    objects = [{"shape": o["shape"], "color": o["color"], "size": "large", "bbox": o["boxes"][t]}
               for o in clip["objects"] if o["boxes"][t] is not None]  # fmt: skip
    return {"background": deepcopy(clip["background"]), "objects": objects, "label": None}


def render(clip: dict) -> list:
    return [draw_scene(frame_scene(clip, t), clip["image_size"]) for t in range(FRAMES)]


def question(clip: dict, qtype: str) -> tuple[str, str]:
    """(question, answer) of the clip's object with role ``qtype``."""
    o = next(o for o in clip["objects"] if o["role"] == qtype)
    name = f"{o['color']} {o['shape']}"
    text = {"direction": f"Which way does the {name} move?",
            "appear": f"Does the {name} appear or disappear during the video?",
            "frames": f"In how many frames is the {name} visible?"}[qtype]  # fmt: skip
    return text, o["answer"]


def generate(out_dir: str, seed: int = 0, num_train: int = 3000, num_test: int = 300, image_size: int = 192,
             progress: bool = True) -> dict:  # fmt: skip
    from llava.video import save_video

    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    train, test_q, test_a, scenes = [], [], [], []
    for split, n in (("train", num_train), ("test", num_test)):
        for i in tqdm(range(n), desc=f"toy video {split}", disable=not progress):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
            clip = sample_clip(rng, image_size)
            vid = f"{split}_{i:06d}"
            save_video(render(clip), os.path.join(out_dir, "videos", f"{vid}.mp4"), fps=4)
            if split == "train":
                order = [TYPES[j] for j in rng.permutation(len(TYPES))]
                conv = []
                for j, qtype in enumerate(order):
                    q, a = question(clip, qtype)
                    conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q + SUFFIX, "question_type": qtype},
                             {"from": "gpt", "value": a}]  # fmt: skip
                train.append({"id": vid, "video": f"videos/{vid}.mp4", "conversations": conv})
            else:
                qtype = TYPES[i % len(TYPES)]
                q, a = question(clip, qtype)
                test_q.append({"video_name": vid, "question": q + SUFFIX, "question_id": vid})
                test_a.append({"answer": a, "question_id": vid, "type": qtype})
                scenes.append({"video_name": vid, **clip})
    for name, data in (("train.json", train), ("test_q.json", test_q), ("test_a.json", test_a)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(data, f)
    with open(os.path.join(out_dir, "test_scenes.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in scenes)
    return {"train": len(train), "test": len(test_q)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=3000)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    counts = generate(args.out, args.seed, args.num_train, args.num_test, args.image_size)
    print(f"wrote {counts['train']} training and {counts['test']} test clips to {args.out}")


if __name__ == "__main__":
    main()

"""Deterministic synthetic VQA benchmark ("toy world") in real LLaVA file formats.

    python -m toyworld.generate --out playground/data/toy [--seed N] \
        [--num-train N] [--num-test N] [--image-size PX]

Each image shows 1-5 non-overlapping coloured shapes on a plain / striped / noisy
background, optionally with a 1-2 letter printed label. At 192 px the model sees a
12x12 grid of 16-px patches, so every answer lives in a few patches.

* ``--num-train`` images, each with 2-3 QA turns of distinct question types
  (``train.json``, LLaVA-665K conversation format).
* ``--num-test`` images, ONE question each (``test_questions.jsonl`` in
  ``model_vqa_loader`` format, keys in ``test_answers.jsonl``, scenes in
  ``test_scenes.jsonl``; the training scenes are in ``train_scenes.jsonl``, used by the
  per-patch vision pretraining of :mod:`toyworld.pretrain_vision`); the existence questions are also exported as a POPE
  benchmark (``pope/coco_pope_{random,popular,adversarial}.json`` + ``llava_pope_test.jsonl``).

Everything derives from ``seed`` through numpy Generators (one per image, seeded
by ``[seed, split, index]``); no global RNG and no clock, so the same seed gives
byte-identical json/jsonl files and identical pixels.
"""
import argparse
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

VERSION = "1.0.0"
SUFFIX = "\nAnswer the question using a single word or phrase."

# Object colours and background colours use disjoint names, so "what colour is
# the background" and "what colour is the X" can never be confused.
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (240, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20)}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128),
               "black": (25, 25, 25), "beige": (220, 205, 165)}
BG_PATTERNS = ("plain", "stripes", "noise")
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "star": "stars", "cross": "crosses"}
# Shape/colour priors are deliberately skewed so that POPE "popular" negatives
# (the most frequent objects overall that are absent) are meaningful.
SHAPE_WEIGHTS = (0.30, 0.25, 0.20, 0.15, 0.10)
COLOR_WEIGHTS = (0.25, 0.22, 0.18, 0.14, 0.11, 0.10)
POPULAR = sorted(((s, c) for s in SHAPES for c in COLORS),  # most frequent first
                 key=lambda p: -SHAPE_WEIGHTS[SHAPES.index(p[0])] * COLOR_WEIGHTS[list(COLORS).index(p[1])])
SIZES = {"small": (16, 20), "large": (28, 36)}  # side in px at image_size 192
MAX_OBJECTS = 5
MARGIN = 4               # min gap between bounding boxes (px at 192)
LABEL_PROB = 0.3         # chance of a printed label (forced when a "text" question is drawn)
LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I/O/Q: easily confused at this size
POSITION_BAND = 0.1      # position questions need the centre >= 10% of W away from the midline

# Question-type mix (fractions of questions). Test: exact quotas (largest remainder),
# shuffled, one question per image. Train: 2-3 distinct types per image drawn by
# these weights without replacement (this under-samples existence, ~25% instead of
# 30%, and over-samples rarer types; meta.json records the actual counts).
# Existence is yes:no = 1:1; in test its POPE categories rotate per yes/no pair so
# each category file holds a balanced yes/no set.
QUESTION_MIX = {"existence": 0.30, "color": 0.14, "shape": 0.14, "count": 0.12,
                "position": 0.12, "background": 0.08, "text": 0.10}
POPE_CATEGORIES = ("random", "popular", "adversarial")
TRAIN_TURNS = (2, 3)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _scale(v, image_size):
    return max(1, round(v * image_size / 192))


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _free(box, boxes, gap):
    return all(box[2] + gap <= b[0] or b[2] + gap <= box[0] or
               box[3] + gap <= b[1] or b[3] + gap <= box[1] for b in boxes)


def _place(rng, w, h, image_size, boxes, tries=200):
    gap = _scale(MARGIN, image_size)
    for _ in range(tries):
        x0 = int(rng.integers(gap, image_size - w - gap + 1))
        y0 = int(rng.integers(gap, image_size - h - gap + 1))
        box = [x0, y0, x0 + w, y0 + h]
        if _free(box, boxes, gap):
            return box
    return None


def sample_scene(rng, image_size=192, force_label=None):
    """Random scene dict (JSON-serialisable); bboxes are [x0, y0, x1, y1), x1/y1 exclusive."""
    bg = {"color": _pick(rng, list(BACKGROUNDS)), "pattern": _pick(rng, BG_PATTERNS)}
    if bg["pattern"] == "stripes":
        bg.update(axis=_pick(rng, ("horizontal", "vertical")), width=_scale(int(rng.integers(6, 13)), image_size))
    elif bg["pattern"] == "noise":
        bg["noise_seed"] = int(rng.integers(2**31))
    boxes, label = [], None
    has_label = rng.random() < LABEL_PROB if force_label is None else force_label
    if has_label:
        text = "".join(_pick(rng, LETTERS) for _ in range(int(rng.integers(1, 3))))
        fsize = max(8, round(image_size * 0.11))
        l, t, r, b = _font(fsize).getbbox(text)
        pad = _scale(3, image_size)
        box = _place(rng, r - l + 2 * pad, b - t + 2 * pad, image_size, boxes)
        label = {"text": text, "box": _pick(rng, ("black", "white")), "font_size": fsize, "bbox": box}
        boxes.append(box)
    objects = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        size = _pick(rng, list(SIZES))
        side = _scale(int(rng.integers(SIZES[size][0], SIZES[size][1] + 1)), image_size)
        shape = SHAPES[int(rng.choice(len(SHAPES), p=SHAPE_WEIGHTS))]
        color = list(COLORS)[int(rng.choice(len(COLORS), p=COLOR_WEIGHTS))]
        box = _place(rng, side, side, image_size, boxes)
        if box is None:  # crowded: keep the objects placed so far (always >= 1)
            break
        boxes.append(box)
        objects.append({"shape": shape, "color": color, "size": size, "bbox": box})
    return {"background": bg, "objects": objects, "label": label}


def _draw_shape(draw, shape, box, fill):
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.5)
        draw.polygon([(float(cx + q * np.cos(a)), float(cy + q * np.sin(a))) for q, a in zip(rad, ang)], fill=fill)
    elif shape == "cross":
        t = (x1 - x0) / 6
        draw.rectangle([cx - t, y0, cx + t, y1], fill=fill)
        draw.rectangle([x0, cy - t, x1, cy + t], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_scene(scene, image_size=192):
    """Render a scene dict (from ``sample_scene``) to an RGB PIL image; pure function of its inputs."""
    bg = scene["background"]
    base = np.array(BACKGROUNDS[bg["color"]], dtype=np.float32)
    arr = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    if bg["pattern"] == "stripes":
        idx = np.arange(image_size) // bg["width"] % 2 == 1
        tone = base + (-22 if base.mean() > 128 else 22)
        if bg["axis"] == "horizontal":
            arr[idx, :] = tone
        else:
            arr[:, idx] = tone
    elif bg["pattern"] == "noise":
        arr += np.random.default_rng(bg["noise_seed"]).normal(0, 12, (image_size, image_size, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        _draw_shape(draw, obj["shape"], obj["bbox"], COLORS[obj["color"]])
    lab = scene["label"]
    if lab:
        x0, y0, x1, y1 = lab["bbox"]
        fg, bgc = ((255, 255, 255), (0, 0, 0)) if lab["box"] == "black" else ((0, 0, 0), (255, 255, 255))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=bgc)
        font = _font(lab["font_size"])
        l, t, r, b = font.getbbox(lab["text"])
        draw.text(((x0 + x1 - (r - l)) / 2 - l, (y0 + y1 - (b - t)) / 2 - t), lab["text"], fill=fg, font=font)
    return img


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def make_question(rng, scene, qtype, image_size=192, want=None):
    """(question, answer, pope_category) for ``qtype`` or None if the scene can't answer it unambiguously.

    ``want`` = (answer, pope_category) fixes an existence question's label and category.
    """
    objs = scene["objects"]
    present = {(o["shape"], o["color"]) for o in objs}
    pair_n = Counter((o["shape"], o["color"]) for o in objs)
    shape_n, color_n = Counter(o["shape"] for o in objs), Counter(o["color"] for o in objs)
    if qtype == "existence":
        ans, cat = want or (_pick(rng, ("yes", "no")), _pick(rng, POPE_CATEGORIES))
        if ans == "yes":
            cands = sorted(present)
        elif cat == "random":
            cands = [p for p in POPULAR if p not in present]
        elif cat == "popular":
            cands = [p for p in POPULAR if p not in present][:3]
        else:  # adversarial: same shape + other colour, or same colour + other shape
            cands = sorted(({(s, c) for s, c0 in present for c in COLORS if c != c0} |
                            {(s, c) for s0, c in present for s in SHAPES if s != s0}) - present)
        if not cands:
            return None
        s, c = _pick(rng, cands)
        return f"Is there {_article(c)} {c} {s} in the image?", ans, cat
    if qtype == "color":
        cands = sorted(s for s, n in shape_n.items() if n == 1)
        if not cands:
            return None
        s = _pick(rng, cands)
        return f"What color is the {s}?", next(o["color"] for o in objs if o["shape"] == s), None
    if qtype == "shape":
        cands = sorted(c for c, n in color_n.items() if n == 1)
        if not cands:
            return None
        c = _pick(rng, cands)
        return f"What shape is the {c} object?", next(o["shape"] for o in objs if o["color"] == c), None
    if qtype == "count":
        kind = _pick(rng, ("all", "color", "shape"))
        if kind == "color":
            c = _pick(rng, sorted(color_n))
            return f"How many {c} objects are there?", str(color_n[c]), None
        if kind == "shape":
            s = _pick(rng, sorted(shape_n))
            return f"How many {PLURALS[s]} are there?", str(shape_n[s]), None
        return "How many shapes are there?", str(len(objs)), None
    if qtype == "position":
        band, mid = POSITION_BAND * image_size, image_size / 2
        cands = []
        for o in objs:
            if pair_n[(o["shape"], o["color"])] != 1:
                continue
            cx, cy = (o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2
            if abs(cx - mid) >= band:
                cands.append((o, ("left", "right"), "left" if cx < mid else "right"))
            if abs(cy - mid) >= band:
                cands.append((o, ("top", "bottom"), "top" if cy < mid else "bottom"))
        if not cands:
            return None
        o, opts, ans = _pick(rng, cands)
        a, b = opts if rng.random() < 0.5 else opts[::-1]
        where = f"on the {a} or the {b}" if a in ("left", "right") else f"at the {a} or the {b}"
        return f"Is the {o['color']} {o['shape']} {where}?", ans, None
    if qtype == "background":
        return "What color is the background?", scene["background"]["color"], None
    if qtype == "text":
        if not scene["label"]:
            return None
        return "What letters are written in the image?", scene["label"]["text"].lower(), None
    raise ValueError(f"unknown question type {qtype!r}")


def question_type(question: str) -> str:
    """The question type of a question written by :func:`make_question` (first matching template wins).

    Recovers the type from the wording (the training conversations also name it in each human turn's
    ``question_type``), e.g. to score the base on questions it was trained on (:mod:`toyworld.train_questions`).
    """
    q = question.removesuffix(SUFFIX).replace("<image>", "").strip()
    for qtype, pattern in _QUESTION_PATTERNS:
        if pattern.fullmatch(q):
            return qtype
    raise ValueError(f"not a toy-world question: {question!r}")


_QUESTION_PATTERNS = [(t, re.compile(p)) for t, p in (
    ("existence", r"Is there an? \w+ \w+ in the image\?"),
    ("background", r"What color is the background\?"),  # before "color": that pattern matches it too
    ("color", r"What color is the \w+\?"),
    ("shape", r"What shape is the \w+ object\?"),
    ("count", r"How many [\w ]+ are there\?"),
    ("position", r"Is the \w+ \w+ (on|at) the \w+ or the \w+\?"),
    ("text", r"What letters are written in the image\?"),
)]


def scene_with_questions(rng, image_size, specs, tries=100):
    """Sample scenes until every (qtype, want) in ``specs`` yields a question."""
    for _ in range(tries):
        scene = sample_scene(rng, image_size, force_label=True if any(t == "text" for t, _ in specs) else None)
        qs = [make_question(rng, scene, t, image_size, w) for t, w in specs]
        if all(qs):
            return scene, qs
    raise RuntimeError(f"could not sample a scene for {specs}")  # pragma: no cover


def _quota(n):
    """Exact per-type counts summing to n (largest remainder on QUESTION_MIX)."""
    raw = {t: n * w / sum(QUESTION_MIX.values()) for t, w in QUESTION_MIX.items()}
    counts = {t: int(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: counts[t] - raw[t])[:n - sum(counts.values())]:
        counts[t] += 1
    return counts


def _write(path, data):
    """Atomic write of text/bytes/PIL image (temp file + rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    if isinstance(data, Image.Image):
        data.save(tmp, format="PNG")
    else:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _train_item(i, out_dir, seed, image_size, types, weights):
    """Training image i: writes its PNG, returns (conversation, scene record, question types)."""
    rng = np.random.default_rng([seed, 0, i])
    k = int(rng.integers(TRAIN_TURNS[0], TRAIN_TURNS[1] + 1))
    qtypes = [types[j] for j in rng.choice(len(types), size=k, replace=False, p=weights)]
    scene, qs = scene_with_questions(rng, image_size, [(t, None) for t in qtypes])
    iid = f"train_{i:06d}"
    _write(os.path.join(out_dir, "images", "train", f"{iid}.png"), draw_scene(scene, image_size))
    conv = []
    for j, ((q, a, _), qtype) in enumerate(zip(qs, qtypes)):  # the type lets finetune_lpm filter by question type
        conv += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q + SUFFIX, "question_type": qtype},
                 {"from": "gpt", "value": a}]
    return ({"id": iid, "image": f"train/{iid}.png", "conversations": conv},
            {"image": f"train/{iid}.png", "image_size": image_size, **scene}, qtypes)


def generate(out_dir, seed=0, num_train=60000, num_test=1000, image_size=192, progress=True, workers=None):
    """Write the full benchmark under ``out_dir``; returns the summary (= meta.json + out_dir).

    ``workers``: processes drawing the training images (default: one per CPU core, one per 1000 images at
    most); the output does not depend on it."""
    def _int(name, v, lo, what):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be {what}, got {v!r}")
        return int(v)
    num_train = _int("num_train", num_train, 1, "a positive integer")
    num_test = _int("num_test", num_test, 1, "a positive integer")
    image_size = _int("image_size", image_size, 64, "an integer >= 64")
    seed = _int("seed", seed, 0, "a non-negative integer")
    types = list(QUESTION_MIX)
    weights = np.array([QUESTION_MIX[t] for t in types]) / sum(QUESTION_MIX.values())
    bar = tqdm(total=num_train + num_test, desc="toy VQA", unit="img", disable=not progress)

    train, train_scenes, counts = [], [], {"train": Counter(), "test": Counter()}
    # Every image has its own RNG stream ([seed, 0, i]), so worker processes write byte-identical files.
    make = partial(_train_item, out_dir=out_dir, seed=seed, image_size=image_size, types=types, weights=weights)
    if workers is None:
        workers = min(os.cpu_count() or 1, max(1, num_train // 1000))
    with (ProcessPoolExecutor(workers) if workers > 1 else nullcontext()) as pool:
        items = pool.map(make, range(num_train), chunksize=256) if pool else map(make, range(num_train))
        for conv, scene, qtypes in items:
            train.append(conv)
            train_scenes.append(scene)
            counts["train"].update(qtypes)
            bar.update()

    # Test: exact type quotas, shuffled; existence answers alternate yes/no and
    # POPE categories rotate per yes/no pair.
    srng = np.random.default_rng([seed, 1])
    schedule = [t for t, n in _quota(num_test).items() for _ in range(n)]
    schedule = [schedule[j] for j in srng.permutation(num_test)]
    questions, answers, scenes, pope = [], [], [], []
    n_exist = 0
    for i, qtype in enumerate(schedule):
        want = None
        if qtype == "existence":
            want = ("yes" if n_exist % 2 == 0 else "no", POPE_CATEGORIES[n_exist // 2 % 3])
            n_exist += 1
        rng = np.random.default_rng([seed, 2, i])
        scene, [(q, a, cat)] = scene_with_questions(rng, image_size, [(qtype, want)])
        iid = f"test_{i:06d}"
        image = f"test/{iid}.png"
        _write(os.path.join(out_dir, "images", "test", f"{iid}.png"), draw_scene(scene, image_size))
        questions.append({"question_id": i, "image": image, "text": q + SUFFIX, "category": qtype})
        answers.append({"question_id": i, "answer": a, "type": qtype, "pope_category": cat})
        scenes.append({"image": image, "question_ids": [i], "image_size": image_size, **scene})
        if cat:
            pope.append({"question_id": i, "image": image, "text": q, "label": a, "category": cat})
        counts["test"][qtype] += 1
        bar.update()
    bar.close()

    # eval_pope.py pairs answers and labels by order within a category, so both
    # files keep the same (question_id) order.
    for cat in POPE_CATEGORIES:
        rows = [{k: p[k] for k in ("question_id", "image", "text", "label")} for p in pope if p["category"] == cat]
        _write(os.path.join(out_dir, "pope", f"coco_pope_{cat}.json"), _jsonl(rows))
    _write(os.path.join(out_dir, "llava_pope_test.jsonl"), _jsonl(
        {"question_id": p["question_id"], "image": p["image"], "text": p["text"] + SUFFIX,
         "category": p["category"]} for p in pope))
    _write(os.path.join(out_dir, "test_questions.jsonl"), _jsonl(questions))
    _write(os.path.join(out_dir, "test_answers.jsonl"), _jsonl(answers))
    _write(os.path.join(out_dir, "test_scenes.jsonl"), _jsonl(scenes))
    _write(os.path.join(out_dir, "train.json"), json.dumps(train, indent=1))
    _write(os.path.join(out_dir, "train_scenes.jsonl"), _jsonl(train_scenes))
    meta = {"generator": "toyworld.generate", "version": VERSION, "seed": seed,
            "image_size": image_size, "num_train_images": num_train, "num_test_images": num_test,
            "num_train_questions": sum(counts["train"].values()), "num_test_questions": num_test,
            "num_pope_questions": {c: sum(p["category"] == c for p in pope) for c in POPE_CATEGORIES},
            "question_mix": QUESTION_MIX, "train_turns": list(TRAIN_TURNS),
            "question_counts": {s: {t: c[t] for t in types} for s, c in counts.items()},
            "shapes": list(SHAPES), "colors": list(COLORS), "backgrounds": list(BACKGROUNDS),
            "sizes": SIZES, "label_prob": LABEL_PROB}
    _write(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=1))
    return {**meta, "out_dir": str(out_dir)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m toyworld.generate",
                                 description="Generate the deterministic toy VQA benchmark (LLaVA formats).")
    ap.add_argument("--out", required=True, help="output directory, e.g. playground/data/toy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-train", type=int, default=60000, help="training images (2-3 QA turns each)")
    ap.add_argument("--num-test", type=int, default=1000, help="test images (one question each)")
    ap.add_argument("--image-size", type=int, default=192, help="square image side in px (>= 64)")
    args = ap.parse_args(argv)
    try:
        s = generate(args.out, args.seed, args.num_train, args.num_test, args.image_size)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {s['num_train_images']} train images ({s['num_train_questions']} QA) and "
          f"{s['num_test_questions']} test questions to {s['out_dir']}")


if __name__ == "__main__":
    main()

"""A mini benchmark suite in each benchmark's official file layout (upstream LLaVA's playground/data/eval),
and how the eval-script tests call scripts/v1_5/eval/*.sh. Used by tests/eval/conftest.py."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 200, 30)}
SIZES = [(56, 56), (48, 64), (70, 40), (60, 60)]  # non-square ones exercise the 'pad' aspect
SHORT = "\nAnswer the question using a single word or phrase."


def make_image(i: int) -> Image.Image:
    w, h = SIZES[i % len(SIZES)]
    bg = list(COLORS.values())[(i + 1) % len(COLORS)]
    fg = list(COLORS.values())[i % len(COLORS)]
    image = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(image)
    x, y = (i * 7) % (w // 2), (i * 5) % (h // 2)
    (d.ellipse if i % 2 else d.rectangle)([x, y, x + w // 2, y + h // 2], fill=fg)
    return image


def save_image(path: Path, i: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(i).save(path)
    return path.name


def jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def b64png(i: int) -> str:
    buf = io.BytesIO()
    make_image(i).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def build_minibench(root: Path) -> Path:
    """A few questions per benchmark, in the official formats, under root/<bench>/."""
    # GQA: llava_gqa_testdev_balanced.jsonl + data/images + data/testdev_balanced_questions.json
    gqa = root / "gqa"
    qs, gt = [], {}
    for i in range(5):
        img = f"n{1000 + i}.jpg"
        save_image(gqa / "data" / "images" / img, i)
        qid = str(20000 + i)
        qs.append({"question_id": qid, "image": img, "text": "What color is the shape?" + SHORT, "category": "default"})
        gt[qid] = {"imageId": img[:-4], "question": "What color is the shape?", "answer": list(COLORS)[i % 4],
                   "types": {"structural": "query", "semantic": "attr", "detailed": "color"}}
    jsonl(gqa / "llava_gqa_testdev_balanced.jsonl", qs)
    (gqa / "data" / "testdev_balanced_questions.json").write_text(json.dumps(gt))

    # TextVQA: question_id is the image id; two questions share an image (and a question_id)
    tv = root / "textvqa"
    qs, data = [], []
    for i, (img_id, q) in enumerate([("a1b2", "what is written?"), ("a1b2", "what color is it?"), ("c3d4", "what brand?")]):
        save_image(tv / "train_images" / f"{img_id}.jpg", i)
        qs.append({"question_id": img_id, "image": f"{img_id}.jpg",
                   "text": f"{q}\nReference OCR token: abc, xyz{SHORT}"})
        data.append({"question_id": 34600 + i, "image_id": img_id, "question": q, "answers": ["abc"] * 6 + ["red"] * 4})
    jsonl(tv / "llava_textvqa_val_v051_ocr.jsonl", qs)
    (tv / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))

    # POPE: llava_pope_test.jsonl (no labels) + coco/coco_pope_<cat>.json (JSON lines) + val2014 images
    pope = root / "pope"
    qs, ann = [], {c: [] for c in ("random", "popular", "adversarial")}
    for i in range(6):
        cat = ("random", "popular", "adversarial")[i % 3]
        img = f"COCO_val2014_{i:012d}.jpg"
        save_image(pope / "val2014" / img, i)
        text = f"Is there a {list(COLORS)[i % 4]} shape in the image?"
        qs.append({"question_id": i + 1, "image": img, "text": text, "category": cat})
        ann[cat].append({"question_id": i + 1, "image": img, "text": text, "label": "yes" if i < 3 else "no"})
    jsonl(pope / "llava_pope_test.jsonl", qs)
    for cat, rows in ann.items():
        jsonl(pope / "coco" / f"coco_pope_{cat}.json", rows)

    # MME: two questions per image sharing a question_id; both release layouts (as upstream's convert_answer_to_mme.py
    # reads them): <cat>/images/ + <cat>/questions_answers_YN/, or the .txt beside the images
    mme = root / "MME"
    rel = mme / "MME_Benchmark_release_version"
    qs = []
    for i, (cat, sub) in enumerate([("existence", ""), ("artwork", "images"), ("code_reasoning", "")]):
        stem = f"{i:04d}"
        img_rel = f"{cat}/{sub + '/' if sub else ''}{stem}.png"
        save_image(rel / img_rel, i)
        gt_dir = rel / cat / ("questions_answers_YN" if sub else "")
        gt_dir.mkdir(parents=True, exist_ok=True)
        pair = [(f"Is there a {list(COLORS)[i]} shape in this image? Please answer yes or no.", "Yes"),
                (f"Is there a {list(COLORS)[i + 1]} shape in this image? Please answer yes or no.", "No")]
        (gt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))
        for q, _ in pair:
            qs.append({"question_id": f"{cat}/{stem}.png", "image": img_rel, "text": q, "category": cat})
    jsonl(mme / "llava_mme.jsonl", qs)

    # VQAv2: test-dev questions, the full test2015 question file, test2015 images, local annotations
    vqa = root / "vqav2"
    qs, anns = [], []
    for i in range(4):
        img = f"COCO_test2015_{i:012d}.jpg"
        save_image(vqa / "test2015" / img, i)
        qid = 262144000 + i
        qs.append({"question_id": qid, "image": img, "text": "How many shapes are there?" + SHORT, "category": "default"})
        anns.append({"question_id": qid, "answers": [{"answer": "1"}] * 10})
    jsonl(vqa / "llava_vqav2_mscoco_test-dev2015.jsonl", qs)
    jsonl(vqa / "llava_vqav2_mscoco_test2015.jsonl", qs + [{"question_id": 99, "image": "x.jpg", "text": "?"}])
    (vqa / "annotations.json").write_text(json.dumps({"annotations": anns}))

    # ScienceQA: llava_test_CQM-A.json (some questions without an image), problems.json, pid_splits.json
    sqa = root / "scienceqa"
    entries, problems = [], {}
    for i in range(5):
        pid = str(10 + i)
        choices = ["red", "blue", "green"][: 2 + i % 2]
        opts = "\n".join(f"{'ABC'[j]}. {c}" for j, c in enumerate(choices))
        has_image = i % 2 == 0
        value = f"Context: a picture.\nWhich color is shown?\n{opts}"
        entry = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if has_image else "") + value},
                                              {"from": "gpt", "value": "A"}]}
        if has_image:
            save_image(sqa / "images" / "test" / pid / "image.png", i)
            entry["image"] = f"{pid}/image.png"
        entries.append(entry)
        problems[pid] = {"question": "Which color is shown?", "choices": choices, "answer": i % len(choices),
                         "image": "image.png" if has_image else None, "split": "test", "hint": "a picture."}
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps(entries))
    (sqa / "problems.json").write_text(json.dumps(problems))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": list(problems), "train": [], "val": []}))

    # MMBench / MMBench-CN: TSV with base64 images; 2- to 4-option rows, a hint, a 'nan' hint
    for bench, split, question in [("mmbench", "mmbench_dev_20230712", "Which color is the shape?"),
                                   ("mmbench_cn", "mmbench_dev_cn_20231003", "图形是什么颜色?")]:
        (root / bench).mkdir(parents=True, exist_ok=True)
        cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "split"]
        rows = []
        for i in range(4):
            n = 2 + i % 3
            opts = list(COLORS)[:n] + [""] * (4 - n)
            rows.append([str(i), question, "A hint." if i == 1 else "nan", *opts, "ABCD"[i % n], "color",
                         b64png(i), "toy", "perception", "dev"])
        with open(root / bench / f"{split}.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(cols)
            w.writerows(rows)
    return root


# ------------------------------------------------------------------------------------------ scripts
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts" / "v1_5" / "eval"
# bench script -> (benchmark folder, answers split, questions in the mini benchmark, headline metric key)
SCRIPT_CASES = {
    "gqa": ("gqa", "llava_gqa_testdev_balanced", 5, "accuracy"),
    "sqa": ("scienceqa", "llava_test_CQM-A", 5, "img_accuracy"),
    "textvqa": ("textvqa", "llava_textvqa_val_v051_ocr", 3, "accuracy"),
    "pope": ("pope", "llava_pope_test", 6, "f1_mean"),
    "mme": ("MME", "llava_mme", 6, "total"),
    "vqav2": ("vqav2", "llava_vqav2_mscoco_test-dev2015", 4, "accuracy"),
    "mmbench": ("mmbench", "mmbench_dev_20230712", 4, "accuracy"),
    "mmbench_cn": ("mmbench_cn", "mmbench_dev_cn_20231003", 4, "accuracy"),
}
SWEEP_ARGS = ["--methods", "none,learnpruner", "--budgets", "8,64", "--benchmarks", "pope,sqa",
              "--max-new-tokens", "3", "--batch-size", "4", "--device", "cpu", "--no-progress"]


def script_command(name: str, root: Path, ckpt: Path, lpm: Path) -> tuple[list[str], dict]:
    """Command and environment of one eval-script run: CKPT/METHOD/BUDGET/LPM by env, positionally or defaulted."""
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT", "METHOD", "BUDGET", "LPM", "CUDA_VISIBLE_DEVICES")}
    env.update(EVAL_ROOT=str(root), EXTRA_ARGS="--device cpu --max_new_tokens 3 --batch-size 4 --no-progress",
               OMP_NUM_THREADS="1")  # tiny model: threads only add contention
    cmd = ["bash", str(SCRIPTS / f"{name}.sh")]
    if name == "sweep":
        env.update(CKPT=str(ckpt), LPM=str(lpm), OUT=str(root.parent / "sweep"))
        return cmd + SWEEP_ARGS, env
    if name == "pope":  # positional arguments instead of the environment
        cmd += [str(ckpt), "learnpruner", "8", str(lpm)]
    elif name == "textvqa":  # only the checkpoint: METHOD defaults to none, no BUDGET
        cmd += [str(ckpt)]
    else:
        env.update(CKPT=str(ckpt), METHOD="learnpruner", BUDGET="8", LPM=str(lpm))
    env["CUDA_VISIBLE_DEVICES"] = "0,1" if name == "gqa" else ""  # gqa: two chunks (on CPU here)
    if name == "vqav2":
        env["VQAV2_ANNOTATION"] = str(root / "vqav2" / "annotations.json")
    if name == "mmbench":
        env["ALL_ROUNDS"] = "1"
    return cmd, env

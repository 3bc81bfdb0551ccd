import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toyworld import generate as G

SUFFIX = "\nAnswer the question using a single word or phrase."
TEXT_FILES = ["train.json", "test_questions.jsonl", "test_answers.jsonl", "test_scenes.jsonl",
              "llava_pope_test.jsonl", "meta.json"] + [f"pope/coco_pope_{c}.json" for c in G.POPE_CATEGORIES]


def _run(path, seed=0, n_train=40, n_test=60, size=192, workers=1):
    G.generate(path, seed=seed, num_train=n_train, num_test=n_test, image_size=size, progress=False,
               workers=workers)
    return Path(path)


def _jsonl(p):
    return [json.loads(line) for line in open(p)]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("toy") / "a")


def _digest(root):
    h = hashlib.sha256()
    for f in TEXT_FILES:
        h.update((root / f).read_bytes())
    for p in sorted((root / "images").rglob("*.png")):
        h.update(p.name.encode() + np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def test_deterministic(out, tmp_path):
    assert _digest(out) == _digest(_run(tmp_path / "b", workers=2))  # worker processes change nothing
    assert _digest(out) != _digest(_run(tmp_path / "c", seed=1))
    assert not list(out.rglob("*.tmp*"))


def test_train_format(out):
    train = json.loads((out / "train.json").read_text())
    assert len(train) == 40
    for e in train:
        assert set(e) == {"id", "image", "conversations"}
        assert e["image"] == f"train/{e['id']}.png" and (out / "images" / e["image"]).is_file()
        conv = e["conversations"]
        assert len(conv) in (4, 6)
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        for t in conv:
            if t["from"] == "human":
                assert t["value"].endswith(SUFFIX)
            else:
                assert re.fullmatch(r"[a-z0-9]+", t["value"])


def test_test_format(out):
    qs, ans = _jsonl(out / "test_questions.jsonl"), _jsonl(out / "test_answers.jsonl")
    assert len(qs) == 60 and [q["question_id"] for q in qs] == [a["question_id"] for a in ans]
    for q, a in zip(qs, ans):
        assert set(q) == {"question_id", "image", "text", "category"}
        assert set(a) == {"question_id", "answer", "type", "pope_category"}
        assert isinstance(q["question_id"], int) and q["text"].endswith(SUFFIX)
        assert (out / "images" / q["image"]).is_file() and q["category"] == a["type"]
        assert re.fullmatch(r"[a-z0-9]+", a["answer"])
        assert (a["pope_category"] is not None) == (a["type"] == "existence")
    counts = Counter(a["type"] for a in ans)
    assert counts == G._quota(60) and set(counts) == set(G.QUESTION_MIX)
    exist = [a["answer"] for a in ans if a["type"] == "existence"]
    assert exist.count("yes") == exist.count("no")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["version"] == G.VERSION and meta["question_mix"] == G.QUESTION_MIX


def _recompute(q, scene, size):
    objs, text = scene["objects"], q.split("\n")[0]
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", text):
        return "yes" if any((o["color"], o["shape"]) == m.groups() for o in objs) else "no"
    if m := re.fullmatch(r"What color is the (\w+)\?", text):
        if m[1] == "background":
            return scene["background"]["color"]
        (o,) = [o for o in objs if o["shape"] == m[1]]  # must be unique
        return o["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", text):
        (o,) = [o for o in objs if o["color"] == m[1]]
        return o["shape"]
    if text == "How many shapes are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", text):
        return str(sum(o["color"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", text):
        return str(sum(G.PLURALS[o["shape"]] == m[1] for o in objs))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (?:on|at) the (\w+) or the (\w+)\?", text):
        (o,) = [o for o in objs if (o["color"], o["shape"]) == m.groups()[:2]]
        horiz = {m[3], m[4]} == {"left", "right"}
        c = (o["bbox"][0] + o["bbox"][2]) / 2 if horiz else (o["bbox"][1] + o["bbox"][3]) / 2
        assert abs(c - size / 2) >= G.POSITION_BAND * size  # unambiguous
        return ("left" if c < size / 2 else "right") if horiz else ("top" if c < size / 2 else "bottom")
    if text == "What letters are written in the image?":
        return scene["label"]["text"].lower()
    raise AssertionError(f"unparsed question {text!r}")


def test_answers_match_scenes(out):
    qs, ans = _jsonl(out / "test_questions.jsonl"), _jsonl(out / "test_answers.jsonl")
    scenes = {s["image"]: s for s in _jsonl(out / "test_scenes.jsonl")}
    for q, a in zip(qs, ans):
        assert _recompute(q["text"], scenes[q["image"]], 192) == a["answer"], q
    # train QA come from the same make_question: check every type on fresh scenes
    rng = np.random.default_rng(7)
    for _ in range(30):
        scene = G.sample_scene(rng, 192)
        for t in G.QUESTION_MIX:
            r = G.make_question(rng, scene, t)
            if r:
                assert _recompute(r[0], scene, 192) == r[1]


def test_pope_files(out):
    qs = {q["question_id"]: q for q in _jsonl(out / "test_questions.jsonl")}
    ans = {a["question_id"]: a for a in _jsonl(out / "test_answers.jsonl")}
    pope_q = _jsonl(out / "llava_pope_test.jsonl")
    assert len(pope_q) == sum(a["type"] == "existence" for a in ans.values())
    for cat in G.POPE_CATEGORIES:
        rows = _jsonl(out / "pope" / f"coco_pope_{cat}.json")
        assert rows and all(set(r) == {"question_id", "image", "text", "label"} for r in rows)
        labels = Counter(r["label"] for r in rows)
        assert abs(labels["yes"] - labels["no"]) <= 1
        # eval_pope pairs by order: the question file's category subset has the same order
        assert [r["question_id"] for r in rows] == [p["question_id"] for p in pope_q if p["category"] == cat]
        for r in rows:
            assert ans[r["question_id"]]["answer"] == r["label"] and ans[r["question_id"]]["pope_category"] == cat
            assert qs[r["question_id"]]["text"] == r["text"] + SUFFIX


def test_adversarial_and_popular_negatives():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = G.sample_scene(rng, 192)
        present = {(o["shape"], o["color"]) for o in scene["objects"]}
        q, a, _ = G.make_question(rng, scene, "existence", want=("no", "adversarial"))
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
        assert (s, c) not in present and any(s == ps or c == pc for ps, pc in present)
        q, a, _ = G.make_question(rng, scene, "existence", want=("no", "popular"))
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
        assert (s, c) in [p for p in G.POPULAR if p not in present][:3]


def test_no_overlap_and_in_bounds(out):
    gap = G.MARGIN
    for s in _jsonl(out / "test_scenes.jsonl"):
        boxes = [o["bbox"] for o in s["objects"]] + ([s["label"]["bbox"]] if s["label"] else [])
        assert 1 <= len(s["objects"]) <= G.MAX_OBJECTS
        for i, b in enumerate(boxes):
            assert 0 <= b[0] < b[2] <= 192 and 0 <= b[1] < b[3] <= 192
            for c in boxes[i + 1:]:
                assert G._free(b, [c], gap)
        for o in s["objects"]:
            side = o["bbox"][2] - o["bbox"][0]
            lo, hi = G.SIZES[o["size"]]
            assert side == o["bbox"][3] - o["bbox"][1] and lo <= side <= hi


def test_draw_scene_pixels():
    scene = G.sample_scene(np.random.default_rng(0), 96, force_label=True)
    img = G.draw_scene(scene, 96)
    assert img.size == (96, 96) and img.mode == "RGB"
    o = scene["objects"][0]
    x, y = (o["bbox"][0] + o["bbox"][2]) // 2, (o["bbox"][1] + o["bbox"][3]) // 2
    assert img.getpixel((x, y)) == G.COLORS[o["color"]]  # every shape covers its centre


@pytest.mark.parametrize("kw", [{"num_train": 0}, {"num_test": -1}, {"image_size": 32},
                                {"num_train": 2.5}, {"seed": -1}])
def test_bad_args(tmp_path, kw):
    with pytest.raises(ValueError):
        G.generate(tmp_path, **{"num_train": 2, "num_test": 2, **kw}, progress=False)
    assert not (tmp_path / "train.json").exists()


def test_cli_bad_args(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        G.main(["--out", str(tmp_path), "--image-size", "10"])
    assert e.value.code == 2 and "image_size must be" in capsys.readouterr().err


def test_question_type_recovers_every_type(out):
    # held-out split: the answer key carries the type the generator drew
    questions = {q["question_id"]: q["text"] for q in _jsonl(out / "test_questions.jsonl")}
    for a in _jsonl(out / "test_answers.jsonl"):
        assert G.question_type(questions[a["question_id"]]) == a["type"]
    # every type's template, straight from make_question (background must not be read as colour)
    rng = np.random.default_rng(0)
    for qtype in G.QUESTION_MIX:
        scene, [(q, _, _)] = G.scene_with_questions(rng, 192, [(qtype, None)])
        assert G.question_type("<image>\n" + q + G.SUFFIX) == qtype
    with pytest.raises(ValueError, match="not a toy-world question"):
        G.question_type("What is the meaning of life?")


def test_train_questions_export(out, tmp_path):
    from toyworld import train_questions as TQ

    TQ.main(["--data", str(out), "--num-images", "5", "--out", str(tmp_path)])
    questions, answers = _jsonl(tmp_path / "train_questions.jsonl"), _jsonl(tmp_path / "train_answers.jsonl")
    train = json.load(open(out / "train.json"))[:5]
    turns = [(s["image"], t) for s in train for t in zip(s["conversations"][0::2], s["conversations"][1::2])]
    assert len(questions) == len(answers) == len(turns) >= 10
    for q, a, (image, (human, gpt)) in zip(questions, answers, turns):
        assert q["question_id"] == a["question_id"] and q["image"] == image
        assert "<image>" not in q["text"] and q["text"].endswith(SUFFIX)
        assert a["answer"] == gpt["value"] and q["category"] == a["type"] in G.QUESTION_MIX
    with pytest.raises(ValueError, match="num_images"):
        TQ.train_questions(out / "train.json", 0)


def test_focus_mix(out, tmp_path):
    from toyworld import focus_mix as FM

    train = json.load(open(out / "train.json"))
    FM.main(["--data", str(out / "train.json"), "--types", "position,text", "--base-samples", "10",
             "--copies", "2", "--out", str(tmp_path / "focus.json")])
    mix = json.load(open(tmp_path / "focus.json"))
    base = [s for s in mix if not s["id"].endswith("_focus")]
    focused = [s for s in mix if s["id"].endswith("_focus")]
    by_id = {s["id"]: s for s in train}
    assert len(base) == 10 and len({s["id"] for s in base}) == 10
    assert all(s == by_id[s["id"]] for s in base)  # drawn unchanged, without replacement
    wanted = [(s["image"], h["value"].replace("<image>", "").strip(), g["value"]) for s in train
              for h, g in zip(s["conversations"][0::2], s["conversations"][1::2])
              if G.question_type(h["value"].replace("<image>", "").strip()) in ("position", "text")]
    got = [(s["image"], h["value"].replace("<image>", "").strip(), g["value"]) for s in focused
           for h, g in zip(s["conversations"][0::2], s["conversations"][1::2])]
    assert len(wanted) >= 5 and sorted(got) == sorted(wanted * 2)  # every chosen turn, `copies` times, no other
    for s in focused:  # the image placeholder exactly once, on the first turn
        humans = [t["value"] for t in s["conversations"][0::2]]
        assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
    left_right = FM.focus_mix(train, ["position"], 0, question_regex="left")
    lr_questions = [h["value"] for s in left_right for h in s["conversations"][0::2]]
    assert lr_questions and all("left or the right" in q or "right or the left" in q for q in lr_questions)
    assert len(lr_questions) == sum("left" in q for _, q, _ in wanted)
    with pytest.raises(ValueError, match="the mix is empty"):
        FM.focus_mix(train, ["position"], 0, question_regex="nowhere")
    with pytest.raises(ValueError, match="unknown question type"):
        FM.focus_mix(train, ["colour"], 1)
    with pytest.raises(ValueError, match="base_samples"):
        FM.focus_mix(train, ["position"], len(train) + 1)

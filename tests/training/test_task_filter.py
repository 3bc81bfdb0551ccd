"""LPM training on a subset (issue #21, item 3): QA turns by toy-world question type, conversations by source.

The data is hand-written in the toy world's templates, each human turn naming its ``question_type`` as the toy
world's generator writes it, so the expected turns of every filter are known exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llava.train.data import LazySupervisedDataset, RecordFilter
from llava.train.train_lpm import check_changed_args, train
from toyworld.generate import SUFFIX

N = 16
QUESTIONS = {  # one toy-world question per type, with its answer
    "existence": ("Is there a red circle in the image?", "yes"),
    "color": ("What color is the circle?", "red"),
    "shape": ("What shape is the red object?", "circle"),
    "count": ("How many circles are there?", "1"),
    "position": ("Is the red circle on the left or the right?", "left"),
}
# image i asks these types, in this order (the first turn carries <image>)
PLAN = [("color", "count"), ("existence", "shape", "position"), ("count", "position"), ("shape", "color"),
        ("existence", "color", "count"), ("position", "existence")]  # fmt: skip


def _toy_data(root: Path) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    entries = []
    for i, types in enumerate(PLAN):
        Image.new("RGB", (56, 56), (40 * i, 128, 128)).save(root / "images" / "train" / f"{i}.png")
        turns = []
        for j, t in enumerate(types):
            q, a = QUESTIONS[t]
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q + SUFFIX, "question_type": t},
                      {"from": "gpt", "value": a}]
        entries.append({"id": f"toy-{i}", "image": f"train/{i}.png", "conversations": turns})
    path = root / "train.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return _toy_data(tmp_path_factory.mktemp("toy"))


def _dataset(parts, data, record_filter, **kwargs):
    tokenizer, processor, image_id = parts
    return LazySupervisedDataset(data, tokenizer, processor, N, image_id, data.parent / "images",
                                 record_filter=record_filter, **kwargs)  # fmt: skip


def _types(dataset) -> list[tuple[str, tuple[str, ...]]]:
    return [(e["id"], tuple(t["question_type"] for t in e["conversations"][0::2])) for e in dataset.entries]


def test_filtered_dataset_holds_exactly_the_selected_types(parts, toy):
    """count,position: images 0 (count), 1 (position), 2 (count, position), 4 (count), 5 (position) keep those
    turns in their order; image 3 (shape, color) has none and is dropped. Excluding count,position leaves the
    other turns: 0 (color), 1 (existence, shape), 3 (shape, color), 4 (existence, color), 5 (existence)."""
    chosen = _dataset(parts, toy, RecordFilter("count,position"))
    assert _types(chosen) == [("toy-0", ("count",)), ("toy-1", ("position",)), ("toy-2", ("count", "position")),
                              ("toy-4", ("count",)), ("toy-5", ("position",))]  # fmt: skip
    assert chosen.num_matching == 5 and chosen.total_entries == 6
    rest = _dataset(parts, toy, RecordFilter(exclude_question_types=["count", "position"]))
    assert _types(rest) == [("toy-0", ("color",)), ("toy-1", ("existence", "shape")), ("toy-3", ("shape", "color")),
                            ("toy-4", ("existence", "color")), ("toy-5", ("existence",))]  # fmt: skip
    for entry in chosen.entries + rest.entries:  # <image> once, on the first kept turn, as the loader expects
        values = [t["value"] for t in entry["conversations"]]
        assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1
    item = chosen[chosen.entries.index(next(e for e in chosen.entries if e["id"] == "toy-1"))]
    assert item["input_ids"].tolist().count(parts[2]) == N  # the image still goes in after its turn was dropped
    # the fraction is drawn from the matches: 0.4 of 5 -> 2 samples, all of the chosen types
    half = _dataset(parts, toy, RecordFilter("count,position"), data_fraction=0.4, data_seed=0)
    assert len(half) == 2 and {t for _, ts in _types(half) for t in ts} <= {"count", "position"}
    everything = _dataset(parts, toy, RecordFilter())
    assert everything.entries == json.loads(toy.read_text()) and everything.num_matching == 6


def test_unknown_type_and_no_match_are_one_clear_error(parts, toy):
    """The data has existence 3, color 3, shape 2, count 3, position 3 QA turns (PLAN, in order of appearance)."""
    has = r"--data_path .*train\.json has these \(QA turns\): color 3, count 3, existence 3, shape 2, position 3$"
    with pytest.raises(ValueError, match=rf"unknown question type\(s\) \['colour'\] in --question_types; {has}"):
        _dataset(parts, toy, RecordFilter("count,colour"))
    with pytest.raises(ValueError, match=r"unknown question type\(s\) \['size'\] in --exclude_question_types"):
        _dataset(parts, toy, RecordFilter(exclude_question_types="size"))
    with pytest.raises(ValueError, match=r"\['count'\] are in both --question_types and --exclude_question_types"):
        RecordFilter("count", "count")
    everything = "existence,color,shape,count,position"
    with pytest.raises(ValueError, match=rf"no sample in --data_path .*train\.json matches --exclude_question_types {everything}$"):
        _dataset(parts, toy, RecordFilter(exclude_question_types=everything))


def test_type_filter_refuses_turns_without_a_type(parts, tmp_path, make_dataset):
    """make_dataset's conversations name no question_type: a type filter cannot apply to them."""
    data = make_dataset(tmp_path, num_samples=4)
    with pytest.raises(ValueError, match=r"sample img-0: turn 0 has no 'question_type' field.*filter other data with --data_sources"):
        _dataset(parts, data, RecordFilter("color"))


def test_source_filter(parts, tmp_path, make_dataset):
    """make_dataset(8): sample 5 is text-only (every 6th), samples 0-4, 6, 7 have a coco image."""
    data = make_dataset(tmp_path, num_samples=8)
    text = _dataset(parts, data, RecordFilter(sources="text-only"))
    assert [e["id"] for e in text.entries] == ["text-5"]
    coco = _dataset(parts, data, RecordFilter(sources=["coco"]))
    assert len(coco) == 7 and all(e["image"].startswith("coco/") for e in coco.entries)
    with pytest.raises(ValueError, match=r"unknown source\(s\) \['gqa'\] in --data_sources; the sources in "
                       r"--data_path .*data\.json are: coco \(7\), text-only \(1\)$"):  # fmt: skip
        _dataset(parts, data, RecordFilter(sources="gqa,coco"))


def _argv(model, data, out, *extra):
    return ["--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent / "images"),
            "--output_dir", str(out), "--use_cpu", "True", "--per_device_train_batch_size", "2", "--report_to", "none",
            "--lpm_hidden", "16", "--save_strategy", "no", "--seed", "0", "--max_steps", "1", *extra]  # fmt: skip


def test_filter_is_trained_on_and_recorded_in_the_checkpoint(tiny_model, toy, tmp_path):
    trainer = train(_argv(tiny_model, toy, tmp_path / "out", "--question_types", "count,position"))
    assert Counter(t for _, ts in _types(trainer.train_dataset) for t in ts) == {"count": 3, "position": 3}
    config = json.loads((tmp_path / "out" / "lpm_config.json").read_text())
    assert config["data_filter"] == {"question_types": ["count", "position"], "exclude_question_types": [],
                                     "sources": []}  # fmt: skip
    assert RecordFilter().metadata() is None  # an unfiltered run records data_filter: null
    # an unknown type stops the CLI with the one error, before the model is loaded or anything is written
    with pytest.raises(SystemExit, match=r"^error: unknown question type\(s\) \['colour'\] in --question_types"):
        train(_argv(tiny_model, toy, tmp_path / "other", "--question_types", "colour"))
    assert not (tmp_path / "other").exists()


def test_resume_refuses_another_filter(tmp_path):
    """A checkpoint trained on count cannot be resumed on count,position: the LPMs would mix."""
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "run_args.json").write_text(json.dumps({"question_types": "count"}))
    with pytest.raises(ValueError, match=r"question_types 'count' -> 'count,position'"):
        check_changed_args(str(tmp_path / "checkpoint-2"), {"question_types": "count,position"}, allow=False)
    check_changed_args(str(tmp_path / "checkpoint-2"), {"question_types": "count"}, allow=False)

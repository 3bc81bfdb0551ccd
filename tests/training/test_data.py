"""LLaVA-665K-format data for LPM training: tokenisation, supervision, subsets and bad input."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, CLIPImageProcessor

from llava.constants import IGNORE_INDEX
from llava.inference import build_prompt
from llava.mm_utils import tokenizer_image_token
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset, select_subset

N = 16


@pytest.fixture(scope="module")
def parts(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenizer, CLIPImageProcessor.from_pretrained(tiny_model), tokenizer.convert_tokens_to_ids("<image>")


def _dataset(parts, data_path, image_folder, **kwargs):
    tokenizer, processor, image_id = parts
    return LazySupervisedDataset(data_path, tokenizer, processor, N, image_id, image_folder, **kwargs)


def _supervised_text(tokenizer, item):
    labels = item["labels"].tolist()
    spans, current = [], []
    for tok in labels + [IGNORE_INDEX]:
        if tok == IGNORE_INDEX:
            if current:
                spans.append(tokenizer.decode(current).strip())
            current = []
        else:
            current.append(tok)
    return spans


def test_only_assistant_turns_are_supervised(parts, dataset):
    tokenizer, _, image_id = parts
    ds = _dataset(parts, dataset, dataset.parent / "images")
    entries = {e["id"]: e for e in json.loads(dataset.read_text())}
    for index in range(len(ds)):
        item = ds[index]
        answers = [t["value"] for t in entries[item["id"]]["conversations"] if t["from"] == "gpt"]
        assert _supervised_text(tokenizer, item) == [f"{a}</s>" for a in answers]
        has_image = "image" in entries[item["id"]]
        assert item["input_ids"].tolist().count(image_id) == (N if has_image else 0)
        assert ("pixel_values" in item) == has_image
        if has_image:
            assert tuple(item["pixel_values"].shape) == (3, 56, 56)


def test_prompt_tokens_match_inference(parts, dataset):
    """The tokens before the first answer are exactly what inference feeds the model for that question."""
    tokenizer, _, image_id = parts
    ds = _dataset(parts, dataset, dataset.parent / "images")
    item = ds[0]  # "What color is the object?\n<image>" -> image moved first, as upstream LLaVA does
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    first_answer = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    prompt = tokenizer_image_token(build_prompt("What color is the object?"), tokenizer, image_id, num_image_tokens=N)
    assert ids[:first_answer] == prompt
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_collator_pads_right_and_stacks_images(parts, dataset):
    tokenizer, _, _ = parts
    ds = _dataset(parts, dataset, dataset.parent / "images")
    items = [ds[i] for i in range(6)]  # includes the text-only sample #5
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    lengths = [len(x["input_ids"]) for x in items]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape[0] == sum("pixel_values" in x for x in items) == 5
    row = lengths.index(min(lengths))
    assert (batch["labels"][row, min(lengths) :] == IGNORE_INDEX).all()
    assert (batch["input_ids"][row, min(lengths) :] == tokenizer.pad_token_id).all()


def test_subset_is_reproducible(parts, dataset):
    assert select_subset(100, 0.1, 3) == select_subset(100, 0.1, 3)
    assert select_subset(100, 0.1, 3) != select_subset(100, 0.1, 4)
    assert len(select_subset(100, 0.1, 3)) == 10 and len(select_subset(5, 0.01, 0)) == 1
    assert select_subset(7, 1.0, 0) == list(range(7))
    a = _dataset(parts, dataset, dataset.parent / "images", data_fraction=0.25, data_seed=1)
    b = _dataset(parts, dataset, dataset.parent / "images", data_fraction=0.25, data_seed=1)
    assert len(a) == 6 and [e["id"] for e in a.entries] == [e["id"] for e in b.entries]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_out_of_range(parts, dataset, fraction):
    with pytest.raises(ValueError, match=r"--data_fraction must be in \(0, 1\]"):
        _dataset(parts, dataset, dataset.parent / "images", data_fraction=fraction)


def test_missing_images_name_the_sample_or_are_skipped(parts, tmp_path, make_dataset):
    data = make_dataset(tmp_path, num_samples=8)
    (tmp_path / "images" / "coco" / "00003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 8 .*sample img-3: .*00003\.png.*--skip_missing_images"):
        _dataset(parts, data, tmp_path / "images")
    ds = _dataset(parts, data, tmp_path / "images", skip_missing_images=True)
    assert ds.num_skipped == 1 and len(ds) == 7 and "img-3" not in [e["id"] for e in ds.entries]
    # an image that disappears after the start is reported with its sample id too
    (tmp_path / "images" / "coco" / "00004.png").unlink()
    with pytest.raises(FileNotFoundError, match="sample img-4"):
        ds[[e["id"] for e in ds.entries].index("img-4")]


def test_bad_input(parts, tmp_path):
    def write(entries):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(entries))
        return path

    with pytest.raises(ValueError, match="holds no samples"):
        _dataset(parts, write([]), tmp_path)
    no_answer = {"id": "q-only", "conversations": [{"from": "human", "value": "Hello?"}]}
    with pytest.raises(ValueError, match="sample q-only: .*no assistant"):
        _dataset(parts, write([no_answer]), tmp_path)
    swapped = {"id": "swap", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(ValueError, match="sample swap: turns must alternate"):
        _dataset(parts, write([swapped]), tmp_path)
    stray = {"id": "stray", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(ValueError, match="sample stray: text-only"):
        _dataset(parts, write([stray]), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _dataset(parts, tmp_path / "nope.json", tmp_path)


def test_truncation(parts, dataset):
    ds = _dataset(parts, dataset, dataset.parent / "images", model_max_length=N + 40)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert max(lengths) == N + 40
    short = _dataset(parts, dataset, dataset.parent / "images", model_max_length=N)
    with pytest.raises(ValueError, match="sample img-0: --model_max_length 16 cuts through"):
        short[0]

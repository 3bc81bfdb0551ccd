"""LLaVA-665K-format data for LPM training: tokenisation, supervision, subsets and bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX
from llava.inference import build_prompt
from llava.mm_utils import tokenizer_image_token
from llava.train.data import (
    BadImagesError,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    check_image,
    find_bad_images,
    select_subset,
)

N = 16


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


def _truncate(path, keep=0.5):
    """Cut a file to ``keep`` of its bytes, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_check_image_decodes_in_full(tmp_path, fmt):
    """A truncated JPEG passes ``Image.verify()`` but fails the full decode the data loader does."""
    path = tmp_path / f"x.{fmt.lower()}"
    Image.effect_noise((64, 48), 40).convert("RGB").save(path, fmt)
    assert check_image(path) is None
    _truncate(path, keep=0.9)
    if fmt == "JPEG":
        Image.open(path).verify()  # no error: verify() alone would let this file through
    assert check_image(path).startswith("image file is truncated")
    assert check_image(tmp_path / "absent.png") == "missing"
    path.write_bytes(b"not an image")
    assert "cannot identify image file" in check_image(path)


def test_find_bad_images_in_order_with_any_thread_count(tmp_path):
    paths = []
    for i in range(12):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    _truncate(paths[7])
    paths[3] = tmp_path / "gone.png"
    expected = {3: "missing", 7: check_image(paths[7])}
    assert find_bad_images(paths, threads=1) == find_bad_images(paths, threads=4) == expected
    assert list(find_bad_images(paths, threads=4)) == [3, 7]


def test_bad_images_reported_together_or_skipped(parts, tmp_path, make_dataset, caplog):
    """One truncated and one missing image: one error names both (entry, id, path, reason) and the fix;
    --skip_missing_images drops both and logs the count; --check_images False only sees the missing one."""
    data = make_dataset(tmp_path, num_samples=8)
    folder = tmp_path / "images"
    _truncate(folder / "coco" / "00002.png")
    (folder / "coco" / "00004.png").unlink()
    with pytest.raises(BadImagesError) as err:
        _dataset(parts, data, folder)
    message = str(err.value)
    assert message.startswith(f"2 of 8 selected samples have an image under --image_folder {folder} that is missing (1) "
                              "or cannot be decoded (1): ")  # fmt: skip
    assert f"sample img-2: entry 2, {folder}/coco/00002.png: image file is truncated" in message
    assert f"sample img-4: entry 4, {folder}/coco/00004.png: missing" in message
    assert message.index("img-2") < message.index("img-4") and "--skip_missing_images True" in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)

    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        ds = _dataset(parts, data, folder, skip_missing_images=True)
    assert (ds.num_skipped, ds.num_missing, ds.num_unreadable, len(ds)) == (2, 1, 1, 6)
    assert not {"img-2", "img-4"} & {e["id"] for e in ds.entries}
    assert "skipping 2 samples whose image is missing (1) or cannot be decoded (1)" in caplog.text

    unchecked = _dataset(parts, data, folder, skip_missing_images=True, check_images=False)
    assert (unchecked.num_missing, unchecked.num_unreadable, len(unchecked)) == (1, 0, 7)
    with pytest.raises(ValueError, match="sample img-2: cannot read image .*truncated"):
        unchecked[[e["id"] for e in unchecked.entries].index("img-2")]
    assert ds.fingerprint() != unchecked.fingerprint()


def test_many_bad_images_are_counted_not_all_listed(parts, tmp_path, make_dataset):
    """A wrong --image_folder makes every image missing: the error names the first MAX_LISTED (10) samples, counts
    the rest (24 samples, every 6th text-only: 20 with images, so "and 10 more") and asks about the folder."""
    from llava.train.data import MAX_LISTED

    data = make_dataset(tmp_path, num_samples=24)
    with pytest.raises(BadImagesError) as err:
        _dataset(parts, data, tmp_path / "wrong_folder")
    message = str(err.value)
    assert MAX_LISTED == 10 and message.startswith("20 of 24 selected samples have an image under --image_folder")
    assert message.count(": missing") == 10 and "; ... and 10 more (all 20 missing: is --image_folder right?)" in message
    assert "sample img-10:" in message and "sample img-12:" not in message  # img-0..img-11 minus text-5, text-11


def test_shared_image_is_decoded_once_and_reported_for_each_sample(parts, tmp_path, make_dataset, monkeypatch):
    data = make_dataset(tmp_path, num_samples=4, text_only_every=0)
    entries = json.loads(data.read_text())
    entries[3]["image"] = entries[1]["image"]
    data.write_text(json.dumps(entries))
    _truncate(tmp_path / "images" / entries[1]["image"])
    calls = []
    monkeypatch.setattr("llava.train.data.check_image", lambda path: calls.append(path) or check_image(path))
    with pytest.raises(BadImagesError, match=r"^2 of 4 .*sample img-1: entry 1, .*; sample img-3: entry 3, .*truncated"):
        _dataset(parts, data, tmp_path / "images")
    assert sorted(calls) == sorted({tmp_path / "images" / e["image"] for e in entries}) and len(calls) == 3


def _check_on_rank(rank, world, store, paths, out):
    import llava.train.data as data

    checked, original = [], data.check_image
    data.check_image = lambda path: checked.append(paths.index(path)) or original(path)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        bad = find_bad_images(paths, threads=1)
        (out / f"{rank}.json").write_text(json.dumps({"bad": bad, "checked": sorted(checked)}))
    finally:
        torch.distributed.destroy_process_group()


def test_find_bad_images_splits_the_files_across_ranks(tmp_path):
    """Under torch.distributed each rank decodes every world_size-th file and every rank gets the whole result."""
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8)).save(paths[-1])
    _truncate(paths[2])
    _truncate(paths[5])
    torch.multiprocessing.spawn(_check_on_rank, args=(2, tmp_path / "store", paths, tmp_path), nprocs=2)
    expected = {"2": check_image(paths[2]), "5": check_image(paths[5])}
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["bad"] == ranks[1]["bad"] == expected
    assert ranks[0]["checked"] == [0, 2, 4, 6] and ranks[1]["checked"] == [1, 3, 5]

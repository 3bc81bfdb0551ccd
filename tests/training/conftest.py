"""Shared fixtures: a tiny LLaVA checkpoint and a small dataset in the LLaVA-665K format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from learnpruner_ext.tiny import save_tiny_checkpoint

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


def make_dataset(root: Path, num_samples: int = 24, seed: int = 0, text_only_every: int = 6) -> Path:
    """Images under ``root/images``, annotations in ``root/data.json``; every n-th sample is text-only."""
    rng = random.Random(seed)
    (root / "images" / "coco").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(num_samples):
        if text_only_every and i % text_only_every == text_only_every - 1:
            entries.append({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": "What is one plus one?"}, {"from": "gpt", "value": "two"}]})  # fmt: skip
            continue
        color, side = rng.choice(list(COLORS)), rng.choice(["left", "right"])
        width, height = rng.choice([(56, 56), (80, 56), (56, 72)])
        image = Image.new("RGB", (width, height), (128, 128, 128))
        x0 = 4 if side == "left" else width // 2
        ImageDraw.Draw(image).rectangle([x0, 10, x0 + width // 2 - 8, height - 10], fill=COLORS[color])
        name = f"coco/{i:05d}.png"
        image.save(root / "images" / name)
        turns = [{"from": "human", "value": "What color is the object?\n<image>"}, {"from": "gpt", "value": color}]
        if i % 2:
            turns += [{"from": "human", "value": "Is it on the left or the right?"}, {"from": "gpt", "value": side}]
        entries.append({"id": f"img-{i}", "image": name, "conversations": turns})
    path = root / "data.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava", "hf", text_layers=2, image_size=56, patch_size=14)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(name="make_dataset", scope="session")
def _make_dataset_fixture():
    return make_dataset


@pytest.fixture(scope="module")
def parts(tiny_model):
    """(tokenizer, image processor, <image> id) of the tiny checkpoint, as the training data module takes them."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenizer, CLIPImageProcessor.from_pretrained(tiny_model), tokenizer.convert_tokens_to_ids("<image>")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run far faster on one thread than on two cores shared with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

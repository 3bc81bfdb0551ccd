"""Shared fixtures: tiny random checkpoints written to disk and loaded through the real loading code."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from learnpruner_ext.tiny import random_image as make_image, save_tiny_checkpoint

torch.set_num_threads(2)

TINY = dict(text_layers=8, image_size=56, patch_size=14)  # 16 vision tokens, stage-2 layer 3


@pytest.fixture(scope="session")
def tiny_geometry():
    """The geometry of ``tiny_hf`` / ``tiny_llava``, for tests that write another folder of the same model."""
    return dict(TINY)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-hf", "hf", seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Original LLaVA layout as upstream writes it (slow sentencepiece tokenizer, separate CLIP tower folder)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", "llava", seed=0, **TINY)


@pytest.fixture(scope="session")
def images():
    return [make_image(i) for i in range(3)]


@pytest.fixture
def no_grad():
    """Use with ``pytestmark = pytest.mark.usefixtures("no_grad")``: every test of the module runs under no_grad."""
    with torch.no_grad():
        yield

"""Fixtures shared by the method tests: the tiny LLaVA loaded through the real loader, and its eager twin."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from llava.model.builder import load_pretrained_model


@pytest.fixture(scope="module")
def loaded(tiny_hf):
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    return tokenizer, model, processor


@pytest.fixture(scope="module")
def eager(tiny_hf):
    return LlavaForConditionalGeneration.from_pretrained(tiny_hf, dtype=torch.float32, attn_implementation="eager").eval()

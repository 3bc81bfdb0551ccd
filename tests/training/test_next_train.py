"""LPM training on LLaVA-NeXT (issue 16 item 4): the masked training forward over ragged anyres images.

Policy under test (docs/training.md, adapter docs): the placeholders hold each image's unpruned packed tokens
(``full_tokens()``); the LPM's keep decides the patch slots; ``image_newline`` slots get keep 0, as inference drops
them whenever stage 1 prunes.
"""

from __future__ import annotations

import pytest
import torch

import learnpruner_ext.training.masked_attention as MA
from learnpruner_ext.lpm import LearnablePruningModule
from learnpruner_ext.tiny import build_tiny_next_model, random_image
from learnpruner_ext.training import LPMTrainingModel
from llava.mm_utils import image_inputs

SIZES = [(64, 48), (40, 120), (112, 112)]  # (w, h): 3 / 4 / 5 crops
EXPECTED_N = [44, 76, 88]
PREFIX, SUFFIX = 3, 5  # text tokens before / after the placeholders


@pytest.fixture(scope="module")
def tiny_next():
    model, tokenizer, processor = build_tiny_next_model(seed=0)
    model.eval()
    images = [random_image(i, s) for i, s in enumerate(SIZES)]
    inputs = image_inputs(images, processor.image_processor, model.config)
    counts = model.image_token_counts(inputs["image_sizes"])
    assert counts == EXPECTED_N and inputs["pixel_values"].shape[1] == 5
    width = PREFIX + max(counts) + SUFFIX
    g = torch.Generator().manual_seed(3)
    ids = torch.full((len(SIZES), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for b, n in enumerate(counts):  # right-padded, as the training collator does
        text = torch.randint(5, model.config.text_config.vocab_size - 1, (PREFIX + SUFFIX,), generator=g)
        row = torch.cat([text[:PREFIX], torch.full((n,), model.config.image_token_id), text[PREFIX:]])
        ids[b, : len(row)], attention_mask[b, : len(row)] = row, 1
    labels = ids.masked_fill(ids == model.config.image_token_id, -100).masked_fill(attention_mask == 0, -100)
    for b, n in enumerate(counts):  # as in the real data, the token right after <image> is not supervised
        labels[b, PREFIX + n] = -100
    return model, ids, attention_mask, labels, inputs, counts


class FixedLPM(LearnablePruningModule):
    """An LPM whose hard keep is a fixed random 0/1 pattern per image (STE through a real LPM's probabilities)."""

    def __init__(self, dim, seed=1):
        super().__init__(dim, 16)
        self.gen = torch.Generator().manual_seed(seed)
        self.masks = []

    def keep_mask(self, features):
        soft = super().keep_mask(features)
        hard = (torch.rand(soft.shape, generator=self.gen) > 0.5).to(soft)
        hard[..., :2] = 0  # drop the first candidates too
        self.masks.append(hard)
        return hard + soft - soft.detach()


def test_masked_forward_equals_physical_removal(tiny_next):
    model, ids, attention_mask, labels, inputs, counts = tiny_next
    lpm = FixedLPM(model.config.vision_config.hidden_size)
    wrapper = LPMTrainingModel(model, lpm, prune_loss_weight=1.0)
    try:
        out = wrapper(ids, attention_mask, labels, inputs["pixel_values"], inputs["image_sizes"])
        inner = model.model
        with torch.no_grad():
            groups = inner.adapter.image_groups(inner, inputs["pixel_values"], inputs["image_sizes"])
            for b, (g, hard) in enumerate(zip(groups, lpm.masks)):
                n = counts[b]
                assert g.num_tokens == n and g.features.shape[1] < n  # newline slots are not candidates
                full = g.full_tokens()[0]
                kept_slots = g.slots[0][hard[0].bool()]  # physical removal: kept patch slots, newlines dropped
                embed = inner.get_input_embeddings()
                length = int(attention_mask[b].sum())
                reduced = torch.cat([embed(ids[b, :PREFIX]), full[kept_slots], embed(ids[b, PREFIX + n : length])])[None]
                reduced_labels = torch.cat([labels[b, :PREFIX], labels.new_full((len(kept_slots),), -100),
                                            labels[b, PREFIX + n : length]])  # fmt: skip
                hidden = inner.language_model(inputs_embeds=reduced).last_hidden_state[0]
                assert 0 < len(kept_slots) < g.features.shape[1]
                targets = reduced_labels[1:]
                sums = torch.nn.functional.cross_entropy(
                    model.lm_head(hidden[:-1][targets != -100]), targets[targets != -100], reduction="sum"
                )
                sums, n_sup = sums, int((targets != -100).sum())
                if b == 0:
                    total, count = sums, n_sup
                else:
                    total, count = total + sums, count + n_sup
            assert float(out["ntp_loss"]) == pytest.approx(float(total / count), abs=1e-5)
            cand = torch.cat([m[0] for m in lpm.masks])
            assert float(out["kept_ratio"]) == pytest.approx(float(cand.mean()))  # over candidates only
            per_image = torch.stack([m[0].mean() ** 2 for m in lpm.masks]).mean()
            assert float(out["prune_loss"]) == pytest.approx(float(per_image))
        # gradients reach only the LPM
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lpm.parameters())
        assert wrapper.frozen_parameters_with_grad() == []
    finally:
        MA.restore_attention(model, wrapper.previous_attn_implementation)


def test_train_lpm_then_run_llava_on_tiny_next(make_dataset, tmp_path):
    """train_lpm.py on a tiny NeXT (ragged crops in a batch) writes lpm.safetensors; run_llava then answers with it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(repo),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    base, out = tmp_path / "next", tmp_path / "lpm"
    data = make_dataset(tmp_path / "data", num_samples=8)
    for cmd in (
        [sys.executable, "-m", "learnpruner_ext.tiny", "--family", "llava_next", "--out", str(base)],
        [sys.executable, "-m", "llava.train.train_lpm", "--model_name_or_path", str(base), "--data_path", str(data),
         "--image_folder", str(data.parent / "images"), "--output_dir", str(out), "--use_cpu", "True",
         "--per_device_train_batch_size", "4", "--max_steps", "2", "--report_to", "none", "--lpm_hidden", "16",
         "--save_strategy", "no", "--seed", "0", "--dataloader_num_workers", "0"],
    ):  # fmt: skip
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    weights = load_file(str(out / "lpm.safetensors"))
    assert weights["fc1.weight"].shape[0] == 16
    image = next((data.parent / "images" / "coco").glob("*.png"))
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(base), "--image-file", str(image),
           "--query", "What color is the object?", "--pruning-method", "learnpruner", "--visual-token-budget", "8",
           "--lpm-path", str(out), "--max_new_tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "learnpruner" and isinstance(result["answer"], str) and "UNTRAINED" not in proc.stderr


def test_collator_pads_crops_and_stacks_image_sizes():
    """NeXT items of 3 and 5 crops (and a text-only one) -> pixel_values [2, 5, 3, H, W], zero crops appended."""
    from llava.train.data import DataCollatorForSupervisedDataset

    a = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2]), "pixel_values": torch.ones(3, 3, 4, 4),
         "image_sizes": torch.tensor([48, 64])}
    text = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}
    b = {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "pixel_values": torch.full((5, 3, 4, 4), 2.0),
         "image_sizes": torch.tensor([112, 112])}  # fmt: skip
    batch = DataCollatorForSupervisedDataset(pad_token_id=0)([a, text, b])
    assert batch["pixel_values"].shape == (2, 5, 3, 4, 4)
    assert torch.equal(batch["pixel_values"][0, :3], a["pixel_values"]) and batch["pixel_values"][0, 3:].abs().sum() == 0
    assert torch.equal(batch["pixel_values"][1], b["pixel_values"])
    assert batch["image_sizes"].tolist() == [[48, 64], [112, 112]]

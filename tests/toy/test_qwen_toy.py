"""The Qwen2.5-VL-shaped toy: its patch layout, its vision pretraining features, and a CI-sized run of
``scripts/toy/train_all.sh --family qwen2_5_vl`` (generate -> vision pretrain -> VQA -> LPM -> sweep -> table).

Small data and a few optimiser steps per stage (SMOKE_STEPS); about 1-2 minutes on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from toyworld.pretrain_vision import TOY_QWEN_TOKENS, build_model, cell_features, normalize, qwen_patches, toy_cell_size

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = [21, 14, 7]


def test_qwen_patches_equal_the_processor():
    """Our tensor patchify of a 192-px image is exactly what Qwen2VLImageProcessor gives for it: 16x16 patches of
    12 px (grid [1, 16, 16]), each 3 x 2 (temporal copies) x 12 x 12 = 864 values, in 2x2-merge-block order."""
    _, _, processor = build_model(2, 0, "qwen2_5_vl")
    arrays = [np.random.default_rng(s).integers(0, 256, (192, 192, 3), dtype=np.uint8) for s in (0, 1)]
    ref = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
    u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mine, grid = qwen_patches(normalize(u8), 12)
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 16, 16]] * 2
    assert mine.shape == ref["pixel_values"].shape == (2 * 256, 864)
    torch.testing.assert_close(mine, ref["pixel_values"], rtol=0, atol=1e-6)


def test_cell_features_are_the_lpm_features():
    """Pretraining reads, per 24-px cell, the merger input the adapter gives the LPM: [B, 64, 4 * 64]."""
    model, _, _ = build_model(2, 0, "qwen2_5_vl")
    assert toy_cell_size(model.config) == 24 and TOY_QWEN_TOKENS == (192 // 24) ** 2
    u8 = torch.randint(0, 256, (2, 3, 192, 192), dtype=torch.uint8)
    with torch.no_grad():
        feats = cell_features(model, u8)
        flat, grid = qwen_patches(normalize(u8), 12)
        direct = model.model.adapter.vision_features(model.model, flat, grid)
    assert feats.shape == (2, 64, 256)
    torch.testing.assert_close(feats, torch.stack(direct))


def test_unknown_family_is_refused():
    proc = subprocess.run(["bash", str(ROOT / "scripts/toy/train_all.sh"), "--family", "qwen"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--family must be llava or qwen2_5_vl, got 'qwen'" in proc.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy_qwen")
    env = dict(os.environ, OUT_MODEL=str(tmp / "model"), DATA_ROOT=str(tmp / "data"), WORK=str(tmp / "work"),
               NUM_TRAIN="24", NUM_TEST="28", SMOKE_STEPS="2", PYTHON=sys.executable, MASTER_PORT="29537")
    proc = subprocess.run(["bash", str(ROOT / "scripts/toy/train_all.sh"), "--family", "qwen2_5_vl"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def test_qwen_base_froze_the_vit_and_trained_the_merger(run):
    """Stage 3 (train_full --freeze_vision) on Qwen2.5-VL: the ViT blocks are the pretrained ones, bit for bit;
    the merger (Qwen's projector) and the LLM moved."""
    init = load_file(run / "work" / "init" / "model.safetensors")
    base = load_file(run / "model" / "model.safetensors")
    vit = [k for k in init if ".visual." in k and ".merger." not in k]
    merger = [k for k in init if ".visual.merger." in k]
    llm = [k for k in init if "language_model" in k and "layers.0." in k]
    assert vit and merger and llm
    assert all(torch.equal(init[k], base[k]) for k in vit)
    assert any(not torch.equal(init[k], base[k]) for k in merger)
    assert any(not torch.equal(init[k], base[k]) for k in llm)
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["pruning_reference_tokens"] == 64


def test_qwen_sweep_rows(run):
    results = json.loads((run / "work" / "sweep" / "results.json").read_text())
    assert results["num_vision_tokens"] == 64 and results["conv_mode"] == "qwen2_5_vl"
    rows = {(r["method"], r["budget"]): r for r in results["rows"]}
    for m in ("learnpruner", "vispruner", "visionzip", "divprune", "random", "cls"):
        for b in BUDGETS:
            assert rows[(m, b)]["status"] == "ok", rows[(m, b)]
            answers = [json.loads(line) for line in open(rows[(m, b)]["answers_file"])]
            assert len(answers) == 28
    # a fixed-grid method has no meaning on Qwen images: recorded with its reason, the sweep went on
    for b in BUDGETS:
        assert rows[("downsample", b)]["status"] == "infeasible"
        assert "not defined on qwen2_5_vl" in rows[("downsample", b)]["note"]
    # 4 LLM layers, K=2: FastV needs T >= ceil((2*64 + 2) / 4) = 33 under the average convention
    assert all(rows[("fastv", b)]["status"] == "infeasible" for b in BUDGETS)
    assert (run / "work" / "sweep" / "table_toy.md").is_file()


SHIPPED_QWEN = ROOT / "checkpoints" / "toy-qwen2.5-vl"


@pytest.mark.skipif(not (SHIPPED_QWEN / "lpm" / "lpm.safetensors").is_file(), reason="checkpoints/toy-qwen2.5-vl is not present")
def test_shipped_qwen_toy_answers_and_uses_its_lpm():
    """The shipped Qwen toy loads through the real loader (64 merged tokens per 192-px image), answers fresh toy
    scenes (colour and shape of a single object, background colour; 85.6 % overall on the test split, 100 % on
    background) at >= 80 % unpruned, stops at ``<|im_end|>``, and LearnPruner picks up its trained LPM."""

    from learnpruner_ext import PruningConfig, apply_pruning
    from llava.inference import generate_answers
    from llava.model.builder import load_pretrained_model
    from toyworld.generate import draw_scene, make_question, sample_scene

    tokenizer, model, processor, _ = load_pretrained_model(str(SHIPPED_QWEN), device="cpu", dtype="float32")
    assert model.family == "qwen2_5_vl" and model.config.pruning_reference_tokens == TOY_QWEN_TOKENS
    images, questions, answers = [], [], []
    rng = np.random.default_rng(2026)
    while len(questions) < 24:
        scene = sample_scene(rng)
        qa = make_question(rng, scene, ("background", "color", "shape")[len(questions) % 3])
        if qa is None:
            continue
        images.append(draw_scene(scene))
        questions.append(qa[0] + "\nAnswer the question using a single word or phrase.")
        answers.append(qa[1])
    texts = generate_answers(model, tokenizer, processor, images, questions, "qwen2_5_vl")
    right = sum(t.strip().lower() == a for t, a in zip(texts, answers))
    assert right >= 0.8 * len(answers), list(zip(texts, answers))
    method = apply_pruning(model, PruningConfig("learnpruner", budget=14, position_mode="original"))
    assert method.lpm.trained and method.config.lpm_path == str(SHIPPED_QWEN / "lpm")
    pruned = generate_answers(model, tokenizer, processor, images[:6], questions[:6], "qwen2_5_vl")
    assert all(t and "<|im_end|>" not in t for t in pruned)

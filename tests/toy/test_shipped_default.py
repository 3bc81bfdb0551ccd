"""The shipped toy checkpoint is the built-in default, and LearnPruner picks up its LPM without --lpm-path."""

import json
import warnings

import pytest
import torch

from learnpruner_ext import PruningConfig, apply_pruning
from learnpruner_ext.lpm import LearnablePruningModule, shipped_lpm_path
from llava.model.builder import DEFAULT_MODEL_PATH, load_pretrained_model

SHIPPED = (DEFAULT_MODEL_PATH / "config.json").is_file() and (DEFAULT_MODEL_PATH / "lpm" / "lpm.safetensors").is_file()


def test_shipped_lpm_path(tmp_path):
    assert shipped_lpm_path(None) is None and shipped_lpm_path(tmp_path) is None
    lpm = LearnablePruningModule(8, 16)
    lpm.trained = True
    lpm.save_pretrained(tmp_path / "lpm")
    assert shipped_lpm_path(tmp_path) == str(tmp_path / "lpm")


@pytest.mark.skipif(not SHIPPED, reason="checkpoints/toy-llava (with lpm/) is not present")
def test_default_model_uses_shipped_lpm(caplog):
    tokenizer, model, processor, _ = load_pretrained_model(None, device="cpu")
    assert model.num_vision_tokens == 144 and model.config.text_config.num_hidden_layers == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "UNTRAINED LPM" warning
        method = apply_pruning(model, PruningConfig("learnpruner", budget=16))
    assert method.lpm.trained and method.config.lpm_path == str(DEFAULT_MODEL_PATH / "lpm")
    assert "using the checkpoint's LPM" in caplog.text
    shipped = LearnablePruningModule.from_pretrained(DEFAULT_MODEL_PATH / "lpm")
    assert torch.equal(method.lpm.fc1.weight.cpu(), shipped.fc1.weight)
    # an explicit --lpm-path still wins
    other = apply_pruning(model, PruningConfig("learnpruner", budget=16, lpm_path=str(DEFAULT_MODEL_PATH / "lpm")))
    assert other.config.lpm_path == str(DEFAULT_MODEL_PATH / "lpm")
    config = json.loads((DEFAULT_MODEL_PATH / "lpm" / "lpm_config.json").read_text())
    assert config["trained"] and config["prune_loss_weight"] == 1.0 and config["prune_target_ratio"] == 0.0


SHIPPED_ATP = (DEFAULT_MODEL_PATH / "atp" / "atp.safetensors").is_file()


@pytest.mark.skipif(not SHIPPED_ATP, reason="checkpoints/toy-llava/atp/ is not present")
def test_default_model_uses_shipped_atp_modules(caplog):
    """The toy's ATP modules (scripts/toy/train_atp.sh, target 72, modules before layers 1, 2, 3) are used without
    --atp-path: no UNTRAINED warning, the loaded weights are the shipped ones, and on 16 toy test images the prompts
    keep different counts, all 144 in layer 0 and nested (non-increasing) after."""
    from learnpruner_ext.atp import ATPModules
    from llava.inference import build_prompt, prepare_batch
    import numpy as np

    from toyworld.generate import draw_scene, make_question, sample_scene

    tokenizer, model, processor, _ = load_pretrained_model(None, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method = apply_pruning(model, PruningConfig("atp", budget=72))
    shipped = ATPModules.from_pretrained(DEFAULT_MODEL_PATH / "atp")
    assert shipped.trained and shipped.target_tokens == 72 and shipped.layers == (1, 2, 3)
    assert method.config.atp_path == str(DEFAULT_MODEL_PATH / "atp") and "using the checkpoint's" in caplog.text
    assert torch.equal(method.atp[1].proj.weight.cpu(), shipped[1].proj.weight)
    rng = np.random.default_rng(0)
    images, questions = [], []
    for qtype in ["count", "color", "shape", "position"] * 8:
        scene = sample_scene(rng)
        made = make_question(rng, scene, qtype)
        if made is not None and len(images) < 16:
            images.append(draw_scene(scene))
            questions.append(made[0] + "\nAnswer the question using a single word or phrase.")
    batch = prepare_batch(model, tokenizer, processor, images, [build_prompt(q) for q in questions])
    with torch.no_grad():
        model(**batch)
    counts = model.last_pruning_trace().vision_tokens_per_sample
    assert all(c[0] == 144 and c[1] >= c[2] >= c[3] for c in counts)
    assert len({tuple(c) for c in counts}) > 1, counts

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

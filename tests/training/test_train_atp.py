"""End-to-end ATP training (llava/train/train_atp.py): the real script under DeepSpeed, resume, the checkpoint in
``run_llava --pruning-method atp``, the two learning rates, a trainable LLM (full and LoRA), errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_env import free_port, run_logged, script_env
from transformers import TrainerCallback

from learnpruner_ext.atp import ATPModules
from llava.train.train_atp import build, parse_args, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def atp_model(tmp_path_factory):
    """A 4-layer tiny LLaVA (16 vision tokens): modules before layers 1, 2 and 3."""
    from learnpruner_ext.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("atp") / "llava", "hf", text_layers=4, image_size=56, patch_size=14)


def _argv(model, data, out, *extra):
    return [
        "--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent / "images"),
        "--output_dir", str(out), "--use_cpu", "True", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--atp_hidden", "16", "--atp_layers", "1,2,3", "--target_tokens", "8",
        "--save_strategy", "no", "--seed", "0", *map(str, extra),
    ]  # fmt: skip


def _script(model, data, out, steps, launcher, log, **env):
    env = script_env(**{
        "NUM_GPUS": "1", "GLOBAL_BATCH": "4", "PER_DEVICE_BATCH": "4", "DATA": str(data), "TARGET_TOKENS": "8",
        "IMAGES": str(data.parent / "images"), "DATA_FRACTION": "1.0", "LAUNCHER": launcher, "ATP_LAYERS": "1,2,3",
        "LR": "1e-2", "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": f"--use_cpu True --max_steps {steps} --save_steps 2 --atp_hidden 16 --dataloader_num_workers 0",
        **env,
    })  # fmt: skip
    return run_logged(["bash", "scripts/v1_5/finetune_atp.sh", str(model), str(out)], log, env)


def test_script_resume_and_run_llava(atp_model, dataset, tmp_path):
    """finetune_atp.sh (deepspeed launcher, ZeRO-2 with the Trainer's optimizer) stops after 2 steps; the same
    command under torchrun resumes to 4 without repeating steps 1-2; run_llava --pruning-method atp --atp-path
    loads the result (no UNTRAINED warning) and measures adaptive per-layer counts."""
    out = tmp_path / "out"
    first = _script(atp_model, dataset, out, 2, "deepspeed", tmp_path / "first.log")
    checkpoint = out / "checkpoint-2"
    config = json.loads((checkpoint / "atp_config.json").read_text())
    assert config["trained"] is True and config["step"] == 2 and config["target_tokens"] == 8
    assert config["layers"] == [1, 2, 3] and config["llm"] == "frozen" and config["base_model"] == str(atp_model.resolve())
    assert (checkpoint / "global_step2").is_dir() and not list(checkpoint.glob("model*.safetensors"))
    assert not (checkpoint / "llm.safetensors").exists()
    assert sum(f.stat().st_size for f in (checkpoint / "global_step2").iterdir()) < 500_000  # modules + optimizer only
    assert len(re.findall(r"'atp_loss'", first)) == 2 and "'mean_tokens'" in first

    second = _script(atp_model, dataset, out, 4, "torchrun", tmp_path / "second.log")
    assert "resuming from" in second and "checkpoint-2" in second
    assert len(re.findall(r"'atp_loss'", second)) == 2  # steps 3 and 4 only
    state = json.loads((out / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    final, after_two = ATPModules.from_pretrained(out), ATPModules.from_pretrained(checkpoint)
    assert final.trained and json.loads((out / "atp_config.json").read_text())["step"] == 4
    assert not torch.equal(final[1].proj.weight, after_two[1].proj.weight)

    image = next((dataset.parent / "images" / "coco").glob("*.png"))
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(atp_model), "--image-file", str(image),
           "--query", "What color is the object?", "--pruning-method", "atp", "--visual-token-budget", "8",
           "--atp-path", str(out), "--max_new_tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "atp" and result["convention"] == "adaptive"
    per_layer = result["vision_tokens_per_layer"]
    assert len(per_layer) == 4 and per_layer[0] == 16 and result["average_vision_tokens"] == pytest.approx(sum(per_layer) / 4)
    assert "UNTRAINED" not in proc.stderr


def test_frozen_base_two_learning_rates_and_the_target(atp_model, dataset, tmp_path):
    """--freeze_llm (default): the base stays bit-identical, only atp.* trains, at --learning_rate. The soft average
    N̄ moves towards --target_tokens: from the keep-most start (every token kept, N̄ = 16) the target term
    pulls it down within 12 steps at lr 0.05."""
    trainer, resume, _ = build(*parse_args(_argv(atp_model, dataset, tmp_path / "out", "--max_steps", "12",
                                             "--learning_rate", "5e-2", "--lambda_atp", "0")))  # fmt: skip
    model = trainer.training_model
    assert resume is None and set(model.trained_parameters()) == {f"atp.{n}" for n, _ in model.atp.named_parameters()}
    base = {k: v.clone() for k, v in model.vlm.state_dict().items()}
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] and len(trainer.optimizer.param_groups) == 1
    assert all(torch.equal(base[k], v) for k, v in model.vlm.state_dict().items())
    tokens = [h["mean_tokens"] for h in trainer.state.log_history if "mean_tokens" in h]
    assert len(tokens) == 12 and abs(tokens[-1] - 8) < abs(tokens[0] - 8) - 0.5, tokens


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_trainable_llm_checkpoint_resume_and_tuned_model(atp_model, dataset, tmp_path, tuning):
    """--freeze_llm False: two parameter groups (1e-4 ATP, 2e-5 LLM); checkpoints hold only the trained parts
    (llm.safetensors: every LLM weight; lora.safetensors: the LoRA matrices only); a resume continues from them
    (plain Trainer, no DeepSpeed) to the weights of an uninterrupted run (1e-6); the final tuned model (LoRA merged)
    loads with its shipped atp/ and answers."""
    out = tmp_path / "out"
    argv = _argv(atp_model, dataset, out, "--freeze_llm", "False", "--llm_tuning", tuning, "--save_strategy", "steps",
                 "--save_steps", "2", "--learning_rate", "1e-4", "--llm_learning_rate", "2e-5", "--lora_r", "4")  # fmt: skip
    first, _, _ = build(*parse_args(argv + ["--max_steps", "4"]))
    first.add_callback(_StopAt(2))  # an interrupted 4-step run: the schedule is the 4-step one
    first.train()
    groups = first.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-4, 2e-5]
    llm_file = out / "checkpoint-2" / ("llm.safetensors" if tuning == "full" else "lora.safetensors")
    saved = load_file(str(llm_file))
    lm_params = dict(first.training_model.vlm.model.language_model.named_parameters())
    if tuning == "full":
        assert len(saved) == len(lm_params) and all(k.startswith("model.language_model.") for k in saved)
    else:
        assert saved and all("lora_" in k for k in saved)
        assert sum(v.numel() for v in saved.values()) < sum(p.numel() for p in lm_params.values()) / 4
    second = train(argv + ["--max_steps", "4"])
    steps = [h["step"] for h in second.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's trainer_state, 3-4 run now
    # the resume restored what was trained: the same weights as an uninterrupted 4-step run
    straight = tmp_path / "straight"
    train([a if a != str(out) else str(straight) for a in argv] + ["--max_steps", "4", "--save_strategy", "no"])
    for name in ("atp.safetensors", llm_file.name):
        resumed, uninterrupted = load_file(str(out / name)), load_file(str(straight / name))
        assert resumed.keys() == uninterrupted.keys()
        worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
        assert worst <= 1e-6, (name, worst)
    tuned = out / "model"
    assert (tuned / "config.json").is_file() and (tuned / "atp" / "atp.safetensors").is_file()
    image = next((dataset.parent / "images" / "coco").glob("*.png"))
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(tuned), "--image-file", str(image),
           "--query", "What color is the object?", "--pruning-method", "atp", "--visual-token-budget", "8",
           "--max_new_tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["method"] == "atp" and "UNTRAINED" not in proc.stderr
    if tuning == "lora":
        weights = load_file(str(tuned / "model.safetensors"))
        assert not any("lora_" in k for k in weights)


def test_errors_before_loading(atp_model, dataset, tmp_path):
    with pytest.raises(SystemExit, match="--target_tokens is required"):
        train([a for a in _argv(atp_model, dataset, tmp_path / "o") if a not in ("--target_tokens", "8")])
    with pytest.raises(SystemExit, match="--llm_tuning must be full or lora"):
        train(_argv(atp_model, dataset, tmp_path / "o", "--freeze_llm", "False", "--llm_tuning", "qlora"))
    with pytest.raises(SystemExit, match="N_target must be in"):
        train(_argv(atp_model, dataset, tmp_path / "o", "--target_tokens", "40"))

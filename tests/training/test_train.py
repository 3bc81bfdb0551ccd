"""End-to-end LPM training: the real script under DeepSpeed, frozen base, pruning loss, resume, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from script_env import finetune_script, script_env
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from learnpruner_ext.lpm import LearnablePruningModule
from llava.train.train_lpm import build, parse_args, train

REPO = Path(__file__).resolve().parents[2]


def _argv(model, data, out, *extra):
    return [
        "--model_name_or_path", str(model), "--data_path", str(data), "--image_folder", str(data.parent / "images"),
        "--output_dir", str(out), "--use_cpu", "True", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--lpm_hidden", "64", "--save_strategy", "no", "--seed", "0", *map(str, extra),
    ]  # fmt: skip


def _losses(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_deepspeed_zero2_script_resume_and_run_llava(tiny_model, dataset, tmp_path):
    """finetune_lpm.sh under the deepspeed launcher stops after 2 steps; the same command (under torchrun)
    resumes to 4 without repeating steps 1-2; run_llava --lpm-path loads the result."""
    out = tmp_path / "out"
    first = finetune_script(tiny_model, dataset, out, 2, "deepspeed", tmp_path / "first.log")
    checkpoint = out / "checkpoint-2"
    config = json.loads((checkpoint / "lpm_config.json").read_text())
    assert config["trained"] is True and config["step"] == 2 and config["base_model"] == str(tiny_model.resolve())
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "global_step2").is_dir()
    # the DeepSpeed checkpoint holds the LPM and optimizer, not the frozen base
    assert sum(f.stat().st_size for f in (checkpoint / "global_step2").iterdir()) < 200_000
    assert not list(checkpoint.glob("model*.safetensors"))
    assert len(re.findall(r"'ntp_loss'", first)) == 2 and "'kept_ratio'" in first

    second = finetune_script(tiny_model, dataset, out, 4, "torchrun", tmp_path / "second.log")
    assert "resuming from" in second and "checkpoint-2" in second
    assert len(re.findall(r"'ntp_loss'", second)) == 2  # steps 3 and 4 only
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    final = json.loads((out / "lpm_config.json").read_text())
    assert final["trained"] is True and final["step"] == 4
    trained = LearnablePruningModule.from_pretrained(out)
    after_two = LearnablePruningModule.from_pretrained(checkpoint)
    assert not torch.equal(trained.fc1.weight, after_two.fc1.weight)

    image = next((dataset.parent / "images" / "coco").glob("*.png"))
    cmd = [sys.executable, "-m", "llava.eval.run_llava", "--model-path", str(tiny_model), "--image-file", str(image),
           "--query", "What color is the object?", "--pruning-method", "learnpruner", "--visual-token-budget", "4",
           "--lpm-path", str(out), "--max_new_tokens", "3", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["method"] == "learnpruner" and result["r1"] < 16 and result["average_vision_tokens"] == 4.0
    assert "UNTRAINED" not in proc.stderr


def test_base_stays_bit_identical_and_lpm_changes(tiny_model, dataset, tmp_path):
    trainer, resume = build(*parse_args(_argv(tiny_model, dataset, tmp_path / "out", "--max_steps", "3",
                                             "--learning_rate", "1e-2", "--lpm_init_keep_bias", "1.0")))  # fmt: skip
    assert resume is None
    module = trainer.training_model
    base = {k: v.clone() for k, v in module.vlm.state_dict().items()}
    lpm_before = {k: v.clone() for k, v in module.lpm.state_dict().items()}
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == sum(p.numel() for p in module.lpm.parameters())
    trainer.train()
    trainer.save_model()
    after = module.vlm.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    on_disk = load_file(str(tiny_model / "model.safetensors"))
    assert all(torch.equal(on_disk[k], after[k]) for k in on_disk if k in after)
    assert all(not torch.equal(lpm_before[k], v) for k, v in module.lpm.state_dict().items())
    saved = LearnablePruningModule.from_pretrained(tmp_path / "out")
    assert saved.trained and all(torch.equal(saved.state_dict()[k], v) for k, v in module.lpm.state_dict().items())


def test_runtime_check_catches_base_gradients(tiny_model, dataset, tmp_path):
    trainer, _ = build(*parse_args(_argv(tiny_model, dataset, tmp_path / "out", "--max_steps", "1")))
    trainer.training_model.vlm.lm_head.weight.requires_grad_(True)  # a bug that would train the base
    with pytest.raises(RuntimeError, match="frozen base parameters .*lm_head.weight"):
        trainer.train()


def _kept_ratios(tiny_model, dataset, out, weight, target=0.0):
    trainer = train(_argv(tiny_model, dataset, out, "--max_steps", "10", "--learning_rate", "0.05", "--lpm_init_keep_bias",
                          "1.0", "--prune_loss_weight", weight, "--prune_target_ratio", target))  # fmt: skip
    return [h["kept_ratio"] for h in _losses(trainer)]


def test_pruning_loss_lowers_the_kept_ratio(tiny_model, dataset, tmp_path):
    """Same data and start; λ_p pulls the kept share towards τ = 0 and τ = 1. On this random tiny LLM (seed 0) the
    plain LM loss drifts towards pruning (kept share about 0.1 by step 10), so without λ_p the kept run would fail.
    Measured over tiny-model seeds 0-2: pruned ends at 0.0 and kept at 1.0 from step 4 on; the bound of 0.9 leaves
    room for the single-step dips seen when the tokenizer (and so the random weights) change."""
    plain = _kept_ratios(tiny_model, dataset, tmp_path / "plain", 0.0)
    pruned = _kept_ratios(tiny_model, dataset, tmp_path / "pruned", 1000.0)
    kept = _kept_ratios(tiny_model, dataset, tmp_path / "kept", 1000.0, target=1.0)
    assert plain[0] == pruned[0] == kept[0] == 1.0  # --lpm_init_keep_bias 1: every token kept at first
    tail = lambda r: sum(r[-3:]) / 3  # noqa: E731
    assert tail(pruned) == 0.0 < tail(plain) - 0.05
    assert tail(kept) >= 0.9


class _StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _resumable_run(tiny_model, dataset, out, max_steps):
    argv = _argv(tiny_model, dataset, out, "--max_steps", max_steps, "--learning_rate", "1e-2", "--lr_scheduler_type",
                 "constant", "--save_strategy", "steps", "--save_steps", "2", "--lpm_init_keep_bias", "1.0")  # fmt: skip
    trainer, resume = build(*parse_args(argv))
    counter = _StepCounter()
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer, resume, counter.steps


def test_resume_continues_without_repeating_steps(tiny_model, dataset, tmp_path):
    _, _, straight_steps = _resumable_run(tiny_model, dataset, tmp_path / "straight", 4)
    _, resume, first_steps = _resumable_run(tiny_model, dataset, tmp_path / "stopped", 2)
    assert resume is None and first_steps == [1, 2]
    trainer, resume, second_steps = _resumable_run(tiny_model, dataset, tmp_path / "stopped", 4)
    assert resume.endswith("checkpoint-2") and second_steps == [3, 4] and straight_steps == [1, 2, 3, 4]
    assert [h["step"] for h in _losses(trainer)] == [1, 2, 3, 4]
    a = LearnablePruningModule.from_pretrained(tmp_path / "straight").state_dict()
    b = LearnablePruningModule.from_pretrained(tmp_path / "stopped").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same data order, optimizer and RNG state


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data_fraction", "0"], r"error: --data_fraction must be in \(0, 1\]"),
        (["--data_fraction", "1.5"], r"error: --data_fraction must be in \(0, 1\]"),
        (["--model_name_or_path", "/nonexistent"], r"error: no checkpoint at /nonexistent"),
        (["--prune_target_ratio", "1.5"], r"error: the target keep ratio τ must be in \[0, 1\]"),
        (["--data_path", "/nonexistent.json"], r"error: --data_path /nonexistent.json does not exist"),
    ],
)
def test_cli_errors(tiny_model, dataset, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train(_argv(tiny_model, dataset, tmp_path / "out", "--max_steps", "1") + extra)


def test_cli_names_bad_images_before_training_and_skips_them(tiny_model, make_dataset, tmp_path):
    """A missing and a truncated image stop the run before step 1 with one error naming both (before the
    pre-pass, the truncated one crashed training at its step with a traceback); skipping drops both."""
    data = make_dataset(tmp_path / "data", num_samples=6)
    images = tmp_path / "data" / "images" / "coco"
    (images / "00002.png").unlink()
    truncated = (images / "00003.png").read_bytes()
    (images / "00003.png").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(SystemExit, match=r"error: 2 of 6 .*sample img-2: entry 2, .*00002\.png: missing; sample img-3: "
                       r"entry 3, .*00003\.png: image file is truncated\. Fix .*--skip_missing_images True"):  # fmt: skip
        train(_argv(tiny_model, data, tmp_path / "out", "--max_steps", "1"))
    assert not (tmp_path / "out").exists()  # nothing trained
    trainer = train(_argv(tiny_model, data, tmp_path / "out", "--max_steps", "1", "--skip_missing_images", "True"))
    assert trainer.train_dataset.num_skipped == 2 and len(trainer.train_dataset) == 4


def test_resume_refuses_changed_args_unless_allowed(tiny_model, make_dataset, tmp_path):
    """A resume names each changed argument (checkpoint -> now) and stops; --allow_changed_args resumes,
    and the new learning rate is the one used (the checkpoint's scheduler would otherwise keep 0.01)."""
    data = make_dataset(tmp_path / "data", num_samples=12)
    out = tmp_path / "out"
    _resumable_run(tiny_model, data, out, 2)  # lr 1e-2, constant, checkpoint-2
    saved = json.loads((out / "checkpoint-2" / "run_args.json").read_text())
    assert saved["learning_rate"] == 0.01 and saved["effective_batch_size"] == 4 and saved["num_samples"] == 12

    def resume(*extra):
        return _argv(tiny_model, data, out, "--max_steps", "4", "--lr_scheduler_type", "constant", "--save_strategy",
                     "steps", "--save_steps", "2", "--learning_rate", "1e-2", *extra)  # fmt: skip

    changes = {
        ("--learning_rate", "0.1"): "learning_rate 0.01 -> 0.1",
        ("--per_device_train_batch_size", "2"): "per_device_train_batch_size 4 -> 2, effective_batch_size 4 -> 2",
        ("--gradient_accumulation_steps", "2"): "gradient_accumulation_steps 1 -> 2, effective_batch_size 4 -> 8",
        ("--data_fraction", "0.5"): "data_fraction 1.0 -> 0.5",
        ("--prune_loss_weight", "2"): "prune_loss_weight 1.0 -> 2.0",
        ("--lpm_hidden", "32"): "lpm_hidden 64 -> 32",
    }
    for extra, named in changes.items():
        with pytest.raises(SystemExit, match=rf"error: checkpoint .*checkpoint-2 was trained with other values "
                           rf"\(checkpoint -> this run\): {re.escape(named)}\. .*--allow_changed_args True"):  # fmt: skip
            train(resume(*extra))
    entries = json.loads(data.read_text())
    data.write_text(json.dumps(entries[:-1]))  # same path, other content
    with pytest.raises(ValueError, match=r"num_samples 12 -> 11, samples_sha256 '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        build(*parse_args(resume()))
    data.write_text(json.dumps(entries))

    trainer = train(resume("--learning_rate", "0.1", "--allow_changed_args", "True"))
    assert [(h["step"], h["learning_rate"]) for h in _losses(trainer)] == [(1, 0.01), (2, 0.01), (3, 0.1), (4, 0.1)]
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.1] * len(trainer.optimizer.param_groups)
    assert json.loads((out / "run_args.json").read_text())["learning_rate"] == 0.1

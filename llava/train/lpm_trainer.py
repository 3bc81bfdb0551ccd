"""``transformers.Trainer`` for the LPM: LPM-only checkpoints, resumable, with pruning metrics in the logs.

A checkpoint ``checkpoint-N/`` holds ``lpm.safetensors`` + ``lpm_config.json`` (fp32 weights,
``trained: true``, base model, step) and what resuming needs: ``trainer_state.json``, RNG states, the
scheduler and the optimizer (``optimizer.pt``, or DeepSpeed's ``global_stepN/`` saved without the frozen
base weights), and ``run_args.json``, the arguments a resume is compared with (``train_lpm.RESUME_ARGS``).
The base model is never written: it is frozen and comes from ``--model_name_or_path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer import SCHEDULER_NAME

from learnpruner_ext.lpm import LPM_CONFIG, LPM_WEIGHTS, LearnablePruningModule

RUN_ARGS = "run_args.json"  # written with every checkpoint; train_lpm compares a resume with it
METRICS = ("ntp_loss", "prune_loss", "kept_ratio")


class _ProgressPostfix(TrainerCallback):
    """Shows the latest pruning metrics next to the tqdm training bar."""

    def __init__(self, trainer: "LPMTrainer"):
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        bar = next((cb.training_bar for cb in self.trainer.callback_handler.callbacks
                    if isinstance(cb, ProgressCallback) and cb.training_bar is not None), None)  # fmt: skip
        if bar is not None and logs and "kept_ratio" in logs:
            bar.set_postfix(ntp=f"{logs['ntp_loss']:.3f}", kept=f"{logs['kept_ratio']:.3f}", refresh=False)


class LPMTrainer(Trainer):
    def __init__(self, *args, lpm_metadata: dict | None = None, run_args: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lpm_metadata = dict(lpm_metadata or {})
        self.run_args = dict(run_args or {})
        self._sums = torch.zeros(5, dtype=torch.float64)  # ntp, prune, batches, kept*images, images
        self.add_callback(_ProgressPostfix(self))

    # -- the training model, unwrapped -------------------------------------------------------------
    @property
    def training_model(self):
        return self.accelerator.unwrap_model(self.model)

    # -- loss, metrics and the frozen-base check -----------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        images = outputs["num_images"]
        kept = float(outputs["kept_ratio"]) if outputs["kept_ratio"] is not None else 0.0
        self._sums += torch.tensor(
            [float(outputs["ntp_loss"]), float(outputs["prune_loss"]), 1.0, kept * images, images], dtype=torch.float64
        )
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        leaked = self.training_model.frozen_parameters_with_grad()
        if leaked:
            raise RuntimeError(f"frozen base parameters became trainable or received gradients: {leaked[:5]}")
        return loss

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:  # a training log: every rank gets here together
            ntp, prune, batches, kept, images = self._reduced_sums()
            if batches:
                logs["ntp_loss"] = round(ntp / batches, 4)
                logs["prune_loss"] = round(prune / batches, 4)
            if images:
                logs["kept_ratio"] = round(kept / images, 4)
        super().log(logs, start_time)

    def _reduced_sums(self) -> list[float]:
        """The metric sums since the last log, summed over the ranks; resets them."""
        sums = self._sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.to(self.args.device)
            torch.distributed.all_reduce(sums)
            sums = sums.cpu()
        self._sums.zero_()
        return sums.tolist()

    # -- saving: the LPM only ------------------------------------------------------------------------
    def _trained_fp32_state(self) -> dict[str, torch.Tensor]:
        """Every trained parameter (``training_model.trained_parameters()``, full names) in fp32: DeepSpeed's master
        copy when it keeps one. Call on every rank."""
        params = self.training_model.trained_parameters()
        if self.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_fp32_param

            state = {}
            for name, param in params.items():
                full = safe_get_full_fp32_param(param)
                state[name] = (full if full is not None else param.detach()).float().cpu().clone()
            return state
        return {n: p.detach().float().cpu().clone() for n, p in params.items()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state = {n.removeprefix("lpm."): v for n, v in self._trained_fp32_state().items()}
        if self.args.should_save:
            source = self.training_model.lpm
            lpm = LearnablePruningModule(source.in_features, source.hidden_features)
            lpm.load_state_dict(state)
            lpm.trained = True
            lpm.save_pretrained(output_dir, **self.lpm_metadata, step=self.state.global_step)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            Path(output_dir, RUN_ARGS).write_text(json.dumps(self.run_args, indent=1) + "\n")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's own checkpoint (optimizer partitions, and its scheduler if it made one), minus the base
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Resume the schedule from ``checkpoint`` at this run's ``--learning_rate``.

        The saved scheduler carries the old peak lr of each group (``base_lrs``); when ``--allow_changed_args`` let
        a new one through, that group's base and current lr are rescaled to it, so the schedule continues at its
        step with the new peak instead of silently keeping the old one.
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # unwrap accelerate's (DeepSpeed)
        if checkpoint is None or not hasattr(scheduler, "base_lrs"):
            return
        groups = scheduler.optimizer.param_groups
        for k, (group, old, new) in enumerate(zip(groups, scheduler.base_lrs, self.group_learning_rates(len(groups)))):
            if old != new:
                group["lr"] *= new / old
                group["initial_lr"] = scheduler.base_lrs[k] = new
        scheduler._last_lr = [group["lr"] for group in groups]

    def group_learning_rates(self, num_groups: int) -> list[float]:
        """This run's peak lr of each optimizer parameter group: ``--learning_rate`` for all of them."""
        return [self.args.learning_rate] * num_groups

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Non-DeepSpeed resume: the LPM weights (DeepSpeed restores them from its own checkpoint)."""
        folder = Path(resume_from_checkpoint)
        if not (folder / LPM_WEIGHTS).is_file() or not (folder / LPM_CONFIG).is_file():
            raise ValueError(f"{folder} is not an LPM training checkpoint ({LPM_WEIGHTS} / {LPM_CONFIG} missing)")
        lpm = self.training_model.lpm
        config = json.loads((folder / LPM_CONFIG).read_text())
        if (config["in_features"], config.get("hidden_features")) != (lpm.in_features, lpm.hidden_features):
            raise ValueError(
                f"checkpoint {folder} holds a {config['in_features']}->{config.get('hidden_features')} LPM; this run "
                f"builds {lpm.in_features}->{lpm.hidden_features} (--lpm_hidden)"
            )
        state = load_file(str(folder / LPM_WEIGHTS))
        lpm.load_state_dict({k: v.to(lpm.fc1.weight.dtype) for k, v in state.items()})

"""``transformers.Trainer`` for ATP-LLaVA's modules: checkpoints of the trained parts only, resumable, with the ATP
loss terms and the achieved token average in the logs.

A checkpoint ``checkpoint-N/`` (and the final output folder) holds ``atp.safetensors`` + ``atp_config.json``
(fp32, ``trained: true``, the training target, base model, step), and when the language model trains, its trained
weights: ``llm.safetensors`` (``--freeze_llm False --llm_tuning full``: every language-model weight) or
``lora.safetensors`` (``--llm_tuning lora``: the LoRA matrices; their settings in ``atp_config.json``). Resuming
needs the rest, as for the LPM (:class:`llava.train.lpm_trainer.LPMTrainer`): trainer state, RNG, scheduler,
optimizer, ``run_args.json``. The frozen base is never written.

Learning rates: ``--learning_rate`` (1e-4, the paper's) for the ATP modules and ``--llm_learning_rate`` (2e-5) for
the language model, as two optimizer parameter groups.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from learnpruner_ext.atp import ATP_CONFIG, ATP_WEIGHTS, ATPModules
from llava.train.lpm_trainer import RUN_ARGS, LPMTrainer

LLM_WEIGHTS = {"full": "llm.safetensors", "lora": "lora.safetensors"}  # the trained language-model part, by mode
ATP_METRICS = ("ntp_loss", "atp_loss", "target_loss")


class ATPTrainer(LPMTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sums = torch.zeros(6, dtype=torch.float64)  # ntp, atp, target, batches, tokens*images, images

    # -- optimizer: two learning rates -----------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.training_model
            atp = [p for p in model.atp.parameters() if p.requires_grad]
            llm = [p for n, p in model.trained_parameters().items() if not n.startswith("atp.")]
            params = [atp, llm] if llm else [atp]
            groups = [{"params": group, "lr": lr, "weight_decay": self.args.weight_decay}
                      for group, lr in zip(params, self.group_learning_rates(len(params)))]  # fmt: skip
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def group_learning_rates(self, num_groups: int) -> list[float]:
        """``--learning_rate`` for the ATP modules, then ``--llm_learning_rate`` for the language model's group."""
        return [self.args.learning_rate, self.args.llm_learning_rate][:num_groups]

    # -- loss and metrics ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        images = outputs["num_images"]
        tokens = float(outputs["mean_tokens"]) if outputs["mean_tokens"] is not None else 0.0
        self._sums += torch.tensor([float(outputs["ntp_loss"]), float(outputs["atp_loss"]),
                                    float(outputs["target_loss"]), 1.0, tokens * images, images], dtype=torch.float64)  # fmt: skip
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:
            *terms, batches, tokens, images = self._reduced_sums()
            if batches:
                logs.update({name: round(value / batches, 4) for name, value in zip(ATP_METRICS, terms)})
            if images:
                logs["mean_tokens"] = round(tokens / images, 2)  # soft average vision tokens per layer (N̄)
        Trainer.log(self, logs, start_time)

    # -- saving: the trained parts only --------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state = self._trained_fp32_state()
        if not self.args.should_save:
            return
        model = self.training_model
        atp = ATPModules.from_config(model.atp.config_dict())
        atp.load_state_dict({n[len("atp."):]: v for n, v in state.items() if n.startswith("atp.")})
        atp.trained = True
        atp.save_pretrained(output_dir, **self.lpm_metadata, step=self.state.global_step)
        llm = {n[len("vlm."):]: v.contiguous() for n, v in state.items() if n.startswith("vlm.")}
        if llm:
            name = LLM_WEIGHTS[model.train_llm]
            save_file(llm, os.path.join(output_dir, name + ".tmp"))
            os.replace(os.path.join(output_dir, name + ".tmp"), os.path.join(output_dir, name))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        Path(output_dir, RUN_ARGS).write_text(json.dumps(self.run_args, indent=1) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Non-DeepSpeed resume: the trained weights (DeepSpeed restores them from its own checkpoint)."""
        folder = Path(resume_from_checkpoint)
        if not (folder / ATP_WEIGHTS).is_file() or not (folder / ATP_CONFIG).is_file():
            raise ValueError(f"{folder} is not an ATP training checkpoint ({ATP_WEIGHTS} / {ATP_CONFIG} missing)")
        model = self.training_model
        saved = ATPModules.from_pretrained(folder)
        if (saved.layers, saved.hidden_features) != (model.atp.layers, model.atp.hidden_features):
            raise ValueError(f"checkpoint {folder} holds ATP modules before layers {list(saved.layers)} of width "
                             f"{saved.hidden_features}; this run builds {list(model.atp.layers)} of width "
                             f"{model.atp.hidden_features} (--atp_layers / --atp_hidden)")  # fmt: skip
        model.atp.load_state_dict(saved.state_dict())
        if model.train_llm != "none":
            path = folder / LLM_WEIGHTS[model.train_llm]
            if not path.is_file():
                raise ValueError(f"{folder} has no {path.name}, but this run trains the language model "
                                 f"({model.train_llm}); resume with the run's own --freeze_llm / --llm_tuning")  # fmt: skip
            params = model.trained_parameters()
            with torch.no_grad():
                for name, value in load_file(str(path)).items():
                    params["vlm." + name].copy_(value)

"""What every training module here shares: a VLM (``self.vlm``) frozen except for the parameters a run trains.

A subclass builds its parts, then calls :meth:`FrozenVLMTraining.set_trainable` once with the names of the
parameters it trains (LPM training: ``lpm.*``; ATP training: ``atp.*`` and, optionally, the language model's or its
LoRA adapters'). Everything else is frozen, never receives a gradient (:meth:`frozen_parameters_with_grad`, which
the trainers check after every step) and is not part of a checkpoint (:meth:`load_state_dict`).
"""

from __future__ import annotations

from torch import nn


class FrozenVLMTraining(nn.Module):
    what = "training"  # named in errors, e.g. "LPM training state does not match"

    def set_trainable(self, names) -> None:
        """Freeze every parameter but ``names`` (full names in this module) and clear the frozen ones' gradients."""
        self._trainable = frozenset(names)
        for name, param in self.named_parameters():
            param.requires_grad_(name in self._trainable)
        self.vlm.zero_grad(set_to_none=True)

    @property
    def config(self):
        """The language model's config: what DeepSpeed's ``"auto"`` bucket sizes are derived from."""
        return self.vlm.config.text_config

    def train(self, mode: bool = True):
        super().train(mode)
        inner = self.vlm.model
        tower = inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual  # Qwen2.5-VL: ``visual``
        tower.eval()  # frozen and under no_grad; the LLMs have no dropout to switch (attention dropout 0)
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """Recompute the decoder layers in backward (what ``--gradient_checkpointing`` asks the Trainer for)."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        language_model = self.vlm.model.language_model
        language_model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        language_model.disable_input_require_grads()  # the keep mask carries the graph; inputs need no grad

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What this run trains (and its checkpoints hold), by name."""
        return {n: p for n, p in self.named_parameters() if n in self._trainable}

    def frozen_parameters_with_grad(self) -> list[str]:
        """Names of frozen parameters that became trainable or hold a gradient (must be empty)."""
        return [n for n, p in self.named_parameters()
                if n not in self._trainable and (p.requires_grad or p.grad is not None)]  # fmt: skip

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept state dicts of the trained parameters only (what checkpoints hold); the frozen base comes from its
        own checkpoint."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if k in self._trainable]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"{self.what} state does not match: missing {missing[:5]}, "
                                   f"unexpected {result.unexpected_keys[:5]}")  # fmt: skip
        return result

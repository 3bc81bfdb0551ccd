"""The module that LPM training optimises: a frozen LLaVA plus the trainable LPM.

One forward (paper §3 and Appendix A.1):

1. The vision tower runs under ``no_grad``; its feature-layer patches ``X_v`` [B_img, N, Dv] feed both the
   (frozen) projector and the LPM.
2. The sequence keeps all N vision tokens; ``M`` is 1 for text and the LPM's hard keep mask (STE) for the
   vision tokens.
3. The language model runs with Eq. 6 attention (:mod:`.masked_attention`) and contiguous positions
   ``cumsum(M_hard · attention_mask) − 1``, i.e. exactly as inference would on the physically pruned
   sequence.
4. ``loss = L_ntp + λ_p · mean_b (mean_n M_hard − τ)²``.

Only ``self.lpm`` has trainable parameters; :meth:`frozen_parameters_with_grad` lets the trainer verify
that the base model never receives gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import feature_dim
from ..lpm import LearnablePruningModule
from ..modeling import PrunableLlavaForConditionalGeneration, PrunableLlavaNextForConditionalGeneration
from .losses import next_token_loss, pruning_loss
from .masked_attention import KEEP_KWARG, contiguous_positions, use_masked_attention


class LPMTrainingModel(nn.Module):
    def __init__(
        self,
        vlm: PrunableLlavaForConditionalGeneration,
        lpm: LearnablePruningModule,
        prune_loss_weight: float = 1.0,
        prune_target_ratio: float = 0.0,
    ):
        super().__init__()
        if not isinstance(vlm, (PrunableLlavaForConditionalGeneration, PrunableLlavaNextForConditionalGeneration)):
            raise TypeError(f"expected a Prunable LLaVA / LLaVA-NeXT model, got {type(vlm).__name__}")
        if vlm.pruner is not None:
            raise ValueError("train the LPM on an unpruned model (no pruning method attached)")
        vision_dim = feature_dim(vlm.config)
        if lpm.in_features != vision_dim:
            raise ValueError(f"the LPM takes {lpm.in_features}-d features but the vision tower gives {vision_dim}-d")
        self.check_objective(prune_loss_weight, prune_target_ratio)
        self.vlm = vlm
        self.lpm = lpm
        self.prune_loss_weight = prune_loss_weight
        self.prune_target_ratio = prune_target_ratio
        vlm.requires_grad_(False)
        vlm.zero_grad(set_to_none=True)
        lpm.requires_grad_(True)
        self.previous_attn_implementation = use_masked_attention(vlm)
        self.train()

    @staticmethod
    def check_objective(prune_loss_weight: float, prune_target_ratio: float) -> None:
        if prune_loss_weight < 0:
            raise ValueError(f"the pruning-loss weight λ_p must be >= 0, got {prune_loss_weight}")
        if not 0.0 <= prune_target_ratio <= 1.0:
            raise ValueError(f"the target keep ratio τ must be in [0, 1], got {prune_target_ratio}")

    @property
    def config(self):
        """The language model's config: what DeepSpeed's ``"auto"`` bucket sizes are derived from."""
        return self.vlm.config.text_config

    # -- modes and bookkeeping ------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.vlm.model.vision_tower.eval()  # frozen and under no_grad; Llama has no dropout to switch
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """Recompute the decoder layers in backward (what ``--gradient_checkpointing`` asks the Trainer for)."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        language_model = self.vlm.model.language_model
        language_model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        language_model.disable_input_require_grads()  # the keep mask carries the graph; inputs need no grad

    def frozen_parameters_with_grad(self) -> list[str]:
        """Names of base-model parameters that are trainable or hold a gradient (must be empty)."""
        return [n for n, p in self.vlm.named_parameters() if p.requires_grad or p.grad is not None]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept LPM-only state dicts (what checkpoints hold); the frozen base comes from its own checkpoint."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = [k for k in result.missing_keys if not k.startswith("vlm.")]
            if missing or result.unexpected_keys:
                raise RuntimeError(
                    f"LPM training state does not match: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
                )
        return result

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        labels: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> dict:
        inner = self.vlm.model
        next_family = getattr(self.vlm, "family", "llava") == "llava_next"
        image_mask = input_ids == self.vlm.config.image_token_id
        keep = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(input_ids)
            if pixel_values is not None and next_family:  # filled per image in _next_images
                pass
            elif pixel_values is not None:
                features = inner.vision_features(pixel_values)  # [B_img, N, Dv]
                tokens = inner.multi_modal_projector(features)
                inner._check_placeholders(image_mask, [tokens.shape[1]] * tokens.shape[0])
                embeds = embeds.masked_scatter(image_mask[..., None], tokens.to(embeds.dtype))
            elif bool(image_mask.any()):
                raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
        if pixel_values is not None and next_family:
            embeds, keep, per_image = self._next_images(embeds, keep, image_mask, pixel_values, image_sizes)
            prune = torch.stack([pruning_loss(k[None], self.prune_target_ratio) for k in per_image]).mean()
            kept_ratio = torch.cat(per_image).detach().mean()  # over the candidates (patch slots)
        elif pixel_values is not None:
            keep_vision = self.lpm.keep_mask(features)  # hard 0/1 forward, soft gradient (STE)
            keep = keep.masked_scatter(image_mask, keep_vision.to(keep.dtype))
            prune = pruning_loss(keep_vision, self.prune_target_ratio)
            kept_ratio = keep_vision.detach().mean()
        else:  # text-only batch: keep the LPM in the graph so every rank reduces the same gradients
            prune = sum(p.sum() for p in self.lpm.parameters()) * 0.0
            kept_ratio = None

        hidden = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=contiguous_positions(keep, attention_mask),
            use_cache=False,
            **{KEEP_KWARG: keep},
        ).last_hidden_state
        ntp = next_token_loss(hidden, labels, self.vlm.lm_head)
        loss = ntp + self.prune_loss_weight * prune
        return {
            "loss": loss,
            "ntp_loss": ntp.detach(),
            "prune_loss": prune.detach(),
            "kept_ratio": kept_ratio,
            "num_images": 0 if pixel_values is None else int(pixel_values.shape[0]),
        }

    def _next_images(self, embeds, keep, image_mask, pixel_values, image_sizes):
        """LLaVA-NeXT: each image's placeholders hold its unpruned packed tokens (``full_tokens()``, as HF packs them);
        the LPM scores each image's M_i candidate patch features. The keep mask is the LPM's at patch slots and 0 at
        ``image_newline`` slots: inference drops the newlines whenever stage 1 prunes (the adapter's documented policy),
        so training sees the same sequence. Returns the embeddings, the keep mask and each image's [M_i] candidate
        keep values (Eq. 7's kept ratio is over the candidates)."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT training needs image_sizes with pixel_values (the collator stacks them)")
        inner = self.vlm.model
        with torch.no_grad():
            groups = inner.adapter.image_groups(inner, pixel_values, image_sizes)
            tokens = [g.full_tokens()[0] for g in groups]
            inner._check_placeholders(image_mask, [len(t) for t in tokens])
            embeds = embeds.masked_scatter(image_mask[..., None], torch.cat(tokens).to(embeds.dtype))
        keep_images, candidates = [], []
        for g in groups:
            k = self.lpm.keep_mask(g.features)[0]  # [M_i] hard 0/1 forward, soft gradient (STE)
            slot_keep = torch.zeros(g.num_tokens, dtype=keep.dtype, device=keep.device)
            keep_images.append(slot_keep.index_put((g.slots[0],), k.to(keep.dtype)))
            candidates.append(k)
        keep = keep.masked_scatter(image_mask, torch.cat(keep_images))
        return embeds, keep, candidates

"""The module that LPM training optimises: a frozen VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL) plus the trainable LPM.

One forward (paper §3 and Appendix A.1), the same for every family through its adapter
(:mod:`learnpruner_ext.adapters`):

1. The vision tower runs under ``no_grad``; the adapter's image groups give each image's unpruned tokens (which
   fill its N_i placeholders) and its M_i candidate features ``X_v`` (the projector's input), which the LPM reads.
2. The sequence keeps all N_i vision tokens; ``M`` is 1 for text, the LPM's hard keep mask (STE) at the candidate
   slots and 0 at the placeholder slots that are not candidates (LLaVA-NeXT's newlines).
3. The language model runs with Eq. 6 attention (:mod:`.masked_attention`) at the positions inference gives the
   kept tokens (:meth:`LPMTrainingModel.positions`: contiguous ``cumsum(M_hard · attention_mask) − 1`` for
   LLaVA, the unpruned M-RoPE positions for Qwen2.5-VL), i.e. exactly as inference would on the physically
   pruned sequence.
4. ``loss = L_ntp + λ_p · mean_images (mean_n M_hard − τ)²``.

Only ``self.lpm`` has trainable parameters; :meth:`frozen_parameters_with_grad` lets the trainer verify
that the base model never receives gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import feature_dim
from ..config import POSITION_MODES, PruningConfig
from ..lpm import LearnablePruningModule
from ..modeling import PRUNABLE_MODELS
from .base import FrozenVLMTraining
from .losses import next_token_loss, pruning_loss
from .masked_attention import KEEP_KWARG, contiguous_positions, use_masked_attention


class LPMTrainingModel(FrozenVLMTraining):
    what = "LPM training"

    def __init__(
        self,
        vlm: nn.Module,  # one of learnpruner_ext.modeling.PRUNABLE_MODELS, unpruned
        lpm: LearnablePruningModule,
        prune_loss_weight: float = 1.0,
        prune_target_ratio: float = 0.0,
    ):
        super().__init__()
        if not isinstance(vlm, PRUNABLE_MODELS):
            raise TypeError(f"expected a Prunable LLaVA / LLaVA-NeXT / Qwen2.5-VL model, got {type(vlm).__name__}")
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
        # inference's default position mode, unless the family allows only others (M-RoPE: "original")
        modes = getattr(vlm.model.adapter, "position_modes", POSITION_MODES)
        default = PruningConfig.__dataclass_fields__["position_mode"].default
        self.position_mode = default if default in modes else modes[0]
        self.set_trainable(f"lpm.{name}" for name, _ in lpm.named_parameters())
        self.previous_attn_implementation = use_masked_attention(vlm)
        self.train()

    @staticmethod
    def check_objective(prune_loss_weight: float, prune_target_ratio: float) -> None:
        if prune_loss_weight < 0:
            raise ValueError(f"the pruning-loss weight λ_p must be >= 0, got {prune_loss_weight}")
        if not 0.0 <= prune_target_ratio <= 1.0:
            raise ValueError(f"the target keep ratio τ must be in [0, 1], got {prune_target_ratio}")

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        labels: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> dict:
        """``image_sizes`` (LLaVA-NeXT) or ``image_grid_thw`` (Qwen2.5-VL) is the family's image layout, as its
        processor returns it and the collator batches it; LLaVA-1.5 needs neither."""
        inner = self.vlm.model
        layout = image_grid_thw if image_grid_thw is not None else image_sizes
        image_mask = input_ids == self.vlm.config.image_token_id
        keep = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        with torch.no_grad():
            embeds = inner.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            embeds, keep, per_image = self._images(embeds, keep, image_mask, pixel_values, layout)
            prune = torch.stack([pruning_loss(k[None], self.prune_target_ratio) for k in per_image]).mean()
            kept_ratio = torch.cat(per_image).detach().mean()  # over the candidates
        elif bool(image_mask.any()):
            raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
        else:  # text-only batch: keep the LPM in the graph so every rank reduces the same gradients
            prune = sum(p.sum() for p in self.lpm.parameters()) * 0.0
            kept_ratio = None

        hidden = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=self.positions(keep, input_ids, attention_mask, image_grid_thw),
            use_cache=False,
            **{KEEP_KWARG: keep},
        ).last_hidden_state
        ntp = next_token_loss(hidden, labels, self.vlm.lm_head, keep)
        loss = ntp + self.prune_loss_weight * prune
        return {
            "loss": loss,
            "ntp_loss": ntp.detach(),
            "prune_loss": prune.detach(),
            "kept_ratio": kept_ratio,
            "num_images": len(per_image) if pixel_values is not None else 0,
        }

    def positions(self, keep, input_ids, attention_mask, image_grid_thw=None) -> torch.Tensor:
        """The positions inference gives the kept tokens, on the full sequence (SPEC §1):

        * ``contiguous`` (LLaVA, LLaVA-NeXT: the default mode): ``cumsum(M · attention_mask) − 1``, the numbering
          of the physically pruned sequence;
        * ``original`` (the only mode of an M-RoPE family, Qwen2.5-VL): the unpruned positions, M-RoPE ``[3, B, S]``
          from the model's own ``get_rope_index`` on the full prompt (all N_i placeholders, text after the image
          numbered from the unpruned image), which the boundary-0 cut gathers for the kept tokens.
        """
        if self.position_mode == "contiguous":
            return contiguous_positions(keep, attention_mask)
        inner = self.vlm.model
        if hasattr(inner, "get_rope_index"):  # M-RoPE
            token_type = (input_ids == self.vlm.config.image_token_id).int()  # 1 = image, as the processor marks
            return inner.get_rope_index(input_ids, token_type, image_grid_thw=image_grid_thw,
                                        attention_mask=attention_mask)[0]  # fmt: skip
        return contiguous_positions(torch.ones_like(keep), attention_mask)

    def _images(self, embeds, keep, image_mask, pixel_values, layout):
        """Each image's placeholders hold its unpruned tokens (``ImageGroup.full_tokens()``, as the family builds
        them); the LPM scores each image's M_i candidates (the adapter's ``features``: CLIP patches, NeXT's crop
        patches, Qwen's merger input). The keep mask is the LPM's at the candidates' slots and 0 at placeholder
        slots that are not candidates (LLaVA-NeXT's ``image_newline``): inference drops those whenever stage 1
        prunes (the adapter's documented policy), so training sees the sequence inference will run. Returns the
        embeddings, the keep mask and each image's [M_i] candidate keep values (Eq. 7's kept ratio is over them)."""
        inner = self.vlm.model
        with torch.no_grad():
            groups = inner.adapter.image_groups(inner, pixel_values, layout)
        tokens, keep_images, candidates = {}, {}, {}
        for g in groups:
            with torch.no_grad():
                full = g.full_tokens()  # [G, N_i, D]
            k = self.lpm.keep_mask(g.features)  # [G, M_i] hard 0/1 forward, soft gradient (STE)
            for j, image in enumerate(g.images):
                slot_keep = torch.zeros(g.num_tokens, dtype=keep.dtype, device=keep.device)
                keep_images[image] = slot_keep.index_put((g.slots[j],), k[j].to(keep.dtype))
                tokens[image], candidates[image] = full[j], k[j]
        order = range(len(tokens))
        inner._check_placeholders(image_mask, [len(tokens[i]) for i in order])
        with torch.no_grad():
            embeds = embeds.masked_scatter(image_mask[..., None], torch.cat([tokens[i] for i in order]).to(embeds.dtype))
        keep = keep.masked_scatter(image_mask, torch.cat([keep_images[i] for i in order]))
        return embeds, keep, [candidates[i] for i in order]

"""The module that ATP training optimises: a LLaVA-1.5 (frozen by default) plus the ATP modules of ATP-LLaVA
(Ye et al., CVPR 2025; paper: atp-llava.txt Sec. 3.3, SPEC §3).

One forward, on the full sequence (every vision token stays; no token is physically removed):

1. The vision tower and projector run under ``no_grad``; the image placeholders get the unpruned tokens.
2. The decoder layers run one by one with Eq. 6's masked-softmax attention (:mod:`.masked_attention`), each with its
   own keep mask ``M`` [B, S]: 1 for text, the **cumulative** soft mask for vision tokens. Before the layer ``k`` of
   each module, the module reads the scores of :func:`masked_atp_scores` (layer ``k - 1``'s attention under the
   mask in effect there), predicts its thresholds and gives the soft mask ``m_k`` (Eqs. 9-11); from layer ``k`` on
   ``M = M · m_k``, so a token pruned at one module stays pruned. Positions stay the original ones (the paper keeps
   the kept tokens' positions, as inference does).
3. ``L = L_ntp + λ_ATP · Σ_k mean_b(Σ_n M_k / N) · i_k + λ_target · |N̄ − N_target|`` (Eqs. 12-14) with ``N`` the
   model's vision tokens per image (576 on LLaVA-1.5), ``i_k`` the module's decoder layer, ``M_k`` the cumulative
   mask from layer ``i_k`` on, and ``N̄`` the batch's mean over images of the average vision-token count over all
   ``L`` decoder layers (layers before the first module count all ``N``), the toolkit's budget convention.

Where the masks are exactly 0/1 this forward equals inference's physical removal (``atp`` method): the masked
softmax renormalises over the kept keys, the scores average over the kept queries, and a pruned token's slot of
the thresholds' input is 0 (tests/training/test_atp_training.py).

Trainable: the ATP modules, and optionally the language model (``train_llm="full"``) or LoRA adapters already
injected into it (``train_llm="lora"``, see ``llava/train/train_atp.py``). The vision tower and projector stay
frozen in every mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ..atp import ATPModules, spatial_scores
from ..cut import right_pad
from ..modeling import PrunableLlavaForConditionalGeneration
from ..scoring import _heads, apply_rope
from .base import FrozenVLMTraining
from .losses import IGNORE_INDEX, next_token_loss
from .masked_attention import KEEP_KWARG, use_masked_attention

TRAIN_LLM_MODES = ("none", "full", "lora")


def _eq6_rows(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, key_valid: torch.Tensor,
              keep: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """Eq. 6 attention rows ``P·G / Σ P·G`` (``G_ij = M_j``, ``G_ii = 1``): q [B, H, Q, d] at sequence positions
    ``query_index`` [B, Q], k [B, H, S, d], key_valid [B, S] bool, keep [B, S] -> [B, H, Q, S] fp32."""
    seq = k.shape[-2]
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    keys = torch.arange(seq, device=q.device)
    allowed = (keys[None, None, :] <= query_index[..., None]) & key_valid[:, None, :]  # causal + padding
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    own = keys[None, None, :] == query_index[..., None]  # [B, Q, S] the diagonal, G_ii = 1
    g = torch.where(own, torch.ones_like(keep)[:, None, :], keep[:, None, :])[:, None]  # [B, 1, Q, S]
    weighted = probs * g
    return weighted / weighted.sum(-1, keepdim=True).clamp(min=torch.finfo(weighted.dtype).tiny)


def masked_atp_scores(layer: nn.Module, hidden_in: torch.Tensor, position_embeddings, keep: torch.Tensor,
                      vision_index: torch.Tensor, text_index: torch.Tensor, text_valid: torch.Tensor,
                      key_valid: torch.Tensor, self_score: str = "logits") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(S_self, S_cross) [B, N] fp32 of the scoring layer under the soft keep mask ``keep`` [B, S] (Eqs. 3-4).

    ``vision_index`` [B, N]: the vision tokens' positions; ``text_index`` / ``text_valid`` [B, Q]: the text query
    rows (the prompt after the image). With 0/1 masks these are exactly inference's scores on the pruned sequence
    (:mod:`learnpruner_ext.methods.atp`):

    * ``S_self`` "logits": ``Σ_m M_m q_m · k_n / Σ_m M_m`` × scaling over the vision queries ``m``, mean over heads
      (inference: the mean over the vision queries present); "attention": the Eq. 6 rows of the vision queries,
      averaged with weights ``M_m``;
    * ``S_cross``: the Eq. 6 rows of the text queries (the softmax renormalised over the kept keys), averaged.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    batch = normed.shape[0]
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    q = apply_rope(_heads(attn.q_proj(normed), attn.head_dim), cos, sin)  # [B, H, S, d]
    k = apply_rope(_heads(attn.k_proj(normed), attn.head_dim), cos, sin).repeat_interleave(attn.num_key_value_groups, 1)
    heads = q.shape[1]

    def rows(index):  # [B, Q] -> [B, H, Q, d]
        return q.gather(2, index[:, None, :, None].expand(-1, heads, -1, q.shape[-1]))

    def vision_cols(x):  # [B, S] -> [B, N]
        return x.gather(1, vision_index)

    w_vision = vision_cols(keep)  # [B, N] each vision query's presence
    if self_score == "logits":
        mean_q = (rows(vision_index).float() * w_vision[:, None, :, None]).sum(2, keepdim=True)
        mean_q = mean_q / w_vision.sum(-1).clamp(min=torch.finfo(mean_q.dtype).tiny)[:, None, None, None]
        k_vision = k.gather(2, vision_index[:, None, :, None].expand(-1, heads, -1, k.shape[-1])).float()
        s_self = ((mean_q @ k_vision.transpose(-1, -2))[:, :, 0] * attn.scaling).mean(1)
    else:
        probs = _eq6_rows(rows(vision_index), k, vision_index, key_valid, keep, attn.scaling).mean(1)  # [B, N, S]
        weights = w_vision / w_vision.sum(-1, keepdim=True).clamp(min=torch.finfo(w_vision.dtype).tiny)
        s_self = vision_cols((weights[..., None] * probs).sum(1))
    probs = _eq6_rows(rows(text_index), k, text_index, key_valid, keep, attn.scaling).mean(1)  # [B, Q, S]
    weights = text_valid.float() / text_valid.sum(-1, keepdim=True).clamp(min=1)
    s_cross = vision_cols((weights[..., None] * probs).sum(1))
    return s_self, s_cross


def text_query_rows(vision_index: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The rows S_cross averages: the prompt after the image, i.e. the valid positions after the last vision token
    and before the first supervised one (inference reads the whole text after the image, which is the prompt;
    training sequences also hold the answer, which inference has not seen when it prunes) -> ([B, Q], [B, Q])."""
    batch, seq = attention_mask.shape
    positions = torch.arange(seq, device=attention_mask.device).expand(batch, -1)
    after = positions > vision_index[:, -1:]
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        first = torch.where(supervised, positions, seq).amin(-1, keepdim=True)
        after = after & (positions < first)
    rows = after & attention_mask.bool()
    if not bool(rows.any(-1).all()):
        raise ValueError("ATP needs prompt text after the image in every sample; put <image> before the question")
    index = right_pad([r.nonzero()[:, 0] for r in rows], 0)
    valid = right_pad([torch.ones(int(r.sum()), dtype=torch.bool, device=rows.device) for r in rows], False)
    return index, valid


class ATPTrainingModel(FrozenVLMTraining):
    what = "ATP training"

    def __init__(self, vlm: nn.Module, atp: ATPModules, lambda_atp: float = 0.05, lambda_target: float = 0.2,
                 target_tokens: float | None = None, train_llm: str = "none"):  # fmt: skip
        super().__init__()
        if not isinstance(vlm, PrunableLlavaForConditionalGeneration) or vlm.family != "llava":
            raise TypeError(f"ATP trains on a LLaVA-1.5 model (one raster grid per image), got "
                            f"{getattr(vlm, 'family', type(vlm).__name__)}")  # fmt: skip
        if vlm.pruner is not None:
            raise ValueError("train ATP modules on an unpruned model (no pruning method attached)")
        num_layers = vlm.config.text_config.num_hidden_layers
        if atp.num_tokens != vlm.num_vision_tokens:
            raise ValueError(f"the ATP modules take {atp.num_tokens} vision tokens per image; this model gives "
                             f"{vlm.num_vision_tokens}")  # fmt: skip
        if atp.layers[-1] >= num_layers:
            raise ValueError(f"ATP module layers {list(atp.layers)} must be below the model's {num_layers} layers")
        self.check_objective(lambda_atp, lambda_target, target_tokens, atp.num_tokens, train_llm)
        side = math.isqrt(atp.num_tokens)
        if side * side != atp.num_tokens:
            raise ValueError(f"ATP samples a square grid; {atp.num_tokens} vision tokens per image are not one")
        self.vlm, self.atp, self.train_llm = vlm, atp, train_llm
        self.lambda_atp, self.lambda_target, self.target_tokens = float(lambda_atp), float(lambda_target), target_tokens
        self.num_layers = num_layers
        self.register_buffer("spatial", spatial_scores(side, side, atp.strides, atp.lambda_sample), persistent=False)
        trainable = [f"atp.{n}" for n, _ in atp.named_parameters()]
        llm = [f"vlm.model.language_model.{n}" for n, _ in vlm.model.language_model.named_parameters()]
        if train_llm == "full":
            trainable += llm
        elif train_llm == "lora":
            lora = [n for n in llm if "lora_" in n]
            if not lora:
                raise ValueError("train_llm='lora' needs LoRA adapters injected into the language model first")
            trainable += lora
        self.set_trainable(trainable)
        self.previous_attn_implementation = use_masked_attention(vlm)
        self.train()

    @staticmethod
    def check_objective(lambda_atp, lambda_target, target_tokens, num_tokens: int, train_llm: str = "none") -> None:
        if lambda_atp < 0 or lambda_target < 0:
            raise ValueError(f"λ_ATP and λ_target must be >= 0, got {lambda_atp} and {lambda_target}")
        if target_tokens is None and lambda_target > 0:
            raise ValueError("λ_target > 0 needs a target average N_target (--target_tokens)")
        if target_tokens is not None and not 0 < target_tokens <= num_tokens:
            raise ValueError(f"the target average N_target must be in (0, {num_tokens}], got {target_tokens}")
        if train_llm not in TRAIN_LLM_MODES:
            raise ValueError(f"train_llm must be one of {list(TRAIN_LLM_MODES)}, got {train_llm!r}")

    # -- forward ----------------------------------------------------------------------------------
    def _embeddings(self, input_ids, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeddings [B, S, D] with every image's unpruned tokens, vision positions [B, N] (-1: no image))."""
        inner = self.vlm.model
        image_mask = input_ids == self.vlm.config.image_token_id
        counts = image_mask.sum(-1)
        n = self.atp.num_tokens
        if bool(((counts != 0) & (counts != n)).any()):
            raise ValueError(f"ATP training takes one image ({n} placeholders) or none per sample; got placeholder "
                             f"counts {counts.tolist()}")  # fmt: skip
        embed = inner.get_input_embeddings()
        with torch.set_grad_enabled(torch.is_grad_enabled() and embed.weight.requires_grad):
            embeds = embed(input_ids)
        if pixel_values is not None:
            with torch.no_grad():
                groups = inner.adapter.image_groups(inner, pixel_values, None)
                tokens = torch.cat([g.full_tokens().flatten(0, 1) for g in groups])
            embeds = embeds.masked_scatter(image_mask[..., None], tokens.to(embeds.dtype))
        elif bool(image_mask.any()):
            raise ValueError("input_ids hold <image> placeholders but no pixel_values were given")
        vision_index = torch.full((input_ids.shape[0], n), -1, dtype=torch.long, device=input_ids.device)
        has_image = counts == n
        if bool(has_image.any()):
            vision_index[has_image] = image_mask[has_image].nonzero()[:, 1].view(-1, n)
        return embeds, vision_index

    def decode(self, input_ids, attention_mask, labels=None, pixel_values=None) -> dict:
        """The masked forward -> ``hidden`` [B, S, D] (normed), ``masks`` {layer k: [B_img, N] cumulative soft
        mask from layer k on}, ``image_rows`` [B_img] (the samples with an image)."""
        lm = self.vlm.model.language_model
        embeds, vision_index = self._embeddings(input_ids, pixel_values)
        batch, seq = input_ids.shape
        image_rows = (vision_index[:, 0] >= 0).nonzero()[:, 0]
        positions = torch.arange(seq, device=embeds.device)[None].expand(batch, -1)  # original positions
        causal = create_causal_mask(config=lm.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                    past_key_values=None, position_ids=positions)  # fmt: skip
        position_embeddings = lm.rotary_emb(embeds, positions)
        keep = torch.ones(batch, seq, dtype=torch.float32, device=embeds.device)
        hidden, previous, masks = embeds, None, {}
        if len(image_rows):
            vis = vision_index[image_rows]
            text_index, text_valid = text_query_rows(vis, attention_mask[image_rows],
                                                     None if labels is None else labels[image_rows])  # fmt: skip
            sub = lambda t: t[image_rows] if t.shape[0] == batch else t  # noqa: E731
            slots = torch.arange(self.atp.num_tokens, device=embeds.device).expand(len(image_rows), -1)
        for idx, layer in enumerate(lm.layers[: self.num_layers]):
            if idx in self.atp.layers and len(image_rows):
                present = keep[image_rows].gather(1, vis)  # [B_img, N] the mask in effect at layer idx - 1
                s_self, s_cross = masked_atp_scores(
                    lm.layers[idx - 1], previous[image_rows], tuple(sub(t) for t in position_embeddings),
                    keep[image_rows], vis, text_index, text_valid, attention_mask[image_rows].bool(),
                    self.atp.self_score,
                )  # fmt: skip
                m = self.atp[idx].soft_mask(s_self, s_cross, self.spatial[slots], slots, self.atp.temperature,
                                            weights=present)  # fmt: skip
                masks[idx] = present * m
                keep = keep.index_put((image_rows[:, None].expand_as(vis), vis), masks[idx])
            previous = hidden
            hidden = layer(hidden, attention_mask=causal, position_embeddings=position_embeddings,
                           position_ids=positions, past_key_values=None, use_cache=False, **{KEEP_KWARG: keep})  # fmt: skip
        return {"hidden": lm.norm(hidden), "masks": masks, "image_rows": image_rows}

    def average_tokens(self, masks: dict[int, torch.Tensor]) -> torch.Tensor:
        """[B_img] each image's average vision-token count over the decoder layers (soft counts)."""
        layers = self.atp.layers
        n = self.atp.num_tokens
        total = layers[0] * n
        for k, end in zip(layers, layers[1:] + (self.num_layers,)):
            total = total + (end - k) * masks[k].sum(-1)
        return total / self.num_layers

    def budget_losses(self, masks: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_ATP (Eq. 12), L_target (Eq. 13), N̄) over the batch's images."""
        n = self.atp.num_tokens
        atp_loss = sum((masks[k].sum(-1) / n).mean() * k for k in self.atp.layers)
        mean_tokens = self.average_tokens(masks).mean()
        target = (mean_tokens - self.target_tokens).abs() if self.target_tokens is not None else mean_tokens * 0.0
        return atp_loss, target, mean_tokens

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, image_sizes=None) -> dict:
        out = self.decode(input_ids, attention_mask, labels, pixel_values)
        ntp = next_token_loss(out["hidden"], labels, self.vlm.lm_head)
        if out["masks"]:
            atp_loss, target_loss, mean_tokens = self.budget_losses(out["masks"])
        else:  # text-only batch: keep the modules in the graph so every rank reduces the same gradients
            atp_loss = target_loss = sum(p.sum() for p in self.atp.parameters()) * 0.0
            mean_tokens = None
        loss = ntp + self.lambda_atp * atp_loss + self.lambda_target * target_loss
        return {
            "loss": loss,
            "ntp_loss": ntp.detach(),
            "atp_loss": atp_loss.detach(),
            "target_loss": target_loss.detach(),
            "mean_tokens": None if mean_tokens is None else mean_tokens.detach(),
            "layer_tokens": {k: m.detach().sum(-1).mean() for k, m in out["masks"].items()},
            "num_images": len(out["image_rows"]),
        }


__all__ = ["ATPTrainingModel", "TRAIN_LLM_MODES", "masked_atp_scores", "text_query_rows"]

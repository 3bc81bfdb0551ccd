"""Exact attention rows without switching a model to eager attention.

Pruning needs a few rows of an attention matrix ([CLS] -> patches, text -> vision). Asking the model
for ``output_attentions`` would force eager attention everywhere and materialise ``[B, H, S, S]`` for
every layer. Instead we recompute only the needed query rows from the layer's own input, with the
layer's own projections, RoPE, causal and padding masks, and normalise over *all* keys, exactly as the
real softmax does.
"""

from __future__ import annotations

import torch
from torch import nn


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half convention of transformers' decoders: x [B, H, S, d], cos/sin
    [B, S, d] as the model's rotary module returns them (any family whose rotary module already folds its
    position layout into cos/sin, e.g. M-RoPE sections, uses the same formula)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, S, H*d] -> [B, H, S, d]"""
    return x.view(*x.shape[:2], -1, head_dim).transpose(1, 2)


def encoder_attention_rows(layer: nn.Module, hidden_in: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities of a (non-causal) ViT encoder layer, e.g. CLIP / SigLIP.

    Args:
        layer: the encoder layer (has ``layer_norm1`` and ``self_attn`` with q/k projections).
        hidden_in: [B, T, D] the layer's input hidden states.
        query_index: [Q] query rows to compute, or None for all rows.
    Returns:
        [B, H, Q, T] fp32 probabilities.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(hidden_in)
    queries = normed if query_index is None else normed[:, query_index]
    q = _heads(attn.q_proj(queries), attn.head_dim).float()
    k = _heads(attn.k_proj(normed), attn.head_dim).float()
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)


def cls_attention(layer: nn.Module, hidden_in: torch.Tensor) -> torch.Tensor:
    """[CLS] -> patch attention, head-averaged: [B, T] input with CLS at 0 -> [B, T-1]."""
    probs = encoder_attention_rows(layer, hidden_in, torch.tensor([0], device=hidden_in.device))
    return probs[:, :, 0, 1:].mean(1)


def mean_received_attention(layer: nn.Module, hidden_in: torch.Tensor) -> torch.Tensor:
    """For encoders with no [CLS] (SigLIP): attention each token receives, averaged over queries and heads."""
    return encoder_attention_rows(layer, hidden_in, None).mean(dim=(1, 2))


def encoder_keys(layer: nn.Module, hidden_in: torch.Tensor) -> torch.Tensor:
    """Key states of a ViT encoder layer averaged over heads: [B, T, D] input -> [B, T, d] (VisionZip's metric)."""
    attn = layer.self_attn
    k = _heads(attn.k_proj(layer.layer_norm1(hidden_in)), attn.head_dim)  # [B, H, T, d]
    return k.float().mean(1)


def decoder_attention_rows(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """Exact causal attention probabilities of selected rows of a Llama-style decoder layer.

    Args:
        layer: decoder layer with ``input_layernorm`` and ``self_attn`` (q/k projections, RoPE, GQA).
        hidden_in: [B, S, D] the layer's input.
        position_embeddings: RoPE ``(cos, sin)``, each [B or 1, S, d], as the layer receives them.
        query_index: [B, Q] sequence index of each query row (rows may repeat for padding).
        key_valid: [B, S] bool, False for padding keys; None if there is no padding.
    Returns:
        [B, H, Q, S] fp32 probabilities, normalised over every key the real attention sees.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    batch, seq = normed.shape[:2]
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    rows = query_index[..., None]
    q_in = normed.gather(1, rows.expand(-1, -1, normed.shape[-1]))
    q = _heads(attn.q_proj(q_in), attn.head_dim)
    k = _heads(attn.k_proj(normed), attn.head_dim)
    q = apply_rope(q, cos.gather(1, rows.expand(-1, -1, cos.shape[-1])), sin.gather(1, rows.expand(-1, -1, sin.shape[-1])))
    k = apply_rope(k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [B, H, Q, S]
    allowed = torch.arange(seq, device=normed.device)[None, None, :] <= query_index[..., None]  # causal
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], torch.finfo(logits.dtype).min)
    return logits.softmax(-1)


def text_to_vision_attention(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    vision_index: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """LearnPruner Eq. 5: attention each vision token receives from the query rows, averaged over
    valid rows and all heads. ``vision_index`` [B, Nv] -> scores [B, Nv]."""
    probs = decoder_attention_rows(layer, hidden_in, position_embeddings, query_index, key_valid)
    probs = probs.mean(1)  # heads -> [B, Q, S]
    weights = query_valid.float() / query_valid.sum(-1, keepdim=True).clamp(min=1)
    received = (weights[..., None] * probs).sum(1)  # [B, S]
    return received.gather(1, vision_index)


def vision_self_logits(
    layer: nn.Module,
    hidden_in: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    vision_index: torch.Tensor,
) -> torch.Tensor:
    """ATP-LLaVA Eq. 3: the attention logits ``q_m . k_n * scaling`` (before the causal mask is added) that each
    vision token ``n`` receives from the vision queries ``m``, averaged over those queries and over the heads.

    The mean over queries is taken on ``q`` first (``mean_m(q_m) . k_n``: the logits are linear in ``q``), so the
    cost is ``O(Nv d)`` per head instead of ``O(Nv^2 d)``; exact up to rounding. ``vision_index`` [B, Nv] (no
    padding slots) -> [B, Nv] fp32."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    batch = normed.shape[0]
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
    rows = vision_index[..., None]
    x = normed.gather(1, rows.expand(-1, -1, normed.shape[-1]))
    cos, sin = cos.gather(1, rows.expand(-1, -1, cos.shape[-1])), sin.gather(1, rows.expand(-1, -1, sin.shape[-1]))
    q = apply_rope(_heads(attn.q_proj(x), attn.head_dim), cos, sin).float()  # [B, H, Nv, d]
    k = apply_rope(_heads(attn.k_proj(x), attn.head_dim), cos, sin).float()  # [B, Hkv, Nv, d]
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    mean_q = q.mean(2, keepdim=True)  # [B, H, 1, d]
    return ((mean_q @ k.transpose(-1, -2))[:, :, 0] * attn.scaling).mean(1)  # [B, Nv]


def key_states(layer: nn.Module, hidden_in: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Post-RoPE key states of a decoder layer, [B, Hkv, S, d] (DART's K-norm signal)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden_in)
    k = _heads(attn.k_proj(normed), attn.head_dim)
    cos, sin = position_embeddings
    return apply_rope(k, cos.expand(k.shape[0], -1, -1), sin.expand(k.shape[0], -1, -1))


def packed_vit_qk(block: nn.Module, hidden_in: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Post-RoPE queries and keys of a packed-sequence ViT block (Qwen2.5-VL: ``norm1``, fused ``attn.qkv``, 2D
    vision RoPE): hidden_in [P, Dv], cos/sin [P, d] as the block receives them -> q, k [H, P, d] (fp32)."""
    attn = block.attn
    qkv = attn.qkv(block.norm1(hidden_in)).view(hidden_in.shape[0], 3, attn.num_heads, -1)
    q, k, _ = (x.transpose(0, 1).float() for x in qkv.unbind(1))  # [H, P, d]
    cos, sin = cos[None].float(), sin[None].float()
    return apply_rope(q[None], cos, sin)[0], apply_rope(k[None], cos, sin)[0]


def packed_received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, cu_seqlens: torch.Tensor,
                              chunk: int = 1024) -> torch.Tensor:  # fmt: skip
    """Attention each token receives within its own segment (one image: ``cu_seqlens`` boundaries), averaged over
    the segment's queries and the heads: q, k [H, P, d] -> [P]. Queries are processed in chunks (exact)."""
    out = torch.empty(q.shape[1], device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys, total = k[:, start:end], torch.zeros(end - start, device=q.device)
        for s in range(start, end, chunk):
            probs = (q[:, s : min(s + chunk, end)] @ keys.transpose(-1, -2) * scale).softmax(-1)  # [H, c, P_i]
            total += probs.sum(dim=(0, 1))
        out[start:end] = total / (q.shape[0] * (end - start))
    return out

"""Training-time attention masking of LearnPruner (paper Eq. 6, after DynamicViT).

With ``P`` the ordinary causal+padding softmax and ``G_ij = 1 if i == j else M_j``::

    Â = P·G / Σ_k (P·G)_k        (row-wise)

where ``M`` is 1 for every non-vision token and the LPM's hard 0/1 keep decision (with straight-through
gradients) for vision tokens. A kept query then attends exactly to the kept keys, so with contiguous
positions (``position_ids = cumsum(keep) - 1``) the masked forward equals a forward with the pruned tokens
physically removed, while ``∂Â/∂M`` carries gradients to the LPM.

The function is registered with transformers' ``AttentionInterface`` as :data:`ATTN_NAME` and selected
for the text model only (:func:`use_masked_attention`); nothing is monkey-patched. The keep mask reaches
it as the ``lpm_keep`` keyword argument of the language model's forward (``[B, S]``, float).

Memory: :class:`MaskedSoftmaxAttention` saves only q, k, v, M and the row normalisers for backward and
recomputes the ``[B, H, S, S]`` weights there, so a layer keeps O(B·H·S·d) activations instead of
several ``[B, H, S, S]`` fp32 tensors. The softmax runs in fp32 whatever the input dtype. Attention
dropout is not applied (it would break the exact equivalence; Llama uses 0.0).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "lpm_masked"
KEEP_KWARG = "lpm_keep"
# exp() of a masked key's logit is taken relative to the largest *kept* logit of its row; a masked key
# far above every kept key (e^50 times) would overflow fp32, so its relative weight is capped there. The
# forward never uses those weights (G = 0); only such a key's gradient saturates.
_MAX_LOG_RATIO = 50.0


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _allowed(mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The causal+padding mask as booleans [B or 1, 1 or H, Sq, Sk] (True = may attend)."""
    if mask is None:  # pure causal (cache-free prefill without padding)
        offset = kv_len - q_len
        q = torch.arange(q_len, device=device)[:, None] + offset
        return (torch.arange(kv_len, device=device)[None] <= q)[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2  # additive float mask (0 allowed, very negative not)


def _row_weights(q, k, allowed, keep, scale):
    """E = exp(scores − ref) in fp32 (0 where not allowed), ref = the largest score among a row's G > 0 keys.

    Returns ``(E, keep_row, offset)``; :func:`_weights` turns E into ``E·G``. The shift cancels in Eq. 6
    and keeps every kept key in range; only keys with G = 0 can exceed it, their E is capped at
    e^_MAX_LOG_RATIO (it only enters their gradient, as ``∂Â/∂M_j``).
    """
    offset = k.shape[-2] - q.shape[-2]
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64, for gradcheck)
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).to(compute)
    scores.masked_fill_(~allowed, float("-inf"))
    keep_row = keep[:, None, None, :].to(compute)  # [B, 1, 1, Sk]
    ref = torch.maximum(scores.masked_fill(keep_row <= 0, float("-inf")).amax(-1), scores.diagonal(offset, -2, -1))
    ref = torch.where(torch.isfinite(ref), ref, torch.zeros_like(ref))[..., None]
    exp = scores.sub_(ref).clamp_(max=_MAX_LOG_RATIO).exp_()  # -inf -> 0
    return exp, keep_row, offset


def _weights(exp, keep_row, keep, offset):
    w = exp * keep_row
    q_len = exp.shape[-2]
    keep_diag = keep[:, offset : offset + q_len].to(exp.dtype)[:, None, :]  # [B, 1, Sq]
    w.diagonal(offset, -2, -1).add_(exp.diagonal(offset, -2, -1) * (1.0 - keep_diag))
    return w


# Upper bound on one fp32 [B, h, Sq, Sk] block: heads are processed in groups below it, which bounds the
# transient memory of long sequences (e.g. 16 x 32 heads x 2048^2 would otherwise be 8.6 GB per tensor).
CHUNK_ELEMENTS = 1 << 28


def _head_chunks(shape) -> list[slice]:
    batch, heads, q_len, kv_len = shape[0], shape[1], shape[2], shape[-2]
    per_head = max(batch * q_len * kv_len, 1)
    step = max(1, min(heads, CHUNK_ELEMENTS // per_head))
    return [slice(h, min(h + step, heads)) for h in range(0, heads, step)]


class MaskedSoftmaxAttention(torch.autograd.Function):
    """out = Â·V with Â from Eq. 6; q [B,H,Sq,d], k/v [B,H,Sk,d], allowed bool [B,1|H,Sq,Sk], keep [B,Sk].

    Saves q, k, v, keep and the row normalisers; backward recomputes the weights (head group by head group).
    """

    @staticmethod
    def forward(ctx, q, k, v, allowed, keep, scale):
        outs, denoms = [], []
        for h in _head_chunks((q.shape[0], q.shape[1], q.shape[2], k.shape[2])):
            mask = allowed if allowed.shape[1] == 1 else allowed[:, h]
            exp, keep_row, offset = _row_weights(q[:, h], k[:, h], mask, keep, scale)
            w = _weights(exp, keep_row, keep, offset)
            del exp
            denom = w.sum(-1, keepdim=True)
            denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # fully masked rows (w = 0) -> output 0
            outs.append(torch.matmul((w / denom).to(v.dtype), v[:, h]))
            denoms.append(denom)
        ctx.save_for_backward(q, k, v, allowed, keep, torch.cat(denoms, 1))
        ctx.scale = scale
        return torch.cat(outs, 1)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, allowed, keep, denoms = ctx.saved_tensors
        scale, dtype = ctx.scale, v.dtype
        need_q, need_k, need_v, need_keep = (ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        grad_q = torch.empty_like(q) if need_q else None
        grad_k = torch.empty_like(k) if need_k else None
        grad_v = torch.empty_like(v) if need_v else None
        grad_keep = torch.zeros(keep.shape, dtype=torch.promote_types(q.dtype, torch.float32), device=keep.device)
        for h in _head_chunks((q.shape[0], q.shape[1], q.shape[2], k.shape[2])):
            mask = allowed if allowed.shape[1] == 1 else allowed[:, h]
            exp, keep_row, offset = _row_weights(q[:, h], k[:, h], mask, keep, scale)
            denom, g_out = denoms[:, h], grad_out[:, h].to(dtype)
            probs = _weights(exp, keep_row, keep, offset) / denom
            if need_v:
                grad_v[:, h] = torch.matmul(probs.to(dtype).transpose(-1, -2), g_out)
            d_probs = torch.matmul(g_out, v[:, h].transpose(-1, -2)).to(exp.dtype)
            d_w = (d_probs - (d_probs * probs).sum(-1, keepdim=True)) / denom  # through the row normalisation
            del probs, d_probs
            d_g = d_w * exp  # dL/dG_ij
            del d_w
            if need_keep:
                q_len = exp.shape[-2]
                grad_keep += d_g.sum(dim=(1, 2))  # G_ij = M_j off the diagonal ...
                grad_keep[:, offset : offset + q_len] -= d_g.diagonal(offset, -2, -1).sum(1)  # ... G_ii = 1
            if need_q or need_k:
                # dS = dW·G·E; capped entries have G = 0, so the cap never reaches q and k
                d_scores = _weights(d_g, keep_row, keep, offset).mul_(scale).to(dtype)
                if need_q:
                    grad_q[:, h] = torch.matmul(d_scores, k[:, h])
                if need_k:
                    grad_k[:, h] = torch.matmul(d_scores.transpose(-1, -2), q[:, h])
        return grad_q, grad_k, grad_v, None, grad_keep.to(keep.dtype) if need_keep else None, None


def masked_attention_reference(q, k, v, allowed, keep, scale):
    """Plain autograd version of Eq. 6 (for tests): Â = P·G / Σ(P·G) with P the masked softmax."""
    scores = (q @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    p = scores.masked_fill(~allowed, -1e9).softmax(-1)  # finite fill: fully masked rows give 0, not NaN
    p = p * allowed.any(-1, keepdim=True)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    eye = torch.zeros(q_len, kv_len, dtype=torch.bool, device=q.device)
    eye.diagonal(kv_len - q_len).fill_(True)
    g = torch.where(eye, torch.ones_like(p[:1, :1]), keep[:, None, None, :].to(p.dtype))
    pg = p * g
    denom = pg.sum(-1, keepdim=True)
    return (pg / torch.where(denom > 0, denom, torch.ones_like(denom))).to(v.dtype) @ v


def lpm_masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: Eq. 6 with the keep mask from ``kwargs['lpm_keep']`` ([B, Sk]).

    Without a keep mask it is ordinary causal attention (G = 1).
    """
    keep = kwargs.get(KEEP_KWARG)
    groups = getattr(module, "num_key_value_groups", query.shape[1] // key.shape[1])
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if keep is None:
        keep = torch.ones(query.shape[0], kv_len, device=query.device)
    if keep.shape[-1] != kv_len:
        raise ValueError(
            f"{KEEP_KWARG} covers {keep.shape[-1]} tokens but attention sees {kv_len} keys; the masked "
            "attention is for cache-free training forwards over the full sequence"
        )
    allowed = _allowed(attention_mask, q_len, kv_len, query.device)
    allowed = allowed[..., :kv_len].expand(query.shape[0], -1, -1, -1)
    # One dtype for q, k, v (under autocast RoPE leaves q/k in fp32 next to a bf16 v), and autocast off
    # inside, so that backward recomputes exactly what forward computed.
    device = query.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else value.dtype
    with torch.autocast(device, enabled=False):
        out = MaskedSoftmaxAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), allowed, keep, scaling)
    return out.transpose(1, 2).contiguous(), None


def _lpm_mask(*args, **kwargs):
    """Mask builder for :data:`ATTN_NAME`: sdpa's boolean mask, never skipped to ``None``."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_NAME, lpm_masked_attention)
AttentionMaskInterface.register(ATTN_NAME, _lpm_mask)


def use_masked_attention(model) -> str:
    """Select Eq. 6 attention for the text model of a LLaVA model; returns the previous implementation."""
    previous = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": ATTN_NAME})
    return previous


def restore_attention(model, previous: str) -> None:
    model.set_attn_implementation({"text_config": previous})


@contextmanager
def with_masked_attention(model):
    """``with with_masked_attention(model): ...`` selects Eq. 6 attention for the text model, then restores it."""
    previous = use_masked_attention(model)
    try:
        yield model
    finally:
        restore_attention(model, previous)


def contiguous_positions(keep: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``cumsum(keep) - 1``: the positions the kept tokens get once the others are removed (SPEC §1).

    Dropped and padding tokens repeat the previous kept position; they are never attended to by kept tokens.
    """
    keep = keep.detach()
    if attention_mask is not None:
        keep = keep * attention_mask.to(keep.dtype)
    return (keep.round().long().cumsum(-1) - 1).clamp(min=0)

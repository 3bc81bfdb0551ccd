"""Pure, batched token-selection functions. Inputs are ``[B, N, ...]`` tensors; outputs are index
tensors ``[B, K]`` into the N tokens, sorted ascending so that kept tokens keep their order."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, N] -> indices [B, k] of the k highest scores, in original (ascending) order."""
    if not 0 <= k <= scores.shape[-1]:
        raise ValueError(f"cannot keep {k} of {scores.shape[-1]} tokens")
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """features [B, N, D] -> pairwise cosine similarity [B, N, N] in fp32."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def max_min_diversity(features: torch.Tensor, selected: torch.Tensor, num_add: int) -> torch.Tensor:
    """Greedy max-min diversity: repeatedly add the unselected token whose maximum cosine similarity
    to the already-selected set is smallest.

    Args:
        features: [B, N, D] token features.
        selected: [B, N] bool, tokens already chosen (may be all False: then the first pick is the token
            whose maximum similarity to every other token is smallest, i.e. the most isolated one).
        num_add: tokens to add per sample.
    Returns:
        [B, num_add] indices of the added tokens, in the order they were picked.

    Each step is one vectorised update over all candidates and the whole batch; only the ``num_add``
    picks are sequential, as the greedy definition requires.
    """
    batch, n, _ = features.shape
    free = n - selected.sum(-1)
    if num_add > int(free.min()):
        raise ValueError(f"cannot add {num_add} diversity tokens: only {int(free.min())} unselected tokens remain")
    sim = cosine_similarity_matrix(features)  # [B, N, N]
    selected = selected.clone()
    neg_inf = torch.finfo(sim.dtype).min
    # max similarity of every token to the selected set; an empty set starts from "max over all others"
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    any_selected = selected.any(-1, keepdim=True)  # [B, 1]
    to_selected = sim.masked_fill(~selected[:, None, :], neg_inf).amax(-1)
    to_others = sim.masked_fill(eye, neg_inf).amax(-1)
    max_sim = torch.where(any_selected, to_selected, to_others)  # [B, N]
    picks = torch.empty(batch, num_add, dtype=torch.long, device=features.device)
    rows = torch.arange(batch, device=features.device)
    for step in range(num_add):
        pick = max_sim.masked_fill(selected, float("inf")).argmin(-1)  # [B]
        picks[:, step] = pick
        selected[rows, pick] = True
        max_sim = torch.maximum(torch.where(any_selected, max_sim, torch.full_like(max_sim, neg_inf)), sim[rows, pick])
        any_selected = torch.ones_like(any_selected)
    return picks


def importance_plus_diversity(
    scores: torch.Tensor, features: torch.Tensor, keep: int, num_diverse: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """LearnPruner stage 1: top ``keep - num_diverse`` by score, then ``num_diverse`` max-min tokens.

    Returns (indices [B, keep] ascending, is_diverse [B, keep] bool aligned with the indices).
    """
    batch, n = scores.shape
    important = topk_indices(scores, keep - num_diverse)
    selected = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
    selected.scatter_(1, important, True)
    diverse = max_min_diversity(features, selected, num_diverse) if num_diverse else important[:, :0]
    is_diverse = torch.zeros_like(selected)
    is_diverse.scatter_(1, diverse, True)
    index = torch.cat([important, diverse], dim=1).sort(dim=1).values
    return index, is_diverse.gather(1, index)


def remove_duplicates(features: torch.Tensor, keep: int, step: int = 8) -> torch.Tensor:
    """VisPruner's similarity-based duplication removal (Algorithm 1), batched.

    Repeatedly split the remaining tokens into two alternating sets ``a = remaining[0::2]`` and
    ``b = remaining[1::2]``, score each token of ``a`` by its maximum cosine similarity to ``b`` (how
    duplicated it is), and drop the ``r = min(step, remaining - keep)`` most duplicated tokens of ``a``;
    the survivors of ``a`` (most duplicated first among them, as the reference code orders them) followed
    by ``b`` form the new remaining list. Stops when ``keep`` tokens are left.

    Args:
        features: [B, R, C] token features, in the order the caller wants them processed (VisPruner passes
            the non-important tokens sorted by descending [CLS] attention).
        keep: tokens to keep per sample (VisPruner's ``n = R_budget * (1 - r)``).
        step: tokens removed per iteration (the algorithm's ``r``; 8 in the reference implementation).
    Returns:
        [B, keep] positions into the R tokens, in the algorithm's final order (not sorted).
    """
    batch, n, dim = features.shape
    if not 0 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} tokens")
    if step < 1:
        raise ValueError(f"removal step must be >= 1, got {step}")
    remaining = torch.arange(n, device=features.device).expand(batch, -1)
    if keep == 0:
        return remaining[:, :0]
    unit = F.normalize(features.float(), dim=-1)
    while True:
        count = remaining.shape[1]
        evens = (count + 1) // 2
        r = min(step, count - keep, evens)  # never more than set a holds (the reference code assumes this)
        if r <= 0:
            break
        tokens = unit.gather(1, remaining[..., None].expand(-1, -1, dim))
        a, b = tokens[:, ::2], tokens[:, 1::2]  # b is non-empty: count >= keep + 1 >= 2
        scores = (a @ b.transpose(1, 2)).amax(-1)  # [B, evens]: each a-token's closest b-token
        distinct = scores.argsort(dim=-1, descending=True, stable=True)[:, r:]
        remaining = torch.cat([remaining[:, ::2].gather(1, distinct), remaining[:, 1::2]], dim=1)
    return remaining

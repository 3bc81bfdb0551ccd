"""LearnPruner's training objective (paper Eq. 7-8): ``L = L_ntp + λ_p · (mean(M_hard) − τ)²``."""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # label of unsupervised positions: torch's cross_entropy default and LLaVA's IGNORE_INDEX


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module,
                    keep: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy of the supervised next tokens; the LM head runs only on those positions.

    hidden [B, S, D] (last decoder layer, normed), labels [B, S] with ``IGNORE_INDEX`` where unsupervised.
    With ``keep`` [B, S] (the Eq. 6 mask, 1 = kept) token t is predicted from the last kept token before it,
    as in the physically pruned sequence (a token right after dropped vision tokens is predicted from the last
    kept one, not from a dropped token's state). A batch without supervised tokens gives a zero loss that still
    depends on ``hidden``.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    if not bool(supervised.any()):
        return hidden.sum() * 0.0
    rows, cols = supervised.nonzero(as_tuple=True)  # target t = cols + 1
    source = cols
    if keep is not None:
        columns = torch.arange(keep.shape[-1], device=keep.device)
        last_kept = torch.where(keep.detach() > 0.5, columns, -1).cummax(-1).values  # [B, S]
        source = last_kept[rows, cols]
        if bool((source < 0).any()):
            raise ValueError("a supervised token has no kept token before it (the sequence starts with dropped tokens)")
    logits = lm_head(hidden[rows, source]).float()
    return F.cross_entropy(logits, targets[rows, cols])


def pruning_loss(keep: torch.Tensor, target_ratio: float = 0.0) -> torch.Tensor:
    """Eq. 7 per image, averaged over the images: ``mean_b (mean_n keep[b, n] − τ)²``.

    ``keep`` [B_img, N] is the hard keep mask with straight-through gradients, so the value is computed
    from the hard decisions and the gradient reaches the soft keep probabilities.
    """
    return ((keep.mean(-1) - target_ratio) ** 2).mean()


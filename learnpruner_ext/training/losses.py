"""LearnPruner's training objective (paper Eq. 7-8): ``L = L_ntp + λ_p · (mean(M_hard) − τ)²``."""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100  # label of unsupervised positions: torch's cross_entropy default and LLaVA's IGNORE_INDEX


def next_token_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
    """Mean cross-entropy of the supervised next tokens; the LM head runs only on those positions.

    hidden [B, S, D] (last decoder layer, normed), labels [B, S] with ``IGNORE_INDEX`` where unsupervised.
    A batch without supervised tokens gives a zero loss that still depends on ``hidden``.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    if not bool(supervised.any()):
        return hidden.sum() * 0.0
    logits = lm_head(hidden[:, :-1][supervised]).float()
    return F.cross_entropy(logits, targets[supervised])


def pruning_loss(keep: torch.Tensor, target_ratio: float = 0.0) -> torch.Tensor:
    """Eq. 7 per image, averaged over the images: ``mean_b (mean_n keep[b, n] − τ)²``.

    ``keep`` [B_img, N] is the hard keep mask with straight-through gradients, so the value is computed
    from the hard decisions and the gradient reaches the soft keep probabilities.
    """
    return ((keep.mean(-1) - target_ratio) ** 2).mean()


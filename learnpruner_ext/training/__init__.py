"""LPM training: Eq. 6 masked attention, the Eq. 7-8 objective and the frozen-VLM + LPM module."""

from .losses import next_token_loss, pruning_loss
from .masked_attention import (
    ATTN_NAME,
    KEEP_KWARG,
    contiguous_positions,
    with_masked_attention,
    restore_attention,
    use_masked_attention,
)
from .model import LPMTrainingModel

__all__ = [
    "ATTN_NAME",
    "KEEP_KWARG",
    "LPMTrainingModel",
    "contiguous_positions",
    "with_masked_attention",
    "next_token_loss",
    "pruning_loss",
    "restore_attention",
    "use_masked_attention",
]

"""The one mechanism that shortens a batch during prefill: a :class:`SequenceCut` at a layer boundary.

Stage 1 is a cut at boundary 0 (after the image tokens are merged into the embeddings), stage 2 a cut at
boundary ``k`` inside the LLM. A cut keeps a per-sample set of positions (counts may differ between samples),
re-left-pads the batch, and records what decoding needs (the kept columns of the prefill mask), per cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import TokenPlan


def gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B or 1, S, ...] gathered along dim 1 with index [B, S'] -> [B, S', ...]."""
    x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def left_pad(rows: list[torch.Tensor], value) -> torch.Tensor:
    """Rows [n_i, ...] of different lengths -> [B, max n_i, ...], each right-aligned after ``value`` padding."""
    width = max((r.shape[0] for r in rows), default=0)
    return torch.stack([torch.cat([r.new_full((width - r.shape[0], *r.shape[1:]), value), r]) for r in rows])


def right_pad(rows: list[torch.Tensor], value) -> torch.Tensor:
    """Rows [n_i, ...] of different lengths -> [B, max n_i, ...], each followed by ``value`` padding."""
    width = max((r.shape[0] for r in rows), default=0)
    return torch.stack([torch.cat([r, r.new_full((width - r.shape[0], *r.shape[1:]), value)]) for r in rows])


@dataclass
class SequenceCut:
    """Shortening of a batch at a layer boundary: layers ``>= boundary`` see only the kept positions.

    Each sample keeps its own set of positions (possibly of different sizes); the kept positions are
    re-left-padded to the longest, so ``index`` [B, S'] holds, per row, ``S' - len`` padding slots (pointing at
    position 0, ``valid`` False) followed by the kept positions in order.
    """

    boundary: int
    index: torch.Tensor  # [B, S'] positions in the sequence before the cut
    valid: torch.Tensor  # [B, S'] bool, False on the new left padding
    # hidden states a merging method writes into kept positions before the gather (SparseVLM's recycled tokens):
    # ([B, M] positions before the cut, -1 = none; [B, M, D] values); None = the kept hidden states unchanged
    replace: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_keep(cls, boundary: int, keep: torch.Tensor) -> "SequenceCut":
        """keep [B, S] bool -> the cut that keeps those positions of every row."""
        batch, seq = keep.shape
        lengths = keep.sum(-1)
        width = int(lengths.max()) if batch else 0
        slot = keep.long().cumsum(-1) - 1 + (width - lengths)[:, None]  # right-aligned slot of each kept position
        slot = torch.where(keep, slot, torch.full_like(slot, width))  # dropped positions go to a spare column
        index = torch.zeros(batch, width + 1, dtype=torch.long, device=keep.device)
        index.scatter_(1, slot, torch.arange(seq, device=keep.device).expand(batch, -1))
        valid = torch.arange(width, device=keep.device)[None] >= (width - lengths)[:, None]
        return cls(boundary, index[:, :width], valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B or 1, S, ...] -> [B, S', ...] (padding slots hold row position 0: finite, always masked)."""
        return gather_seq(x, self.index)

    def gather_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, D] -> [B, S', D]: :meth:`gather` after writing ``replace`` (if any) into its positions."""
        if self.replace is not None:
            where, values = self.replace
            ok = where >= 0
            rows = torch.arange(where.shape[0], device=where.device)[:, None].expand_as(where)
            hidden = hidden.clone()
            hidden[rows[ok], where[ok]] = values[ok].to(hidden.dtype)
        return self.gather(hidden)

    def gather_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids [B or 1, S] -> [B, S'], or M-RoPE's [3, B or 1, S] -> [3, B, S']."""
        if position_ids.dim() == 3:
            return torch.stack([self.gather(axis) for axis in position_ids])
        return self.gather(position_ids)

    def mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The 2D padding mask after the cut: the kept columns of ``attention_mask``, 0 on the new padding."""
        kept = self.valid if attention_mask is None else self.gather(attention_mask).bool() & self.valid
        return kept.long()


@dataclass
class SequenceState:
    """What a cached generation must remember between forward calls (kept per cache object)."""

    cuts: list[SequenceCut] = field(default_factory=list)  # the prefill's cuts, in boundary order
    prefill_length: int = 0  # S before any cut: the prefill columns of the 2D mask generate() keeps growing
    removed: torch.Tensor | None = None  # [B] placeholders the boundary-0 cut dropped per sample
    position_mode: str = "contiguous"
    plans: list[TokenPlan | None] = field(default_factory=list)  # [B] each prompt's plan (None: no image)
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)  # [B][L], measured
    stage2_vision_keep: torch.Tensor | None = None  # [B, R2] indices into the R1 vision tokens (-1: not kept)
    stage2_scores: torch.Tensor | None = None  # [B, Nv] text->vision scores the last cut's selection read (or None)

    def implicit_mask(self, past_key_values, batch: int, q_len: int, device) -> torch.Tensor:
        """The all-ones 2D mask ``generate()`` leaves out when the prompts had no padding (the cuts may have
        added some): [B, prefill_length + tokens generated since prefill + q_len]."""
        first = self.cuts[0]
        width0 = first.index.shape[1] if first.boundary == 0 else self.prefill_length  # layer 0's prefill cache
        later = past_key_values.get_seq_length(0) - width0 + q_len
        return torch.ones(batch, self.prefill_length + later, dtype=torch.long, device=device)

    def decode_masks(self, attention_mask: torch.Tensor | None) -> dict[int, torch.Tensor | None]:
        """{boundary: the 2D mask layers >= boundary need while decoding}: the kept prefill columns, then every
        later column (the tokens generated since prefill)."""
        if attention_mask is None or attention_mask.dim() != 2:
            return {cut.boundary: attention_mask for cut in self.cuts}
        prefill, later = attention_mask[:, : self.prefill_length], attention_mask[:, self.prefill_length :]
        out = {}
        for cut in self.cuts:
            prefill = cut.mask(prefill)
            out[cut.boundary] = torch.cat([prefill, later], dim=1)
        return out

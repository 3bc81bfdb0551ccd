"""Timing hooks the pruning core offers: named sections of a prefill, accumulated in a :class:`StageTimer`.

    timer = StageTimer(device)
    model.model.set_stage_timer(timer)   # sections: vision_tower, stage1_select (lpm, diversity), projector,
    model.generate(...)                  #           stage2_select, stage2_cut
    model.model.set_stage_timer(None)
    timer.seconds                        # {"vision_tower": 0.012, ...}

Without a timer the sections cost nothing (no synchronisation). Sections may nest (``lpm`` inside
``stage1_select``); each accumulates its own wall-clock time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch


class StageTimer:
    """Wall-clock seconds per section name, summed over calls (CUDA is synchronised around each section)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def section(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def section(timer: StageTimer | None, name: str):
    """``timer.section(name)``, or a no-op context without a timer."""
    return nullcontext() if timer is None else timer.section(name)

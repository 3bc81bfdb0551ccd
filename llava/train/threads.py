"""Pick the number of torch threads from what the rest of the machine is doing (CPU training only: used by
``llava.train.train_full`` and ``toyworld.pretrain_vision``).

With OpenMP, running as many threads as cores while another process keeps one core busy makes every
parallel region wait for the starved thread: on a 2-core box a 2-thread run then goes several times
slower than a 1-thread run. :class:`AdaptiveThreads` measures, between two calls, how many cores other
processes used (``/proc/stat`` minus this process's own CPU time) and sets ``torch.set_num_threads`` to
the cores left free (at least 1). Off Linux it keeps the starting value.
"""

from __future__ import annotations

import os
import time

import torch


def _busy_jiffies() -> int | None:
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _own_jiffies() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (children not counted)


class AdaptiveThreads:
    def __init__(self, max_threads: int | None = None, min_interval_s: float = 5.0):
        self.max_threads = max_threads or os.cpu_count() or 1
        self.min_interval_s = min_interval_s
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = (time.time(), _busy_jiffies(), _own_jiffies())
        torch.set_num_threads(self.max_threads)

    def update(self) -> int:
        """Re-measure (if enough time passed) and set the thread count; returns the current count."""
        now, busy, own = time.time(), _busy_jiffies(), _own_jiffies()
        t0, busy0, own0 = self._last
        if busy is None or own is None or busy0 is None or own0 is None or now - t0 < self.min_interval_s:
            return torch.get_num_threads()
        others = max(0.0, ((busy - busy0) - (own - own0)) / self.hz / (now - t0))
        self._last = (now, busy, own)
        threads = max(1, min(self.max_threads, round(self.max_threads - others)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

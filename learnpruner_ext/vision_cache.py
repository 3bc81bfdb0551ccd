"""A cache of the vision tower's output across pruning methods: the same images, encoded once.

A sweep answers every benchmark once per (method, budget) and, without a cache, runs the vision tower on the
same images every time, although no method changes the tower (they all act on its output: the adapter's
:class:`~learnpruner_ext.adapters.ImageGroup`). With a cache installed, the tower's groups for a batch are
stored with the batch's exact inputs and reused by the next method that sees the same batch::

    cache = VisionCache(max_bytes=2 * 2**30)  # the stored inputs count towards the cap
    model.model.set_vision_cache(cache)     # inference only: never used while gradients are recorded
    ... answer with several methods ...
    cache.hits, cache.misses, cache.bytes

Exactness: a hit returns the very tensors the tower produced for bit-identical inputs: entries are found by a
cheap fingerprint (shapes, dtypes, a fixed sample of the values) and a hit is confirmed by exact equality with
the stored inputs (``torch.equal``), never by a file name. So a cached run answers exactly as an uncached one
on deterministic kernels. The lazy signals of a group ([CLS] attention, keys) are callables and are recomputed
by each method that reads them, as without a cache.

Memory: entries are kept until ``max_bytes`` is reached; later batches are not stored (no eviction). A sweep
visits the same batches in the same order for every method, so evicting the oldest entry (LRU) would evict
exactly the next one needed; keeping the first ones gives each later method every hit that fits.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


def fingerprint(*inputs) -> tuple:
    """A cheap lookup key for inputs: shapes, dtypes and a fixed sample of each tensor's values (at most ~8k
    elements); other values as themselves. Equal inputs give equal keys; a hit is confirmed by exact equality."""
    key = []
    for x in inputs:
        if isinstance(x, torch.Tensor):
            flat = x.detach().reshape(-1)
            step = max(1, flat.numel() // 8192)
            sample = flat[::step].to("cpu", torch.float64)
            key.append((tuple(x.shape), str(x.dtype), float(sample.sum()), float((sample * sample).sum())))
        else:
            key.append(repr(x))
    return tuple(key)


def same_inputs(a: tuple, b: tuple) -> bool:
    """Exact equality of two input tuples (tensors: same shape, dtype and every value)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.dtype != y.dtype:
                return False
            if x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def _tensors_of(obj) -> list[torch.Tensor]:
    """Tensors an entry keeps alive: dataclass fields and the tensors captured by its callables' closures."""
    found = []
    items = [getattr(obj, f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else [obj]
    for value in items:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif callable(value) and getattr(value, "__closure__", None):
            found += [c.cell_contents for c in value.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    return found


def entry_bytes(groups: list) -> int:
    """Bytes of the distinct storages held by a list of groups (views of one tensor count once)."""
    storages = {}
    for group in groups:
        for t in _tensors_of(group):
            s = t.untyped_storage()
            storages[(t.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


class VisionCache:
    """Tower outputs (lists of image groups) by their exact inputs, up to ``max_bytes``; counts hits and misses."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: dict[tuple, list[tuple[tuple, list]]] = {}  # fingerprint -> [(inputs, groups)]

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def groups(self, inputs: tuple, compute: Callable[[], list]) -> list:
        """The cached groups of exactly these ``inputs``, or ``compute()`` (stored with its inputs when it fits)."""
        key = fingerprint(*inputs)
        for stored, groups in self._entries.get(key, ()):
            if same_inputs(stored, inputs):
                self.hits += 1
                return groups
        self.misses += 1
        groups = compute()
        kept = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        size = entry_bytes(groups) + sum(x.numel() * x.element_size() for x in kept if isinstance(x, torch.Tensor))
        if self.bytes + size <= self.max_bytes:
            self._entries.setdefault(key, []).append((kept, groups))
            self.bytes += size
        return groups

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "bytes": self.bytes}

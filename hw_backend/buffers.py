"""Output buffers reused from step to step, so a steady decode loop allocates nothing large.

A fresh allocation above glibc's mmap threshold (at most 32 MiB) is a new mapping every time,
page-faulted and zeroed on first touch: at 128k tokens and a 5% top-k, one layer's gathered V
rows (97 MB) cost more to fault in than to gather, and the cost grows with the top-k ratio in
a way no hardware model should have to explain. Pinned host memory (CUDA) is slower still to
allocate. A real serving system keeps such staging buffers; so does the executor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import torch

#: Spare room when a buffer is (re)allocated: the top-k grows with the context every step.
HEADROOM = 1.25

Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class BufferPool:
    """One flat buffer per key; ``take`` returns a view of its prefix with the asked shape.

    A view stays valid until the same key is taken again, so keys name a role in a step
    (layer, tensor) and steps must not overlap (the executor finishes one before the next).
    """

    def __init__(self, allocate: Allocate) -> None:
        self._allocate = allocate
        self._buffers: dict[Hashable, torch.Tensor] = {}

    def take(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < count:
            buf = self._allocate((max(1, math.ceil(count * HEADROOM)),), dtype)
            self._buffers[key] = buf
        return buf[:count].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


__all__ = ["BufferPool", "HEADROOM"]

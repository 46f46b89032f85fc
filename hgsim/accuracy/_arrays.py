"""Input normalisation shared by selection and fidelity: numpy views of numpy or torch data."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """An ndarray view of ``x``; torch tensors (any device) are detached and moved to the CPU."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x)


def single_batch(x: np.ndarray) -> np.ndarray:
    """Drop a leading batch axis of size 1."""
    if x.shape[0] != 1:
        raise ValueError("pass one batch element at a time (or use fidelity() for batches)")
    return x[0]


def heads_and_keys(q: Any, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """One batch element as q (H, D) and K (KVH, T, D); a batch axis of size 1 is dropped."""
    q, k = as_numpy(q), as_numpy(k)
    if q.ndim == 3:
        q = single_batch(q)
    if k.ndim == 4:
        k = single_batch(k)
    if q.ndim != 2 or k.ndim != 3 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q (H, D) and K (KVH, T, D), got {q.shape} and {k.shape}")
    if q.shape[0] % k.shape[0]:
        raise ValueError("query heads must be a multiple of KV heads")
    return q, k

"""Random K and V for a decode's context: what the cache holds before the first measured step.

Decode speed depends on how many tokens sit where, not on their values, so measured runs (and
``hgsim run``) fill the context with iid normal K/V instead of prefilling a prompt through the
model: at 128k tokens a real prefill takes far longer than the decode it precedes.
"""

from __future__ import annotations


class RandomKv:
    """One draw of iid normal K and V, copied into every layer of every case's cache.

    Step times depend on the values' distribution (the top-k scan does the heap work it would
    on scores without structure), not on which values: each layer still sees its own scores,
    since its queries differ. Drawing once instead of per layer and case took the 128k cases'
    cache fill from 11-15 s to about 2 s (torch draws 512 MiB of normals in ~0.9 s here, and
    copies it in ~0.2 s), and the default study from about 107 s to 61 s: a validation that
    ends sooner after its calibration meets a machine closer to the one calibrated.
    """

    def __init__(self) -> None:
        self._drawn: dict[tuple, tuple] = {}

    def fill(self, store, tokens: int, dtype) -> None:
        """K/V for the first ``tokens`` positions of every layer of ``store``."""
        if tokens <= 0:
            return
        k, v = self._draw(store.batch, store.kv_heads, tokens, store.head_dim, dtype)
        for layer in store.layers:
            layer.load(k[:, :, :tokens], v[:, :, :tokens])

    def _draw(self, batch: int, kv_heads: int, tokens: int, head_dim: int, dtype):
        import torch

        key = (batch, kv_heads, head_dim, dtype)
        drawn = self._drawn.get(key)
        if drawn is None or drawn[0].shape[2] < tokens:
            self._drawn.pop(key, None)  # free the smaller draw before making the larger one
            generator = torch.Generator().manual_seed(0)
            shape = (batch, kv_heads, tokens, head_dim)
            drawn = tuple(torch.empty(shape, dtype=dtype).normal_(generator=generator)
                          for _ in range(2))
            self._drawn[key] = drawn
        return drawn


__all__ = ["RandomKv"]

"""Random K and V for a decode's context: what the cache holds before the first measured step.

Decode speed depends on how many tokens sit where, not on their values, so measured runs (and
``hgsim run``) fill the context with iid normal K/V instead of prefilling a prompt through the
model: at 128k tokens a real prefill takes far longer than the decode it precedes. One count
does depend on the values: the rows a KV group's union selection keeps, which random queries
make 2.4x the accuracy model's; validation's attention-only cases therefore run on
``designed_kv`` instead.
"""

from __future__ import annotations

import torch


class RandomKv:
    """One draw of iid normal K and V, copied into every layer of every case's cache.

    Step times depend on the values' distribution (the top-k scan does the heap work it would
    on scores without structure), not on which values: each layer still sees its own scores,
    since its queries differ. Drawing once instead of per layer and case cuts the cache fill of
    large contexts several-fold (figures: docs/calibration.md, history): a validation that
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


class RandomDecode:
    """Attention-only decode inputs: a random context and random per-step queries and new
    K/V, with ``decode_loop.SyntheticDecode``'s interface (``run_decode`` takes either). For
    timing, where SyntheticDecode's designed attention structure is not needed and would take
    minutes to build at long contexts."""

    def __init__(self, *, layers: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                 context: int, steps: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                 random_kv: RandomKv | None = None) -> None:
        self.layers, self.batch, self.heads, self.kv_heads = layers, batch, heads, kv_heads
        self.head_dim, self.context, self.steps, self.dtype = head_dim, context, steps, dtype
        self.seed = seed
        self.random_kv = random_kv or RandomKv()

    def load(self, store) -> None:
        self.random_kv.fill(store, self.context - 1, self.dtype)

    def _generator(self, step: int, layer: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1009 + layer)

    def query(self, step: int, layer: int) -> torch.Tensor:
        return torch.randn(self.batch, self.heads, self.head_dim,
                           generator=self._generator(step, layer))

    def new_kv(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self._generator(step, layer)
        shape = (self.batch, self.kv_heads, 1, self.head_dim)
        return (torch.randn(shape, generator=g).to(self.dtype),
                torch.randn(shape, generator=g).to(self.dtype))


__all__ = ["RandomDecode", "RandomKv"]

"""The per-layer inputs of a step in buffers that never move: queries and the new token's K/V.

A captured graph reads fixed addresses, so the graph path needs a step's queries and new K/V in
the same place every step. ``StepBuffers`` holds them: one query per layer, one look-ahead query
per layer (layer 0's is its own query: nothing runs before it), and every layer's new K and V
in one stacked tensor, which the step's end copies to host memory in a single transfer (the
graph path's write-through, ``graph_side``). A whole model's device work writes into these
buffers directly; an attention-only caller's tensors are copied in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepBuffers:
    q: list[torch.Tensor]  # per layer (B, H, D) float32
    ahead_q: list[torch.Tensor]  # per layer (B, H, D) float32; ahead_q[0] is q[0]
    new_tokens: torch.Tensor  # (layers, 2, B, KVH, 1, D): K and V of the step's new token

    @staticmethod
    def allocate(device: torch.device | str, *, layers: int, batch: int, heads: int,
                 kv_heads: int, head_dim: int, kv_dtype: torch.dtype) -> StepBuffers:
        """Zeroed (a graph may read a padded region before anything is written there)."""
        q = [torch.zeros(batch, heads, head_dim, device=device) for _ in range(layers)]
        ahead = [q[0]] + [torch.zeros(batch, heads, head_dim, device=device)
                          for _ in range(layers - 1)]
        tokens = torch.zeros(layers, 2, batch, kv_heads, 1, head_dim, dtype=kv_dtype,
                             device=device)
        return StepBuffers(q, ahead, tokens)

    @property
    def layers(self) -> int:
        return len(self.q)

    def new_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, KVH, 1, D) of the layer's new K and V."""
        return self.new_tokens[layer, 0], self.new_tokens[layer, 1]

    def load(self, queries, new_kv=None) -> tuple[list[torch.Tensor], list | None]:
        """Copy a step's given queries and new K/V in (on the caller's stream, before the step
        starts), returning the buffers to pass to ``PlanExecutor.step``: an attention-only
        caller's graph-path step then copies nothing itself, as a model's does not."""
        for static, given in zip(self.q, queries, strict=True):
            static.copy_(given, non_blocking=True)
        if new_kv is None:
            return self.q, None
        for layer, (k, v) in enumerate(new_kv):
            k_static, v_static = self.new_kv(layer)
            k_static.copy_(k, non_blocking=True)
            v_static.copy_(v, non_blocking=True)
        return self.q, [self.new_kv(i) for i in range(self.layers)]

    def matches(self, *, layers: int, batch: int, heads: int, kv_heads: int, head_dim: int,
                kv_dtype: torch.dtype) -> bool:
        return (self.new_tokens.shape == (layers, 2, batch, kv_heads, 1, head_dim)
                and self.new_tokens.dtype == kv_dtype
                and tuple(self.q[0].shape) == (batch, heads, head_dim))


__all__ = ["StepBuffers"]

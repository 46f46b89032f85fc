"""The accuracy model's synthetic attention as a validation's KV cache and queries.

Under grouped-query attention HybridGen's union selection (``group_union``) moves as many rows
as the query heads of a KV group pick between them: k when they agree, G k when they pick
independently. The simulator sizes that union from the accuracy model's synthetic attention
(``hgsim.accuracy.groups.expected_union_rows``), in which a group's heads share heavy hitters
and per-token noise (properties of the shared keys) and differ by a small per-head deviation.
iid random queries over iid random keys make the heads pick independently instead (a union of
n (1 - (1 - k/n)^G) rows, 2.4x the model's at r 0.05 and G 4), so validation ran a selection the
simulator does not model. Here the cache holds ``synthesize_case``'s K and V, built from the
accuracy proxy's spec at the study model's layout, and every layer's query at every step is the
case's designed query, which sees exactly the designed logits: the same generator the union
curve reads, not a second copy of its structure.

What else a step costs does not depend on the values: the scans are dense, and the C kernel's
top-k admits a score by comparing it with the running k-th best, so its work depends only on
the scores' ranks in scan order, which are exchangeable over the host range here as for iid
noise (heavy hitters and noise are drawn per token; sinks and the recency boost sit in the
device's tokens).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hgsim.accuracy.proxy import DEFAULT_SPEC
from hgsim.accuracy.synthetic import AttentionModelSpec, synthesize_case
from hw_backend.random_kv import RandomDecode


class DesignedKv:
    """One synthetic case per attention layout, copied into every layer of every case's cache.

    Built once for the largest context asked (a few seconds at 128k tokens) and cut to each
    case's prompt, like ``random_kv.RandomKv``: sinks are the first tokens of any cut, and the
    host range of a cut holds only per-token structure (heavy hitters, the group's noise, each
    head's deviation), which is all the union depends on. The recency boost of the build's
    newest tokens lies beyond a shorter cut; the device's tokens cost the same without it.
    """

    def __init__(self, spec: AttentionModelSpec | None = None) -> None:
        self.spec = spec or DEFAULT_SPEC
        self._built: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def layout_spec(self, *, heads: int, kv_heads: int, head_dim: int,
                    tokens: int) -> AttentionModelSpec:
        """The accuracy spec at this attention layout over ``tokens`` tokens."""
        return replace(self.spec, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim).with_tokens(tokens)

    def fill(self, store, tokens: int, dtype, heads: int) -> torch.Tensor:
        """K/V for the first ``tokens`` positions of every layer of ``store`` (whose query
        heads number ``heads``), the same in every batch element; returns the designed query
        (batch, heads, head_dim) float32 that sees the designed logits over them."""
        q, k, v = self._case(heads, store.kv_heads, store.head_dim, max(tokens, 1), dtype)
        if tokens > 0:
            shape = (store.batch, store.kv_heads, tokens, store.head_dim)
            for layer in store.layers:
                layer.load(k[:, :, :tokens].expand(shape), v[:, :, :tokens].expand(shape))
        return q.expand(store.batch, heads, store.head_dim).clone()

    def _case(self, heads: int, kv_heads: int, head_dim: int, tokens: int, dtype):
        key = (heads, kv_heads, head_dim, dtype)
        built = self._built.get(key)
        if built is None or built[1].shape[2] < tokens:
            self._built.pop(key, None)  # free the smaller case before building the larger one
            case = synthesize_case(self.layout_spec(heads=heads, kv_heads=kv_heads,
                                                    head_dim=head_dim, tokens=tokens))
            built = (torch.from_numpy(case.q).float(), torch.from_numpy(case.k).to(dtype),
                     torch.from_numpy(case.v).to(dtype))
            self._built[key] = built
        return built


class DesignedDecode(RandomDecode):
    """``RandomDecode`` over ``DesignedKv``'s cache, every layer's query at every step the
    designed one (the new tokens' K/V stay random: they land on the device). For measured
    attention-only runs, whose host work under ``group_union`` depends on the heads' overlap."""

    def __init__(self, *, designed_kv: DesignedKv | None = None, **shape) -> None:
        super().__init__(**shape)
        self.designed_kv = designed_kv or DesignedKv()
        self._query: torch.Tensor | None = None

    def load(self, store) -> None:
        self._query = self.designed_kv.fill(store, self.context - 1, self.dtype, self.heads)

    def query(self, step: int, layer: int) -> torch.Tensor:
        if self._query is None:
            raise RuntimeError("load the cache before asking for its query")
        return self._query.clone()


__all__ = ["DesignedDecode", "DesignedKv"]

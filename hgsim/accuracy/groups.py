"""How many distinct rows HybridGen's per-KV-group selection sends under grouped-query attention.

With ``GroupSelect.GROUP_UNION`` each query head keeps its own top-k of the host tokens and a KV
head's rows are the union of its ``G`` heads' sets: between k (the heads agree) and ``G * k``
(they pick disjoint tokens). Where in that range depends on how alike the heads of a group are,
which is a property of the attention, so the simulator takes it from the accuracy model
(``synthetic``): the expected union size on the same synthetic attention the accuracy proxy
scores, rather than a guessed overlap.

The host range of a plan holds the tokens outside the GPU's recent window and sinks. There the
synthetic model has no positional structure left (recency decays within a few hundred tokens of
the newest token, sinks are the first few): heavy hitters, the group's noise and each head's
deviation are drawn per token, and the proxy's context scaling (``proxy.zoom_spec``) leaves
exactly these untouched. So the union fraction ``E|U| / k`` depends on the top-k ratio r and the
group size G only, and one curve per (G, spec) serves every plan: ``union_curve`` ranks the
"body" tokens of the spec's designed logits once per head, keeps per KV group and token the best
rank any head gives it, and sorts those; the union of the top-k sets is then the count of
tokens whose best rank is below k (``UnionCurve.union``), one binary search per query. Curves
are cached per process (a few hundred milliseconds each at the default 32k tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hgsim.accuracy import proxy
from hgsim.accuracy.proxy import group_spec
from hgsim.accuracy.synthetic import AttentionModelSpec, case_logits

#: Newest tokens left out of the body, in recency lengths: the boost has decayed to
#: ``recency_boost * e^-8`` (a few thousandths of a logit at the defaults) beyond them.
_RECENCY_LENGTHS = 8


@dataclass(frozen=True, eq=False)
class UnionCurve:
    """Per KV group, the sorted best rank (0 = a head's highest logit) its heads give each body
    token: ``union(k)`` is the mean size of the union of the group's per-head top-k sets."""

    best_ranks: np.ndarray  # (KVH, n) int64, each row sorted ascending
    heads_per_group: int

    @property
    def tokens(self) -> int:
        return self.best_ranks.shape[1]

    def union(self, k: int) -> float:
        """Mean over KV groups of ``|union of the G per-head top-k sets|`` for k body tokens."""
        k = min(max(int(k), 0), self.tokens)
        return float(np.mean([np.searchsorted(row, k) for row in self.best_ranks]))

    def union_at(self, k: float) -> float:
        """``union`` between whole token counts, linearly interpolated: a share of a longer
        host range maps to a fractional count of body tokens, and rounding it instead made
        ``k * union(round(k)) / round(k)`` drop each time the rounding stepped up."""
        k = min(max(float(k), 0.0), float(self.tokens))
        below = math.floor(k)
        if below == k:
            return self.union(below)
        low, high = self.union(below), self.union(below + 1)
        return low + (k - below) * (high - low)

    def fraction(self, ratio: float) -> float:
        """``E|U| / k`` at top-k ratio ``ratio`` (k = ratio of the body, at least one token):
        1 when every head agrees, ``heads_per_group`` when none do. ``ratio * fraction(ratio)``
        never decreases with ``ratio`` (the union only grows)."""
        k = min(max(1.0, ratio * self.tokens), float(self.tokens))
        return self.union_at(k) / k


def union_curve(heads_per_group: int, spec: AttentionModelSpec | None = None) -> UnionCurve:
    """The union curve of ``group_spec(heads_per_group, spec)``'s designed logits (module doc);
    ``spec`` defaults to the accuracy proxy's ``DEFAULT_SPEC``."""
    return _union_curve(heads_per_group, spec or proxy.DEFAULT_SPEC)


@lru_cache(maxsize=32)
def _union_curve(heads_per_group: int, spec: AttentionModelSpec) -> UnionCurve:
    gspec = group_spec(heads_per_group, spec)
    logits = case_logits(gspec)
    tail = min(gspec.n_tokens - gspec.sink_tokens - 1,
               math.ceil(_RECENCY_LENGTHS * gspec.recency_tokens))
    body = logits[:, gspec.sink_tokens : gspec.n_tokens - tail]
    order = np.argsort(-body, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(body.shape[1]), body.shape), axis=1)
    best = ranks.reshape(gspec.kv_heads, heads_per_group, -1).min(axis=1)
    best.sort(axis=1)
    best.flags.writeable = False
    return UnionCurve(best, heads_per_group)


def expected_union_rows(host_tokens: int, selected: int, heads_per_group: int,
                        spec: AttentionModelSpec | None = None) -> float:
    """Expected distinct host rows per KV head when each of ``heads_per_group`` heads keeps its
    top-``selected`` of ``host_tokens`` and the group's rows are their union: ``selected``
    times the union fraction at r = selected / host_tokens, within [k, min(G k, host_tokens)]
    (exactly k for one head per group, all host tokens when every one is selected)."""
    if not 0 <= selected <= host_tokens:
        raise ValueError("selected must lie in [0, host_tokens]")
    if heads_per_group <= 1 or selected in (0, host_tokens):
        return float(selected)
    curve = union_curve(heads_per_group, spec)
    rows = selected * curve.fraction(selected / host_tokens)
    return float(min(max(rows, selected), heads_per_group * selected, host_tokens))


def clear_caches() -> None:
    _union_curve.cache_clear()


__all__ = ["UnionCurve", "clear_caches", "expected_union_rows", "union_curve"]

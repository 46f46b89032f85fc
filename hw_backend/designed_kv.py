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
curve reads, not a second copy of its structure. The whole-model path
(``model_decode.ModelDecode.fill_designed``) holds the same cache and hands attention the same
queries in place of its random weights' projections.

Later decode steps ask queries that drift from the designed one (``QueryDrift``) as the accuracy
model's H2O history has them drift: the persistent part stays, one head's drifting parts ``L``
steps apart have expected cosine ``floor + (1 - floor) decay^L``
(``accuracy.selection.lag_similarity``), and the heads of a group keep the correlation
``group_queries`` gave them. The keys stay those designed for the first step's query, so a
later query sees the designed structure at full strength, part of the designed noise and fresh
noise from the keys' isotropic part, as ``query_history`` has a past query see it in the
model: its per-head top-k overlaps the first step's by what the model's past query at that lag
keeps, and the group's union stays the designed step's, which the simulator sizes
(tests/test_designed_kv.py).

What else a step costs does not depend on the values: the scans are dense, and the C kernel's
top-k admits a score by comparing it with the running k-th best, so its work depends only on
the scores' ranks in scan order, which are exchangeable over the host range here as for iid
noise (heavy hitters and noise are drawn per token; sinks and the recency boost sit in the
device's tokens).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from hgsim.accuracy.proxy import DEFAULT_SPEC
from hgsim.accuracy.selection import SelectionModel
from hgsim.accuracy.synthetic import AttentionModelSpec, group_query_correlation, synthesize_case
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
        # per layout: (q, K, V, persistent query part, drifting parts' scale)
        self._built: dict[tuple, tuple] = {}

    def layout_spec(self, *, heads: int, kv_heads: int, head_dim: int,
                    tokens: int) -> AttentionModelSpec:
        """The accuracy spec at this attention layout over ``tokens`` tokens."""
        return replace(self.spec, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim).with_tokens(tokens)

    def fill(self, store, tokens: int, dtype, heads: int) -> torch.Tensor:
        """K/V for the first ``tokens`` positions of every layer of ``store`` (whose query
        heads number ``heads``), the same in every batch element; returns the designed query
        (batch, heads, head_dim) float32 that sees the designed logits over them."""
        q, k, v = self._case(heads, store.kv_heads, store.head_dim, max(tokens, 1), dtype)[:3]
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
                     torch.from_numpy(case.v).to(dtype),
                     torch.from_numpy(case.persistent_q).float(),
                     math.sqrt(1.0 - case.persistent_share))
            self._built[key] = built
        return built

    def split(self, heads: int, kv_heads: int, head_dim: int, dtype) -> tuple[torch.Tensor, float]:
        """The last ``fill``'s persistent query part (1, H, D) and its drifting parts' scale
        (what ``QueryDrift`` needs to keep one and drift the other)."""
        return self._built[(heads, kv_heads, head_dim, dtype)][3:]


_DRIFT_STREAM = 0xD21F7  # separates the drift's draws from the case's own streams


class QueryDrift:
    """Per-step queries (B, H, D) whose step 0 is the designed query and whose drifting part
    then drifts as a stationary Gaussian process with the accuracy model's step-to-step
    similarity, while the persistent part (``SyntheticAttention.persistent_q``) stays.

    Mechanism (``lag_similarity``'s doc: the drifting parts' similarity decays with lag towards
    a floor f, by a factor ``decay`` per step): with d_t the drifting part,
    ``d_t = sqrt(f) C + sqrt(1 - f) X_t`` with X an AR(1) process,
    ``X_{t+1} = decay X_t + sqrt(1 - decay^2) E_t``. C and X_0 are drawn given d_0 (Gaussian
    conditioning: ``C = sqrt(f) d_0 + sqrt(1 - f) Z``, ``X_0 = sqrt(1 - f) d_0 - sqrt(f) Z``),
    so q_0 stays the designed query and every step has its distribution. Z and E are drawn
    like ``group_queries``' queries (a group-shared part with the group's correlation rho) at
    the drifting parts' scale ``drift_std``, so the covariance of head h's drifting part at
    step t and head h''s at step t' is ``R[h, h'] (f + (1 - f) decay^|t - t'|)``: heads stay
    as alike as at step 0. The draws are taken off the persistent direction, as the designed
    drifting parts are (``synthesize_case``), so the keys' structure along it stays at full
    strength. Without ``persistent`` the whole query drifts.
    Deterministic in (spec seed, ``seed``, layer, step), whatever order steps are asked in.
    """

    def __init__(self, q0: torch.Tensor, spec: AttentionModelSpec,
                 model: SelectionModel | None = None, *, seed: int = 0, layer: int = 0,
                 persistent: torch.Tensor | None = None, drift_std: float = 1.0) -> None:
        self.model = model or SelectionModel()
        self.spec, self.seed, self.layer = spec, seed, layer
        self.rho = group_query_correlation(spec)
        self.persistent, self.drift_std = persistent, drift_std
        self._q0 = q0.double().numpy()
        self._persistent = (np.zeros_like(self._q0) if persistent is None
                            else np.broadcast_to(persistent.double().numpy(), self._q0.shape))
        norm = np.linalg.norm(self._persistent, axis=-1, keepdims=True)
        self._unit = self._persistent / np.where(norm > 0, norm, 1.0)
        d0 = self._q0 - self._persistent
        floor = self.model.history_similarity_floor
        z = self._group_normal(-1)
        self._common = math.sqrt(floor) * d0 + math.sqrt(1.0 - floor) * z
        self._x0 = math.sqrt(1.0 - floor) * d0 - math.sqrt(floor) * z
        self._step, self._x = 0, self._x0

    def _group_normal(self, step: int) -> np.ndarray:
        """Normal (B, H, D) of standard deviation ``drift_std`` whose heads of a group
        correlate by ``rho``."""
        batch, heads, head_dim = self._q0.shape
        rng = np.random.default_rng([_DRIFT_STREAM, self.spec.seed, self.seed, self.layer,
                                     step + 1])
        own = rng.standard_normal((batch, heads, head_dim))
        groups = heads // self.spec.heads_per_group
        shared = np.repeat(rng.standard_normal((batch, groups, head_dim)),
                           self.spec.heads_per_group, axis=1)
        draw = math.sqrt(self.rho) * shared + math.sqrt(1.0 - self.rho) * own
        draw -= np.sum(draw * self._unit, axis=-1, keepdims=True) * self._unit  # (class doc)
        return self.drift_std * draw

    def drifting(self, step: int) -> torch.Tensor:
        """The drifting part (B, H, D) float64 of step ``step``'s query."""
        return torch.from_numpy(self._drifting(step))

    def _drifting(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError("step must be non-negative")
        if step == 0:
            return self._q0 - self._persistent
        if step < self._step:
            self._step, self._x = 0, self._x0
        decay = self.model.history_decay
        while self._step < step:
            self._x = decay * self._x + math.sqrt(1.0 - decay**2) * self._group_normal(self._step)
            self._step += 1
        floor = self.model.history_similarity_floor
        return math.sqrt(floor) * self._common + math.sqrt(1.0 - floor) * self._x

    def query(self, step: int) -> torch.Tensor:
        """The query (B, H, D) float32 of decode step ``step`` (0: the designed one)."""
        if step == 0:
            return torch.from_numpy(self._q0).float()
        return torch.from_numpy(self._persistent + self._drifting(step)).float()


class DesignedDecode(RandomDecode):
    """``RandomDecode`` over ``DesignedKv``'s cache, every layer's query the designed one at
    the first step and drifting from it after (``QueryDrift``, each layer its own draws; the
    new tokens' K/V stay random: they land on the device). For measured runs, whose host work
    under ``group_union`` depends on the heads' overlap: attention alone (``hgsim run
    --attention-only``, validation) and, through ``ModelDecode.fill_designed``, whole models."""

    def __init__(self, *, designed_kv: DesignedKv | None = None,
                 selection_model: SelectionModel | None = None, **shape) -> None:
        super().__init__(**shape)
        self.designed_kv = designed_kv or DesignedKv()
        self.selection_model = selection_model or SelectionModel()
        self._drifts: list[QueryDrift] = []

    def load(self, store) -> None:
        q0 = self.designed_kv.fill(store, self.context - 1, self.dtype, self.heads)
        spec = self.designed_kv.layout_spec(heads=self.heads, kv_heads=self.kv_heads,
                                            head_dim=self.head_dim, tokens=self.context - 1)
        persistent, scale = self.designed_kv.split(self.heads, self.kv_heads, self.head_dim,
                                                   self.dtype)
        self._drifts = [QueryDrift(q0, spec, self.selection_model, seed=self.seed, layer=i,
                                   persistent=persistent, drift_std=scale)
                        for i in range(self.layers)]

    def query(self, step: int, layer: int) -> torch.Tensor:
        if not self._drifts:
            raise RuntimeError("load the cache before asking for its query")
        return self._drifts[layer].query(step)


__all__ = ["DesignedDecode", "DesignedKv", "QueryDrift"]

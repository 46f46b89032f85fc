"""A parameterised, seedable attention model realised as real (q, K, V) tensors.

Lossy KV policies differ in *which* tokens they attend, so their accuracy depends on how attention
mass is spread over a long context. Measured LLM attention has three dominant features, and the
model reproduces each with one parameter group:

* attention sinks: the first few tokens draw a large, query-independent share (``sink_*``);
* recency: logits rise towards the newest token, decaying with distance (``recency_*``);
* heavy hitters: a small fraction of older tokens draws heavy-tailed attention (``heavy_*``);
* optionally (off by default), a power law over the non-sink tokens (``rank_*``): the i-th most
  relevant gets the logit ``rank_logit_boost - rank_exponent * ln(i)`` (weight ~ i^-s, H2O's
  power law of accumulated attention), ranks in random order, so that attention concentrates
  as the context grows (a fixed share of the tokens keeps more of the mass; ``rank_logits``);

on top of Gaussian per-token noise (``noise_std``). The designed logits are realised *exactly* as
``q . k_j / sqrt(D)`` by building every key as "designed component along the queries" plus
isotropic noise orthogonal to them, so a kernel running on the tensors sees precisely the designed
distribution, while a different query sees what its own direction picks out of the keys.

Every query has two parts (``design_logit_parts``). A *persistent* part, one direction per KV
group, sees the structure (sinks, recency, heavy hitters); a *drifting* part, one per head, sees
the per-token noise. A later decode step's query keeps the persistent part and turns only the
drifting one (``selection.query_history`` for H2O's past queries, ``hw_backend.designed_kv``'s
``QueryDrift`` for validation's), so it sees the structure at full strength, part of the
designed noise and fresh noise from the keys' isotropic part, whose scale gives that fresh
noise the designed variance: the heavy hitters persist from step to step and only the
query-specific rest of the selection turns over, as the measurements in docs/model.md ("What
the literature says about persistence across steps") describe. A speculated query (InfiniGen)
is the whole query turned to a cosine: its error is not split, because it is not drift but an
additive error, ``W_q (x_(i-1) - x_i)`` from feeding the previous layer's input through this
layer's projection, which owes nothing to the query's own persistent/drifting split; a random
error added to q ranks tokens as q turned to the same cosine does (rankings ignore scale). The
persistent part's share of a query's norm (``persistent_energy_share``) makes keys spread as
much along it as along any other direction.

Grouped-query attention: the ``heads / kv_heads`` query heads of a group share one K (and V).
The designed logits are drawn per KV group (sinks, recency, heavy hitters and the per-token
noise are properties of the shared keys) plus an independent per-head deviation
(``head_noise_std``); solving the small Gram system of the group's queries makes every head's
logits exact at once. The queries themselves are correlated the same way: each is a shared
component of the group plus a head-specific one, ``q_h = sqrt(rho) s + sqrt(1 - rho) w_h`` with
``rho = noise_std^2 / (noise_std^2 + head_noise_std^2)`` (``query_correlation``), which is the
correlation two heads' logits would have over isotropic keys. So a different query (speculated,
rotated for the next step) sees the group's structure as a real GQA head would.

Why the heads of a group are this alike (``rho`` = 0.9 over the per-token noise, ~0.92 over all
host tokens with the shared heavy hitters), which sets how much their top-k sets overlap (the
union of 8 heads' top-5% is ~1.8 k tokens, not 8 k): GQA models are made by mean-pooling the key
and value projections of an MHA checkpoint's heads (Ainslie et al., 2023) or trained with shared
keys from the start, so what makes a token draw attention (its key: a sink, a delimiter, an
entity the text keeps returning to) is common to the group by construction, and the tokens that
carry the attention mass are the group's, not one head's; the head-specific part only reorders
the tail. The model is not fitted to captured attention (``hw_backend.hf_hook`` can capture it);
``benchmarks/gqa_selection.py --head-noise`` shows how the choice between the GQA selection
modes moves when heads are less alike (``head_noise_std`` 1.0 and 1.5: ``rho`` 0.69 and 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np

from hgsim.accuracy.overrides import FieldRule, OverrideGroup

_UNIFORM_HALF_WIDTH = math.sqrt(3.0)  # U(-sqrt 3, sqrt 3) has unit variance
_QUERY_STREAM = 0x5EED  # separates next_query's stream from a caller's use of the same seed
_NOISE_CHUNK = 1 << 19  # floats per chunk of raw random bits (2 MiB)
# Tokens per chunk of key construction. Products here are memory-bound and run through
# ``einsum`` (no BLAS): BLAS worker threads gain nothing on them and, spin-waiting on a busy
# machine, made the whole synthesis several times slower.
_TOKEN_CHUNK = 4096
_MAX_QUERY_CORRELATION = 0.95
_MAX_PERSISTENT_SHARE = 0.9


@dataclass(frozen=True, slots=True)
class AttentionModelSpec:
    """Shape of the synthetic attention distribution of one layer (one batch element).

    Defaults are tuned for a 32k context: the sinks hold ~21% of the mass, a 1024-token recent
    window ~22% (at seed 0; other seeds draw the four sinks' noise so that they hold up to 38%),
    and most of the rest sits on ~2% heavy hitters, so a per-head top-k of 5% of the host
    tokens keeps ~96% of the mass (at every seed) while truncating to the recent window keeps
    under half. Lengths (``sink_tokens``, ``recency_tokens``) are absolute token counts.
    ``shape.attention_shares`` (``hgsim attention``) prints where a spec puts its mass, and
    docs/model.md sets the defaults' shares beside published measurements.

    ``rank_exponent`` s > 0 turns on a power law over the non-sink tokens (``rank_logits``): the
    i-th most relevant (a random permutation per KV group, persistent like the heavy hitters)
    gets ``rank_logit_boost - s ln i`` on top of everything else. Off by default (0): the model
    is then exactly the one above, every stream and number unchanged. ``rank_logit_boost`` 9
    puts the law's total weight at 32k tokens (e^9 sum_i i^-s, about e^8.4 of it at s = 1.1)
    near that of 32k unboosted tokens, so that the sinks keep the share the defaults give them
    there (0.21 at s = 1.1, seed 0; docs/model.md, "Concentration against context").
    ``rank_span`` is the zoom's, not a user's.
    """

    n_tokens: int = 32768
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 128
    sink_tokens: int = 4
    sink_logit_boost: float = 11.0
    recency_boost: float = 6.0  # logit boost of the newest token ...
    recency_tokens: float = 128.0  # ... decaying as exp(-distance / recency_tokens)
    heavy_fraction: float = 0.02  # share of tokens that are heavy hitters
    heavy_logit_boost: float = 5.0  # smallest logit boost of a heavy hitter
    heavy_tail_index: float = 1.5  # Pareto index of exp(boost): smaller is heavier-tailed
    noise_std: float = 1.5  # per-token logit noise, also the spread of keys off the queries
    head_noise_std: float = 0.5  # per-head deviation from the group's logits (GQA)
    seed: int = 0
    rank_exponent: float = 0.0  # power law over the non-sink tokens, weight ~ i^-s (0: off)
    rank_logit_boost: float = 9.0  # logit of its top-ranked token (``rank_logits``)
    rank_span: float = 1.0  # real tokens per synthetic one (set by ``proxy.zoom_spec``)

    def __post_init__(self) -> None:
        if self.n_tokens < 1:
            raise ValueError("n_tokens must be positive")
        if self.heads < 1 or self.kv_heads < 1 or self.heads % self.kv_heads:
            raise ValueError("heads must be a positive multiple of kv_heads")
        if not 1 <= self.heads_per_group < self.head_dim:
            raise ValueError("a KV group needs fewer query heads than head_dim")
        if not 0 <= self.sink_tokens <= self.n_tokens:
            raise ValueError("sink_tokens must lie in [0, n_tokens]")
        if not 0.0 <= self.heavy_fraction <= 1.0:
            raise ValueError("heavy_fraction must lie in [0, 1]")
        if self.recency_boost < 0:
            raise ValueError("recency_boost must be non-negative")
        if self.recency_tokens <= 0 or self.heavy_tail_index <= 0:
            raise ValueError("recency_tokens and heavy_tail_index must be positive")
        if self.noise_std < 0 or self.head_noise_std < 0:
            raise ValueError("noise standard deviations must be non-negative")
        if not self.rank_exponent >= 0:  # NaN fails too
            raise ValueError("rank_exponent must be non-negative")
        if not self.rank_span >= 1.0:
            raise ValueError("rank_span must be at least 1 (real tokens per synthetic one)")

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def query_correlation(self) -> float:
        """Correlation of two queries of one KV group (their cosine in expectation): the share
        of the per-token logit noise the heads of a group have in common (module doc)."""
        total = self.noise_std**2 + self.head_noise_std**2
        return self.noise_std**2 / total if total > 0 else 1.0

    def with_tokens(self, n_tokens: int) -> AttentionModelSpec:
        """The same attention model over ``n_tokens`` (sinks capped at the context)."""
        return replace(self, n_tokens=n_tokens, sink_tokens=min(self.sink_tokens, n_tokens))


#: The fields of the attention's shape a study's ``fidelity.attention`` (the API's
#: ``attention``, the CLI's ``--attention``) sets; the sizes (tokens, heads, head_dim) follow the
#: plan and the model. The bounds only keep the logits finite and the shapes meaningful; a
#: derived spec (``proxy.zoom_spec``) may step outside them.
ATTENTION = OverrideGroup("attention", AttentionModelSpec, {
    "sink_tokens": FieldRule(0, 4096, whole=True),
    "sink_logit_boost": FieldRule(0.0, 50.0),
    "recency_boost": FieldRule(0.0, 50.0),
    "recency_tokens": FieldRule(0.0, 1e6, low_open=True),
    "heavy_fraction": FieldRule(0.0, 1.0),
    "heavy_logit_boost": FieldRule(0.0, 50.0),
    "heavy_tail_index": FieldRule(0.0, 100.0, low_open=True),
    "noise_std": FieldRule(0.0, 20.0),
    "head_noise_std": FieldRule(0.0, 20.0),
    "seed": FieldRule(0, whole=True),
    "rank_exponent": FieldRule(0.0, 4.0),
    "rank_logit_boost": FieldRule(-50.0, 50.0),
}, example="{'heavy_fraction': 0.05}")


def attention_model(overrides: Mapping[str, Any] | None) -> AttentionModelSpec | None:
    """The default ``AttentionModelSpec`` with ``overrides`` (``ATTENTION``'s fields) replacing
    its shape; None when none is given. Raises ``overrides.FieldError`` naming the field."""
    return ATTENTION.build(overrides)


@dataclass(frozen=True, eq=False)
class SyntheticAttention:
    """Tensors of one synthetic decode step plus the logits they were designed to produce."""

    spec: AttentionModelSpec
    q: np.ndarray  # (1, H, D) float32
    k: np.ndarray  # (1, KVH, T, D) float32
    v: np.ndarray  # (1, KVH, T, D) float32
    logits: np.ndarray  # (H, T) float64, the designed q.k / sqrt(D)
    persistent_q: np.ndarray  # (1, H, D) float32, the part of q that sees the persistent logits
    persistent_share: float  # its share of a query's expected squared norm

    @property
    def qkv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.q, self.k, self.v


def structure_logits(spec: AttentionModelSpec) -> np.ndarray:
    """Deterministic part of the logits shared by all heads: sinks plus recency, shape (T,)."""
    distance = np.arange(spec.n_tokens - 1, -1, -1, dtype=np.float64)
    logits = spec.recency_boost * np.exp(-distance / spec.recency_tokens)
    logits[: spec.sink_tokens] += spec.sink_logit_boost
    return logits


def heavy_hitter_boosts(spec: AttentionModelSpec, rng: np.random.Generator) -> np.ndarray:
    """Per-KV-group logit boosts, shape (KVH, T): zero except on heavy hitters.

    ``exp(boost)`` is Pareto with index ``heavy_tail_index`` (so ``boost - heavy_logit_boost`` is
    exponential with mean ``1 / index``): a few tokens draw far more attention than the rest,
    as measured for heavy hitters. Sinks are excluded; they have their own boost.
    """
    boosts = np.zeros((spec.kv_heads, spec.n_tokens))
    heavy = rng.random(boosts.shape) < spec.heavy_fraction
    heavy[:, : spec.sink_tokens] = False
    tail = rng.exponential(1.0 / spec.heavy_tail_index, size=int(heavy.sum()))
    boosts[heavy] = spec.heavy_logit_boost + tail
    return boosts


def rank_logits(spec: AttentionModelSpec) -> np.ndarray:
    """The power law's persistent logits by rank (rank 1 first), shape (T - sinks,) float64;
    empty when ``rank_exponent`` is 0 (the law is off).

    Unscaled (``rank_span`` 1), rank i gets ``rank_logit_boost - s ln i``. A zoomed spec
    (``proxy.zoom_spec``) has each of its m non-sink tokens stand for ``rank_span`` real ones:
    synthetic rank j stands for the consecutive real ranks ((j-1) R/m, j R/m] of the R =
    ``rank_span`` m real ones and gets the log of their exact weight sum, less ln(R/m): every
    other token class's mass shrinks by the zoom factor (the sinks' boost drops by its log), so
    the law's does too, and an exact top-k of r m synthetic tokens holds exactly the share of the
    law's mass that the top r R real ones hold (the per-token noise stays one draw per synthetic
    token: the approximation the rest of the zoom makes too, but for the top ranks,
    ``_zoomed_law``, which also folds the heavy hitters into the buckets). A span that is not whole gives some buckets one rank more than their
    neighbours; such a bucket may outweigh the one before it by up to one rank's weight."""
    synthetic = spec.n_tokens - spec.sink_tokens
    if spec.rank_exponent == 0.0 or synthetic == 0:
        return np.zeros(0)
    real = max(synthetic, round(spec.rank_span * synthetic))
    sums = rank_bucket_sums(spec.rank_exponent, synthetic, real)
    return spec.rank_logit_boost + np.log(sums) - math.log(real / synthetic)


_EXACT_RANKS = 1 << 23  # real ranks summed term by term; beyond them, a midpoint integral


@lru_cache(maxsize=16)
def rank_bucket_sums(exponent: float, buckets: int, ranks: int) -> np.ndarray:
    """``sum i^-exponent`` over each of ``buckets`` consecutive runs of the ranks 1..``ranks``,
    run j holding ((j-1) ranks / buckets, j ranks / buckets] (floored), read-only float64.

    Exact (``np.add.reduceat`` over the terms) up to rank ``_EXACT_RANKS``; the ranks of a run
    beyond it are summed as the integral of x^-s from the first - 1/2 to the last + 1/2 (the
    midpoint rule: relative error below 1e-14 there), so a context of a billion tokens costs no
    more than 8M."""
    if not 1 <= buckets <= ranks:
        raise ValueError("need 1 <= buckets <= ranks")
    ends = np.arange(buckets + 1, dtype=np.int64) * ranks // buckets  # run j: (ends[j-1], ends[j]]
    limit = min(ranks, _EXACT_RANKS)
    sums = np.zeros(buckets)
    reached = int(np.searchsorted(ends[:-1], limit, side="left"))  # runs starting below limit
    if reached:  # their ranks up to the limit, term by term
        terms = np.arange(1, limit + 1, dtype=np.float64) ** -exponent
        sums[:reached] = np.add.reduceat(terms, ends[:reached])
    beyond = ends[1:] > limit
    if beyond.any():  # their ranks past it, from max(start, limit) + 1/2 to the last + 1/2
        low = np.maximum(ends[:-1][beyond], limit) + 0.5
        width = ends[1:][beyond] - low + 0.5
        growth = np.log1p(width / low)
        if exponent == 1.0:
            sums[beyond] += growth
        else:  # (low^(1-s) - (low + width)^(1-s)) / (s - 1), without cancellation
            sums[beyond] += low ** (1.0 - exponent) * np.expm1((1.0 - exponent) * growth) \
                / (1.0 - exponent)
    sums.flags.writeable = False
    return sums


#: Synthetic ranks of a zoomed power law whose noise is their bucket's real tokens' (``_ZoomedLaw``).
HEAD_BUCKETS = 16
#: Real non-sink tokens a zoomed power law draws at most (about 1 GB of float64 work arrays).
MAX_ZOOMED_TOKENS = 1 << 25


@dataclass(frozen=True, eq=False)
class _ZoomedLaw:
    """A zoomed power law's persistent part, per KV group (``_zoomed_law``): the persistent logit
    of each synthetic rank (``logits``, (KVH, m), rank 1 first) and whether heavy hitters hold
    most of its bucket's weight (``heavy``, (KVH, m)); for the top ``HEAD_BUCKETS`` ranks, the
    persistent logit of their bucket's noisy real total (``head_persistent``, (KVH, J)), each
    head's deviation from it (``head_drifting``, (H, J)) and the norm of the bucket's weighted
    mean of independent values against one token's (``value_scale``, (KVH, J))."""

    logits: np.ndarray
    heavy: np.ndarray
    head_persistent: np.ndarray
    head_drifting: np.ndarray
    value_scale: np.ndarray


@dataclass(frozen=True, eq=False)
class _Draws:
    boosts: np.ndarray  # heavy-hitter boosts (KVH, T)
    drifting: np.ndarray  # per-token noise (H, T)
    ranks: np.ndarray | None  # 0-based power-law rank per non-sink token (KVH, T - sinks)
    zoomed: _ZoomedLaw | None  # a zoomed power law's buckets


def _logit_draws(spec: AttentionModelSpec, rng: np.random.Generator) -> _Draws:
    """The random parts of the logits in the order the logits' stream draws them: heavy-hitter
    boosts, the drifting noise, and only when the power law is on (so that the streams before
    them do not change) each KV group's permutation of the ranks over its non-sink tokens and,
    for a zoomed spec, the real tokens its synthetic ones stand for (``_zoomed_law``)."""
    boosts = heavy_hitter_boosts(spec, rng)
    drifting = np.repeat(spec.noise_std * rng.standard_normal(boosts.shape),
                         spec.heads_per_group, axis=0)
    drifting += spec.head_noise_std * rng.standard_normal(drifting.shape)
    ranks = zoomed = None
    if spec.rank_exponent > 0.0 and spec.n_tokens > spec.sink_tokens:
        body = spec.n_tokens - spec.sink_tokens
        ranks = np.stack([rng.permutation(body) for _ in range(spec.kv_heads)])
        zoomed = _zoomed_law(spec, rng)
    return _Draws(boosts, drifting, ranks, zoomed)


def _zoomed_law(spec: AttentionModelSpec, rng: np.random.Generator) -> _ZoomedLaw | None:
    """The persistent logits of a zoomed power law's synthetic ranks (None unzoomed, when
    ``rank_span`` is 1), drawn from the real tokens they stand for.

    Each KV group draws its R = ``rank_span`` m real non-sink tokens: rank i's law weight i^-s
    times its heavy-hitter boost (drawn as ``heavy_hitter_boosts`` draws them). Sorted by that
    persistent weight and cut into m buckets of consecutive ones, synthetic rank j gets the log
    of its bucket's weight sum less ln(R/m) (every other class's mass shrinks by the zoom too),
    so an exact top-k of r m synthetic tokens holds exactly the persistent mass of the top r R
    real ones; with no heavy hitters the buckets are consecutive ranks (``rank_logits``).
    Bucketing the ranks alone and giving each synthetic token one heavy-hitter draw made a
    heavy synthetic token stand for f heavy real ones at f consecutive ranks, which no top-k
    finer than a bucket could pick apart from its plain neighbours: at 1M tokens (f = 32) the
    zoom kept 0.008 less than the unscaled context at r 0.01.

    The per-token noise stays one draw per synthetic token, but for the top ``HEAD_BUCKETS``
    ranks: bucket 1 holds about ln(f) / ln N of the law's mass (s = 1) on many real tokens,
    whose noisy total varies little and which any top-k keeps whole; one draw made it vary as
    much as one token's and, the kept share being concave in it, lowered the mean share kept
    by 0.02 at 512k (r 0.01). So those draw their real tokens' noise (the group's, each
    head's) and take the log of the noisy sum as their persistent logit (the group's) and
    drifting one (each head's deviation from it), and their value is scaled to the norm of the
    bucket's weighted mean of independent values."""
    synthetic = spec.n_tokens - spec.sink_tokens
    real = max(synthetic, round(spec.rank_span * synthetic))
    if real == synthetic:
        return None
    if real > MAX_ZOOMED_TOKENS:
        raise ValueError(f"rank_exponent: the power law's zoom draws every real token, so it "
                         f"takes contexts up to {MAX_ZOOMED_TOKENS:,} tokens, got {real:,}")
    ends = np.arange(synthetic + 1, dtype=np.int64) * real // synthetic
    count = min(HEAD_BUCKETS, synthetic)
    group = spec.heads_per_group
    law = -spec.rank_exponent * np.log(np.arange(1, real + 1, dtype=np.float64))
    offset = spec.rank_logit_boost - math.log(real / synthetic)
    logits = np.empty((spec.kv_heads, synthetic))
    heavy_share = np.empty((spec.kv_heads, synthetic))
    head_weights = []
    for g in range(spec.kv_heads):
        heavy = rng.random(real) < spec.heavy_fraction
        weight = law.copy()
        weight[heavy] += spec.heavy_logit_boost + rng.exponential(
            1.0 / spec.heavy_tail_index, size=int(heavy.sum()))
        order = np.argsort(-weight, kind="stable")
        top = weight[order[0]]
        mass = np.exp(weight[order] - top)  # sorted, largest 1
        sums = np.add.reduceat(mass, ends[:-1])
        logits[g] = offset + top + np.log(sums)
        heavy_share[g] = np.add.reduceat(np.where(heavy[order], mass, 0.0), ends[:-1]) / sums
        head_weights.append(mass[: ends[count]] * math.exp(top))
    weights = np.stack(head_weights)  # (KVH, real tokens of the head), persistent weights
    shared = spec.noise_std * rng.standard_normal(weights.shape)
    own = np.repeat(shared, group, axis=0) + spec.head_noise_std * rng.standard_normal(
        (spec.heads, weights.shape[1]))
    starts = ends[:count]

    def log_sums(noise: np.ndarray, w: np.ndarray) -> np.ndarray:
        shift = noise.max(axis=1, keepdims=True)  # sums of exp without overflow
        return np.log(np.add.reduceat(w * np.exp(noise - shift), starts, axis=1)) + shift

    group_total = log_sums(shared, weights)
    head_total = log_sums(own, np.repeat(weights, group, axis=0))
    noisy = weights * np.exp(shared - shared.max(axis=1, keepdims=True))
    scale = np.sqrt(np.add.reduceat(noisy**2, starts, axis=1)) / np.add.reduceat(
        noisy, starts, axis=1)
    return _ZoomedLaw(logits, heavy_share > 0.5, offset + group_total,
                      head_total - np.repeat(group_total, group, axis=0), scale)


def design_logit_parts(spec: AttentionModelSpec,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The designed logits in two parts: ``persistent`` (KVH, T), the structure every query of
    a group sees at every step (sinks, recency, heavy hitters, the power law's ranks), and
    ``drifting`` (H, T), the per-token noise of the group plus each head's deviation, which a
    later step's query sees only as far as its drifting part still points the same way (module
    doc)."""
    persistent, drifting, _, _ = _design(spec, rng)
    return persistent, drifting


def _design(spec: AttentionModelSpec, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``design_logit_parts`` plus, for a zoomed power law, where its top ``HEAD_BUCKETS``
    ranks sit ((KVH, J) token indices) and their values' scale ((KVH, J)); else None, None."""
    draws = _logit_draws(spec, rng)
    structure = structure_logits(spec)
    persistent = structure + draws.boosts
    drifting = draws.drifting
    zoomed, sinks = draws.zoomed, spec.sink_tokens
    if draws.ranks is None:
        return persistent, drifting, None, None
    if zoomed is None:
        persistent[:, sinks:] += rank_logits(spec)[draws.ranks]
        return persistent, drifting, None, None
    # the heavy hitters are in the buckets' weights: the synthetic tokens' own boosts give way
    group = spec.heads_per_group
    count = zoomed.head_persistent.shape[1]
    tokens = sinks + np.argsort(draws.ranks, axis=1)[:, :count]  # where ranks 1..J sit
    for g in range(spec.kv_heads):
        persistent[g, sinks:] = structure[sinks:] + zoomed.logits[g][draws.ranks[g]]
        persistent[g, tokens[g]] = structure[tokens[g]] + zoomed.head_persistent[g]
        rows = slice(g * group, (g + 1) * group)
        drifting[rows, tokens[g]] = zoomed.head_drifting[rows]
    return persistent, drifting, tokens, zoomed.value_scale


def design_logits(spec: AttentionModelSpec, rng: np.random.Generator) -> np.ndarray:
    """The logits every query head must see, shape (H, T) float64: ``design_logit_parts``
    summed. Noise and heavy hitters are drawn per KV group (they are properties of the shared
    keys); each head adds its own small perturbation so heads of a group are similar, not
    identical."""
    persistent, drifting = design_logit_parts(spec, rng)
    return np.repeat(persistent, spec.heads_per_group, axis=0) + drifting


def persistent_energy_share(spec: AttentionModelSpec, persistent: np.ndarray) -> float:
    """Share of a query's squared norm in its persistent part: the persistent logits' second
    moment ``m`` over the drifting ones' variance plus ``m``, so that a key's component along
    the persistent direction spreads as much as along any other (keys stay isotropic but for
    their sinks and heavy hitters). ``m`` is the heavy hitters' expected second moment per
    token, ``f E[(b + X)^2]`` with X exponential of mean 1 / index, a property of the host
    tokens that does not change with the context's length (sinks and recency, a few hundred
    tokens, would); a spec without heavy hitters takes ``persistent``'s over its tokens.
    With the power law on, every non-sink token carries a rank logit r as well (``rank_logits``,
    drawn independently of the heavy hitters), and ``m`` adds the variance of r, taken exactly
    over its logits, not its second moment: r's mean (``rank_logit_boost`` less about s ln N) is
    a shift of every token's logit alike, which the softmax ignores, and counted in ``m`` it
    pushed the share to its cap as the context grew (a lag-1 query cosine of 0.99 at 1M tokens,
    above the 0.90-0.975 measured, docs/model.md). The heavy hitters' second moment is their
    variance to within their squared mean, ``(f E[b + X])^2``, 2% of it at the defaults.
    Capped at ``_MAX_PERSISTENT_SHARE`` so that the drifting directions keep a usable norm
    when the spec has no noise."""
    boost, mean = spec.heavy_logit_boost, 1.0 / spec.heavy_tail_index
    moment = spec.heavy_fraction * (boost**2 + 2.0 * boost * mean + 2.0 * mean**2)
    ranked = rank_logits(spec)
    if ranked.size:
        moment += float(np.var(ranked))
    if moment == 0.0:
        moment = float(np.mean(np.square(persistent)))
    if moment == 0.0:
        return 0.0
    drift_var = spec.noise_std**2 + spec.head_noise_std**2
    return min(moment / (moment + drift_var), _MAX_PERSISTENT_SHARE)


def realise_keys(queries: np.ndarray, logits: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Keys (T, D) float32 with ``queries @ keys.T / sqrt(D) == logits`` for one KV group.

    queries: (G, D) float64, linearly independent; logits: (G, T); noise: (T, D) float32,
    turned into the keys in place. The noise is projected off span(queries) and the unique
    component inside the span that yields the logits is added:
    k_j = n_j - P n_j + Q^T (Q Q^T)^-1 sqrt(D) l_j. Works chunk by chunk with ``einsum`` (see
    ``_TOKEN_CHUNK``).
    """
    head_dim = queries.shape[1]
    inverse_gram = np.linalg.inv(queries @ queries.T)
    directions = queries.astype(np.float32)
    target = math.sqrt(head_dim) * logits.T  # (T, G)
    for start in range(0, noise.shape[0], _TOKEN_CHUNK):
        block = noise[start : start + _TOKEN_CHUNK]
        along = np.einsum("td,gd->tg", block, directions)  # noise seen by each query
        residual = target[start : start + _TOKEN_CHUNK] - along
        coefficients = np.einsum("tg,gh->th", residual, inverse_gram).astype(np.float32)
        block += np.einsum("tg,gd->td", coefficients, directions)
    return noise


def _fill_noise(seed: np.random.SeedSequence, out: np.ndarray, scale: float) -> np.ndarray:
    """Fill C-contiguous float32 ``out`` with zero-mean iid noise of standard deviation ``scale``.

    Symmetric uniform rather than Gaussian: raw 32-bit integers from SFC64, scaled in one pass,
    are several times cheaper than Gaussian sampling, and only projections of these vectors on
    query directions matter, which are Gaussian to excellent accuracy (sums over ``head_dim``
    independent terms). Generated in cache-sized chunks to avoid large temporaries.
    """
    bits = np.random.SFC64(seed)
    flat = out.reshape(-1)
    factor = np.float32(scale * _UNIFORM_HALF_WIDTH * 2.0**-31)
    for start in range(0, flat.size, _NOISE_CHUNK):
        stop = min(start + _NOISE_CHUNK, flat.size)
        raw = bits.random_raw((stop - start + 1) // 2).view(np.int32)[: stop - start]
        np.multiply(raw, factor, out=flat[start:stop], dtype=np.float32, casting="unsafe")
    return out


def synthesize_case(spec: AttentionModelSpec) -> SyntheticAttention:
    """Build (q, K, V) whose logits follow ``spec`` exactly; deterministic in ``spec.seed``.

    Each query is a persistent part (one direction per KV group) plus a drifting part (one per
    head, ``group_queries``); the keys are solved so that the persistent part sees the
    persistent logits and the drifting part the drifting ones (``design_logit_parts``). The
    keys' isotropic noise is scaled so that a drifting part turned away from the designed one
    sees fresh noise of the designed variance. Independent random streams (logits, queries,
    one per KV group for keys and values, shared and persistent queries) are spawned from the
    seed, so results do not depend on evaluation order.
    """
    seeds = _case_seeds(spec)
    persistent, drifting, head_tokens, value_scale = _design(spec,
                                                             np.random.default_rng(seeds[0]))
    group = spec.heads_per_group
    logits = np.repeat(persistent, group, axis=0) + drifting
    share = persistent_energy_share(spec, persistent)
    persistent_q = math.sqrt(share) * np.random.default_rng(seeds[3 + 2 * spec.kv_heads]).standard_normal(
        (spec.kv_heads, spec.head_dim))
    drifting_q = group_queries(spec, seeds[1], seeds[2 + 2 * spec.kv_heads])
    if share > 0.0:  # orthogonal to the group's persistent direction, so turning one leaves the other
        unit = np.repeat(persistent_q / np.linalg.norm(persistent_q, axis=1, keepdims=True),
                         group, axis=0)
        drifting_q -= np.sum(drifting_q * unit, axis=1, keepdims=True) * unit
    drifting_q *= math.sqrt(1.0 - share)
    key_noise_std = math.sqrt((spec.noise_std**2 + spec.head_noise_std**2) / (1.0 - share))
    k = np.empty((1, spec.kv_heads, spec.n_tokens, spec.head_dim), dtype=np.float32)
    v = np.empty_like(k)
    for g in range(spec.kv_heads):
        rows = slice(g * group, (g + 1) * group)
        directions, targets = drifting_q[rows], drifting[rows]
        if share > 0.0:
            directions = np.vstack([persistent_q[g : g + 1], directions])
            targets = np.vstack([persistent[g : g + 1], targets])
        _fill_noise(seeds[2 + g], k[0, g], key_noise_std)
        realise_keys(directions, targets, k[0, g])
        _fill_noise(seeds[2 + spec.kv_heads + g], v[0, g], 1.0)
        if head_tokens is not None:  # a bucket's weighted mean of independent values
            v[0, g, head_tokens[g]] *= value_scale[g, :, None].astype(np.float32)
    persistent_heads = np.repeat(persistent_q, group, axis=0)
    q = (persistent_heads + drifting_q).astype(np.float32)[None]
    return SyntheticAttention(spec=spec, q=q, k=k, v=v, logits=logits,
                              persistent_q=persistent_heads.astype(np.float32)[None],
                              persistent_share=share)


def _case_seeds(spec: AttentionModelSpec) -> list[np.random.SeedSequence]:
    """The case's independent streams: logits, queries, K and V per KV group, shared queries,
    persistent queries (children of one ``SeedSequence`` by index, so adding one at the end
    changes none of the others)."""
    return np.random.SeedSequence(spec.seed).spawn(4 + 2 * spec.kv_heads)


def case_logits(spec: AttentionModelSpec) -> np.ndarray:
    """The designed logits (H, T) of ``synthesize_case(spec)`` without building its tensors:
    the same stream, so the same numbers (the case's float32 tensors reproduce them to
    rounding)."""
    return design_logits(spec, np.random.default_rng(_case_seeds(spec)[0]))


def case_ranks(spec: AttentionModelSpec) -> np.ndarray:
    """Each token's rank under the power law in ``case_logits(spec)``, (KVH, T) int64: 1 for
    the most relevant non-sink token, 0 for the sinks and for every token when the law is off
    (the permutation is the last draw of the logits' stream, so redrawing gives the same)."""
    ranks = np.zeros((spec.kv_heads, spec.n_tokens), dtype=np.int64)
    drawn = _logit_draws(spec, np.random.default_rng(_case_seeds(spec)[0])).ranks
    if drawn is not None:
        ranks[:, spec.sink_tokens:] = drawn + 1
    return ranks


def case_heavy_hitters(spec: AttentionModelSpec) -> np.ndarray:
    """Which tokens are heavy hitters in ``case_logits(spec)``, (KVH, T) bool: the boosts are
    the first draw of the logits' stream, so redrawing them gives the same tokens (in a zoomed
    power law, whose buckets hold real heavy hitters, the tokens whose bucket's weight is
    mostly theirs: ``_zoomed_law``)."""
    rng = np.random.default_rng(_case_seeds(spec)[0])
    if spec.rank_exponent == 0.0:
        return heavy_hitter_boosts(spec, rng) > 0
    draws = _logit_draws(spec, rng)
    if draws.zoomed is None:
        return draws.boosts > 0
    heavy = np.zeros_like(draws.boosts, dtype=bool)
    for g in range(spec.kv_heads):
        heavy[g, spec.sink_tokens:] = draws.zoomed.heavy[g][draws.ranks[g]]
    return heavy


def group_query_correlation(spec: AttentionModelSpec) -> float:
    """The correlation ``group_queries`` gives two heads of a group: ``query_correlation``
    capped at ``_MAX_QUERY_CORRELATION`` (1 for one head per group: nothing to mix)."""
    if spec.heads_per_group == 1:
        return 1.0
    return min(spec.query_correlation, _MAX_QUERY_CORRELATION)


def group_queries(spec: AttentionModelSpec, own: np.random.SeedSequence,
                  shared: np.random.SeedSequence) -> np.ndarray:
    """Queries (H, D) float64: per KV group a shared component plus a head-specific one, mixed
    so that two heads of a group have correlation ``spec.query_correlation`` (module doc),
    capped at ``_MAX_QUERY_CORRELATION`` so that the group's Gram system stays well conditioned
    (identical heads, ``head_noise_std = 0``, still get distinct queries). One head per group
    (MHA) keeps its own query unmixed."""
    queries = np.random.default_rng(own).standard_normal((spec.heads, spec.head_dim))
    if spec.heads_per_group == 1:
        return queries
    rho = group_query_correlation(spec)
    common = np.random.default_rng(shared).standard_normal((spec.kv_heads, spec.head_dim))
    common = np.repeat(common, spec.heads_per_group, axis=0)
    return math.sqrt(rho) * common + math.sqrt(1.0 - rho) * queries


def synthesize(spec: AttentionModelSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q (1, H, D), K (1, KVH, T, D), V (1, KVH, T, D)), float32, following ``spec``."""
    return synthesize_case(spec).qkv


def next_query(
    q: np.ndarray, similarity: float,
    seed: int | Sequence[int] | np.random.Generator | None = None,
    keep_off: np.ndarray | None = None,
) -> np.ndarray:
    """A query of the same norm with cosine similarity exactly ``similarity`` to ``q``.

    Models the similarity of consecutive layers' attention inputs (InfiniGen's speculation,
    HybridGen's lookahead) or of successive decode steps (H2O's history): the new query is
    ``|q| (s q_hat + sqrt(1 - s^2) u)`` with ``u`` a random unit vector orthogonal to ``q``
    and, if given, to ``keep_off`` (same shape: a drifting part turned away from itself must
    not pick up the persistent direction, along which the keys carry the structure).
    Works on any leading shape; the last axis is the head dimension.
    """
    if not -1.0 <= similarity <= 1.0:
        raise ValueError("similarity must lie in [-1, 1]")
    rng = query_rng(seed)
    base = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(base, axis=-1, keepdims=True)
    direction = base / np.where(norm > 0, norm, 1.0)
    avoid = [direction]
    if keep_off is not None:
        extra = np.asarray(keep_off, dtype=np.float64)
        extra = extra - np.sum(extra * direction, axis=-1, keepdims=True) * direction
        extra_norm = np.linalg.norm(extra, axis=-1, keepdims=True)
        avoid.append(extra / np.where(extra_norm > 0, extra_norm, 1.0))
    other = _orthogonal_unit(avoid, rng)
    mixed = similarity * direction + math.sqrt(1.0 - similarity**2) * other
    return (norm * mixed).astype(np.asarray(q).dtype, copy=False)


def query_rng(seed: int | Sequence[int] | np.random.Generator | None) -> np.random.Generator:
    """The generator ``next_query`` uses for ``seed``: a generator is used as is; an integer
    (or a flat sequence of them, e.g. ``[run, layer, step]``) gets its own stream, so a caller
    that drew ``q`` from the same integer does not get noise parallel to ``q``; ``None`` draws
    fresh entropy. The entropy is flattened here because numpy before 2.3 rejects nested
    sequences in ``SeedSequence``."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng(None)
    words = [int(w) for w in np.atleast_1d(np.asarray(seed, dtype=object)).ravel()]
    return np.random.default_rng([_QUERY_STREAM, *words])


def _orthogonal_unit(directions: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors orthogonal to the orthonormal (or zero) rows of each of
    ``directions``."""
    other = rng.standard_normal(directions[0].shape)
    for direction in directions:
        other -= np.sum(other * direction, axis=-1, keepdims=True) * direction
    norm = np.linalg.norm(other, axis=-1, keepdims=True)
    if np.any(norm < 1e-6):  # a draw (almost) inside the span: vanishingly rare, redraw
        return _orthogonal_unit(directions, rng)
    return other / norm

"""Which tokens each policy attends: boolean masks (H, T) from a plan's selector.

Token layout follows ``hgsim.plan``: the ``sink_tokens`` oldest and ``gpu_recent_tokens`` newest
tokens are GPU-resident and always attended; the host range between them is where selectors
differ, each keeping at most ``host_selected`` tokens per head:

* ``ALL``: every host token (exact attention).
* ``EXACT_TOPK``: per-head top-k of the true logits (HybridGen's CPU logits, HGCA).
* ``SPECULATIVE_TOPK``: top-k of approximate logits (InfiniGen), from a speculated query with
  cosine similarity ``speculation_similarity`` to the true one (InfiniGen feeds the previous
  layer's attention input through this layer's query projection; consecutive inputs are highly
  similar) and optionally only the ``speculation_dim_fraction`` largest-magnitude query dims
  (InfiniGen's partial, skewed key columns). Fetched rows are then attended with exact logits.
* ``HEAVY_HITTER``: H2O. Tokens are ranked by attention accumulated over past queries and
  evicted for good. With a fixed host range, H2O's kept set is the top-k of the attention it
  had accumulated when it evicted, ``decision_lag`` steps ago, from ``history_queries`` past
  queries; later steps only re-rank tokens already kept, so a token evicted then cannot return
  even if the current query would favour it. Past queries keep the current one's persistent
  part (it sees the sinks and heavy hitters, ``synthetic``'s module doc) and have its drifting
  part turned to a cosine that decays with their lag towards a floor (``history_similarities``,
  ``query_history``). They see the same keys (the positional recency of their own step is not
  re-modelled; the recent window is GPU-resident anyway).
* ``DROPPED``: no host token.

Under grouped-query attention HybridGen's ``EXACT_TOPK`` may select per KV group
(``plan.GroupSelect``, the window's ``selection``): ``GROUP_UNION`` gives every head of a group
the union of the group's per-head top-k sets, ``GROUP_SHARED`` the top-k of the group's logits
aggregated by max or sum (``group_score``). ``group_topk_mask`` builds both; a window without
these fields (or with one head per group) selects per head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hgsim.accuracy._arrays import heads_and_keys
from hgsim.accuracy.overrides import FieldRule, OverrideGroup
from hgsim.accuracy.synthetic import next_query, query_rng
from hgsim.plan import GroupScore, GroupSelect, Selector


@runtime_checkable
class TokenWindow(Protocol):
    """The part of a ``LayerPlan`` that decides attended tokens (``LayerPlan`` satisfies it)."""

    @property
    def sink_tokens(self) -> int: ...

    @property
    def gpu_recent_tokens(self) -> int: ...

    @property
    def host_selected(self) -> int: ...

    @property
    def selector(self) -> Selector: ...


@dataclass(frozen=True, slots=True)
class Window:
    """A stand-alone ``TokenWindow`` for when no full ``LayerPlan`` is at hand."""

    sink_tokens: int
    gpu_recent_tokens: int
    host_selected: int
    selector: Selector
    selection: GroupSelect = GroupSelect.PER_HEAD  # EXACT_TOPK under GQA (``GroupSelect``)
    group_score: GroupScore = GroupScore.MAX


def window_selection(window: TokenWindow) -> tuple[GroupSelect, GroupScore]:
    """A window's GQA selection mode and aggregate (per head for windows without them)."""
    return (GroupSelect(getattr(window, "selection", GroupSelect.PER_HEAD)),
            GroupScore(getattr(window, "group_score", GroupScore.MAX)))


@dataclass(frozen=True, slots=True)
class SelectionModel:
    """Parameters of the approximate selectors (speculation and H2O's history).

    Defaults put the overlap of the selected host tokens with the exact per-head top-k (at 2,
    5 and 10% of the host range, default attention spec) at 0.78 / 0.72 / 0.71 for InfiniGen's
    speculation and 0.81 / 0.64 / 0.62 for H2O's history. H2O keeps the persistent heavy
    hitters (2% of the tokens) whatever its lag, so it leads where they fill the top-k; beyond
    them speculation from the next layer's input tracks the current query better than
    attention accumulated long ago, the ordering reported for these methods.
    """

    speculation_similarity: float = 0.9  # cosine of the speculated query to the true one
    speculation_dim_fraction: float = 1.0  # share of query dims used (InfiniGen's partial keys)
    history_queries: int = 8  # past queries whose attention H2O accumulated ...
    decision_lag: int = 8  # ... before its eviction decision this many steps ago (>= 1);
    history_similarity_floor: float = 0.3  # cosine of a past query's drifting part to the
    history_decay: float = 0.9  # current one's: floor + (1 - floor) * decay**lag

    def __post_init__(self) -> None:
        SELECTION.check(self)


#: The group a study's ``fidelity.selection`` (the API's ``selection``, the CLI's
#: ``--selection``) sets: every field of ``SelectionModel``.
SELECTION = OverrideGroup("selection", SelectionModel, {
    "speculation_similarity": FieldRule(-1.0, 1.0),
    "speculation_dim_fraction": FieldRule(0.0, 1.0, low_open=True),
    # Each of history_queries past queries is drawn and scored against every token (~0.25 MB
    # each: 4,096 take about 1 GB, a million would not fit); a decision_lag beyond 16M steps
    # is past any decode, and past 2**63 it no longer converts to NumPy's integers.
    "history_queries": FieldRule(1, 4096, whole=True),
    "decision_lag": FieldRule(1, 2**24, whole=True),
    "history_similarity_floor": FieldRule(0.0, 1.0),
    "history_decay": FieldRule(0.0, 1.0),
}, example="{'history_decay': 0.95}")


def selection_model(overrides: Mapping[str, Any] | None) -> SelectionModel | None:
    """``SelectionModel`` with ``overrides`` (field -> value) replacing its defaults; None when
    none is given (the defaults). Raises ``overrides.FieldError`` naming the first unknown
    field or bad value: whole numbers from 1 to their bound for ``history_queries`` and
    ``decision_lag``, numbers in the ranges ``SELECTION`` gives for the others (never booleans
    or text)."""
    return SELECTION.build(overrides)


def host_range(n_tokens: int, window: TokenWindow) -> tuple[int, int]:
    """[start, end) of host-resident positions in a context of ``n_tokens``."""
    start, end = window.sink_tokens, n_tokens - window.gpu_recent_tokens
    if start > end:
        raise ValueError("sink and recent tokens exceed the context")
    if not 0 <= window.host_selected <= end - start:
        raise ValueError("host_selected must lie in [0, host tokens]")
    return start, end


def resident_mask(heads: int, n_tokens: int, window: TokenWindow) -> np.ndarray:
    """GPU-resident tokens (sinks and the recent window), always attended, shape (H, T)."""
    start, end = host_range(n_tokens, window)
    mask = np.ones((heads, n_tokens), dtype=bool)
    mask[:, start:end] = False
    return mask


def topk_mask(scores: np.ndarray, window: TokenWindow) -> np.ndarray:
    """Resident tokens plus the per-head ``host_selected`` highest ``scores`` (H, T) on the host."""
    heads, n_tokens = scores.shape
    start, end = host_range(n_tokens, window)
    mask = resident_mask(heads, n_tokens, window)
    mask[:, start:end] = top_per_row(scores[:, start:end], window.host_selected)
    return mask


def group_topk_mask(scores: np.ndarray, window: TokenWindow, group: int) -> np.ndarray:
    """Resident tokens plus the host tokens each head attends when HybridGen selects per KV
    group of ``group`` consecutive heads (``window_selection``), shape (H, T):

    * ``GROUP_UNION``: the union of the group's per-head top-``host_selected`` sets, for every
      head of the group (a superset of each head's own top-k);
    * ``GROUP_SHARED``: the top-``host_selected`` of the group's scores aggregated by max or
      sum, for every head of the group;
    * ``PER_HEAD`` (or ``group`` 1): ``topk_mask``.
    """
    mode, score = window_selection(window)
    heads, n_tokens = scores.shape
    if mode is GroupSelect.PER_HEAD or group <= 1:
        return topk_mask(scores, window)
    if heads % group:
        raise ValueError(f"{heads} heads do not form groups of {group}")
    start, end = host_range(n_tokens, window)
    host = scores[:, start:end].reshape(heads // group, group, end - start)
    if mode is GroupSelect.GROUP_UNION:
        chosen = top_per_row(host.reshape(heads, -1), window.host_selected)
        chosen = chosen.reshape(host.shape).any(axis=1)
    else:
        aggregate = host.max(axis=1) if score is GroupScore.MAX else host.sum(axis=1)
        chosen = top_per_row(aggregate, window.host_selected)
    mask = resident_mask(heads, n_tokens, window)
    mask[:, start:end] = np.repeat(chosen, group, axis=0)
    return mask


def top_per_row(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly ``k`` largest entries per row (ties broken arbitrarily)."""
    chosen = np.zeros(scores.shape, dtype=bool)
    width = scores.shape[1]
    if k >= width:
        chosen[:] = True
    elif k > 0:
        index = np.argpartition(scores, width - k, axis=1)[:, width - k :]
        np.put_along_axis(chosen, index, True, axis=1)
    return chosen


def speculative_logits(
    q: np.ndarray,
    k: np.ndarray,
    similarity: float,
    dim_fraction: float = 1.0,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Approximate logits (H, T) from a speculated query and optionally partial dims.

    q: (H, D); K: (KVH, T, D). With ``dim_fraction < 1`` each head keeps only its
    ``ceil(fraction * D)`` largest-magnitude speculated-query dims, as InfiniGen does.
    """
    guess = next_query(np.asarray(q, np.float64), similarity, seed)
    if dim_fraction < 1.0:
        keep = math.ceil(dim_fraction * guess.shape[-1])
        guess = np.where(top_per_row(np.abs(guess), keep), guess, 0.0)
    return _logits32(guess, k)


def _logits32(queries: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``queries @ K^T / sqrt(D)`` in float32 (ranking only), queries (..., H, D) -> (..., H, T).

    All leading query sets of a KV group go through one product; ``einsum`` rather than BLAS,
    whose worker threads only slow these memory-bound products down on a busy machine.
    """
    *lead, heads, head_dim = queries.shape
    group = heads // k.shape[0]
    scaled = (queries / math.sqrt(head_dim)).astype(np.float32)
    out = np.empty((*lead, heads, k.shape[1]), dtype=np.float32)
    for g in range(k.shape[0]):
        rows = slice(g * group, (g + 1) * group)
        stacked = scaled[..., rows, :].reshape(-1, head_dim)
        product = np.einsum("md,td->mt", stacked, k[g].astype(np.float32, copy=False))
        out[..., rows, :] = product.reshape(*lead, group, k.shape[1])
    return out


def history_similarities(model: SelectionModel) -> np.ndarray:
    """Cosine of the drifting part of each past query H2O accumulated to the current one's,
    oldest first.

    At lag L: ``floor + (1 - floor) * decay**L`` for L from ``decision_lag`` to
    ``decision_lag + history_queries - 1``. The floor is the part of a head's token-specific
    preference that outlasts any lag (beyond the heavy hitters, which the persistent part
    keeps); neither number has a published source (docs/model.md).
    """
    lags = model.decision_lag + np.arange(model.history_queries)[::-1]
    return lag_similarity(model, lags)


def lag_similarity(model: SelectionModel, lags):
    """Expected cosine of the drifting parts of one head's queries ``lags`` decode steps apart:
    ``floor + (1 - floor) * decay**lag`` (1 at lag 0), the history H2O accumulates over and
    what ``hw_backend.designed_kv.QueryDrift`` makes validation's queries follow."""
    floor = model.history_similarity_floor
    return floor + (1.0 - floor) * model.history_decay ** np.asarray(lags, dtype=np.float64)


def query_history(
    q: np.ndarray, similarities: np.ndarray, seed: int | np.random.Generator | None,
    persistent: np.ndarray | None = None,
) -> np.ndarray:
    """Past queries (M, H, D), one per similarity, each drawn independently around ``q``.

    With ``persistent`` (the part of ``q`` every step shares, ``SyntheticAttention.persistent_q``)
    only the rest drifts: a past query is ``persistent + next_query(q - persistent, s)``, so it
    sees the persistent logits at full strength. Without it the whole query drifts (tensors whose
    split is not known)."""
    rng = query_rng(seed)
    base = np.asarray(q, np.float64)
    fixed = np.zeros_like(base) if persistent is None else np.asarray(persistent, np.float64)
    keep_off = None if persistent is None else fixed
    return np.stack([fixed + next_query(base - fixed, float(s), rng, keep_off)
                     for s in similarities])


def heavy_hitter_mask(
    q: np.ndarray,
    k: np.ndarray,
    window: TokenWindow,
    model: SelectionModel,
    seed: int | np.random.Generator | None = None,
    persistent: np.ndarray | None = None,
) -> np.ndarray:
    """H2O's kept tokens (H, T): top-k of attention accumulated before an eviction decision.

    The accumulated queries lie ``decision_lag`` steps back and beyond (``history_similarities``,
    the cosine of their drifting parts to the current one's; ``query_history``); queries since
    the decision, the current one included, cannot bring an evicted token back.
    """
    heads, n_tokens = q.shape[0], k.shape[1]
    if window.host_selected == 0:
        return resident_mask(heads, n_tokens, window)
    history = query_history(q, history_similarities(model), seed, persistent)
    logits = _logits32(history, k).astype(np.float64)  # (M, H, T)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    accumulated = (weights / weights.sum(axis=-1, keepdims=True)).sum(axis=0)
    return topk_mask(accumulated, window)


def selection_mask(
    q: np.ndarray,
    k: np.ndarray,
    window: TokenWindow,
    model: SelectionModel | None = None,
    *,
    seed: int | np.random.Generator | None = 0,
    logits: np.ndarray | None = None,
    persistent: np.ndarray | None = None,
) -> np.ndarray:
    """Attended tokens (H, T) of one batch element under ``window.selector``.

    q: (H, D) or (1, H, D); K: (KVH, T, D) or (1, KVH, T, D); numpy or torch. ``logits``
    (exact, (H, T)) may be passed to avoid recomputing them for ``EXACT_TOPK``; ``persistent``
    (the part of q every decode step shares, like q) keeps H2O's past queries on it
    (``query_history``). A window whose
    ``host_selected`` covers the whole host range is exact whatever its selector, except
    ``DROPPED``.
    """
    model = model or SelectionModel()
    q, k = heads_and_keys(q, k)
    heads, n_tokens = q.shape[0], k.shape[1]
    start, end = host_range(n_tokens, window)
    selector = Selector(window.selector)
    if selector is Selector.DROPPED:
        return resident_mask(heads, n_tokens, window)
    if selector is Selector.ALL or window.host_selected == end - start:
        return np.ones((heads, n_tokens), dtype=bool)
    if selector is Selector.EXACT_TOPK:
        if logits is None:
            logits = _logits32(q, k)
        return group_topk_mask(logits, window, heads // k.shape[0])
    if selector is Selector.SPECULATIVE_TOPK:
        similarity, dims = model.speculation_similarity, model.speculation_dim_fraction
        return topk_mask(speculative_logits(q, k, similarity, dims, seed), window)
    if selector is Selector.HEAVY_HITTER:
        if persistent is not None:
            persistent = np.asarray(persistent, np.float64).reshape(q.shape)
        return heavy_hitter_mask(q, k, window, model, seed, persistent)
    raise ValueError(f"unknown selector {selector!r}")

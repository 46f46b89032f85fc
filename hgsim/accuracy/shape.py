"""Where the synthetic attention puts its softmax mass, in the terms measurements use.

``AttentionModelSpec``'s fields are logit boosts and noise scales; what is measured on real
models is where the mass goes: the first tokens' share (attention sinks), the newest tokens',
how much a per-head top-k of the rest keeps, how far the heads of a GQA group agree.
``attention_shares`` computes those from the very logits the accuracy proxy scores on, at any
context (beyond the proxy's 32k tokens through the same zoom that keeps each token class's
expected share), so a user who sets the shape (``fidelity.attention``) can check it against a
measured figure first (``hgsim attention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hgsim.accuracy.fidelity import attention_logits, softmax
from hgsim.accuracy.proxy import DEFAULT_MAX_TOKENS, DEFAULT_SPEC, group_spec, zoom_spec
from hgsim.accuracy.selection import (
    SelectionModel,
    lag_similarity,
    query_history,
    top_per_row,
)
from hgsim.accuracy.synthetic import (
    AttentionModelSpec,
    case_heavy_hitters,
    case_logits,
    case_ranks,
    synthesize_case,
)

#: Top-k ratios (of the tokens between the sinks and the newest ones) reported by default.
DEFAULT_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2)
#: Share of the power law's ranks whose mass ``AttentionShares.ranked`` reports.
RANKED_SHARE = 0.02


@dataclass(frozen=True)
class AttentionShares:
    """Mean over query heads of the softmax mass on each class of token at ``context`` tokens.

    ``sinks + recent + heavy + other == 1``; ``heavy`` counts only the heavy hitters between
    the sinks and the newest ``recent_tokens`` (those they overlap are counted there).
    ``topk_kept[r]`` is the mass a head keeps attending the sinks, the newest tokens and its
    own top-r of the tokens between them (HybridGen's exact per-head top-k with that window);
    ``union_per_k[r]`` the rows of a KV group's union of per-head top-k sets per k selected
    (1 for one head per group). ``ranked`` is the mass on the tokens between them whose
    power-law rank (``AttentionModelSpec.rank_exponent``) is in the top ``RANKED_SHARE`` of
    all ranks, heavy hitters among them included (0 with the law off; beyond the proxy's 32k
    tokens the zoom ranks its tokens by their real tokens' weight under the law and the heavy
    hitters together, so there it is the top 2% by that weight)."""

    context: int
    heads_per_group: int
    sink_tokens: int
    recent_tokens: int
    sinks: float
    recent: float
    heavy: float
    other: float
    topk_kept: dict[float, float]
    union_per_k: dict[float, float]
    ranked: float = 0.0


def attention_shares(spec: AttentionModelSpec | None = None, *, context: int = 32768,
                     heads_per_group: int = 1, recent_tokens: int = 1024,
                     ratios: tuple[float, ...] = DEFAULT_RATIOS) -> AttentionShares:
    """The mass shares of ``spec`` (None: the defaults) over ``context`` tokens with
    ``heads_per_group`` query heads per KV head (class doc)."""
    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    if recent_tokens < 0:
        raise ValueError("recent_tokens must be >= 0")
    if any(not 0 < r <= 1 for r in ratios):
        raise ValueError("ratios must lie in (0, 1]")
    base = spec or DEFAULT_SPEC
    scaled, factor = _scaled(group_spec(heads_per_group, base), context)
    n = scaled.n_tokens
    sinks = scaled.sink_tokens
    recent = min(n - sinks, round(min(recent_tokens, context) * factor))
    probs = softmax(case_logits(scaled))  # (H, T): the proxy's own logits
    heavy_tokens = np.repeat(case_heavy_hitters(scaled), scaled.heads_per_group, axis=0)
    middle = slice(sinks, n - recent)
    sink_mass = float(probs[:, :sinks].sum(axis=1).mean())
    recent_mass = float(probs[:, n - recent:].sum(axis=1).mean()) if recent else 0.0
    between = probs[:, middle]
    heavy_mass = float(np.where(heavy_tokens[:, middle], between, 0.0).sum(axis=1).mean())
    ranked_mass = 0.0
    if scaled.rank_exponent > 0.0 and n > sinks:
        top = max(1, round(RANKED_SHARE * (n - sinks)))
        ranks = np.repeat(case_ranks(scaled), scaled.heads_per_group, axis=0)[:, middle]
        ranked_mass = float(np.where((ranks >= 1) & (ranks <= top), between, 0.0)
                            .sum(axis=1).mean())
    ranked = -np.sort(-between, axis=1)
    cumulative = np.cumsum(ranked, axis=1)
    kept, union = {}, {}
    for r in ratios:
        k = min(max(1, round(r * between.shape[1])), between.shape[1]) if between.shape[1] else 0
        top = float(cumulative[:, k - 1].mean()) if k else 0.0
        kept[r] = sink_mass + recent_mass + top
        union[r] = _union_per_k(base, heads_per_group, r)
    return AttentionShares(
        context=context, heads_per_group=heads_per_group, sink_tokens=sinks,
        recent_tokens=min(recent_tokens, context - sinks), sinks=sink_mass, recent=recent_mass,
        heavy=heavy_mass, other=max(0.0, 1.0 - sink_mass - recent_mass - heavy_mass),
        topk_kept=kept, union_per_k=union, ranked=ranked_mass)


@dataclass(frozen=True)
class LagOverlap:
    """How far a head's selection moves in ``lag`` decode steps under the selection model's
    drift (``selection.lag_similarity``): ``query_cosine`` is the expected cosine of a query to
    the one ``lag`` steps before it (its persistent part kept, its drifting part turned),
    ``overlap`` the mean over heads of ``|top-k then & top-k now| / k`` over the tokens
    between the sinks and the newest ones (what a selection cache reusing an old top-k keeps,
    and what H2O's history rests on)."""

    lag: int
    query_cosine: float
    overlap: float


def step_overlaps(spec: AttentionModelSpec | None = None, selection: SelectionModel | None = None,
                  *, lags: tuple[int, ...] = (1, 4, 16), ratio: float = 0.05,
                  context: int = 16384, heads_per_group: int = 1,
                  recent_tokens: int = 1024) -> list[LagOverlap]:
    """``LagOverlap`` at each lag for ``spec``'s attention (None: the defaults) and
    ``selection``'s drift (None: the defaults), the top-k a ``ratio`` of the tokens between
    the sinks and the newest ``recent_tokens``, over ``context`` tokens (at most the proxy's
    32k; a longer context is scored on 32k standing for it, as ``attention_shares``)."""
    if any(lag < 0 for lag in lags):
        raise ValueError("lags must be >= 0")
    if not 0 < ratio <= 1:
        raise ValueError("ratio must lie in (0, 1]")
    selection = selection or SelectionModel()
    scaled, factor = _scaled(group_spec(heads_per_group, spec or DEFAULT_SPEC), context)
    case = synthesize_case(scaled)
    n = scaled.n_tokens
    recent = min(n - scaled.sink_tokens - 1, round(min(recent_tokens, context) * factor))
    middle = slice(scaled.sink_tokens, n - recent)
    share = case.persistent_share

    def cosine_at(lag: int) -> float:
        return share + (1.0 - share) * float(lag_similarity(selection, lag))

    between = max(0, min(n, middle.stop) - middle.start)
    if between == 0:  # nothing between the sinks and the newest tokens: nothing ever moves
        return [LagOverlap(lag, cosine_at(lag), 1.0) for lag in lags]
    k = min(max(1, round(ratio * between)), between)
    first = top_per_row(case.logits[:, middle], k)
    out = []
    for lag in lags:
        drift = np.array([lag_similarity(selection, lag)])
        past = query_history(case.q[0], drift, np.random.default_rng([lag, 0x1A6]),
                             case.persistent_q[0])[0]
        # the lagged query's logits against the group's keys, without a copy of K per head
        later = top_per_row(attention_logits(past, case.k[0])[:, middle], k)
        out.append(LagOverlap(lag, cosine_at(lag),
                              float((later & first).sum() / (later.shape[0] * k))))
    return out


def _scaled(spec: AttentionModelSpec, context: int) -> tuple[AttentionModelSpec, float]:
    """``spec`` over ``context`` tokens, or over the proxy's 32k standing for a longer one."""
    if context <= DEFAULT_MAX_TOKENS:
        return spec.with_tokens(context), 1.0
    return zoom_spec(spec, context, DEFAULT_MAX_TOKENS), DEFAULT_MAX_TOKENS / context


def _union_per_k(spec: AttentionModelSpec, heads_per_group: int, ratio: float) -> float:
    if heads_per_group == 1:
        return 1.0
    from hgsim.accuracy.groups import union_curve

    return union_curve(heads_per_group, spec).fraction(ratio)


__all__ = ["DEFAULT_RATIOS", "RANKED_SHARE", "AttentionShares", "LagOverlap", "attention_shares",
           "step_overlaps"]

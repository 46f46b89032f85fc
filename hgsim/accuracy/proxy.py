"""The simulator's accuracy proxy: one cached call per layer plan.

``accuracy_proxy(plan)`` synthesises an attention layer following an ``AttentionModelSpec``,
derives the attended tokens from the plan's selector and scores them with ``fidelity``. Sweeps
call it for many configurations sharing the same ratios, so both the synthetic tensors (with
their exact attention) and the per-plan results are cached.

Long contexts are scaled down to ``max_tokens`` so that a 1M-token plan costs no more than a 32k
one. The scaled problem is a zoom of the original, built so that every class of tokens keeps
its expected share of the attention mass:

* the recent window and host top-k keep their ratios (``gpu_recent_tokens / context`` and
  ``host_selected / host_tokens``); an exact plan stays exact;
* sink tokens keep their absolute count (sinks are the first few tokens whatever the length),
  unless the plan keeps more than the spec's sinks, which then scale like the recent window;
* heavy hitters and noise tokens keep their fractions, so their mass shrinks by ``f`` with the
  token count;
* the spec's ``recency_tokens`` scales by ``f`` (the same share of recency-boosted tokens
  falls inside the recent window) and ``recency_boost`` is re-solved so that the recency mass
  also shrinks by exactly ``f``;
* ``sink_logit_boost`` drops by ``ln(1/f)`` (a fixed number of sinks keeps its share);
* the optional power law over the non-sink tokens (``rank_exponent`` > 0) buckets consecutive
  real ranks: ``rank_span`` real non-sink tokens per synthetic one, each synthetic rank the log
  of its bucket's exact weight, less ``ln(rank_span)`` (``synthetic.rank_logits``), so an exact
  top-k keeps the law's share a real one would.

Checked against unscaled runs up to 1M tokens (32x): mass kept and relative error of top-k,
speculative and heavy-hitter selections agree within ~0.005; plans that drop nearly all host
tokens agree less well on ``rel_error``, which also depends on how many tokens share the mass
(averaging the values of f-times fewer tokens gives a larger exact output norm).

Otherwise the spec's ``n_tokens`` is replaced by the plan's context.

Grouped-query attention: ``group_spec(G)`` is the spec with ``G`` query heads per KV head (the
simulator passes the model's), so that HybridGen's per-KV-group selection modes
(``plan.GroupSelect``) are scored on heads that share keys; the plan's mode reaches the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq

from hgsim.accuracy.fidelity import (
    Fidelity,
    attention_logits,
    fidelity_from_probs,
    softmax,
    weighted_values,
)
from hgsim.accuracy.selection import SelectionModel, Window, selection_mask
from hgsim.accuracy.synthetic import AttentionModelSpec, SyntheticAttention, synthesize_case
from hgsim.plan import GroupScore, GroupSelect, LayerPlan, Selector

DEFAULT_MAX_TOKENS = 32768
DEFAULT_SPEC = AttentionModelSpec()
_SELECTION_STREAM = 0xACC  # keeps selector randomness independent of the synthesis streams


@dataclass(frozen=True, slots=True)
class ScaledProblem:
    """What the proxy actually evaluates for a plan: a spec and a window over its tokens."""

    spec: AttentionModelSpec
    window: Window
    factor: float  # scaled / original context (1.0 when no scaling was needed)


def scale_problem(
    plan: LayerPlan, spec: AttentionModelSpec, max_tokens: int = DEFAULT_MAX_TOKENS
) -> ScaledProblem:
    """Map ``plan`` onto at most ``max_tokens`` tokens, preserving its ratios (module doc)."""
    if max_tokens <= spec.sink_tokens + 1:
        raise ValueError("max_tokens must exceed the spec's sink tokens by at least 2")
    mode = (getattr(plan, "selection", GroupSelect.PER_HEAD),
            getattr(plan, "group_score", GroupScore.MAX))
    if plan.context <= max_tokens:
        window = Window(plan.sink_tokens, plan.gpu_recent_tokens, plan.host_selected,
                        plan.selector, *mode)
        return ScaledProblem(spec.with_tokens(plan.context), window, 1.0)
    factor = max_tokens / plan.context
    reserve = 1 if plan.host_tokens else 0  # a host range stays non-empty
    scaled_sinks = max(round(plan.sink_tokens * factor), spec.sink_tokens)
    sinks = min(plan.sink_tokens, scaled_sinks, max_tokens - reserve)
    if plan.host_tokens == 0:
        recent = max_tokens - sinks  # nothing on the host before, nothing after
    else:
        recent = min(_scaled_count(plan.gpu_recent_tokens, factor), max_tokens - sinks - 1)
    host = max_tokens - sinks - recent
    selected = _scaled_share(plan.host_selected, plan.host_tokens, host)
    window = Window(sinks, recent, selected, plan.selector, *mode)
    return ScaledProblem(zoom_spec(spec, plan.context, max_tokens), window, factor)


def group_spec(heads_per_group: int, spec: AttentionModelSpec | None = None) -> AttentionModelSpec:
    """``spec`` (default ``DEFAULT_SPEC``) with ``heads_per_group`` query heads per KV head: its
    KV heads kept (so a group-size sweep keeps as many independent groups), query heads
    ``kv_heads * heads_per_group``. One head per group gives ``spec`` itself."""
    spec = spec or DEFAULT_SPEC
    if heads_per_group < 1:
        raise ValueError("heads_per_group must be at least 1")
    if heads_per_group == spec.heads_per_group:
        return spec
    return replace(spec, heads=spec.kv_heads * heads_per_group)


def zoom_spec(spec: AttentionModelSpec, context: int, n_tokens: int) -> AttentionModelSpec:
    """``spec`` over ``n_tokens`` tokens standing for ``context``: every token class keeps its
    expected share of the attention mass (module doc)."""
    factor = n_tokens / context
    recency_tokens = spec.recency_tokens * factor
    target = factor * _recency_excess(spec.recency_boost, spec.recency_tokens, context)
    body = n_tokens - spec.sink_tokens  # the non-sink tokens, over which the power law ranks
    span = spec.rank_span * (context - spec.sink_tokens) / body if body > 0 else spec.rank_span
    return replace(
        spec,
        n_tokens=n_tokens,
        recency_tokens=recency_tokens,
        recency_boost=_boost_for_excess(target, recency_tokens, n_tokens),
        sink_logit_boost=spec.sink_logit_boost + math.log(factor),
        rank_span=span,
    )


def _boost_for_excess(target: float, recency_tokens: float, n_tokens: int) -> float:
    """The recency boost whose ``_recency_excess`` is ``target`` (monotone, so a root search)."""
    if target <= 0:
        return 0.0
    high = math.log1p(target) + 1.0  # the newest token alone exceeds the target at this boost
    return brentq(lambda b: _recency_excess(b, recency_tokens, n_tokens) - target, 0.0, high)


def _recency_excess(boost: float, recency_tokens: float, n_tokens: int) -> float:
    """Extra softmax weight recency adds over an unboosted context: sum_d exp(b e^(-d/r)) - 1.

    Matching it, rather than shrinking ``recency_tokens`` alone, keeps the recent share right
    when the zoomed decay length is only a few tokens (the sum is then far from its integral).
    """
    distance = np.arange(min(n_tokens, math.ceil(60 * recency_tokens) + 1))
    return float(np.sum(np.expm1(boost * np.exp(-distance / recency_tokens))))


def _scaled_count(count: int, factor: float) -> int:
    return 0 if count == 0 else max(1, round(count * factor))


def _scaled_share(part: int, total: int, new_total: int) -> int:
    """``part / total`` of ``new_total``, keeping none, some and all distinct."""
    if part == 0 or part == total:
        return 0 if part == 0 else new_total
    return min(max(1, round(part / total * new_total)), max(new_total - 1, 1))


def accuracy_proxy(
    layer_plan: LayerPlan,
    spec: AttentionModelSpec | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    model: SelectionModel | None = None,
) -> Fidelity:
    """Mass kept and output error of ``layer_plan``'s token selection on synthetic attention.

    Lossless plans (no host tokens, ``Selector.ALL``, or every host token selected by a selector
    other than ``DROPPED``) return at once. Results carry read-only per-head arrays and are
    cached on (scaled window, spec, model): hardware-only plan fields do not matter.
    """
    spec = spec or DEFAULT_SPEC
    if is_lossless(layer_plan):
        return Fidelity.lossless(spec.heads)
    problem = scale_problem(layer_plan, spec, max_tokens)
    window = problem.window
    if spec.heads_per_group == 1 and window.selection is not GroupSelect.PER_HEAD:
        window = replace(window, selection=GroupSelect.PER_HEAD)  # one head per group: the same
    return _cached_fidelity(window, problem.spec, model or SelectionModel())


def is_lossless(plan: LayerPlan) -> bool:
    """Whether ``plan`` attends every token: ``LayerPlan.exact``, except that ``DROPPED`` drops
    its host tokens whatever ``host_selected`` says (as ``selection_mask`` does)."""
    if plan.host_tokens == 0:
        return True
    return plan.selector is not Selector.DROPPED and plan.exact


def proxy_case(
    layer_plan: LayerPlan,
    spec: AttentionModelSpec | None = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> tuple[SyntheticAttention, Window]:
    """The exact tensors and window ``accuracy_proxy`` scores for ``layer_plan``.

    For running a real kernel (``hw_backend``) on the same data and comparing its output with
    ``output_error`` against the proxy's prediction. The arrays are the cached ones and are
    read-only; copy them (``np.array(x)``) before handing them to code that writes in place.
    """
    problem = scale_problem(layer_plan, spec or DEFAULT_SPEC, max_tokens)
    return _prepared_case(problem.spec).case, problem.window


@lru_cache(maxsize=4096)
def _cached_fidelity(window: Window, spec: AttentionModelSpec, model: SelectionModel) -> Fidelity:
    prepared = _prepared_case(spec)
    q, k, v = prepared.case.q[0], prepared.case.k[0], prepared.case.v[0]
    rng = np.random.default_rng([spec.seed, _SELECTION_STREAM])
    mask = selection_mask(q, k, window, model, seed=rng, logits=prepared.logits,
                          persistent=prepared.case.persistent_q[0])
    return fidelity_from_probs(prepared.probs, prepared.output, v, mask, per_head=True)


@dataclass(frozen=True, eq=False)
class _PreparedCase:
    case: SyntheticAttention
    logits: np.ndarray  # exact, recomputed from the float32 tensors
    probs: np.ndarray
    output: np.ndarray  # exact attention output (H, D)


@lru_cache(maxsize=8)  # ~70 MB per case at 32k tokens x 8 KV heads x 128 dims; a sweep has few contexts
def _prepared_case(spec: AttentionModelSpec) -> _PreparedCase:
    case = synthesize_case(spec)
    for array in (case.q, case.k, case.v, case.logits, case.persistent_q):
        array.flags.writeable = False  # shared by every caller of the cache
    logits = attention_logits(case.q[0], case.k[0])
    probs = softmax(logits)
    output = weighted_values(probs[None], case.v[0])[0]
    return _PreparedCase(case, logits, probs, output)


def clear_caches() -> None:
    """Drop cached tensors and results (e.g. between benchmarks), union curves included."""
    from hgsim.accuracy import groups

    _cached_fidelity.cache_clear()
    _prepared_case.cache_clear()
    groups.clear_caches()


def cache_info() -> dict[str, object]:
    return {"results": _cached_fidelity.cache_info(), "cases": _prepared_case.cache_info()}

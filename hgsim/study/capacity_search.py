"""Largest context (or batch) a policy fits on a platform, by binary search on its footprint.

"How long a context can each policy serve here?" needs no simulation: a policy's capacity
accounting already says whether a configuration fits. Building a policy costs about a
millisecond, so a 1k..16M search (~24 probes) is cheap enough to run per point.
Feasibility is assumed monotone in the searched quantity (more tokens never fit better).

``pick: fastest`` then simulates every value up to the largest that qualifies and answers
with the fastest (tokens/s): more sequences can push the KV cache out of HBM and cut the
throughput, so the largest batch is not always the one to run.

With a latency SLO (``search.max_token_latency_ms``) a value that fits is also simulated, the
way a study point is (``hgsim.study.worker.simulate_spec``, at the point's fidelity), and is
feasible only when the chosen per-token latency statistic stays within the SLO; per-token
latency is assumed to grow with the searched quantity. The row then carries the simulated
throughput and latencies at the value found, and ``limit`` says what bound it.
"""

from __future__ import annotations

from typing import Any

from hgsim.policies import make_policy
from hgsim.study.schema import SearchSpec

#: The workload's fields a search point's row carries as they were set (the searched one is
#: replaced by what the search found).
WORKLOAD_COLUMNS = ("batch", "context", "gen", "tensor_parallel", "data_parallel",
                    "gpu_placement")
#: Columns a search point produces besides the configuration columns.
SEARCH_COLUMNS = ("capped", "limit", "limit_reason", "probes")
#: Columns a search with a latency SLO adds: the simulation at the value found (NaN where
#: nothing met the SLO).
SLO_COLUMNS = ("tokens_per_s", "latency_mean_ms", "latency_p50_ms", "latency_p99_ms",
               "simulations")
#: Those of them that hold words, not numbers.
TEXT_COLUMNS = ("limit", "limit_reason")


def search_point(spec) -> dict[str, Any]:
    """The search result row of one point (a ``PointSpec`` whose ``search`` is set)."""
    search: SearchSpec = spec.search
    field = search.field

    probes = 0
    bound: dict[int, str] = {}  # value that failed -> "memory" | "latency"
    simulated: dict[int, Any] = {}  # value -> its simulation (this point's probes only)

    def simulate(value: int):
        from hgsim.study.worker import simulate_spec

        if value not in simulated:
            simulated[value] = simulate_spec(spec, spec.workload.model_copy(update={field: value}))
        return simulated[value]

    def fits(value: int) -> tuple[bool, str | None]:
        nonlocal probes
        probes += 1
        workload = spec.workload.model_copy(update={field: value})
        policy = make_policy(spec.policy, spec.model, spec.profile, workload,
                             spec.policy_options, attention=spec.fidelity.attention)
        if not policy.feasible:
            bound[value] = "memory"
            return False, policy.infeasibility()
        if not search.slo:
            return True, None
        result = simulate(value)
        if not result.feasible:  # the simulator's own accounting refused it
            bound[value] = "memory"
            return False, result.reason or "infeasible"
        latency = result.latency_stats_ms()[search.latency_stat]
        if not latency <= search.max_token_latency_ms:  # NaN (no step) fails too
            bound[value] = "latency"
            return False, (f"per-token latency {latency:.4g} ms ({search.latency_stat}) > "
                           f"SLO {search.max_token_latency_ms:g} ms")
        return True, None

    best, reason, capped = max_feasible(fits, search.lo, search.hi, search.step)
    chosen = best
    if search.pick == "fastest" and best is not None:
        # every value up to the largest that qualifies fits (and meets the SLO, latency
        # growing with the value): the one that decodes fastest
        candidates = range(search.lo, best + 1, search.step)
        rates = {v: simulate(v).tokens_per_s for v in candidates}
        if search.slo:  # bisection assumed latency monotone; a value below may still break it
            rates = {v: rate for v, rate in rates.items() if not simulate(v).latency_stats_ms()[
                search.latency_stat] > search.max_token_latency_ms}
        chosen = max(rates, key=lambda v: (rates[v], -v))  # a tie: the smaller
    if capped:
        limit = "range"
    else:  # the first value that failed: lo, or one step above the best
        limit = bound.get(search.lo if best is None else best + search.step, "memory")
    row = {
        "profile": spec.profile.name, "model": spec.model.name, "policy": spec.policy,
        **{name: getattr(spec.workload, name) for name in WORKLOAD_COLUMNS},
        field: chosen,  # the searched quantity at its maximum, or the fastest value up to it
        search.column: best, "feasible": best is not None, "capped": capped,
        "limit": limit, "limit_reason": reason or "", "probes": probes,
        "reason": "" if best is not None else (reason or ""),
    }
    if search.pick == "fastest":
        row[f"fastest_{field}"] = chosen
    if search.simulates:
        at_best = simulated.get(chosen) if chosen is not None else None
        stats = at_best.latency_stats_ms() if at_best is not None else {}
        nan = float("nan")
        row.update({
            "tokens_per_s": at_best.tokens_per_s if at_best is not None else nan,
            **{f"latency_{k}_ms": stats.get(k, nan) for k in ("mean", "p50", "p99")},
            "simulations": len(simulated),
        })
    return row


def max_feasible(fits, lo: int, hi: int, step: int) -> tuple[int | None, str | None, bool]:
    """Largest ``lo + k*step <= hi`` with ``fits`` true, by bisection.

    Returns (value or None when ``lo`` does not fit, the reason the next step up does not fit,
    capped: True when ``hi`` itself fits so the true limit may be higher).
    """
    ok, reason = fits(lo)
    if not ok:
        return None, reason, False
    n = (hi - lo) // step  # candidates lo + k*step for k in 0..n
    ok, reason_hi = fits(lo + n * step)
    if ok:
        return lo + n * step, None, True
    good, bad = 0, n  # invariant: fits(good), not fits(bad)
    reason = reason_hi
    while bad - good > 1:
        mid = (good + bad) // 2
        ok, why = fits(lo + mid * step)
        if ok:
            good = mid
        else:
            bad, reason = mid, why
    return lo + good * step, reason, False

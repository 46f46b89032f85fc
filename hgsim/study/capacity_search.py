"""Largest context (or batch) a policy fits on a platform, by binary search on its footprint.

"How long a context can each policy serve here?" needs no simulation: a policy's capacity
accounting already says whether a configuration fits. Building a policy costs about a
millisecond, so a 1k..16M search (~24 probes) is cheap enough to run per point.
Feasibility is assumed monotone in the searched quantity (more tokens never fit better).
"""

from __future__ import annotations

from typing import Any

from hgsim.policies import make_policy
from hgsim.study.schema import SearchSpec

#: Columns a search point produces besides the configuration columns.
SEARCH_COLUMNS = ("capped", "limit_reason", "probes")
#: Those of them that hold words, not numbers.
TEXT_COLUMNS = ("limit_reason",)


def search_point(spec) -> dict[str, Any]:
    """The search result row of one point (a ``PointSpec`` whose ``search`` is set)."""
    search: SearchSpec = spec.search
    field = search.field

    probes = 0

    def fits(value: int) -> tuple[bool, str | None]:
        nonlocal probes
        probes += 1
        workload = spec.workload.model_copy(update={field: value})
        policy = make_policy(spec.policy, spec.model, spec.profile, workload,
                             spec.policy_options, attention=spec.fidelity.attention)
        return policy.feasible, policy.infeasibility()

    best, reason, capped = max_feasible(fits, search.lo, search.hi, search.step)
    row = {
        "profile": spec.profile.name, "model": spec.model.name, "policy": spec.policy,
        "batch": spec.workload.batch, "context": spec.workload.context, "gen": spec.workload.gen,
        "tensor_parallel": spec.workload.tensor_parallel,
        field: best,  # the searched quantity at its maximum (None if even lo fails)
        search.column: best, "feasible": best is not None, "capped": capped,
        "limit_reason": reason or "", "probes": probes,
        "reason": "" if best is not None else (reason or ""),
    }
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

"""Equal accuracy: the cheapest setting of a lossy policy that meets a target proxy error.

A lossy policy is faster the less it attends, so comparing policies at their configured
settings rewards whichever drops the most (H2O keeps 20% of the KV). Fair comparisons hold
accuracy fixed: for each lossy policy, the smallest value of its knob (top-k ratio, H2O
budget, ...) whose accuracy-proxy error is at most a target, and its speed there.

Each policy has one knob, an option in (0, 1] where 1 attends every token (error 0) and the
proxy error falls as the knob grows (assumed monotone, as the capacity search assumes
feasibility is). The proxy costs tens of milliseconds and needs no simulation, so the search
bisects over a grid of the knob with the proxy alone; the caller simulates once, at the
setting found.

HybridGen's scheduler changes r during a run; its knob is the scheduler's floor
``min_ratio``, with the initial ratio ``topk_ratio`` set to the same value: the run starts at
the floor and may only grow r (when the host hides behind the device, i.e. for free), so the
error of the plan at the floor bounds the run's error. With ``adaptive: false`` the same
setting is simply the static ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hgsim.policies import is_lossy, make_policy
from hgsim.policies.registry import lookup
from hgsim.simulate import accuracy_context
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload

if TYPE_CHECKING:
    from hgsim.accuracy.selection import SelectionModel
    from hgsim.accuracy.synthetic import AttentionModelSpec

DEFAULT_RESOLUTION = 0.005


@dataclass(frozen=True)
class Knob:
    """The option searched for a policy and the options that follow it."""

    option: str
    tied: tuple[str, ...] = ()  # set to the knob's value too
    raised: tuple[str, ...] = ()  # raised to at least the knob's value (upper bounds)

    def options(self, options: dict[str, Any], value: float) -> dict[str, Any]:
        """``options`` with the knob (and its followers) at ``value``."""
        out = {**options, self.option: value}
        out.update({name: value for name in self.tied})
        for name in self.raised:
            if name in out and out[name] is not None:
                out[name] = max(out[name], value)
        return out


#: Each built-in lossy policy's knob, by policy class name (presets share their class's).
KNOBS: dict[str, Knob] = {
    "hybridgen": Knob("min_ratio", tied=("topk_ratio",), raised=("max_ratio",)),
    "h2o": Knob("budget"),
    "infinigen": Knob("topk_ratio"),
    "hgca": Knob("topk_ratio"),
}


def knob_for(policy: str, option: str | None = None) -> Knob:
    """The knob of ``policy`` (a name or preset); ``option`` overrides the registry (an option
    the registered knob ties to itself brings the same followers: it is the same setting).

    Raises ValueError for an exact policy, an unknown option, or a lossy policy without a
    registered knob and no ``option``.
    """
    cls, _, _ = lookup(policy)
    if not is_lossy(policy):
        raise ValueError(f"policy '{policy}' is exact: it has no accuracy knob")
    if option is None:
        if cls.name not in KNOBS:
            raise ValueError(f"policy '{policy}' has no registered accuracy knob; name the "
                             "option to search (equal_accuracy.knobs)")
        return KNOBS[cls.name]
    if option not in cls.Options.model_fields:
        known = ", ".join(cls.Options.model_fields)
        raise ValueError(f"policy '{policy}' has no option '{option}' (its options: {known})")
    default = KNOBS.get(cls.name)
    if default is not None and option == default.option:
        return default
    if default is not None and option in default.tied:
        # the same setting named by a follower: HybridGen's topk_ratio alone would leave the
        # scheduler's floor below it, so the run could lower r and miss the target found
        others = tuple(name for name in default.tied if name != option)
        return Knob(option, tied=(default.option, *others), raised=default.raised)
    return Knob(option)


@dataclass(frozen=True)
class ProxyProbe:
    """One evaluation of a setting: its proxy error and whether it fits in memory."""

    value: float
    rel_error: float
    feasible: bool
    reason: str | None


def probe_setting(policy: str, model: ModelSpec, profile: HardwareProfile, workload: Workload,
                  options: dict[str, Any], knob: Knob, value: float,
                  selection: SelectionModel | None = None,
                  attention: AttentionModelSpec | None = None) -> ProxyProbe:
    """Proxy error of ``policy`` with its knob at ``value`` (the plan at the median step,
    before any scheduler decision: for HybridGen, r at the floor), scored with the
    selectors' parameters ``selection`` on the synthetic attention ``attention`` (None: the
    defaults; ``Fidelity.selection`` and ``Fidelity.attention``)."""
    from hgsim.accuracy import accuracy_proxy, group_spec

    pol = make_policy(policy, model, profile, workload, knob.options(options, value),
                      attention=attention)
    plan = pol.step_plan(accuracy_context(workload)).layer
    error = accuracy_proxy(plan, group_spec(pol.model.gqa_group, attention),  # a TP rank's
                           model=selection).rel_error
    return ProxyProbe(value, float(error), pol.feasible, pol.infeasibility())


@dataclass(frozen=True)
class SettingSearch:
    """Where the search ended: the cheapest grid value meeting the target, if any."""

    target: float
    found: ProxyProbe | None  # None: even the exact end misses the target
    cheaper: ProxyProbe | None  # the grid value just below ``found`` (misses the target)
    probes: int


def knob_grid(resolution: float) -> list[float]:
    """Knob values searched: multiples of ``resolution`` up to 1 (1 attends every token)."""
    if not 0 < resolution <= 1:
        raise ValueError(f"resolution must lie in (0, 1], got {resolution}")
    n = int(round(1.0 / resolution))
    values = [round(k * resolution, 12) for k in range(1, n + 1) if k * resolution < 1.0]
    return [*values, 1.0]


def cheapest_setting(error_at: Callable[[float], ProxyProbe], target: float,
                     resolution: float = DEFAULT_RESOLUTION) -> SettingSearch:
    """Smallest grid value whose error is at most ``target``, by bisection.

    Assumes the error does not grow with the knob. Evaluates the exact end first (a target it
    misses is unreachable), then the cheapest value, then bisects: about log2(1/resolution)
    probes.
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    grid = knob_grid(resolution)
    probes = 0

    def meets(i: int) -> tuple[bool, ProxyProbe]:
        nonlocal probes
        probes += 1
        probe = error_at(grid[i])
        return probe.rel_error <= target, probe

    ok, top = meets(len(grid) - 1)
    if not ok:
        return SettingSearch(target, None, None, probes)
    if len(grid) == 1:
        return SettingSearch(target, top, None, probes)
    ok, bottom = meets(0)
    if ok:
        return SettingSearch(target, bottom, None, probes)
    good, bad = len(grid) - 1, 0  # invariant: grid[good] meets the target, grid[bad] misses
    good_probe, bad_probe = top, bottom
    while good - bad > 1:
        mid = (good + bad) // 2
        ok, probe = meets(mid)
        if ok:
            good, good_probe = mid, probe
        else:
            bad, bad_probe = mid, probe
    return SettingSearch(target, good_probe, bad_probe, probes)

"""Studies at equal accuracy: each lossy point again at the setting that meets a target error.

``equal_accuracy: {target_rel_error: 0.01}`` gives every point a twin per target. A lossy
policy's twin searches its knob (``hgsim.equal_accuracy``: proxy only, bisection) and is
simulated once at the setting found; an exact policy's twin is its configured point (same
key, computed once: its error is 0, below any target). The axis ``accuracy.target`` tells them
apart (``configured`` or ``rel_error<=T``), so a derived speedup matched on every other axis is
computed both as configured and at equal accuracy from the same table.

A target a policy cannot meet within its memory (H2O would need a budget that does not fit in
HBM) makes the twin infeasible with the reason; it then has no equal-accuracy speed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from hgsim.equal_accuracy import Knob, cheapest_setting, knob_for, probe_setting
from hgsim.study import axes as ax

#: The axis column that tells configured points from their equal-accuracy twins.
AXIS = ax.ACCURACY_TARGET
label = ax.accuracy_target_label
CONFIGURED = "configured"
#: Columns an equal-accuracy point adds to its simulation row.
COLUMNS = ("accuracy_target", "target_reached", "target_reason", "setting_knob",
           "setting_at_target", "setting_rel_error", "cheaper_setting", "cheaper_rel_error",
           "target_probes")
#: Those of them that hold words, not numbers.
TEXT_COLUMNS = ("target_reason", "setting_knob")


@dataclass(frozen=True)
class AccuracyTarget:
    """What a twin point searches: the target, the knob, the knob grid."""

    target: float
    knob: Knob
    resolution: float


def twin_key(key: str, target: AccuracyTarget) -> str:
    """The twin's key: its configured point's key (the full configuration) and the search."""
    text = json.dumps({"point": key, "target": target.target, "knob": target.knob.option,
                       "tied": target.knob.tied, "raised": target.knob.raised,
                       "resolution": target.resolution}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def twin_spec(spec, target: AccuracyTarget):
    """A lossy point's equal-accuracy twin (``PointSpec``)."""
    return replace(spec, key=twin_key(spec.key, target), equal_accuracy=target)


def equal_accuracy_point(spec) -> tuple[dict[str, Any], int]:
    """The row of a twin: the search's outcome and, where reachable, the simulation there."""
    from hgsim.simulate import simulate

    goal: AccuracyTarget = spec.equal_accuracy

    def error_at(value: float):
        return probe_setting(spec.policy, spec.model, spec.profile, spec.workload,
                             spec.policy_options, goal.knob, value, spec.fidelity.selection,
                             spec.fidelity.attention)

    search = cheapest_setting(error_at, goal.target, goal.resolution)
    found = search.found
    extra: dict[str, Any] = {
        "accuracy_target": goal.target, "setting_knob": goal.knob.option,
        "setting_at_target": found.value if found else float("nan"),
        "setting_rel_error": found.rel_error if found else float("nan"),
        "cheaper_setting": search.cheaper.value if search.cheaper else float("nan"),
        "cheaper_rel_error": search.cheaper.rel_error if search.cheaper else float("nan"),
        "target_probes": search.probes,
    }
    why = _unreachable(goal, search)
    if why:
        row = {"profile": spec.profile.name, "model": spec.model.name, "policy": spec.policy,
               "batch": spec.workload.batch, "context": spec.workload.context,
               "gen": spec.workload.gen, "feasible": False, "reason": why}
        return {**row, **extra, "target_reached": False, "target_reason": why}, 0
    options = goal.knob.options(spec.policy_options, found.value)
    result = simulate(spec.profile, spec.model, spec.policy, spec.workload,
                      policy_options=options, fidelity=spec.fidelity)
    row = result.to_row()
    return {**row, **extra, "target_reached": True, "target_reason": ""}, int(result.events)


def _unreachable(goal: AccuracyTarget, search) -> str:
    """Why the target has no simulated setting ("" when it has one). When the cheaper setting
    does not fit either, memory binds whatever the accuracy asked for, and the reason says so
    rather than blame the target."""
    found, cheaper, knob = search.found, search.cheaper, goal.knob.option
    if found is None:
        return f"accuracy target {goal.target:g} unreachable: even {knob}=1 misses it"
    if found.feasible:
        return ""
    if cheaper is None:
        return (f"does not fit in memory even at {knob}={found.value:g}, the cheapest setting "
                f"(which meets accuracy target {goal.target:g}): {found.reason}")
    if not cheaper.feasible:
        return (f"does not fit in memory at {knob}={found.value:g}, which accuracy target "
                f"{goal.target:g} needs, nor at the cheaper {cheaper.value:g}: {found.reason}")
    return (f"accuracy target {goal.target:g} needs {knob}>={found.value:g}, "
            f"which does not fit: {found.reason}")


def knob_of(policy: str, knobs: dict[str, str]) -> Knob | None:
    """The knob searched for ``policy`` (None: exact policy). Raises ValueError."""
    from hgsim.policies import is_lossy

    if not is_lossy(policy):
        return None
    return knob_for(policy, knobs.get(policy))


def settings_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per lossy policy and target: the knob, how often the target was met, the settings found."""
    if "setting_knob" not in frame:
        return pd.DataFrame()
    twins = frame[frame["setting_knob"].notna() & (frame["setting_knob"] != "")]
    rows = []
    for (policy, target), part in twins.groupby(["policy", AXIS], sort=False):
        reached = part["target_reached"].fillna(False).astype(bool)
        values = pd.to_numeric(part.loc[reached, "setting_at_target"], errors="coerce")
        errors = pd.to_numeric(part.loc[reached, "accuracy_rel_error"], errors="coerce")
        rows.append({"policy": policy, AXIS: target, "knob": part["setting_knob"].iloc[0],
                     "points": len(part), "reached": int(reached.sum()),
                     "unreachable": int((~reached).sum()),
                     "setting min": values.min(), "setting median": values.median(),
                     "setting max": values.max(), "run rel_error max": errors.max()})
    return pd.DataFrame(rows)

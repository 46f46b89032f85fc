"""Sensitivity studies: which hardware parameter moves the metric, for whom, and how much.

Around every point of the sweep each listed parameter alone is scaled up and down by the
study's step, and the elasticity ``d ln metric / d ln parameter`` is the central difference
of the two. It is unit-free, so a latency and a bandwidth can share one heatmap: +1 means the
metric grows in proportion to the parameter (it binds), -1 that it falls in proportion (a
latency that binds), 0 that the parameter does not matter at that point.

The variant points carry three extra columns: ``sensitivity.parameter`` (``base`` on the
sweep's own points), ``sensitivity.factor`` and ``sensitivity.value`` (the value simulated).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hgsim.specs.hardware import HardwareProfile

PARAMETER = "sensitivity.parameter"
FACTOR = "sensitivity.factor"
VALUE = "sensitivity.value"
AXES = (PARAMETER, FACTOR)
BASE = "base"

#: ``tiers.<t>.bandwidth_gbps`` sets read and write bandwidth; its value is the read one.
_SHORTHAND = {"bandwidth_gbps": "read_bandwidth_gbps"}


def parameter_value(profile: HardwareProfile, path: str) -> float:
    """The numeric value at a dotted profile path (ValueError if there is none)."""
    node: Any = profile.model_dump()
    parts = path.split(".")
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and i == 2 and parts[0] == "tiers":
            part = _SHORTHAND.get(part, part)
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ValueError(f"'{path}' is not a parameter of profile {profile.name}"
                             + (f" (at '{part}': known {known})" if known else ""))
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ValueError(f"'{path}' is not a number in profile {profile.name} ({node!r})")
    return node


def variants(value: float, step: float) -> list[tuple[float, float]]:
    """(factor, value) scaled down and up; whole numbers stay whole and move by at least 1."""
    out = []
    for factor in (1.0 / (1.0 + step), 1.0 + step):
        scaled = value * factor
        if isinstance(value, int):
            scaled = round(scaled)
            if scaled == value:
                scaled = value + (1 if factor > 1 else -1)
            if scaled < 1:
                continue
            factor = scaled / value
        out.append((factor, scaled))
    return out


def elasticities(frame: pd.DataFrame, axes: list[str], metric: str) -> pd.DataFrame:
    """One row per sweep point and parameter: the metric at the point, its elasticity (the
    central difference) and each one-sided one, which differ where the parameter binds on one
    side of the step only (a kink the central difference averages over)."""
    if PARAMETER not in frame or metric not in frame:
        return pd.DataFrame()
    others = [a for a in axes if a not in AXES]
    data = frame.assign(__m=pd.to_numeric(frame[metric], errors="coerce"))
    base = data[data[PARAMETER] == BASE]
    rows = []
    groups = data.groupby(others, sort=False, dropna=False) if others else [((), data)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        coords = dict(zip(others, key, strict=True))
        at = base
        for column, value in coords.items():
            at = at[at[column] == value]
        point = float(at["__m"].iloc[0]) if len(at) else math.nan
        for parameter, runs in part[part[PARAMETER] != BASE].groupby(PARAMETER, sort=False):
            runs = runs.sort_values(VALUE)
            e = e_down = e_up = math.nan
            if len(runs) == 2:
                (m_lo, v_lo, f_lo), (m_hi, v_hi, _) = runs[["__m", VALUE, FACTOR]].to_numpy()
                if m_lo > 0 and m_hi > 0 and v_lo > 0 and v_hi > v_lo:
                    e = (math.log(m_hi) - math.log(m_lo)) / (math.log(v_hi) - math.log(v_lo))
                    v0 = v_lo / f_lo  # the point's own value
                    if point > 0 and v_lo < v0 < v_hi:
                        e_down = (math.log(point) - math.log(m_lo)) / math.log(v0 / v_lo)
                        e_up = (math.log(m_hi) - math.log(point)) / math.log(v_hi / v0)
            rows.append({**coords, "parameter": parameter, metric: point, "elasticity": e,
                         "elasticity_down": e_down, "elasticity_up": e_up})
    return pd.DataFrame(rows)


def pivot(table: pd.DataFrame, axes: list[str], parameters: list[str]) -> pd.DataFrame:
    """The elasticity table as people read it: one row per point, one column per parameter."""
    if table.empty:
        return table
    others = [a for a in axes if a not in AXES]
    if not others:
        wide = table.set_index("parameter")[["elasticity"]].T
    else:
        wide = table.pivot_table(index=others, columns="parameter", values="elasticity",
                                 sort=False)
    return wide[[p for p in parameters if p in wide.columns]].reset_index(
        drop=not others)


_RATE_UNITS = {"gbps", "ghz", "gflops", "tflops"}
_TIME_UNITS = {"ns", "us", "ms", "s"}


def time_role(path: str) -> int:
    """+1 for a rate (a bandwidth, FLOP/s, a clock), -1 for a time (a latency, an overhead,
    ns per row), 0 for neither (cores, bytes in flight, capacities), read from the unit in its
    name. Every rate x s with every time / s makes the whole machine s times faster."""
    units = set(path.replace(".", "_").split("_"))
    if units & _TIME_UNITS:
        return -1
    return 1 if units & _RATE_UNITS else 0


def time_scaling_sum(wide: pd.DataFrame) -> pd.Series:
    """Per row of ``pivot``'s table: sum of the elasticities to rates minus those to times.
    Scaling every rate and time together scales tokens/s in proportion, so this is 1 when the
    listed parameters are all that cost time, and 1 minus the share of the others if not."""
    roles = {c: time_role(str(c)) for c in wide.columns}
    total = pd.Series(0.0, index=wide.index)
    for column, role in roles.items():
        if role:
            total = total + role * wide[column]
    return total


def base_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The sweep's own points (without the sensitivity variants)."""
    if PARAMETER not in frame:
        return frame
    return frame[frame[PARAMETER] == BASE]

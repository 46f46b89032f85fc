"""Pareto fronts: the points no other point beats on both of two metrics.

"Faster at what accuracy, and at what price?" has no single winner: a point is worth
considering when nothing is at least as good on both axes and better on one (tokens/s against
the proxy error, or against dollars per million tokens). ``kind: pareto`` plots draw every
point and the front through the optimal ones; report.md lists the optimal points.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from hgsim.study.derived import LOWER_IS_BETTER, select
from hgsim.study.schema import PlotSpec

#: Besides times and errors (``LOWER_IS_BETTER``): money, energy and power are costs.
_COSTS = re.compile(r"(usd|dollar|cost|energy|joule|_j_|_j$|watt|_w$)")


def direction(column: str, explicit: str | None = None) -> str:
    """'higher' or 'lower': explicit, else lower for times, errors and costs."""
    if explicit:
        return explicit
    lower = LOWER_IS_BETTER.search(column) or _COSTS.search(column)
    return "lower" if lower else "higher"


def pareto_mask(x: pd.Series, y: pd.Series, x_better: str, y_better: str) -> pd.Series:
    """True where no other point is at least as good on both metrics and better on one;
    points missing either metric are never on the front."""
    xs = pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(y, errors="coerce").to_numpy(dtype=float)
    xs = xs if x_better == "higher" else -xs  # both "higher is better" from here on
    ys = ys if y_better == "higher" else -ys
    valid = ~(np.isnan(xs) | np.isnan(ys))
    on = np.zeros(len(xs), dtype=bool)
    px, py = xs[valid], ys[valid]
    if len(px):
        geq = (px[None, :] >= px[:, None]) & (py[None, :] >= py[:, None])
        gt = (px[None, :] > px[:, None]) | (py[None, :] > py[:, None])
        on[valid] = ~(geq & gt).any(axis=1)
    return pd.Series(on, index=x.index)


def front_groups(spec: PlotSpec) -> list[str]:
    """Columns within whose values fronts are separate: the facets, then ``front_by``."""
    return list(dict.fromkeys(c for c in (spec.row, spec.col, *spec.front_by) if c))


def on_front(frame: pd.DataFrame, spec: PlotSpec) -> pd.Series:
    """Pareto-optimal rows of ``frame`` for ``spec``, one front per group."""
    x_better, y_better = direction(spec.x, spec.x_better), direction(spec.y, spec.y_better)
    groups = front_groups(spec)
    if not groups:
        return pareto_mask(frame[spec.x], frame[spec.y], x_better, y_better)
    parts = [pareto_mask(part[spec.x], part[spec.y], x_better, y_better)
             for _, part in frame.groupby(groups, sort=False, dropna=False)]
    return pd.concat(parts).reindex(frame.index, fill_value=False) if parts else \
        pd.Series(False, index=frame.index)


def front_table(frame: pd.DataFrame, spec: PlotSpec) -> pd.DataFrame:
    """The optimal rows of a pareto plot (after its ``where``), with the columns it shows."""
    missing = [c for c in spec.columns().values() if c not in frame]
    if missing:
        return pd.DataFrame()
    data = frame[select(frame, spec.where)] if spec.where else frame
    if "point" in data:  # a configuration listed twice (an exact policy's twin) counts once
        data = data.drop_duplicates("point")
    optimal = data[on_front(data, spec)]
    shown = [*front_groups(spec), *(c for c in ("policy", "accuracy.target") if c in data),
             spec.hue, spec.style, spec.x, spec.y]
    shown = list(dict.fromkeys(c for c in shown if c))
    optimal = optimal.sort_values([*front_groups(spec), spec.x], kind="stable")
    return optimal[shown].reset_index(drop=True)


def draw_fronts(grid, data: pd.DataFrame, spec: PlotSpec) -> None:
    """A dashed line through each panel's optimal points, each ringed (one front per
    ``front_by`` group)."""
    x_better = direction(spec.x, spec.x_better)
    for key, axes in _panels(grid, spec):
        panel = data
        for column, value in key.items():
            panel = panel[panel[column] == value]
        groups = panel.groupby(spec.front_by, sort=False) if spec.front_by else [((), panel)]
        for _, part in groups:
            front = part[on_front(part, spec.model_copy(update={"row": None, "col": None,
                                                                "front_by": []}))]
            front = front.sort_values(spec.x, ascending=x_better == "lower")
            axes.plot(front[spec.x], front[spec.y], linestyle="--", color="0.35", linewidth=1,
                      zorder=1)
            # a ring on each optimal point: a front of one point has no line to show it
            axes.scatter(front[spec.x], front[spec.y], s=110, facecolors="none",
                         edgecolors="0.2", linewidths=0.9, zorder=3)


def _panels(grid, spec: PlotSpec):
    """(facet values, axes) of every panel of a seaborn grid."""
    if not spec.row and not spec.col:
        return [({}, grid.ax)]
    out = []
    for key, axes in grid.axes_dict.items():
        if spec.row and spec.col:
            out.append(({spec.row: key[0], spec.col: key[1]}, axes))
        else:
            out.append(({spec.row or spec.col: key}, axes))
    return out

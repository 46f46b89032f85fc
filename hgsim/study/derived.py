"""Derived metrics: a row's metric against its baseline row at the same other coordinates.

"HybridGen's speedup over FlexGen" is a ratio of two rows of the results table that agree on
every axis except the policy. ``vs`` names the axes (and values) that select the baseline;
all other axes are matched. Computing this on the finished table, not inside the run, keeps
it cheap to change and lets the same rows feed any number of derived metrics.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pandas as pd

from hgsim.study import axes as ax
from hgsim.study.schema import DerivedSpec

#: Metrics where smaller is better: times (``*_ms``, ``*_s`` but not rates ``*_per_s``),
#: latencies and errors.
LOWER_IS_BETTER = re.compile(r"(^latency|_ms$|(?<!_per)_s$|^accuracy_rel_error$|^stall"
                             r"|^usd_per_|^energy_j_per_|^capex_usd$|^power_w_)")


def better(spec: DerivedSpec) -> str:
    """'higher' or 'lower': explicit, else lower for times and errors, higher otherwise."""
    if spec.better:
        return spec.better
    return "lower" if LOWER_IS_BETTER.search(spec.metric) else "higher"


def baselines(name: str, spec: DerivedSpec) -> list[tuple[str, dict[str, Any]]]:
    """(column name, baseline selection) for each baseline the spec names.

    A list value in ``vs`` gives one column per value, named ``<name>_vs_<value>``.
    """
    listed = [k for k, v in spec.vs.items() if isinstance(v, list)]
    choices = [spec.vs[k] if k in listed else [spec.vs[k]] for k in spec.vs]
    out = []
    for combo in itertools.product(*choices):
        selection = {k: ax.normalize(k, v) for k, v in zip(spec.vs, combo, strict=True)}
        column = name
        if listed:
            parts = [ax.column_slug(selection[k]) for k in listed]
            column = f"{name}_vs_{'_'.join(parts)}"
        out.append((column, selection))
    return out


def derived_columns(derived: dict[str, DerivedSpec]) -> dict[str, str]:
    """Every derived column -> the derived metric it belongs to."""
    return {col: name for name, spec in derived.items() for col, _ in baselines(name, spec)}


def ratio_columns(derived: dict[str, DerivedSpec]) -> set[str]:
    """The derived columns that are ratios (``speedup``, ``ratio``): 1 means no change and
    0.5 is as far from it as 2, so a figure colours them on a log scale around 1."""
    return {col for col, name in derived_columns(derived).items()
            if derived[name].kind in ("speedup", "ratio")}


def select(frame: pd.DataFrame, selection: dict[str, Any]) -> pd.Series:
    """Boolean mask of rows whose columns equal the selection (a list means any of)."""
    mask = pd.Series(True, index=frame.index)
    for column, value in selection.items():
        wanted = ax.normalize(column, value)
        if isinstance(wanted, list):
            mask &= frame[column].isin(wanted)
        else:
            mask &= frame[column] == wanted
    return mask


def compute_derived(frame: pd.DataFrame, derived: dict[str, DerivedSpec],
                    axes: list[str], zipped: dict[str, list[str]] | None = None
                    ) -> pd.DataFrame:
    """``frame`` with one column added per derived metric and baseline. ``zipped``: axis ->
    the axes of its zip group, which move with it and so are not matched."""
    frame = frame.copy()
    for name, spec in derived.items():
        matched = ax.held_equal(axes, spec.vs, zipped)
        rows = select(frame, spec.of) if spec.of else pd.Series(True, index=frame.index)
        value = pd.to_numeric(frame[spec.metric], errors="coerce")
        for column, selection in baselines(name, spec):
            base = _aligned_baseline(frame, spec.metric, selection, matched)
            frame[column] = _combine(value, base, spec).where(rows)
    return frame


def _aligned_baseline(frame, metric, selection, matched) -> pd.Series:
    """For every row, the baseline's metric at the row's values of the matched axes."""
    base_rows = frame.loc[select(frame, selection), matched + [metric]].copy()
    base_rows[metric] = pd.to_numeric(base_rows[metric], errors="coerce")
    if not matched:
        return pd.Series(base_rows[metric].mean(), index=frame.index)
    base = base_rows.groupby(matched, dropna=False, sort=False)[metric].mean()
    base = base.rename("__baseline__").reset_index()
    joined = frame[matched].merge(base, on=matched, how="left")
    return pd.Series(joined["__baseline__"].to_numpy(), index=frame.index)


def _combine(value: pd.Series, base: pd.Series, spec: DerivedSpec) -> pd.Series:
    with np.errstate(divide="ignore", invalid="ignore"):
        if spec.kind == "difference":
            out = value - base
        elif spec.kind == "ratio" or better(spec) == "higher":
            out = value / base
        else:
            out = base / value
    return out.replace([np.inf, -np.inf], np.nan).astype(float)


def summarize(frame: pd.DataFrame, derived: dict[str, DerivedSpec],
              zipped: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Per derived column and group: n, geometric mean, mean, min and max, and how many
    rows had no value (the point or its baseline infeasible or missing).

    Groups are ``group_by`` (default: the ``of`` axes, so "hybridgen vs flexgen" is one
    row; with no ``of``, the ``vs`` axes, so each policy's ratio to the baseline is a row);
    a group value run at several settings of an axis zipped with it is a row per setting.
    The baseline's own rows are left out: they compare with themselves (1, or 0 for a
    difference) by construction, and would pull every average toward no change.
    """
    rows = []
    for name, spec in derived.items():
        group_by = spec.group_by or list(spec.of) or list(spec.vs)
        for column, selection in baselines(name, spec):
            data = frame[~select(frame, selection)]
            if spec.of:
                data = data[select(data, spec.of)]
            data = data.assign(**{g: ax.choice_names(data, g, zipped) for g in group_by
                                  if ax.partners(data, g, zipped)})
            vs = ", ".join(ax.label(v) for v in selection.values())
            groups = data.groupby(group_by, sort=False, dropna=False) if group_by else \
                [((), data)]
            for key, part in groups:
                key = key if isinstance(key, tuple) else (key,)
                values = part[column].dropna().astype(float)
                if spec.kind == "difference" or (values <= 0).any():
                    geo = np.nan
                else:
                    geo = float(np.exp(np.log(values).mean())) if len(values) else np.nan
                row = {"metric": name, "vs": vs}
                row.update({g: k for g, k in zip(group_by, key, strict=True)})
                row.update({"n": len(values), "no value": len(part) - len(values),
                            "geomean": geo, "mean": values.mean(), "min": values.min(),
                            "max": values.max()})
                rows.append(row)
    return pd.DataFrame(rows)

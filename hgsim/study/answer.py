"""The ``answer`` block: a study's question answered from its results, for report.md's top.

A question names the axis whose value is the answer (``choose``), what ranks a choice
(``metric``, or with ``gain_vs``/``cost`` the metric gained over a reference choice per unit
of cost spent beyond it) and what the answer is given per (``per`` columns; ``among`` sets of
another axis, each represented by its best member at every point, e.g. "the best baseline").
Pure functions of the results frame, so they are tested without running a study.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hgsim.study import axes as ax
from hgsim.study.derived import LOWER_IS_BETTER
from hgsim.study.report import md_table, same_value, three_figures
from hgsim.study.schema import AnswerSpec

SET = "__set"
MEMBER = "__member"
VALUE = "__value"


def _lower(better: str | None, metric: str) -> bool:
    return better == "lower" if better else bool(LOWER_IS_BETTER.search(metric))


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    if "feasible" in frame:
        values = values.where(frame["feasible"].fillna(False).astype(bool))
    return values


def represent(frame: pd.DataFrame, axes: list[str], spec: AnswerSpec,
              zipped: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Rows with ``__set`` (the ``among`` set, or "" without one) and ``__member`` (the value
    of ``among.column`` that represents the set there, with the options zipped with it where
    they tell its settings apart; "none feasible" when none is). Axes zipped with
    ``among.column`` move with it: its members are compared across them."""
    if spec.among is None:
        return frame.assign(**{SET: "", MEMBER: ""})
    among = spec.among
    lower = _lower(among.better, among.rank_by)
    others = ax.held_equal(axes, [among.column], zipped)
    named = frame.assign(__name=ax.choice_names(frame, among.column, zipped))
    parts = []
    for name, members in among.sets.items():
        wanted = ax.normalize(among.column, members)
        subset = named[named[among.column].isin(wanted)]
        subset = subset.assign(__rank=_numeric(subset, among.rank_by))
        groups = subset.groupby(others, sort=False, dropna=False) if others else [((), subset)]
        for _, group in groups:
            ranked = group.dropna(subset=["__rank"]).sort_values("__rank", ascending=lower)
            if ranked.empty:
                row = group.iloc[[0]].assign(**{MEMBER: "none feasible"})
            else:
                row = ranked.iloc[[0]].assign(**{MEMBER: ranked.iloc[0]["__name"]})
            parts.append(row.assign(**{SET: name}).drop(columns=["__rank", "__name"]))
    return pd.concat(parts, ignore_index=True) if parts else frame.iloc[0:0]


def ranking(frame: pd.DataFrame, axes: list[str], spec: AnswerSpec,
            zipped: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Every choice's value per (``per``..., set), best first within each group. Columns:
    the ``per`` columns, ``set``, ``represented by``, the choice, the metric, the cost (with
    ``gain_vs``) and ``value`` (what ranks it). A choice is a value of ``choose`` with the
    axes zipped with it where they tell its settings apart (HybridGen at two top-k ratios
    is two choices, named with their ratios)."""
    data = represent(frame, axes, spec, zipped)
    data = data.assign(**{VALUE: _numeric(data, spec.metric)})
    keys = [*spec.per, SET]
    partners = ax.partners(data, spec.choose, zipped)
    # one row per choice in each group: other axes (if any) are averaged over
    aggregations = {VALUE: "mean", MEMBER: lambda s: ", ".join(dict.fromkeys(map(str, s)))}
    if spec.cost:
        aggregations[spec.cost] = "mean"
    table = data.groupby([*keys, spec.choose, *partners], sort=False, dropna=False).agg(
        aggregations).reset_index()
    raw_choice = table[spec.choose]  # the reference of gain_vs is a value as written
    table = table.assign(**{spec.choose: ax.choice_names(table, spec.choose, zipped)})
    table = table.rename(columns={VALUE: spec.metric} if spec.metric != spec.cost else {})
    metric = table[spec.metric]
    lower = _lower(spec.better, spec.metric)
    if spec.gain_vs is not None:
        reference = ax.normalize(spec.choose, spec.gain_vs)
        produced = metric.fillna(0.0)  # an infeasible point produces nothing
        out = []
        for _, group in table.groupby(keys, sort=False, dropna=False):
            ref = group[raw_choice[group.index] == reference]
            if ref.empty:
                continue
            base_metric = produced[ref.index[0]]
            base_cost = ref[spec.cost].iloc[0]
            extra = group[spec.cost] - base_cost
            delta = produced[group.index] - base_metric
            # a millionth of the metric is what the simulation's rounding moves: no gain
            delta = delta.where(delta.abs() > 1e-6 * produced[group.index].abs().clip(
                lower=abs(base_metric)), 0.0)
            gain = delta / extra * spec.scale
            out.append(group.assign(value=gain.where(extra > 0)))
        table = pd.concat(out) if out else table.assign(value=math.nan)
        # the reference stays, last and unvalued, so that every gain can be checked by hand
        is_reference = raw_choice[table.index] == reference
        table = table.assign(**{spec.choose: table[spec.choose].where(
            ~is_reference, table[spec.choose].map(lambda c: f"{ax.label(c)} (reference)"))})
    else:
        table = table.assign(value=metric)
    table = table.assign(__order=table["value"] if lower else -table["value"])
    # groups in the order their values first appear: by the per columns, then by set
    first = (table.groupby(spec.per, sort=False, dropna=False).ngroup() if spec.per
             else pd.Series(0, index=table.index))
    then = table.groupby(SET, sort=False, dropna=False).ngroup()
    table = table.assign(__p=first, __s=then).sort_values(["__p", "__s", "__order"],
                                                          na_position="last", kind="stable")
    columns = [*spec.per]
    if spec.among is not None:
        columns += [SET, MEMBER]
    columns += [spec.choose, spec.metric, *([spec.cost] if spec.cost else []), "value"]
    table = table[list(dict.fromkeys(columns))]
    names = {SET: spec.among.column if spec.among else "set", MEMBER: "represented by"}
    return table.rename(columns=names).reset_index(drop=True)


def answer_lines(frame: pd.DataFrame, axes: list[str], spec: AnswerSpec,
                 zipped: dict[str, list[str]] | None = None) -> list[str]:
    """One markdown bullet per group: the best choice, its value and the runner-up."""
    table = ranking(frame, axes, spec, zipped)
    set_column = spec.among.column if spec.among else None
    keys = [*spec.per, *([set_column] if set_column else [])]
    what = _value_words(spec)
    lines = []
    groups = table.groupby(keys, sort=False, dropna=False) if keys else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        where = ", ".join(_label(k, v) for k, v in zip(keys, key, strict=True)
                          if k != set_column)
        head = ", ".join(p for p in (where, str(key[-1]) if set_column else "") if p)
        lead = f"- {head}: " if head else "- "  # no `per` columns: one answer, no group
        ranked = group.dropna(subset=["value"])
        if ranked.empty:
            lines.append(f"{lead}no choice is feasible ({what})")
            continue
        best = ranked.iloc[0]
        if spec.gain_vs is not None and not best["value"] > 0:
            lines.append(f"{lead}no choice gains over {ax.label(spec.gain_vs)} "
                         f"(best {ax.label(best[spec.choose])}: {_number(best['value'])}; {what})")
            continue
        text = f"{lead}**{ax.label(best[spec.choose])}** ({_number(best['value'])} {what}"
        text += f"; {set_column} {best['represented by']})" if set_column else ")"
        tied = same_value(ranked["value"], best["value"])
        rest = ranked[~tied]
        if tied.sum() > 1:  # which of them is printed first is the table's order, not a win
            text += " tied with " + ", ".join(ax.label(c) for c in ranked[tied][spec.choose]
                                              .iloc[1:])
        if spec.gain_vs is not None and not (len(rest) and rest.iloc[0]["value"] > 0):
            text += f"; no other choice gains over {ax.label(spec.gain_vs)}"
        elif len(rest):
            second = rest.iloc[0]
            also = rest[same_value(rest["value"], second["value"])][spec.choose].iloc[1:]
            text += (f"; runner-up {', '.join(ax.label(c) for c in [second[spec.choose], *also])}"
                     f" ({_number(second['value'])})")
        lines.append(text)
    return lines


def _value_words(spec: AnswerSpec) -> str:
    if spec.gain_vs is None:
        return spec.metric
    per = f"{spec.scale:,g} " if spec.scale != 1 else ""
    return f"{spec.metric} gained over {ax.label(spec.gain_vs)} per {per}{spec.cost} spent"


def _label(column: str, value: Any) -> str:
    return f"{column.rsplit('.', 1)[-1]} {ax.label(value)}"


def _number(value: float) -> str:
    if value != value:
        return "-"
    if float(value).is_integer():
        return f"{value:,.0f}"
    return three_figures(value)


def section(frame: pd.DataFrame, axes: list[str], specs: list[AnswerSpec],
            zipped: dict[str, list[str]] | None = None) -> str:
    """The report's answer section: each question, its bullets, then its ranking table."""
    parts = []
    for spec in specs:
        parts.append(f"\n## {spec.question}\n\n")
        if frame.empty:
            parts.append("_(no results yet)_\n")
            continue
        parts.append("\n".join(answer_lines(frame, axes, spec, zipped)) + "\n")
        parts.append(f"\nEvery choice, best first ({_value_words(spec)} as `value`):\n\n")
        parts.append(md_table(ranking(frame, axes, spec, zipped)))  # no file has it: never cut
    return "".join(parts)

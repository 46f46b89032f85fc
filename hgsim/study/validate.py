"""Semantic checks that need the whole study: do derived metrics, plots and the report refer
to columns the study will actually produce, and to axis values that exist?

These run before any point is computed, so a plot of ``tokens_per_sec`` fails in a second
with its line number rather than after an hour of simulation.
"""

from __future__ import annotations

import difflib
from typing import Any

from hgsim.config_io import Loc, YamlDocument
from hgsim.study import axes as ax
from hgsim.study.derived import baselines
from hgsim.study.expand import Expansion
from hgsim.study.frame import RUN_COLUMNS, search_columns, simulation_columns
from hgsim.study.schema import Study

#: Per-resource utilisation columns depend on the machine built at run time; any
#: ``util_<name>`` is accepted here and checked when the figure is drawn.
OPEN_PREFIXES = ("util_", "power_w_")


def produced_columns(study: Study, expansion: Expansion) -> list[str]:
    """Columns the results table will have (derived ones excluded)."""
    columns = list(expansion.axes)
    if study.search is not None:
        columns += search_columns(study.search.field, study.search.column)
    else:
        columns += simulation_columns()
    tiers: list[str] = ["hbm"]
    for spec in expansion.unique_specs():
        tiers += [t for t in spec.profile.tiers if t not in tiers]
    columns += [f"mem_{t}_gb" for t in tiers]
    columns += list(RUN_COLUMNS)
    if study.equal_accuracy is not None:
        from hgsim.study.equal_accuracy import COLUMNS

        columns += list(COLUMNS)
    return list(dict.fromkeys(columns))


def check(study: Study, doc: YamlDocument, expansion: Expansion) -> list[str]:
    """Raise a ConfigError for the first bad reference; return all table columns."""
    columns = produced_columns(study, expansion)
    for name, spec in study.derived.items():
        where = ("derived", name)
        _column(spec.metric, columns, doc, (*where, "metric"))
        for key, value in spec.vs.items():
            if key not in expansion.axes:
                raise doc.error((*where, "vs", key),
                                f"'{key}' is not a sweep axis (axes: {_list(expansion.axes)})")
            _values(key, value, expansion, doc, (*where, "vs", key))
        _selection(spec.of, columns, expansion, doc, (*where, "of"))
        for i, column in enumerate(spec.group_by):
            _column(column, columns, doc, (*where, "group_by", i))
        columns += [c for c, _ in baselines(name, spec) if c not in columns]
    for name, plot in study.plots.items():
        for field, column in plot.columns().items():
            if not field.startswith("where."):
                _column(column, columns, doc, ("plots", name, field))
        _selection(plot.where, columns, expansion, doc, ("plots", name, "where"))
    report = study.report
    if report.best_metric:
        _column(report.best_metric, columns, doc, ("report", "best_metric"))
    if "best_by" in report.model_fields_set and report.best_by not in expansion.axes:
        raise doc.error(("report", "best_by"),
                        f"'{report.best_by}' is not a sweep axis (axes: {_list(expansion.axes)})")
    for i, answer in enumerate(study.answer):
        _answer(answer, columns, expansion, doc, ("answer", i))
    return columns


def _answer(spec, columns: list[str], expansion: Expansion, doc: YamlDocument,
            loc: Loc) -> None:
    """An answer block's columns exist, its choice and sets are axes, its values theirs."""
    for field in ("choose", "metric", "cost"):
        if getattr(spec, field) is not None:
            _column(getattr(spec, field), columns, doc, (*loc, field))
    for j, column in enumerate(spec.per):
        _column(column, columns, doc, (*loc, "per", j))
    axes = [("choose", spec.choose)]
    if spec.among is not None:
        axes.append(("among", spec.among.column))
        _column(spec.among.rank_by, columns, doc, (*loc, "among", "rank_by"))
    for field, axis in axes:
        where = (*loc, field) if field == "choose" else (*loc, "among", "column")
        if axis not in expansion.axes:
            raise doc.error(where, f"'{axis}' is not a sweep axis (axes: "
                                   f"{_list(expansion.axes)})")
    if spec.gain_vs is not None:
        _values(spec.choose, spec.gain_vs, expansion, doc, (*loc, "gain_vs"))
    if spec.among is not None:
        for name, members in spec.among.sets.items():
            _values(spec.among.column, members, expansion, doc, (*loc, "among", "sets", name))


def _selection(selection: dict[str, Any], columns: list[str], expansion: Expansion,
               doc: YamlDocument, loc: Loc) -> None:
    for key, value in selection.items():
        _column(key, columns, doc, (*loc, key))
        if key in expansion.axes:
            _values(key, value, expansion, doc, (*loc, key))


def _values(axis: str, value: Any, expansion: Expansion, doc: YamlDocument, loc: Loc) -> None:
    """Every selected value must be one the axis takes (catches typos such as 'flexgn')."""
    try:
        wanted = ax.normalize(axis, value)
    except ValueError as exc:
        raise doc.error(loc, str(exc)) from None
    known = expansion.axis_values[axis]
    for item in wanted if isinstance(wanted, list) else [wanted]:
        if item not in known:
            raise doc.error(loc, f"'{ax.label(item)}' is not a value of axis '{axis}' "
                                 f"(values: {_list([ax.label(k) for k in known])})")


def _column(column: Any, columns: list[str], doc: YamlDocument, loc: Loc) -> None:
    if not isinstance(column, str):
        raise doc.error(loc, f"expected a column name, got {column!r}")
    if column in columns or column.startswith(OPEN_PREFIXES):
        return
    close = difflib.get_close_matches(column, columns, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise doc.error(loc, f"column '{column}' is not produced by this study{hint} "
                         f"(columns: {_list(columns)})")


def _list(items: list[Any], limit: int = 30) -> str:
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

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
from hgsim.study.capacity_search import TEXT_COLUMNS as CAPACITY_TEXT
from hgsim.study.derived import baselines
from hgsim.study.equal_accuracy import TEXT_COLUMNS as EQUAL_ACCURACY_TEXT
from hgsim.study.expand import Expansion
from hgsim.study.frame import (
    RUN_COLUMNS,
    search_columns,
    simulation_columns,
    simulation_text_columns,
)
from hgsim.study.schema import Study

#: Per-resource utilisation columns depend on the machine built at run time; any
#: ``util_<name>`` is accepted here and checked when the figure is drawn.
OPEN_PREFIXES = ("util_", "power_w_")


def produced_columns(study: Study, expansion: Expansion) -> list[str]:
    """Columns the results table will have (derived ones excluded)."""
    columns = list(expansion.axes)
    if study.search is not None:
        columns += search_columns(study.search.field, study.search.column,
                                  study.search_simulates, study.picks_fastest)
    elif study.serving is not None:
        from hgsim.study.serving import serving_columns

        columns += serving_columns(study.serving_slo, study.serving_finds_rate,
                                   study.serving_conversations)
    else:
        columns += simulation_columns()
    if study.serving is None:  # a server's row holds no per-tier memory
        tiers: list[str] = ["hbm"]
        for spec in expansion.unique_specs():
            tiers += [t for t in spec.profile.tiers if t not in tiers]
        columns += [f"mem_{t}_gb" for t in tiers]
    columns += list(RUN_COLUMNS)
    if study.equal_accuracy is not None:
        from hgsim.study.equal_accuracy import COLUMNS

        columns += list(COLUMNS)
    return list(dict.fromkeys(columns))


def text_columns(expansion: Expansion) -> set[str]:
    """Columns that hold words (names, reasons, labels): no metric can be taken of them, and
    one named as a metric would come out as an empty column or a figure with no points."""
    from hgsim.study.serving import TEXT_COLUMNS as SERVING_TEXT

    text = {*simulation_text_columns(), *CAPACITY_TEXT, *EQUAL_ACCURACY_TEXT, *SERVING_TEXT}
    text |= {axis for axis, values in expansion.axis_values.items()
             if any(isinstance(v, str) for v in values)}
    return text


def check(study: Study, doc: YamlDocument, expansion: Expansion) -> list[str]:
    """Raise a ConfigError for the first bad reference; return all table columns."""
    columns = produced_columns(study, expansion)
    text = text_columns(expansion)

    def metric(column: Any, loc: Loc) -> None:
        _column(column, columns, doc, loc)
        if column in text:
            raise doc.error(loc, f"column '{column}' holds text, not numbers; name a metric "
                                 "such as tokens_per_s")

    for name, spec in study.derived.items():
        where = ("derived", name)
        metric(spec.metric, (*where, "metric"))
        for key, value in spec.vs.items():
            if key not in expansion.axes:
                raise doc.error((*where, "vs", key),
                                f"'{key}' is not a sweep axis (axes: {_list(expansion.axes)})")
            _values(key, value, expansion, doc, (*where, "vs", key))
        _selection(spec.of, columns, expansion, doc, (*where, "of"))
        for i, column in enumerate(spec.group_by):
            _column(column, columns, doc, (*where, "group_by", i))
        for column, _ in baselines(name, spec):
            if column in columns:  # it would overwrite that column (the policy, a metric)
                raise doc.error(where, f"derived column '{column}' is already a column of "
                                       "this study; give the derived metric another name")
            columns.append(column)
    for name, plot in study.plots.items():
        measured = {"value"} if plot.kind == "heatmap" else {"y"}
        if plot.kind == "pareto":
            measured.add("x")
        for field, column in plot.columns().items():
            if field in measured:
                metric(column, ("plots", name, field))
            elif not field.startswith("where."):
                _column(column, columns, doc, ("plots", name, field))
        _selection(plot.where, columns, expansion, doc, ("plots", name, "where"))
    if study.sensitivity is not None:
        metric(study.sensitivity.metric, ("sensitivity", "metric"))
    report = study.report
    if report.best_metric:
        metric(report.best_metric, ("report", "best_metric"))
    if report.best_by is not None and report.best_by not in expansion.axes:
        raise doc.error(("report", "best_by"),
                        f"'{report.best_by}' is not a sweep axis (axes: {_list(expansion.axes)})")
    for i, answer in enumerate(study.answer):
        _answer(answer, columns, expansion, doc, ("answer", i), metric)
    return columns


def _answer(spec, columns: list[str], expansion: Expansion, doc: YamlDocument,
            loc: Loc, metric) -> None:
    """An answer block's columns exist (those it ranks by numeric), its choice and sets are
    axes, its values theirs."""
    _column(spec.choose, columns, doc, (*loc, "choose"))
    for field in ("metric", "cost"):
        if getattr(spec, field) is not None:
            metric(getattr(spec, field), (*loc, field))
    for j, column in enumerate(spec.per):
        _column(column, columns, doc, (*loc, "per", j))
    axes = [("choose", spec.choose)]
    if spec.among is not None:
        axes.append(("among", spec.among.column))
        metric(spec.among.rank_by, (*loc, "among", "rank_by"))
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

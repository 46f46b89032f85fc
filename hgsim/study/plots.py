"""Figures of the results table as a study file specifies them (seaborn line/bar/scatter/heatmap,
and pareto: a scatter with the front of optimal points drawn through it).

Axis columns keep the order written in the study (policies in legend order, contexts in
sweep order); numbers used as categories (facets, hue) are labelled the way people say them
(131072 -> 128k). Each plot is saved as PNG (for the report) and SVG (for papers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from hgsim.outputs import written_whole
from hgsim.study import axes as ax
from hgsim.study.derived import select
from hgsim.study.pool import ignore_sigint, process_context, terminate_pool
from hgsim.study.schema import DerivedSpec, PlotSpec

FORMATS = ("png", "svg")
_PREFIXES = ("workload.", "policy_options.", "fidelity.", "hardware.", "label.")


def short(column: str) -> str:
    """A column name for axis labels: the axis section prefix dropped."""
    for prefix in _PREFIXES:
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def draw_all(frame: pd.DataFrame, plots: dict[str, PlotSpec], axis_values: dict[str, list],
             out: Path, ratios: set[str] | frozenset[str] = frozenset(),
             zipped: dict[str, list[str]] | None = None,
             derived: dict[str, DerivedSpec] | None = None, jobs: int = 1,
             ) -> tuple[list[Path], dict[str, str]]:
    """Every plot into ``out``; returns written files and {plot: error} for failed ones.
    ``ratios``: columns that are ratios (``derived.ratio_columns``), coloured around 1 on a
    log scale in heatmaps; ``zipped``: axis -> its zip partners (a policy at two zipped
    settings is two legend entries); ``derived``: the study's derived metrics (a derived
    column is drawn for the rows its ``of`` selects). ``jobs`` > 1 draws the figures in that
    many processes (each figure is independent; cxl_sweep's four took 25 s of a 128 s run
    drawn one after another); the files are the same either way."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(frame, name, spec, axis_values, out, ratios, zipped, derived)
             for name, spec in plots.items()]
    if jobs > 1 and len(tasks) > 1:
        results = _draw_in_pool(tasks, jobs)
    else:
        _use_agg()
        results = [draw_one(*task) for task in tasks]
    written: list[Path] = []
    failed: dict[str, str] = {}
    for name, (paths, error) in zip(plots, results, strict=True):
        written += paths
        if error is not None:
            failed[name] = error
    return written, failed


def draw_one(frame: pd.DataFrame, name: str, spec: PlotSpec, axis_values: dict[str, list],
             out: Path, ratios: set[str] | frozenset[str] = frozenset(),
             zipped: dict[str, list[str]] | None = None,
             derived: dict[str, DerivedSpec] | None = None,
             ) -> tuple[list[Path], str | None]:
    """One figure: (files written, None), or ([], its error) with its files removed. At
    module level so a process pool can run it under any start method."""
    try:
        return draw(frame, name, spec, axis_values, out, ratios, zipped, derived), None
    except Exception as exc:  # noqa: BLE001 - one bad figure must not lose the others
        _remove_figure(out, name)
        return [], f"{type(exc).__name__}: {exc}"


def _remove_figure(out: Path, name: str) -> None:
    """An earlier run's figure would pass for this run's; so would a temporary file that a
    worker ended midway left beside it (``written_whole`` names it with the worker's pid)."""
    for fmt in FORMATS:
        (out / f"{name}.{fmt}").unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.{fmt}.*.tmp"):
            tmp.unlink(missing_ok=True)


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)


def _pool_worker_start() -> None:
    """A figure worker: no display (Agg, as in the main process) and Ctrl-C left to the
    parent, which ends the pool. The seaborn theme is set by ``figure`` for each plot."""
    _use_agg()
    ignore_sigint()


def _draw_in_pool(tasks: list[tuple], jobs: int) -> list[tuple[list[Path], str | None]]:
    """``draw_one`` of each task on a process pool, results in task order. A worker that dies
    (killed, out of memory) fails its figures, whose files are removed; Ctrl-C ends the
    workers and removes the files of the figures not finished."""
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=process_context(),
                               initializer=_pool_worker_start)
    futures = [pool.submit(draw_one, *task) for task in tasks]
    results: list[tuple[list[Path], str | None]] = []
    lost: list[tuple] = []  # tasks whose worker failed, not their plot
    try:
        for future, task in zip(futures, tasks, strict=True):
            try:
                results.append(future.result())
            except Exception as exc:  # noqa: BLE001 - e.g. BrokenProcessPool
                lost.append(task)
                results.append(([], f"{type(exc).__name__}: {exc}"))
    except BaseException:
        terminate_pool(pool)
        for task in tasks[len(results):] + lost:
            _remove_figure(task[4], task[1])
        raise
    pool.shutdown(wait=True)  # every worker has ended: none still writes the files removed
    for task in lost:
        _remove_figure(task[4], task[1])
    return results


def draw(frame: pd.DataFrame, name: str, spec: PlotSpec, axis_values: dict[str, list],
         out: Path, ratios: set[str] | frozenset[str] = frozenset(),
         zipped: dict[str, list[str]] | None = None,
         derived: dict[str, DerivedSpec] | None = None) -> list[Path]:
    import matplotlib.pyplot as plt

    grid = figure(frame, name, spec, axis_values, ratios, zipped, derived)
    paths = []
    for fmt in FORMATS:
        path = out / f"{name}.{fmt}"
        with written_whole(path, "wb") as fh:
            grid.figure.savefig(fh, format=fmt, dpi=130, bbox_inches="tight")
        paths.append(path)
    plt.close(grid.figure)
    return paths


def figure(frame: pd.DataFrame, name: str, spec: PlotSpec, axis_values: dict[str, list],
           ratios: set[str] | frozenset[str] = frozenset(),
           zipped: dict[str, list[str]] | None = None,
           derived: dict[str, DerivedSpec] | None = None):
    """The plot's seaborn grid, drawn and titled but not saved (tests read it back)."""
    import seaborn as sns

    missing = [c for f, c in spec.columns().items() if c not in frame.columns]
    if missing:
        raise KeyError(f"column '{missing[0]}' is not in the results")
    data = frame[select(frame, spec.where)] if spec.where else frame
    y_col = spec.value if spec.kind == "heatmap" else spec.y
    of = _derived_of(y_col, derived)
    if of:  # rows outside `of` have no value by construction (the baseline's, say): no bars
        data = data[select(data, of)]
    data = data.assign(**{y_col: pd.to_numeric(data[y_col], errors="coerce")})
    data, orders = _categories(data, spec, axis_values, zipped)

    sns.set_theme(style="whitegrid", context="paper")
    facet = {"row": spec.row, "col": spec.col, "height": spec.height, "aspect": spec.aspect,
             "row_order": orders.get(spec.row), "col_order": orders.get(spec.col)}
    if spec.col_wrap:
        facet["col_wrap"] = spec.col_wrap
    if spec.kind in ("line", "scatter", "pareto"):
        # seaborn's relplot fails on rows whose y are all NaN (every point infeasible); an
        # empty table draws the empty axes that the note below explains
        drawn = data.iloc[:0] if data[y_col].isna().all() else data
        grid = sns.relplot(
            data=drawn, x=spec.x, y=spec.y, hue=spec.hue, style=spec.style,
            kind="scatter" if spec.kind == "pareto" else spec.kind,
            hue_order=orders.get(spec.hue), style_order=orders.get(spec.style),
            facet_kws={"sharey": spec.sharey, "margin_titles": True},
            **({"marker": "o", "errorbar": None} if spec.kind == "line" else {}), **facet,
        )
    elif spec.kind == "bar":
        grid = sns.catplot(
            data=data, x=spec.x, y=spec.y, hue=spec.hue, kind="bar", errorbar=None,
            order=orders.get(spec.x), hue_order=orders.get(spec.hue), sharey=spec.sharey,
            margin_titles=True, **facet,
        )
    else:
        grid = _heatmap(data, spec, facet, orders, spec.value in ratios)
    from_one = spec.kind == "bar" and spec.logy and y_col in ratios
    if spec.kind == "bar":
        _mark_missing_bars(grid, data, spec, orders, derived_from=_derived_name(y_col, derived),
                           foot=1.0 if from_one else None)
    if spec.kind == "pareto":
        from hgsim.study.pareto import draw_fronts

        data = data.assign(**{spec.x: pd.to_numeric(data[spec.x], errors="coerce")})
        draw_fronts(grid, data, spec)
    if spec.logx and spec.kind != "heatmap":
        grid.set(xscale="log")
        _plain_log_ticks(grid, "x", _numeric(axis_values.get(spec.x)), _is_count(spec.x))
    if spec.logy and spec.kind != "heatmap":
        grid.set(yscale="log")
        if from_one:
            _bars_from_one(grid, spec.sharey)
        _plain_log_ticks(grid, "y", None, _is_count(spec.y))
    grid.set_axis_labels(spec.xlabel or short(spec.x), spec.ylabel or short(spec.y))
    if spec.kind == "bar" and _crowded(orders.get(spec.x, [])):
        _slant_x_labels(grid)
    if spec.row or spec.col:
        row_title = f"{short(spec.row or '')} = {{row_name}}"
        col_title = f"{short(spec.col or '')} = {{col_name}}"
        both = {"template": f"{row_title} | {col_title}"} if spec.row and spec.col else {}
        grid.set_titles(row_template=row_title, col_template=col_title, **both)
    if data.empty or data[y_col].isna().all():
        grid.figure.text(0.5, 0.5, "no feasible points", ha="center", va="center")
    title = spec.title or name
    grid.figure.suptitle(title, y=1.02)
    legend = getattr(grid, "legend", None) or getattr(grid, "_legend", None)
    for text in (legend.texts + [legend.get_title()]) if legend else []:
        if text.get_text() in (spec.hue, spec.style):  # "label.upgrade" -> "upgrade"
            text.set_text(short(text.get_text()))
    if _labels_overlap(grid):  # narrow cells ("64k128k256k" under a heatmap)
        _slant_x_labels(grid)
    _place_notes(grid)
    return grid


def _is_count(column: str | None) -> bool:
    """A column of tokens or sequences, labelled 32k and 1M like the tables."""
    return bool(column) and column.rsplit(".", 1)[-1] in ax.COUNT_COLUMNS


def _slant_x_labels(grid) -> None:
    for axes in grid.axes.flat:
        axes.tick_params(axis="x", labelrotation=35)
        for text in axes.get_xticklabels():
            text.set_horizontalalignment("right")


def _labels_overlap(grid) -> bool:
    """Whether two x tick labels of a panel run into each other as drawn."""
    renderer = grid.figure.canvas.get_renderer()
    for axes in grid.axes.flat:
        boxes = sorted((t.get_window_extent(renderer) for t in axes.get_xticklabels()
                        if t.get_visible() and t.get_text()), key=lambda b: b.x0)
        if any(b.x0 < a.x1 + 2 for a, b in zip(boxes, boxes[1:], strict=False)):
            return True
    return False


#: Notes under a figure (what a mark means) carry this gid, so they are placed last.
NOTE_GID = "hgsim-note"


def _note(grid, text: str) -> None:
    grid.figure.text(0.01, 0.0, text, ha="left", va="top", fontsize=8, gid=NOTE_GID)


def _place_notes(grid) -> None:
    """Notes below everything else drawn (slanted tick labels reach below the figure's
    edge, where a note at its foot ran into them)."""
    figure = grid.figure
    notes = [t for t in figure.texts if t.get_gid() == NOTE_GID]
    if not notes:
        return
    renderer = figure.canvas.get_renderer()
    bottom = min(a.get_tightbbox(renderer).y0 for a in figure.axes)
    height = figure.bbox.height
    for text in notes:
        text.set_y(min(0.0, (bottom - 6) / height))


#: What a bar that is missing because its point does not fit is drawn as.
INFEASIBLE_MARK = {"marker": "x", "color": "0.25", "markersize": 7, "linestyle": "none"}
INFEASIBLE_NOTE = "x: infeasible point, no bar (does not fit; reasons in report.md)"
#: What a bar that is missing although its point ran is drawn as: a hollow circle.
NO_VALUE_MARK = {"marker": "o", "markerfacecolor": "none", "markeredgecolor": "0.25",
                 "markersize": 6, "linestyle": "none"}
NO_VALUE_NOTE = "o: feasible point, no bar: it has no {y} value"
NO_BASELINE_NOTE = "o: feasible point, no bar: no baseline for {y} there (infeasible or not run)"


def _derived_of(column: str, derived: dict[str, DerivedSpec] | None) -> dict[str, Any]:
    """The ``of`` selection of the derived metric that makes ``column`` ({} if none)."""
    name = _derived_name(column, derived)
    return derived[name].of if name else {}


def _derived_name(column: str, derived: dict[str, DerivedSpec] | None) -> str | None:
    from hgsim.study.derived import derived_columns

    return derived_columns(derived).get(column) if derived else None


def _mark_missing_bars(grid, data: pd.DataFrame, spec: PlotSpec, orders: dict[str, list[str]],
                       derived_from: str | None = None, foot: float | None = None) -> None:
    """A mark at the foot of every bar that has no value, and a note under the figure, so
    that a missing bar does not read as zero or as a point not run: an x where every point
    of the bar is infeasible, a hollow o where a point ran but has no value (a derived
    metric whose baseline is infeasible there, a NaN metric). Bars sit where seaborn dodges
    them: category i, hue j of n at i - 0.4 + 0.8 (j + 0.5) / n; their foot is the axis'
    floor, or ``foot`` in data units (1 for ratio bars, ``_bars_from_one``)."""
    from matplotlib.transforms import blended_transform_factory

    if "feasible" not in data:
        return
    hue_order = orders.get(spec.hue) if spec.hue else None
    x_order = orders.get(spec.x, [])
    marked: set[str] = set()
    keys = [spec.x, spec.hue] if spec.hue else [spec.x]
    for (i, j, _), facet in grid.facet_data():
        if facet.empty:
            continue
        cells = facet.assign(__ok=facet["feasible"].fillna(False).astype(bool),
                             __has=facet[spec.y].notna()).groupby(keys, sort=False,
                                                                 observed=True)
        axes = grid.axes.flat[j] if spec.col_wrap else grid.axes[i, j]
        for key, cell in cells:
            if cell["__has"].any():
                continue
            kind = "no value" if cell["__ok"].any() else "infeasible"
            key = key if isinstance(key, tuple) else (key,)
            position = x_order.index(key[0])
            if hue_order:
                position += -0.4 + 0.8 * (hue_order.index(key[1]) + 0.5) / len(hue_order)
            transform = axes.transData if foot is not None else blended_transform_factory(
                axes.transData, axes.transAxes)
            axes.plot([position], [0.02 if foot is None else foot], transform=transform,
                      clip_on=False, **(NO_VALUE_MARK if kind == "no value" else INFEASIBLE_MARK))
            marked.add(kind)
    notes = [INFEASIBLE_NOTE] if "infeasible" in marked else []
    if "no value" in marked:
        notes.append((NO_BASELINE_NOTE if derived_from else NO_VALUE_NOTE).format(
            y=short(spec.y)))
    if notes:
        _note(grid, "\n".join(notes))


def _bars_from_one(grid, shared: bool) -> None:
    """Ratio bars from 1, up for a gain and down for a loss, with a line at 1. On a log axis
    seaborn's bars rise from wherever the axis happens to end, so a 0.98 stood as a short bar
    up, a small gain to the eye; 1 is where a ratio means no change (and a log axis has no
    0). The y range is set to hold every bar's end and 1, with a margin."""
    import math

    ends: list[list[float]] = []
    for axes in grid.axes.flat:
        panel = []
        for bar in axes.patches:  # seaborn's bars: from 0 (y) up to the value
            value = bar.get_y() + bar.get_height()
            if math.isfinite(value) and value > 0:
                bar.set_y(1.0)
                bar.set_height(value - 1.0)
                panel.append(value)
        axes.axhline(1.0, color="0.25", linewidth=0.9, zorder=2.5)  # above the grid lines
        ends.append(panel)
    panels = [[v for panel in ends for v in panel]] * len(ends) if shared else ends
    for axes, values in zip(grid.axes.flat, panels, strict=True):
        low, high = min([1.0, *values]), max([1.0, *values])
        margin = (high / low) ** 0.06 if high > low else 1.1
        axes.set_ylim(low / margin, high * margin)


def _crowded(labels: list[str]) -> bool:
    """Category labels that would overlap side by side."""
    return sum(len(str(t)) for t in labels) > 40


def _numeric(values: list | None) -> list[float] | None:
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                      for v in values):
        return sorted(float(v) for v in values)
    return None


def _plain_log_ticks(grid, which: str, ticks: list[float] | None, count: bool = False) -> None:
    """Log axes labelled 16, 32, 64 rather than 2x10^1: swept values as ticks when known;
    token counts at powers of two read 32k, 1M (as in the tables; 1e+06 before); otherwise
    plain numbers at the decades, and at 2 and 5 between them where the axis spans less
    than three decades (0.3 and 0.4, 300 and 400 ran into each other)."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    plain = FuncFormatter(lambda v, _: ax.label(v) if count else f"{v:g}")
    for axes in grid.axes.flat:
        axis = axes.xaxis if which == "x" else axes.yaxis
        low, high = sorted(axes.get_xlim() if which == "x" else axes.get_ylim())
        if ticks and len(ticks) <= 12:
            (axes.set_xticks if which == "x" else axes.set_yticks)(ticks)
            axis.set_minor_formatter(NullFormatter())
            axis.set_major_formatter(plain)
            continue
        if count and low > 0:
            first, last = math.ceil(math.log2(low)), math.floor(math.log2(high))
            step = next(s for s in (1, 2, 5, 10, 20) if (last - first) // s < 8)
            powers = [2.0 ** e for e in range(first, last + 1) if e % step == 0]
            if len(powers) >= 2:
                axis.set_major_locator(FixedLocator(powers))
                axis.set_minor_locator(NullLocator())
                axis.set_major_formatter(plain)
                continue
        spans = math.log10(high / low) if low > 0 else math.inf
        mantissas = (1, 2, 5) if spans < 3 else (1,)
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _, m=mantissas: plain(v) if _mantissa(v) in m else ""))


def _mantissa(value: float) -> int:
    """The leading digit of a log-axis tick: 3 for 300."""
    import math

    return round(value / 10 ** math.floor(math.log10(value) + 1e-9)) if value > 0 else 0


#: The category of a null axis value (as the report's configuration table writes it).
NOT_SET = "not set"


def _categories(data: pd.DataFrame, spec: PlotSpec, axis_values: dict[str, list],
                zipped: dict[str, list[str]] | None = None):
    """Categorical roles (facets, hue, style, bar x) as labelled strings in study order; a
    value run at several settings of an axis zipped with it is one category per setting,
    named with it (``hybridgen (topk_ratio 0.05)``), not their mean under one name."""
    roles = [spec.row, spec.col, spec.hue, spec.style]
    if spec.kind in ("bar", "heatmap"):
        roles += [spec.x]
    if spec.kind == "heatmap":
        roles += [spec.y]
    orders: dict[str, list[str]] = {}
    data = data.copy()
    # what the figure tells apart already: its roles, and what a label among them names
    shown = {c for c in roles if c}
    shown |= {p for c in shown if c.startswith("label.") for p in (zipped or {}).get(c, ())}
    for column in dict.fromkeys(c for c in roles if c):
        exclude = shown - {column}
        if ax.partners(data, column, zipped, exclude):
            data[column] = ax.choice_names(data, column, zipped, exclude)
            orders[column] = list(dict.fromkeys(data[column]))
            continue
        # null (an option or SLO not set there) is one category, "not set": as NaN it is a
        # value unequal to itself, which the label map below cannot index
        data[column] = data[column].astype(object).where(data[column].notna(), NOT_SET)
        present = list(dict.fromkeys(data[column].tolist()))
        known = [NOT_SET if v is None else v for v in axis_values.get(column, [])]
        ordered = [v for v in known if v in present] + [v for v in present if v not in known]
        if not known and all(isinstance(v, (int, float)) for v in present):
            ordered = sorted(present)
        labels = {v: ax.label(v) for v in ordered}
        data[column] = data[column].map(labels)
        orders[column] = list(dict.fromkeys(labels[v] for v in ordered))
    return data, orders


def _heatmap(data: pd.DataFrame, spec: PlotSpec, facet: dict[str, Any],
             orders: dict[str, list[str]], ratio: bool = False):
    import numpy as np
    import seaborn as sns

    values = data[spec.value].dropna()
    vmin, vmax = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    cmap, norm = "viridis", None
    logged = ratio and spec.center in (None, 1.0) and len(values) and (values > 0).all()
    if logged:  # colour by ln(ratio), each side of 1 to its own extreme
        norm, cmap = ratio_norm(vmin, vmax), "vlag"
    elif spec.center is not None:  # diverging, symmetric around the centre
        reach = max(abs(vmax - spec.center), abs(vmin - spec.center)) or 1.0
        vmin, vmax, cmap = spec.center - reach, spec.center + reach, "vlag"
    scale = {"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}
    x_order, y_order = orders[spec.x], orders[spec.y]
    marked: set[str] = set()

    def draw(*_: Any, data: pd.DataFrame, **__: Any) -> None:
        import matplotlib.pyplot as plt

        table = data.pivot_table(index=spec.y, columns=spec.x, values=spec.value,
                                  aggfunc=spec.agg, observed=False)
        table = table.reindex(index=y_order[::-1], columns=x_order)
        axes = plt.gca()
        axes.grid(False)  # the style's grid lines crossed the cells, empty ones most visibly
        shown = np.log(table) if logged else table  # cells print the ratio itself
        annot = table.to_numpy() if logged and spec.annot else spec.annot
        # every row and column named (seaborn drops some where cells are narrow; the
        # figure slants them instead, see _labels_overlap)
        sns.heatmap(shown, ax=axes, annot=annot, fmt=spec.fmt, cmap=cmap, cbar=True,
                    cbar_kws={"label": short(spec.value)}, xticklabels=True,
                    yticklabels=True, **scale)
        if logged:
            _ratio_ticks(axes.collections[0].colorbar)
        # seaborn turns row names vertical unless it sees them overlap, which it judges
        # before the layout is final: 'hgca' and 'cpu_offload' ran into each other
        axes.tick_params(axis="y", labelrotation=0)
        marked.update(_mark_empty_cells(axes, data, table, spec))

    # no margin titles: each panel's colour bar stands where a row's title would, and the
    # two ran into each other (cxl_sweep's "cores = 64" over "latency_cost")
    grid = sns.FacetGrid(data, **facet, margin_titles=False, despine=False)
    grid.map_dataframe(draw)
    notes = [INFEASIBLE_CELL_NOTE] if "infeasible" in marked else []
    if "no value" in marked:
        notes.append(NO_VALUE_CELL_NOTE.format(y=short(spec.value)))
    if notes:
        _note(grid, "\n".join(notes))
    return grid


INFEASIBLE_CELL_NOTE = "x: infeasible point, no value (does not fit; reasons in report.md)"
NO_VALUE_CELL_NOTE = "o: feasible point without a {y} value (a derived metric: no baseline there)"


def _mark_empty_cells(axes, data: pd.DataFrame, table: pd.DataFrame, spec: PlotSpec
                      ) -> set[str]:
    """An x in each cell whose points are all infeasible, an o in a cell whose point ran but
    has no value: a blank cell read as a point not run. Returns the kinds marked."""
    if "feasible" not in data:
        return set()
    ran = data.assign(__ok=data["feasible"].fillna(False).astype(bool)).pivot_table(
        index=spec.y, columns=spec.x, values="__ok", aggfunc="any", observed=False)
    ran = ran.reindex(index=table.index, columns=table.columns)
    kinds = set()
    for r, row_name in enumerate(table.index):
        for c, column_name in enumerate(table.columns):
            if pd.notna(table.iat[r, c]) or pd.isna(ran.loc[row_name, column_name]):
                continue  # a value, or no point at all in this cell
            kind = "no value" if ran.loc[row_name, column_name] else "infeasible"
            axes.text(c + 0.5, r + 0.5, "o" if kind == "no value" else "x", ha="center",
                      va="center", color="0.35", fontsize=9)
            kinds.add(kind)
    return kinds


#: A ratio this close to 1 is no change: the colour scale reaches at least this far.
RATIO_FLOOR = 1.02


def ratio_norm(vmin: float, vmax: float):
    """Colours for ln(ratio): white at 1, each side of 1 reaching its own extreme (at least
    x/1.02), so that a 0.98 beside 1.00 is visibly blue even where another cell is 9x.
    The two sides' depths are then not comparable: the colour bar and cells give the size."""
    import math

    from matplotlib.colors import TwoSlopeNorm

    floor = math.log(RATIO_FLOOR)
    return TwoSlopeNorm(vcenter=0.0, vmin=min(math.log(vmin), -floor),
                        vmax=max(math.log(vmax), floor))


def _ratio_ticks(colorbar) -> None:
    """Colour-bar ticks at plain ratios (0.5, 0.98, 1, 2), up to four on each side of 1."""
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter

    above = [1.01, 1.02, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100]
    below = [0.99, 0.98, 0.95, 0.9, 0.8, 0.67, 0.5, 0.33, 0.2, 0.1, 0.05, 0.02, 0.01]
    ticks = [0.0]
    for nice, reach in ((above, colorbar.norm.vmax), (below, colorbar.norm.vmin)):
        last = 0.0
        for ratio in nice:
            where = math.log(ratio)
            if abs(where) > abs(reach) + 1e-12:
                break
            if abs(where - last) >= abs(reach) / 4 - 1e-12:
                ticks.append(where)
                last = where
    colorbar.ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{math.exp(v):.3g}"))
    colorbar.ax.minorticks_off()


def draw_elasticity(table: pd.DataFrame, expansion, spec, out: Path
                    ) -> tuple[list[Path], dict[str, str]]:
    """Heatmap of a sensitivity study: parameters across, the sweep's points down (the
    policy, when it is swept), one panel per value of the next swept axis."""
    from hgsim.study import sensitivity as sens
    from hgsim.study.schema import PlotSpec

    others = [a for a in expansion.axes if a not in sens.AXES]
    rows = "policy" if "policy" in others else (others[0] if others else None)
    if rows is None:
        table = table.assign(point="all")
        rows = "point"
    facets = [a for a in others if a != rows and table[a].nunique() > 1]
    col = None
    values = dict(expansion.axis_values)
    if facets:  # one panel per combination of the other axes (zipped axes stay together)
        col = "regime"
        labels = table[facets].apply(
            lambda r: ", ".join(f"{parameter_label(a)} {_short_number(r[a])}" for a in facets),
            axis=1)  # "regime = cpu0.cores 8, ddr0.capacity_gb 137", not "... = 137.439"
        table = table.assign(regime=labels)
        values["regime"] = list(dict.fromkeys(labels))
    table = table.assign(parameter=table["parameter"].map(parameter_label))
    plot = PlotSpec(kind="heatmap", x="parameter", y=rows, value="elasticity", col=col,
                    col_wrap=1 if col else None, fmt="+.2f", center=0.0,
                    title=f"Elasticity of {spec.metric} to each parameter (x{1 + spec.step:g} "
                          f"and /{1 + spec.step:g}, one at a time)",
                    xlabel="hardware parameter", height=3.6, aspect=3.4)
    values["parameter"] = [parameter_label(p) for p in spec.parameters]
    return draw_all(table, {"elasticity": plot}, values, out)  # one figure: in this process


def _short_number(value: Any) -> str:
    """A value in a panel title: counts as 128k, other numbers to three figures."""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    return ax.label(value)


def parameter_label(path: str) -> str:
    """``hardware.tiers.cxl0.latency_ns`` -> ``cxl0.latency_ns``: the element and its field."""
    path = path.removeprefix("hardware.")
    head, _, rest = path.partition(".")
    return rest if head in ("tiers", "sockets", "links", "gpus") and rest else path

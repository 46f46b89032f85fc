"""``report.md``: the tables an architect reads first, written from the results table.

Which policy wins at each point and by how much, the derived metrics summarised per group
(geometric mean first: it is the honest average of ratios), capacity limits, and every
infeasible or failed point with its reason, so nothing that did not run goes unnoticed.
Long tables are cut at ``report.max_rows`` with a pointer to the file holding every row
(results.csv, elasticity.csv); an answer's ranking is in no file, so it is never cut.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hgsim import __version__
from hgsim.outputs import written_whole
from hgsim.study import axes as ax
from hgsim.study.derived import LOWER_IS_BETTER, better, summarize
from hgsim.study.plots import short
from hgsim.study.schema import CONVERSATION_DEFAULTS, Study
from hgsim.units import dimension_of, parse_quantity, split_quantity

#: What a searched maximum counts, for the heading of its table.
SEARCH_UNITS = {"context": " (tokens per sequence; 1k = 1,024)", "batch": " (sequences)"}

#: The sensitivity table's column of rate elasticities less time elasticities.
TIME_SCALING = "rates - times"


@dataclass
class RunInfo:
    """What happened in this run, for the report's header."""

    source: str
    total: int
    computed: int
    reused: int
    missing: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    figure_errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


def fmt(value: Any, column: str = "") -> str:
    """A cell: counts as 128k, floats to three significant figures (whole numbers from
    100 on), missing as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    last = column.rsplit(".", 1)[-1]
    if last in ax.COUNT_COLUMNS and isinstance(value, (int, float)):
        return ax.label(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}" if abs(value) >= 1e4 else str(int(value))
        return three_figures(value)
    if isinstance(value, int):
        return str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def as_results_show(column: str, value: Any) -> Any:
    """A configuration value as the results tables show it: a hardware quantity in its field's
    unit (decimal GB for ``*_gb``), then what the study wrote where that reads differently:
    ``768 GiB`` -> ``825 (768 GiB)``, so that the configuration and the results agree."""
    if not column.startswith("hardware.") or not isinstance(value, str):
        return value
    dimension = dimension_of(column.rsplit(".", 1)[-1])
    if dimension is None:
        return value
    written = value.strip(" ")
    try:
        number = parse_quantity(written, dimension)
        bare, _ = split_quantity(written)  # the number without its unit
    except ValueError:  # the study was checked when loaded; show what it says
        return value
    shown = fmt(number, column)
    return shown if bare == number else f"{shown} ({written})"  # 1000 GB is just 1000


def three_figures(value: float) -> str:
    """Three significant figures with trailing zeros kept (0.9995 and 1.0004 both read 1.00),
    whole numbers from 100 on: the report's and the answers' one rule for a measured value."""
    if abs(value) >= 99.95:
        return f"{value:,.0f}"
    return f"{value:#.3g}".rstrip(".")


def md_table(frame: pd.DataFrame, max_rows: int | None = None,
             full_in: str = "results.csv") -> str:
    """A markdown table cut at ``max_rows``; ``full_in`` names the file with every row, so
    only tables whose rows a file holds may be cut."""
    if frame.empty:
        return "_(none)_\n"
    shown = frame if max_rows is None else frame.head(max_rows)
    header = [short(str(c)) for c in shown.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in shown.iterrows():
        lines.append("| " + " | ".join(fmt(row[c], str(c)) for c in shown.columns) + " |")
    if max_rows is not None and len(frame) > max_rows:
        lines.append(f"\n_... {len(frame) - max_rows} more rows in {full_in}_")
    return "\n".join(lines) + "\n"


def best_metric(study: Study) -> str:
    if study.report.best_metric:
        return study.report.best_metric
    if study.serving is not None:
        return "max_rate_per_s" if study.serving_finds_rate else "output_tokens_per_s"
    return study.search.column if study.search else "tokens_per_s"


def fixed_rate_metric(frame: pd.DataFrame) -> str:
    """What fixed-rate serving points are ranked by: the share of requests meeting the SLO
    where there is one, else the mean end-to-end latency. Not the throughput: at a fixed
    Poisson rate every policy that keeps up serves the same load, so it ties."""
    if "slo_attainment" in frame and pd.to_numeric(frame["slo_attainment"],
                                                   errors="coerce").notna().any():
        return "slo_attainment"
    return "e2e_mean_s"


#: Why the fixed-rate ranking is by that metric, per metric.
FIXED_RATE_WHY = {
    "slo_attainment": "the share of requests that meet the SLO, higher is better",
    "e2e_mean_s": "the mean end-to-end latency of a request, lower is better (no SLO is set)",
}


def no_limit(frame: pd.DataFrame) -> pd.Series:
    """The rows of rate searches that found no limit: no ``max_rate_per_s``, yet rates were
    tried and none of them missed the SLO (nothing it is lost to, ``slo_bound_by`` empty), as
    when the SLO is met with every request arriving at once. A search that missed the SLO at
    every rate names what it was lost to; one that tried no rate is infeasible."""
    if not {"max_rate_per_s", "rates_tried", "slo_bound_by"} <= set(frame.columns):
        return pd.Series(False, index=frame.index)
    missing = pd.to_numeric(frame["max_rate_per_s"], errors="coerce").isna()
    tried = pd.to_numeric(frame["rates_tried"], errors="coerce").fillna(0) > 0
    lost = frame["slo_bound_by"].fillna("").astype(str) != ""
    return missing & tried & ~lost


#: The best-per-point table's cell for a search that found no limit.
NO_LIMIT = "no limit found"


@dataclass
class BestSection:
    """One best-per-point table: its rows, the axes they vary in, what ranks them, and the
    words after its heading (``title``) and under it (``why``)."""

    frame: pd.DataFrame
    axes: list[str]
    metric: str
    title: str = ""
    why: str = ""


def best_sections(study: Study, frame: pd.DataFrame, axes: list[str]) -> list[BestSection]:
    """The best-per-point tables: one, except in a serving study that sweeps ``find_rate``,
    whose points at a fixed rate and searching points have no metric in common: each is
    ranked by its own (fixed rate: ``fixed_rate_metric``; searching: ``max_rate_per_s``).
    ``report.best_metric`` ranks every point by the metric it names."""
    if study.serving is None or study.report.best_metric:
        return [BestSection(frame, axes, best_metric(study))]

    def fixed(part: pd.DataFrame, on: list[str]) -> BestSection:
        metric = fixed_rate_metric(part)
        return BestSection(part, on, metric, " at the fixed rate",
                           f"At a fixed arrival rate every policy that keeps up serves the same "
                           f"load (the same `output_tokens_per_s`), so these points are ranked by "
                           f"`{metric}`: {FIXED_RATE_WHY[metric]}.\n\n")

    def search(part: pd.DataFrame, on: list[str]) -> BestSection:
        return BestSection(part, on, "max_rate_per_s", " at the highest rate meeting the SLO",
                           f"`{NO_LIMIT}`: the rate search found no rate at which the SLO is "
                           "missed (`note` says why); it ranks above any rate found.\n\n"
                           if no_limit(part).any() else "")

    column = "serving.find_rate"
    if column in axes and column in frame:
        searching = frame[column].fillna(False).astype(bool)
        rest = [a for a in axes if a != column]
        return [s for s in (fixed(frame[~searching], rest), search(frame[searching], rest))
                if len(s.frame)]
    return [search(frame, axes) if study.serving.find_rate else fixed(frame, axes)]


#: How the best-per-point table joins choices tied to the simulation's rounding.
TIE = " = "


def same_value(values: pd.Series, value: float) -> pd.Series:
    """Which ``values`` equal ``value`` to a millionth: the simulation's rounding, so two
    choices that run the same plan (gpu_only and hybridgen when the KV cache fits in HBM) tie
    rather than one winning by the order a sort left them in. A real 0.01% is a result."""
    return (values - value).abs() <= 1e-6 * max(abs(value), 1e-300)


def best_table(frame: pd.DataFrame, axes: list[str], by: str, metric: str,
               zipped: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Per combination of the other axes (less those zipped with ``by``): the best value of
    ``by`` and its margin. A value of ``by`` run at several settings of an axis zipped with
    it is named with that setting (``hybridgen (topk_ratio 0.05)``). A rate search that found
    no limit (``no_limit``) ranks above any rate found and reads ``no limit found``; the
    ``reason`` of every point without a value is in a ``note`` column."""
    if by not in axes or metric not in frame or frame[by].nunique() < 2:
        return pd.DataFrame()
    lower = bool(LOWER_IS_BETTER.search(metric))
    others = ax.held_equal(axes, [by], zipped)
    values = pd.to_numeric(frame[metric], errors="coerce")
    unlimited = no_limit(frame) if metric == "max_rate_per_s" else pd.Series(
        False, index=frame.index)
    data = frame.assign(**{by: ax.choice_names(frame, by, zipped),
                           "__m": values.mask(unlimited, math.inf)})
    groups = data.groupby(others, sort=False, dropna=False) if others else [((), data)]
    rows = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        ranked = part.dropna(subset=["__m"]).sort_values("__m", ascending=lower, kind="stable")
        row = dict(zip(others, key, strict=True))
        if ranked.empty:
            row.update({"best": "none feasible", metric: math.nan, "runner-up": "-",
                        "margin": math.nan})
        else:
            first = ranked.iloc[0]
            tied = (same_value(ranked["__m"], first["__m"]) if math.isfinite(first["__m"])
                    else ranked["__m"] == first["__m"])  # no limit ties only no limit
            row.update({"best": TIE.join(ranked[tied].sort_index()[by]), metric: first["__m"]})
            rest = ranked[~tied]
            if len(rest):
                second = rest.iloc[0]
                ratio = (second["__m"] / first["__m"]) if lower else (first["__m"] / second["__m"])
                row.update({"runner-up": second[by],
                            "margin": ratio if math.isfinite(ratio) else math.nan})
            else:
                row.update({"runner-up": "-", "margin": math.nan})
        row["note"] = _notes(part, by)
        rows.append(row)
    table = pd.DataFrame(rows)
    if unlimited.any():
        table[metric] = table[metric].astype(object).where(table[metric] != math.inf, NO_LIMIT)
    if not table["note"].astype(bool).any():
        table = table.drop(columns="note")
    return table


def _notes(part: pd.DataFrame, by: str) -> str:
    """The reasons of ``part``'s points that have no value, once each where all say the same,
    else each with its ``by``; "" where none gives one."""
    if "reason" not in part:
        return ""
    why = part[part["__m"].isna() | (part["__m"] == math.inf)]
    why = why[why["reason"].fillna("").astype(str) != ""]
    if why.empty:
        return ""
    if why["reason"].nunique() == 1:
        return str(why["reason"].iloc[0])
    return "; ".join(f"{name}: {reason}" for name, reason in zip(why[by], why["reason"],
                                                                 strict=True))


def capacity_table(frame: pd.DataFrame, axes: list[str], by: str, column: str,
                   zipped: dict[str, list[str]] | None = None, lo: Any = None) -> pd.DataFrame:
    """The searched maximum with ``by`` (usually the policy) as columns, when it is an axis;
    a point that does not fit even at the search's ``lo`` says so."""
    if column not in frame:
        return pd.DataFrame()
    others = ax.held_equal(axes, [by], zipped)
    if by in axes and others:
        none = "does not fit" + (f" at {ax.label(lo)}" if lo is not None else "")
        values = frame[column].map(lambda v: ax.label(v) if pd.notna(v) else none)
        capped = frame.get("capped", pd.Series(False, index=frame.index)).fillna(False)
        values = values.where(~capped.astype(bool), values + " (>= hi)")
        table = frame.assign(__v=values).pivot_table(
            index=others, columns=by, values="__v", aggfunc="first", sort=False)
        order = [c for c in dict.fromkeys(frame[by]) if c in table.columns]
        return table[order].reset_index()
    keep = [*axes, column, "capped", "limit_reason"]
    return frame[[c for c in keep if c in frame]]


def _describe(selection: dict[str, Any]) -> str:
    """``policy = flexgen`` or ``policy in flexgen, hgca`` for a derived metric's text."""
    parts = []
    for key, value in selection.items():
        if isinstance(value, list):
            parts.append(f"{key} in {', '.join(ax.label(v) for v in value)}")
        else:
            parts.append(f"{key} = {ax.label(value)}")
    return "; ".join(parts)


def binding_table(frame: pd.DataFrame, axes: list[str], by: str,
                  zipped: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """What binds each point: one row per combination of the other axes, one column per
    value of ``by`` (usually the policy), each cell the binding resource and its share."""
    if "binding" not in frame or not len(frame):
        return pd.DataFrame()
    data = frame[frame["binding"].notna() & (frame["binding"] != "")]
    if data.empty:
        return pd.DataFrame()
    cell = data["binding"] + " (" + (100 * data["binding_share"]).round().astype(int).astype(
        str) + "%)"
    data = data.assign(__cell=cell)
    if by in axes:  # one column per setting of ``by``, not the first of its settings
        data = data.assign(**{by: ax.choice_names(data, by, zipped)})
    if by in axes and data[by].nunique() > 1:
        others = ax.held_equal(axes, [by], zipped)
        if not others:
            return data[[by, "__cell"]].rename(columns={"__cell": "binds"})
        table = data.pivot_table(index=others, columns=by, values="__cell", aggfunc="first",
                                 sort=False)
        order = [c for c in dict.fromkeys(data[by]) if c in table.columns]
        # a point where no policy ran is a row of dashes, as in the best-policy table ("none
        # feasible"), not a row that is silently missing
        every = frame[others].drop_duplicates()
        return every.merge(table[order].reset_index(), on=others, how="left").reset_index(
            drop=True)
    return data[[*axes, "__cell"]].rename(columns={"__cell": "binds"})


def never_feasible_note(frame: pd.DataFrame, by: str) -> str:
    """A line naming the values of ``by`` infeasible at every point, which a table of
    feasible results would otherwise drop without a word; "" when there are none."""
    if by not in frame or "feasible" not in frame or not len(frame):
        return ""
    feasible = frame["feasible"].fillna(False).astype(bool)
    values = [v for v in dict.fromkeys(frame[by]) if not feasible[frame[by] == v].any()]
    if not values:
        return ""
    return ("\nNot in the table, infeasible at every point: "
            + ", ".join(ax.label(v) for v in values) + " (see Infeasible points).\n")


def named_by_label(axes: list[str], zipped: dict[str, list[str]] | None) -> list[str]:
    """The axes zipped with a ``label.<name>`` axis: the label names their values (an
    upgrade and the eleven hardware values it makes), so tables show the label alone."""
    return [a for a in axes if not a.startswith("label.")
            and any(p.startswith("label.") for p in (zipped or {}).get(a, ()))]


def _label_note(hidden: list[str], zipped: dict[str, list[str]] | None) -> str:
    if not hidden:
        return ""
    labels = sorted({p for a in hidden for p in (zipped or {}).get(a, ()) if p.startswith(
        "label.")})
    return (f"Columns zipped with {', '.join(f'`{short(x)}`' for x in labels)} are named by it "
            f"({len(hidden)} column{'s' * (len(hidden) != 1)}; their values per "
            "point are in the "
            "Configuration table and results.csv).\n\n")


def binding_parts(frame: pd.DataFrame, axes: list[str], by: str,
                  zipped: dict[str, list[str]] | None, n: int | None) -> list[str]:
    """The "What binds" section: the table, what its cells mean, and what they do not."""
    binds = binding_table(frame, axes, by, zipped).drop(
        columns=named_by_label(axes, zipped), errors="ignore")
    if binds.empty:
        return []
    parts = ["\n## What binds\n",
             "The resource that holds each point's critical path longest, with its share "
             "of the step latency (`binding`, `binding_share` in the results; "
             "`<tier> latency` means bytes in flight / latency binds, i.e. more "
             "memory-level parallelism or a nearer tier helps, `<tier> read` its "
             "bandwidth). A share of the critical path is not an elasticity: a step 100% "
             "`cxl0 read` gains less than 1% per 1% more CXL bandwidth where queueing delay "
             "and bytes in flight hold part of it (a `sensitivity` study measures that).\n\n"]
    counts = frame["binding"].replace("", pd.NA).dropna().value_counts()
    parts.append("Points per binding resource: " + ", ".join(
        f"{k} {v}" for k, v in counts.items()) + "\n\n")
    parts.append(md_table(binds, n))
    parts.append(never_feasible_note(frame, by))
    return parts


def _serving_bound_parts(frame: pd.DataFrame, axes: list[str],
                         zipped: dict[str, list[str]] | None, n: int | None) -> list[str]:
    """A serving study's "What the SLO is lost to": per point that searched its rate, the
    limit more requests miss just above the rate found (``slo_bound_by``) and the shares."""
    if "slo_bound_by" not in frame or not frame["slo_bound_by"].fillna("").astype(bool).any():
        return []
    if "serving.find_rate" in frame:  # the points at a fixed rate searched nothing
        frame = frame[frame["serving.find_rate"].fillna(False).astype(bool)]
    shown = [a for a in axes if a in frame and a not in named_by_label(axes, zipped)
             and a != "serving.find_rate"]
    # a search without a rate it lost the SLO at says why (no limit found, or none met)
    note = frame["slo_bound_note"].fillna("").astype(str)
    if "reason" in frame:
        note = note.where(note != "", frame["reason"].fillna("").astype(str))
    rate = frame["max_rate_per_s"].astype(object).mask(no_limit(frame), NO_LIMIT)
    table = frame[[*shown, "slo_bound_by"]].assign(max_rate_per_s=rate, __note=note)[
        [*shown, "max_rate_per_s", "slo_bound_by", "__note"]].rename(
        columns={"slo_bound_by": "lost to", "__note": "just above the rate found"})
    counts = frame["slo_bound_by"].replace("", pd.NA).dropna().value_counts()
    return ["\n## What the SLO is lost to\n",
            "Per point, the limit more requests miss at the lowest rate tried that misses the "
            "SLO (`slo_bound_by`): `ttft`, the queue and the prefills ahead of a request; "
            "`tpot`, slow decode steps and the prefills that stall them. Points per limit: "
            + ", ".join(f"{k} {v}" for k, v in counts.items()) + "\n\n",
            md_table(table, n)]


def write_report(path: Path, study: Study, frame: pd.DataFrame, axes: list[str],
                 info: RunInfo, elasticity: pd.DataFrame | None = None) -> Path:
    from hgsim.study import sensitivity as sens

    n = study.report.max_rows
    full = frame
    if study.sensitivity is not None:  # the sweep's own points; variants feed the elasticity
        frame = sens.base_rows(frame)
        axes = [a for a in axes if a not in sens.AXES]
    parts = [f"# Study `{study.name}`\n"]
    if study.answer:  # the study's questions answered first (hgsim/study/answer.py)
        from hgsim.study.answer import section

        parts.append(section(frame, axes, study.answer, study.zipped()))
        parts.append("\n---\n\n")
    if study.description:
        parts.append(study.description.strip() + "\n")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts.append(
        f"- study file: `{info.source}` (resolved copy: `study.resolved.yaml`)\n"
        f"- hgsim {__version__}, written {stamp}\n"
        f"- points: {info.total} ({info.computed} computed in this run, {info.reused} reused "
        f"from earlier runs, {info.missing} missing, {len(info.errors)} failed)\n"
    )
    if len(full) > info.total:  # the table has more rows than points were computed
        parts.append(f"- rows: {len(full)}; {len(full) - info.total} repeat a point computed "
                     "once (a configuration several rows share: an exact policy's "
                     "equal-accuracy twins are its configured point)\n")
    parts.append("- data: `results.parquet`, `results.csv` (one row per point)\n")
    if "wall_s" in full and len(full):
        # every point (a sensitivity study's variants too, which the tables below leave out),
        # once: a row repeating another's point did not run again
        ran = full.drop_duplicates("point") if "point" in full else full
        parts.append(f"- simulation time summed over points: {ran['wall_s'].sum():.1f} s; "
                     f"this run took {info.elapsed_s:.1f} s\n")

    parts.append("\n## Configuration\n")
    base = study.base
    base_rows = [("profile", base.profile), ("model", base.model), ("policy", base.policy)]
    base_rows += [(f"workload.{k}", v) for k, v in base.workload.items()]
    base_rows += [(f"policy_options.{k}", v) for k, v in base.policy_options.items()]
    base_rows += [(f"hardware.{k}", v) for k, v in base.hardware.items()]
    from hgsim.accuracy.overrides import override_groups

    fidelity = base.fidelity.model_dump()
    groups = {group: fidelity.pop(group) for group in override_groups()}
    if study.serving is None:  # a server's step times use their own (hgsim.serving)
        base_rows += [(f"fidelity.{k}", v) for k, v in fidelity.items()]
        for group, overrides in groups.items():  # one row per override set, none when none is
            base_rows += [(f"fidelity.{group}.{k}", v) for k, v in overrides.items()]
    else:
        serving = study.serving.model_dump(exclude_none=True)
        slo = serving.pop("slo", {})
        if not study.serving_conversations:  # single requests: a conversation's fields unused
            for name in CONVERSATION_DEFAULTS:
                serving.pop(name, None)
        base_rows += [(f"serving.{k}", v) for k, v in serving.items()]
        base_rows += [(f"serving.slo.{k}", v) for k, v in slo.items()]
    # null in a policy_options axis: the option is not set there (the policy lacks it)
    # hardware quantities in the unit the results tables use (768 GiB is 825 GB there)
    axes_values = {k: ["not set" if v is None else as_results_show(k, v) for v in values]
                   for k, values in study.axes().items()}
    base_rows = [(k, as_results_show(k, v)) for k, v in base_rows]
    parts.append(md_table(pd.DataFrame(
        [{"setting": k, "base value": v, "swept": ", ".join(map(str, axes_values[k]))
          if k in axes_values else ""} for k, v in base_rows]
        + [{"setting": k, "base value": "", "swept": ", ".join(map(str, v))}
           for k, v in axes_values.items() if k not in dict(base_rows)]
    )))
    if study.search:
        s = study.search
        if study.has_slo:
            slo = (f"{s.max_token_latency_ms:g} ms" if s.slo else
                   "`search.max_token_latency_ms` (swept)")
            parts.append(f"\nSearch: largest `{s.maximize}` that fits and keeps the per-token "
                         f"latency within {slo}, in [{ax.label(s.lo)}, {ax.label(s.hi)}] to a "
                         f"step of {ax.label(s.step)} (capacity accounting first, then a "
                         "simulation of each value that fits; `limit` says whether memory, "
                         "latency or the range bound it).\n")
        elif study.picks_fastest:
            parts.append(f"\nSearch: largest `{s.maximize}` that fits, in [{ax.label(s.lo)}, "
                         f"{ax.label(s.hi)}] to a step of {ax.label(s.step)} (capacity "
                         "accounting).\n")
        else:
            parts.append(f"\nSearch: largest `{s.maximize}` that fits, in [{ax.label(s.lo)}, "
                         f"{ax.label(s.hi)}] to a step of {ax.label(s.step)} (capacity "
                         "accounting only, no simulation).\n")

    if study.serving is not None:
        parts.append("\nServing: an online server at every point (docs/serving.md): Poisson "
                     "arrivals, continuous batching up to `max_batch`, step and prefill times "
                     "from the simulator on a grid. "
                     + ("`max_rate_per_s` is the highest rate at which the SLO's attainment is "
                        "met, and the row's metrics are the run at that rate. "
                        if study.serving_finds_rate else "")
                     + "The workload's batch, context and gen are not used.\n")
    if study.picks_fastest:
        parts.append(f"`pick: fastest`: every `{study.search.maximize}` up to that one is "
                     "simulated too, and the one that decodes fastest (tokens/s) is the answer "
                     f"(`fastest_{study.search.field}`; more sequences can push the KV cache "
                     "out of HBM, so the largest is not always the fastest).\n")
    by = study.report.best_axis
    zipped = study.zipped()
    if study.search:
        table = capacity_table(frame, axes, by, study.search.column, zipped, study.search.lo)
        unit = SEARCH_UNITS.get(study.search.field, "")
        within = " within the latency SLO" if study.has_slo else ""
        parts.append(f"\n## Largest {study.search.field} that fits{within}{unit}\n")
        parts.append(md_table(table, n))
        fastest = study.picks_fastest
        column = f"fastest_{study.search.field}"
        if fastest and column in frame:
            # a point that fits but was not asked for its fastest value (pick swept) says so
            asked = frame[column].astype(object).where(
                frame[column].notna() | frame[study.search.column].isna(), "-")
            parts.append(f"\n## Fastest {study.search.field} up to it, by tokens/s{unit}\n")
            parts.append(md_table(capacity_table(frame.assign(capped=False, **{column: asked}),
                                                 axes, by, column, zipped), n))
        if study.search_simulates and "tokens_per_s" in frame:
            at = frame.assign(capped=False, tokens_per_s=pd.to_numeric(
                frame["tokens_per_s"], errors="coerce").round(1))
            where = (f"the {study.search.field} answered" if fastest
                     else f"that {study.search.field}")
            parts.append(f"\n## Throughput at {where} (tokens/s)\n")
            parts.append(md_table(capacity_table(at, axes, by, "tokens_per_s", zipped), n))
    else:
        for section in best_sections(study, frame, axes):
            metric = section.metric
            best = best_table(section.frame, section.axes, by, metric, zipped)
            if best.empty:
                continue
            parts.append(f"\n## Best {by} per point{section.title} (by {metric})\n")
            parts.append(section.why)
            wins = best["best"][best["best"] != "none feasible"].value_counts()
            none = int((best["best"] == "none feasible").sum())
            parts.append("Wins: " + ", ".join(f"{k} {v}" for k, v in wins.items())
                         + (f"; no {by} feasible at {none} point{'s' * (none != 1)}"
                            if none else "") + "\n\n")
            ratio = "runner-up / best" if LOWER_IS_BETTER.search(metric) else "best / runner-up"
            parts.append(f"`margin`: {ratio} {metric} (1.10 = the best is 10% better); "
                         f"`a{TIE}b`: tied to a millionth, the margin is to the next.\n\n")
            parts.append(_label_note(named_by_label(section.axes, zipped), zipped))
            parts.append(md_table(best.drop(columns=named_by_label(section.axes, zipped),
                                            errors="ignore"), n))
            parts.append(never_feasible_note(section.frame, by))

    parts += binding_parts(frame, axes, by, zipped, n)
    parts += _serving_bound_parts(frame, axes, zipped, n)

    if study.sensitivity is not None and elasticity is not None and len(elasticity):
        spec = study.sensitivity
        parts.append("\n## Sensitivity\n")
        parts.append(f"Elasticity of `{spec.metric}` to each parameter (central difference over "
                     f"x{1 + spec.step:g} and /{1 + spec.step:g}, one parameter at a time; "
                     "`elasticity.csv` has every value): +1 = the metric follows the parameter, "
                     "-1 = it falls as the parameter grows, 0 = no effect; `(e)` marks "
                     "those columns.\n\n")
        wide = sens.pivot(elasticity, axes, spec.parameters)
        roles = {p: sens.time_role(p) for p in spec.parameters}
        if any(roles.values()):
            wide = wide.assign(**{TIME_SCALING: sens.time_scaling_sum(wide)})
            named = {r: ", ".join(f"`{p}`" for p, v in roles.items() if v == r) or "none"
                     for r in (1, -1, 0)}
            parts.append(f"`{TIME_SCALING}`: every rate x s with every time / s makes tokens/s "
                         "x s, so the elasticities to the rates less those to the times sum "
                         "to 1 when the listed parameters are all that cost time; below 1 by "
                         "the share of the step held by parameters not listed (link bandwidths, "
                         "queueing delays, GPU FLOP/s, launch overheads, ...). Above 1, a "
                         "parameter binds on one side of the step only (a kink the central "
                         "difference averages over; `elasticity_down`/`_up` in "
                         "`elasticity.csv`). Rates: "
                         f"{named[1]}; times: {named[-1]}; in neither: {named[0]}.\n\n")
        parts.append(md_table(elasticity_cells(wide, spec.parameters), n, "elasticity.csv"))

    if study.derived and len(frame):
        parts.append("\n## Derived metrics\n")
        for name, spec in study.derived.items():
            ordered = ("point / baseline" if better(spec) == "higher" else
                       f"baseline / point, as lower `{spec.metric}` is better")
            what = {"speedup": f"speedup: {ordered}; above 1 the point is better",
                    "ratio": "point / baseline", "difference": "point - baseline"}[spec.kind]
            of = _describe(spec.of) or "every point"
            parts.append(f"- `{name}` ({what}): `{spec.metric}` of {of} relative to the point "
                         f"with {_describe(spec.vs)} and the same other coordinates\n")
        parts.append("\nPer group: `n` rows with a value, `no value` rows without one (the point "
                     "or its baseline infeasible), then statistics over the `n` (geometric mean "
                     "first); the baseline's own rows, equal to it by construction, are left "
                     "out.\n")
        # a table per metric: their groups differ, and one table of both showed each
        # metric's group columns as "-" on the other's rows
        for name, spec in study.derived.items():
            parts.append(f"\n`{name}`:\n\n" + md_table(summarize(frame, {name: spec}, zipped)))

    parts += _equal_accuracy_parts(study, frame, n)
    parts += _pareto_parts(study, frame, n)
    parts += _attention_parts(study, frame)

    if len(full) and "feasible" in full:
        infeasible = full[~full["feasible"].fillna(False).astype(bool)]
        parts.append(f"\n## Infeasible points ({len(infeasible)})\n")
        if by in infeasible and len(infeasible):
            counts = infeasible[by].value_counts(sort=False)
            parts.append(f"Per {by}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                         + "\n\n")
        hidden = named_by_label(axes, zipped)
        cols = [c for c in [*axes, *sens.AXES, "reason"] if c in infeasible and c not in hidden]
        parts.append(md_table(infeasible[cols], n))

    if info.errors:
        parts.append(f"\n## Failed points ({len(info.errors)})\n")
        parts.append("These raised an error (a bug, not infeasibility); they were not stored "
                     "and a re-run tries them again.\n\n")
        parts.append(md_table(pd.DataFrame(
            [{"point": e["key"], "error": e["error"]} for e in info.errors]), n))

    if info.figures or info.figure_errors:
        parts.append("\n## Figures\n")
        for figure in info.figures:
            if figure.suffix == ".png":
                parts.append(f"\n![{figure.stem}](figures/{figure.name})\n"
                             f"(`figures/{figure.stem}.svg`)\n")
        for name, error in info.figure_errors.items():
            parts.append(f"\n- figure `{name}` failed: {error}\n")
    with written_whole(path) as fh:
        fh.write("".join(parts))
    return path


def elasticity_cells(wide: pd.DataFrame, parameters: list[str]) -> pd.DataFrame:
    """The sensitivity table as printed: elasticities to three decimals (-0.008, not the
    -0.00800 three significant figures made of a value rounded to three decimals), and each
    parameter's column marked ``(e)``: a swept axis of the same name (the host's cores)
    stood beside it under the same header."""
    values = [*parameters, TIME_SCALING]
    def cell(value: float) -> str:
        return "-" if pd.isna(value) else f"{round(value, 3) + 0.0:.3f}"  # no -0.000

    cells = wide.assign(**{c: wide[c].map(cell) for c in values if c in wide})
    return cells.rename(columns={p: f"{p} (e)" for p in parameters})


def _equal_accuracy_parts(study: Study, frame: pd.DataFrame, n: int) -> list[str]:
    """What each lossy policy needed to reach the accuracy target(s), and how often it could."""
    spec = study.equal_accuracy
    if spec is None or not len(frame):
        return []
    from hgsim.study.equal_accuracy import AXIS, settings_table

    targets = ", ".join(f"{t:g}" for t in spec.targets)
    parts = ["\n## Equal accuracy\n",
             f"Every lossy point again at the cheapest setting of its policy's knob whose "
             f"accuracy-proxy error (`accuracy_rel_error`) is at most {targets} (grid step "
             f"{spec.resolution:g}, bisection on the proxy; one simulation at the setting "
             f"found): rows with `{AXIS}` = `rel_error<=T`; `configured` rows are the study "
             "as written. Exact policies meet any target as configured. A target whose setting "
             "does not fit in memory is unreachable (listed with the infeasible points): that "
             "policy has no speed at this accuracy, and derived metrics against it are "
             "empty.\n\n"]
    parts.append(md_table(settings_table(frame), n))
    return parts


def _attention_parts(study: Study, frame: pd.DataFrame) -> list[str]:
    """Where each attention shape the study sets puts the mass (``hgsim attention``), so a
    reader sees what a ``fidelity.attention`` setting means without running the command;
    nothing when the study sets none."""
    base = dict(study.base.fidelity.attention)
    swept = [c for c in frame.columns if c.startswith("fidelity.attention.")]
    if not base and not swept:
        return []
    from hgsim.accuracy.shape import attention_shares
    from hgsim.accuracy.synthetic import attention_model

    settings = frame[swept].drop_duplicates().to_dict("records") if swept and len(frame) \
        else [{}]
    # a label zipped with the settings names them (label.shape: flat, sharp...)
    labels = [c for c in frame.columns if c.startswith("label.") and swept
              and (frame.groupby(swept)[c].nunique() == 1).all()]
    rows = []
    for setting in settings:
        named = frame.loc[(frame[swept] == pd.Series(setting)).all(axis=1)] if swept else frame
        row = {c.removeprefix("label."): named[c].iloc[0] for c in labels if len(named)}
        fields = {**base, **{c.removeprefix("fidelity.attention."): v
                             for c, v in setting.items()}}
        shares = attention_shares(attention_model(fields), context=32768, heads_per_group=4,
                                  ratios=(0.05,))
        rows.append({**row, "setting": ", ".join(f"{k}={fmt(v)}" for k, v in fields.items()),
                     "sinks": f"{shares.sinks:.1%}", "newest 1,024": f"{shares.recent:.1%}",
                     "heavy hitters": f"{shares.heavy:.1%}",
                     "top-5% keeps": f"{shares.topk_kept[0.05]:.1%}",
                     "union per k (4 heads)": f"{shares.union_per_k[0.05]:.2f}"})
    return ["\n## Accuracy model\n",
            "Where each `fidelity.attention` setting puts the softmax mass at 32k tokens "
            "(`hgsim attention`): the sinks', the newest 1,024 tokens' and heavy hitters' "
            "shares, the mass a per-head top-5% of the tokens between them keeps with them, "
            "and the rows of a 4-head group's union of top-5% sets per row selected.\n\n",
            md_table(pd.DataFrame(rows))]


def _pareto_parts(study: Study, frame: pd.DataFrame, n: int) -> list[str]:
    """The optimal points of every ``kind: pareto`` plot."""
    from hgsim.study.pareto import direction, front_table

    parts: list[str] = []
    for name, plot in study.plots.items():
        if plot.kind != "pareto" or not len(frame):
            continue
        table = front_table(frame, plot)
        if not parts:
            parts.append("\n## Pareto fronts\n")
        parts.append(f"\n`{name}`: points no other point beats on both `{plot.y}` "
                     f"({direction(plot.y, plot.y_better)} is better) and `{plot.x}` "
                     f"({direction(plot.x, plot.x_better)} is better)"
                     + (f", where {_describe(plot.where)}" if plot.where else "") + ".\n\n")
        parts.append(md_table(table, n))
    return parts

"""The results table: one row per point, axis values first, then metrics, then derived ones.

Rows are assembled from the current expansion (its coordinates) and the stored records (their
metrics), so renaming an axis or adding a plot never needs recomputation, and points stored
by an older version of the study file that no longer belong to it are left out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from hgsim.outputs import written_whole
from hgsim.results import SimResult, StepTiming
from hgsim.study.capacity_search import SEARCH_COLUMNS, SLO_COLUMNS, WORKLOAD_COLUMNS
from hgsim.study.expand import Expansion

#: Columns added by the study runner to every row.
RUN_COLUMNS = ("point", "wall_s", "events")
#: Columns worth reading first, after the axes.
FRONT = ("feasible", "tokens_per_s", "latency_mean_ms", "latency_p99_ms", "reason")


def simulation_columns() -> list[str]:
    """The columns ``SimResult.to_row`` produces for a feasible point (tier-specific
    ``mem_<tier>_gb`` and resource-specific ``util_<resource>`` aside)."""
    return list(_simulation_row())


def simulation_text_columns() -> list[str]:
    """Those of them that hold words (names, reasons), of which no metric can be taken."""
    return [column for column, value in _simulation_row().items() if isinstance(value, str)]


def _simulation_row() -> dict[str, Any]:
    step = StepTiming(**{
        f.name: (True if f.type in ("bool", bool) else 1)
        for f in dataclasses.fields(StepTiming)
    })
    result = SimResult(profile="", model="", policy="", batch=1, context=1, gen=1,
                       feasible=True, steps=[step])
    return result.to_row()


def search_columns(field: str, column: str, simulates: bool = False,
                   fastest: bool = False) -> list[str]:
    """A search point's columns; where it simulates (a latency SLO, ``pick: fastest``), the
    simulation at the value found too; with ``pick: fastest``, that value (``fastest_<field>``)
    beside the largest."""
    return ["profile", "model", "policy", *WORKLOAD_COLUMNS, field, column, "feasible",
            "reason", *SEARCH_COLUMNS, *(SLO_COLUMNS if simulates else ()),
            *((f"fastest_{field}",) if fastest else ())]


def assemble(expansion: Expansion, records: dict[str, dict[str, Any]],
             columns: list[str] = ()) -> pd.DataFrame:
    """One row per point with a stored record (points still missing are left out).

    Each of ``columns`` (those the study was validated to produce) is in the table even where
    no row has it: an infeasible point has no ``tokens_per_s``, and a study whose every point
    is infeasible (a capacity planner's first try, often) must still give derived metrics,
    answers and plots their columns, empty, rather than fail on a missing one.
    """
    rows = []
    for point in expansion.points:
        record = records.get(point.spec.key)
        if record is None:
            continue
        row: dict[str, Any] = dict(record["row"])
        row.update(point.coords)  # coordinates win over result fields of the same name
        row["point"] = point.spec.key
        row["wall_s"] = record.get("wall_s")
        row["events"] = record.get("events")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=[*expansion.axes, *RUN_COLUMNS])
    first = [c for c in expansion.axes if c in frame]
    first += [c for c in FRONT if c in frame and c not in first]
    rest = [c for c in frame.columns if c not in first]
    absent = [c for c in columns if c not in frame]
    return frame[first + rest].reindex(columns=[*first, *rest, *absent])


def write_tables(frame: pd.DataFrame, out: Path) -> list[Path]:
    """``results.parquet`` and ``results.csv``, each written whole or not at all."""
    parquet, csv = out / "results.parquet", out / "results.csv"
    with written_whole(parquet, "wb") as fh:
        _parquet_safe(frame).to_parquet(fh, index=False)
    with written_whole(csv, newline="") as fh:
        frame.to_csv(fh, index=False)
    return [parquet, csv]


def _parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing types (an axis of numbers and names) as text, which Parquet can hold."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            kinds = {type(v) for v in out[column].dropna()}
            if len(kinds) > 1:
                out[column] = out[column].map(lambda v: None if v is None else str(v))
    return out

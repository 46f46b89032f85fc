"""What an axis path means, and how its values are compared.

Axis paths name the part of a configuration they replace: ``profile``, ``model``, ``policy``,
``workload.<field>``, ``policy_options.<option>``, ``fidelity.<field>`` or
``hardware.<dotted profile path>``; ``label.<name>`` only names points (a column, e.g. the
upgrade a zip group's hardware values make) and changes nothing in them. Values are written the way people write them (``32k``,
``"64 GB/s"``); ``normalize`` turns them into what appears in the results table, so that
filters in derived metrics and plots (``where: {workload.context: 32k}``) match the table.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection
from typing import Any

import pandas as pd

from hgsim.units import dimension_of, parse_count, parse_quantity

TOP_LEVEL = ("profile", "model", "policy")
SECTIONS = ("workload", "policy_options", "fidelity", "hardware", "label", "search", "serving")
# Columns holding token/sequence counts: "32k" in a filter means 32768 there.
COUNT_COLUMNS = {"batch", "context", "gen", "max_context", "max_batch"}

AXIS_HELP = (
    "axes are profile, model, policy, workload.<field>, policy_options.<option>, "
    "fidelity.<field>, hardware.<dotted profile path>, search.max_token_latency_ms / "
    "search.latency_stat (a capacity search's latency SLO), serving.<field> (an online "
    "server's load, lengths, batch and SLO) or label.<name> (a column only)"
)


def held_equal(axes: list[str], varying, zipped: dict[str, list[str]] | None = None
               ) -> list[str]:
    """The axes a comparison across ``varying`` holds equal: all others, except those zipped
    with a varying one. A zipped axis takes its values with its partner (an upgrade's label
    and the hardware it makes), so no two points differ in the varying axis alone."""
    moving = set(varying)
    for axis in varying:
        moving.update((zipped or {}).get(axis, ()))
    return [a for a in axes if a not in moving]


def partners(frame: pd.DataFrame, column: str,
             zipped: dict[str, list[str]] | None = None,
             exclude: Collection[str] = ()) -> list[str]:
    """The axes zipped with ``column`` that tell apart points sharing a value of it
    (``policy: [hybridgen, hybridgen]`` zipped with two top-k ratios): a choice among
    ``column``'s values is then a value together with these. ``exclude``: axes that tell
    them apart already (a figure's other roles)."""
    if column not in frame:
        return []
    return [other for other in (zipped or {}).get(column, ()) if other in frame
            and other not in exclude
            and frame.groupby(column, dropna=False, sort=False)[other]
            .nunique(dropna=False).gt(1).any()]


def choice_names(frame: pd.DataFrame, column: str,
                 zipped: dict[str, list[str]] | None = None,
                 exclude: Collection[str] = ()) -> pd.Series:
    """``column`` as the choices a reader tells apart: its values as they are where each
    names one choice, else text naming the partners too (``hybridgen (topk_ratio 0.05)``),
    so two settings of one policy are neither merged nor printed as the same name."""
    names = partners(frame, column, zipped, exclude)
    if not names:
        return frame[column]

    def name(row: pd.Series) -> str:
        extra = [f"{p.rsplit('.', 1)[-1]} {label(row[p])}" for p in names if pd.notna(row[p])]
        return label(row[column]) + (f" ({', '.join(extra)})" if extra else "")

    return frame.apply(name, axis=1).astype(object)


def section(path: str) -> tuple[str, str]:
    """``("workload", "context")`` for ``workload.context``; ``("policy", "")`` for ``policy``.

    Raises ValueError for a path that is not an axis.
    """
    if path in TOP_LEVEL:
        return path, ""
    head, sep, rest = path.partition(".")
    if sep and rest and head in SECTIONS:
        return head, rest
    raise ValueError(f"unknown axis '{path}'; {AXIS_HELP}")


def normalize(column: str, value: Any) -> Any:
    """The value as it appears in the results table's ``column``.

    Counts (``32k``) become integers, hardware quantities with units become numbers in the
    field's unit; everything else is kept as written. Raises ValueError on unreadable values.
    """
    if isinstance(value, list):
        return [normalize(column, v) for v in value]
    if column == ACCURACY_TARGET and isinstance(value, (int, float)) and not isinstance(
        value, bool
    ):
        return accuracy_target_label(float(value))
    if column == "model" and isinstance(value, str):
        return _canonical_model(value)
    if column.startswith("serving."):
        return serving_value(column.removeprefix("serving."), value)
    last = column.rsplit(".", 1)[-1]
    if last in COUNT_COLUMNS and isinstance(value, (str, int, float)) and not isinstance(
        value, bool
    ):
        return parse_count(value)
    if column.startswith("hardware.") and isinstance(value, str):
        dimension = dimension_of(last)
        if dimension is not None:
            return parse_quantity(value, dimension)
    return value


#: The serving fields (``serving.<field>`` axes) that hold whole counts, numbers, and lengths
#: (a fixed count of tokens or a distribution of them).
SERVING_COUNTS = ("requests", "max_batch", "prefill_chunk", "turns", "seed")
SERVING_NUMBERS = ("rate_per_s", "think_s", "kv_offload_gb", "affinity_wait_s", "slo.ttft_s",
                   "slo.tpot_ms", "slo.attainment")
SERVING_LENGTHS = ("prompt", "output", "followup")


def serving_value(field: str, value: Any) -> Any:
    """A ``serving.<field>`` value in the field's type, one spelling per value: counts as
    ints (``'2'`` and ``2.0`` are 2), numbers as floats, lengths as the serving row's text
    (``4k``, ``4096`` and ``4K`` are ``4k``; ``uniform:2k:4k`` as written), so that an axis
    never stores one value under two spellings, nor a column of mixed types. Raises ValueError
    on a value the field cannot hold."""
    if isinstance(value, bool) or value is None:
        return value
    if field in SERVING_COUNTS:
        return parse_count(value)
    if field in SERVING_NUMBERS and isinstance(value, numbers.Real):
        return float(value)
    if field in SERVING_LENGTHS and isinstance(value, (str, int)):
        from hgsim.errors import UserError
        from hgsim.serving.requests import LengthDist

        try:
            return str(LengthDist.parse(value, field))
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(f"{field}: ")) from None
    return value


#: The axis an ``equal_accuracy`` block adds: ``configured`` or ``rel_error<=T`` (a bare number
#: in a filter means that target).
ACCURACY_TARGET = "accuracy.target"


def accuracy_target_label(target: float) -> str:
    return f"rel_error<={target:g}"


def _canonical_model(name: str) -> str:
    from hgsim.catalog import get_model
    from hgsim.errors import UserError

    try:
        return get_model(name).name
    except UserError:
        return name  # unknown names are reported by the expansion, with their line


def label(value: Any) -> str:
    """Short text for a value in titles and legends: 131072 -> 128k."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    # numpy numbers too, as the results table's cells are (np.int64 is no int)
    value = int(value) if isinstance(value, numbers.Integral) else float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and value >= 1024:
        for suffix, size in (("M", 1024**2), ("k", 1024)):
            if value % size == 0:
                return f"{value // size}{suffix}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def column_slug(value: Any) -> str:
    """A value as part of a column name: ``speedup_vs_flexgen``, ``ratio_vs_128k``."""
    text = label(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)

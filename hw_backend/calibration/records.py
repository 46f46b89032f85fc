"""Raw measurements: what was timed, under which parameters, and every repeat's time.

Calibrated profiles are only as trustworthy as the numbers behind them, so every figure a profile
holds can be traced back to rows saved beside it (``<profile>.calibration.json`` / ``.csv``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hgsim.outputs import finite_for_json, written_whole


@dataclass(frozen=True)
class Measurement:
    """One benchmark result. ``value`` is in ``unit``; ``seconds`` are the timed repeats."""

    group: str  # memory | cpu_kernel | standin | cuda
    name: str  # e.g. read_bandwidth, logits_topk, h2d_copy
    value: float
    unit: str  # GB/s, GFLOP/s, ns, us, ...
    params: dict[str, Any] = field(default_factory=dict)  # node, threads, bytes, context, ...
    seconds: tuple[float, ...] = ()

    def matches(self, group: str, name: str, **params: Any) -> bool:
        return (self.group == group and self.name == name
                and all(self.params.get(k) == v for k, v in params.items()))


class Measurements(list[Measurement]):
    """A list of measurements with lookup and the two on-disk forms."""

    def select(self, group: str, name: str, **params: Any) -> list[Measurement]:
        return [m for m in self if m.matches(group, name, **params)]

    def value(self, group: str, name: str, **params: Any) -> float | None:
        """Value of the single matching measurement (None when absent)."""
        found = self.select(group, name, **params)
        if len(found) > 1:
            raise LookupError(f"{group}.{name} {params}: {len(found)} measurements match")
        return found[0].value if found else None

    def write_json(self, path: Path, meta: dict[str, Any], summary: dict[str, Any]) -> None:
        doc = {"meta": meta, "summary": summary, "measurements": [asdict(m) for m in self]}
        with written_whole(path) as fh:
            fh.write(json.dumps(finite_for_json(doc), indent=1, default=_jsonable) + "\n")

    def write_csv(self, path: Path) -> None:
        keys = sorted({k for m in self for k in m.params})
        with written_whole(path, newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["group", "name", *keys, "value", "unit", "repeats", "seconds"])
            for m in self:
                writer.writerow([m.group, m.name, *(m.params.get(k, "") for k in keys),
                                 f"{m.value:.6g}", m.unit, len(m.seconds),
                                 " ".join(f"{s:.6g}" for s in m.seconds)])


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def load_json(path: Path) -> tuple[dict[str, Any], dict[str, Any], Measurements]:
    """(meta, summary, measurements) of a calibration file written by ``write_json``."""
    doc = json.loads(Path(path).read_text())
    rows = Measurements(
        Measurement(m["group"], m["name"], m["value"], m["unit"], m.get("params", {}),
                    tuple(m.get("seconds", ())))
        for m in doc.get("measurements", [])
    )
    return doc.get("meta", {}), doc.get("summary", {}), rows

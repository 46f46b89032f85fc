"""The trace file is strict JSON in the Chrome trace format, whatever the result holds."""

from __future__ import annotations

import json

import simpy
from conftest import make_profile

from hgsim.sim import Machine, write_chrome_trace


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as JSON.parse (chrome://tracing) and Perfetto
    do: Python writes them by default, which makes the whole file unreadable there."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_metadata_is_written_as_null(tmp_path):
    m = Machine(simpy.Environment(), make_profile())
    m.copy("ddr0", "gpu0", 1e6, "kv")
    m.env.run()
    # a result row holds NaN where a figure is not computed (accuracy off, no prices)
    meta = {"accuracy_rel_error": float("nan"), "usd_per_mtok": float("inf"), "ok": 1.5,
            "nested": {"x": float("-inf")}}
    path = write_chrome_trace(m.recorder, tmp_path / "t.json", metadata=meta,
                              markers=[(0.0, "mark", {"ratio": float("nan")})])
    trace = _strict(open(path).read())
    assert trace["otherData"] == {"accuracy_rel_error": None, "usd_per_mtok": None, "ok": 1.5,
                                  "nested": {"x": None}}
    mark = next(e for e in trace["traceEvents"] if e["name"] == "mark")
    assert mark["args"] == {"ratio": None}

"""The trace says what the simulation's tables say: per resource, the bytes on its slices add
up to the bytes it moved, and its busy union is its busy time."""

from __future__ import annotations

from collections import defaultdict

import pytest
import simpy
from conftest import make_profile

from hgsim.memory import Pattern
from hgsim.sim import Machine
from hgsim.sim.trace import chrome_trace


def _slices(trace) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            out[e["args"]["resource"]].append(e)
    return out


def test_slice_bytes_add_up_to_what_each_resource_moved():
    """A read spread over two tiers moves half its bytes through each tier's read channel
    (and the CXL link); the slices there must say so, as "GB moved" does."""
    m = Machine(simpy.Environment(), make_profile())
    m.read({"ddr0": 0.5, "cxl0": 0.5}, "gpu0", 4e8, Pattern.DMA, "to gpu")
    m.write("gpu0", {"ddr0": 0.25, "cxl0": 0.75}, 2e8, "evict")
    m.read({"ddr0": 0.5, "cxl0": 0.5}, "s0", 1e8, Pattern.STREAM, "scan", flops=1e8)
    m.env.run()
    slices = _slices(chrome_trace(m.recorder))
    moved = m.recorder.bytes_by_resource()
    assert moved["ddr0.read"] == pytest.approx(0.5 * 4e8 + 0.5 * 1e8)
    assert moved["cxl0.write"] == pytest.approx(0.75 * 2e8)
    for resource, expected in moved.items():
        got = sum(e["args"]["bytes"] for e in slices.get(resource, []))
        assert got == pytest.approx(expected, rel=1e-12), resource

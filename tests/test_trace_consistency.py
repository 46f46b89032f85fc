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


def _hgca_step(record: bool = True):
    """One HGCA step on the H100 profile at 32k x 16: the host path scans, pays top-k inserts,
    gathers and pays per-call overheads, all while holding every core of cpu0."""
    from hgsim.catalog import get_model
    from hgsim.policies import make_policy
    from hgsim.profiles import load_profile
    from hgsim.sim.decode import DecodeEngine
    from hgsim.workload import Workload

    profile, model = load_profile("h100-80gb-spr-cxl"), get_model("llama-3.1-8b")
    pol = make_policy("hgca", model, profile, Workload(context=32768, batch=16, gen=1))
    machine = Machine(simpy.Environment(), profile, record=record)
    DecodeEngine(machine, model, "fp16", "fp16").step(pol.step_plan(32768))
    return machine


def test_core_pool_is_busy_whenever_its_cores_are_held():
    """The host path holds all cores from its scan to its last call; the top-k inserts and
    call overheads in between are core work, so the pool's track (and its busy time in the
    utilisation table) covers them: busy time = core-seconds held / cores."""
    machine = _hgca_step()
    rec, cores = machine.recorder, machine.profile.sockets["cpu0"].cores
    held_s = rec.totals["cpu0.cores"].core_s / cores
    assert held_s > 0
    assert rec.busy_time("cpu0.cores") == pytest.approx(held_s, rel=1e-9)
    labels = {e["name"] for e in _slices(chrome_trace(rec))["cpu0.cores"]}
    assert {"cpu scan", "cpu gather", "top-k inserts", "host calls"} <= labels

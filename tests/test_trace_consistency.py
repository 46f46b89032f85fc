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
    """Slices by resource; the decode track's spans under "step"."""
    out = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            out["step" if e["cat"] == "step" else e["args"]["resource"]].append(e)
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


def _simulated_trace(tmp_path, samples: int, gen: int = 6, prefill: bool = False,
                     model: str = "llama-3.1-8b", context: int = 32768):
    import json

    from hgsim.simulate import Fidelity, simulate
    from hgsim.workload import Workload

    path = tmp_path / "t.json"
    result = simulate("h100-80gb-spr-cxl", model, "hybridgen",
                      Workload(batch=1, context=context, gen=gen, include_prefill=prefill),
                      fidelity=Fidelity(decode_samples=samples, accuracy=False),
                      trace_path=path)
    return result, json.loads(path.read_text())


def _step_spans(trace):
    return sorted((e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "step"),
                  key=lambda e: e["ts"])


@pytest.mark.parametrize("samples", [0, 3])
def test_step_spans_are_the_simulated_steps_with_their_latencies(tmp_path, samples):
    """One span per simulated step (and the prefill), each as long as the latency the result
    reports for it, tiling the timeline: every activity lies in one of them. A sampled run
    says which steps each span stands for, rather than passing its steps off as the run."""
    result, trace = _simulated_trace(tmp_path, samples, prefill=True)
    spans = _step_spans(trace)
    simulated = [s for s in result.steps if s.simulated]
    assert len(spans) == len(simulated) + 1
    prefill, steps = spans[0], spans[1:]
    assert prefill["name"] == "prefill"
    assert prefill["ts"] == 0 and prefill["dur"] == pytest.approx(result.ttft_s * 1e6, abs=1e-3)
    end = prefill["dur"]
    for span, step in zip(steps, simulated, strict=True):
        assert span["args"]["step"] == step.step and span["args"]["simulated"] is True
        assert span["ts"] == pytest.approx(end, abs=1e-3)
        assert span["dur"] == pytest.approx(step.latency_s * 1e6, abs=1e-3)
        end = span["ts"] + span["dur"]
    stands = [span["args"]["stands_for_steps"] for span in steps]
    if samples:
        assert stands == ["0-1", "2-4", "5"]  # steps 0, 2, 5 simulated; the rest interpolated
    else:
        assert stands == [str(s.step) for s in result.steps]
    assert trace["otherData"]["trace_simulated_steps"] == len(simulated)
    # every activity of the machine lies inside the prefill or one step
    bounds = [(s["ts"], s["ts"] + s["dur"]) for s in spans]
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and e["cat"] != "step":
            assert any(lo - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= hi + 1e-3
                       for lo, hi in bounds), e


def test_a_decision_at_an_interpolated_step_names_the_step_it_observed(tmp_path):
    """The scheduler decides every 4 steps; at an unsimulated step it observed the last
    simulated one, and its marker (at that step's end) says so. (llama-2-13b at 128k puts
    KV on the host, so HybridGen's scheduler runs.)"""
    result, trace = _simulated_trace(tmp_path, samples=3, gen=8, model="llama-2-13b",
                                     context=131072)
    marks = [e for e in trace["traceEvents"] if e.get("cat") == "scheduler"]
    assert marks
    spans = {e["args"]["step"]: e for e in _step_spans(trace)}
    for mark in marks:
        step, observed = mark["args"]["step"], mark["args"]["observed_step"]
        assert result.steps[observed].simulated and observed <= step
        assert mark["args"]["simulated"] == (observed == step)
        assert mark["ts"] == pytest.approx(spans[observed]["ts"] + spans[observed]["dur"],
                                           abs=1e-3)


def _union_ns(spans) -> int:
    total, end = 0, None
    for s, e in sorted(spans):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


@pytest.mark.parametrize("policy", ["hybridgen", "hgca"])
def test_trace_agrees_with_the_utilisation_and_traffic_tables(tmp_path, policy):
    """Over the decode steps (after a prefill, two sockets, DDR and CXL shared by flows): each
    resource's busy union in the trace / decode time = its busy fraction in the table, and its
    slices' bytes = its GB moved."""
    import json

    from hgsim.simulate import Fidelity, simulate
    from hgsim.workload import Workload

    path = tmp_path / "t.json"
    result = simulate("h100-2socket-cxl", "llama-2-13b", policy,
                      Workload(batch=1, context=131072, gen=2, include_prefill=True),
                      fidelity=Fidelity(decode_samples=0, accuracy=False), trace_path=path)
    slices = _slices(json.loads(path.read_text()))
    t0 = round(result.ttft_s * 1e9)
    t1 = t0 + round(sum(s.latency_s for s in result.steps) * 1e9)
    assert slices["step"] and max(round((e["ts"] + e["dur"]) * 1e3)
                                  for e in slices["step"]) == pytest.approx(t1, abs=2)
    checked = 0
    for resource, busy in result.utilisation.items():
        spans = [(max(round(e["ts"] * 1e3), t0), min(round((e["ts"] + e["dur"]) * 1e3), t1))
                 for e in slices.get(resource, [])]
        in_decode = _union_ns([(s, e) for s, e in spans if e > s]) / (t1 - t0)
        assert in_decode == pytest.approx(busy, abs=1e-6), resource
        moved = sum(e["args"]["bytes"] for e in slices.get(resource, [])
                    if round(e["ts"] * 1e3) >= t0)
        assert moved == pytest.approx(result.bytes_by_resource.get(resource, 0.0),
                                      rel=1e-9, abs=1.0), resource
        checked += busy > 0
    assert checked >= 8

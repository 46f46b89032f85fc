"""Recorder summaries (busy-time union, utilisation) and Chrome/Perfetto trace export."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import simpy
from conftest import make_profile

from hgsim.sim import Machine, Recorder, write_chrome_trace
from hgsim.sim.trace import chrome_trace


# ---------------------------------------------------------------------- recorder
def test_busy_time_is_the_union_of_intervals():
    rec = Recorder()
    rec.record("link", 0.0, 4.0, bytes_=10)
    rec.record("link", 2.0, 6.0, bytes_=10)  # overlaps: union [0, 6]
    rec.record("link", 8.0, 9.0, bytes_=5)
    assert rec.busy_time("link") == pytest.approx(7.0)
    assert rec.bytes_moved("link") == 25
    assert rec.busy_time("link", 3.0, 8.5) == pytest.approx(3.0 + 0.5)
    assert rec.utilisation("link", 0.0, 10.0) == pytest.approx(0.7)
    assert rec.busy_time("unknown") == 0.0


def test_busy_union_handles_an_interval_spanning_earlier_gaps():
    rec = Recorder(keep_activities=False)
    rec.record("r", 1.0, 2.0)
    rec.record("r", 3.0, 4.0)
    rec.record("r", 0.0, 10.0)  # ends last, started first: swallows both
    assert rec.busy_time("r") == pytest.approx(10.0)
    rec.record("r", 11.0, 12.0)
    rec.record("r", 10.5, 11.5)  # ends before the previous record: general insertion
    assert rec.busy_time("r") == pytest.approx(10.0 + 1.5)
    rec.record("r", 5.0, 5.5)  # entirely inside
    assert rec.busy_time("r") == pytest.approx(11.5)
    assert rec.activities == []


def test_compact_keeps_totals_and_refuses_old_windows():
    rec = Recorder(keep_activities=False)
    for i in range(10):
        rec.record("r", float(i), i + 0.5)
    rec.compact(5.0)
    assert rec.busy_time("r") == pytest.approx(5.0)
    assert rec.busy_time("r", 6.0, 10.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        rec.busy_time("r", 0.0, 10.0)


# ---------------------------------------------------------------------- trace
def simulated_machine() -> Machine:
    m = Machine(simpy.Environment(), make_profile())
    for i in range(3):  # overlapping copies on shared links and a kernel chain
        m.copy("cxl0", "gpu0", 1e8, f"kv{i}")
        m.copy("ddr1", "gpu0", 5e7, f"w{i}")
        m.gpu_kernel("gpu0", 1e11, 1e9, f"layer{i}")
    m.cpu_attention("s0", "ddr0", 1e8, 4e8, cores=4, label="cpu-attn")
    m.env.run()
    return m


def test_trace_is_valid_chrome_json(tmp_path):
    m = simulated_machine()
    path = write_chrome_trace(m.recorder, tmp_path / "t.json", metadata={"run": "test"})
    with open(path) as fh:
        trace = json.load(fh)
    assert trace["otherData"] == {"run": "test"}
    events = trace["traceEvents"]
    for e in events:
        assert {"name", "ph", "pid", "tid"} <= e.keys()
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(m.recorder.activities)
    ts = [e["ts"] for e in events if e["ph"] != "M"]
    assert ts == sorted(ts)
    # ts/dur in microseconds
    by_label = {e["name"]: e for e in slices if e["args"]["resource"] == "gpu0.compute"}
    kernel = by_label["layer0"]
    assert kernel["dur"] == pytest.approx(m.kernel_time_s("gpu0", 1e11, 1e9) * 1e6, abs=1e-3)
    assert {"bytes", "flops", "label"} <= kernel["args"].keys()


def test_trace_tracks_name_resources_and_devices():
    m = simulated_machine()
    trace = chrome_trace(m.recorder)
    events = trace["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    thread = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    thread_pid = {e["tid"]: e["pid"] for e in events if e.get("name") == "thread_name"}
    assert len(set(thread.values())) == len(thread)  # one tid per track name
    assert process[1].startswith("gpu0")  # GPUs first
    assert process[thread_pid[_tid(thread, "upi0:s1->s0")]].startswith("upi0")
    for e in events:
        if e["ph"] == "X":
            base = thread[e["tid"]].split(" [")[0]
            assert base == e["args"]["resource"]
    # A resource whose work never overlaps has exactly one track.
    assert [n for n in thread.values() if n.startswith("gpu0.compute")] == ["gpu0.compute"]
    # Counters for active flows are present.
    assert any(e["ph"] == "C" for e in events)


def test_trace_slices_never_overlap_on_one_track():
    m = simulated_machine()
    per_tid = defaultdict(list)
    for e in chrome_trace(m.recorder)["traceEvents"]:
        if e["ph"] == "X":
            per_tid[e["tid"]].append((round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)))
    shared = 0
    for spans in per_tid.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start
        shared += len(spans) > 1
    assert shared  # and some tracks do carry several slices


def test_trace_requires_activities():
    with pytest.raises(ValueError):
        chrome_trace(Recorder(keep_activities=False))


def _tid(thread: dict[int, str], name: str) -> int:
    return next(t for t, n in thread.items() if n == name)


def test_simulate_trace_marks_each_scheduler_decision_with_its_reason(tmp_path):
    from hgsim.simulate import Fidelity, simulate
    from hgsim.workload import Workload

    path = tmp_path / "t.json"
    result = simulate("h100-80gb-spr-cxl", "llama-2-13b", "hybridgen",
                      Workload(batch=2, context=131072, gen=8),
                      fidelity=Fidelity(decode_samples=4, accuracy=False), trace_path=path)
    marks = [e for e in json.loads(path.read_text())["traceEvents"]
             if e.get("cat") == "scheduler"]
    decided = [s for s in result.steps if s.decision]
    assert len(marks) == len(decided) == 2  # one decision every 4 steps
    assert all(m["ph"] == "i" and m["args"]["reason"] for m in marks)
    assert marks[0]["name"] == f"scheduler: {decided[0].decision}"
    row = result.to_row()
    assert row["scheduler_last_reason"].startswith(decided[-1].decision)

"""Memory-level parallelism and loaded-latency summaries, from synthetic measurements of an
imaginary machine that obeys ``hgsim.memory``'s model exactly: the figures must come back.

Two sockets (nodes 0 and 1, 8 cores each) and a CXL expander (node 2, behind socket 0). Every
benchmark row is generated from known figures -- idle latency, bandwidth, queueing delay, lines
in flight per core -- so each summary is checked against the closed form it inverts.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from hgsim.memory import access_rate, loaded_latency_s, touched_bytes
from hw_backend.calibration import summarize_mlp as M
from hw_backend.calibration.records import Measurement, Measurements

LINE = 64
GB = 1e9


class Node:
    """Ground truth of one memory node as read from one socket."""

    def __init__(self, node, socket, remote, latency_ns, bandwidth_gbps, q_ns, lines,
                 gather_lines=None):
        self.node, self.socket, self.remote = node, socket, remote
        self.L0, self.B, self.q = latency_ns * 1e-9, bandwidth_gbps * GB, q_ns * 1e-9
        self.lines = lines  # demand-miss lines one core keeps in flight
        self.gather_lines = gather_lines or {64: lines}  # by row size, per core

    def base(self, **extra):
        return {"node": self.node, "socket": self.socket, "remote": self.remote, **extra}

    def latency_at(self, rate_Bps: float) -> float:
        return loaded_latency_s(self.L0, min(rate_Bps / self.B, 0.999), self.q)

    def step(self, chains: int) -> float:
        """Time per step of N chains: the loaded latency at their own rate, and past the
        miss buffers the extra chains wait (fixed point of step = L(N 64 / step) N / lines)."""
        step = self.L0
        for _ in range(200):
            step = self.latency_at(chains * LINE / step) * max(1.0, chains / self.lines)
        return step


def _rows(n: Node, *, threads=(1, 8), loaded=True, one_thread_gbps=None) -> Measurements:
    rows = Measurements()
    one = one_thread_gbps or n.B / GB / 4
    for t in threads:
        if n.remote and t == 1:
            continue
        gbps = one if t == 1 else n.B / GB
        rows.append(Measurement("memory", "read_bandwidth", gbps, "GB/s",
                                n.base(threads=t, bytes=1 << 29, share_each=[1.0, 1.0])))
        if not n.remote:
            rows.append(Measurement("memory", "write_bandwidth", gbps / 2, "GB/s",
                                    n.base(threads=t, bytes=1 << 29)))
    rows.append(Measurement("memory", "latency", n.L0 * 1e9, "ns", n.base(bytes=1 << 30)))
    for chains in (1, 2, 4, 8, 12, 16, 20, 24, 32, 48):
        ref_steps, steps = 1000, 100
        params = n.base(chains=chains, bytes=1 << 30, huge_pages=1.0)
        rows.append(Measurement("memory", "chase_ref", n.step(1) * 1e9, "ns",
                                {**params, "steps": ref_steps}, (n.step(1) * ref_steps,) * 3))
        rows.append(Measurement("memory", "chase", n.step(chains) * 1e9, "ns",
                                {**params, "steps": steps}, (n.step(chains) * steps,) * 3))
    for t in threads:
        for row_bytes, lines in n.gather_lines.items():
            count = 1 << 16
            rate = access_rate(inflight_bytes=t * lines * LINE, idle_latency_s=n.L0,
                               bandwidth_Bps=n.B, half_load_s=n.q).rate_Bps
            seconds = touched_bytes(count, row_bytes) / rate
            shares = [1.0, 1.0, 0.3] if t > 1 else [0.4, 0.4, 0.4]
            # the turn-taking repeat (share 0.3) ran twice as fast: it must be left out
            rows.append(Measurement("memory", "gather", rate / GB, "GB/s", n.base(
                threads=t, row_bytes=row_bytes, rows=count, bytes=1 << 30, huge_pages=1.0,
                share_each=shares), (seconds, seconds, seconds / 2 if t > 1 else seconds)))
    if loaded and not n.remote:
        steps = 1000
        for i, fraction in enumerate((0.2, 0.4, 0.6, 0.8, 1.0)):
            bg = fraction * 0.7 * n.B
            ns = n.L0
            for _ in range(200):  # the chase's own rate loads the tier too
                ns = n.latency_at(bg + LINE / ns)
            shares = [1.0, 1.0, 1.0] if i else [0.2, 0.2, 0.2]  # the first rate: turn-taking
            busy = ns if i else n.L0  # ... so it saw no load at all
            params = n.base(bg_threads=7, fraction=fraction, target_gbps=bg / GB, steps=steps,
                            unthrottled_gbps=0.7 * n.B / GB, bytes=1 << 30)
            rows.append(Measurement("memory", "loaded_idle", n.L0 * 1e9, "ns", params,
                                    (n.L0 * steps,) * 3))
            rows.append(Measurement("memory", "loaded_latency", busy * 1e9, "ns",
                                    {**params, "bg_gbps_each": [bg / GB] * 3,
                                     "share_each": shares}, (busy * steps,) * 3))
    return rows


def _cached(socket: int) -> Measurements:
    return Measurements([
        Measurement("memory", "gather_cached", 6.5, "ns",
                    {"socket": socket, "node": socket, "remote": False, "threads": 1,
                     "row_bytes": 512, "rows_small": 64, "rows_large": 1024,
                     "v_bytes": 128 << 10}, (1e-5,)),
        *[Measurement("memory", "gather_probe_cached", ns, "ns",
                      {"socket": socket, "node": socket, "remote": False, "threads": 1,
                       "row_bytes": rb, "rows": 1000, "bytes": 256 << 10}, (1e-6,))
          for rb, ns in ((64, 1.2), (512, 5.0))],
    ])


LOCAL0 = Node(0, 0, False, 110, 100, 15, 20, {64: 20, 512: 26})
LOCAL1 = Node(1, 1, False, 110, 100, 15, 20, {64: 20, 512: 26})
CXL = Node(2, 0, False, 250, 30, 40, 20)
REMOTE = [Node(1, 0, True, 190, 60, 0, 18), Node(0, 1, True, 190, 60, 0, 18)]


def synthetic() -> Measurements:
    rows = Measurements()
    for n in (LOCAL0, LOCAL1):
        rows += _rows(n)
    rows += _rows(CXL, loaded=False)
    for n in REMOTE:
        rows += _rows(n, loaded=False)
    rows += _cached(0) + _cached(1)
    return rows


def test_queueing_delay_is_the_mm1_fit_and_says_what_it_covered():
    ms = synthetic()
    fig, why = M.queue_figure(ms, 0)
    assert why == "" and fig.value == pytest.approx(15.0, abs=0.05)
    assert "4 rates" in fig.what and "u = 0.29-0.70" in fig.what and "extrapolated" in fig.what
    assert "3 of 15 repeats left out" in fig.what
    assert "(u +ns: 0.29 +6, 0.43 +11" in fig.what  # the points themselves, for the reader
    # no loaded rows at all (the CXL node here), or only turn-taking repeats: not measured
    none, reason = M.queue_figure(ms, 2)
    assert none is None and "no loaded-latency measurement" in reason
    lonely = Measurements(m for m in ms if not (m.name == "loaded_latency" and m.params["node"] == 0
                                                and m.params["fraction"] != 0.2))
    none, reason = M.queue_figure(lonely, 0)
    assert none is None and "never ran alongside" in reason
    # readers that reached the read bandwidth (measured earlier, while a neighbour loaded the
    # memory): calibrate raised ValueError from the fit, a traceback, on the shared dev VM
    fast = Measurements(
        replace(m, params={**m.params, "bg_gbps_each": [1e3] * len(m.params["bg_gbps_each"])})
        if m.name == "loaded_latency" else m for m in ms)
    none, reason = M.queue_figure(fast, 0)
    assert none is None and "every loaded point ran at or above" in reason


def test_gather_inflight_is_the_chase_plateau_times_a_line():
    ms = synthetic()
    curve = M.mlp_curve(ms, 0, 0, False, M.tier(ms, 0))
    assert [c for c, _ in curve][:4] == [1, 2, 4, 8]
    assert [n for _, n in curve][:4] == pytest.approx([1, 2, 4, 8], rel=1e-6)
    fig = M.gather_inflight_figure(ms, 0)
    assert fig.value == 20 * 64
    assert "plateau 20.0 lines" in fig.what and "from 20 chains" in fig.what
    # the row gathers' cross-check (the one-chain chases' own load adds a hair of latency)
    check = re.search(r"64 B (\d+), 512 B (\d+)", fig.what)
    assert [int(x) for x in check.groups()] == pytest.approx([1280, 1664], abs=2)


def test_stream_inflight_is_the_one_thread_rate_times_its_loaded_latency():
    ms = synthetic()
    fig = M.stream_inflight_figure(ms, 0)
    t = M.tier(ms, 0)
    rate = 25e9  # the one-thread read: a quarter of 100 GB/s
    assert fig.value == pytest.approx(rate * loaded_latency_s(110e-9, 0.25, t.half_load_s), abs=3)
    assert "u = 0.25" in fig.what


def test_a_bandwidth_bound_single_thread_gives_a_floor():
    ms = _rows(Node(0, 0, False, 100, 40, 10, 20), one_thread_gbps=39.5)
    fig = M.stream_inflight_figure(ms, 0)
    assert fig.what.startswith("at least") and "u = 0.95" in fig.what
    assert fig.value == pytest.approx(39.5e9 * loaded_latency_s(100e-9, 0.95, 10e-9), rel=1e-3)


def test_per_thread_figures_invert_the_model_and_skip_turn_taking_repeats():
    ms = synthetic()
    per = M.per_thread_memory(ms, 0)
    assert per[1]["gather_inflight_by_row_bytes"] == pytest.approx({64: 1280, 512: 1664}, rel=1e-3)
    assert per[8]["gather_inflight_by_row_bytes"] == pytest.approx({64: 1280, 512: 1664},
                                                                   rel=1e-3)
    assert per[8]["gather_inflight_bytes"] == pytest.approx(1664, rel=1e-3)  # the KV row: 512 B
    # 8 threads read at the bandwidth: the stream figure is the floor at u = 0.95, per thread
    floor = 100e9 * loaded_latency_s(110e-9, 0.95, M.tier(ms, 0).half_load_s) / 8
    assert per[8]["stream_inflight_bytes"] == pytest.approx(floor, rel=1e-3)
    lonely = Measurements(m if m.name != "gather" else Measurement(
        m.group, m.name, m.value, m.unit, {**m.params, "share_each": [0.3] * 3}, m.seconds)
        for m in ms)
    assert "gather_inflight_by_row_bytes" not in M.per_thread_memory(lonely, 0).get(8, {})


def test_idle_latency_pools_every_one_chain_chase_of_the_run():
    ms = synthetic()
    pooled = M.pooled_latency(ms, 0)
    # the probe row has no steps here: the paired chases (10 x 3) and idle ones (5 x 3) count
    assert pooled.samples == 45 and pooled.footprint_bytes == 1 << 30
    assert pooled.ns == pytest.approx(110, abs=0.2)
    assert "45 one-chain pointer chases over a random cycle of 1024 MiB" in pooled.describe()
    assert M.pooled_latency(ms, 1, 0, remote=True).ns == pytest.approx(190, abs=0.5)
    assert M.pooled_latency(ms, 5) is None


def test_row_costs_and_remote_parallelism():
    ms = synthetic()
    assert M.row_cost_figure(ms, 0).value == 6.5
    assert "gather_rows" in M.row_cost_figure(ms, 0).what
    assert M.probe_row_costs(ms, 1) == {64: 1.2, 512: 5.0}
    remote = M.remote_mlp(ms, 1, 0)
    assert remote["inflight_lines"] == pytest.approx(18, rel=1e-3)
    assert set(remote["gather_gbps_by_row_bytes"]) == {64}
    assert M.remote_mlp(ms, 2, 1) == {}


def test_a_multi_socket_profile_carries_every_figure_with_its_source():
    from hgsim.config_io import parse_yaml, validate
    from hgsim.specs.hardware import HardwareProfile
    from hw_backend.calibration.assemble import Context, build
    from hw_backend.calibration.topology import Machine
    from hw_backend.numa import NumaNode

    rows = synthetic()
    for socket in (0, 1):  # the kernel rows the socket figures need
        for context in (4096, 16384):
            params = {"socket": socket, "threads": 1, "context": context}
            seconds = (context / 1e7,)
            rows.append(Measurement("cpu_kernel", "partial_attention", 1.0, "GB/s", params,
                                    seconds))
            rows.append(Measurement("cpu_kernel", "partial_attention_flops", 20.0, "GFLOP/s",
                                    params, seconds))
    rows += [Measurement("cuda", "hbm_copy", 2000.0, "GB/s", {"bytes": 1 << 31}),
             Measurement("cuda", "h2d_fit", 25.0, "GB/s", {"latency_us": 8.0}),
             Measurement("cuda", "gemm", 700.0, "TFLOP/s", {"dtype": "bf16", "n": 8192})]
    nodes = (NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),
             NumaNode(1, tuple(range(8, 16)), 64 << 30, 1 << 30),
             NumaNode(2, (), 128 << 30, 1 << 30))
    machine = Machine(nodes, {0: (10, 21, 14), 1: (21, 10, 24), 2: (14, 24, 10)}, "Test CPU",
                      2.0, "test", "avx512", tuple(range(16)))
    cuda = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 0, "pci": None}
    text, summary = build(Context("synthetic", "2024-01-01", machine, rows, cuda, None, "fp32",
                                  False, 16 << 20))
    profile = validate(HardwareProfile, parse_yaml(text, "synthetic"))
    cpu0, ddr0 = profile.sockets["cpu0"], profile.tiers["ddr0"]
    assert cpu0.gather_inflight_bytes == 1280
    assert cpu0.gather_ns_per_row == 6.5
    assert ddr0.queue_delay_at_half_load_ns == pytest.approx(15.0, abs=0.05)
    assert profile.tiers["cxl0"].queue_delay_at_half_load_ns == 0.0
    assert "NOT measured by hgsim calibrate on 2024-01-01: no loaded-latency" in text
    assert "queue_delay_at_half_load_ns: 15.0" in text and "u = 0.29-0.70" in text
    assert "keeps 18 lines in flight there" in text  # the UPI link's remote chases
    assert summary["numa"] == {"sockets": {"cpu0": 0, "cpu1": 1},
                               "tiers": {"ddr0": 0, "ddr1": 1, "cxl0": 2}}
    assert summary["remote_mlp"]["node1_from_socket0"]["inflight_lines"] == pytest.approx(18,
                                                                                         rel=1e-3)
    per = summary["cpu0"]["per_threads"]["value"]
    assert per[1]["gather_inflight_by_row_bytes"][512] == pytest.approx(1664, rel=1e-3)
    assert summary["cpu0"]["probe_ns_per_row"]["value"] == {64: 1.2, 512: 5.0}
    assert summary["cpu0"]["mlp_curve"]["value"][48] == pytest.approx(20, rel=1e-3)
    # one thread gathers 512 B rows with 26 lines in flight, one-line rows with 20: in the
    # profile, where the simulator's gather pools read it
    assert cpu0.gather_row_gain == pytest.approx({64: 1.0, 512: 1.3}, rel=1e-3)
    assert cpu0.gather_inflight(512) == pytest.approx(1280 * 1.3, rel=1e-3)


def test_a_row_size_without_a_finite_gain_is_left_out(monkeypatch):
    """A gather sampled at or past the tier's bandwidth (a busy machine) has no finite loaded
    latency; its row size gets no gain instead of an infinite one the profile cannot hold."""

    class Row:
        def __init__(self, row_bytes):
            self.params = {"row_bytes": row_bytes}

    class Tier:
        def loaded_latency_s(self, rate):
            return float("inf") if rate >= 3e9 else 100e-9

    rates = {64: 1e9, 256: 2e9, 4096: 3e9}
    monkeypatch.setattr(M, "_gather_rows", lambda *a: [Row(r) for r in rates])
    monkeypatch.setattr(M, "tier", lambda *a: Tier())
    monkeypatch.setattr(M, "gather_rate_Bps", lambda m: rates[m.params["row_bytes"]])
    assert M.row_gains(None, 0) == {64: 1.0, 256: 2.0}

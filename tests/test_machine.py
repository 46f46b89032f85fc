"""Machine built from a profile: routes, roofline kernels, overlap, duplex PCIe, CPU pools."""

from __future__ import annotations

import pytest
import simpy
from conftest import make_profile

from hgsim.sim import Machine, kernel_time_s, transfer_time_s
from hgsim.sim.compute import ComputeStream, CpuCorePool, cpu_stream_rate_Bps

GB = 1e9
REL = 1e-9


def approx(x):
    return pytest.approx(x, rel=REL, abs=1e-15)


def machine(profile=None, **kwargs) -> Machine:
    return Machine(simpy.Environment(), profile or make_profile(), **kwargs)


def finish_times(m: Machine, starters) -> list[float]:
    """Run processes that each yield one event; return when each event fired."""
    ends = [None] * len(starters)

    def proc(i, start):
        yield start()
        ends[i] = m.env.now

    for i, start in enumerate(starters):
        m.env.process(proc(i, start))
    m.env.run()
    return ends


# ---------------------------------------------------------------------- pure costs
def test_kernel_time_is_a_roofline():
    assert kernel_time_s(1e12, 0, 100e12, 1e12, 0.5, 0.8) == approx(1e12 / (100e12 * 0.5))
    assert kernel_time_s(1e9, 8e9, 100e12, 1e12, 0.5, 0.8, 5e-6) == approx(5e-6 + 8e9 / 0.8e12)
    assert transfer_time_s(2e9, 20e9, 1e-6) == approx(1e-6 + 0.1)
    assert cpu_stream_rate_Bps(4, 5e9, 50e9, 4.0) == 20e9  # load-bound
    assert cpu_stream_rate_Bps(4, 5e9, 50e9, 20.0) == 10e9  # compute-bound


def test_gpu_kernel_time_uses_profile_peak_and_efficiency(tiny_profile):
    m = machine(tiny_profile)
    # 1 TFLOP at 100 TFLOP/s x 0.5 efficiency.
    assert m.kernel_time_s("gpu0", 1e12, 0) == approx(0.02)
    # memory bound: 8 GB at 1000 GB/s x 0.8; attention efficiency on request.
    assert m.kernel_time_s("gpu0", 0, 8e9) == approx(0.01)
    assert m.kernel_time_s("gpu0", 0, 7e9, memory_eff=0.7) == approx(0.01)
    assert finish_times(m, [lambda: m.gpu_kernel("gpu0", 1e12, 0, "gemm")]) == [approx(0.02)]


# ---------------------------------------------------------------------- streams
def test_stream_serialises_kernels_in_launch_order():
    env = simpy.Environment()
    stream = ComputeStream(env, "gpu0.compute")
    a = stream.launch(0.3, "a")
    b = stream.launch(0.2, "b")
    env.run()
    assert (a.value.start_s, a.value.end_s) == (0.0, approx(0.3))
    assert (b.value.start_s, b.value.end_s) == (approx(0.3), approx(0.5))


def test_stream_kernel_waits_for_dependencies_and_keeps_order():
    env = simpy.Environment()
    stream = ComputeStream(env, "s")
    copy_done = env.timeout(1.0)
    a = stream.launch(0.5, "a", after=copy_done)
    b = stream.launch(0.25, "b")  # queued behind a, so behind the copy too
    c = stream.launch(0.25, "c")
    env.run()
    assert a.value.start_s == approx(1.0) and a.value.end_s == approx(1.5)
    assert b.value.start_s == approx(1.5) and c.value.end_s == approx(2.0)
    # once the chain drained, launches are plain again
    d = stream.launch(1.0, "d")
    env.run()
    assert d.value.start_s == approx(2.0) and d.value.end_s == approx(3.0)


def test_gpu_compute_overlaps_pcie_copy(tiny_profile):
    m = machine(tiny_profile)
    kernel_s = 0.02
    copy_bytes = 2e8  # 0.01 s at 20 GB/s (+ latency)
    ends = finish_times(m, [
        lambda: m.gpu_kernel("gpu0", 1e12, 0, "gemm"),
        lambda: m.copy("ddr0", "gpu0", copy_bytes, "kv"),
    ])
    route = m.path("ddr0", "gpu0")
    assert ends[1] == approx(route.latency_s + copy_bytes / (20 * GB))
    assert max(ends) == approx(max(kernel_s, ends[1]))  # max, not sum


# ---------------------------------------------------------------------- routes
def test_cross_socket_route_crosses_upi(tiny_profile):
    m = machine(tiny_profile)
    route = m.path("ddr1", "gpu0")
    names = [c.name for c in route.channels]
    assert names == ["ddr1.read", "upi0:s1->s0", "gpu0.h2d"]
    assert route.latency_s == approx((100 + 100 + 1000) * 1e-9)
    back = m.path("gpu0", "ddr1")
    assert [c.name for c in back.channels] == ["gpu0.d2h", "upi0:s0->s1", "ddr1.write"]
    assert m.path("ddr0", "gpu0").channels == (m.tier_read("ddr0"), m.pcie("gpu0", "h2d"))


def test_cxl_route_is_bounded_by_the_slowest_hop(tiny_profile):
    m = machine(tiny_profile)
    route = m.path("cxl0", "gpu0")
    assert [c.name for c in route.channels] == ["cxl0.read", "cxl0link:cxl0->s0", "gpu0.h2d"]
    assert route.bandwidth_Bps == 10 * GB  # CXL link < PCIe < tier read
    n = 1e9
    ends = finish_times(m, [lambda: m.copy("cxl0", "gpu0", n)])
    assert ends == [approx((300 + 200 + 1000) * 1e-9 + n / (10 * GB))]
    assert ends[0] == approx(route.time_s(n))


def test_routes_between_sockets_and_tiers(tiny_profile):
    m = machine(tiny_profile)
    assert [c.name for c in m.path("cxl0", "s1").channels] == [
        "cxl0.read", "cxl0link:cxl0->s0", "upi0:s0->s1"]
    assert m.path("ddr0", "s0").channels == (m.tier_read("ddr0"),)
    assert m.path("gpu0", "gpu0").channels == ()
    with pytest.raises(KeyError):
        m.path("nowhere", "gpu0")


def test_pcie_is_full_duplex_with_two_copy_engines(tiny_profile):
    m = machine(tiny_profile)
    n = 2e9
    ends = finish_times(m, [lambda: m.copy("ddr0", "gpu0", n), lambda: m.copy("gpu0", "ddr0", n)])
    lat = (100 + 1000) * 1e-9
    assert ends == [approx(lat + n / (20 * GB)), approx(lat + n / (20 * GB))]


def test_pcie_is_shared_with_one_copy_engine():
    m = machine(make_profile(gpus={"gpu0": {"copy_engines": 1}}))
    assert m.pcie("gpu0", "h2d") is m.pcie("gpu0", "d2h")
    n = 2e9
    ends = finish_times(m, [lambda: m.copy("ddr0", "gpu0", n), lambda: m.copy("gpu0", "ddr0", n)])
    lat = (100 + 1000) * 1e-9
    assert ends == [approx(lat + 2 * n / (20 * GB))] * 2


def test_two_gpu_copies_from_cxl_share_the_cxl_link(tiny_profile):
    m = machine(tiny_profile)
    n = 1e9
    ends = finish_times(m, [lambda: m.copy("cxl0", "gpu0", n), lambda: m.copy("cxl0", "gpu0", n)])
    assert ends == [approx(1.5e-6 + 2 * n / (10 * GB))] * 2


# ---------------------------------------------------------------------- CPU
def test_core_pool_queues_when_cores_run_out():
    env = simpy.Environment()
    pool = CpuCorePool(env, "s0.cores", 8)
    a = pool.run(6, 1.0, "a")
    b = pool.run(4, 1.0, "b")  # must wait for a
    c = pool.run(2, 0.5, "c")  # FIFO: behind b even though 2 cores are free
    env.run()
    assert (a.value.end_s, b.value.start_s, c.value.start_s) == (1.0, 1.0, 1.0)
    assert pool.free == 8


def test_cpu_attention_is_capped_by_its_cores(tiny_profile):
    m = machine(tiny_profile)
    n = 2e9
    # 4 cores x 5 GB/s = 20 GB/s < 100 GB/s DDR; 4 FLOP/B needs 80 GFLOP/s < 4 x 50.
    ends = finish_times(m, [lambda: m.cpu_attention("s0", "ddr0", n, 4 * n, cores=4)])
    assert ends == [approx(100e-9 + n / (20 * GB))]
    # 20 FLOP/B: each core computes 50/20 = 2.5 GB/s of KV -> 10 GB/s.
    m = machine(tiny_profile)
    ends = finish_times(m, [lambda: m.cpu_attention("s0", "ddr0", n, 20 * n, cores=4)])
    assert ends == [approx(100e-9 + n / (10 * GB))]
    assert m.recorder.flops_done("s0.attn") == 20 * n
    assert m.cores("s0").free == 8


def test_cpu_attention_contends_with_gpu_copies_on_the_cxl_link():
    # 2500 B in flight per core over the 500 ns CXL route: 5 GB/s per core (Little's law)
    m = machine(make_profile(sockets={"s0": {"stream_inflight_bytes": 2500}}))
    n = 1e9
    # Alone, each would run at the 10 GB/s CXL link (CPU cap 8 x 5 = 40 GB/s). Together 5 each.
    ends = finish_times(m, [
        lambda: m.cpu_attention("s0", "cxl0", n, 2 * n, cores=8),
        lambda: m.copy("cxl0", "gpu0", n),
    ])
    # The CPU flow starts draining at 500 ns (tier + CXL link latency), the copy at 1500 ns
    # (+ PCIe): the CPU flow moves 1e4 B alone first, then both share 5 GB/s, and the copy
    # finishes its last 1e4 B alone.
    head = (1500e-9 - 500e-9) * 10 * GB
    cpu_end = 1500e-9 + (n - head) / (5 * GB)
    assert ends == [approx(cpu_end), approx(cpu_end + head / (10 * GB))]


# ---------------------------------------------------------------------- recording modes
def test_aggregate_mode_matches_full_mode(tiny_profile):
    summaries = []
    for record in (True, False):
        m = machine(tiny_profile, record=record)
        for i in range(5):
            m.copy("ddr1", "gpu0", 1e8 * (i + 1), f"c{i}")
            m.gpu_kernel("gpu0", 1e11, 1e9, f"k{i}")
        m.env.run()
        summaries.append(m.recorder.summary())
        assert bool(m.recorder.activities) == record
    assert summaries[0] == summaries[1]
    assert summaries[0]["gpu0.h2d"].bytes_ == pytest.approx(1.5e9)

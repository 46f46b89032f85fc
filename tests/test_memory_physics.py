"""Memory-system physics: Little's law per issuer, loaded latency, access patterns, writes,
what binds, and the placement policies real allocators have (closed forms throughout)."""

from __future__ import annotations

import math

import pytest
import simpy
from conftest import make_profile

from hgsim.capacity import HostReserve, place_host_kv
from hgsim.catalog import get_model
from hgsim.memory import Pattern, access_rate, gather_time_s, queue_delay_s, touched_bytes
from hgsim.policies import POLICIES, make_policy
from hgsim.profiles import load_profile
from hgsim.sim import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

GB = 1e9
NS = 1e-9
REL = 1e-9

# cxl0 as seen from s0: 300 ns expander + 200 ns link, min(30 GB/s tier, 10 GB/s link)
CXL_LATENCY, CXL_BW = 500 * NS, 10 * GB


def machine(profile=None, record=False) -> Machine:
    return Machine(simpy.Environment(), profile or make_profile(), record=record)


def finish(m: Machine, start) -> float:
    out = {}

    def job():
        flow = yield start()
        out["t"] = m.env.now
        out["flow"] = flow

    m.env.process(job())
    m.env.run()
    return out["t"], out["flow"]


def gather(m: Machine, rows: int, row_bytes: int, tier: str = "cxl0"):
    moved = touched_bytes(rows, row_bytes)
    return finish(m, lambda: m.read({tier: 1.0}, "s0", moved, Pattern.GATHER, "gather"))


# ---------------------------------------------------------------------- Little's law
def test_a_row_costs_every_cache_line_it_touches():
    assert touched_bytes(10, 64) == 640
    assert touched_bytes(10, 200) == 10 * 256  # 200 B spans four lines
    assert touched_bytes(10, 4096) == 40960
    assert touched_bytes(0, 256) == 0


@pytest.mark.parametrize("inflight, bound", [(250, "latency"), (2000, "bandwidth")])
def test_random_gather_takes_the_closed_form(inflight, bound):
    """N rows of R bytes on c cores with b bytes in flight per core from a tier of latency L
    and bandwidth B: max(N ceil(R/64) 64 / B, N ceil(R/64) 64 L / (c b)), plus the first
    line's latency once."""
    n, r, c = 100_000, 200, 8
    m = machine(make_profile(sockets={"s0": {"gather_inflight_bytes": inflight}}))
    end, flow = gather(m, n, r)
    moved = n * math.ceil(r / 64) * 64
    closed = max(moved / CXL_BW, moved * CXL_LATENCY / (c * inflight))
    assert end == pytest.approx(CXL_LATENCY + closed, rel=REL)
    assert closed == pytest.approx(gather_time_s(
        rows=n, row_bytes=r, cores=c, inflight_per_core=inflight, idle_latency_s=CXL_LATENCY,
        bandwidth_Bps=CXL_BW), rel=REL)
    assert flow.bound_by() == ("cxl0 latency" if bound == "latency" else "cxl0link")


def test_rows_of_several_lines_keep_more_in_flight_by_their_gain():
    """The simulator gathers V rows with the same per-row-size figure calibration measured."""
    n, r = 100_000, 256
    profile = make_profile(sockets={"s0": {"gather_row_gain": {128: 1.2, 256: 1.5}}})
    m = machine(profile)
    moved = touched_bytes(n, r)
    end, _ = finish(m, lambda: m.read({"cxl0": 1.0}, "s0", moved, Pattern.GATHER,
                                      row_bytes=r))
    assert end == pytest.approx(CXL_LATENCY + moved * CXL_LATENCY / (8 * 250 * 1.5), rel=REL)


def test_doubling_latency_doubles_a_latency_bound_gather_and_leaves_a_bandwidth_bound_scan():
    def run(latency_ns):
        profile = make_profile(tiers={"cxl0": {"latency_ns": latency_ns}},
                               sockets={"s0": {"stream_inflight_bytes": 5000}})
        n = 1e9
        g_end, _ = gather(machine(profile), 200_000, 256)
        m = machine(profile)
        s_end, s_flow = finish(m, lambda: m.read({"cxl0": 1.0}, "s0", n, Pattern.STREAM))
        route = 200 * NS + latency_ns * NS
        return g_end - route, s_end - route, s_flow

    gather_a, scan_a, flow = run(300)  # route 500 ns
    gather_b, scan_b, _ = run(800)  # route 1000 ns
    assert gather_b == pytest.approx(2 * gather_a, rel=REL)  # 8 x 250 B / L binds
    assert scan_b == pytest.approx(scan_a, rel=REL)  # 8 x 5000 B / 1 us = 40 GB/s > 10 GB/s
    assert scan_a == pytest.approx(1e9 / CXL_BW, rel=REL) and flow.bound_by() == "cxl0link"


def test_dma_is_capped_by_what_the_copy_engine_keeps_in_flight():
    # 8 KiB in flight over cxl0 -> gpu0 (300 + 200 + 1000 ns): 5.5 GB/s < the 10 GB/s link
    inflight = 8 * 1024
    profile = make_profile(gpus={"gpu0": {"dma_inflight_bytes": inflight}})
    n = 1e8
    for tier, route in (("cxl0", 1500 * NS), ("ddr0", 1100 * NS)):
        m = machine(profile)
        end, flow = finish(m, lambda t=tier, m=m: m.read({t: 1.0}, "gpu0", n, Pattern.DMA))
        assert end == pytest.approx(route + n * route / inflight, rel=REL)
        assert flow.bound_by() == f"{tier} latency"
    m = machine()  # 1 MiB in flight from local DRAM: 950 GB/s > 20 GB/s, PCIe binds
    end, flow = finish(m, lambda: m.read({"ddr0": 1.0}, "gpu0", n, Pattern.DMA))
    assert end == pytest.approx(1100 * NS + n / (20 * GB), rel=REL)
    assert flow.bound_by() == "pcie0 h2d"


def test_a_read_over_several_tiers_progresses_through_all_and_pays_the_mean_latency():
    """Pages interleaved over ddr0 and cxl0: each tier carries its share of the rate, and
    Little's law sees the fraction-weighted latency of the two routes."""
    m = machine(make_profile(sockets={"s0": {"gather_inflight_bytes": 100}}))
    moved = 1e7
    end, _ = finish(m, lambda: m.read({"ddr0": 0.5, "cxl0": 0.5}, "s0", moved, Pattern.GATHER))
    latency = 0.5 * 100 * NS + 0.5 * CXL_LATENCY
    rate = min(8 * 100 / latency, CXL_BW / 0.5, 100 * GB / 0.5)
    assert end == pytest.approx(CXL_LATENCY + moved / rate, rel=REL)


# ---------------------------------------------------------------------- loaded latency
def test_queueing_delay_has_the_mm1_shape():
    assert queue_delay_s(0.5, 20 * NS) == pytest.approx(20 * NS)
    assert queue_delay_s(0.9, 20 * NS) == pytest.approx(180 * NS)
    assert queue_delay_s(0.0, 20 * NS) == 0.0 and queue_delay_s(1.0, 20 * NS) == math.inf


def test_a_saturated_tier_s_latency_follows_its_curve():
    """A reader with far more in flight than the tier can serve: it runs where Little's law
    at the loaded latency meets the tier, L = C / r = L0 + q u / (1 - u)."""
    q = 20
    profile = make_profile(tiers={"ddr0": {"queue_delay_at_half_load_ns": q}},
                           sockets={"s0": {"stream_inflight_bytes": 10_000}})
    m = machine(profile)
    n = 1e9
    end, flow = finish(m, lambda: m.read({"ddr0": 1.0}, "s0", n, Pattern.STREAM))
    rate = n / (end - 100 * NS)
    u = rate / (100 * GB)
    inflight = 8 * 10_000
    assert inflight / rate == pytest.approx(100 * NS + q * NS * u / (1 - u), rel=1e-7)
    expected = access_rate(inflight_bytes=inflight, idle_latency_s=100 * NS,
                           bandwidth_Bps=100 * GB, half_load_s=q * NS)
    assert rate == pytest.approx(expected.rate_Bps, rel=1e-7)
    assert 0.9 < u < 1
    assert flow.bound_by() == "ddr0 read"  # queueing is most of the latency: bandwidth binds


def test_a_saturated_tier_is_slower_for_every_reader():
    """A latency-bound gather sharing ddr0 with a heavy scan pays the tier's loaded latency:
    both run at C_i / (L0 + W) with W = q u / (1 - u) and u their summed load."""
    q, c_scan, c_gather, bw, l0 = 20 * NS, 8 * 10_000, 8 * 250, 100 * GB, 100 * NS
    profile = make_profile(tiers={"ddr0": {"queue_delay_at_half_load_ns": 20}},
                           sockets={"s0": {"stream_inflight_bytes": 10_000}})
    m = machine(profile)
    flows = {}

    def start(name, pattern, n):
        flows[name] = m.read({"ddr0": 1.0}, "s0", n, pattern, name)

    start("scan", Pattern.STREAM, 1e10)
    start("gather", Pattern.GATHER, 1e7)
    m.env.run(until=1e-6)
    live = {f.label: f for c in m.network.channels.values() for f in c.flows}
    # solve u = (c_scan + c_gather) / (L0 + W(u)) / B independently, by bisection
    lo, hi = 0.0, 1.0 - 1e-15
    for _ in range(200):
        u = 0.5 * (lo + hi)
        if (c_scan + c_gather) / (l0 + q * u / (1 - u)) / bw > u:
            lo = u
        else:
            hi = u
    latency = l0 + q * u / (1 - u)
    assert live["gather"].rate == pytest.approx(c_gather / latency, rel=1e-7)
    assert live["scan"].rate == pytest.approx(c_scan / latency, rel=1e-7)
    alone = access_rate(inflight_bytes=c_gather, idle_latency_s=l0, bandwidth_Bps=bw,
                        half_load_s=q).rate_Bps
    assert live["gather"].rate < 0.4 * alone  # the scan's queue slows the gather


# ---------------------------------------------------------------------- the host path
def test_the_staging_write_and_the_pcie_read_of_a_gather_appear_in_the_record():
    result = simulate("h100-80gb-spr-cxl", "llama-2-13b", "hybridgen_static",
                      Workload(batch=1, context=131072, gen=1),
                      fidelity=Fidelity(decode_samples=0, accuracy=False, record=True))
    assert result.feasible
    row = result.to_row()
    assert row["binding"]
    bytes_ = result.bytes_by_resource
    # the CPU gathers V rows out of CXL and writes them into DRAM ...
    assert bytes_["cxl0.read"] > 0 and bytes_["ddr0.write"] > 0
    # ... the copy engine reads them back out of DRAM over PCIe, and evictions cross d2h
    assert bytes_["gpu0.h2d"] == pytest.approx(bytes_["ddr0.read"] - _scan_bytes(result),
                                               rel=1e-6)
    assert bytes_["gpu0.d2h"] > 0


def _scan_bytes(result) -> float:
    from hgsim.catalog import get_model
    from hgsim.costs import layer_work
    from hgsim.policies import make_policy
    from hgsim.profiles import load_profile

    model = get_model("llama-2-13b")
    pol = make_policy("hybridgen_static", model, load_profile("h100-80gb-spr-cxl"),
                      Workload(batch=1, context=131072, gen=1))
    lp = pol.layer_plan(131072)
    return model.num_layers * layer_work(model, 1, lp, "fp16", "fp16").cpu_k_bytes


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "gpu_only"])
def test_the_critical_path_splits_each_step_exactly(policy):
    result = simulate("h100-80gb-spr-cxl", "llama-2-13b", policy,
                      Workload(batch=2, context=131072, gen=4),
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    assert result.feasible
    mean = sum(s.latency_s for s in result.steps) / len(result.steps)
    assert sum(result.binding_s.values()) == pytest.approx(mean, rel=1e-9)
    assert result.binding in result.binding_s and "idle" not in result.binding_s


def test_the_binding_resource_names_what_to_make_faster():
    wl = Workload(batch=2, context=131072, gen=4)
    fid = Fidelity(decode_samples=0, accuracy=False)
    assert simulate("h100-80gb-spr-cxl", "llama-2-13b", "flexgen", wl,
                    fidelity=fid).binding == "pcie0 h2d"
    assert simulate("h100-80gb-spr-cxl", "llama-2-13b", "cpu_offload", wl,
                    fidelity=fid).binding == "ddr0 read"
    # Two cores: the K scan from ddr0 and the V-row gather from cxl0 are both latency-bound
    # (2 x 500 B / 100 ns = 10 GB/s < 100; 2 x 250 B / 500 ns = 1 GB/s < 10). Per host token
    # the scan moves 5120 x 2 B at 10 GB/s, the gather 40 heads x 5% x 256 B at 1 GB/s: 2:1.
    result = simulate(make_profile(sockets={"s0": {"cores": 2}}), "llama-2-13b",
                      "hybridgen_static", Workload(batch=1, context=262144, gen=2), fidelity=fid)
    shares = result.binding_shares()
    assert result.binding == "ddr0 latency"
    assert shares["ddr0 latency"] / shares["cxl0 latency"] == pytest.approx(2.0, rel=0.01)


# ---------------------------------------------------------------------- placement
def _place(strategy, ddr_gb=100, cxl_gb=400, k=60e9, v=60e9):
    profile = make_profile(tiers={"ddr0": {"capacity_gb": ddr_gb}, "ddr1": None,
                                  "cxl0": {"capacity_gb": cxl_gb}})
    return place_host_kv(profile, k, v, strategy)


def test_first_touch_fills_dram_then_spills_both_k_and_v_to_cxl():
    placement, used = _place("first_touch")
    assert used == {"ddr0": pytest.approx(100e9), "cxl0": pytest.approx(20e9)}
    assert placement.k_fractions == pytest.approx({"ddr0": 100 / 120, "cxl0": 20 / 120})
    assert placement.v_fractions == placement.k_fractions


def test_page_interleave_splits_evenly_until_a_tier_fills():
    placement, used = _place("interleave")
    assert used == {"ddr0": pytest.approx(60e9), "cxl0": pytest.approx(60e9)}
    placement, used = _place("interleave", ddr_gb=40)  # ddr0 fills: the rest goes to cxl0
    assert used == {"ddr0": pytest.approx(40e9), "cxl0": pytest.approx(80e9)}


def test_weighted_interleave_follows_read_bandwidth():
    placement, used = _place("weighted_interleave", ddr_gb=1000)  # ddr0 100 GB/s, cxl0 30
    assert placement.k_fractions == pytest.approx({"ddr0": 100 / 130, "cxl0": 30 / 130})
    assert placement.v_fractions == placement.k_fractions


def test_semantic_keeps_keys_local_and_values_far():
    placement, used = _place("semantic")
    assert placement.k_fractions == {"ddr0": 1.0} and placement.v_fractions == {"cxl0": 1.0}


def test_the_placement_ablations_are_named_for_what_they_do():
    assert {"hybridgen_firsttouch", "hybridgen_interleave", "hybridgen_weighted",
            "hybridgen_importance"} <= set(POLICIES)
    assert "hybridgen_nosemantic" not in POLICIES


def test_cxl_latency_matters_on_a_lean_host_and_not_where_bandwidth_binds():
    """The cxl_sweep regimes in miniature: 64 cores and DRAM enough for the KV cache leave
    CXL latency no say; 8 cores with the cache spilled to CXL are latency-bound there."""
    from hgsim.profiles import load_profile, profile_with_overrides

    base = load_profile("h100-80gb-spr-cxl")
    fid = Fidelity(decode_samples=2, accuracy=False)
    wl = Workload(batch=2, context=131072, gen=4)
    lean = {"sockets.cpu0.cores": 8, "tiers.ddr0.capacity_gb": "128 GiB"}

    def tps(host, latency_ns, policy="cpu_offload"):
        profile = profile_with_overrides(base, {**host, "tiers.cxl0.latency_ns": latency_ns})
        return simulate(profile, "llama-2-13b", policy, wl, fidelity=fid).tokens_per_s

    assert tps({}, 600) == pytest.approx(tps({}, 150), rel=1e-3)
    assert tps(lean, 600) < 0.8 * tps(lean, 150)


def test_host_kv_goes_where_offloaded_weights_and_the_reserve_leave_room():
    """Weights streamed from DRAM and the host reserve take DRAM before any KV does: first
    touch then fills what is left of DRAM and spills the rest to CXL, instead of reporting DRAM
    short while the expander has room (Llama-3.1-70B offloads ~74 GB of its 141 GB)."""
    profile = load_profile("h100-80gb-spr-cxl")
    policy = make_policy("cpu_offload", get_model("llama-3.1-70b"), profile,
                         Workload(batch=2, context=1_400_000, gen=4))
    used, capacity = policy.footprint.used_bytes, policy.footprint.capacity_bytes
    assert policy.offloaded_weight_bytes > 50e9 and policy.feasible
    assert used["ddr0"] == pytest.approx(capacity["ddr0"], rel=1e-12)
    host_kv = policy.workload.final_context * 2 * policy.kv_token_bytes  # all of it
    reserve = policy.options.host_reserve.bytes_(profile)
    assert used["ddr0"] + used["cxl0"] == pytest.approx(
        host_kv + policy.offloaded_weight_bytes + sum(reserve.values()), rel=1e-12)


def test_the_host_reserve_is_a_64th_of_every_tier_and_the_process_on_the_gpu_s_dram():
    """struct page (64 B per 4 KiB page) on every host tier; the OS and the serving process
    on the DRAM of the GPU's socket (ddr0 on cpu0 in the 2-socket profile, not ddr1), whatever
    the policy keeps on the host."""
    profile = load_profile("h100-2socket-cxl")
    reserve = HostReserve(fixed_gb=8.0, kernel_fraction=1 / 64).bytes_(profile)
    tier = {n: t.capacity_gb * GB for n, t in profile.tiers.items()}
    assert reserve == pytest.approx({"ddr0": tier["ddr0"] / 64 + 8 * GB,
                                     "ddr1": tier["ddr1"] / 64, "cxl0": tier["cxl0"] / 64})
    policy = make_policy("gpu_only", get_model("llama-2-7b"), profile,
                         Workload(batch=1, context=4096, gen=4))
    assert policy.footprint.used_bytes == pytest.approx({"hbm": policy.footprint.used_bytes["hbm"],
                                                         **reserve})

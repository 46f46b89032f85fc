"""``hgsim validate``'s micro-cases: which cases, which route, which closed form (no hardware)."""

from __future__ import annotations

import math

import pytest
from conftest import make_profile

from hgsim.config_io import parse_yaml, validate
from hgsim.micro import (
    Extras,
    LatencyDrift,
    MicroCase,
    MicroResult,
    MicroStudy,
    Numa,
    Prediction,
    micro_cases,
    micro_mape,
    predict,
    route,
)
from hgsim.validation import ValidationStudy

NUMA = Numa({"s0": 0, "s1": 1}, {"ddr0": 0, "ddr1": 1, "cxl0": 2})
SHAPE = {"heads": 32, "kv_heads": 8, "head_dim": 128, "kv_dtype": "fp32"}


def test_every_socket_reads_every_tier_it_has_a_route_to(tiny_profile):
    study = MicroStudy(gather={"row_bytes": [64, 512], "threads": [1, 4, 64]},
                       scan={"contexts": ["16k"], "threads": [2]})
    cases = micro_cases(study, tiny_profile, NUMA, **SHAPE)
    pairs = {(c.socket, c.tier) for c in cases}
    # CXL hangs off s0: only s0 reads it; each DDR is read locally and over UPI
    assert pairs == {("s0", "ddr0"), ("s0", "ddr1"), ("s0", "cxl0"), ("s1", "ddr1"),
                     ("s1", "ddr0")}
    gathers = [c for c in cases if c.kind == "gather"]
    assert {c.threads for c in gathers} == {1, 4}  # 64 threads do not fit 8 cores
    assert len(gathers) == 5 * 2 * 2 and len(cases) - len(gathers) == 5
    remote = [c for c in cases if c.remote]
    assert {(c.socket, c.tier) for c in remote} == {("s0", "ddr1"), ("s1", "ddr0")}
    scan = next(c for c in cases if c.kind == "scan")
    assert scan.context == 16384 and scan.bytes_read == 8 * 16384 * 128 * 4
    assert scan.flops == 2 * 32 * 16384 * 128
    assert "from s0" in next(c.label for c in remote if c.socket == "s0")


def test_routes_add_latency_and_take_the_slowest_hop(tiny_profile):
    local = route(tiny_profile, "s0", "ddr0")
    assert (local.latency_s, local.bandwidth_Bps) == pytest.approx((100e-9, 100e9))
    remote = route(tiny_profile, "s0", "ddr1")  # + UPI: 100 ns, 40 GB/s
    assert (remote.latency_s, remote.bandwidth_Bps) == pytest.approx((200e-9, 40e9))
    cxl = route(tiny_profile, "s0", "cxl0")  # 300 ns tier + 200 ns link, 10 GB/s link
    assert (cxl.latency_s, cxl.bandwidth_Bps) == pytest.approx((500e-9, 10e9))


def _gather(**kw) -> MicroCase:
    base = {"socket": "s0", "tier": "ddr0", "node": 0, "cpu_node": 0, "threads": 1,
            "row_bytes": 64, "rows": 1 << 20, "buffer_bytes": 1 << 30}
    return MicroCase("gather", **{**base, **kw})


def test_a_gather_is_predicted_by_the_closed_form(tiny_profile):
    # 250 B in flight per core at 100 ns: 2.5 GB/s per core; rows of 100 B touch 2 lines
    one = predict(tiny_profile, _gather())
    assert one.seconds == pytest.approx((1 << 20) * 64 * 100e-9 / 250)
    assert one.bound == "latency"
    wide = predict(tiny_profile, _gather(row_bytes=100, threads=4))
    assert wide.seconds == pytest.approx((1 << 20) * 128 * 100e-9 / (4 * 250))
    # the probe's own work per row caps the rate where memory would allow more
    capped = predict(tiny_profile, _gather(), Extras(probe_ns_per_row={"s0": {64: 100.0}}))
    assert capped.seconds == pytest.approx((1 << 20) * 100e-9) and capped.bound == "compute"


def test_rows_of_several_lines_get_the_gain_calibration_saw_for_them():
    profile = make_profile(sockets={"s0": {"gather_row_gain": {64: 1.0, 128: 1.2, 1024: 1.6}}})
    sock = profile.sockets["s0"]  # gather_inflight_bytes 250
    assert sock.gather_inflight(64) == 250.0  # one line: the chases' plateau
    assert sock.gather_inflight(100) == 300.0  # two lines: the 128 B gain
    assert sock.gather_inflight(512) == 300.0
    assert sock.gather_inflight(4096) == 400.0
    assert profile.sockets["s1"].gather_inflight(4096) == 250.0  # nothing calibrated there
    sparse = make_profile(sockets={"s0": {"gather_row_gain": {1024: 1.6}}}).sockets["s0"]
    assert sparse.gather_inflight(128) == 400.0  # the nearest above
    p = predict(profile, _gather(row_bytes=1024))
    assert p.seconds == pytest.approx((1 << 20) * 1024 * 100e-9 / 400)


def test_queueing_slows_a_gather_that_loads_the_tier(tiny_profile):
    queued = make_profile(tiers={"ddr0": {"queue_delay_at_half_load_ns": 50}})
    case = _gather(threads=8)
    calm, busy = predict(tiny_profile, case), predict(queued, case)
    assert busy.seconds > calm.seconds
    # at the solution, Little's law holds over the loaded latency
    rate = case.bytes_read / busy.seconds
    u = rate / 100e9
    assert rate == pytest.approx(8 * 250 / (100e-9 + 50e-9 * u / (1 - u)), rel=1e-6)


def test_a_scan_is_bytes_over_the_least_rate_plus_a_call(tiny_profile):
    case = MicroCase("scan", "s0", "ddr0", 0, 0, threads=2, context=65536, **SHAPE)
    nbytes = case.bytes_read
    # 2 x 500 B at 100 ns = 10 GB/s from memory; compute: 2 x 50 GFLOP/s over 2 FLOP/B = 50 GB/s
    assert predict(tiny_profile, case).seconds == pytest.approx(nbytes / 10e9)
    slow = make_profile(sockets={"s0": {"attention_gflops_per_core": 5, "op_overhead_us": 40}})
    p = predict(slow, case)  # compute: 2 x 5 / 2 = 5 GB/s, plus 40 us per call
    assert p.bound == "compute" and p.seconds == pytest.approx(nbytes / 5e9 + 40e-6)
    # measured at two threads: 3 GFLOP/s per core (SMT siblings, say) and 100 us per call
    at_two = Extras(per_threads={"s0": {2: {"attention_gflops_per_core": 3.0,
                                            "op_overhead_us": 100.0}}})
    assert predict(slow, case, at_two).seconds == pytest.approx(nbytes / 3e9 + 100e-6)
    one = MicroCase("scan", "s0", "ddr0", 0, 0, threads=1, context=65536, **SHAPE)
    assert predict(slow, one, at_two).seconds == pytest.approx(nbytes / 2.5e9 + 40e-6)


def test_micro_results_and_their_mape():
    case = _gather()
    a = MicroResult(case, 1.0, Prediction(1.1, "latency"), 2.0, 0.5)
    b = MicroResult(case, 2.0, Prediction(1.0, "bandwidth"), 2.0, 1.0)
    assert a.error_pct == pytest.approx(10.0) and b.error_pct == pytest.approx(-50.0)
    assert micro_mape([a, b]) == pytest.approx(30.0)
    assert math.isnan(micro_mape([]))
    apart = MicroResult(case, 1.0, Prediction(3.0, "latency"), 5.0, 0.2, together=False)
    assert micro_mape([a, b, apart]) == pytest.approx(30.0)  # turns on one core: left out
    assert math.isnan(micro_mape([apart]))
    row = a.row()
    assert row["measured_gbps"] == pytest.approx(case.bytes_read / 1e9)
    assert row["bound"] == "latency" and row["core_share"] == 0.5


def test_a_study_may_carry_micro_cases():
    text = """
name: s
model: {name: m, family: llama, num_layers: 1, hidden_size: 4096, num_heads: 32,
        num_kv_heads: 8, head_dim: 128, ffn_size: 1, ffn_kind: swiglu, vocab_size: 1,
        max_context: 1048576}
configs: []
micro:
  repeats: 3
  gather: {row_bytes: [64, 4096], threads: [1]}
  scan: {contexts: [4k]}
"""
    study = validate(ValidationStudy, parse_yaml(text, "s"))
    assert study.micro.gather.row_bytes == [64, 4096] and study.micro.scan.contexts == [4096]
    assert study.micro.gather.buffer_mb == 1024  # far larger than any last-level cache
    bad = text.replace("[64, 4096]", "[60]")
    with pytest.raises(Exception, match="row_bytes"):
        validate(ValidationStudy, parse_yaml(bad, "s"))


def test_one_node_mapping_is_the_gpu_socket_and_its_ddr(tiny_profile):
    assert Numa.only_node(tiny_profile) == Numa({"s0": 0}, {"ddr0": 0})


def test_latency_drift_says_how_far_the_routes_moved():
    text = LatencyDrift("ddr0 from s0", 200.0, 220.0, 190.0).describe()
    assert "190-220 ns" in text and "200 ns in the profile" in text and "-5% to +10%" in text

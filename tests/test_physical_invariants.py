"""Physical invariants of a simulated decode step, with the partition plan held fixed.

A plan is made once and then run on variants of a profile, so that only the hardware changes
(a policy would otherwise re-partition on the new hardware). What holds (docs/model.md, "What a
better part buys"):

* the copy stream runs one upload at a time, in layer order (hw_backend's executor queues every
  layer's upload on one CUDA copy stream);
* a machine whose every rate is s times higher and every time s times shorter runs a step
  exactly s times faster (nothing in the model has a time scale of its own);
* where a layer's host work does not overlap the next layer's and no weights stream from host
  memory, better hardware never slows a step and more work never speeds one up. Otherwise it
  is no guarantee: flows share a channel max-min fairly, and a faster non-critical copy out of
  DRAM (an upload, a weight load) takes more of the DRAM a layer's scan needs;
* what the resources report moving is what the plan moves; busy fractions lie in [0, 1]; energy
  per token is average power times time per token; throughput is batch over step latency; the
  critical path's split adds up to the step latency;
* the feedback scheduler keeps its bounds and moves r the way the measured times say.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from hgsim.catalog import get_model
from hgsim.costs import layer_work
from hgsim.memory import touched_bytes
from hgsim.policies import make_policy
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.scheduler import FeedbackScheduler, SchedulerConfig
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
MODEL = get_model("llama-3.1-8b")


def plan_for(policy: str, context: int, batch: int = 1, profile=None, **options):
    pol = make_policy(policy, MODEL, profile or load_profile(H100),
                      Workload(context=context, batch=batch, gen=1), options or None)
    assert pol.feasible, pol.infeasibility()
    return pol.step_plan(context)


def host_plan(policy: str, options: dict, profile: str = H100):
    """A plan with most of 32k tokens x 4 sequences on the host: made for 24 GB of HBM (the
    capacity decides the split, nothing of a step's time)."""
    small = profile_with_overrides(load_profile(profile), {"gpus.gpu0.hbm_capacity_gb": 24})
    plan = plan_for(policy, 32768, batch=4, profile=small, **options)
    assert plan.layer.host_tokens > plan.layer.gpu_tokens
    return plan


def run_step(profile, plan, *, record: bool = False):
    """(step measure, machine) of one step of ``plan`` on ``profile``."""
    machine = Machine(simpy.Environment(), profile, record=record)
    engine = DecodeEngine(machine, MODEL, "fp16", "fp16")
    return engine.step(plan), machine


# ------------------------------------------------------------------ the copy stream


def test_uploads_cross_one_at_a_time_in_layer_order():
    # InfiniGen at batch 16: each layer uploads ~267 MB of gathered K/V rows, 5.3 ms at PCIe's
    # 50 GB/s, longer than the next layer's gather (1.3 ms), so without a copy queue the
    # uploads of consecutive layers would overlap and share PCIe.
    plan = plan_for("infinigen", 32768, batch=16)
    _, machine = run_step(load_profile(H100), plan, record=True)
    uploads = sorted((a for a in machine.recorder.activities
                      if a.resource == "gpu0.h2d" and a.label == "to gpu"),
                     key=lambda a: a.start)
    assert len(uploads) == plan.num_layers
    for before, after in zip(uploads, uploads[1:], strict=False):
        assert after.start >= before.end - 1e-12
    alone_s = uploads[0].bytes_ / (load_profile(H100).links["pcie0"].bandwidth_gbps * 1e9)
    for a in uploads:  # each alone on PCIe: its bytes at the link's rate
        assert a.end - a.start == pytest.approx(alone_s, rel=1e-6)



# ------------------------------------------------------------------ better hardware, more work
# Profile fields by how they move a step: rates (better when higher; what a step waits on is
# bytes or FLOPs over them) and times (better when lower). Efficiencies, bytes in flight, core
# and copy-engine counts are better when higher but carry no unit of time.
RATES = ("hbm_bandwidth_gbps", "attention_gflops_per_core", "read_bandwidth_gbps",
         "write_bandwidth_gbps", "bandwidth_gbps")
TIMES = ("kernel_launch_overhead_us", "topk_ns_per_insert", "gather_ns_per_row",
         "op_overhead_us", "latency_ns", "queue_delay_at_half_load_ns")
COUNTS = ("compute_efficiency", "memory_efficiency", "attention_efficiency",
          "dma_inflight_bytes", "stream_inflight_bytes", "gather_inflight_bytes", "cores",
          "copy_engines")


def _fields(profile):
    """(dotted path, value) of every rate, time and count field of ``profile``."""
    data = profile.model_dump()
    for section in ("gpus", "sockets", "tiers", "links"):
        for name, spec in data[section].items():
            for field, value in spec.items():
                if field == "peak_tflops":
                    for dtype, tflops in value.items():
                        yield f"{section}.{name}.peak_tflops.{dtype}", tflops
                elif field in RATES + TIMES + COUNTS and value:
                    yield f"{section}.{name}.{field}", value


def _better(path: str, value: float, factor: float):
    """``value`` made ``factor`` (> 1) times better: rates and counts up, times down."""
    field = path.rsplit(".", 1)[1]
    if field in TIMES:
        return value / factor
    if field in ("cores", "copy_engines"):
        return int(value * factor)
    if field.endswith("efficiency"):
        return min(1.0, value * factor)
    return value * factor


def time_scaled(profile, s: float):
    """``profile`` with every rate ``s`` times higher and every time ``s`` times shorter."""
    rate_fields = RATES + ("peak_tflops",)
    return profile_with_overrides(profile, {
        path: value * s if path.split(".")[2] in rate_fields else value / s
        for path, value in _fields(profile) if path.split(".")[2] not in COUNTS})


# One plan per host path (no look-ahead, so a layer's host work never overlaps the next
# layer's: see the module docstring), and the step's every kind of work.
SERIAL_PLANS = [
    ("hybridgen", {"adaptive": False, "gpu_share": 0.1, "lookahead": False}),
    ("hybridgen", {"adaptive": False, "gpu_share": 0.1, "lookahead": False,
                   "placement": "interleave", "selection": "per_head"}),
    ("hgca", {}),
    ("flexgen_cpu", {}),
    ("cpu_offload", {}),
]


@settings(max_examples=12, deadline=None, database=None)
@given(policy=st.sampled_from(SERIAL_PLANS + [("hybridgen", {"adaptive": False}),
                                              ("infinigen", {}), ("flexgen", {})]),
       s=st.floats(0.1, 10.0), profile=st.sampled_from([H100, "h100-2socket-cxl"]))
def test_a_machine_s_times_faster_in_every_rate_and_time_runs_a_step_s_times_faster(
        policy, s, profile):
    # nothing in the model has a time scale of its own (any plan: overlap and sharing included)
    base = load_profile(profile)
    plan = host_plan(*policy, profile=profile)
    before, _ = run_step(base, plan)
    after, _ = run_step(time_scaled(base, s), plan)
    assert after.latency_s == pytest.approx(before.latency_s / s, rel=1e-9)


@pytest.mark.parametrize(("policy", "options"), SERIAL_PLANS)
def test_better_hardware_never_slows_a_step_with_a_fixed_plan(policy, options):
    base = load_profile(H100)
    plan = host_plan(policy, options)
    latency_s = run_step(base, plan)[0].latency_s
    for path, value in _fields(base):
        better = profile_with_overrides(base, {path: _better(path, value, 2.0)})
        worse = profile_with_overrides(base, {path: _better(path, value, 0.5)})
        assert run_step(better, plan)[0].latency_s <= latency_s * (1 + 1e-9), path
        assert run_step(worse, plan)[0].latency_s >= latency_s * (1 - 1e-9), path


@pytest.mark.parametrize(("policy", "options"), SERIAL_PLANS)
def test_more_work_never_speeds_a_step_up(policy, options):
    base = load_profile(H100)
    plan = host_plan(policy, options)
    lp = plan.layer
    larger = [replace(plan, batch=plan.batch + 1),
              plan.with_layer(replace(lp, context=lp.context + 1024,  # more host tokens
                                      host_selected=lp.host_selected + (1024 if lp.exact else 0)))]
    if 0 < lp.host_selected < lp.host_tokens - 1:  # a larger top-k, short of all of them
        larger.append(plan.with_layer(replace(lp, host_selected=lp.host_selected + 1)))
    latency_s = run_step(base, plan)[0].latency_s
    for bigger in larger:
        assert run_step(base, bigger)[0].latency_s >= latency_s * (1 - 1e-9)


# ------------------------------------------------------------------ conservation


def _decode(policy: str, *, prefill: bool = False, **options):
    workload = Workload(batch=1, context=32768, gen=2, include_prefill=prefill)
    result = simulate(H100, MODEL, policy, workload, policy_options=options,
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    policy_ = make_policy(policy, MODEL, load_profile(H100), workload, options)
    works = [layer_work(MODEL, 1, policy_.layer_plan(workload.context + s), "fp16", "fp16")
             for s in range(workload.gen)]
    return result, works


def test_each_tier_reports_the_bytes_read_from_it():
    # Interleaved pages: half of K and V on each tier, so the scan and the gather read half
    # their bytes from each; the upload re-reads the staging buffer in DRAM.
    result, works = _decode("hybridgen", adaptive=False, gpu_share=0.1, placement="interleave")
    layers = MODEL.num_layers
    line = load_profile(H100).sockets["cpu0"].cache_line_bytes
    scanned = layers * sum(w.cpu_k_bytes for w in works)
    gathered = layers * sum(touched_bytes(w.gather_rows, w.row_bytes, line) for w in works)
    uploaded = layers * sum(w.to_gpu_bytes for w in works)
    moved = result.bytes_by_resource
    assert moved["cxl0.read"] == pytest.approx(0.5 * (scanned + gathered), rel=1e-9)
    assert moved["ddr0.read"] == pytest.approx(0.5 * (scanned + gathered) + uploaded, rel=1e-9)
    assert moved["gpu0.h2d"] == pytest.approx(uploaded, rel=1e-9)


def test_the_traffic_of_a_decode_leaves_out_the_prefill():
    decode, works = _decode("hybridgen", adaptive=False, gpu_share=0.1)
    with_prefill, _ = _decode("hybridgen", prefill=True, adaptive=False, gpu_share=0.1)
    d2h = MODEL.num_layers * sum(w.q_d2h_bytes + w.evict_bytes for w in works)
    assert decode.bytes_by_resource["gpu0.d2h"] == pytest.approx(d2h, rel=1e-9)
    assert with_prefill.bytes_by_resource == pytest.approx(decode.bytes_by_resource, rel=1e-9)


def test_busy_fractions_energy_and_throughput_agree_with_the_steps():
    result, _ = _decode("hybridgen", adaptive=False, gpu_share=0.1)
    assert all(0.0 <= u <= 1.0 for u in result.utilisation.values())
    tokens = result.batch * result.gen
    assert result.energy_window_s == pytest.approx(result.decode_s, rel=1e-12)  # every step ran
    assert result.energy_j_per_token == pytest.approx(
        result.power_total_w * result.decode_s / tokens, rel=1e-12)
    assert result.energy_j_per_token == pytest.approx(sum(result.energy_j.values()) / tokens,
                                                      rel=1e-12)
    assert result.tokens_per_s == pytest.approx(result.batch / result.latencies_s.mean(),
                                                rel=1e-12)
    assert sum(result.binding_s.values()) == pytest.approx(result.latencies_s.mean(), rel=1e-9)


def test_what_binds_splits_the_mean_step_latency_when_steps_are_sampled():
    # 3 of 6 steps simulated, the rest interpolated: the split follows the interpolated steps
    workload = Workload(batch=16, context=32768, gen=6)
    result = simulate("a100-40gb-spr-cxl", MODEL, "hybridgen", workload,
                      policy_options={"adaptive": False},
                      fidelity=Fidelity(decode_samples=3, accuracy=False))
    assert sum(result.binding_s.values()) == pytest.approx(result.latencies_s.mean(), rel=1e-9)


# ------------------------------------------------------------------ the feedback scheduler
# What it guarantees by construction (hgsim/scheduler.py): r stays in [min_ratio, max_ratio],
# the GPU share only grows and never past what HBM holds, r grows only when the host hid
# behind the device over the interval and shrinks only when it did not. Nothing more: it
# trades accuracy for latency on measured times, with no promise of a faster run than the
# static plan it starts from.
_times = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None, database=None)
@given(observations=st.lists(st.tuples(_times, _times, _times), min_size=1, max_size=40),
       interval=st.integers(1, 4), scan_aware=st.booleans())
def test_the_scheduler_keeps_its_bounds_and_moves_r_the_way_the_times_say(
        observations, interval, scan_aware):
    config = SchedulerConfig(interval=interval, scan_aware=scan_aware)
    sched = FeedbackScheduler(config, gpu_share=0.1, max_gpu_share=0.3)
    host_sum = device_sum = 0.0
    for host_s, device_s, variable_s in observations:
        ratio, share = sched.ratio, sched.gpu_share
        host_sum, device_sum = host_sum + host_s, device_sum + device_s
        decided = sched.observe(host_s, device_s, variable_s * host_s)
        assert config.min_ratio <= sched.ratio <= config.max_ratio
        assert share <= sched.gpu_share <= 0.3
        if sched.ratio > ratio:
            assert decided and host_sum <= device_sum
        if sched.ratio < ratio:
            assert decided and host_sum > device_sum
        if decided:
            host_sum = device_sum = 0.0


def test_prefill_writes_host_kv_into_the_tiers_that_hold_it():
    """The prompt's host-resident KV lands where the plan places it: keys in socket 0's DRAM,
    values on the CXL expander behind socket 1 (semantic mapping), so the values cross UPI and
    the CXL link and are written at the expander's write bandwidth; tokens the GPU keeps are
    not copied. Time to first token is at least the values' bytes at that bandwidth."""
    profile = load_profile("h100-2socket-cxl")
    workload = Workload(batch=1, context=32768, gen=1, include_prefill=True)
    options = {"adaptive": False, "gpu_share": 0.1}
    plan = make_policy("hybridgen", MODEL, profile, workload, options).step_plan(workload.context)
    lp = plan.layer
    assert lp.placement.k_fractions == {"ddr0": 1.0} and lp.placement.v_fractions == {"cxl0": 1.0}
    machine = Machine(simpy.Environment(), profile, record=False)
    engine = DecodeEngine(machine, MODEL, "fp16", "fp16")
    ttft = engine.prefill(plan, workload.context)
    half = MODEL.num_layers * lp.host_tokens * MODEL.kv_bytes_per_token_layer("fp16") / 2
    moved = machine.recorder.bytes_by_resource()
    assert moved["gpu0.d2h"] == pytest.approx(2 * half, rel=1e-9)
    assert moved["ddr0.write"] == pytest.approx(half, rel=1e-9)
    for channel in ("upi0:cpu0->cpu1", "cxl0-link:cpu1->cxl0", "cxl0.write"):
        assert moved[channel] == pytest.approx(half, rel=1e-9), channel
    assert ttft >= half / (profile.tiers["cxl0"].write_bandwidth_gbps * 1e9)

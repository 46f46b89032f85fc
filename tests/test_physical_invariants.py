"""Physical invariants of a simulated decode step, with the partition plan held fixed.

A plan is made once on the base profile and then run on variants of it, so that only the
hardware changes (a policy would otherwise re-partition on the new hardware). What holds:

* the copy stream runs one upload at a time, in layer order (hw_backend's executor queues every
  layer's upload on one CUDA copy stream);
* a step is exactly as long on a machine whose every rate is s times higher and every latency
  and fixed cost s times shorter, divided by s (nothing in the model has a time scale of its own);
* better hardware never slows a step, and more work never speeds one up, where one resource
  binds the step; where several flows share a channel, max-min fair sharing is not monotone
  (a slower non-critical flow leaves more of a shared channel to the critical one), so the
  general case is no guarantee and is not asserted (docs/model.md, "What a better part buys");
* what the resources report moving is what the plan moves; busy fractions lie in [0, 1]; energy
  per token is average power times time per token; throughput is batch over step latency.
"""

from __future__ import annotations

import pytest
import simpy

from hgsim.catalog import get_model
from hgsim.costs import layer_work
from hgsim.memory import touched_bytes
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
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


def test_what_binds_splits_the_mean_step_latency_when_steps_are_sampled():
    # 3 of 6 steps simulated, the rest interpolated: the split follows the interpolated steps
    workload = Workload(batch=16, context=32768, gen=6)
    result = simulate("a100-40gb-spr-cxl", MODEL, "hybridgen", workload,
                      policy_options={"adaptive": False},
                      fidelity=Fidelity(decode_samples=3, accuracy=False))
    assert sum(result.binding_s.values()) == pytest.approx(result.latencies_s.mean(), rel=1e-9)

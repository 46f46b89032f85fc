"""A GPU's HBM channel reports the device-memory traffic of its kernels and DMA.

Accounting only (docs/model.md, "Data movement: the flow network"): a kernel's bytes keep ``gpu0.hbm`` busy
for its roofline memory term at the end of the kernel; a DMA into or out of the GPU adds its
bytes, busy for bytes / the channel's bandwidth. No duration changes.
"""

from __future__ import annotations

import pytest
import simpy
from conftest import make_profile

from hgsim.catalog import get_model
from hgsim.profiles import load_profile
from hgsim.sim import Machine
from hgsim.simulate import Fidelity, simulate
from hgsim.specs.model import DTYPE_BYTES
from hgsim.workload import Workload

GB = 1e9


def machine(profile=None) -> Machine:
    return Machine(simpy.Environment(), profile or make_profile())


def test_a_kernel_keeps_hbm_busy_for_its_memory_term_at_its_end():
    # tiny GPU: 100 TFLOP/s x 0.5, 1000 GB/s x 0.8, 2 us launch
    m = machine(make_profile(gpus={"gpu0": {"kernel_launch_overhead_us": 2}}))
    flops, bytes_ = 1e12, 4e9  # compute-bound: 20 ms of FLOPs, 5 ms of HBM
    m.gpu_kernel("gpu0", flops, bytes_, "gemm")
    m.env.run()
    rec = m.recorder
    end = 2e-6 + 0.02
    hbm = rec.totals["gpu0.hbm"]
    assert (hbm.starts, hbm.ends) == ([pytest.approx(end - 0.005, rel=1e-12)], [end])
    assert rec.bytes_moved("gpu0.hbm") == bytes_ == rec.bytes_moved("gpu0.compute")
    assert rec.busy_time("gpu0.compute") == pytest.approx(end, rel=1e-12)  # unchanged


def test_an_attention_kernel_is_busy_at_its_own_achieved_bandwidth():
    m = machine()
    m.gpu_kernel("gpu0", 0.0, 7e9, "attention", memory_eff=0.7)  # 7 GB at 700 GB/s
    m.env.run()
    assert m.recorder.busy_time("gpu0.hbm") == pytest.approx(0.01, rel=1e-12)
    assert m.recorder.busy_time("gpu0.hbm") == pytest.approx(m.env.now, rel=1e-12)


def test_dma_into_and_out_of_hbm_counts_its_bytes_without_slowing():
    m = machine()
    n = 2e9  # PCIe at 20 GB/s: 100 ms; HBM channel at 800 GB/s: 2.5 ms of it
    up = m.copy("ddr0", "gpu0", n, "up")
    down = m.write("gpu0", {"ddr1": 1.0}, n / 2, "down")
    m.env.run()
    assert up.value.end_s == pytest.approx(m.path("ddr0", "gpu0").time_s(n), rel=1e-12)
    assert m.hbm("gpu0") not in m.path("ddr0", "gpu0").channels
    rec = m.recorder
    assert rec.bytes_moved("gpu0.hbm") == pytest.approx(1.5 * n, rel=1e-12)
    assert rec.busy_time("gpu0.hbm") == pytest.approx(1.5 * n / 800e9, rel=1e-12)
    assert down.value.end_s <= m.env.now


def test_a_memory_bound_decode_step_shows_its_hbm_time_and_bytes_in_closed_form():
    """gpu_only, batch 1: every kernel is HBM-bound. Per step the kernels read every layer's
    weights, the LM head and the KV of the context (the model's costs count no activation
    bytes at decode); HBM is busy for weights / (bandwidth x memory_efficiency) + KV /
    (bandwidth x attention_efficiency), the rest of the step is launch cost."""
    profile = load_profile("h100-80gb-spr-cxl")
    model = get_model("llama-3.1-8b")
    context, gen = 32768, 4
    result = simulate(profile, model, "gpu_only", Workload(batch=1, context=context, gen=gen),
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    b = DTYPE_BYTES["fp16"]
    weights = (model.num_layers * model.layer_weight_bytes()
               + (model.vocab_size + 1) * model.hidden_size * b)
    kv = sum(model.kv_bytes_per_token() * (context + s) for s in range(gen))
    assert result.bytes_by_resource["gpu0.hbm"] == pytest.approx(gen * weights + kv, rel=1e-9)
    gpu = profile.gpus["gpu0"]
    bw = gpu.hbm_bandwidth_gbps * GB
    memory_s = gen * weights / (bw * gpu.memory_efficiency) + kv / (bw * gpu.attention_efficiency)
    decode_s = result.latencies_s.sum()
    assert result.utilisation["gpu0.hbm"] == pytest.approx(memory_s / decode_s, rel=0.01)
    assert 0.9 < result.utilisation["gpu0.hbm"] < result.utilisation["gpu0.compute"] == 1.0


def test_hbm_bytes_are_the_kernels_plus_the_copies_that_energy_charges():
    result = simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "hybridgen",
                      Workload(batch=2, context=65536, gen=2),
                      policy_options={"adaptive": False, "gpu_share": 0.1},
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    moved = result.bytes_by_resource
    dma = moved["gpu0.h2d"] + moved["gpu0.d2h"]
    assert dma > 0
    assert moved["gpu0.hbm"] == pytest.approx(moved["gpu0.compute"] + dma, rel=1e-12)
    assert 0 < result.utilisation["gpu0.hbm"] <= 1

"""The host kernel's rate by KV element type: calibrated as a factor of the profile's rate,
applied wherever the simulator runs KV of that type.

A profile calibrated with fp32 KV once predicted CPU offload over bf16 KV 69-74% too slow on
the development VM: bf16 halves the bytes per FLOP, and the C kernel ran it at 1.7x the FLOP
rate it reached on fp32 (docs/calibration.md, history).
"""

from __future__ import annotations

import pytest

from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload
from hw_backend.calibration import summarize as S
from hw_backend.calibration.records import Measurement, Measurements


def _kernel_rows(name: str, kv_dtype: str, gflops: float, fixed_s: float,
                 contexts=(16384, 32768, 65536)) -> list[Measurement]:
    """One-thread calls whose time is a fixed cost plus FLOPs at ``gflops``."""
    rows = []
    for context in contexts:
        flops = 4.0 * 32 * 128 * context
        seconds = fixed_s + flops / (gflops * 1e9)
        params = {"socket": 0, "threads": 1, "context": context, "kv_dtype": kv_dtype}
        rows.append(Measurement("cpu_kernel", name, flops / seconds / 1e9, "GFLOP/s", params,
                                (seconds,)))
    return rows


def test_calibration_gives_each_kv_type_its_rate_over_the_calibrated_one():
    """Synthetic calls at 40 GFLOP/s with fp32 KV from 16k up (50 at 4k: the rate falls with
    context), 68 with bf16 and 50 with fp16, every one paying the same 150 us: each factor is
    the ratio of the net rates at the contexts both types ran (to the fixed cost's estimate,
    0.3 us off here), not against fp32's rate over every context."""
    fixed = 150e-6
    ms = Measurements()
    ms.extend(_kernel_rows("partial_attention_flops", "fp32", 50.0, fixed, contexts=(4096,)))
    ms.extend(_kernel_rows("partial_attention_flops", "fp32", 40.0, fixed,
                           contexts=(16384, 65536)))
    ms.extend(_kernel_rows("partial_attention_by_dtype_flops", "bf16", 68.0, fixed,
                           contexts=(16384, 65536)))
    ms.extend(_kernel_rows("partial_attention_by_dtype_flops", "fp16", 50.0, fixed,
                           contexts=(16384, 65536)))
    small_flops = 4.0 * 32 * 128 * 32
    ms.append(Measurement("cpu_kernel", "call_overhead",
                          (fixed + small_flops / 40e9) * 1e6, "us",
                          {"socket": 0, "threads": 1, "context": 32, "kv_dtype": "fp32",
                           "flops": small_flops}))
    figs = S.cpu_kernel_figures(ms, 0)
    assert figs["op_overhead_us"].value == pytest.approx(150.0, abs=0.5)
    factors = figs["attention_rate_by_kv_dtype"]
    assert factors.value == pytest.approx({"bf16": 1.7, "fp16": 1.25, "fp32": 1.0}, rel=2e-3)
    assert "bf16 68." in factors.what and "at the same contexts, 40.0 GFLOP/s" in factors.what


def test_without_other_types_measured_there_is_no_figure():
    ms = Measurements()
    ms.extend(_kernel_rows("partial_attention_flops", "fp32", 40.0, 1e-4))
    assert "attention_rate_by_kv_dtype" not in S.cpu_kernel_figures(ms, 0)


def _lean_host():
    """The shipped H100 machine with 2 cores a socket: the host scan is compute-bound there."""
    base = load_profile("h100-80gb-spr-cxl")
    return profile_with_overrides(base, {f"sockets.{name}.cores": 2 for name in base.sockets})


def _with_factors(factors: dict[str, float]):
    base = _lean_host()
    return profile_with_overrides(
        base, {f"sockets.{name}.attention_rate_by_kv_dtype": factors for name in base.sockets})


def test_for_kv_dtype_scales_each_socket_once():
    profile = _with_factors({"bf16": 1.7, "fp32": 1.0})
    rates = {n: s.attention_gflops_per_core for n, s in profile.sockets.items()}
    bf16 = profile.for_kv_dtype("bf16")
    for name, sock in bf16.sockets.items():
        assert sock.attention_gflops_per_core == pytest.approx(1.7 * rates[name])
        assert sock.attention_rate_by_kv_dtype == {}
    assert bf16.for_kv_dtype("bf16") is bf16  # applied once: a second call changes nothing
    fp16 = profile.for_kv_dtype("fp16")  # not listed: factor 1
    assert {n: s.attention_gflops_per_core for n, s in fp16.sockets.items()} == rates
    plain = _lean_host()
    assert plain.for_kv_dtype("bf16") is plain


@pytest.mark.parametrize(("policy", "options"), [
    ("cpu_offload", {}), ("hybridgen_static", {"topk_ratio": 0.05, "gpu_share": 0.1})])
def test_simulate_runs_the_rate_of_the_workloads_kv_type(policy, options):
    """A factor for bf16 is the same machine as the rate multiplied in by hand, for a bf16
    workload, and no change at all for an fp32 one."""
    workload = Workload(batch=1, context=32768, gen=2, kv_dtype="bf16", weight_dtype="bf16")
    fidelity = Fidelity(decode_samples=0, accuracy=False)
    base = _lean_host()
    by_hand = profile_with_overrides(base, {
        f"sockets.{n}.attention_gflops_per_core": 3.0 * s.attention_gflops_per_core
        for n, s in base.sockets.items()})
    factored = _with_factors({"bf16": 3.0})
    want = simulate(by_hand, "llama-3.1-8b", policy, workload, fidelity=fidelity,
                    policy_options=options)
    got = simulate(factored, "llama-3.1-8b", policy, workload, fidelity=fidelity,
                    policy_options=options)
    assert [s.latency_s for s in got.steps] == pytest.approx([s.latency_s for s in want.steps],
                                                            rel=1e-12)
    slower = simulate(base, "llama-3.1-8b", policy, workload, fidelity=fidelity,
                    policy_options=options)
    assert sum(s.cpu_busy_s for s in got.steps) < sum(s.cpu_busy_s for s in slower.steps)
    fp32 = workload.model_copy(update={"kv_dtype": "fp32"})
    plain = simulate(base, "llama-3.1-8b", policy, fp32, fidelity=fidelity,
                     policy_options=options)
    same = simulate(factored, "llama-3.1-8b", policy, fp32, fidelity=fidelity,
                     policy_options=options)
    assert [s.latency_s for s in same.steps] == [s.latency_s for s in plain.steps]

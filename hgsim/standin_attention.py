"""The CPU stand-in's attention rate for a plan: measured alone, measured next to the host kernel.

Without CUDA, hw_backend's device role is torch on one of the host's own cores, and calibration
times its attention twice on its queue, as the executor meets it: alone
(``attention_efficiency_alone`` in the calibration JSON) and while the host kernel (HybridGen's
scan, CPU offload's partial attention, a row gather) runs on the other core (the profile's
``attention_efficiency``). On a shared machine the second is the slower, mostly because other
jobs' threads then share the stand-in's core (measured: docs/calibration.md, "Measurement
history"). Either way a plan's device attention
meets the loaded rate only while the host kernel runs: for a plan whose host work is short
beside its device attention (most tokens resident under an HBM budget), predicting all of it at
the loaded rate put it 2x too slow. The host's time is the simulated one, which is CPU time:
where other jobs stretch the real one, the device is loaded for longer than predicted.

A real GPU has its own cores and memory: none of this applies there, and callers pass no
idle rate.
"""

from __future__ import annotations

import statistics
from typing import Any

from hgsim.costs import LayerWork, layer_work
from hgsim.profiles import profile_with_overrides
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload


def host_kernel_reads(work: LayerWork) -> bool:
    """Whether the host kernel reads memory for this layer: a scan, a dense partial attention or
    a row gather. Host-resident tokens alone are not host work: FlexGen's host range is only
    copied, on the stand-in's own queue."""
    return work.cpu_k_bytes + work.cpu_v_bytes + work.gather_rows > 0


def attention_bytes(work: LayerWork) -> float:
    """A layer's bytes through the device's attention-rate kernels (``sim.decode`` runs
    attention, merge and InfiniGen's speculation at ``attention_efficiency``)."""
    return work.attn.bytes_ + work.merge.bytes_ + work.speculate.bytes_


def overlapped_efficiency(attention_bytes_per_step: float, host_busy_s: float, *,
                          hbm_gbps: float, loaded: float, alone: float) -> float:
    """Efficiency that takes a step's device attention as long as it takes on the stand-in.

    The device's attention and the host kernel both start at each layer's query, so the first
    ``host_busy_s`` of the device's attention run at the loaded rate and the rest alone:
    time = W / r_loaded if the host outlasts it, else H + (W - H r_loaded) / r_alone.
    """
    if attention_bytes_per_step <= 0:
        return loaded
    rate_loaded, rate_alone = hbm_gbps * 1e9 * loaded, hbm_gbps * 1e9 * alone
    all_loaded_s = attention_bytes_per_step / rate_loaded
    if all_loaded_s <= host_busy_s:
        return loaded
    time_s = host_busy_s + (attention_bytes_per_step - host_busy_s * rate_loaded) / rate_alone
    return attention_bytes_per_step / time_s / (hbm_gbps * 1e9)


def standin_profile(machine: HardwareProfile, model: ModelSpec, policy: str,
                    workload: Workload, options: dict[str, Any],
                    alone: float | None) -> HardwareProfile:
    """``machine`` with the stand-in's attention efficiency for this run (``alone``: the rate
    measured with the host kernel idle; None, as on a GPU, changes nothing)."""
    if alone is None:
        return machine
    from hgsim.policies import make_policy
    from hgsim.simulate import Fidelity, simulate

    gpu = machine.gpus[machine.primary_gpu]
    key = f"gpus.{machine.primary_gpu}.attention_efficiency"
    plan = make_policy(policy, model, machine, workload, options).step_plan(workload.context)
    works = [layer_work(model, workload.batch, plan.layer_plan(i), workload.kv_dtype,
                        workload.weight_dtype, attention_only=workload.attention_only)
             for i in range(plan.num_layers)]
    if not any(host_kernel_reads(w) for w in works):
        return profile_with_overrides(machine, {key: alone})
    # the host kernel's time per step, which does not depend on the device's rate
    result = simulate(machine, model, policy, workload, policy_options=options,
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    if not result.feasible:
        return machine
    host_busy_s = statistics.fmean(s.cpu_busy_s for s in result.steps)
    efficiency = overlapped_efficiency(sum(attention_bytes(w) for w in works), host_busy_s,
                                       hbm_gbps=gpu.hbm_bandwidth_gbps,
                                       loaded=gpu.attention_efficiency, alone=alone)
    return profile_with_overrides(machine, {key: efficiency})


__all__ = ["attention_bytes", "host_kernel_reads", "overlapped_efficiency", "standin_profile"]

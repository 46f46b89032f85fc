"""The CPU stand-in's attention rate: loaded while the host kernel runs, idle otherwise."""

from __future__ import annotations

import math

import pytest

from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.standin_attention import overlapped_efficiency, standin_profile
from hgsim.validation import ValidationStudy, cases, predict, workload

GB = 1e9


def test_overlapped_efficiency_closed_form():
    """10 GB/s 'HBM', 1 GB/s next to the host kernel, 4 GB/s alone: 2 GB of attention beside
    1 s of host work take 1 s loaded (1 GB) + 0.25 s alone (the other 1 GB)."""
    rates = {"hbm_gbps": 10.0, "loaded": 0.1, "alone": 0.4}
    assert overlapped_efficiency(2 * GB, 1.0, **rates) == pytest.approx(2 / 1.25 / 10)
    assert overlapped_efficiency(2 * GB, 0.0, **rates) == pytest.approx(0.4)  # never loaded
    assert overlapped_efficiency(2 * GB, 2.0, **rates) == pytest.approx(0.1)  # host outlasts it
    assert overlapped_efficiency(0.0, 1.0, **rates) == 0.1


def _study(options: dict, policy: str = "hybridgen_static") -> ValidationStudy:
    return ValidationStudy.model_validate({
        "name": "s", "model": "llama-3.1-8b", "kv_dtype": "fp32", "weight_dtype": "fp32",
        "warmup_steps": 0, "steps": 2,
        "configs": [{"name": "c", "policy": policy, "options": options, "contexts": [16384]}]})


def _latency(steps) -> float:
    return sum(s.latency_s for s in steps) / len(steps)


def _standin(attention_efficiency: float):
    """The development VM with a stand-in-like device: 20 GB/s, the given attention share."""
    return profile_with_overrides(load_profile("dev-zen4-2core"), {
        "gpus.gpu0.hbm_bandwidth_gbps": 20.0,
        "gpus.gpu0.attention_efficiency": attention_efficiency})


def test_short_host_work_leaves_most_device_attention_at_the_idle_rate():
    """Most tokens resident (HybridGen under a tight budget): the host scan is short, so the
    device's attention is predicted between all-idle and all-loaded, not at the loaded rate."""
    study = _study({"topk_ratio": 0.05, "gpu_share": 0.9})
    case = cases(study, device_threads=1, host_threads=1)[0]
    at_loaded = _latency(predict(_standin(0.1), study, case))
    overlapped = _latency(predict(_standin(0.1), study, case, attention_alone=0.4))
    at_idle = _latency(predict(_standin(0.4), study, case))
    assert at_idle < overlapped < at_loaded


def test_host_outlasting_the_device_keeps_the_loaded_rate():
    """CPU offload's host work outlasts the device's (a merge): the rate stays the loaded one."""
    profile = _standin(0.1)
    study = _study({}, policy="cpu_offload")
    case = cases(study, device_threads=1, host_threads=1)[0]
    machine = standin_profile(profile, study.model_spec(), case.policy, workload(study, case),
                              case.options, alone=1.0)
    assert math.isclose(machine.gpus["gpu0"].attention_efficiency,
                        profile.gpus["gpu0"].attention_efficiency)

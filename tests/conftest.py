"""Shared fixtures: a small two-socket machine with round numbers, built in Python.

``make_profile(**overrides)`` deep-merges ``overrides`` into the base profile (a ``None``
value deletes that key), so a test states only what it changes, e.g.
``make_profile(gpus={"gpu0": {"copy_engines": 1}})``.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from hgsim.specs.hardware import HardwareProfile

# The fuzz tests draw the same examples on every run, so a clean clone passes or fails on the
# code alone (a random draw once failed CI on a defect no change had touched).
# HGSIM_FUZZ=explore draws fresh examples each run, to hunt defects the fixed draw misses.
settings.register_profile("suite", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("HGSIM_FUZZ") == "explore" else "suite")

BASE_PROFILE: dict[str, Any] = {
    "name": "tiny",
    "description": "test machine: 1 GPU, 2 sockets, DDR per socket, one CXL expander on s0",
    "gpus": {
        "gpu0": {
            "model": "test-gpu",
            "hbm_capacity_gb": 80,
            "hbm_bandwidth_gbps": 1000,
            "peak_tflops": {"fp16": 100},
            "kernel_launch_overhead_us": 0,
            "compute_efficiency": 0.5,
            "memory_efficiency": 0.8,
            "attention_efficiency": 0.7,
            "copy_engines": 2,
            "dma_inflight_bytes": 1 << 20,
            "socket": "s0",
            "link": "pcie0",
        }
    },
    "sockets": {
        name: {
            "model": "test-cpu",
            "cores": 8,
            "frequency_ghz": 2.0,
            "simd": "avx512",
            "attention_gflops_per_core": 50,
            "stream_inflight_bytes": 500,  # 5 GB/s per core from ddr at 100 ns
            "gather_inflight_bytes": 250,
        }
        for name in ("s0", "s1")
    },
    "tiers": {
        "ddr0": {"kind": "ddr", "capacity_gb": 256, "read_bandwidth_gbps": 100,
                 "write_bandwidth_gbps": 80, "latency_ns": 100, "queue_delay_at_half_load_ns": 0,
                 "socket": "s0"},
        "ddr1": {"kind": "ddr", "capacity_gb": 256, "read_bandwidth_gbps": 100,
                 "write_bandwidth_gbps": 80, "latency_ns": 100, "queue_delay_at_half_load_ns": 0,
                 "socket": "s1"},
        "cxl0": {"kind": "cxl", "capacity_gb": 512, "read_bandwidth_gbps": 30,
                 "write_bandwidth_gbps": 25, "latency_ns": 300, "queue_delay_at_half_load_ns": 0,
                 "socket": "s0",
                 "link": "cxl0link"},
    },
    "links": {
        "pcie0": {"kind": "pcie", "endpoints": ["s0", "gpu0"], "bandwidth_gbps": 20,
                  "latency_ns": 1000},
        "upi0": {"kind": "upi", "endpoints": ["s0", "s1"], "bandwidth_gbps": 40,
                 "latency_ns": 100},
        "cxl0link": {"kind": "cxl", "endpoints": ["s0", "cxl0"], "bandwidth_gbps": 10,
                     "latency_ns": 200},
    },
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def make_profile(**overrides: Any) -> HardwareProfile:
    """The tiny profile with ``overrides`` deep-merged in (``None`` deletes a key)."""
    return HardwareProfile.model_validate(_merge(copy.deepcopy(BASE_PROFILE), overrides))


@pytest.fixture
def tiny_profile() -> HardwareProfile:
    return make_profile()


@pytest.fixture
def isolated_profiles(monkeypatch):
    """No user profile directories and an empty profile cache, before and after the test."""
    from hgsim import profiles

    monkeypatch.delenv("HGSIM_PROFILE_PATH", raising=False)
    profiles.clear_cache()
    yield
    profiles.clear_cache()


@pytest.fixture
def isolated_models(monkeypatch):
    """No user model directories and an empty model-file cache, before and after the test."""
    from hgsim import model_files

    monkeypatch.delenv(model_files.MODEL_PATH_ENV, raising=False)
    model_files.clear_cache()
    yield
    model_files.clear_cache()


# ---- the CPU-attention kernel tests run on every backend and instruction set ------------------
# (hw_backend.cpu_attention needs only NumPy; the compiled extension is optional)
import hw_backend.cpu_attention as _cpu_attention  # noqa: E402

_KERNEL_BACKENDS = ["c", "numpy"] if _cpu_attention.BACKEND == "c" else ["numpy"]


@pytest.fixture(params=_KERNEL_BACKENDS)
def be(request):
    """Each CPU-attention backend in turn: the C extension (when built) and the NumPy one."""
    return _cpu_attention.backend(request.param)


@pytest.fixture(params=_cpu_attention.available_simd_levels())
def simd(request):
    """Forces one instruction set for the test, restoring the previous one after."""
    previous = _cpu_attention.set_simd_level(request.param)
    yield request.param
    _cpu_attention.set_simd_level(previous)


def shipped_profiles() -> list[str]:
    """The profiles the repository ships: the YAML files of ``hardware_profiles/`` that git
    tracks (all of them outside a git checkout). Not whatever lies there: the README's
    ``hgsim calibrate --out hardware_profiles/local.yaml`` leaves a profile without energy or
    cost figures, which the checks of shipped profiles would fail on."""
    from hgsim.profiles import PROFILE_DIR

    found = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    try:
        tracked = subprocess.run(["git", "ls-files", "--", "*.yaml"], cwd=PROFILE_DIR,
                                 capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return found
    names = {Path(line).stem for line in tracked.stdout.splitlines()}
    return [n for n in found if n in names] if names else found

"""One line naming what a measurement ran on: the device, its driver, torch and CUDA, the CPU.

A GPU figure without its card, driver and torch version cannot be compared with another one
(a driver or torch release moves launch costs and kernel choices), so ``hgsim run`` and
``hgsim validate`` print this line beside their measured columns.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_driver_version() -> str | None:
    """The NVIDIA driver's version through NVML, or None (no NVML, no NVIDIA GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - any NVML failure means "not known"
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def describe(cuda: bool) -> str:
    """``device ...; driver ...; torch ... (CUDA ...); CPU ..., N CPUs``."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    host = f"CPU {cpu_model()}, {cpus} CPUs"
    if not cuda:
        return f"device cpu-standin (no CUDA); torch {torch.__version__}; {host}"
    name = torch.cuda.get_device_name(0)
    driver = gpu_driver_version() or "unknown"
    return (f"device {name}; driver {driver}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}); {host}")


__all__ = ["cpu_model", "describe", "gpu_driver_version"]

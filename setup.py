"""Build hook for the C extensions: the CPU attention kernels and the memory microbenchmarks.

Both extensions are marked optional: where a compiler or OpenMP is missing the install still
succeeds and ``hw_backend.cpu_attention`` falls back to a NumPy reference, announcing it
loudly at import (never silently slow).
"""

import os
import sys

from setuptools import Extension, setup


def _openmp_flags() -> tuple[list[str], list[str]]:
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    if sys.platform == "win32":
        return ["/openmp"], []
    return ["-fopenmp"], ["-fopenmp"]


_omp_compile, _omp_link = _openmp_flags()
_extra_compile = ["-O3", "-std=c11", "-fno-math-errno", "-Wall"] if sys.platform != "win32" else ["/O2"]
if os.environ.get("HGSIM_NO_OPENMP"):
    _omp_compile, _omp_link = [], []

cpu_attention = Extension(
    "hw_backend._cpu_attention",
    sources=["hw_backend/csrc/cpu_attention.c"],
    depends=["hw_backend/csrc/cpu_attention.h"] if os.path.exists("hw_backend/csrc/cpu_attention.h") else [],
    extra_compile_args=_extra_compile + _omp_compile,
    extra_link_args=_omp_link,
    optional=True,
)

# Pointer chases with N chains, random row gathers and loaded latency for `hgsim calibrate`
# (hw_backend.memprobe); a separate module so the kernels' source stays the kernels'.
membench = Extension(
    "hw_backend._membench",
    sources=["hw_backend/csrc/membench.c"],
    extra_compile_args=_extra_compile + _omp_compile,
    extra_link_args=_omp_link,
    optional=True,
)

setup(ext_modules=[ext for ext in (cpu_attention, membench) if os.path.exists(ext.sources[0])])

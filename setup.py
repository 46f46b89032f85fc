"""Build hook for the CPU attention C extension.

The extension is marked optional: where a compiler or OpenMP is missing the install still
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

setup(ext_modules=[cpu_attention] if os.path.exists("hw_backend/csrc/cpu_attention.c") else [])

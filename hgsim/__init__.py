"""hgsim: a discrete-event model of CPU-GPU collaborative long-context LLM decoding over
tiered memory (GPU HBM, CPU DRAM, CXL expanders), for HybridGen and its baselines.

From Python use ``hgsim.api`` (``from hgsim import api``); it is imported on first use so that
``import hgsim`` (and every CLI start) stays cheap.
"""

__version__ = "0.3.9"


def __getattr__(name: str):
    if name == "api":
        import importlib

        return importlib.import_module("hgsim.api")
    raise AttributeError(f"module 'hgsim' has no attribute {name!r}")

"""hgsim: a discrete-event model of CPU-GPU collaborative long-context LLM decoding over
tiered memory (GPU HBM, CPU DRAM, CXL expanders), for HybridGen and its baselines."""

__version__ = "0.2.0"

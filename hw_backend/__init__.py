"""Real-hardware backend for HybridGen-style CPU-GPU decode.

CPU attention kernels, NUMA placement of KV buffers and memory probes.
"""

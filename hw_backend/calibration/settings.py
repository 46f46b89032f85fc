"""How big and how often every benchmark runs: full calibration versus ``--quick`` (CI).

The full run sizes buffers far beyond the last-level cache and repeats enough to be stable on a
shared machine (minutes); quick mode keeps every code path but with small buffers and two
repeats (seconds), so CI exercises calibration end to end without pretending to measure well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hw_backend.calibration.records import Measurement

MiB = 1 << 20

#: Llama-like decode attention the kernels are timed on: 32 query heads sharing 8 KV heads of
#: 128 dims (Llama 3 8B / 70B layout), one sequence.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    repeats: int = 7
    read_bytes: int = 512 * MiB  # streaming read/write buffer per measurement
    #: Pointer-chase working set (latency, memory-level parallelism, loaded latency), as large
    #: as the gather buffer: a random access's latency grows with the footprint it is drawn
    #: from (address translation: on the 2-vCPU VM, with huge pages, 149 ns over 64 MiB, 182 over
    #: 256 MiB, 214 over 1 GiB, 279 over 4 GiB), so the figures are taken at one footprint
    #: of the order of a KV cache, and the smaller ones kept as raw data (``latency_footprints``).
    chase_bytes: int = 1024 * MiB
    latency_footprints: tuple[int, ...] = (64 * MiB, 256 * MiB)
    chase_steps: int = 2_000_000
    #: tokens of KV per kernel call: the host ops' rates are their medians over these sizes
    contexts: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
    #: tokens per KV head of the call that measures a call's fixed cost directly (one block of
    #: the kernel): extrapolating time over size to zero scattered it between runs, since the
    #: big calls' noise swamps it (docs/calibration.md, history)
    overhead_context: int = 32
    topk_ratios: tuple[float, ...] = (0.01, 0.05)  # HybridGen's range (min and default ratio)
    copy_sizes: tuple[int, ...] = tuple(1 << s for s in range(12, 27, 2))  # 4 KiB .. 64 MiB
    #: Largest copy in the stand-in's PCIe fit: glibc serves bigger allocations with fresh mmaps
    #: whose page faults, not the copy, set the rate (reported separately in the comment).
    copy_fit_max: int = 16 * MiB
    gemm_sizes: tuple[int, ...] = (1024, 2048)
    cuda_attention_tokens: tuple[int, ...] = (16384, 65536, 262144)
    kv_dtype: str = "fp32"
    #: Smallest KV footprint a C-kernel measurement cycles through. The executor streams a
    #: different layer's KV on every call, so each call starts with a cold last-level cache;
    #: timing one small buffer again and again would measure the cache instead (small contexts
    #: fit a large L3; docs/calibration.md, history).
    kernel_footprint_bytes: int = 256 * MiB
    #: Memory-level parallelism (``calibration.mlp``): interleaved chases per core, each
    #: measurement ``chase_loads`` loads in all; random row gathers of these row sizes from a
    #: ``gather_buffer_bytes`` buffer, ``gather_call_bytes`` of rows per call.
    mlp_chains: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64)
    chase_loads: int = 400_000
    gather_row_bytes: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
    gather_buffer_bytes: int = 1024 * MiB
    gather_call_bytes: int = 64 * MiB
    #: Loaded latency (``calibration.loaded``): background stream rates as fractions of what
    #: the background threads reach unthrottled (1.0: unthrottled), each a chase of
    #: ``loaded_steps`` dependent loads.
    loaded_fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    loaded_steps: int = 200_000
    #: Length of each power interval (``calibration.power``: idle, then loaded), seconds.
    power_seconds: float = 2.0

    @staticmethod
    def make(quick: bool, kv_dtype: str = "fp32") -> Settings:
        if not quick:
            return Settings(kv_dtype=kv_dtype)
        return Settings(
            quick=True, repeats=2, read_bytes=32 * MiB, chase_bytes=16 * MiB,
            latency_footprints=(4 * MiB,),
            chase_steps=100_000, contexts=(1024, 4096), topk_ratios=(0.05,),
            copy_sizes=tuple(1 << s for s in (12, 16, 20, 22)), gemm_sizes=(256,),
            cuda_attention_tokens=(4096, 16384), kv_dtype=kv_dtype,
            kernel_footprint_bytes=16 * MiB, mlp_chains=(1, 4, 16, 32), chase_loads=40_000,
            gather_row_bytes=(64, 512, 4096), gather_buffer_bytes=32 * MiB,
            gather_call_bytes=2 * MiB, loaded_fractions=(0.5, 1.0), loaded_steps=20_000,
            power_seconds=0.5,
        )

    def thread_counts(self, cores: int) -> tuple[int, ...]:
        """1, 2, 4, ... up to ``cores`` (always including ``cores``); quick: 1 and ``cores``."""
        if self.quick:
            return tuple(sorted({1, cores}))
        counts = {cores}
        n = 1
        while n < cores:
            counts.add(n)
            n *= 2
        return tuple(sorted(counts))


@dataclass(frozen=True)
class Job:
    """One benchmark to run: a label for the progress bar and what produces its rows.

    ``optional``: a failure leaves this benchmark's figures out (with a warning, and its error
    in the raw data) instead of ending the calibration. The CUDA benchmarks whose figures a
    profile can do without are: on a borrowed GPU one program that will not capture must not
    cost every other figure."""

    label: str
    run: Callable[[], list[Measurement]]
    optional: bool = False

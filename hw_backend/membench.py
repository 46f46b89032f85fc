"""Memory probes: streaming read bandwidth and dependent-load latency.

Decode attention on the CPU is bound by how fast KV bytes stream from memory, so the number
to compare a kernel against (and to calibrate the simulator's CPU-memory model with) is this
machine's multi-threaded read bandwidth, measured the same way the kernels read: every
thread streams its own contiguous slice of a buffer far larger than the last-level cache.
Latency comes from pointer chasing through a random cycle of cache lines, where each load
depends on the previous one.

Both use the compiled extension (OpenMP, GIL released) when built; the NumPy fallbacks are
rough and say so in their docstrings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hw_backend.calibration.timing import timed

try:
    from hw_backend import _cpu_attention as _ext
except ImportError:  # the warning is issued by hw_backend.cpu_attention
    _ext = None

MiB = 1 << 20
DEFAULT_READ_BYTES = 1024 * MiB
DEFAULT_CHASE_BYTES = 256 * MiB
_LINE = 64

__all__ = ["latency_ns", "median_seconds", "read_bandwidth_gbps", "read_pass"]


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(timed(fn, repeats, warmup))


def _numpy_stream_read(words: np.ndarray, threads: int) -> None:
    """Fallback: NumPy sums release the GIL, so a thread pool reads slices in parallel."""
    parts = np.array_split(words, threads)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))


def read_pass(
    nbytes: int = DEFAULT_READ_BYTES,
    threads: int | None = None,
    buffers: Sequence[np.ndarray] | None = None,
) -> Callable[[], float]:
    """A callable that streams once over its buffers and returns that pass's GB/s.

    For interleaving with another measurement (read, kernel, read, kernel, ...) so both
    see the same machine state. ``buffers`` (C-contiguous arrays) reads existing memory,
    e.g. a KV cache, instead of a fresh ``nbytes`` buffer: on a virtual machine two
    allocations can land on host memory of quite different speed, so the fair ceiling for
    a kernel is the read bandwidth of the very bytes it scans. ``threads`` defaults to the
    OpenMP thread count the attention kernels use.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    if buffers is None:
        if nbytes < _LINE:
            raise ValueError(f"nbytes: must be >= {_LINE}, got {nbytes}")
        buffers = [np.ones(nbytes // 8, np.uint64)]  # written, so every page is resident
    words = [_as_words(b) for b in buffers]
    total = sum(w.nbytes for w in words)

    def one_pass() -> float:
        t0 = time.perf_counter()
        for w in words:
            if _ext is not None:
                _ext.stream_read(w, threads or 0)
            else:
                _numpy_stream_read(w, threads or 1)
        return total / (time.perf_counter() - t0) / 1e9

    one_pass()  # warm-up
    return one_pass


def _as_words(buf: np.ndarray) -> np.ndarray:
    """uint64 view of a C-contiguous array (its whole 8-byte words; no copy)."""
    if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous:
        raise ValueError("buffers: expected C-contiguous numpy arrays")
    raw = buf.reshape(-1).view(np.uint8)
    return raw[: raw.size // 8 * 8].view(np.uint64)


def read_bandwidth_gbps(
    nbytes: int = DEFAULT_READ_BYTES, threads: int | None = None, repeats: int = 5
) -> float:
    """Streaming read bandwidth in GB/s (1e9 bytes per second), median of ``repeats``.

    ``nbytes`` should be many times the last-level cache (default 1 GiB). ``threads``
    defaults to the OpenMP thread count the attention kernels use, so the result is the
    ceiling those kernels can reach.
    """
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    probe = read_pass(nbytes, threads)
    return statistics.median(probe() for _ in range(repeats))


def _random_cycle(nbytes: int, seed: int) -> np.ndarray:
    """int64 links visiting every cache line of the buffer once, in random order."""
    lines = max(nbytes // _LINE, 2)
    per_line = _LINE // 8
    order = np.random.default_rng(seed).permutation(lines) * per_line
    nxt = np.zeros(lines * per_line, np.int64)
    nxt[order] = np.roll(order, -1)
    return nxt


def latency_ns(nbytes: int = DEFAULT_CHASE_BYTES, steps: int = 2_000_000, seed: int = 0) -> float:
    """Mean latency of one dependent load in ns over a random cycle of cache lines.

    With ``nbytes`` far above the last-level cache this is DRAM latency including TLB
    misses on 4 KiB pages (what a gather of scattered KV rows pays). The NumPy fallback
    subtracts the interpreter's per-step cost measured on a cache-resident cycle, so it is
    only a rough estimate.
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    nxt = _random_cycle(nbytes, seed)
    if _ext is not None:
        seconds = median_seconds(lambda: _ext.pointer_chase(nxt, steps, 0), 3)
        return seconds / steps * 1e9
    steps = min(steps, 200_000)
    small = _random_cycle(16 * 1024, seed)
    overhead = median_seconds(lambda: _python_chase(small, steps), 3)
    return max(median_seconds(lambda: _python_chase(nxt, steps), 3) - overhead, 0.0) / steps * 1e9


def _python_chase(nxt: np.ndarray, steps: int) -> int:
    at = 0
    for _ in range(steps):
        at = nxt.item(at)
    return at


if __name__ == "__main__":
    print(f"read bandwidth: {read_bandwidth_gbps():.1f} GB/s")
    print(f"latency:        {latency_ns():.0f} ns")

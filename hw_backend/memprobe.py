"""Memory-level parallelism probes: N-chain pointer chases, random row gathers, loaded chases.

Checked Python face of the compiled ``hw_backend._membench`` (``csrc/membench.c``), which
``hgsim calibrate`` and ``hgsim validate`` use to measure what ``hgsim.memory`` models: how many
lines one core keeps in flight on random accesses, what a random row gather achieves, and how a
tier's latency rises with the load on it. The buffers are placed on a NUMA node with
``numa.alloc_on_node`` (huge pages asked for); ``huge_page_fraction`` says how many the kernel
actually gave, since with 4 KiB pages every random access also misses the TLB.

Every timing is the CPU time of the threads doing the work, with the wall time beside it. On a
machine shared with other jobs (the 2-vCPU development VM runs four other engineers' tests) a
thread can wait for a core longer than it runs: a one-chain chase read 400-450 ns per load by
wall clock and 161-176 ns in CPU time, back to back, the latter as on a quiet machine. How long
a thread runs is what the memory system decides; how long it waits is the scheduler's.

There is no NumPy fallback: these timings are meaningless from Python, so a missing extension
is an ImportError naming the fix.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from hw_backend.calibration.timing import TOGETHER, Timing, cpu_timing

LINE_BYTES = 64
_WORDS_PER_LINE = LINE_BYTES // 8


def _ext():
    try:
        from hw_backend import _membench
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise ImportError(f"hw_backend._membench is not built ({exc}); reinstall with a C "
                          "compiler (pip install -e .)") from None
    return _membench


def _on_node(n: int, dtype, node: int) -> np.ndarray:
    from hw_backend.numa import alloc_on_node

    with warnings.catch_warnings():  # one-node machines: placement is implicit, and known
        warnings.simplefilter("ignore", RuntimeWarning)
        return alloc_on_node(n, dtype, node)


@dataclass
class Cycle:
    """A random cycle through every cache line of a buffer: ``next[p]`` is the word index of
    the line after word ``p``; ``order`` lists the lines' word indices in visiting order, so
    chains started ``len(order) / N`` positions apart never meet.

    ``cursor`` is where the next chase starts: each chase goes on from where the last one
    stopped, so repeated short chases walk the whole cycle before any line comes round again
    (restarting at one place would re-read the lines the previous chase left in the cache).
    """

    next: np.ndarray
    order: np.ndarray
    cursor: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.next.nbytes)

    def starts(self, chains: int) -> np.ndarray:
        """Where ``chains`` chains begin: evenly around the cycle from the cursor."""
        lines = len(self.order)
        if not 1 <= chains <= min(256, lines):
            raise ValueError(f"chains: expected 1..{min(256, lines)}, got {chains}")
        spacing = lines // chains
        return np.ascontiguousarray(self.order[(self.cursor + np.arange(chains) * spacing)
                                               % lines])

    def advance(self, steps: int) -> None:
        self.cursor = (self.cursor + steps) % len(self.order)


def random_cycle(nbytes: int, node: int = 0, seed: int = 0) -> Cycle:
    """A cycle over ``nbytes`` of lines on NUMA node ``node`` (one link per line)."""
    lines = max(nbytes // LINE_BYTES, 2)
    return cycle_in(_on_node(lines * _WORDS_PER_LINE, np.int64, node), seed)


def cycle_in(buf: np.ndarray, seed: int = 0) -> Cycle:
    """A cycle through the lines of an existing buffer (its first word of each line becomes a
    link): the latency of exactly the memory a gather reads, without a second allocation."""
    words = buf.reshape(-1).view(np.uint8)
    words = words[: words.size // LINE_BYTES * LINE_BYTES].view(np.int64)
    lines = words.size // _WORDS_PER_LINE
    if lines < 2:
        raise ValueError("cycle_in: the buffer holds fewer than two lines")
    order = np.random.default_rng(seed).permutation(lines).astype(np.int64) * _WORDS_PER_LINE
    words[order] = np.roll(order, -1)
    return Cycle(words, order)


def chase_seconds(cycle: Cycle, chains: int, steps: int) -> float:
    """CPU time of ``steps`` steps of ``chains`` interleaved dependent chases (each chain
    ``steps`` loads), started evenly around the cycle from its cursor (on this thread)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    starts = cycle.starts(chains)
    ext = _ext()
    t0 = time.thread_time()
    ext.chase(cycle.next, starts, steps)
    seconds = time.thread_time() - t0
    cycle.advance(steps)
    return seconds


def row_buffer(nbytes: int, node: int = 0) -> np.ndarray:
    """Bytes to gather rows from, on ``node``, every page written (resident, not zero-page)."""
    buf = _on_node(nbytes, np.uint8, node)
    buf[::LINE_BYTES] = 1
    return buf


def random_rows(buffer_bytes: int, row_bytes: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` row indices drawn uniformly from the rows of a buffer (rows aligned to their
    size, so a row of 64 B multiples touches exactly its own lines)."""
    rows = buffer_bytes // row_bytes
    if rows < 1 or count < 1:
        raise ValueError(f"no rows of {row_bytes} B in {buffer_bytes} B, or count {count} < 1")
    return np.random.default_rng(seed).integers(0, rows, count, dtype=np.int64)


def parallel_call(fn, threads: int) -> Timing:
    """Times ``fn``, a call that runs ``threads`` threads of this process, in CPU time per
    thread (``calibration.timing.cpu_timing``)."""
    return cpu_timing(fn, threads)


def gather(buf: np.ndarray, idx: np.ndarray, row_bytes: int, threads: int) -> Timing:
    """Reads every cache line of rows ``idx`` of ``buf`` with ``threads`` threads, each a
    contiguous share of ``idx``."""
    if row_bytes < 8 or row_bytes % 8:
        raise ValueError(f"row_bytes: expected a multiple of 8, got {row_bytes}")
    if threads < 1:
        raise ValueError(f"threads: expected >= 1, got {threads}")
    if idx.dtype != np.int64 or not idx.flags.c_contiguous:
        raise ValueError("idx: expected a contiguous int64 array")
    cpu_s, wall_s, share, _ = _ext().gather(buf, idx, row_bytes, threads)
    return Timing(cpu_s, wall_s, share)


@dataclass(frozen=True)
class LoadedChase:
    """One dependent chase under a background stream: ns per load (CPU time), the stream's
    rate over the chase (bytes / wall time), and the least share of a core that the chase and
    the readers had: below ``TOGETHER`` they took turns on a core rather than running together."""

    ns_per_load: float
    background_gbps: float
    share: float


def loaded_chase(cycle: Cycle, steps: int, background: np.ndarray, threads: int,
                 target_gbps: float, settle_s: float = 0.002) -> LoadedChase:
    """Chase ``steps`` links on this thread's core while ``threads`` other threads stream
    ``background`` at ``target_gbps`` together (0 or less: as fast as they can; ``threads`` 0:
    no load). The rate returned is what they achieved during the chase."""
    if threads < 0:
        raise ValueError(f"threads: expected >= 0, got {threads}")
    ext = _ext()
    start = int(cycle.starts(1)[0])
    cpu_s, wall_s, bg_s, bg_share, bg_bytes, _ = ext.loaded_chase(
        cycle.next, steps, start, background, threads, float(target_gbps) * 1e9, settle_s)
    cycle.advance(steps)
    rate = bg_bytes / bg_s / 1e9 if bg_s > 0 else 0.0
    share = min(cpu_s / wall_s if wall_s > 0 else 1.0, bg_share if threads else 1.0)
    return LoadedChase(cpu_s / steps * 1e9, rate, share)


def huge_page_fraction(array: np.ndarray) -> float | None:
    """Share of the mapping holding ``array`` that sits on transparent huge pages (from
    /proc/self/smaps), or None where that cannot be read."""
    addr = array.ctypes.data
    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    inside, rss = False, None
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            try:
                inside = int(lo, 16) <= addr < int(hi, 16)
            except ValueError:
                inside = False
            rss = None
        elif inside and head == "Rss:":
            rss = int(line.split()[1])
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) / rss if rss else None
    return None


__all__ = [
    "LINE_BYTES",
    "Cycle",
    "LoadedChase",
    "TOGETHER",
    "Timing",
    "chase_seconds",
    "cycle_in",
    "gather",
    "huge_page_fraction",
    "loaded_chase",
    "parallel_call",
    "random_cycle",
    "random_rows",
    "row_buffer",
]

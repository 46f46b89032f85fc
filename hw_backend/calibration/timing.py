"""Timing helpers shared by the benchmarks: repeated runs and straight-line fits.

A figure is one number per benchmark from several repeats, by default their *median*. The
fastest repeat (STREAM's convention, ``--statistic min``) is the reproducible best the hardware
can do on a quiet machine; but on a shared or virtual machine whose speed swings from call to
call, sustained work such as a decode step runs at the typical speed, not the best: profiles
built from the fastest repeats under-predicted every validation case (docs/calibration.md,
history). Every repeat is kept in the raw data, so either statistic can be recomputed. Rates that have a fixed cost per call (a copy's setup, a kernel
launch) are fitted as ``time = fixed + size / rate`` over several sizes, which separates the two
numbers a profile wants (latency and bandwidth).

Host benchmarks take their time in CPU time (``cpu_timing``): on a machine shared with other
jobs a thread may wait for a core longer than it runs (on the 2-vCPU development VM with four
other engineers' test suites, a one-thread kernel pass read 13 GB/s by wall clock and 22 GB/s in
CPU time, back to back), and how long it runs is what the hardware decides. A multi-threaded
call counts only if its threads ran together (``TOGETHER``); where they never did, the wall
time stands in, which cannot overstate a rate.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def wall_seconds(fn: Callable[[], object]) -> float:
    """Runs ``fn`` here and returns how long it took."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1,
          run: Callable[[Callable[[], object]], float] = wall_seconds) -> tuple[float, ...]:
    """Seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return timed_round_robin([fn], repeats, warmup, run)[0]


def timed_round_robin(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1,
                      run: Callable[[Callable[[], object]], float] = wall_seconds,
                      ) -> list[tuple[float, ...]]:
    """Seconds of ``repeats`` calls of each of ``fns``, taken in turns (fn0, fn1, ..., fn0, ...)
    after ``warmup`` untimed turns, so that all see the same drift of the machine. ``run`` calls
    one of them and returns its seconds: by default here, by wall clock; a device queue passes
    one that submits the call and reads its own timing."""
    for _ in range(warmup):
        for fn in fns:
            run(fn)
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, out, strict=True):
            times.append(run(fn))
    return [tuple(t) for t in out]


#: How repeats become a figure (``--statistic`` of ``hgsim calibrate``).
STATISTICS = ("median", "min")
_statistic = "median"


def current_statistic() -> str:
    return _statistic


@contextmanager
def statistic(name: str) -> Iterator[None]:
    """Within the block, ``representative`` uses ``name`` ("median" or "min")."""
    global _statistic
    if name not in STATISTICS:
        raise ValueError(f"statistic: expected one of {STATISTICS}, got {name!r}")
    previous, _statistic = _statistic, name
    try:
        yield
    finally:
        _statistic = previous


def representative(seconds: Sequence[float]) -> float:
    """The time a benchmark reports: the median of its repeats, or the fastest (module doc)."""
    return float(min(seconds) if _statistic == "min" else statistics.median(seconds))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs; intercept clamped at 0 (no negative
    fixed costs), in which case the slope is refitted through the origin."""
    n = len(xs)
    if n == 0 or len(ys) != n:
        raise ValueError("fit_line needs equally many xs and ys, at least one")
    if n == 1:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my / mx
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    if intercept < 0 or slope <= 0:
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        intercept = 0.0
    return intercept, slope


def net_rate(sizes: Sequence[float], times: Sequence[float], fixed: float) -> float:
    """Median over calls of size / (time - fixed): the rate of the size-proportional part of a
    call whose fixed cost was timed on its own. On a machine whose speed drifts, a median over
    sizes stays put when one size was caught in a slow phase, where a least-squares line
    through them swings its slope and intercept against each other. A time that the fixed
    cost would more than halve counts as half its time (the fixed cost cannot dominate the
    sizes chosen for a rate)."""
    if not sizes or len(sizes) != len(times):
        raise ValueError("net_rate needs equally many sizes and times, at least one")
    return statistics.median(size / max(t - fixed, 0.5 * t)
                             for size, t in zip(sizes, times, strict=True))


#: Least share of a core per thread (CPU time / wall time) for a multi-threaded timing to count
#: as its threads running together; below it they took turns on fewer cores, each meeting less
#: contention than the call would on its own cores.
TOGETHER = 0.8
#: A multi-threaded repeat whose threads did not run together is tried again up to this many
#: times, a few milliseconds apart: other jobs come and go, and a repeat that overlapped is
#: what a figure needs (on the 2-vCPU VM with other engineers' tests, three tries found an
#: overlap for a third of the repeats; ten for most).
RETRIES = 10
RETRY_PAUSE_S = 0.005


def retry_until_together(measure: Callable[[], Timing], threads: int) -> Timing:
    """``measure()`` again (``RETRIES`` times at most) until its threads ran together; the
    last try if they never did. One thread needs no company."""
    timing = measure()
    for _ in range(RETRIES if threads > 1 else 0):
        if timing.share >= TOGETHER:
            break
        time.sleep(RETRY_PAUSE_S)
        timing = measure()
    return timing


@dataclass(frozen=True)
class Timing:
    """A call's time: CPU time per thread, wall time, and the threads' share of a core."""

    cpu_s: float
    wall_s: float
    share: float


def _waits_ns() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent runnable but waiting for a core
    (``/proc/self/task/*/schedstat``, updated whenever a thread is switched in), or None where
    Linux does not say."""
    out = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                out[tid] = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return out


def cpu_timing(fn: Callable[[], object], threads: int = 1) -> Timing:
    """Times ``fn``. With one thread: this thread's CPU time. With ``threads`` (an OpenMP call
    of this process): the wall time less the longest wait for a core of any thread of the
    process during the call (the straggler holds up the join), from the scheduler's own
    accounting. The process's CPU time would not do: the kernel brings other threads' CPU
    time up to date only at ticks, 10 ms here, as long as many a call (shares of 2-13 were
    read off it for 2-thread calls of 0.1-10 ms)."""
    if threads == 1:
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
        return Timing(cpu, wall, cpu / wall if wall > 0 else 1.0)
    before = _waits_ns()
    w0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - w0
    after = _waits_ns()
    if before is None or after is None:  # no scheduler statistics: the process CPU time
        return Timing(wall, wall, 1.0)
    waited = max((after[t] - before.get(t, after[t]) for t in after), default=0) * 1e-9
    ran = max(wall - waited, 0.0)
    return Timing(ran, wall, ran / wall if wall > 0 else 1.0)


def on_cpu_seconds(runs: Sequence[Timing], threads: int) -> tuple[tuple[float, ...], str]:
    """(seconds, clock) a figure takes from its repeats: CPU time per thread, of every repeat
    with one thread and of those whose threads ran together with several; the wall times if
    none did."""
    kept = [t.cpu_s for t in runs if threads == 1 or t.share >= TOGETHER]
    if kept:
        return tuple(kept), "cpu"
    return tuple(t.wall_s for t in runs), "wall"


def timed_cpu_round_robin(fns: Sequence[Callable[[], object]], threads: Sequence[int],
                          repeats: int, warmup: int = 1) -> list[list[Timing]]:
    """``timed_round_robin`` in CPU time: each of ``fns`` runs ``threads[i]`` threads; a repeat
    whose threads did not run together is retried (``RETRIES``)."""
    runs: list[list[Timing]] = [[] for _ in fns]
    index = {id(fn): i for i, fn in enumerate(fns)}

    def run(fn) -> float:
        n = threads[index[id(fn)]]
        timing = retry_until_together(lambda: cpu_timing(fn, n), n)
        runs[index[id(fn)]].append(timing)
        return timing.cpu_s

    timed_round_robin(fns, repeats, warmup, run)
    return [r[-repeats:] if repeats else [] for r in runs]

"""Timing helpers shared by the benchmarks: repeated runs and straight-line fits.

A figure is one number per benchmark from several repeats, by default their *median*. The
fastest repeat (STREAM's convention, ``--statistic min``) is the reproducible best the hardware
can do on a quiet machine; but on a shared or virtual machine whose speed swings from call to
call, sustained work such as a decode step runs at the typical speed, not the best: profiles
built from the fastest repeats under-predicted every validation case (docs/calibration.md,
history). Every repeat is kept in the raw data, so either statistic can be recomputed. Rates that have a fixed cost per call (a copy's setup, a kernel
launch) are fitted as ``time = fixed + size / rate`` over several sizes, which separates the two
numbers a profile wants (latency and bandwidth).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager


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

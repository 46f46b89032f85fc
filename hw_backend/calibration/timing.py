"""Timing helpers shared by the benchmarks: repeated runs and straight-line fits.

Calibration runs on machines other people use too, and interference (another process on the
core, a page-cache flush) only ever adds time; so a figure is the *fastest* of its repeats, the
reproducible estimate of what the hardware does (as STREAM reports its best run). Every repeat
is kept in the raw data, so medians can be recomputed. Rates that have a fixed cost per call (a
copy's setup, a kernel launch) are fitted as ``time = fixed + size / rate`` over several sizes,
which separates the two numbers a profile wants (latency and bandwidth).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, ...]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return tuple(out)


def best(seconds: Sequence[float]) -> float:
    """The representative time of a benchmark: its fastest repeat (see the module doc)."""
    return float(min(seconds))


def median(seconds: Sequence[float]) -> float:
    return float(statistics.median(seconds))


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

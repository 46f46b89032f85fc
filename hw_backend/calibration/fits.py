"""Pure fits from memory measurements to the figures of ``hgsim.memory``'s model.

Each function inverts one closed form of ``hgsim.memory`` so that the profile, fed back through
it, reproduces what was measured:

* ``lines_in_flight``: N interleaved dependent chases each keep one line in flight, so while the
  core can issue them all the time per step stays the memory's latency; past its miss buffers
  the extra chains wait in the core and the step grows. Little's law at the memory gives the
  lines actually in flight, N x (memory latency) / (time per step); ``plateau`` of that curve
  x 64 B is ``gather_inflight_bytes``.
* ``fit_queue_delay``: least squares of the M/M/1 shape ``q u / (1 - u)`` through measured
  (utilisation, added latency) points: ``queue_delay_at_half_load_ns``.
* ``inflight_bytes``: what a reader keeps in flight given the rate it reached, by Little's law
  over the loaded latency at that rate, i.e. the ``inflight_bytes`` for which
  ``hgsim.memory.access_rate`` returns that rate.

No I/O, no timing: unit-tested with synthetic curves (tests/test_calibration_fits.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from hgsim.memory import loaded_latency_s

#: Utilisation above which a rate no longer identifies what was in flight: the M/M/1 latency
#: diverges at u = 1, so near it any in-flight figure fits (the bandwidth is what binds).
MAX_IDENTIFIABLE_UTILISATION = 0.95


def lines_in_flight(chains: int, step_s: float, memory_latency_s: float) -> float:
    """Lines a core keeps in flight with ``chains`` interleaved chases taking ``step_s`` per
    step when the memory answers in ``memory_latency_s`` (Little's law; never more than the
    chains, which each have one load outstanding)."""
    if chains < 1 or step_s <= 0 or memory_latency_s <= 0:
        raise ValueError("chains >= 1, step_s > 0 and memory_latency_s > 0 are required")
    return min(float(chains), chains * memory_latency_s / step_s)


def plateau(values: Sequence[float], within: float = 0.1) -> float:
    """The level a rising-then-flat curve settles at: the median of the points within
    ``within`` of its highest (a single noisy peak does not set it, nor do the points still
    climbing)."""
    if not values:
        raise ValueError("plateau of no values")
    top = max(values)
    return statistics.median(v for v in values if v >= (1 - within) * top)


@dataclass(frozen=True)
class QueueFit:
    """``queue_delay_at_half_load_s`` fitted to loaded-latency points, and what it covered."""

    half_load_s: float
    points: int
    u_min: float
    u_max: float
    rms_residual_s: float


def fit_queue_delay(utilisation: Sequence[float], added_s: Sequence[float]) -> QueueFit:
    """Least squares of ``added = q u / (1 - u)`` over the points (a line through the origin in
    x = u / (1 - u): q = sum(a x) / sum(x^2)); q is clamped at 0 (a tier cannot get faster under
    load; negative points are noise around no queueing). Points at u >= 1 are left out."""
    pts = [(u, a) for u, a in zip(utilisation, added_s, strict=True) if 0 <= u < 1]
    if not pts:
        raise ValueError("no loaded-latency point with 0 <= u < 1")
    xs = [u / (1 - u) for u, _ in pts]
    sxx = sum(x * x for x in xs)
    q = max(0.0, sum(x * a for x, (_, a) in zip(xs, pts, strict=True)) / sxx) if sxx else 0.0
    rms = math.sqrt(statistics.fmean((a - q * x) ** 2 for x, (_, a) in zip(xs, pts,
                                                                             strict=True)))
    us = [u for u, _ in pts]
    return QueueFit(q, len(pts), min(us), max(us), rms)


def inflight_bytes(rate_Bps: float, idle_latency_s: float, bandwidth_Bps: float,
                   half_load_s: float = 0.0) -> float | None:
    """Bytes in flight behind a measured rate: rate x loaded latency at u = rate / bandwidth.

    None when the rate is within ``MAX_IDENTIFIABLE_UTILISATION`` of the bandwidth: there the
    reader is bandwidth-bound and its in-flight figure cannot be told from the rate.
    """
    if rate_Bps <= 0 or idle_latency_s <= 0 or bandwidth_Bps <= 0:
        raise ValueError("rate, idle latency and bandwidth must be > 0")
    u = rate_Bps / bandwidth_Bps
    if half_load_s > 0 and u >= MAX_IDENTIFIABLE_UTILISATION:
        return None
    return rate_Bps * loaded_latency_s(idle_latency_s, min(u, 1.0) if half_load_s else 0.0,
                                       half_load_s)


__all__ = [
    "MAX_IDENTIFIABLE_UTILISATION",
    "QueueFit",
    "fit_queue_delay",
    "inflight_bytes",
    "lines_in_flight",
    "plateau",
]

"""Memory-system physics as pure functions: access patterns, Little's law, loaded latency.

Every host-memory access of a plan has a pattern, and its rate is the least of

* its share of every channel on its route (the flow network; alone: the slowest hop),
* what its issuer keeps in flight divided by the route's latency (Little's law): bytes in
  flight per core for core-issued reads (``stream_inflight_bytes`` with the prefetchers,
  ``gather_inflight_bytes`` for random rows), per copy engine for DMA,
* the compute cap of the cores doing it,

where the latency along the route rises with the load on the tier it reads: a tier at
utilisation u adds ``queue_delay_at_half_load_ns x u / (1 - u)`` (the M/M/1 shape). Readers
that keep more in flight than the tier can serve therefore raise its latency until Little's
law and the bandwidth agree, which is what a loaded-latency measurement shows.

The simulator's flow network solves this for concurrent flows; the functions here give the
same answer for one access alone, so that it can be checked by hand and reused by
calibration and validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Pattern(str, Enum):
    """How an access walks host memory, which decides how much a reader keeps in flight."""

    STREAM = "stream"  # sequential, prefetched: K scans, dense V, partial attention
    GATHER = "gather"  # random rows, demand misses: selected V rows, InfiniGen's K/V rows
    DMA = "dma"  # a GPU copy engine reading host memory over PCIe


def touched_bytes(rows: float, row_bytes: float, line_bytes: int = 64) -> float:
    """Bytes a gather of ``rows`` rows of ``row_bytes`` moves: every line a row touches
    (rows aligned to a line, as cache rows of a KV tensor are)."""
    if rows <= 0 or row_bytes <= 0:
        return 0.0
    return rows * math.ceil(row_bytes / line_bytes) * line_bytes


def queue_delay_s(utilisation: float, half_load_s: float) -> float:
    """Queueing delay a tier adds at ``utilisation`` of its read bandwidth (M/M/1 shape:
    ``half_load_s`` at 50%, growing without bound towards saturation)."""
    if half_load_s <= 0 or utilisation <= 0:
        return 0.0
    if utilisation >= 1:
        return math.inf
    return half_load_s * utilisation / (1.0 - utilisation)


def loaded_latency_s(idle_s: float, utilisation: float, half_load_s: float) -> float:
    """Latency of a route whose tier runs at ``utilisation``: idle plus queueing."""
    return idle_s + queue_delay_s(utilisation, half_load_s)


@dataclass(frozen=True)
class AccessRate:
    """Steady rate of one access alone on its route, and what set it."""

    rate_Bps: float
    latency_s: float  # loaded latency at that rate
    utilisation: float  # of the tier's read bandwidth
    bound: str  # "bandwidth", "latency" or "compute"


def access_rate(
    *,
    inflight_bytes: float,
    idle_latency_s: float,
    bandwidth_Bps: float,
    half_load_s: float = 0.0,
    compute_cap_Bps: float = math.inf,
) -> AccessRate:
    """Rate of a reader that keeps ``inflight_bytes`` in flight on a tier of
    ``bandwidth_Bps`` with idle latency ``idle_latency_s`` (the whole route's), alone.

    Solves r = min(B, cap, C / (L0 + q u / (1 - u))) with u = r / B. With no queueing
    (q = 0) this is min(B, cap, C / L0): the closed form of a bandwidth-, compute- or
    latency-bound access. With queueing the tier is never quite saturated by a finite
    number of requests in flight: the rate approaches B as C grows and latency takes the
    slack, exactly as Little's law at the tier says (L = C / r).
    """
    if inflight_bytes <= 0 or bandwidth_Bps <= 0:
        raise ValueError("inflight_bytes and bandwidth_Bps must be > 0")
    cap = min(bandwidth_Bps, compute_cap_Bps)
    little_idle = inflight_bytes / idle_latency_s if idle_latency_s > 0 else math.inf
    if half_load_s <= 0 or idle_latency_s <= 0:
        rate = min(cap, little_idle)
        bound = ("latency" if little_idle <= cap else
                 "compute" if compute_cap_Bps < bandwidth_Bps else "bandwidth")
        return AccessRate(rate, idle_latency_s, rate / bandwidth_Bps, bound)

    def little(rate: float) -> float:
        u = rate / bandwidth_Bps
        return inflight_bytes / loaded_latency_s(idle_latency_s, u, half_load_s)

    # little() falls as the rate rises; the solution is where it meets the rate, unless the
    # compute cap is lower (then the tier is not the limit at all).
    if little(cap * (1 - 1e-12)) >= cap:
        rate, bound = cap, "compute" if compute_cap_Bps < bandwidth_Bps else "bandwidth"
    else:
        lo, hi = 0.0, cap
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if little(mid) > mid:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * cap:
                break
        rate = 0.5 * (lo + hi)
        # Saturated: most of the latency is queueing, i.e. the bandwidth is what binds.
        queue = queue_delay_s(rate / bandwidth_Bps, half_load_s)
        bound = "bandwidth" if queue > idle_latency_s else "latency"
    u = rate / bandwidth_Bps
    return AccessRate(rate, loaded_latency_s(idle_latency_s, u, half_load_s), u, bound)


def gather_time_s(
    *,
    rows: float,
    row_bytes: float,
    cores: int,
    inflight_per_core: float,
    idle_latency_s: float,
    bandwidth_Bps: float,
    half_load_s: float = 0.0,
    ns_per_row: float = 0.0,
    line_bytes: int = 64,
    fixed_s: float = 0.0,
) -> float:
    """A random gather of ``rows`` rows alone on its tier: the lines it touches at the rate
    of ``access_rate`` (core time per row overlaps the memory time: a cap), plus fixed costs.

    With no queueing and no per-row core time this is the closed form
    ``max(N ceil(R/64) 64 / B, N ceil(R/64) 64 L / (c b)) + fixed``.
    """
    moved = touched_bytes(rows, row_bytes, line_bytes)
    if moved <= 0:
        return fixed_s
    per_row = ns_per_row * 1e-9
    cap = cores * (moved / rows) / per_row if per_row > 0 else math.inf
    rate = access_rate(inflight_bytes=cores * inflight_per_core, idle_latency_s=idle_latency_s,
                       bandwidth_Bps=bandwidth_Bps, half_load_s=half_load_s,
                       compute_cap_Bps=cap)
    return moved / rate.rate_Bps + fixed_s


__all__ = [
    "AccessRate",
    "Pattern",
    "access_rate",
    "gather_time_s",
    "loaded_latency_s",
    "queue_delay_s",
    "touched_bytes",
]

"""Memory-level parallelism and loaded latency: from raw rows to profile figures.

The order matters, since each figure is what makes ``hgsim.memory`` reproduce a measurement:

1. a tier's read bandwidth B (best streaming read) and idle latency L0 (every one-chain chase
   of the run at the calibrated footprint, pooled: ``pooled_latency``);
2. its queueing delay q, fitted to the loaded-latency points (``calibration.loaded``) at
   u = (background stream + chase) / B;
3. bytes in flight per core: random rows from the plateau of the N-chain chases
   (``calibration.mlp``), streams from the one-thread read, each by Little's law over the
   loaded latency at the utilisation the measurement ran at (q, B, L0 from 1 and 2);
4. per thread count n, what each of n cores keeps in flight (n-thread reads and gathers), and
   the probe's core work per row (``calibration.row_cost``), for ``hgsim validate``.

Timed repeats whose threads took turns on a core instead of running together (``share_each``
below ``timing.TOGETHER``) are left out where a figure depends on them running together.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from hgsim.memory import loaded_latency_s, touched_bytes
from hw_backend.calibration import fits
from hw_backend.calibration.records import Measurement, Measurements
from hw_backend.calibration.summarize import Figure
from hw_backend.calibration.timing import TOGETHER, representative

LINE = 64


@dataclass(frozen=True)
class Tier:
    """What the in-flight figures of a node are derived against."""

    node: int
    bandwidth_Bps: float
    idle_latency_s: float
    half_load_s: float  # 0 where not measured

    def loaded_latency_s(self, rate_Bps: float) -> float:
        return loaded_latency_s(self.idle_latency_s, min(rate_Bps / self.bandwidth_Bps, 1.0),
                                self.half_load_s)

    def x(self, rate_Bps: float) -> float:
        """u / (1 - u) at this rate (the M/M/1 factor), for latency differences."""
        u = min(rate_Bps / self.bandwidth_Bps, 0.999)
        return u / (1 - u)


def _local(rows: list[Measurement]) -> list[Measurement]:
    return [m for m in rows if not m.params.get("remote")]


def bandwidth_Bps(ms: Measurements, node: int) -> float | None:
    reads = _local(ms.select("memory", "read_bandwidth", node=node))
    return max(m.value for m in reads) * 1e9 if reads else None


@dataclass(frozen=True)
class PooledLatency:
    """A node's idle latency from every one-chain chase of the run at one footprint."""

    ns: float  # the run's statistic over the samples (median by default)
    samples: int
    low_ns: float
    high_ns: float
    footprint_bytes: int

    def describe(self) -> str:
        return (f"{self.samples} one-chain pointer chases over a random cycle of "
                f"{self.footprint_bytes >> 20} MiB spread over the calibration run (the latency "
                f"probe, and the idle chases paired with the parallelism and loaded-latency "
                f"ones; {self.low_ns:.0f}-{self.high_ns:.0f} ns), dependent loads incl. TLB "
                "misses")


def pooled_latency(ms: Measurements, node: int, socket: int | None = None,
                   remote: bool = False) -> PooledLatency | None:
    """The idle latency of ``node`` (from ``socket``) over every one-chain chase at the latency
    probe's footprint: the memory of a shared machine drifts by tens of percent within seconds
    (other guests' traffic), and one probe catches one moment of it."""
    where = {"node": node, "remote": remote, **({} if socket is None else {"socket": socket})}
    probe = ms.select("memory", "latency", **where)
    if not probe:
        return None
    footprint = probe[0].params["bytes"]
    samples = []
    for name in ("latency", "chase_ref", "loaded_idle"):
        for m in ms.select("memory", name, **where):
            if m.params.get("bytes") == footprint and m.params.get("steps"):
                samples += [s / m.params["steps"] * 1e9 for s in m.seconds]
    if not samples:  # older data: the probe's own figure
        return PooledLatency(probe[0].value, 1, probe[0].value, probe[0].value, footprint)
    return PooledLatency(representative(samples), len(samples), min(samples), max(samples),
                         footprint)


def idle_latency_s(ms: Measurements, node: int) -> float | None:
    pooled = pooled_latency(ms, node)
    return pooled.ns * 1e-9 if pooled else None


def _kept(m: Measurement) -> tuple[float, ...]:
    """The repeats whose threads ran together: every one with one thread (CPU time needs no
    company), none where several threads only took turns on fewer cores."""
    if m.params.get("threads", 1) == 1:
        return tuple(m.seconds)
    shares = m.params.get("share_each") or []
    return tuple(s for s, share in zip(m.seconds, shares, strict=False) if share >= TOGETHER)


# ------------------------------------------------------------------------------ queueing
@dataclass(frozen=True)
class LoadedPoints:
    utilisation: list[float]
    added_s: list[float]
    dropped: int  # repeats left out: chase and readers did not run together
    total: int
    bg_threads: int
    unthrottled_gbps: float


def loaded_points(ms: Measurements, node: int, bandwidth: float) -> LoadedPoints | None:
    """Per background rate: median utilisation and median added latency over the repeats in
    which the chase and the readers ran together (each loaded chase less the idle one paired
    with it)."""
    loaded = ms.select("memory", "loaded_latency", node=node)
    if not loaded:
        return None
    us, added, dropped, total = [], [], 0, 0
    for m in loaded:
        idle = ms.select("memory", "loaded_idle", node=node, fraction=m.params["fraction"])
        if not idle:
            continue
        steps = m.params["steps"]
        pairs = zip(idle[0].seconds, m.seconds, m.params["bg_gbps_each"],
                    m.params["share_each"], strict=False)
        point_u, point_a = [], []
        for quiet_s, busy_s, bg_gbps, share in pairs:
            total += 1
            if share < TOGETHER:
                dropped += 1
                continue
            chase_Bps = LINE / (busy_s / steps)
            point_u.append((bg_gbps * 1e9 + chase_Bps) / bandwidth)
            point_a.append((busy_s - quiet_s) / steps)
        if point_u:
            us.append(statistics.median(point_u))
            added.append(statistics.median(point_a))
    first = loaded[0].params
    return LoadedPoints(us, added, dropped, total, first["bg_threads"],
                        first.get("unthrottled_gbps", 0.0))


def queue_figure(ms: Measurements, node: int) -> tuple[Figure | None, str]:
    """(``queue_delay_at_half_load_ns``, or None with the reason it was not measured)."""
    bandwidth = bandwidth_Bps(ms, node)
    if bandwidth is None:
        return None, "no read bandwidth to state utilisation against"
    pts = loaded_points(ms, node, bandwidth)
    if pts is None:
        return None, ("no loaded-latency measurement (the socket has no second core to load "
                      "the memory with)")
    if not pts.utilisation:
        return None, (f"the background readers never ran alongside the chase ({pts.dropped} of "
                      f"{pts.total} repeats took turns on a core): a shared machine")
    if not any(0 <= u < 1 for u in pts.utilisation):  # the fit has no point to take
        return None, (f"every loaded point ran at or above the {bandwidth / 1e9:.1f} GB/s read "
                      f"bandwidth measured earlier (u = {min(pts.utilisation):.2f}-"
                      f"{max(pts.utilisation):.2f}): the machine's speed changed in between "
                      "(a shared machine)")
    fit = fits.fit_queue_delay(pts.utilisation, pts.added_s)
    left_out = (f"; {pts.dropped} of {pts.total} repeats left out (chase and readers took turns "
                "on a core)" if pts.dropped else "")
    points = ", ".join(f"{u:.2f} +{a * 1e9:.0f}" for u, a in
                       sorted(zip(pts.utilisation, pts.added_s, strict=True)))
    return Figure(round(fit.half_load_s * 1e9, 1), (
        f"least squares of q u/(1-u) to the latency a one-core chase adds while "
        f"{pts.bg_threads} other core(s) stream at {fit.points} rates up to their unthrottled "
        f"{pts.unthrottled_gbps:.1f} GB/s: u = {fit.u_min:.2f}-{fit.u_max:.2f} of the "
        f"{bandwidth / 1e9:.1f} GB/s read bandwidth (u +ns: {points}), rms residual "
        f"{fit.rms_residual_s * 1e9:.1f} ns; above u = {fit.u_max:.2f} the M/M/1 shape is "
        f"extrapolated{left_out}")), ""


def tier(ms: Measurements, node: int) -> Tier | None:
    bandwidth, latency = bandwidth_Bps(ms, node), idle_latency_s(ms, node)
    if bandwidth is None or latency is None:
        return None
    fig, _ = queue_figure(ms, node)
    return Tier(node, bandwidth, latency, fig.value * 1e-9 if fig else 0.0)


# ------------------------------------------------------------------------------ in flight
def mlp_curve(ms: Measurements, node: int, socket: int, remote: bool,
              t: Tier | None) -> list[tuple[int, float]]:
    """(chains, lines in flight) per chain count: N x memory latency / time per step, where the
    memory latency is the paired one-chain chase's, plus the queueing the N chains' own rate
    adds (q, when measured)."""
    out = []
    for own in ms.select("memory", "chase", node=node, socket=socket, remote=remote):
        chains = own.params["chains"]
        ref = ms.select("memory", "chase_ref", node=node, socket=socket, remote=remote,
                        chains=chains)
        if not ref:
            continue
        step = representative(own.seconds) / own.params["steps"]
        ref_step = representative(ref[0].seconds) / ref[0].params["steps"]
        latency = ref_step
        if t is not None and t.half_load_s > 0:
            latency += t.half_load_s * (t.x(chains * LINE / step) - t.x(LINE / ref_step))
        out.append((chains, fits.lines_in_flight(chains, step, latency)))
    return sorted(out)


def _gather_rows(ms: Measurements, node: int, socket: int, remote: bool, threads: int):
    return sorted(ms.select("memory", "gather", node=node, socket=socket, remote=remote,
                            threads=threads), key=lambda m: m.params["row_bytes"])


def gather_rate_Bps(m: Measurement) -> float | None:
    """Lines touched per second over the repeats whose threads ran together (None: none did)."""
    kept = _kept(m)
    if not kept:
        return None
    return touched_bytes(m.params["rows"], m.params["row_bytes"], LINE) / representative(kept)


def gather_inflight_per_core(m: Measurement, t: Tier) -> float | None:
    """What each of a gather's threads kept in flight (Little's law over the loaded latency at
    the rate all of them reached); None where that rate is the bandwidth, or where the threads
    never ran together."""
    rate = gather_rate_Bps(m)
    if rate is None:
        return None
    total = fits.inflight_bytes(rate, t.idle_latency_s, t.bandwidth_Bps, t.half_load_s)
    return None if total is None else total / m.params["threads"]


def _row(row_bytes: int) -> str:
    return f"{row_bytes // 1024} KiB" if row_bytes >= 1024 else f"{row_bytes} B"


def gather_inflight_figure(ms: Measurements, node: int) -> Figure | None:
    """``gather_inflight_bytes``: the chases' plateau x 64 B, with the row gathers' Little's law
    by row size beside it as the cross-check."""
    t = tier(ms, node)
    curve = mlp_curve(ms, node, node, False, t)
    if not curve:
        return None
    lines = fits.plateau([n for _, n in curve])
    on = min(c for c, n in curve if n >= 0.9 * max(n for _, n in curve))
    chains = "/".join(str(c) for c, _ in curve)
    size = ms.select("memory", "chase", node=node, remote=False)[0].params["bytes"] >> 20
    check = ""
    if t is not None:
        parts = [f"{_row(m.params['row_bytes'])} {v:.0f}" for m in
                 _gather_rows(ms, node, node, False, 1)
                 if (v := gather_inflight_per_core(m, t)) is not None]
        if parts:
            check = ("; cross-check, Little's law on one thread's random row gathers (B in "
                     f"flight by row size): {', '.join(parts)}")
    return Figure(round(lines * LINE), (
        f"one core's memory-level parallelism: {chains} interleaved pointer chases over "
        f"{size} MiB on node {node}, lines in flight = N x latency / time per step, plateau "
        f"{lines:.1f} lines (from {on} chains) x {LINE} B{check}"))


def stream_inflight_figure(ms: Measurements, node: int) -> Figure | None:
    """``stream_inflight_bytes``: the one-thread read rate x the loaded latency at its
    utilisation; a floor (at u = 0.95) where one thread already reaches the bandwidth."""
    t = tier(ms, node)
    reads = _local(ms.select("memory", "read_bandwidth", node=node, threads=1))
    if t is None or not reads:
        return None
    rate = reads[0].value * 1e9
    total = fits.inflight_bytes(rate, t.idle_latency_s, t.bandwidth_Bps, t.half_load_s)
    u = rate / t.bandwidth_Bps
    if total is None:
        u = fits.MAX_IDENTIFIABLE_UTILISATION
        total = rate * loaded_latency_s(t.idle_latency_s, u, t.half_load_s)
        how = f"at least: one thread reaches {rate / t.bandwidth_Bps:.2f} of the bandwidth, "
    else:
        how = ""
    latency = total / rate
    return Figure(round(total), (
        f"{how}one-thread streaming read {rate / 1e9:.1f} GB/s x loaded latency "
        f"{latency * 1e9:.0f} ns at u = {u:.2f} (idle {t.idle_latency_s * 1e9:.0f} ns + "
        f"queueing; Little's law)"))


def per_thread_memory(ms: Measurements, node: int) -> dict[int, dict[str, Any]]:
    """Per thread count n: what each of n cores keeps in flight on streams (n-thread read) and
    on random rows (n-thread gathers, by row size)."""
    t = tier(ms, node)
    if t is None:
        return {}
    out: dict[int, dict[str, Any]] = {}
    for m in _local(ms.select("memory", "read_bandwidth", node=node)):
        n = m.params["threads"]
        total = fits.inflight_bytes(m.value * 1e9, t.idle_latency_s, t.bandwidth_Bps,
                                    t.half_load_s)
        if total is None:  # bandwidth-bound: the floor at u = 0.95
            total = m.value * 1e9 * loaded_latency_s(
                t.idle_latency_s, fits.MAX_IDENTIFIABLE_UTILISATION, t.half_load_s)
        out.setdefault(n, {})["stream_inflight_bytes"] = round(total / n, 1)
    threads = sorted({m.params["threads"] for m in _local(ms.select("memory", "gather",
                                                                      node=node))})
    for n in threads:
        by_row = {}
        for m in _gather_rows(ms, node, node, False, n):
            value = gather_inflight_per_core(m, t)
            if value is not None:
                by_row[m.params["row_bytes"]] = round(value, 1)
        if by_row:
            out.setdefault(n, {})["gather_inflight_by_row_bytes"] = by_row
            kv_row = kv_row_bytes(ms)
            if kv_row in by_row:
                out[n]["gather_inflight_bytes"] = by_row[kv_row]
    return out


def row_gains(ms: Measurements, node: int) -> dict[int, float]:
    """How many more lines one thread keeps in flight on rows of each size than on one-line
    rows (rates taken in turns, so a drifting memory cancels out, each over the loaded latency
    at its rate): what the prefetchers add within a row of several lines. x the chases'
    plateau, the lines in flight for that row size."""
    rows = _gather_rows(ms, node, node, False, 1)
    base = next((m for m in rows if m.params["row_bytes"] <= LINE), None)
    t = tier(ms, node)
    if base is None or t is None:
        return {}

    def inflight(m: Measurement) -> float:  # lines in flight, up to the common idle latency
        rate = gather_rate_Bps(m)
        return rate * t.loaded_latency_s(rate)

    one = inflight(base)
    gains = {m.params["row_bytes"]: inflight(m) / one for m in rows}
    # a rate at or past the tier's bandwidth has no finite loaded latency (a noisy sample of a
    # busy machine): such a row size says nothing, it is left out rather than written as inf
    return {row: round(g, 4) for row, g in gains.items() if math.isfinite(g) and g > 0}


def kv_row_bytes(ms: Measurements) -> int | None:
    """The executor's gathered row size (``gather_cached`` is timed at it)."""
    rows = ms.select("memory", "gather_cached")
    return rows[0].params["row_bytes"] if rows else None


def row_cost_figure(ms: Measurements, socket: int) -> Figure | None:
    """``gather_ns_per_row``: ``gather_rows`` per row from cache-resident rows."""
    rows = ms.select("memory", "gather_cached", socket=socket)
    if not rows:
        return None
    m = rows[0]
    return Figure(round(m.value, 2), (
        f"core work per row of the C kernel's gather_rows, {m.params['row_bytes']} B rows from "
        f"a cache-resident {m.params['v_bytes'] >> 10} KiB V into an L2-resident output: slope "
        f"of CPU time between {m.params['rows_small']}- and {m.params['rows_large']}-row calls "
        "(no memory stalls in it; they are charged by the gather's memory time)"))


def probe_row_costs(ms: Measurements, socket: int) -> dict[int, float]:
    """ns per row of the memory probe's gather from cache-resident rows, by row size."""
    return {m.params["row_bytes"]: round(m.value, 3)
            for m in ms.select("memory", "gather_probe_cached", socket=socket)}


def remote_mlp(ms: Measurements, node: int, reader: int) -> dict[str, Any]:
    """What a core of ``reader`` keeps in flight reading node ``node`` (several sockets):
    the plateau of its chases there, and its one-thread gathers' rates by row size."""
    out: dict[str, Any] = {}
    curve = mlp_curve(ms, node, reader, True, None)
    if curve:
        out["inflight_lines"] = round(fits.plateau([n for _, n in curve]), 1)
    gathers = _gather_rows(ms, node, reader, True, 1)
    if gathers:
        out["gather_gbps_by_row_bytes"] = {m.params["row_bytes"]: round(
            gather_rate_Bps(m) / 1e9, 3) for m in gathers}  # one thread: always a rate
    return out


__all__ = [
    "PooledLatency",
    "Tier",
    "bandwidth_Bps",
    "gather_inflight_figure",
    "idle_latency_s",
    "loaded_points",
    "mlp_curve",
    "per_thread_memory",
    "pooled_latency",
    "probe_row_costs",
    "queue_figure",
    "remote_mlp",
    "row_gains",
    "row_cost_figure",
    "stream_inflight_figure",
    "tier",
]

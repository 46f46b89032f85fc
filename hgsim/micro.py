"""Micro-cases of ``hgsim validate``: one host-memory access pattern at a time, predicted vs
measured.

The study's plan cases check whole decode steps, where a memory figure that is off can hide
behind another that is off the other way. A micro-case runs one access alone, so each of the
memory model's pieces is checked by itself:

* ``gather``: random rows of a given size from a buffer far larger than the last-level cache,
  every line of each row read once (``hw_backend.memprobe.gather``), by n threads. Predicted by
  ``hgsim.memory.gather_time_s`` with the socket's ``gather_inflight_bytes`` per core, the
  route's idle latency and bandwidth, the tier's queueing delay and the probe's own core work
  per row (measured by calibration on cache-resident rows); rows of several lines keep more in
  flight than the profile's one figure (the prefetchers fetch ahead within a row), which comes
  from calibration's one-thread row gathers (``Extras``). Tests the memory-level parallelism,
  the line rounding of rows and the loaded latency of several cores gathering together.
* ``scan``: the C kernel's ``logits`` over K of a given context (a streaming read of K, the
  FLOPs of q.k), by n threads. Predicted as K bytes / ``hgsim.memory.access_rate`` with the
  socket's ``stream_inflight_bytes`` per core and the compute cap FLOPs-per-byte /
  ``attention_gflops_per_core``, plus ``op_overhead_us`` per call (both as calibration measured
  the kernel at that thread count, where it did).

Nothing is fitted here: every figure comes from the profile (and, for multi-line rows and the
probe's row cost, from calibration's raw data beside it). Each reader socket reads every memory node it has a
route to: its own, and on a machine with several sockets, the others' through their link.

Nothing here imports torch or the C extensions (``hw_backend.micro`` measures).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, field_validator

from hgsim.errors import UserError
from hgsim.memory import access_rate, gather_time_s, touched_bytes
from hgsim.specs.base import SpecModel
from hgsim.specs.hardware import HardwareProfile
from hgsim.units import parse_count

MiB = 1 << 20
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


# ------------------------------------------------------------------------------ study file
class GatherMicro(SpecModel):
    """Random row gathers: every row size at every thread count."""

    row_bytes: list[int] = Field(default_factory=lambda: [64, 256, 1024, 4096])
    threads: list[int] = Field(default_factory=lambda: [1, 2])
    buffer_mb: int = Field(default=1024, ge=1)  # rows are drawn from this many MiB
    call_mb: int = Field(default=64, ge=1)  # MiB of rows one timed call reads

    @field_validator("row_bytes")
    @classmethod
    def _lines(cls, value: list[int]) -> list[int]:
        if not value or any(r < 8 or r % 8 for r in value):
            raise ValueError("row_bytes: positive multiples of 8, at least one")
        return value


class ScanMicro(SpecModel):
    """The C kernel's ``logits`` over K of each context (the study's model layout and dtype)."""

    contexts: list[int] = Field(default_factory=lambda: [16384, 65536])
    threads: list[int] = Field(default_factory=lambda: [1, 2])
    footprint_mb: int = Field(default=256, ge=1)  # K copies rotate through at least this much

    @field_validator("contexts", mode="before")
    @classmethod
    def _counts(cls, value):
        if isinstance(value, list):
            return [parse_count(v) if isinstance(v, str) else v for v in value]
        return value


class MicroStudy(SpecModel):
    gather: GatherMicro | None = None
    scan: ScanMicro | None = None
    repeats: int = Field(default=7, ge=1)

    @field_validator("gather", "scan", mode="before")
    @classmethod
    def _empty_is_default(cls, value):
        return {} if value is True else value


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Numa:
    """Which NUMA node each profile socket and tier is (recorded by calibration)."""

    sockets: dict[str, int]
    tiers: dict[str, int]

    @staticmethod
    def only_node(profile: HardwareProfile) -> Numa:
        """A one-node machine's mapping: the GPU's socket and its DDR tier are node 0."""
        socket = profile.gpus[profile.primary_gpu].socket
        ddr = [n for n, t in profile.tiers.items() if t.kind == "ddr" and t.socket == socket]
        return Numa({socket: 0}, {ddr[0]: 0} if ddr else {})


@dataclass(frozen=True)
class MicroCase:
    kind: Literal["gather", "scan"]
    socket: str  # the profile socket whose cores read
    tier: str  # the profile tier they read
    node: int  # its NUMA node
    cpu_node: int  # the socket's NUMA node
    threads: int
    row_bytes: int = 0  # gather
    rows: int = 0  # gather: rows per call
    buffer_bytes: int = 0  # gather
    context: int = 0  # scan: tokens of K
    heads: int = 0  # scan: query heads
    kv_heads: int = 0  # scan
    head_dim: int = 0  # scan
    kv_dtype: str = "fp32"  # scan
    footprint_bytes: int = 0  # scan
    remote: bool = False  # the tier hangs off another socket

    @property
    def label(self) -> str:
        where = f"{self.tier}" + (f" from {self.socket}" if self.remote else "")
        if self.kind == "gather":
            return f"gather {_size(self.row_bytes)} rows x{self.threads} thr, {where}"
        return f"scan {_tokens(self.context)} tok x{self.threads} thr, {where}"

    @property
    def bytes_read(self) -> float:
        """Bytes the access reads from the tier: the lines a gather touches, K for a scan."""
        if self.kind == "gather":
            return touched_bytes(self.rows, self.row_bytes)
        return float(self.kv_heads * self.context * self.head_dim * BYTES[self.kv_dtype])

    @property
    def flops(self) -> float:
        """q.k multiply-adds of a scan, as the simulator counts them (2 per element)."""
        return 2.0 * self.heads * self.context * self.head_dim if self.kind == "scan" else 0.0


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def micro_cases(study: MicroStudy, profile: HardwareProfile, numa: Numa, *, heads: int,
                kv_heads: int, head_dim: int, kv_dtype: str) -> list[MicroCase]:
    """Every micro-case: each socket reads each tier it has a route to (its own; another
    socket's DDR over their link), at every size and thread count that fits the socket."""
    out = []
    for socket, cpu_node in numa.sockets.items():
        if socket not in profile.sockets:
            continue
        cores = profile.sockets[socket].cores
        for tier, node in numa.tiers.items():
            if tier not in profile.tiers:
                continue
            spec = profile.tiers[tier]
            remote = spec.socket != socket
            if remote and (spec.kind == "cxl" or _upi(profile, socket, spec.socket) is None):
                continue
            base = {"socket": socket, "tier": tier, "node": node, "cpu_node": cpu_node,
                    "remote": remote}
            if study.gather is not None:
                g = study.gather
                for threads in sorted({t for t in g.threads if 1 <= t <= cores}):
                    for row in g.row_bytes:
                        out.append(MicroCase("gather", threads=threads, row_bytes=row,
                                             rows=max(g.call_mb * MiB // row, 1),
                                             buffer_bytes=g.buffer_mb * MiB, **base))
            if study.scan is not None:
                s = study.scan
                for threads in sorted({t for t in s.threads if 1 <= t <= cores}):
                    for context in s.contexts:
                        out.append(MicroCase("scan", threads=threads, context=context,
                                             heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                             kv_dtype=kv_dtype,
                                             footprint_bytes=s.footprint_mb * MiB, **base))
    return out


# ------------------------------------------------------------------------------ prediction
@dataclass(frozen=True)
class Route:
    """One access's route alone: latency adds along it, bandwidth is its slowest hop."""

    latency_s: float
    bandwidth_Bps: float
    half_load_s: float


def _upi(profile: HardwareProfile, a: str, b: str):
    """The UPI link joining sockets ``a`` and ``b`` directly, if any (remote micro-cases are
    measured only over one)."""
    for link in profile.links.values():
        if link.kind == "upi" and set(link.endpoints) == {a, b}:
            return link
    return None


def route(profile: HardwareProfile, socket: str, tier: str) -> Route:
    """The simulator's own route from ``tier`` to ``socket`` (``Machine.path``): summed hop
    latencies and the slowest hop."""
    import simpy

    from hgsim.sim.machine import Machine

    try:
        path = Machine(simpy.Environment(), profile, record=False).path(tier, socket)
    except ValueError as exc:
        raise UserError(f"cannot read {tier} from {socket}: {exc}") from None
    return Route(path.latency_s, path.bandwidth_Bps,
                 profile.tiers[tier].queue_delay_at_half_load_ns * 1e-9)


@dataclass(frozen=True)
class Extras:
    """What calibration measured beside the profile that the micro-cases need and the profile
    schema has no place for, per socket name:

    * ``probe_ns_per_row``: the memory probe's core work per row, by row size (cache-resident
      rows), which caps a gather where memory would allow more.
    * ``per_threads``: the kernel's per-core figures measured at n threads (as the plan cases
      use them, ``hgsim.validation.case_profile``): a scan by n threads is capped by the
      attention rate per core at n threads (two vCPUs may be SMT siblings, which halves a
      compute-bound kernel's second thread) and pays the call overhead measured at n.
    """

    probe_ns_per_row: dict[str, dict[int, float]] = field(default_factory=dict)
    per_threads: dict[str, dict[int, dict]] = field(default_factory=dict)

    def kernel(self, socket: str, threads: int, figure: str, default: float) -> float:
        """A kernel figure at ``threads`` threads where calibration measured it there."""
        if threads < 2:
            return default
        value = self.per_threads.get(socket, {}).get(threads, {}).get(figure)
        return default if value is None else value

@dataclass(frozen=True)
class Prediction:
    seconds: float
    bound: str  # what set the rate: latency, bandwidth or compute


def predict(profile: HardwareProfile, case: MicroCase,
            extras: Extras | None = None) -> Prediction:
    """The case's time from the profile through ``hgsim.memory``."""
    sock = profile.sockets[case.socket]
    r = route(profile, case.socket, case.tier)
    extras = extras or Extras()
    if case.kind == "gather":
        ns_per_row = extras.probe_ns_per_row.get(case.socket, {}).get(case.row_bytes, 0.0)
        inflight = sock.gather_inflight(case.row_bytes)
        seconds = gather_time_s(
            rows=case.rows, row_bytes=case.row_bytes, cores=case.threads,
            inflight_per_core=inflight, idle_latency_s=r.latency_s,
            bandwidth_Bps=r.bandwidth_Bps, half_load_s=r.half_load_s, ns_per_row=ns_per_row,
            line_bytes=sock.cache_line_bytes)
        moved = case.bytes_read
        cap = case.threads * (moved / case.rows) / (ns_per_row * 1e-9) if ns_per_row else math.inf
        rate = access_rate(inflight_bytes=case.threads * inflight,
                           idle_latency_s=r.latency_s, bandwidth_Bps=r.bandwidth_Bps,
                           half_load_s=r.half_load_s, compute_cap_Bps=cap)
        return Prediction(seconds, rate.bound)
    moved = case.bytes_read
    per_core = extras.kernel(case.socket, case.threads, "attention_gflops_per_core",
                             sock.attention_gflops_per_core)
    per_core *= sock.attention_rate_by_kv_dtype.get(case.kv_dtype, 1.0)
    overhead_us = extras.kernel(case.socket, case.threads, "op_overhead_us", sock.op_overhead_us)
    cap = case.threads * per_core * 1e9 * moved / case.flops
    rate = access_rate(inflight_bytes=case.threads * sock.stream_inflight_bytes,
                       idle_latency_s=r.latency_s, bandwidth_Bps=r.bandwidth_Bps,
                       half_load_s=r.half_load_s, compute_cap_Bps=cap)
    return Prediction(moved / rate.rate_Bps + overhead_us * 1e-6, rate.bound)


# ------------------------------------------------------------------------------ comparison
@dataclass(frozen=True)
class MicroResult:
    case: MicroCase
    measured_s: float  # CPU time per thread of a call (statistic over the repeats)
    predicted: Prediction
    wall_s: float  # the same calls' wall time (statistic over the repeats)
    share: float  # least share of a core a thread had over the repeats kept
    #: the threads ran together in the repeats kept (always, with one thread); where they
    #: only took turns on fewer cores, the timing is not of the case and MAPE leaves it out
    together: bool = True

    @property
    def predicted_s(self) -> float:
        return self.predicted.seconds

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_s - self.measured_s) / self.measured_s

    def row(self) -> dict:
        c = self.case
        return {"case": c.label, "kind": c.kind, "socket": c.socket, "tier": c.tier,
                "node": c.node, "threads": c.threads, "row_bytes": c.row_bytes or None,
                "context": c.context or None, "bytes_read": c.bytes_read,
                "measured_ms": 1e3 * self.measured_s, "predicted_ms": 1e3 * self.predicted_s,
                "measured_gbps": c.bytes_read / self.measured_s / 1e9,
                "predicted_gbps": c.bytes_read / self.predicted_s / 1e9,
                "error_pct": self.error_pct, "bound": self.predicted.bound,
                "wall_ms": 1e3 * self.wall_s, "core_share": self.share,
                "together": self.together}


@dataclass(frozen=True)
class LatencyDrift:
    """The idle latency of one route when the micro-cases ran, against the profile's."""

    label: str  # e.g. "ddr0 from cpu0"
    profile_ns: float
    before_ns: float
    after_ns: float

    def describe(self) -> str:
        lo, hi = sorted((self.before_ns, self.after_ns))
        pct = [100 * (x / self.profile_ns - 1) for x in (lo, hi)]
        return (f"{self.label}: idle latency {lo:.0f}-{hi:.0f} ns before/after the micro-cases "
                f"vs {self.profile_ns:.0f} ns in the profile ({pct[0]:+.0f}% to {pct[1]:+.0f}%)")


def micro_mape(results: list[MicroResult]) -> float:
    """Mean absolute percentage error over the cases whose threads ran together."""
    kept = [r for r in results if r.together]
    if not kept:
        return float("nan")
    return statistics.fmean(abs(r.error_pct) for r in kept)


def print_micro_table(results: list[MicroResult], threshold: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("micro-case", "bound", "measured GB/s", "predicted GB/s", "measured ms",
                "predicted ms", "error"):
        table.add_column(col, justify="left" if col == "micro-case" else "right")
    for r in results:
        row = r.row()
        colour = "green" if abs(r.error_pct) <= threshold else "red"
        error = f"[{colour}]{r.error_pct:+.1f}%[/{colour}]" if r.together else (
            f"({r.error_pct:+.1f}%)")
        table.add_row(r.case.label, r.predicted.bound, f"{row['measured_gbps']:.2f}",
                      f"{row['predicted_gbps']:.2f}", f"{row['measured_ms']:.2f}",
                      f"{row['predicted_ms']:.2f}", error)
    import sys

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    console.print(table)
    error = micro_mape(results)
    kept = [r for r in results if r.together]
    verdict = "[green]PASS[/green]" if error <= threshold else "[red]FAIL[/red]"
    by_kind = ", ".join(f"{kind} {micro_mape([r for r in kept if r.case.kind == kind]):.1f}%"
                        for kind in ("gather", "scan") if any(r.case.kind == kind for r in kept))
    console.print(f"micro-case MAPE {error:.2f}% over {len(kept)} cases ({by_kind}; "
                  f"threshold {threshold:g}%): {verdict}")
    if len(kept) < len(results):
        console.print(f"{len(results) - len(kept)} case(s) in brackets left out: their threads "
                      "never ran together (other jobs held the cores), so they measured turns "
                      "on fewer cores, not the case")


__all__ = [
    "Extras",
    "LatencyDrift",
    "GatherMicro",
    "MicroCase",
    "MicroResult",
    "MicroStudy",
    "Numa",
    "Prediction",
    "Route",
    "ScanMicro",
    "micro_cases",
    "micro_mape",
    "predict",
    "print_micro_table",
    "route",
]

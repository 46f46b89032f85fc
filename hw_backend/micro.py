"""Measured half of ``hgsim validate``'s micro-cases (``hgsim.micro``): run each access alone.

Cases are grouped by the NUMA node of the socket that reads, and each group runs on that
socket's CPUs (``calibration.pinned``) with its buffers bound to the node read
(``numa.alloc_on_node``). Within a group every case is timed in turns, repeat by repeat, so that
a machine drifting between fast and slow phases affects all cases alike.

Times are CPU time per thread (``memprobe``), as calibration takes them: on a shared machine a
thread can wait for a core longer than it runs, and how long it runs is what the memory system
decides. The wall time and the threads' least share of a core come back beside it, and repeats
whose threads did not run together are left out where there are others.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from dataclasses import dataclass

import numpy as np

from hgsim.micro import BYTES, MicroCase

_KV_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_STORAGE = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}


@dataclass(frozen=True)
class Timed:
    """One case's repeats: CPU time per thread, wall time, the threads' least share of a core."""

    cpu_s: tuple[float, ...]
    wall_s: tuple[float, ...]
    share: tuple[float, ...]


def _gather_call(case: MicroCase, buffers: dict[int, np.ndarray]):
    from hw_backend import memprobe

    buf = buffers.get(case.node)
    if buf is None or buf.nbytes < case.buffer_bytes:
        buf = buffers[case.node] = memprobe.row_buffer(case.buffer_bytes, case.node)
    idx = memprobe.random_rows(buf.nbytes, case.row_bytes, case.rows, seed=case.row_bytes)
    return lambda: memprobe.gather(buf, idx, case.row_bytes, case.threads)


def _normal(rng, shape, kv_dtype: str) -> np.ndarray:
    """Standard normal values in the KV storage type (bf16: the top half of fp32's bits)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if kv_dtype == "bf16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(_STORAGE[kv_dtype])


def _keys(case: MicroCase, cache: dict):
    """A function giving the next of K copies on the case's node, at least ``footprint_bytes``
    together, shared (copies and turn) by the cases of the same node, shape and dtype: every
    call reads the copy least recently read by any of them."""
    from hw_backend.numa import alloc_on_node

    shape = (1, case.kv_heads, case.context, case.head_dim)
    key = (case.node, shape, case.kv_dtype)
    if key in cache:
        return cache[key]
    one = math.prod(shape) * BYTES[case.kv_dtype]
    rng = np.random.default_rng(case.context)
    copies = []
    for _ in range(max(1, math.ceil(case.footprint_bytes / one))):
        with warnings.catch_warnings():  # one-node machines: placement is implicit
            warnings.simplefilter("ignore", RuntimeWarning)
            k = alloc_on_node(shape, _STORAGE[case.kv_dtype], case.node)
        k[...] = _normal(rng, shape, case.kv_dtype)
        copies.append(k)
    turn = iter(range(1 << 62))
    cache[key] = lambda: copies[next(turn) % len(copies)]
    return cache[key]


def _scan_call(case: MicroCase, cache: dict):
    from hw_backend import cpu_attention as ca
    from hw_backend import memprobe

    next_keys = _keys(case, cache)
    rng = np.random.default_rng(case.context)
    q = rng.standard_normal((1, case.heads, case.head_dim)).astype(np.float32)
    out = np.empty((1, case.heads, case.context), np.float32)

    def call():
        K = next_keys()
        return memprobe.parallel_call(lambda: ca.logits(
            q, K, num_threads=case.threads, kv_dtype=_KV_NAMES[case.kv_dtype], out=out),
            case.threads)

    return call


_LATENCY_STEPS = 200_000


def _latency_ns(cycles: dict) -> dict[int, float]:
    """One-chain chase latency (median of three, CPU time) per node read."""
    from hw_backend import memprobe

    return {node: statistics.median(memprobe.chase_seconds(c, 1, _LATENCY_STEPS)
                                    for _ in range(3)) / _LATENCY_STEPS * 1e9
            for node, c in cycles.items()}


def _group(cases: list[MicroCase], repeats: int,
           quiet_wait_s: float) -> tuple[list[Timed], dict[int, tuple[float, float]]]:
    """Every case of one reader socket, in turns, on that socket's CPUs; and the idle latency
    of each node gathered from, just before and just after (chased through the gather buffer
    itself, so at the footprint the gathers read)."""
    from hw_backend import memprobe
    from hw_backend.calibration.quiet import wait_for_quiet
    from hw_backend.calibration.timing import retry_until_together

    buffers: dict[int, np.ndarray] = {}
    keys: dict = {}
    calls = [_gather_call(c, buffers) if c.kind == "gather" else _scan_call(c, keys)
             for c in cases]
    cycles = {node: memprobe.cycle_in(buf) for node, buf in buffers.items()}
    before = _latency_ns(cycles)
    for call in calls:  # warm-up: page tables, OpenMP pools, code
        call()
    runs: list[list] = [[] for _ in cases]
    for _ in range(repeats):
        if quiet_wait_s > 0:
            wait_for_quiet(quiet_wait_s)
        for case, call, out in zip(cases, calls, runs, strict=True):
            out.append(retry_until_together(call, case.threads))
    after = _latency_ns(cycles)
    timed = [Timed(tuple(t.cpu_s for t in ts), tuple(t.wall_s for t in ts),
                   tuple(t.share for t in ts)) for ts in runs]
    return timed, {node: (before[node], after[node]) for node in cycles}


def measure(cases: list[MicroCase], repeats: int, quiet_wait_s: float = 0.0
            ) -> tuple[list[Timed], dict[tuple[int, int], tuple[float, float]]]:
    """Every case's repeats, each group of one reader socket on that socket's CPUs, and the
    idle latency (ns, before and after) of every node gathered from, by (reader's NUMA node,
    node read)."""
    from hw_backend.calibration.pinned import run_on_cpus
    from hw_backend.numa import numa_nodes

    usable = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    cpus = {n.id: tuple(c for c in n.cpus if c in usable) for n in numa_nodes()}
    results: dict[int, Timed] = {}
    latency: dict[tuple[int, int], tuple[float, float]] = {}
    for cpu_node in sorted({c.cpu_node for c in cases}):
        group = [i for i, c in enumerate(cases) if c.cpu_node == cpu_node]
        todo = [cases[i] for i in group]
        mine = cpus.get(cpu_node, ())
        timed, seen = (run_on_cpus(mine, _group, todo, repeats, quiet_wait_s) if mine
                       else _group(todo, repeats, quiet_wait_s))
        results.update(zip(group, timed, strict=True))
        latency.update({(cpu_node, node): ns for node, ns in seen.items()})
    return [results[i] for i in range(len(cases))], latency


def together(timed: Timed, threads: int) -> bool:
    """Whether any repeat had its threads running together (always true for one thread)."""
    from hw_backend.calibration.timing import TOGETHER

    return threads == 1 or any(s >= TOGETHER for s in timed.share)


def representative(timed: Timed, statistic: str, threads: int) -> tuple[float, float, float]:
    """(CPU s, wall s, least share) of a case: ``statistic`` ("min" or "median") over its
    repeats (with several threads, those whose threads ran together, if any did; if none did,
    the wall time stands for the CPU time, as ``calibration.timing.on_cpu_seconds`` takes it:
    a repeat's scheduler waits can be charged in full to a call they only straddled, leaving
    it no CPU time at all)."""
    from hw_backend.calibration.timing import TOGETHER

    every = list(range(len(timed.share)))
    kept = [i for i in every if threads == 1 or timed.share[i] >= TOGETHER]
    pick = min if statistic == "min" else statistics.median
    wall = float(pick([timed.wall_s[i] for i in kept or every]))
    cpu = float(pick([timed.cpu_s[i] for i in kept])) if kept else wall
    return cpu, wall, min(timed.share[i] for i in kept or every)


__all__ = ["Timed", "measure", "representative", "together"]

"""Loaded latency per memory node: a dependent chase while other cores stream at chosen rates.

A tier's latency rises with the load on it (``queue_delay_at_half_load_ns``, M/M/1 shape in
``hgsim.memory``). To see the curve, one core chases pointers on the node while every other core
of the nearest socket reads another buffer on it, throttled (a read loop that spins between
16 KiB blocks) to fractions of what those cores reach unthrottled. Each loaded chase is paired
with an idle one right before it, so the added latency is taken in one machine state. Every
repeat keeps the background's achieved rate and the least share of a core that the chase and
the readers had (``share_each``): on a shared machine they may take turns on one core instead
of running together, and such a repeat shows no load at all: it is tried again
(``timing.retry_until_together``) and, if it never overlaps, left out by ``summarize``.

What this cannot show is stated, not hidden: the load comes from the socket's other cores only
(one on a 2-vCPU machine), so the utilisations covered stop at what they reach; the fit in
``calibration.fits`` says the range, and beyond it the M/M/1 shape is an extrapolation.
"""

from __future__ import annotations

import statistics

import numpy as np

from hw_backend import memprobe
from hw_backend.calibration.pinned import run_on_cpus
from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import Job, Settings
from hw_backend.calibration.timing import TOGETHER, representative, retry_until_together
from hw_backend.calibration.topology import Machine


def _suite(node: int, socket: int, threads: int, settings: Settings) -> list[Measurement]:
    cycle = memprobe.random_cycle(settings.chase_bytes, node)
    background = memprobe.row_buffer(settings.read_bytes, node).view(np.uint64)
    steps = settings.loaded_steps

    def chase(target_gbps: float, load: bool) -> memprobe.LoadedChase:
        return memprobe.loaded_chase(cycle, steps, background, threads if load else 0,
                                     target_gbps)

    probes = [retry_until_together(lambda: chase(0.0, True), 2) for _ in range(2)]
    top = max(b.background_gbps for b in ([b for b in probes if b.share >= TOGETHER] or probes))
    targets = [0.0 if f >= 1 else f * top for f in settings.loaded_fractions]
    idle: list[list[float]] = [[] for _ in targets]
    loaded: list[list[memprobe.LoadedChase]] = [[] for _ in targets]
    for _ in range(settings.repeats):
        for i, target in enumerate(targets):
            idle[i].append(chase(0.0, False).ns_per_load)
            loaded[i].append(retry_until_together(lambda t=target: chase(t, True), 2))
    rows = []
    base = {"node": node, "socket": socket, "remote": False, "bg_threads": threads,
            "bytes": cycle.nbytes, "bg_bytes": int(background.nbytes), "steps": steps,
            "unthrottled_gbps": round(top, 3)}
    for fraction, target, quiet, busy in zip(settings.loaded_fractions, targets, idle, loaded,
                                             strict=True):
        params = {**base, "fraction": fraction, "target_gbps": round(target, 3)}
        quiet_s = tuple(ns * steps * 1e-9 for ns in quiet)  # seconds of each chase
        busy_s = tuple(b.ns_per_load * steps * 1e-9 for b in busy)
        rows.append(Measurement("memory", "loaded_idle", representative(quiet_s) / steps * 1e9,
                                "ns", params, quiet_s))
        rows.append(Measurement(
            "memory", "loaded_latency", representative(busy_s) / steps * 1e9, "ns",
            {**params, "bg_gbps": round(statistics.median(b.background_gbps for b in busy), 3),
             "bg_gbps_each": [round(b.background_gbps, 3) for b in busy],
             "share_each": [round(b.share, 3) for b in busy]}, busy_s))
    return rows


def plan(machine: Machine, settings: Settings) -> list[Job]:
    """One job per memory node, from its nearest socket; none where that socket has one CPU
    (no core left to load the memory)."""
    jobs = []
    for node in machine.memory_nodes:
        socket = machine.nearest_socket(node)
        cpus = machine.cpus_of(socket)
        if len(cpus) < 2:
            continue
        threads = len(cpus) - 1
        jobs.append(Job(
            f"loaded latency: node {node.id}, {threads} background reader(s) on socket "
            f"{socket.id} at {len(settings.loaded_fractions)} rates",
            lambda n=node.id, s=socket.id, c=cpus, t=threads: run_on_cpus(
                c, _suite, n, s, t, settings),
        ))
    return jobs

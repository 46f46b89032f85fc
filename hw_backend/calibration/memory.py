"""Memory bandwidth and latency per NUMA node and thread count.

CPU attention streams KV out of memory, so a tier's read bandwidth (and how it grows with the
number of threads reading) bounds the CPU side, and the latency of a dependent load is what a
gather of scattered rows pays. Buffers are placed with ``hw_backend.numa.alloc_on_node`` so a
CXL expander (a CPU-less node) is measured as itself, read by the threads of the socket nearest
to it (``pinned.run_on_cpus``). Reads use the compiled streaming kernel (every thread its own
contiguous slice, as the attention kernels read); writes use torch's parallel ``fill_``; latency
is a pointer chase through a random cycle of cache lines. Reads and latency are timed in CPU time
(``hw_backend.memprobe``): on a shared machine wall time also counts waiting for a core.
"""

from __future__ import annotations

import warnings

import numpy as np

from hw_backend import memprobe
from hw_backend.calibration.pinned import run_on_cpus
from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import Job, Settings
from hw_backend.calibration.timing import (
    on_cpu_seconds,
    representative,
    timed,
    timed_cpu_round_robin,
)
from hw_backend.calibration.topology import Machine


def _ext():
    from hw_backend import _cpu_attention

    return _cpu_attention


def _on_node(shape: int, dtype, node: int) -> np.ndarray:
    from hw_backend.numa import alloc_on_node

    with warnings.catch_warnings():  # one-node machines: placement is implicit, and known
        warnings.simplefilter("ignore", RuntimeWarning)
        return alloc_on_node(shape, dtype, node)


def read_bandwidth(node: int, threads: int, nbytes: int, repeats: int) -> Measurement:
    """Streaming read by ``threads`` threads, in CPU time per thread (``timing.cpu_timing``)
    over the repeats whose threads ran together; the wall-clock rate is kept beside it."""
    ext = _ext()
    words = _on_node(nbytes // 8, np.uint64, node)
    words[:] = 1
    (runs,) = timed_cpu_round_robin([lambda: ext.stream_read(words, threads)], [threads],
                                    repeats)
    seconds, clock = on_cpu_seconds(runs, threads)
    return Measurement("memory", "read_bandwidth", words.nbytes / representative(seconds) / 1e9,
                       "GB/s", {"node": node, "threads": threads, "bytes": words.nbytes,
                                "clock": clock,
                                "wall_gbps": round(words.nbytes / representative(
                                    [t.wall_s for t in runs]) / 1e9, 3),
                                "share_each": [round(t.share, 3) for t in runs]}, seconds)


def write_bandwidth(node: int, threads: int, nbytes: int, repeats: int) -> Measurement:
    import torch

    from hw_backend.numa import to_torch

    buf = to_torch(_on_node(nbytes // 4, np.float32, node))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = timed(lambda: buf.fill_(1.0), repeats)
    finally:
        torch.set_num_threads(previous)
    nb = buf.numel() * 4
    return Measurement("memory", "write_bandwidth", nb / representative(seconds) / 1e9, "GB/s",
                       {"node": node, "threads": threads, "bytes": nb}, seconds)


def latency(node: int, nbytes: int, steps: int) -> Measurement:
    """Mean ns per dependent load over a random cycle visiting every cache line once, in CPU
    time (``memprobe``); each repeat goes on around the cycle where the last one stopped."""
    cycle = memprobe.random_cycle(nbytes, node)
    seconds = timed(lambda: None, 3, run=lambda _: memprobe.chase_seconds(cycle, 1, steps))
    return Measurement("memory", "latency", representative(seconds) / steps * 1e9, "ns",
                       {"node": node, "bytes": cycle.nbytes, "steps": steps,
                        "huge_pages": memprobe.huge_page_fraction(cycle.next)}, seconds)


def _node_suite(node: int, socket: int, thread_counts: tuple[int, ...], settings: Settings,
                remote: bool) -> list[Measurement]:
    """Everything measured about memory node ``node`` from socket ``socket`` (runs pinned)."""
    rows = []
    counts = thread_counts[-1:] if remote else thread_counts
    for threads in counts:
        rows.append(read_bandwidth(node, threads, settings.read_bytes, settings.repeats))
        if not remote:
            rows.append(write_bandwidth(node, threads, settings.read_bytes, settings.repeats))
    rows.append(latency(node, settings.chase_bytes, settings.chase_steps))
    for footprint in settings.latency_footprints:  # raw data: latency vs footprint
        row = latency(node, footprint, settings.chase_steps // 4)
        rows.append(Measurement("memory", "latency_footprint", row.value, row.unit, row.params,
                                row.seconds))
    for row in rows:
        row.params["socket"] = socket
        row.params["remote"] = remote
    return rows


def plan(machine: Machine, settings: Settings) -> list[Job]:
    """One job per memory node (read by its nearest socket) and per remote socket pair."""
    jobs = []
    for node in machine.memory_nodes:
        socket = machine.nearest_socket(node)
        cpus = machine.cpus_of(socket)
        counts = settings.thread_counts(len(cpus))
        kind = "CXL/memory-only" if node.memory_only else "local"
        jobs.append(Job(
            f"memory node {node.id} ({kind}) from socket {socket.id}, threads {counts}",
            lambda n=node.id, s=socket.id, c=cpus, t=counts: run_on_cpus(
                c, _node_suite, n, s, t, settings, False),
        ))
    sockets = machine.cpu_nodes
    for reader in sockets:
        for owner in sockets:
            if owner.id == reader.id:
                continue
            cpus = machine.cpus_of(reader)
            counts = settings.thread_counts(len(cpus))
            jobs.append(Job(
                f"memory node {owner.id} from remote socket {reader.id}",
                lambda n=owner.id, s=reader.id, c=cpus, t=counts: run_on_cpus(
                    c, _node_suite, n, s, t, settings, True),
            ))
    return jobs

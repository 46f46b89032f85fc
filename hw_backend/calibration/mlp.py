"""Memory-level parallelism per NUMA node: N-chain pointer chases and random row gathers.

A random row gather runs at what one core keeps in flight / the latency (``hgsim.memory``), and
what a core keeps in flight on demand misses is set by its L1 miss buffers, which no streaming
benchmark shows. So, per memory node, read by the threads of its nearest socket (and, on a
multi-socket machine, by every other socket too):

* ``chase``: N = 1, 2, 4, ... interleaved dependent chases on one core through a random cycle of
  lines far larger than the last-level cache. Each chase is paired with a one-chain chase right
  before it (``chase_ref``), so the ratio of the two, which the in-flight count comes from, is
  taken in one machine state even where the memory's speed drifts between seconds.
* ``gather``: rows of 64 B to 4 KiB drawn at random from a buffer far larger than the cache,
  every line of each row read once, by 1, 2, 4, ... threads: Little's law on the rows moved
  cross-checks the chases and shows what n cores keep in flight together, and how much the
  prefetchers add within multi-line rows.

Times are CPU times of the threads doing the work (``memprobe``: on a shared machine a thread
may wait for a core longer than it runs); ``share_each`` records, per repeat, whether the
threads of a gather really ran together. Buffers come from ``hw_backend.memprobe`` (bound to
the node, huge pages asked for; the share actually on huge pages is recorded, since 4 KiB pages
add a TLB miss to every random access).
"""

from __future__ import annotations

from hgsim.memory import touched_bytes
from hw_backend import memprobe
from hw_backend.calibration.pinned import run_on_cpus
from hw_backend.calibration.records import Measurement
from hw_backend.calibration.settings import Job, Settings
from hw_backend.calibration.timing import (
    representative,
    retry_until_together,
    timed_round_robin,
)
from hw_backend.calibration.topology import Machine


def chase_sweep(node: int, socket: int, remote: bool, settings: Settings) -> list[Measurement]:
    """Per chain count N: the time per step of N chains, and of one chain just before it."""
    cycle = memprobe.random_cycle(settings.chase_bytes, node)
    huge = memprobe.huge_page_fraction(cycle.next)
    ref_steps = max(settings.chase_loads // 4, 1)
    calls = []
    for chains in settings.mlp_chains:
        steps = max(settings.chase_loads // chains, 1)
        calls.append(lambda: memprobe.chase_seconds(cycle, 1, ref_steps))
        calls.append(lambda c=chains, s=steps: memprobe.chase_seconds(cycle, c, s))
    timings = timed_round_robin(calls, settings.repeats, run=lambda fn: fn())
    rows = []
    base = {"node": node, "socket": socket, "remote": remote, "bytes": cycle.nbytes,
            "huge_pages": huge}
    for i, chains in enumerate(settings.mlp_chains):
        steps = max(settings.chase_loads // chains, 1)
        ref, own = timings[2 * i], timings[2 * i + 1]
        params = {**base, "chains": chains}
        rows.append(Measurement("memory", "chase_ref", representative(ref) / ref_steps * 1e9,
                                "ns", {**params, "steps": ref_steps}, ref))
        rows.append(Measurement("memory", "chase", representative(own) / steps * 1e9, "ns",
                                {**params, "steps": steps}, own))
    return rows


def gather_sweep(node: int, socket: int, remote: bool, thread_counts: tuple[int, ...],
                 settings: Settings) -> list[Measurement]:
    """Random rows of every size by every thread count, all taken in turns. Value: GB/s of the
    lines the rows touch."""
    buf = memprobe.row_buffer(settings.gather_buffer_bytes, node)
    huge = memprobe.huge_page_fraction(buf)
    plan = []
    for threads in thread_counts:
        for row_bytes in settings.gather_row_bytes:
            count = max(settings.gather_call_bytes // row_bytes, 1)
            idx = memprobe.random_rows(buf.nbytes, row_bytes, count, seed=row_bytes)
            plan.append((threads, row_bytes, idx))
    shares: list[list[float]] = [[] for _ in plan]

    def call(i: int) -> float:
        threads, row_bytes, idx = plan[i]
        timing = retry_until_together(lambda: memprobe.gather(buf, idx, row_bytes, threads),
                                      threads)
        shares[i].append(timing.share)
        return timing.cpu_s

    timings = timed_round_robin([lambda i=i: i for i in range(len(plan))], settings.repeats,
                                run=lambda fn: call(fn()))
    rows = []
    for (threads, row_bytes, idx), seconds, share in zip(plan, timings, shares, strict=True):
        moved = touched_bytes(len(idx), row_bytes)
        rows.append(Measurement(
            "memory", "gather", moved / representative(seconds) / 1e9, "GB/s",
            {"node": node, "socket": socket, "remote": remote, "threads": threads,
             "row_bytes": row_bytes, "rows": len(idx), "bytes": buf.nbytes,
             "huge_pages": huge,
             "share_each": [round(x, 3) for x in share[-len(seconds):]]},
            seconds))
    return rows


def _suite(node: int, socket: int, remote: bool, thread_counts: tuple[int, ...],
           settings: Settings) -> list[Measurement]:
    return (chase_sweep(node, socket, remote, settings)
            + gather_sweep(node, socket, remote, thread_counts, settings))


def plan(machine: Machine, settings: Settings) -> list[Job]:
    """One job per memory node from its nearest socket, and per (socket, other socket's node)."""
    jobs = []
    pairs = [(node, machine.nearest_socket(node), False) for node in machine.memory_nodes]
    pairs += [(owner, reader, True) for reader in machine.cpu_nodes
              for owner in machine.cpu_nodes if owner.id != reader.id]
    for node, socket, remote in pairs:
        cpus = machine.cpus_of(socket)
        counts = settings.thread_counts(len(cpus))
        if remote:
            counts = tuple(sorted({1, counts[-1]}))
        where = "remote " if remote else ""
        jobs.append(Job(
            f"memory-level parallelism: node {node.id} from {where}socket {socket.id} "
            f"(chains {settings.mlp_chains[0]}..{settings.mlp_chains[-1]}, rows "
            f"{settings.gather_row_bytes[0]}..{settings.gather_row_bytes[-1]} B, threads {counts})",
            lambda n=node.id, s=socket.id, r=remote, c=cpus, t=counts: run_on_cpus(
                c, _suite, n, s, r, t, settings),
        ))
    return jobs

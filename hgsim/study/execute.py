"""Running points: in this process, on a local process pool, or on a Dask cluster.

Points are grouped into chunks so per-task overhead (pickling, scheduling, a Dask round trip
of a few ms) stays small next to simulations of 10-300 ms; a chunk holds similar points (so
per-process caches hit) and chunks run in shuffled order (so slow regions spread out). The local pool stores
each point in the worker as it finishes; with Dask the client stores records as chunks come
back, so workers need no shared file system. Either way the caller sees finished records as
they arrive and a progress bar with an ETA when stderr is a terminal.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from hgsim.errors import UserError
from hgsim.study.pool import ignore_sigint, process_context, terminate_pool
from hgsim.study.store import PointStore
from hgsim.study.worker import run_chunk

MAX_CHUNK = 16


@dataclass
class ExecOptions:
    executor: str = "local"  # "local" or "dask"
    jobs: int | None = None  # local: worker processes (default: all cores)
    scheduler: str | None = None  # dask: scheduler address (tcp://host:8786)
    scheduler_file: str | None = None  # dask: scheduler file (dask-jobqueue, dask-mpi)
    chunk: int | None = None  # points per task (default: automatic)
    progress: bool = True  # show a progress bar (only on a terminal)


@dataclass
class ExecStats:
    computed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def chunk_size(n: int, workers: int, requested: int | None = None) -> int:
    """Points per task: about eight tasks per worker (balance, ETA), at most MAX_CHUNK."""
    if requested:
        return max(1, requested)
    return max(1, min(MAX_CHUNK, n // max(1, workers * 8)))


def make_chunks(specs: list, size: int, seed: int = 0) -> list[list]:
    """Chunks of similar points, handed out in a fixed shuffled order.

    Inside a chunk, points share model and context where possible: the simulator caches per
    (model, context) work (the accuracy proxy's synthetic attention case takes ~1 s to build
    and its cache holds two), so a worker that sees them back to back builds each once.
    Shuffling the chunks spreads slow regions (long contexts) over all workers.
    """
    order = sorted(specs, key=_locality)
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    random.Random(seed).shuffle(chunks)
    return chunks


def _locality(spec) -> tuple:
    w = spec.workload
    return (spec.model.name, w.context, w.batch, w.kv_dtype, w.gen, spec.policy)


def execute(specs: list, store: PointStore, options: ExecOptions,
            on_record: Callable[[dict[str, Any]], None] | None = None) -> ExecStats:
    """Compute ``specs``, storing each finished point in ``store``."""
    stats = ExecStats()
    if not specs:
        return stats
    records = _records(specs, store, options)  # workers start here, before any bar thread
    bar = _progress(len(specs), options.progress)
    try:
        for record in records:
            if "error" in record:
                stats.errors.append(record)
            else:
                stats.computed += 1
            if on_record is not None:
                on_record(record)
            bar.update(1)
    finally:
        bar.close()
        records.close()  # on Ctrl-C: stop workers now, not when the generator is collected
    return stats


def _records(specs: list, store: PointStore, options: ExecOptions) -> Iterator[dict[str, Any]]:
    if options.executor == "dask":
        return _dask(specs, store, options)
    jobs = options.jobs or default_jobs()
    if jobs <= 1 or len(specs) == 1:  # in this process: simplest to debug, no pickling
        return (record for spec in specs for record in run_chunk([spec], str(store.dir)))
    return _local_pool(specs, store, options, jobs)


def _local_pool(specs, store, options, jobs) -> Iterator[dict[str, Any]]:
    """Start the pool now (so a fork happens while this process has one thread) and return
    an iterator over finished records."""
    size = chunk_size(len(specs), jobs, options.chunk)
    chunks = make_chunks(specs, size)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(chunks)), mp_context=process_context(),
                               initializer=ignore_sigint)
    pending = {pool.submit(run_chunk, chunk, str(store.dir)) for chunk in chunks}
    return _drain(pool, pending)


def _drain(pool: ProcessPoolExecutor, pending: set) -> Iterator[dict[str, Any]]:
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield from future.result()
    except BaseException:  # Ctrl-C, or the consumer closed us: stop the workers at once
        terminate_pool(pool)
        raise
    pool.shutdown(wait=True)


def _dask(specs, store, options) -> Iterator[dict[str, Any]]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise UserError("the dask executor needs dask[distributed] "
                        "(pip install 'hgsim[dist]')", field="--executor") from None
    if not options.scheduler and not options.scheduler_file:
        raise UserError("--executor dask needs --scheduler ADDRESS or --scheduler-file PATH")
    try:
        if options.scheduler_file:
            client = Client(scheduler_file=options.scheduler_file, timeout="20s")
        else:
            client = Client(options.scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as exc:
        where = options.scheduler or options.scheduler_file
        raise UserError(f"cannot connect to Dask scheduler {where} ({exc})") from None
    try:
        workers = max(1, sum(client.nthreads().values()))
        size = chunk_size(len(specs), workers, options.chunk)
        chunks = make_chunks(specs, size)
        futures = client.map(run_chunk, chunks, pure=False)
        try:
            for future in as_completed(futures):
                for record in future.result():
                    if "error" not in record:
                        store.write(record)
                    yield record
        except BaseException:
            client.cancel(futures)
            raise
    finally:
        client.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="pt", desc="points", dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)

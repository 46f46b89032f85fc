"""Run a benchmark on a given set of CPUs, so that "socket s reads node m" means what it says.

OpenMP worker threads keep the affinity they were created with, so pinning the calling thread of
a process whose thread pool already exists does not move the pool. A benchmark for a subset of
the CPUs therefore runs in a fresh (spawned) process whose affinity is set before anything starts
threads. When the subset is every CPU this process may use, it simply runs here. The child
takes its figures with the parent's statistic (``timing.statistic``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from hw_backend.calibration.timing import current_statistic, statistic

T = TypeVar("T")


def _pin(cpus: Sequence[int]) -> None:
    os.sched_setaffinity(0, set(cpus))


def _with_statistic(name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a child process, its figures taken as the parent takes them."""
    with statistic(name):
        return fn(*args)


def run_on_cpus(cpus: Sequence[int], fn: Callable[..., T], *args: Any,
                force_process: bool = False) -> T:
    """``fn(*args)`` with every thread it starts confined to ``cpus`` (Linux; elsewhere here).

    ``fn`` must be a module-level function (it may be pickled to a child process).
    """
    here = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if here is None or (set(cpus) == here and not force_process):
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_pin, initargs=(tuple(cpus),)) as pool:
        return pool.submit(_with_statistic, current_statistic(), fn, *args).result()

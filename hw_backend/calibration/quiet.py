"""Waiting for a quiet moment on a shared machine.

Other people's jobs take cores from pinned benchmark threads and inflate every timing; on a
2-core box a single compile halves a measurement. Slowing them down (nice, real-time priority)
is not ours to do, so calibration and validation can instead wait, before each measurement,
until nothing else is runnable. Linux only (``/proc/stat``); elsewhere it returns at once.
"""

from __future__ import annotations

import time


def procs_running() -> int | None:
    """Runnable tasks on the machine right now (Linux /proc/stat), this process included."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_for_quiet(max_s: float, *, window_s: float = 1.0, limit: float = 1.5) -> float:
    """Wait (up to ``max_s``) until the mean number of runnable tasks over ``window_s`` stays
    below ``limit`` (1 is this process sampling). Returns that mean (NaN where unknown)."""
    deadline = time.monotonic() + max_s
    while True:
        samples = []
        for _ in range(10):
            count = procs_running()
            if count is None:
                return float("nan")
            samples.append(count)
            time.sleep(window_s / 10)
        mean = sum(samples) / len(samples)
        if mean < limit or time.monotonic() >= deadline:
            return mean

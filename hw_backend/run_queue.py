"""How long the calling thread waited for a core: runnable, but another task on its CPU.

On a shared machine the host kernels' wall time stretches with other processes' load while
their CPU time does not; the simulator models the CPU work, not the machine's other tenants.
Linux keeps each thread's run-queue wait in ``/proc/thread-self/schedstat`` (the second of
three numbers, in ns; the first is time on a CPU, the third the count of time slices), so
the executor can say how much of a measured host time was waiting rather than working.
"""

from __future__ import annotations

_SCHEDSTAT = "/proc/thread-self/schedstat"


def parse_wait_s(schedstat: str) -> float:
    """Seconds of run-queue wait in a schedstat line ("<on cpu ns> <waiting ns> <slices>")."""
    fields = schedstat.split()
    if len(fields) < 2:
        raise ValueError(f"schedstat: expected 3 numbers, got {schedstat!r}")
    return int(fields[1]) * 1e-9


def waited_s() -> float | None:
    """The calling thread's run-queue wait so far, or None where the kernel does not say
    (not Linux, or schedstats off)."""
    try:
        with open(_SCHEDSTAT) as f:
            return parse_wait_s(f.read())
    except (OSError, ValueError):
        return None


__all__ = ["parse_wait_s", "waited_s"]

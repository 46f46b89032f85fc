"""Ordered work queues and completion markers, the one vocabulary the executor schedules with.

A CUDA stream runs the kernels put on it in order and an event marks a point in it; the host
side of HybridGen needs the same thing for CPU work. ``WorkerStream`` is that for Python
callables: one thread runs them in submission order, each may wait on markers of other queues
first, and each returns a ``HostMarker`` carrying its result and its start/end times. It backs
the host worker (C kernel calls) and, without CUDA, the stand-in accelerator's compute and copy
queues. The C kernel and torch both release the GIL, so work on different queues truly overlaps.

``Marker`` is what the executor's timing reads: ``elapsed_since`` compares two markers of the
same clock (perf_counter for host markers, CUDA event time for CUDA markers).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

#: GIL hand-off interval while queues run (CPython's default is 5 ms). A queue thread coming
#: back from a C kernel or torch op must re-take the GIL; while another thread runs Python
#: (submitting, merging glue) it waits up to this long, which at the default made a host op
#: next to a Python-busy thread several times slower (figures: docs/calibration.md, history).
GIL_SWITCH_INTERVAL_S = 1e-4


class ResponsiveGil:
    """Holds ``sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)`` while at least one holder is
    open, restoring the previous interval when the last one closes (process-wide setting)."""

    _lock = threading.Lock()
    _holders = 0
    _previous = 0.0

    def __init__(self) -> None:
        self._open = False
        with ResponsiveGil._lock:
            if ResponsiveGil._holders == 0:
                ResponsiveGil._previous = sys.getswitchinterval()
                sys.setswitchinterval(min(GIL_SWITCH_INTERVAL_S, ResponsiveGil._previous))
            ResponsiveGil._holders += 1
            self._open = True

    def close(self) -> None:
        with ResponsiveGil._lock:
            if not self._open:
                return
            self._open = False
            ResponsiveGil._holders -= 1
            if ResponsiveGil._holders == 0:
                sys.setswitchinterval(ResponsiveGil._previous)


class Marker(ABC):
    """A point in some queue's timeline: work before it has finished once it completes."""

    @abstractmethod
    def wait(self) -> None:
        """Block the calling thread until the marked work is done (re-raises its failure)."""

    @abstractmethod
    def duration_s(self) -> float:
        """How long the marked operation itself ran (waiting on its dependencies excluded)."""

    @abstractmethod
    def elapsed_since(self, other: Marker) -> float:
        """End of this marker minus end of ``other``, seconds (both must share a clock)."""


class HostMarker(Marker):
    """Completion of one callable on a ``WorkerStream`` (perf_counter clock)."""

    __slots__ = ("label", "begin_s", "end_s", "value", "error", "_done")

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.begin_s = 0.0
        self.end_s = 0.0
        self.value: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    @staticmethod
    def completed(label: str = "now") -> HostMarker:
        """A marker that is already done, dated now (e.g. the start of a step)."""
        marker = HostMarker(label)
        marker.begin_s = marker.end_s = time.perf_counter()
        marker._done.set()
        return marker

    def finish(self, begin_s: float, value: Any = None, error: BaseException | None = None):
        self.begin_s, self.value, self.error = begin_s, value, error
        self.end_s = time.perf_counter()
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"'{self.label}' failed: {self.error!r}") from self.error

    def result(self) -> Any:
        self.wait()
        return self.value

    def duration_s(self) -> float:
        self.wait()
        return self.end_s - self.begin_s

    def elapsed_since(self, other: Marker) -> float:
        if not isinstance(other, HostMarker):
            raise TypeError("host markers only compare with host markers (different clocks)")
        self.wait()
        other.wait()
        return self.end_s - other.end_s


class WorkerStream:
    """One thread running submitted callables in order, each after the markers it waits on.

    ``cores`` optionally pins the thread (and the OpenMP/torch worker threads it spawns, which
    inherit its affinity) to a set of CPU cores, so host and stand-in device roles can be given
    disjoint cores. A failing callable fails its marker and every marker that waits on it,
    instead of hanging the queue.
    """

    _STOP = object()

    def __init__(
        self, name: str, *, cores: Sequence[int] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cores = tuple(cores) if cores else None
        self._on_start = on_start
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[[], Any], *, after: Iterable[Marker] = (), label: str = ""
    ) -> HostMarker:
        marker = HostMarker(label or self.name)
        self._queue.put((fn, tuple(after), marker))
        return marker

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()

    def _run(self) -> None:
        if self._cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self._cores)  # pid 0: this thread only (Linux)
        if self._on_start is not None:
            self._on_start()
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            fn, after, marker = item
            try:
                for dependency in after:
                    dependency.wait()
            except BaseException as exc:  # a dependency failed: fail this one too
                marker.finish(time.perf_counter(), error=exc)
                continue
            begin = time.perf_counter()
            try:
                value = fn()
            except BaseException as exc:  # surfaced to whoever waits on the marker
                marker.finish(begin, error=exc)
            else:
                marker.finish(begin, value)

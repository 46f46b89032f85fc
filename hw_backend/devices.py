"""The accelerator the executor runs the device half of a plan on: CUDA, or a labelled stand-in.

The executor is written against ``Accelerator``: a compute queue and a copy queue (CUDA streams,
or threads), device buffers, pinned host buffers, and a blocking device-to-host fetch for host
threads. On a machine with CUDA that is torch on the GPU with two streams and timing events.

Without CUDA the accelerator role is played by torch on CPU cores reserved for it
(``StandInAccelerator``, labelled ``cpu-standin (no CUDA)`` everywhere its numbers appear): its
"device" buffers are separate allocations, so transfers are real copies, and its compute and copy
queues are threads, so plan partition, transfers, merges and the feedback loop all run for real,
overlapping with the host side's C kernel. ``CoreSplit`` divides the cores between the roles.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hw_backend.numa import huge_page_tensor
from hw_backend.streams import HostMarker, Marker, WorkerStream

STANDIN_LABEL = "cpu-standin (no CUDA)"
#: Host buffers from this size up get huge pages (the KV cache; small staging buffers do not).
HUGE_PAGE_MIN_BYTES = 2 << 20
AcceleratorKind = Literal["auto", "cuda", "standin"]


@dataclass(frozen=True)
class CoreSplit:
    """How many cores each role gets: torch threads of the stand-in device, C kernel threads.

    ``pin`` also binds each role's threads to its own cores (Linux), so that the two roles do not
    steal each other's cores; without it the OS schedules freely and only thread counts differ.
    """

    device_threads: int
    host_threads: int
    pin: bool = False

    def __post_init__(self) -> None:
        if self.device_threads < 1 or self.host_threads < 1:
            raise ValueError("each role needs at least one thread")

    @staticmethod
    def even(cores: int | None = None, *, pin: bool = False) -> CoreSplit:
        """Half the cores for the stand-in device, the rest for the host (at least one each)."""
        cores = cores or len(available_cores())
        device = max(1, cores // 2)
        return CoreSplit(device, max(1, cores - device), pin)

    def device_cores(self) -> tuple[int, ...] | None:
        return available_cores()[: self.device_threads] if self.pin else None

    def host_cores(self) -> tuple[int, ...] | None:
        if not self.pin:
            return None
        cores = available_cores()
        own = cores[self.device_threads : self.device_threads + self.host_threads]
        return own or cores[-self.host_threads :]


def available_cores() -> tuple[int, ...]:
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def cuda_host_threads() -> int:
    """C-kernel threads next to a CUDA device: every usable core but one.

    The thread that submits the device's work (Python dispatching torch ops) needs a core of
    its own: with the kernel on every core, its queued device work grew with the concurrent host
    scan, for attention the GPU itself runs in microseconds (docs/calibration.md, history).
    """
    return max(1, len(available_cores()) - 1)


# ---------------------------------------------------------------------------- queues
class DeviceQueue(ABC):
    """Ordered device work: ``submit`` enqueues ``fn`` after ``after`` and marks its end."""

    @abstractmethod
    def submit(
        self, fn: Callable[[], Any], *, after: Iterable[Marker] = (), label: str = ""
    ) -> Marker: ...


class StandInQueue(DeviceQueue):
    """A stand-in device queue: a worker thread running torch CPU work in order."""

    def __init__(self, stream: WorkerStream) -> None:
        self.stream = stream

    def submit(self, fn, *, after=(), label=""):
        return self.stream.submit(fn, after=after, label=label)


class CudaMarker(Marker):
    """A pair of CUDA timing events around one operation on a stream."""

    __slots__ = ("begin", "end", "label")

    def __init__(self, begin: torch.cuda.Event, end: torch.cuda.Event, label: str = "") -> None:
        self.begin, self.end, self.label = begin, end, label

    def wait(self) -> None:
        self.end.synchronize()

    def duration_s(self) -> float:
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3

    def elapsed_since(self, other: Marker) -> float:
        if not isinstance(other, CudaMarker):
            raise TypeError("CUDA markers only compare with CUDA markers (different clocks)")
        self.end.synchronize()
        return other.end.elapsed_time(self.end) / 1e3


class EventPool:
    """Timing events reused from step to step: creating two per queue op (a few hundred per
    decode step) is driver work the device would otherwise wait behind. ``recycle`` once
    every marker issued since the last call has been read (the executor's step end)."""

    def __init__(self) -> None:
        self._free: list[torch.cuda.Event] = []
        self._issued: list[torch.cuda.Event] = []

    def take(self) -> torch.cuda.Event:
        event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
        self._issued.append(event)
        return event

    def recycle(self) -> None:
        self._free.extend(self._issued)
        self._issued.clear()


class CudaQueue(DeviceQueue):
    """A CUDA stream. Waiting on host work blocks the enqueuing thread (there is no device-side
    wait on a host thread), so the executor submits such work after the device's own work."""

    def __init__(self, stream: torch.cuda.Stream, events: EventPool | None = None) -> None:
        self.stream = stream
        self.events = events or EventPool()

    def submit(self, fn, *, after=(), label=""):
        for marker in after:
            if isinstance(marker, CudaMarker):
                self.stream.wait_event(marker.end)
            else:
                marker.wait()
        begin = self.events.take()
        end = self.events.take()
        with torch.cuda.stream(self.stream):
            begin.record(self.stream)
            fn()
            end.record(self.stream)
        return CudaMarker(begin, end, label)


# ---------------------------------------------------------------------------- accelerators
class Accelerator(ABC):
    """Where the device half of a plan runs; see the module docstring."""

    label: str
    standin: bool
    device: torch.device
    compute: DeviceQueue
    copy: DeviceQueue

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    @abstractmethod
    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory the copy engine can read and write directly (pinned on CUDA)."""

    @abstractmethod
    def fetch(self, dst: torch.Tensor, src: torch.Tensor, after: Marker) -> None:
        """From a host thread: wait for ``after``, copy device ``src`` into host ``dst``."""

    @abstractmethod
    def synchronize(self) -> None: ...

    def origin(self) -> Marker:
        """A marker at the current end of the compute queue (e.g. a step's start), after
        whatever the caller already computed (``wait_for_caller``)."""
        self.wait_for_caller()
        return self.compute.submit(lambda: None, label="origin")

    def wait_for_caller(self) -> None:  # noqa: B027 - the stand-in's caller is synchronous
        """Make later queue work see tensors the caller produced on its own stream."""

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        """Make a result of the compute queue safe to use (and free) on the caller's stream."""
        return tensor

    def close(self) -> None:  # noqa: B027 - nothing to release by default (CUDA)
        """Release worker threads; the accelerator is unusable afterwards."""

    def recycle_markers(self) -> None:  # noqa: B027 - the stand-in's markers are plain objects
        """Every marker issued so far has been read: its resources may be reused."""

    def __enter__(self) -> Accelerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StandInAccelerator(Accelerator):
    """torch on CPU cores reserved for the device role; labelled a stand-in everywhere."""

    standin = True

    def __init__(self, split: CoreSplit | None = None) -> None:
        self.split = split or CoreSplit.even()
        self.label = STANDIN_LABEL
        self.device = torch.device("cpu")
        # torch's intra-op thread count is process-wide; the device role sets it and the host
        # side uses the C kernel's own threads.
        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.split.device_threads)
        cores = self.split.device_cores()
        self._compute = WorkerStream("standin-compute", cores=cores)
        self._copy = WorkerStream("standin-copy", cores=cores)
        self.compute = StandInQueue(self._compute)
        self.copy = StandInQueue(self._copy)

    def host_empty(self, shape, dtype):
        if math.prod(shape) * dtype.itemsize < HUGE_PAGE_MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        return huge_page_tensor(shape, dtype)  # the KV cache the C kernel streams

    def fetch(self, dst, src, after):
        after.wait()
        dst.copy_(src)

    def synchronize(self) -> None:
        self._compute.submit(lambda: None).wait()
        self._copy.submit(lambda: None).wait()

    def close(self) -> None:
        self._compute.close()
        self._copy.close()
        torch.set_num_threads(self._previous_threads)


class CudaAccelerator(Accelerator):
    """torch on a CUDA device: a compute stream, a host-to-device copy stream, and a
    device-to-host stream for host threads fetching queries and indices."""

    standin = False

    def __init__(self, device: int | str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(self.device)
        self.label = f"{self.device} ({name})"
        self._events = EventPool()
        with torch.cuda.device(self.device):
            self.compute = CudaQueue(torch.cuda.Stream(), self._events)
            self.copy = CudaQueue(torch.cuda.Stream(), self._events)
            self._d2h = torch.cuda.Stream()

    def host_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def wait_for_caller(self) -> None:
        current = torch.cuda.current_stream(self.device)
        self.compute.stream.wait_stream(current)
        self.copy.stream.wait_stream(current)

    def hand_over(self, tensor: torch.Tensor) -> torch.Tensor:
        # The caller's stream reads it; the allocator must not recycle it for our streams early.
        tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor

    def fetch(self, dst, src, after):
        with torch.cuda.stream(self._d2h):
            if isinstance(after, CudaMarker):
                self._d2h.wait_event(after.end)
            else:
                after.wait()
            dst.copy_(src, non_blocking=True)
        self._d2h.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def recycle_markers(self) -> None:
        self._events.recycle()


def device_memory_bytes(accel: Accelerator) -> int:
    """What the device role can allocate: the GPU's memory, or host RAM for the stand-in."""
    if not accel.standin:
        return int(torch.cuda.get_device_properties(accel.device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def limit_device_memory(accel: Accelerator, nbytes: float) -> None:
    """Cap torch's allocations on a CUDA device at ``nbytes`` (an HBM budget, so that the run
    fails like a smaller GPU instead of quietly using the larger one). The stand-in's device
    memory is host RAM shared with everything else; it is not capped."""
    if accel.standin:
        return
    total = device_memory_bytes(accel)
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), accel.device)


def make_accelerator(kind: AcceleratorKind = "auto", split: CoreSplit | None = None) -> Accelerator:
    """CUDA when asked for or available (``auto``), else the CPU stand-in."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA was requested but torch.cuda.is_available() is False")
        return CudaAccelerator()
    if kind not in ("auto", "standin"):
        raise ValueError(f"unknown accelerator kind {kind!r}")
    return StandInAccelerator(split)


__all__ = [
    "STANDIN_LABEL", "Accelerator", "CoreSplit", "CudaAccelerator", "CudaMarker", "CudaQueue",
    "DeviceQueue", "EventPool", "HostMarker", "StandInAccelerator", "StandInQueue", "available_cores",
    "cuda_host_threads", "device_memory_bytes", "limit_device_memory", "make_accelerator",
]

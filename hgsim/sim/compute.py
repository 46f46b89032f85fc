"""Compute engines (GPU streams, CPU core pools) and the pure cost functions behind them.

Costs are pure functions of work and hardware numbers so that they can be checked by hand
and reused by analytic models; the engines only add *queueing*: a GPU stream runs kernels in
launch order (like a CUDA stream), a core pool hands out cores first come, first served.
Engines are independent, so a GPU kernel and a PCIe copy overlap: the pair takes the max of
the two durations, not the sum.
"""

from __future__ import annotations

from collections import deque

from simpy import Environment, Event
from simpy.events import NORMAL, Timeout

from hgsim.sim.recorder import Recorder

# ---------------------------------------------------------------------- pure cost functions


def kernel_time_s(
    flops: float,
    bytes_: float,
    peak_flops: float,
    bandwidth_Bps: float,
    compute_eff: float = 1.0,
    memory_eff: float = 1.0,
    launch_overhead_s: float = 0.0,
) -> float:
    """Roofline: a kernel is bound by its FLOPs or its memory traffic, whichever is slower,
    plus a fixed launch cost (which decode, with its many small kernels, cannot ignore)."""
    compute_s, memory_s = roofline_terms(flops, bytes_, peak_flops, bandwidth_Bps,
                                         compute_eff, memory_eff)
    return launch_overhead_s + max(compute_s, memory_s)


def roofline_terms(
    flops: float,
    bytes_: float,
    peak_flops: float,
    bandwidth_Bps: float,
    compute_eff: float = 1.0,
    memory_eff: float = 1.0,
) -> tuple[float, float]:
    """(compute s, memory s) of a kernel: the larger one is what binds it."""
    compute_s = flops / (peak_flops * compute_eff) if flops else 0.0
    memory_s = bytes_ / (bandwidth_Bps * memory_eff) if bytes_ else 0.0
    return compute_s, memory_s


def transfer_time_s(bytes_: float, bandwidth_Bps: float, latency_s: float = 0.0) -> float:
    """An uncontended copy: the first byte pays the latency, the rest stream at bandwidth."""
    return latency_s + bytes_ / bandwidth_Bps


def cpu_stream_rate_Bps(
    cores: int, core_bandwidth_Bps: float, core_flops: float, flops_per_byte: float
) -> float:
    """Most bytes/s ``cores`` cores can consume in a streaming kernel such as attention over
    KV: each core is limited by what it can load and by how fast it does the arithmetic on
    what it loaded. Shared limits (the memory tier, the links) are applied by the flow
    network on top of this cap."""
    per_core = core_bandwidth_Bps
    if flops_per_byte > 0:
        per_core = min(per_core, core_flops / flops_per_byte)
    return cores * per_core


def cpu_compute_time_s(flops: float, cores: int, core_flops: float) -> float:
    """A compute-bound CPU task spread evenly over ``cores`` cores."""
    return flops / (cores * core_flops)


# ---------------------------------------------------------------------- engines


class Kernel:
    """A kernel launched on a stream; the stream's events fire with it as their value."""

    __slots__ = ("label", "duration_s", "flops", "bytes_", "hbm_s", "start_s", "end_s", "deps",
                 "done")

    def __init__(self, label: str, duration_s: float, flops: float, bytes_: float,
                 hbm_s: float = 0.0) -> None:
        self.label = label
        self.duration_s = duration_s
        self.flops = flops
        self.bytes_ = bytes_
        self.hbm_s = hbm_s  # the last hbm_s seconds of the kernel move its bytes through HBM
        self.start_s = -1.0
        self.end_s = -1.0
        self.deps: list[Event] = []
        self.done: Event | None = None

    def __repr__(self) -> str:
        return f"Kernel({self.label!r}, {self.start_s:g}..{self.end_s:g})"


class ComputeStream:
    """An in-order kernel queue (a CUDA stream): a kernel starts when the previous one ends.

    While no queued kernel waits on an event, the queue is just the time the stream frees up:
    a kernel's start and end are known at launch and it costs one simpy timeout. A kernel with
    ``after=`` events (cudaStreamWaitEvent) blocks the queue behind it; blocked kernels wait in
    a FIFO that is pumped by callbacks when the blocking event fires, so the stream still
    needs no process of its own.

    A stream with an ``hbm`` resource (its GPU's HBM channel) also reports each kernel's
    device-memory traffic there: its bytes, busy for ``hbm_s`` (bytes / the HBM bandwidth the
    kernel achieves, its roofline memory term) at the end of the kernel, after the launch
    cost. This is accounting only; the kernel's duration is what the caller gave.
    """

    def __init__(self, env: Environment, name: str, recorder: Recorder | None = None,
                 hbm: str | None = None) -> None:
        self.env = env
        self.name = name
        self.hbm = hbm
        self.recorder = recorder if recorder is not None else Recorder(keep_activities=False)
        self.launched = 0
        self._free_at = 0.0
        self._blocked: deque[Kernel] = deque()  # kernels whose start is not known yet
        self._on_done_cb = self._on_done
        self._pump_cb = self._pump

    @property
    def free_at(self) -> float:
        """When the work whose start is known ends (blocked kernels come after)."""
        return self._free_at

    def launch(
        self,
        duration_s: float,
        label: str = "",
        flops: float = 0.0,
        bytes_: float = 0.0,
        *,
        after: Event | list[Event] | tuple[Event, ...] = (),
        hbm_s: float = 0.0,
    ) -> Event:
        """Queue a kernel of ``duration_s`` that also waits for ``after``; the returned event
        fires with its :class:`Kernel` when it ends. ``hbm_s``: the seconds its ``bytes_``
        keep HBM busy (the roofline memory term, at most ``duration_s``)."""
        if duration_s < 0:
            raise ValueError(f"kernel {label!r}: duration must be >= 0, got {duration_s}")
        if not 0.0 <= hbm_s <= duration_s:
            raise ValueError(f"kernel {label!r}: hbm_s must be in [0, duration {duration_s}], "
                             f"got {hbm_s}")
        self.launched += 1
        kernel = Kernel(label, duration_s, flops, bytes_, hbm_s)
        if isinstance(after, Event):
            after = (after,)
        deps = [e for e in after if e.callbacks is not None]  # not yet processed
        if not self._blocked and not deps:
            now = self.env.now
            start = self._free_at if self._free_at > now else now
            kernel.start_s = start
            kernel.end_s = self._free_at = start + duration_s
            event = Timeout(self.env, kernel.end_s - now, kernel)
            event.callbacks.append(self._on_done_cb)
            return event
        kernel.deps = deps
        kernel.done = done = Event(self.env)
        done.callbacks.append(self._on_done_cb)  # first, so the record precedes any waiter
        self._blocked.append(kernel)
        if len(self._blocked) == 1:
            self._pump()
        return kernel.done

    def _pump(self, _event: Event | None = None) -> None:
        """Start (i.e. time) blocked kernels in order until one still waits on an event."""
        blocked, env = self._blocked, self.env
        while blocked:
            kernel = blocked[0]
            deps = kernel.deps
            while deps and deps[-1].callbacks is None:
                deps.pop()
            if deps:
                deps[-1].callbacks.append(self._pump_cb)
                return
            blocked.popleft()
            now = env.now
            start = self._free_at if self._free_at > now else now
            kernel.start_s = start
            kernel.end_s = self._free_at = start + kernel.duration_s
            # Now that its end is known, trigger the kernel's own event at that time, as a
            # Timeout would: one simpy event per kernel instead of a timeout plus a relay.
            done = kernel.done
            done._ok = True
            done._value = kernel
            env.schedule(done, NORMAL, kernel.end_s - now)

    def _on_done(self, event: Event) -> None:
        self._record(event._value)

    def _record(self, k: Kernel) -> None:
        recorder = self.recorder
        recorder.record(self.name, k.start_s, k.end_s, k.bytes_, k.flops, k.label, "kernel")
        if self.hbm is not None and k.bytes_ > 0:
            recorder.record(self.hbm, k.end_s - k.hbm_s, k.end_s, k.bytes_, 0.0, k.label,
                            "kernel")


class CpuTask:
    """Work that held ``cores`` cores of a pool over ``[start_s, end_s]``."""

    __slots__ = ("label", "cores", "duration_s", "flops", "start_s", "end_s")

    def __init__(self, label: str, cores: int, duration_s: float, flops: float) -> None:
        self.label = label
        self.cores = cores
        self.duration_s = duration_s
        self.flops = flops
        self.start_s = -1.0
        self.end_s = -1.0


class CpuCorePool:
    """The cores of one socket, handed out first come, first served (no oversubscription).

    A task asks for n cores and holds them until it ends; a request that does not fit waits,
    and so do the requests behind it (FIFO, like a thread pool with a work queue). Memory-
    bound CPU work should hold cores here *and* run as a flow on the flow network so that
    it shares memory bandwidth with transfers (see ``Machine.cpu_attention``).
    """

    def __init__(self, env: Environment, name: str, cores: int, recorder: Recorder | None = None) -> None:
        if cores < 1:
            raise ValueError(f"core pool {name}: cores must be >= 1, got {cores}")
        self.env = env
        self.name = name
        self.cores = cores
        self.recorder = recorder if recorder is not None else Recorder(keep_activities=False)
        self._free = cores
        self._waiters: deque[tuple[int, Event]] = deque()
        self._since = env.now  # when the number of held cores last changed

    @property
    def free(self) -> int:
        return self._free

    @property
    def in_use(self) -> int:
        return self.cores - self._free

    def acquire(self, cores: int) -> Event:
        """An event that fires once ``cores`` cores are held by the caller."""
        if not 1 <= cores <= self.cores:
            raise ValueError(f"core pool {self.name}: asked for {cores} of {self.cores} cores")
        event = Event(self.env)
        if not self._waiters and self._free >= cores:
            self._take(cores)
            event.succeed(cores)
        else:
            self._waiters.append((cores, event))
        return event

    def _held_until_now(self) -> None:
        """Report the core-seconds held since the last change (the CPU energy's activity)."""
        now = self.env.now
        held = self.cores - self._free
        if held and now > self._since:
            self.recorder.add_core_seconds(self.name, held * (now - self._since))
        self._since = now

    def release(self, cores: int) -> None:
        self._held_until_now()
        self._free += cores
        if self._free > self.cores:
            raise RuntimeError(f"core pool {self.name}: released more cores than were taken")
        self.recorder.counter(self.name, self.env.now, self.cores - self._free)
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._free:
            cores, event = waiters.popleft()
            self._take(cores)
            event.succeed(cores)

    def _take(self, cores: int) -> None:
        self._held_until_now()
        self._free -= cores
        self.recorder.counter(self.name, self.env.now, self.cores - self._free)

    def run(self, cores: int, duration_s: float, label: str = "", flops: float = 0.0) -> Event:
        """Hold ``cores`` cores for ``duration_s`` (after waiting for them); fires with the
        :class:`CpuTask`."""
        if duration_s < 0:
            raise ValueError(f"cpu task {label!r}: duration must be >= 0, got {duration_s}")
        return self.env.process(self._run(CpuTask(label, cores, duration_s, flops)))

    def _run(self, task: CpuTask):
        yield self.acquire(task.cores)
        task.start_s = self.env.now
        yield Timeout(self.env, task.duration_s)
        task.end_s = self.env.now
        self.release(task.cores)
        self.recorder.record(self.name, task.start_s, task.end_s, 0.0, task.flops, task.label, "cpu")
        return task

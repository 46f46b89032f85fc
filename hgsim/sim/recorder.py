"""Activity records and the per-resource summaries built from them.

Every simulated resource (a PCIe direction, a compute stream, a memory tier, a core pool)
reports what it did here: ``(resource, start, end, bytes, FLOPs, label)``. Two modes:

* full (``keep_activities=True``): every :class:`Activity` is kept, so a Perfetto trace can be
  written and any window can be queried;
* aggregate (``keep_activities=False``): only per-resource counters, for big sweeps where the
  allocation of an Activity per event would dominate the run time.

Both modes keep the same counters, so summaries never depend on the mode. Busy time is the
*union* of a resource's intervals: two flows sharing a link for the same second make it busy
for one second, not two. The union is maintained incrementally; records arrive at their end
time (simulated time only moves forward), so a new interval can only merge with the tail of
the sorted interval list, which makes each insertion amortised O(1).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

DEVICE_KINDS = ("gpu", "socket", "tier", "link", "other")


@dataclass(slots=True, frozen=True)
class Activity:
    """One thing a resource did over ``[start, end]`` (seconds of simulated time)."""

    resource: str
    start: float
    end: float
    bytes_: float = 0.0
    flops: float = 0.0
    label: str = ""
    category: str = ""

    @property
    def duration_s(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class ResourceInfo:
    """Where a resource is drawn in a trace: the device (process) it belongs to."""

    device: str
    device_kind: str = "other"
    unit: str = ""


@dataclass(slots=True)
class ResourceTotals:
    """Counters for one resource; ``starts``/``ends`` hold its busy union as disjoint,
    sorted intervals (only those after the compaction horizon)."""

    count: int = 0
    bytes_: float = 0.0
    flops: float = 0.0
    busy_s: float = 0.0  # length of the whole union, compacted part included
    # What actually crossed the resource, in its own unit: a flow spread over several tiers
    # counts in full in ``bytes_`` of each but only its share here (amount x the flow's use
    # of the channel). Energy is charged on this (hgsim/energy.py).
    carried: float = 0.0
    core_s: float = 0.0  # a core pool: core-seconds its cores were held
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    compacted_until: float = float("-inf")
    # ``carried`` is in bytes (a bandwidth channel, a kernel stream); False for a FLOP/s
    # channel or an in-flight pool, which carry FLOPs or byte-seconds
    carries_bytes: bool = True

    @property
    def moved_bytes(self) -> float:
        """Bytes that crossed the resource: a bandwidth channel's share of each flow (a read
        spread over two tiers moves half its bytes through each), else the flows' amounts
        (the bytes a socket's cores or copy engines issued)."""
        return self.carried if self.carries_bytes else self.bytes_

    def add_interval(self, start: float, end: float) -> None:
        if end <= start:
            return
        starts, ends = self.starts, self.ends
        if not ends or start > ends[-1]:
            starts.append(start)
            ends.append(end)
            self.busy_s += end - start
            return
        if end >= ends[-1]:  # the usual case: merge with a tail of the list
            lo = start
            removed = 0.0
            while ends and ends[-1] >= lo:
                s = starts.pop()
                removed += ends.pop() - s
                if s < lo:
                    lo = s
            starts.append(lo)
            ends.append(end)
            self.busy_s += (end - lo) - removed
            return
        # A record that ends before an earlier one: general insertion.
        i = bisect_left(ends, start)
        j = bisect_right(starts, end)
        if i >= j:
            starts.insert(i, start)
            ends.insert(i, end)
            self.busy_s += end - start
            return
        lo, hi = min(start, starts[i]), max(end, ends[j - 1])
        removed = sum(ends[k] - starts[k] for k in range(i, j))
        starts[i:j] = [lo]
        ends[i:j] = [hi]
        self.busy_s += (hi - lo) - removed

    def busy_between(self, start: float, end: float) -> float:
        if start < self.compacted_until:
            raise ValueError(
                f"busy time before {self.compacted_until} s was compacted away; "
                "query a later window or keep intervals (do not call compact)"
            )
        starts, ends = self.starts, self.ends
        total = 0.0
        for k in range(bisect_left(ends, start), len(ends)):
            s = starts[k]
            if s >= end:
                break
            total += min(ends[k], end) - max(s, start)
        return total

    def compact(self, before_s: float) -> None:
        """Forget intervals that end before ``before_s`` (their length stays in busy_s)."""
        k = bisect_right(self.ends, before_s)
        if k:
            del self.starts[:k]
            del self.ends[:k]
        self.compacted_until = max(self.compacted_until, before_s)


@dataclass(slots=True, frozen=True)
class ResourceSummary:
    resource: str
    count: int
    busy_s: float
    bytes_: float  # what crossed it (``ResourceTotals.moved_bytes``)
    flops: float
    utilisation: float  # busy_s / window length


class Recorder:
    """Collects activities (full mode) and per-resource counters (always)."""

    __slots__ = ("keep_activities", "activities", "counters", "totals", "resources")

    def __init__(self, *, keep_activities: bool = True) -> None:
        self.keep_activities = keep_activities
        self.activities: list[Activity] = []
        # (name, time_s, value) samples for trace counter tracks; full mode only.
        self.counters: list[tuple[str, float, float]] = []
        self.totals: dict[str, ResourceTotals] = {}
        self.resources: dict[str, ResourceInfo] = {}

    # ------------------------------------------------------------------ recording
    def declare(self, resource: str, device: str, device_kind: str = "other", unit: str = "") -> None:
        """Name the device a resource belongs to (one trace process per device)."""
        self.resources[resource] = ResourceInfo(device, device_kind, unit)
        self.totals.setdefault(resource, ResourceTotals())

    def record(
        self,
        resource: str,
        start: float,
        end: float,
        bytes_: float = 0.0,
        flops: float = 0.0,
        label: str = "",
        category: str = "",
    ) -> None:
        """One activity: kept (full mode) and added to the resource's totals."""
        self.add_busy(resource, start, end, 1, bytes_, flops)
        if self.keep_activities:
            self.activities.append(Activity(resource, start, end, bytes_, flops, label, category))

    def log(
        self,
        resource: str,
        start: float,
        end: float,
        bytes_: float = 0.0,
        flops: float = 0.0,
        label: str = "",
        category: str = "",
    ) -> None:
        """Keep an activity for the trace only; for sources that report totals themselves
        through :meth:`add_busy` (the flow network reports a link's busy periods, not every
        flow, which is cheaper and gives the same union)."""
        if self.keep_activities:
            self.activities.append(Activity(resource, start, end, bytes_, flops, label, category))

    def totals_for(self, resource: str) -> ResourceTotals:
        """The live totals of ``resource`` (created empty), for sources that update them in
        place on their hot path (see ``ResourceTotals.add_interval``)."""
        totals = self.totals.get(resource)
        if totals is None:
            totals = self.totals[resource] = ResourceTotals()
        return totals

    def add_busy(
        self,
        resource: str,
        start: float,
        end: float,
        count: int = 1,
        bytes_: float = 0.0,
        flops: float = 0.0,
    ) -> None:
        """Add to a resource's totals: ``count`` activities moving ``bytes_``/doing ``flops``,
        and ``[start, end]`` to its busy union."""
        totals = self.totals.get(resource)
        if totals is None:
            totals = self.totals[resource] = ResourceTotals()
        totals.count += count
        totals.bytes_ += bytes_
        totals.carried += bytes_
        totals.flops += flops
        ends = totals.ends
        if ends and start > ends[-1] and end > start:  # the usual case, inlined: a new interval
            totals.starts.append(start)
            ends.append(end)
            totals.busy_s += end - start
        else:
            totals.add_interval(start, end)

    def add_core_seconds(self, resource: str, core_s: float) -> None:
        """Core-seconds a core pool's cores were held (the CPU's active energy follows it)."""
        self.totals_for(resource).core_s += core_s

    def snapshot(self) -> dict[str, tuple[float, float, float]]:
        """Per resource (carried, FLOPs, core-seconds) so far: subtract two snapshots for what
        happened in between (e.g. the decode after a prefill)."""
        return {name: (t.carried, t.flops, t.core_s) for name, t in self.totals.items()}

    def counter(self, name: str, time_s: float, value: float) -> None:
        """A sample of a counter track (e.g. active flows on a link); dropped in aggregate mode."""
        if self.keep_activities:
            self.counters.append((name, time_s, value))

    def compact(self, before_s: float) -> None:
        """Bound memory in long aggregate runs: call when no activity that is still in flight
        started before ``before_s`` (e.g. between decode steps). Windowed queries before that
        time are then refused; totals stay exact."""
        for totals in self.totals.values():
            totals.compact(before_s)

    # ------------------------------------------------------------------ summaries
    def busy_time(self, resource: str, start: float | None = None, end: float | None = None) -> float:
        """Seconds during which ``resource`` had at least one activity (union of intervals)."""
        totals = self.totals.get(resource)
        if totals is None:
            return 0.0
        if start is None and end is None:
            return totals.busy_s
        return totals.busy_between(
            float("-inf") if start is None else start, float("inf") if end is None else end
        )

    def bytes_moved(self, resource: str) -> float:
        totals = self.totals.get(resource)
        return totals.moved_bytes if totals else 0.0

    def bytes_by_resource(self) -> dict[str, float]:
        """Bytes each resource has moved so far (``ResourceTotals.moved_bytes``): subtract
        two of these for what moved in between (e.g. the decode after a prefill)."""
        return {name: t.moved_bytes for name, t in self.totals.items()}

    def flops_done(self, resource: str) -> float:
        totals = self.totals.get(resource)
        return totals.flops if totals else 0.0

    def utilisation(self, resource: str, start: float, end: float) -> float:
        """Busy fraction of the window ``[start, end]``."""
        if end <= start:
            raise ValueError("utilisation window must have end > start")
        return self.busy_time(resource, start, end) / (end - start)

    utilization = utilisation

    def span(self) -> tuple[float, float]:
        """Earliest start and latest end over all resources (0, 0 when nothing happened)."""
        firsts = [t.starts[0] for t in self.totals.values() if t.starts]
        lasts = [t.ends[-1] for t in self.totals.values() if t.ends]
        if not lasts:
            return 0.0, 0.0
        return min(firsts), max(lasts)

    def summary(self, window: tuple[float, float] | None = None) -> dict[str, ResourceSummary]:
        """Per-resource totals; utilisation over ``window`` (default: the whole span)."""
        t0, t1 = window if window is not None else self.span()
        length = t1 - t0
        out = {}
        for name, totals in self.totals.items():
            busy = totals.busy_s if window is None else totals.busy_between(t0, t1)
            out[name] = ResourceSummary(
                name, totals.count, busy, totals.moved_bytes, totals.flops,
                busy / length if length > 0 else 0.0,
            )
        return out

    def info(self, resource: str) -> ResourceInfo:
        """Declared device of a resource, or one guessed from its name (``gpu0.h2d`` -> gpu0)."""
        known = self.resources.get(resource)
        if known is not None:
            return known
        device = resource.replace(":", ".").split(".", 1)[0]
        return ResourceInfo(device, "other")

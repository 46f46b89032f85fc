"""Bandwidth shared among concurrent transfers: channels, flows and max-min fair rates.

Hardware links are not FIFO queues: when a second DMA starts on a PCIe link, both continue at
about half speed. The model is *processor sharing* generalised to paths: a flow crosses a list
of channels (e.g. CXL tier read -> CXL link -> UPI -> PCIe) and gets the max-min fair rate
(progressive filling): every flow's rate is raised together until a channel saturates or a
flow hits its own cap (``max_rate``, e.g. what n CPU cores can stream); those flows freeze
and the rest continue. A lone flow therefore runs at the slowest hop of its path, and a flow
that is throttled elsewhere leaves its unused share to the others.

Time of one transfer = ``latency_s`` (no bandwidth held) + the time to drain ``amount`` at the
rate allocated, which changes whenever another flow on a connected channel starts or ends.

Event economy (a 70B, 128k-context decode simulation moves ~10^5 flows, so this matters):

* rates only change when a flow starts or finishes, so each flow keeps ``remaining`` and the
  time it was last advanced; a change re-solves only the *connected component* of channels
  and flows it touches (max-min allocations of disjoint components are independent);
* projected finishes sit in a heap; entries made stale by a later change are recognised by a
  version number. One simpy timeout is pending for the earliest finish; when a change brings
  that finish forward a new one is added, and the old one, when it fires, finds nothing due
  and just looks again, so no process is ever interrupted;
* flows issued at the same time with the same latency start together (one timeout, one
  re-solve), zero-latency ones included;
* rates depend only on the paths, weights and caps of the flows in a component, and decode
  repeats the same few contention patterns thousands of times, so solutions are memoised;
* a channel reports its *busy periods* to the recorder (plus flow counts and bytes), not
  every flow: the same busy union for fewer records; per-flow activities are only kept for
  traces (full recording mode).

Units: a channel's ``capacity`` is per second in its ``unit``: ``"B/s"`` (links, tiers) or
``"FLOP/s"`` (CPU attention throughput); or, for an *in-flight pool*, plain bytes (``"B"``). A
flow's ``amount`` is bytes; on a FLOP/s channel it uses ``flops / amount`` FLOP/s per byte/s
(so KV streamed through CPU cores is limited both by memory bandwidth and by how fast the cores
can do the dot products). A flow may also carry explicit ``weights`` (a read spread over several
tiers uses each tier's channel for its fraction of the bytes).

Memory-level parallelism (``hgsim.memory``): an in-flight pool is what an issuer keeps
outstanding (the cores of a socket, a GPU copy engine). A flow crossing it uses ``latency``
bytes of it per byte/s of rate, so the pool caps the flow at bytes in flight / latency
(Little's law), shared among the flows of that issuer. The latency is the route's idle latency
(the flow's weight on the pool) plus the queueing delay of every loaded tier it reads: a read
channel with ``queue_s`` > 0 adds ``queue_s x u / (1 - u)`` at utilisation u. Rates and
utilisations depend on each other, so a component with such a channel is solved as a fixed
point (one bracketed root per loaded channel, Gauss-Seidel across channels); a saturated tier
is then slower for every reader of it, as loaded-latency measurements show.

Every flow also records what bound its rate, over time (``binds``: label -> seconds): the
channel it shared fairly (``"ddr0 read"``), its own cap (its ``cap_label``), or its issuer's
in-flight pool, reported as the latency it is paying for (``"cxl0 latency"``) unless the tier
is loaded enough that its bandwidth moves the rate more than its idle latency does (then the
tier's bandwidth binds).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from itertools import count
from math import inf

from simpy import Environment, Event
from simpy.events import Timeout

from hgsim.sim.recorder import Recorder, ResourceTotals

BYTES_PER_S = "B/s"
FLOPS_PER_S = "FLOP/s"
INFLIGHT_BYTES = "B"  # capacity of an in-flight pool; a flow's weight on it is a latency (s)

_DONE_REL = 1e-9  # a flow with less than this fraction of its amount left is finished
_TIME_REL = 1e-12  # finish times this close to now (relative, >= 1 s scale) are "now"
_SHARE_REL = 1e-12  # channels within this of the tightest share saturate together
_FILL_MEMO = 4096  # distinct contention patterns remembered
_U_TOL = 1e-12  # utilisation tolerance of the loaded-latency fixed point
_U_MAX = 1.0 - 1e-12
_SWEEPS = 50  # Gauss-Seidel sweeps across loaded channels
_MAX_HOPS = 16
_ONES = [(1.0,) * n for n in range(_MAX_HOPS)]


class Channel:
    """A bandwidth resource shared by the flows crossing it (``capacity`` in ``unit``).

    The capacity is fixed once flows have used the channel (allocations are memoised), and a
    channel belongs to one network (it reports to that network's recorder).
    """

    __slots__ = ("name", "capacity", "unit", "flows", "busy_since", "totals", "queue_s",
                 "bind_label", "_rc", "_w", "_n")

    def __init__(self, name: str, capacity: float, *, unit: str = BYTES_PER_S,
                 queue_s: float = 0.0, bind_label: str | None = None) -> None:
        if not capacity > 0:
            raise ValueError(f"channel {name}: capacity must be > 0, got {capacity}")
        if unit not in (BYTES_PER_S, FLOPS_PER_S, INFLIGHT_BYTES):
            raise ValueError(f"channel {name}: unit must be {BYTES_PER_S}, {FLOPS_PER_S} or "
                             f"{INFLIGHT_BYTES}")
        if queue_s < 0 or (queue_s and unit != BYTES_PER_S):
            raise ValueError(f"channel {name}: queue_s must be >= 0, on a B/s channel")
        self.name = name
        self.capacity = float(capacity)
        # the hot path compares units with `is`
        self.unit = {FLOPS_PER_S: FLOPS_PER_S, INFLIGHT_BYTES: INFLIGHT_BYTES}.get(unit,
                                                                                BYTES_PER_S)
        self.queue_s = float(queue_s)  # queueing delay at half load (loaded latency), seconds
        self.bind_label = bind_label or name  # how a flow bound here names what binds it
        self.flows: dict[Flow, float] = {}  # draining flows -> their use per unit of rate
        self.busy_since = 0.0  # start of the busy period in progress
        self.totals: ResourceTotals | None = None  # the recorder's, once a network uses it
        self._rc = 0.0  # scratch for the allocator: capacity left
        self._w = 0.0  # scratch: summed weights of flows not yet frozen
        self._n = 0  # scratch: number of flows not yet frozen

    @property
    def load(self) -> float:
        """Current use in ``unit`` (sum of weighted rates of the flows crossing it)."""
        return sum(f.rate * w for f, w in self.flows.items())

    def __repr__(self) -> str:
        return f"Channel({self.name!r}, {self.capacity:g} {self.unit})"


class Flow:
    """One transfer in flight. Times are simulated seconds; ``rate`` is bytes/s."""

    __slots__ = (
        "path", "weights", "amount", "remaining", "rate", "max_rate", "t_last", "version",
        "done", "label", "flops", "track", "issued_s", "start_s", "end_s", "_new",
        "pool", "loaded", "cap_label", "latency_label", "bind", "bind_since", "binds",
        "_wcur", "_bindc", "_key",
    )

    def __init__(self, path, weights, amount, max_rate, done, label, flops, track, now,
                 cap_label="cap", latency_label=None):
        self.path: tuple[Channel, ...] = path
        self.weights: tuple[float, ...] = weights  # base use of each channel per byte/s
        self._wcur = weights  # current use (a pool's weight grows with queueing)
        # index of the issuer's in-flight pool in the path (-1: none), and whether the flow
        # reads a tier with loaded latency through it (then its cap is a fixed point)
        pool, queued = -1, False  # one plain loop: a flow is created per transfer
        for i, c in enumerate(path):
            if pool < 0 and c.unit is INFLIGHT_BYTES:
                pool = i
            if c.queue_s > 0:
                queued = True
        self.pool = pool
        self.loaded = pool >= 0 and queued
        self.cap_label = cap_label
        self.latency_label = latency_label
        self.bind = ""  # what binds its rate now
        self.bind_since = now
        self.binds: dict[str, float] = {}  # label -> seconds it bound the rate
        self._bindc = None
        self.amount: float = amount
        self.remaining: float = amount
        self.rate = 0.0
        self.max_rate: float = max_rate
        self.t_last = now
        self.version = 0
        self.done: Event = done
        self.label: str = label
        self.flops: float = flops
        self.track: str | None = track
        self.issued_s: float = now
        self.start_s = -1.0  # when bytes start to move (after the latency)
        self.end_s = -1.0
        # what its rate depends on (the allocation memo's key), fixed at creation; built once
        # here rather than at every re-solve of its component
        self._key = (path, weights, max_rate, cap_label, latency_label)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.issued_s

    def set_bind(self, label: str, now: float) -> None:
        if label != self.bind:
            if self.bind:
                self.binds[self.bind] = self.binds.get(self.bind, 0.0) + now - self.bind_since
            self.bind = label
            self.bind_since = now

    def bound_by(self) -> str:
        """What bound the flow for most of its draining time (its current binding if none)."""
        return max(self.binds, key=self.binds.__getitem__) if self.binds else self.bind

    def __repr__(self) -> str:
        return f"Flow({self.label!r}, {self.amount:g} B, rate={self.rate:g})"


class FlowNetwork:
    """Owns the channels' active flows and re-solves max-min fair rates on every change."""

    def __init__(self, env: Environment, recorder: Recorder | None = None) -> None:
        self.env = env
        self.recorder = recorder if recorder is not None else Recorder(keep_activities=False)
        self.channels: dict[str, Channel] = {}
        self.active = 0  # flows currently draining
        self.completed = 0
        self._heap: list[tuple[float, int, int, Flow]] = []  # (finish, seq, version, flow)
        self._seq = count()
        self._wakes: list[float] = []  # times of the pending wake-up timeouts (a heap)
        self._starts: dict[float, list[Flow]] = {}  # start time -> flows waiting out latency
        self._fills: dict[tuple, tuple[float, ...]] = {}  # memo of max-min solutions
        self._plain: set[tuple[Channel, ...]] = set()  # routes known to be bytes-only
        self._explicit: dict[tuple, tuple] = {}  # checked (path, weights) of weighted flows
        self._on_wake_cb = self._on_wake
        self._on_start_cb = self._on_start

    def add_channel(self, name: str, capacity: float, *, unit: str = BYTES_PER_S,
                    queue_s: float = 0.0, bind_label: str | None = None) -> Channel:
        if name in self.channels:
            raise ValueError(f"channel {name!r} already exists")
        channel = self.channels[name] = Channel(name, capacity, unit=unit, queue_s=queue_s,
                                                bind_label=bind_label)
        return channel

    # ------------------------------------------------------------------ public API
    def transfer(
        self,
        path: Sequence[Channel],
        amount: float,
        *,
        latency_s: float = 0.0,
        label: str = "",
        max_rate: float | None = None,
        flops: float = 0.0,
        track: str | None = None,
        weights: Sequence[float] | None = None,
        cap_label: str = "cap",
        latency_label: str | None = None,
    ) -> Event:
        """Move ``amount`` bytes across ``path``; the returned event fires with the
        :class:`Flow` when the last byte arrives (``latency_s`` + draining time).

        ``weights`` (one per channel) replaces the default use of each channel per byte/s (1,
        or FLOPs per byte on a FLOP/s channel); a path with an in-flight pool needs them, the
        pool's weight being the route's idle latency in seconds. ``cap_label`` and
        ``latency_label`` name what binds the flow when its ``max_rate`` or its pool does.
        """
        if amount < 0 or latency_s < 0 or (max_rate is not None and not max_rate > 0):
            raise ValueError(
                f"transfer {label!r}: need amount >= 0, latency_s >= 0 and max_rate > 0 "
                f"(got {amount}, {latency_s}, {max_rate})"
            )
        env = self.env
        if weights is not None:
            key = (path, weights) if type(path) is tuple and type(weights) is tuple else None
            hit = self._explicit.get(key) if key is not None else None
            if hit is None:
                hit = _explicit(path, weights, label)
                self._register(hit[0])
                if key is not None and len(self._explicit) < _FILL_MEMO:
                    self._explicit[key] = hit
            channels, weights = hit
        elif type(path) is tuple and flops == 0.0 and path in self._plain:
            channels, weights = path, _ONES[len(path)]  # a route seen before: bytes only
        else:
            channels, weights = _weighted(path, amount, flops, label)
            self._register(channels)
            if type(path) is tuple and channels == path and weights is _ONES[len(path)]:
                self._plain.add(path)
        done = Event(env)
        now = env.now
        flow = Flow(channels, weights, float(amount), inf if max_rate is None else max_rate,
                    done, label, flops, track, now, cap_label, latency_label)
        t_start = now + latency_s  # exactly the time simpy will reach (same addition)
        batch = self._starts.get(t_start)
        if batch is None:
            self._starts[t_start] = [flow]
            Timeout(env, latency_s, t_start).callbacks.append(self._on_start_cb)
        else:
            batch.append(flow)
        return done

    # ------------------------------------------------------------------ internals
    def _register(self, channels: Sequence[Channel]) -> None:
        for c in channels:
            if c.totals is None:  # a channel reports to the first network that uses it
                c.totals = self.recorder.totals_for(c.name)
                c.totals.carries_bytes = c.unit is BYTES_PER_S

    def _on_start(self, event: Timeout) -> None:
        """Flows whose latency has elapsed join their channels; one re-solve for all."""
        flows = self._starts.pop(event._value)
        now = self.env.now
        seeds: list[Channel] = []
        new: list[Flow] = []
        shared = False  # does any flow find company on a channel?
        for f in flows:
            f.start_s = f.t_last = now
            if f.amount <= 0 or (not f.path and f.max_rate == inf):
                f.end_s = now  # nothing to move: done after the latency alone
                self._report_empty(f)
                f.done.succeed(f)
                continue
            new.append(f)
            for c, w in zip(f.path, f.weights, strict=True):
                cflows = c.flows
                if cflows:
                    shared = True
                else:
                    c.busy_since = now
                cflows[f] = w
                seeds.append(c)
        if not new:
            return
        self.active += len(new)
        heap = self._heap
        if shared or len(new) > 1 or new[0].loaded:
            self._reallocate(seeds, new)
        else:  # alone: the slowest hop or the flow's own cap
            flow = new[0]
            rate = flow.max_rate
            bound = None
            for c, w in zip(flow.path, flow.weights, strict=True):
                r = c.capacity / w
                if r < rate:
                    rate, bound = r, c
            flow.rate = rate
            flow.version = 1
            flow.set_bind(_label(flow, bound, None), now)
            heapq.heappush(heap, (now + flow.amount / rate, next(self._seq), 1, flow))
        recorder = self.recorder
        if recorder.keep_activities:
            for f in new:
                for c in f.path:
                    recorder.counter(c.name, now, len(c.flows))
        self._wake_for_next_finish(now)

    def _on_wake(self, _event: Timeout) -> None:
        """Finish every flow that is done, re-solve the rates of those left behind, and
        wake up again for the next finish."""
        heapq.heappop(self._wakes)  # this one (the earliest pending)
        now = self.env.now
        limit = now + _TIME_REL * (now if now > 1.0 else 1.0)
        heap = self._heap
        due: list[Flow] = []
        while heap:
            t, _, version, f = heap[0]
            if version != f.version or f.end_s >= 0:
                heapq.heappop(heap)  # stale
            elif t <= limit or f.remaining - f.rate * (now - f.t_last) <= _DONE_REL * f.amount:
                heapq.heappop(heap)
                due.append(f)
            else:
                break
        if due:
            recorder = self.recorder
            keep = recorder.keep_activities
            seeds: list[Channel] = []
            for f in due:
                f.remaining = 0.0
                f.end_s = now
                f.set_bind("", now)  # closes the account of what bound it last
                amount = f.amount
                for c, w in zip(f.path, f.weights, strict=True):
                    cflows = c.flows
                    del cflows[f]
                    totals = c.totals
                    totals.count += 1
                    totals.bytes_ += amount
                    totals.carried += amount * w
                    if c.unit is FLOPS_PER_S:
                        totals.flops += f.flops
                    if keep:
                        self._log(f, c, w)
                    if cflows:
                        seeds.append(c)
                    else:  # the channel goes idle: its busy period joins the union
                        since, ends = c.busy_since, totals.ends
                        if ends and since <= ends[-1] or now <= since:
                            totals.add_interval(since, now)
                        else:
                            totals.starts.append(since)
                            ends.append(now)
                            totals.busy_s += now - since
                if f.track is not None:
                    recorder.record(f.track, f.issued_s, now, amount, f.flops, f.label, "transfer")
            self.active -= len(due)
            self.completed += len(due)
            if seeds:  # someone is left to speed up
                self._reallocate(seeds)
            for f in due:
                f.done.succeed(f)
        self._wake_for_next_finish(now)

    def _wake_for_next_finish(self, now: float) -> None:
        """Drop stale heap entries and make sure a wake-up is pending for the earliest finish
        (one Timeout per distinct finish time, however many flows share it)."""
        heap = self._heap
        while heap:
            _, _, version, f = heap[0]
            if version == f.version and f.end_s < 0:
                break
            heapq.heappop(heap)
        else:
            return
        t = heap[0][0]
        wakes = self._wakes
        if not wakes or wakes[0] > t:
            heapq.heappush(wakes, t)
            Timeout(self.env, t - now if t > now else 0.0).callbacks.append(self._on_wake_cb)

    def _log(self, f: Flow, c: Channel, w: float) -> None:
        """Full mode: the flow's activity on one channel (``w``: its use per byte/s), and the
        channel's flow count. A bandwidth channel's slice holds the bytes that crossed it (a
        read spread over two tiers puts its share on each), so a trace adds up to what the
        channel moved (``ResourceTotals.moved_bytes``); a FLOP/s or in-flight channel's holds
        the flow's amount, as its totals do."""
        recorder = self.recorder
        if c.unit is FLOPS_PER_S:
            recorder.log(c.name, f.start_s, f.end_s, f.amount, f.flops, f.label, "compute")
        else:
            moved = f.amount * w if c.unit is BYTES_PER_S else f.amount
            recorder.log(c.name, f.start_s, f.end_s, moved, 0.0, f.label, "transfer")
        recorder.counter(c.name, f.end_s, len(c.flows))

    def _report_empty(self, f: Flow) -> None:
        """A flow with nothing to move still counts as an activity of its channels."""
        recorder = self.recorder
        for c in f.path:
            flops = f.flops if c.unit is FLOPS_PER_S else 0.0
            recorder.add_busy(c.name, f.end_s, f.end_s, 1, 0.0, flops)
            recorder.log(c.name, f.start_s, f.end_s, 0.0, flops, f.label, "transfer")
        if f.track is not None:
            recorder.record(f.track, f.issued_s, f.end_s, 0.0, f.flops, f.label, "transfer")

    def _reallocate(self, seeds: Sequence[Channel], seed_flows: Sequence[Flow] = ()) -> None:
        """Re-solve rates of the flows connected to ``seeds`` (max-min allocations of
        disjoint components are independent, so nothing else can change)."""
        now = self.env.now
        # the connected component: channels reachable through shared active flows
        chans = list(dict.fromkeys(seeds))  # ordered: float sums must not depend on ids
        seen = set(chans)
        flows = list(seed_flows)
        in_flows = set(flows)
        i = 0
        while i < len(chans):
            for f in chans[i].flows:
                if f not in in_flows:
                    in_flows.add(f)
                    flows.append(f)
                    for c in f.path:
                        if c not in seen:
                            seen.add(c)
                            chans.append(c)
            i += 1
        if not flows:
            return
        for f in flows:  # advance everyone to now at the old rates
            if f.rate > 0:
                f.remaining -= f.rate * (now - f.t_last)
            f.t_last = now
        key = tuple([f._key for f in flows])
        solution = self._fills.get(key)
        if solution is None:
            loads = _solve(chans, flows)
            solution = (tuple([f._new for f in flows]),
                        tuple([_label(f, f._bindc, loads) for f in flows]),
                        tuple([f._wcur for f in flows]))
            if len(self._fills) >= _FILL_MEMO:
                self._fills.clear()
            self._fills[key] = solution
        rates, labels, current = solution
        heap, seq = self._heap, self._seq
        for f, rate, label, wcur in zip(flows, rates, labels, current, strict=True):
            if label != f.bind:  # set_bind is a no-op otherwise: skip the call
                f.set_bind(label, now)
            if f.pool >= 0 and wcur is not f._wcur:
                f._wcur = wcur
                f.path[f.pool].flows[f] = wcur[f.pool]
            if rate != f.rate:
                f.rate = rate
                f.version += 1
                remaining = f.remaining if f.remaining > 0 else 0.0
                heapq.heappush(heap, (now + remaining / rate, next(seq), f.version, f))
        if len(heap) > 64 and len(heap) > 4 * self.active:
            self._heap = heap = [e for e in heap if e[2] == e[3].version and e[3].end_s < 0]
            heapq.heapify(heap)


def _explicit(path: Sequence[Channel], weights: Sequence[float], label: str):
    """Channels and weights given by the caller; repeated channels add up, zeros drop out."""
    if len(weights) != len(path):
        raise ValueError(f"transfer {label!r}: {len(weights)} weights for {len(path)} channels")
    use: dict[Channel, float] = {}
    for c, w in zip(path, weights, strict=True):
        if not w >= 0:
            raise ValueError(f"transfer {label!r}: weight of {c.name} must be >= 0, got {w}")
        if w > 0:
            use[c] = use.get(c, 0.0) + float(w)
    if sum(c.unit is INFLIGHT_BYTES for c in use) > 1:
        raise ValueError(f"transfer {label!r}: at most one in-flight pool per flow")
    return tuple(use), tuple(use.values())


def _weighted(path: Sequence[Channel], amount: float, flops: float, label: str = ""):
    """Channels a flow really uses and how much of each per byte/s of its rate."""
    for c in path:
        if c.unit is INFLIGHT_BYTES:
            raise ValueError(f"transfer {label!r}: a path through an in-flight pool needs "
                             "weights (the route latency on the pool)")
    for c in path:
        if c.unit != BYTES_PER_S:
            break
    else:  # the usual case: bytes all the way
        channels = tuple(path)
        if len(channels) > 1 and len(set(channels)) < len(channels):
            channels = tuple(dict.fromkeys(channels))
        if len(channels) < _MAX_HOPS:
            return channels, _ONES[len(channels)]
        return channels, (1.0,) * len(channels)
    per_byte = flops / amount if amount > 0 else 0.0
    use: dict[Channel, float] = {}
    for c in path:
        w = 1.0 if c.unit == BYTES_PER_S else per_byte
        if w > 0:
            use[c] = w
    return tuple(use), tuple(use.values())


def _label(f: Flow, bound: Channel | None, loads: dict[Channel, float] | None) -> str:
    """Name what binds a flow: its cap, the channel it shares, or for its in-flight pool the
    latency it pays (or, when queueing at a loaded tier is most of it, that tier's bandwidth)."""
    if bound is None:
        return f.cap_label
    if bound.unit is not INFLIGHT_BYTES:
        return bound.bind_label
    if loads:
        # Little's law with queueing, r (L0 + W(u)) = C: the rate's elasticity to the tier's
        # bandwidth exceeds its elasticity to the idle latency L0 exactly when
        # sum a W / (1 - u) > L0 (a = the flow's share of the tier, W = its queueing delay,
        # 1 / (1 - u) = (q + W) / q). Then the tier's bandwidth binds, else the latency.
        base = f.weights[f.pool]
        worst, largest, total = None, 0.0, 0.0
        for c, w in zip(f.path, f.weights, strict=True):
            delay = loads.get(c)
            if delay:
                pull = w * delay * (c.queue_s + delay) / c.queue_s
                total += pull
                if pull > largest:
                    worst, largest = c, pull
        if worst is not None and total > base:
            return worst.bind_label
    return f.latency_label or bound.bind_label


def _solve(chans: Sequence[Channel], flows: list[Flow]) -> dict[Channel, float] | None:
    """Set every flow's rate (``_new``) and what bound it (``_bindc``); returns the queueing
    delay (s) of each loaded channel when the component had to be solved as a fixed point."""
    loaded = [f for f in flows if f.loaded]
    curved = [c for c in chans if c.queue_s > 0] if loaded else ()
    if not curved:
        for f in flows:
            if f.pool >= 0 and f._wcur is not f.weights:
                f._wcur = f.weights
                f.path[f.pool].flows[f] = f.weights[f.pool]
        _fill(chans, flows)
        return None
    delay = {c: 0.0 for c in curved}
    terms = [(f, [(c, w) for c, w in zip(f.path, f.weights, strict=True) if c in delay])
             for f in loaded]

    def fill() -> None:
        for f, fterms in terms:
            pool = f.pool
            w = f.weights[pool] + sum(cw * delay[c] for c, cw in fterms)
            f._wcur = f.weights[:pool] + (w,) + f.weights[pool + 1:]
            f.path[pool].flows[f] = w
        _fill(chans, flows)

    def utilisation(c: Channel) -> float:
        return sum(f._new * w for f, w in c.flows.items()) / c.capacity

    for _ in range(_SWEEPS):
        moved = 0.0
        for c in curved:
            before = delay[c]
            u = _root_utilisation(c, delay, fill, utilisation)
            delay[c] = c.queue_s * u / (1.0 - u)
            moved = max(moved, abs(delay[c] - before) / (c.queue_s + delay[c]))
        if len(curved) == 1 or moved < 1e-12:
            break
    fill()
    return delay


def _root_utilisation(c: Channel, delay: dict[Channel, float], fill, utilisation) -> float:
    """The utilisation u of ``c`` at which its readers, slowed by its queueing delay
    ``q u / (1 - u)``, load it to exactly u (the others' delays held). The load falls as
    the delay grows, so the root is unique; Illinois (regula falsi) within a bracket."""
    q = c.queue_s

    def g(u: float) -> float:
        delay[c] = q * u / (1.0 - u)
        fill()
        return utilisation(c) - u

    ga = g(0.0)  # the load with no queueing is an upper bound on the solution
    if ga <= _U_TOL:
        return 0.0
    a, b = 0.0, min(ga, _U_MAX)
    gb = g(b)
    if gb >= 0:
        return b  # saturated by readers the latency cannot slow
    side = 0
    for _ in range(200):
        m = b - gb * (b - a) / (gb - ga)
        gm = g(m)
        if abs(gm) <= _U_TOL or b - a <= _U_TOL:
            return m
        if gm > 0:
            a, ga = m, gm
            if side == 1:
                gb *= 0.5
            side = 1
        else:
            b, gb = m, gm
            if side == -1:
                ga *= 0.5
            side = -1
    return 0.5 * (a + b)


def _fill(chans: Sequence[Channel], flows: list[Flow]) -> None:
    for f in flows:
        f._new = -1.0
    _max_min_fill(chans, flows)


def _max_min_fill(chans: Sequence[Channel], flows: list[Flow]) -> None:
    """Progressive filling: set ``f._new`` to the weighted max-min fair rate of every flow
    (and ``f._bindc`` to the channel that froze it, None for its own cap).

    Repeatedly find the tightest channel share (capacity left / weight of unfrozen flows);
    flows whose own cap is below it freeze at the cap (that only raises the others' shares),
    otherwise the flows crossing the tightest channel(s) freeze at that share.
    """
    if len(flows) == 1:  # alone: the slowest hop or its own cap
        f = flows[0]
        rate = f.max_rate
        bound = None
        for c, w in zip(f.path, f._wcur, strict=True):
            r = c.capacity / w
            if r < rate:
                rate, bound = r, c
        f._new = rate
        f._bindc = bound
        return
    if len(chans) == 1:
        _fill_one_channel(chans[0], flows)
        return
    for c in chans:
        c._rc = c.capacity
        c._w = 0.0
        c._n = 0
    for f in flows:
        for c, w in zip(f.path, f._wcur, strict=True):
            c._w += w
            c._n += 1
    unfrozen = flows
    while unfrozen:
        share = inf
        for c in chans:
            if c._n:
                s = c._rc / c._w
                if s < share:
                    share = s
        frozen: list[tuple[Flow, float]] = []
        for f in unfrozen:
            if f.max_rate <= share:
                frozen.append((f, f.max_rate))
                f._bindc = None
        if not frozen:
            if share <= 0:  # only reachable through rounding; never stall a flow
                share = min(c.capacity for c in chans) * _DONE_REL
            tight = share * (1 + _SHARE_REL)
            for c in chans:
                if c._n and c._rc <= tight * c._w:
                    for f in c.flows:
                        if f._new < 0:
                            f._new = 0.0  # mark now, rate set below
                            f._bindc = c
                            frozen.append((f, share))
        for f, rate in frozen:
            f._new = rate
            for c, w in zip(f.path, f._wcur, strict=True):
                c._rc -= w * rate
                c._w -= w
                c._n -= 1
        unfrozen = [f for f in unfrozen if f._new < 0]


def _fill_one_channel(c: Channel, flows: list[Flow]) -> None:
    """Max-min fill when every flow shares one channel: a level L with
    sum(w * min(cap, L)) = capacity, found by visiting caps in increasing order."""
    left = c.capacity
    weight = 0.0
    capped = False
    for f in flows:
        weight += c.flows[f]
        capped = capped or f.max_rate != inf
    if not capped:
        level = left / weight
        for f in flows:
            f._new = level
            f._bindc = c
        return
    flows_by_cap = sorted(flows, key=_max_rate)
    for i, f in enumerate(flows_by_cap):
        level = left / weight
        if level <= 0:  # only reachable through rounding; never stall a flow
            level = c.capacity * _DONE_REL
        if f.max_rate > level:
            for g in flows_by_cap[i:]:
                g._new = level
                g._bindc = c
            return
        f._new = f.max_rate
        f._bindc = None
        w = c.flows[f]
        left -= w * f.max_rate
        weight -= w


def _max_rate(f: Flow) -> float:
    return f.max_rate

"""A hardware profile turned into contended simulated resources.

What is built, per profile element (resource names in quotes, all in the recorder/trace):

* GPU ``g``: a compute stream ``"g.compute"`` (more on demand via ``gpu_stream``), an HBM
  channel ``"g.hbm"`` (peak x memory_efficiency) and its PCIe link as copy-engine channels.
  HBM is on no route (kernels are roofline-timed, copies by their PCIe route); it records
  what crossed device memory: each kernel's bytes, busy for its roofline memory term, and
  each DMA's, busy for bytes / its capacity (accounting only, no time changes).
  With two or more copy engines PCIe is full duplex: ``"g.h2d"`` and ``"g.d2h"`` do not
  contend. With one copy engine both directions share ``"g.copy"``.
* socket ``s``: a core pool ``"s.cores"`` and an attention-throughput channel ``"s.attn"`` in
  FLOP/s (cores x attention_gflops_per_core x 1e9).
* memory tier ``t``: ``"t.read"`` and ``"t.write"`` channels at its read/write bandwidth.
  (Reads and writes are modelled as independent; DRAM turnaround is not.)
* other links (UPI, CXL): one channel per direction, ``"link:a->b"``. NVLink carries only
  tensor parallelism's all-reduces, costed by ``hgsim.tensor_parallel`` on a rank's stream.
* in-flight pools (``hgsim.memory``): per socket and access pattern, what its cores keep in
  flight (``"s.inflight.stream"``, ``"s.inflight.gather"``: cores x bytes per core); per GPU
  and copy direction, what its copy engines keep in flight (``"g.h2d.inflight"``). A read
  that crosses a pool is capped at bytes in flight / route latency (Little's law), and a
  tier's read channel adds its queueing delay to that latency as it fills.

Data movement model, the same for every route: a copy of ``n`` bytes over hops ``h1..hk``
takes ``latency + n / rate`` where latency = sum of the hops' latencies (links' latency_ns and
the tier's latency_ns at an end that is a tier) and rate is the max-min fair share the flow
gets on all hops at once, so alone it is ``min(bandwidth of h1..hk)`` and concurrent flows
slow each other wherever their routes overlap.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from simpy import Environment, Event

from hgsim.memory import Pattern
from hgsim.sim.compute import ComputeStream, CpuCorePool, cpu_stream_rate_Bps, roofline_terms
from hgsim.sim.flows import FLOPS_PER_S, INFLIGHT_BYTES, Channel, FlowNetwork
from hgsim.sim.recorder import Recorder
from hgsim.specs.hardware import HardwareProfile

GB = 1e9
NS = 1e-9
US = 1e-6


@dataclass(slots=True, frozen=True)
class Route:
    """The channels data crosses from ``src`` to ``dst`` and the summed hop latency."""

    src: str
    dst: str
    channels: tuple[Channel, ...]
    latency_s: float
    nodes: tuple[str, ...] = ()

    @property
    def bandwidth_Bps(self) -> float:
        """Uncontended rate: the slowest hop (infinite for an empty route)."""
        return min((c.capacity for c in self.channels), default=float("inf"))

    def time_s(self, bytes_: float) -> float:
        """Uncontended transfer time: latency + bytes / slowest hop."""
        return self.latency_s + (bytes_ / self.bandwidth_Bps if self.channels else 0.0)


@dataclass(slots=True, frozen=True)
class _Edge:
    to: str
    channel: Channel | None  # None: a DDR tier attached to its socket without a link
    latency_s: float


class Machine:
    """Simulated resources of one ``HardwareProfile`` on one simpy environment."""

    def __init__(
        self,
        env: Environment,
        profile: HardwareProfile,
        *,
        record: bool = True,
        recorder: Recorder | None = None,
    ) -> None:
        self.env = env
        self.profile = profile
        self.recorder = recorder if recorder is not None else Recorder(keep_activities=record)
        self.network = FlowNetwork(env, self.recorder)
        self._streams: dict[tuple[str, str], ComputeStream] = {}
        self._hbm: dict[str, Channel] = {}
        self._pcie: dict[tuple[str, str], Channel] = {}
        self._pools: dict[str, CpuCorePool] = {}
        self._attn: dict[str, Channel] = {}
        self._tier_read: dict[str, Channel] = {}
        self._tier_write: dict[str, Channel] = {}
        self._links: dict[tuple[str, str, str], Channel] = {}
        self._inflight: dict[tuple[str, str], Channel] = {}
        self._accesses: dict[tuple, tuple] = {}  # resolved reads and writes, by their shape
        self._adjacent: dict[str, list[_Edge]] = {}
        self._routes: dict[tuple[str, str], Route] = {}
        self._build()

    # ------------------------------------------------------------------ construction
    def _channel(self, name: str, capacity: float, device: str, kind: str, unit: str = "B/s",
                 *, queue_s: float = 0.0, bind: str | None = None):
        self.recorder.declare(name, device, kind, unit)
        return self.network.add_channel(name, capacity, unit=unit, queue_s=queue_s,
                                        bind_label=bind)

    def _edge(self, a: str, b: str, channel: Channel | None, latency_s: float) -> None:
        self._adjacent.setdefault(a, []).append(_Edge(b, channel, latency_s))

    def _build(self) -> None:
        p = self.profile
        gpu_links = {gpu.link: name for name, gpu in p.gpus.items()}
        for name, gpu in p.gpus.items():
            self._hbm[name] = self._channel(
                f"{name}.hbm", gpu.hbm_bandwidth_gbps * GB * gpu.memory_efficiency, name, "gpu",
                bind=f"{name} hbm",
            )
            self.gpu_stream(name)
            link = p.links[gpu.link]
            bw, lat = link.bandwidth_gbps * GB, link.latency_ns * NS
            if gpu.copy_engines >= 2:
                h2d = self._channel(f"{name}.h2d", bw, name, "gpu", bind=f"{gpu.link} h2d")
                d2h = self._channel(f"{name}.d2h", bw, name, "gpu", bind=f"{gpu.link} d2h")
                engines = gpu.copy_engines // 2  # per direction
                up = self._channel(f"{name}.h2d.inflight", engines * gpu.dma_inflight_bytes,
                                   name, "gpu", INFLIGHT_BYTES, bind=f"{name} dma in flight")
            else:
                h2d = d2h = self._channel(f"{name}.copy", bw, name, "gpu",
                                          bind=f"{gpu.link} copy")
                up = self._channel(f"{name}.copy.inflight", gpu.dma_inflight_bytes, name, "gpu",
                                   INFLIGHT_BYTES, bind=f"{name} dma in flight")
            self._pcie[name, "h2d"], self._pcie[name, "d2h"] = h2d, d2h
            self._inflight[name, Pattern.DMA.value] = up
            self._edge(gpu.socket, name, h2d, lat)
            self._edge(name, gpu.socket, d2h, lat)
        for name, sock in p.sockets.items():
            pool = CpuCorePool(self.env, f"{name}.cores", sock.cores, self.recorder)
            self.recorder.declare(pool.name, name, "socket")
            self._pools[name] = pool
            self._attn[name] = self._channel(
                f"{name}.attn", sock.cores * sock.attention_gflops_per_core * GB, name, "socket",
                FLOPS_PER_S, bind=f"{name} compute",
            )
            for pattern, per_core in ((Pattern.STREAM, sock.stream_inflight_bytes),
                                      (Pattern.GATHER, sock.gather_inflight_bytes)):
                self._inflight[name, pattern.value] = self._channel(
                    f"{name}.inflight.{pattern.value}", sock.cores * per_core, name, "socket",
                    INFLIGHT_BYTES, bind=f"{name} memory parallelism")
        for name, tier in p.tiers.items():
            self._tier_read[name] = self._channel(
                f"{name}.read", tier.read_bandwidth_gbps * GB, name, "tier",
                queue_s=tier.queue_delay_at_half_load_ns * NS, bind=f"{name} read")
            self._tier_write[name] = self._channel(
                f"{name}.write", tier.write_bandwidth_gbps * GB, name, "tier",
                bind=f"{name} write")
            if tier.link is None:  # DDR hangs off its socket's memory controllers directly
                self._edge(name, tier.socket, None, 0.0)
                self._edge(tier.socket, name, None, 0.0)
        for name, link in p.links.items():
            if name in gpu_links or link.kind == "nvlink":  # NVLink: collectives only
                continue
            a, b = link.endpoints
            bw, lat = link.bandwidth_gbps * GB, link.latency_ns * NS
            for x, y in ((a, b), (b, a)):
                ch = self._channel(f"{name}:{x}->{y}", bw, name, "link", bind=name)
                self._links[name, x, y] = ch
                self._edge(x, y, ch, lat)

    # ------------------------------------------------------------------ resources
    def gpu_stream(self, gpu: str, stream: str = "compute") -> ComputeStream:
        """The GPU's in-order kernel queue named ``stream`` (made on first use). Streams of one
        GPU are independent queues; they do not model sharing of SMs."""
        key = (gpu, stream)
        s = self._streams.get(key)
        if s is None:
            if gpu not in self.profile.gpus:
                raise KeyError(f"unknown gpu {gpu!r}")
            s = self._streams[key] = ComputeStream(self.env, f"{gpu}.{stream}", self.recorder,
                                                   hbm=f"{gpu}.hbm")
            self.recorder.declare(s.name, gpu, "gpu")
        return s

    def gpu_streams(self, gpu: str) -> list[ComputeStream]:
        """Every stream of ``gpu`` made so far (their kernels are the GPU's work)."""
        return [s for (g, _), s in self._streams.items() if g == gpu]

    def hbm(self, gpu: str) -> Channel:
        return self._hbm[gpu]

    def pcie(self, gpu: str, direction: str) -> Channel:
        """PCIe copy channel of ``gpu``: ``"h2d"`` (host to device) or ``"d2h"``."""
        if direction not in ("h2d", "d2h"):
            raise ValueError(f"direction must be 'h2d' or 'd2h', got {direction!r}")
        return self._pcie[gpu, direction]

    def cores(self, socket: str) -> CpuCorePool:
        return self._pools[socket]

    def socket_compute(self, socket: str) -> Channel:
        """The socket's attention throughput, in FLOP/s."""
        return self._attn[socket]

    def tier_read(self, tier: str) -> Channel:
        return self._tier_read[tier]

    def tier_write(self, tier: str) -> Channel:
        return self._tier_write[tier]

    def link(self, name: str, src: str, dst: str) -> Channel:
        """Direction ``src -> dst`` of a UPI/CXL/NVLink link."""
        return self._links[name, src, dst]

    def inflight(self, issuer: str, pattern: Pattern | str, cores: int | None = None,
                 row_bytes: float = 0.0) -> Channel:
        """What ``issuer`` keeps in flight for ``pattern``: a socket's cores (stream, gather of
        rows of ``row_bytes``; all cores unless ``cores`` says how many a task holds) or a
        GPU's host-to-device copy engines (dma). Tasks of one shape at once share a pool."""
        pattern = Pattern(pattern)
        sock = self.profile.sockets.get(issuer)
        gain_rows = pattern is Pattern.GATHER and sock is not None and bool(sock.gather_row_gain)
        whole = cores is None or sock is None or cores == sock.cores
        if whole and not gain_rows:
            return self._inflight[issuer, pattern.value]
        cores = sock.cores if cores is None else cores
        per_core = (sock.stream_inflight_bytes if pattern is Pattern.STREAM
                    else sock.gather_inflight(row_bytes))
        key = (issuer, f"{pattern.value}:{cores}:{per_core:g}")
        pool = self._inflight.get(key)
        if pool is None:
            rows = f".{row_bytes:g}B" if gain_rows else ""
            pool = self._inflight[key] = self._channel(
                f"{issuer}.inflight.{pattern.value}{rows}.{cores}c", cores * per_core, issuer,
                "socket", INFLIGHT_BYTES, bind=f"{issuer} memory parallelism")
        return pool

    def staging_tier(self, socket: str) -> str:
        """Where the host's kernels write what crosses PCIe: the socket's own DRAM (pinned
        buffers are allocated on the node of the thread that uses them)."""
        tiers = self.profile.tiers
        local = [n for n, t in tiers.items() if t.kind == "ddr" and t.socket == socket]
        if local:
            return local[0]
        ddr = [n for n, t in tiers.items() if t.kind == "ddr"]
        return (ddr or list(tiers))[0]

    # ------------------------------------------------------------------ routes
    def path(self, src: str, dst: str) -> Route:
        """Route for data moving from ``src`` to ``dst`` (GPU, socket or tier names).

        A tier source starts with its read channel, a tier destination ends with its write
        channel; in between the fewest hops (ties: least latency) through sockets only.
        """
        key = (src, dst)
        route = self._routes.get(key)
        if route is None:
            route = self._routes[key] = self._find_route(src, dst)
        return route

    def _find_route(self, src: str, dst: str) -> Route:
        p = self.profile
        for node in (src, dst):
            if node not in p.gpus and node not in p.sockets and node not in p.tiers:
                raise KeyError(f"unknown node {node!r} (not a gpu, socket or tier)")
        # Dijkstra on (hops, latency); data may only pass *through* sockets.
        best: dict[str, tuple[int, float]] = {src: (0, 0.0)}
        back: dict[str, tuple[str, _Edge]] = {}
        queue = [(0, 0.0, src)]
        while queue:
            hops, lat, node = heapq.heappop(queue)
            if node == dst:
                break
            if (hops, lat) > best[node] or (node != src and node not in p.sockets):
                continue
            for edge in self._adjacent.get(node, ()):
                cost = (hops + (edge.channel is not None), lat + edge.latency_s)
                if edge.to not in best or cost < best[edge.to]:
                    best[edge.to] = cost
                    back[edge.to] = (node, edge)
                    heapq.heappush(queue, (*cost, edge.to))
        if dst != src and dst not in back:
            raise ValueError(f"no route from {src!r} to {dst!r}")
        edges, nodes, node = [], [dst], dst
        while node != src:
            node, edge = back[node]
            edges.append(edge)
            nodes.append(node)
        edges.reverse()
        nodes.reverse()
        channels = [e.channel for e in edges if e.channel is not None]
        latency_s = sum(e.latency_s for e in edges)
        if src in p.tiers and src != dst:
            channels.insert(0, self._tier_read[src])
            latency_s += p.tiers[src].latency_ns * NS
        if dst in p.tiers and dst != src:
            channels.append(self._tier_write[dst])
            latency_s += p.tiers[dst].latency_ns * NS
        return Route(src, dst, tuple(channels), latency_s, tuple(nodes))

    # ------------------------------------------------------------------ activities
    def copy(
        self,
        src: str,
        dst: str,
        bytes_: float,
        label: str = "",
        *,
        max_rate: float | None = None,
        track: str | None = None,
    ) -> Event:
        """Move ``bytes_`` from ``src`` to ``dst`` over their route; fires with the Flow."""
        route = self.path(src, dst)
        return self._via_hbm((src, dst), self.network.transfer(
            route.channels, bytes_, latency_s=route.latency_s, label=label, max_rate=max_rate,
            track=track))

    def read(
        self,
        sources: Mapping[str, float],
        dst: str,
        bytes_: float,
        pattern: Pattern | str,
        label: str = "",
        *,
        issuer: str | None = None,
        cores: int | None = None,
        row_bytes: float = 0.0,
        flops: float = 0.0,
        extra: Sequence[tuple[Channel, float]] = (),
        max_rate: float | None = None,
        cap_label: str = "cap",
        track: str | None = None,
    ) -> Event:
        """Read ``bytes_`` spread over host tiers (``sources``: tier -> fraction of the bytes)
        into ``dst`` (a socket's cores, or a GPU by DMA), as one flow that progresses through
        all of them together (pages of a range interleaved, or a scan's threads spread over
        the parts).

        Each tier's route carries its fraction of the rate; the issuer's in-flight pool for
        ``pattern`` (the socket's cores, for a gather of rows of ``row_bytes``; or ``dst``'s
        copy engines for DMA) carries the
        fraction-weighted route latency, so the flow runs at most at bytes in flight / latency
        (Little's law). ``flops`` of work on the bytes go through the issuer socket's FLOP/s;
        ``extra`` adds channels with their use per byte/s (a staging buffer's write channel).
        """
        per_byte = flops / bytes_ if flops and bytes_ > 0 else 0.0
        key = (tuple(sources.items()), dst, pattern, issuer, cores, row_bytes, per_byte,
               tuple(extra))
        access = self._accesses.get(key)
        if access is None:
            access = self._accesses[key] = self._access(sources, dst, Pattern(pattern),
                                                        issuer or dst, cores, row_bytes,
                                                        per_byte, extra, label)
        channels, weights, start, latency_label = access
        return self._via_hbm((dst,), self.network.transfer(
            channels, bytes_, latency_s=start, label=label, max_rate=max_rate, flops=flops,
            weights=weights, cap_label=cap_label, latency_label=latency_label, track=track))

    def _access(self, sources, dst, pattern, issuer, cores, row_bytes, per_byte, extra, label):
        """(channels, weights, start latency, latency label) of a read (see ``read``)."""
        pool = self.inflight(issuer, pattern, cores, row_bytes)
        use, start, latency, worst = self._mixed([(tier, dst, f) for tier, f in sources.items()])
        if not use:
            raise ValueError(f"read {label!r}: no source tier with a positive fraction")
        use[pool] = latency
        if per_byte:
            use[self._attn[issuer]] = per_byte
        for c, w in extra:
            use[c] = use.get(c, 0.0) + w
        return tuple(use), tuple(use.values()), start, f"{worst} latency"

    def _mixed(self, legs: list[tuple[str, str, float]]):
        """Routes of one access spread over several tiers, as one flow: each channel's use
        (the summed fractions of the legs crossing it), the latest first byte, the
        fraction-weighted latency and the tier that contributes most of it."""
        use: dict[Channel, float] = {}
        start = latency = 0.0
        worst, worst_latency = "", -1.0
        for src, dst, fraction in legs:
            if fraction <= 0:
                continue
            route = self.path(src, dst)
            for c in route.channels:
                use[c] = use.get(c, 0.0) + fraction
            latency += fraction * route.latency_s
            start = max(start, route.latency_s)
            if fraction * route.latency_s > worst_latency:
                tier = src if src in self.profile.tiers else dst
                worst, worst_latency = tier, fraction * route.latency_s
        return use, start, latency, worst

    def write(self, src: str, destinations: Mapping[str, float], bytes_: float,
              label: str = "", *, track: str | None = None) -> Event:
        """Write ``bytes_`` from ``src`` (a GPU by DMA, or a socket's cores) into host tiers
        (``destinations``: tier -> fraction). Writes are posted: nothing waits on a round
        trip, so no in-flight limit applies; the route's latency is paid once."""
        key = (src, tuple(destinations.items()))
        access = self._accesses.get(key)
        if access is None:
            use, start, _, _ = self._mixed([(src, tier, f) for tier, f in destinations.items()])
            access = self._accesses[key] = (tuple(use), tuple(use.values()), start)
        channels, weights, start = access
        return self._via_hbm((src,), self.network.transfer(
            channels, bytes_, latency_s=start, label=label, weights=weights, track=track))

    def _via_hbm(self, ends: tuple[str, ...], event: Event) -> Event:
        """Account a DMA's bytes to the HBM of each GPU at an end of it (``ends``) once it has
        landed; returns ``event``. Accounting only: the copy's route, and so its rate, leaves
        HBM out, as a <=64 GB/s PCIe stream uses a few percent of a GPU's HBM bandwidth (the
        overlap with memory-bound kernels is in docs/model.md)."""
        gpus = tuple(self._hbm[e] for e in ends if e in self._hbm)
        if gpus:
            event.callbacks.append(lambda ev: self._dma_hbm(gpus, ev.value))
        return event

    def _dma_hbm(self, channels: tuple[Channel, ...], flow) -> None:
        """The bytes a finished DMA ``flow`` wrote into (or read out of) HBM, busy for
        bytes / the channel's bandwidth at the end of the copy (the last bytes to land)."""
        if flow.amount <= 0:
            return
        for hbm in channels:
            start = max(flow.end_s - flow.amount / hbm.capacity, flow.start_s)
            self.recorder.record(hbm.name, start, flow.end_s, flow.amount, 0.0, flow.label,
                                 "transfer")

    def kernel_time_s(
        self, gpu: str, flops: float, bytes_: float, *, dtype: str = "fp16",
        memory_eff: float | None = None,
    ) -> float:
        """Roofline time of a kernel on ``gpu`` (HBM traffic ``bytes_``); ``memory_eff``
        defaults to the GPU's streaming efficiency (pass attention_efficiency for attention)."""
        launch, compute_s, memory_s = self.kernel_terms(gpu, flops, bytes_, dtype=dtype,
                                                        memory_eff=memory_eff)
        return launch + max(compute_s, memory_s)

    def kernel_terms(
        self, gpu: str, flops: float, bytes_: float, *, dtype: str = "fp16",
        memory_eff: float | None = None,
    ) -> tuple[float, float, float]:
        """(launch s, compute s, memory s) of that kernel: what ``kernel_time_s`` adds up, and
        which of the last two binds it."""
        spec = self.profile.gpus[gpu]
        compute_s, memory_s = roofline_terms(
            flops, bytes_, spec.peak_flops(dtype), spec.hbm_bandwidth_gbps * GB,
            spec.compute_efficiency, spec.memory_efficiency if memory_eff is None else memory_eff)
        return spec.kernel_launch_overhead_us * US, compute_s, memory_s

    def gpu_kernel(
        self, gpu: str, flops: float, bytes_: float, label: str = "", *, dtype: str = "fp16",
        memory_eff: float | None = None, stream: str = "compute",
        after: Event | Sequence[Event] = (),
    ) -> Event:
        """Launch a roofline-timed kernel on a GPU stream; fires with the Kernel. Its bytes
        keep the GPU's HBM busy for the roofline memory term (accounting, see ComputeStream)."""
        launch, compute_s, memory_s = self.kernel_terms(gpu, flops, bytes_, dtype=dtype,
                                                        memory_eff=memory_eff)
        duration = launch + max(compute_s, memory_s)
        return self.gpu_stream(gpu, stream).launch(duration, label, flops, bytes_, after=after,
                                                   hbm_s=memory_s)

    def cpu_attention(
        self, socket: str, tier: str, bytes_: float, flops: float, cores: int, label: str = ""
    ) -> Event:
        """CPU cores of ``socket`` stream ``bytes_`` (e.g. KV) out of ``tier`` doing ``flops``.

        The cores are held for the whole pass; the data moves as a flow over the tier's read
        path and the socket's FLOP/s channel, capped at what ``cores`` cores keep in flight
        over the route's latency (Little's law) and can compute, so it contends with
        GPU-bound copies for the same tier and links.
        """
        return self.env.process(self._cpu_attention(socket, tier, bytes_, flops, cores, label))

    def _cpu_attention(self, socket, tier, bytes_, flops, cores, label):
        pool = self._pools[socket]
        spec = self.profile.sockets[socket]
        yield pool.acquire(cores)
        per_byte = flops / bytes_ if bytes_ > 0 else 0.0
        # the socket's pools and FLOP/s hold all its cores; fewer cores cap the flow instead
        cap = None if cores == spec.cores else cpu_stream_rate_Bps(
            cores, float("inf"), spec.attention_gflops_per_core * GB, per_byte)
        flow = yield self.read({tier: 1.0}, socket, bytes_, Pattern.STREAM, label, cores=cores,
                               flops=flops, max_rate=cap, cap_label=f"{socket} cores",
                               track=pool.name)
        pool.release(cores)
        return flow

"""A decode step as the hardware runs it: GPU kernels in stream order, the host path of each
layer (CPU scan, top-k, gather, PCIe) as processes on the machine model, joined where the GPU
needs the host's contribution.

The step opens with one ``kv_update`` kernel per layer whose HBM recent window slides (the
new token in, the oldest out to host memory, written there by DMA). Then per layer ``i`` the
GPU stream runs ``qkv -> [speculate] -> attn -> [merge] -> post``, and after the last layer
the final norm and LM head (whole model only). Where the profile describes hw_backend's CUDA
graph path (``hgsim.graph_path``) each of those is one graph replay with that op's fixed cost,
attention and merges read their bucket-padded sizes and ``kv_update`` is part of qkv. Under
tensor parallelism (``hgsim.tensor_parallel``) the model is one rank's shard and ``post`` is
followed by the layer's two all-reduces (after the output projection and after the FFN):
operations on the same stream that bind to ``nvlink all-reduce`` (or ``pcie all-reduce``) and
count as GPU-busy time.

The host path of layer ``i`` starts at its trigger: after ``qkv(i)``, or with lookahead after
``qkv(i-1)`` (HybridGen's CPU works one layer ahead on the previous layer's input; FlexGen
prefetches the next layer's KV; InfiniGen speculates the next layer's picks, so its
``speculate(i+1)`` kernel runs right after ``qkv(i)`` and triggers the host). ``merge(i)``
waits for the host path.

The host path is what ``hw_backend``'s executor does (``hgsim.costs.LayerWork``): the query
(or InfiniGen's picks) comes to host DRAM; holding every core of the host socket (the plan's
``host_socket``, by default the GPU's; its DRAM holds the staging buffer), the CPU scans K
as a prefetched stream, pays its top-k heap inserts, gathers the selected rows at random into
a DRAM staging buffer (or attends over them, HGCA), and pays each kernel call's fixed cost;
then the cores are free for the next layer and the copy engine uploads the staging buffer
(and any contiguous range the executor copies straight from its tier). Split over several
sockets (``StepPlan.host_split``), each socket runs that path for its share of the KV heads
concurrently, on its own cores and staging buffer, and the merge waits for all of them. Every
read is capped by what its issuer keeps in flight over the route's loaded latency
(``hgsim.memory``).

Every kernel, host segment, write and weight load is also a node of the step's dependency
graph (its predecessors: the previous kernel of the stream, the host path a merge waits for,
the trigger of a host path, the host path that held the cores before it). After the step the
critical path is walked back from the last kernel, at each node to the predecessor that
finished last, and each node's time on it goes to what bound it: a kernel to ``gpu0 hbm``,
``gpu0 compute`` or ``gpu0 launch``, a flow to what bound its rate over time (``ddr0 read``,
``cxl0 latency``, ``pcie0 h2d``, ``cpu0 compute``) and core time to ``cpu0 cores``. The step's
latency is thereby split exactly by resource (``StepMeasure.binding``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from simpy import Event

from hgsim import graph_path
from hgsim.costs import (
    LayerWork,
    Work,
    activation_dtype,
    layer_work,
    lm_head_work,
    prefill_chunk_works,
    prefill_chunks,
    prefill_layer_work,
)
from hgsim.memory import Pattern, touched_bytes
from hgsim.plan import CpuWork, KvPlacement, LayerPlan, StepPlan, Transfer
from hgsim.sim.flows import Flow
from hgsim.sim.machine import GB, Machine
from hgsim.specs.model import ModelSpec

if TYPE_CHECKING:
    from collections.abc import Sequence

    from hgsim.accuracy.synthetic import AttentionModelSpec
    from hgsim.tensor_parallel import AllReduce

_EPS = 1e-15


class _Node:
    """An activity of the step's dependency graph: [start, end], what bound it (label ->
    share), and what it waited for (nodes, or holders whose ``last`` node is filled later)."""

    __slots__ = ("start", "end", "what", "preds", "event")

    def __init__(self, start: float, end: float, what: dict[str, float], preds=(),
                 event: Event | None = None) -> None:
        self.start, self.end, self.what, self.preds, self.event = start, end, what, preds, event

    def settle(self) -> None:
        """A kernel node takes its times from the kernel once the step has run."""
        if self.event is not None:
            k = self.event.value
            self.start, self.end, self.event = k.start_s, k.end_s, None


class _Chain:
    """A holder for the last node of something that has not run yet when its waiter is
    created (a host path, a weight load, an eviction)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: _Node | None = None


#: ``PrefillChunk.past_from``: the whole past in the host tiers of the plan's placement.
PAST_ON_HOST = "<host tiers>"


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """A chunk of one prompt prefilled in the same iteration as a decode step (chunked
    prefill, as Sarathi-Serve and vLLM run it): positions ``past_tokens`` to ``past_tokens +
    tokens`` of one sequence. The prompt is placed as the step's plan places each sequence of
    its batch: the same HBM window (its sink and recent tokens), the rest in the host tiers of
    its placement, so the positions the chunk pushes out of the window go there; where the
    plan keeps every token in HBM, so does the prompt (admission reserved its room).

    ``past_from``: where the prompt's earlier positions are when the chunk starts, if not in
    place as the plan places them: ``PAST_ON_HOST``, all of them in the host tiers the plan
    places host KV in (a prefix cache kept them there when their turn ended, the HBM window
    written out to make room for the running requests), or the name of the tier of a host KV
    store holding them (a server's offloaded prefix cache, as LMCache keeps one). Either way
    the chunk reads the whole past back, layer by layer, before it attends (from then on it is
    placed as the plan places a sequence)."""

    past_tokens: int
    tokens: int
    past_from: str | None = None
    # with ``PAST_ON_HOST``: where the policy keeps host KV (``Policy.host_kv_placement``),
    # for a plan that places none there (the batch fits HBM)
    host_placement: KvPlacement | None = None

    def _host_end(self, lp: LayerPlan, end: int) -> int:
        """Where the prompt's host-resident positions end once ``end`` positions exist (its
        sink where ``lp`` keeps every token in HBM or drops those it does not)."""
        if lp.host_tokens <= 0 or lp.host_evicted:
            return lp.sink_tokens
        return max(lp.sink_tokens, end - lp.gpu_recent_tokens)

    def read_back_tokens(self, lp: LayerPlan) -> int:
        """Earlier positions in host memory when the chunk starts: its attention reads them
        back (the rest of the past is still in HBM; from a store, the whole past)."""
        if self.past_from is not None:
            return self.past_tokens
        return self._host_end(lp, self.past_tokens) - lp.sink_tokens

    def read_back_fractions(self, lp: LayerPlan) -> tuple[dict[str, float], dict[str, float]]:
        """The tiers the read-back comes from, as fractions of its K and of its V: the
        plan's host placement (where it places nothing in host memory, ``host_placement``),
        or the store's tier."""
        if self.past_from not in (None, PAST_ON_HOST):
            return {self.past_from: 1.0}, {self.past_from: 1.0}
        placement = lp.placement or self.host_placement
        if placement is None:
            raise ValueError("a past on the host under a plan that places nothing there "
                             "needs host_placement (Policy.host_kv_placement)")
        return placement.k_fractions, placement.v_fractions

    def written_tokens(self, lp: LayerPlan) -> int:
        """Positions that leave the HBM window while the chunk comes in: written out."""
        return (self._host_end(lp, self.past_tokens + self.tokens)
                - self._host_end(lp, self.past_tokens))


@dataclass(slots=True)
class StepMeasure:
    latency_s: float = 0.0
    gpu_busy_s: float = 0.0
    cpu_busy_s: float = 0.0
    pcie_busy_s: float = 0.0
    host_s: float = 0.0
    device_s: float = 0.0
    variable_s: float = 0.0  # part of host_s that grows with the top-k ratio (scaled share)
    binding: dict[str, float] = field(default_factory=dict)  # resource -> seconds of the step


class _CopySlot(_Chain):
    """An upload's place in the GPU's host-to-device copy queue: ``done`` fires when it has
    landed; ``last`` is its node."""

    __slots__ = ("done",)

    def __init__(self, done: Event) -> None:
        super().__init__()
        self.done = done


class _HostTimes(_Chain):
    """One layer's host path: when it started and ended, what its parts took, and its nodes
    (``last``: the one the merge waits for)."""

    __slots__ = ("trigger_s", "done_s", "cpu_s", "pcie_s", "fixed_s", "variable_s")

    def __init__(self) -> None:
        super().__init__()
        self.trigger_s = 0.0
        self.done_s = 0.0
        self.cpu_s = 0.0  # cores held
        self.pcie_s = 0.0  # query fetch + upload
        self.fixed_s = 0.0  # parts that do not grow with r: fetch, scan, call overheads
        self.variable_s = 0.0  # parts that do: top-k inserts, gather, upload


@dataclass(frozen=True, slots=True)
class _HostSide:
    """A socket that runs host work for a step: its cores, the DRAM tier of its staging
    buffer, the placement of the KV it reads (None: the layer's) and its share of the work
    (1: all of it; a split over n sockets: 1/n of the KV heads each)."""

    socket: str
    staging: str
    cores: int
    placement: KvPlacement | None = None
    share: float = 1.0


class DecodeEngine:
    """Runs ``StepPlan`` objects on a ``Machine``; one engine per simulation."""

    def __init__(
        self, machine: Machine, model: ModelSpec, kv_dtype: str, weight_dtype: str,
        *, attention_only: bool = False, graph_replay: bool | None = None,
        attention: AttentionModelSpec | None = None, allreduce: AllReduce | None = None,
    ):
        self.machine = machine
        # tensor parallelism (hgsim.tensor_parallel): the model is one rank's shard, and each
        # layer ends with two all-reduces on the compute stream (None: one GPU, none)
        self.allreduce = None if attention_only else allreduce
        self.allreduce_sent_bytes = 0.0  # what this rank has sent in all-reduces (energy)
        self.attention = attention  # the synthetic attention a group union's rows come from
        self.env = machine.env
        self.model = model
        self.kv_dtype = kv_dtype
        self.weight_dtype = weight_dtype
        self.attention_only = attention_only
        profile = machine.profile
        self.gpu = profile.primary_gpu
        self.stream = machine.gpu_stream(self.gpu)
        self._use_host(None)
        gpu_spec = profile.gpus[self.gpu]
        self.attn_eff = gpu_spec.attention_efficiency
        # hw_backend's CUDA graph path (``hgsim.graph_path``): assumed where the profile has the
        # graph figures; ``graph_replay`` overrides (False: the executor's eager path)
        if graph_replay is None:
            graph_replay = graph_path.uses_graph_replay(gpu_spec)
        elif graph_replay and not graph_path.uses_graph_replay(gpu_spec):
            raise ValueError(f"{self.gpu}: the graph path needs graph_launch_overhead_us and "
                             "graph_kernel_gap_us in the profile (hgsim calibrate on CUDA)")
        self.graph_replay = graph_replay
        self._graph_us = (gpu_spec.graph_launch_overhead_us, gpu_spec.graph_kernel_gap_us)
        self._work_cache: dict[tuple[int, LayerPlan], LayerWork] = {}
        self._kernel_cache: dict[tuple, tuple[float, dict[str, float], float]] = {}
        self._fixed_cache: dict[int, float] = {}  # graph op's fixed cost by its kernels
        self._kernels: list[_Node] = []  # this step's kernel nodes, in stream order
        # per socket, the node that last gave its cores back
        self._cores_released: dict[str, _Node] = {}
        self._copy_tail: _CopySlot | None = None  # the upload last queued on the copy stream

    def _use_host(self, socket: str | None) -> None:
        """Run the host work on ``socket`` (a plan's ``host_socket``; None: the GPU's socket):
        its cores, and its own DRAM for the staging buffers its threads allocate. Reads of the
        tiers of another socket, and the GPU's DMA of the staging buffers, then cross UPI
        (``Machine.path``)."""
        profile = self.machine.profile
        socket = socket or profile.gpus[self.gpu].socket
        if socket not in profile.sockets:
            raise ValueError(f"plan host_socket {socket!r} is not a socket of {profile.name}")
        self.staging = self.machine.staging_tier(socket)
        self._sides = (_HostSide(socket, self.staging, profile.sockets[socket].cores),)

    def _split_host(self, split: tuple[tuple[str, KvPlacement | None], ...]) -> None:
        """Split the host work over the plan's sockets (``StepPlan.host_split``): each runs
        an equal share of the KV heads on its own cores, over its share's placement, with its
        staging buffer in its own DRAM. The step's own staging (graph path) stays the GPU
        socket's."""
        profile = self.machine.profile
        for socket, _ in split:
            if socket not in profile.sockets:
                raise ValueError(f"plan host_split socket {socket!r} is not a socket of "
                                 f"{profile.name}")
        share = 1 / len(split)
        self._sides = tuple(
            _HostSide(socket, self.machine.staging_tier(socket), profile.sockets[socket].cores,
                      placement, share)
            for socket, placement in split)

    # ------------------------------------------------------------------ costs
    def work(self, batch: int, lp: LayerPlan) -> LayerWork:
        key = (batch, lp)
        w = self._work_cache.get(key)
        if w is None:
            if len(self._work_cache) > 4096:
                self._work_cache.clear()
            w = layer_work(self.model, batch, lp, self.kv_dtype, self.weight_dtype,
                           attention_only=self.attention_only, attention=self.attention)
            if self.graph_replay:
                w = graph_path.graph_layer_work(w, lp)
            self._work_cache[key] = w
        return w

    def op_fixed_s(self, op: str, lp: LayerPlan | None = None) -> float | None:
        """On the graph path, the fixed cost of one replay of ``op`` (a ``GRAPH_KERNELS`` op,
        ``qkv`` counted for ``lp``); None on the per-launch path (the machine's
        ``kernel_launch_overhead_us`` per kernel)."""
        if not self.graph_replay:
            return None
        if op == "qkv":
            kernels = graph_path.qkv_kernels(self.model, lp, self.weight_dtype, self.kv_dtype,
                                             attention_only=self.attention_only)
        else:
            kernels = graph_path.op_kernels(op, self.model, self.weight_dtype, self.kv_dtype)
        fixed = self._fixed_cache.get(kernels)
        if fixed is None:
            fixed = self._fixed_cache[kernels] = graph_path.graph_op_fixed_us(
                kernels, *self._graph_us) * 1e-6
        return fixed

    def _kernel_s(self, work: Work, attention: bool = False,
                  fixed_s: float | None = None) -> float:
        return self._kernel(work, attention, fixed_s)[0]

    def _kernel(self, work: Work, attention: bool = False,
                fixed_s: float | None = None) -> tuple[float, dict[str, float], float]:
        """Roofline time of a kernel, its split by what bound it (launch, HBM, compute) and
        its HBM time (the memory term, bound or not: what its bytes keep HBM busy);
        ``fixed_s`` replaces the per-kernel launch cost (a graph op's, ``op_fixed_s``)."""
        key = (work, attention, fixed_s)
        hit = self._kernel_cache.get(key)
        if hit is not None:
            return hit
        if not work.flops and not work.bytes_:
            out: tuple[float, dict[str, float], float] = (0.0, {}, 0.0)
        else:
            launch, compute_s, memory_s = self.machine.kernel_terms(
                self.gpu, work.flops, work.bytes_, dtype=self.weight_dtype,
                memory_eff=self.attn_eff if attention else None)
            if fixed_s is not None:
                launch = fixed_s
            split = {f"{self.gpu} launch": launch} if launch else {}
            body = max(compute_s, memory_s)
            if body > 0:
                split[f"{self.gpu} hbm" if memory_s >= compute_s else f"{self.gpu} compute"] = body
            out = (launch + body, split, memory_s)
        if len(self._kernel_cache) > 4096:
            self._kernel_cache.clear()
        self._kernel_cache[key] = out
        return out

    # ------------------------------------------------------------------ one step
    def step(self, plan: StepPlan, chunk: PrefillChunk | None = None,
             packed: Sequence[PrefillChunk] = ()) -> StepMeasure:
        """Simulate one decode step to completion and return its timing.

        With ``chunk`` the step also prefills a chunk of a prompt (chunked prefill: one forward
        over the batch's new tokens and the chunk's positions). In every layer the chunk's
        projections and FFN run fused into the step's ``qkv`` and ``post`` GEMMs (the weights
        are read once for both: the FLOPs add, the bytes do not), and its attention over the
        prompt's earlier tokens and, causally, its own is one more kernel, queued right after
        the GPU's decode attention so that it fills the wait for the host's contribution. The
        prompt is placed as the plan places each sequence (``PrefillChunk``): its earlier
        tokens in host memory are read back on the host-to-device engine (in layer order, into
        a double-buffered landing block that layer i-2's chunk attention has freed), beside
        the decode's own uploads, and the positions the chunk pushes out of the HBM window are
        written out on the device-to-host engine once its ``qkv`` has run. The step ends when
        the last kernel has run and every write has landed.

        ``packed``: more prompts' chunks in the same forward behind ``chunk`` (a server filling
        its iteration's token budget from several prompts, as vLLM and Sarathi-Serve do), each
        with its past in place (nothing to read back: a prompt's first chunk, or a prefix kept
        in HBM). Their rows join the fused GEMMs, their attention joins the chunk's kernel (one
        variable-length attention kernel over every chunk, as FlashAttention's varlen kernel
        runs a mixed batch) and their positions that leave the HBM window join its write-out."""
        if packed and chunk is None:
            raise ValueError("packed prompts' chunks ride behind a first chunk")
        for other in packed:
            if other.past_from is not None or other.read_back_tokens(plan.layer):
                raise ValueError("a packed chunk's past must be in HBM (only the first chunk "
                                 "reads its past back)")
        measure = StepMeasure()
        done = self.env.process(self._step(plan, measure, chunk, tuple(packed)))
        self.env.run(until=done)
        return measure

    def prefill(self, plan: StepPlan, prompt_tokens: int, chunk_tokens: int | None = None
                ) -> float:
        """Simulate the prompt's prefill to completion under ``plan`` (the plan at the prompt's
        length) and return its duration, the time to first token.

        Layer by layer, after the layer's offloaded weights have streamed in (as in the decode:
        in layer order into a two-layer buffer, so layer i+1's load overlaps layer i's
        kernels), one kernel per chunk of ``chunk_tokens`` positions (one chunk of the whole
        prompt when None; ``costs.prefill_layer_work``: the chunk's GEMMs and its attention
        over every earlier token) on the GPU stream. The K and V of the chunk's tokens that
        ``plan`` keeps in host memory are written by DMA into the tiers of its placement on the
        device-to-host copy engine, in order, behind the next kernel. A later chunk's attention
        needs them back: chunk c-1's are still in HBM (it was just computed, and is held there
        until chunk c has run), so chunk c reads back only the host-resident tokens of chunks
        0..c-2, on the host-to-device engine (PCIe is full duplex, one copy engine per
        direction), in order, once chunk c-2's write-out has landed and its kernel has freed
        the landing block; the read thus overlaps chunk c-1's kernel and write-out, and chunk
        c's kernel waits for it alone. Tokens the
        plan keeps in HBM stay there; tokens it evicts (H2O) are dropped, neither written out
        nor read back. After the last layer the final norm and LM head give the first token
        (one position per sequence: the decode step's kernel). The prefill ends when that has
        run and every write has landed (the decode that follows reads them)."""
        t0 = self.env.now
        self.env.run(until=self.env.process(self._prefill(plan, prompt_tokens, chunk_tokens)))
        return self.env.now - t0

    def prefill_floor_s(self, plan: StepPlan, prompt_tokens: int,
                        chunk_tokens: int | None = None) -> float:
        """A lower bound of ``prefill``'s time, without simulating it (``hgsim.prefill_chunk``
        skips the chunk sizes whose bound already loses). The same kernels on the one GPU
        stream and the same read-backs, each at the GPU's host-to-device link rate, in order on
        one engine and not before kernel c-2 has freed the landing block; kernel c after kernel
        c-1 and its read. Write-outs, weight loads, latencies and the tiers' own rates only add
        to the time, so the simulated time is never below this."""
        kv_token = plan.batch * self.model.kv_bytes_per_token_layer(self.kv_dtype)
        chunks, _, durations = self._prefill_kernels(plan, prompt_tokens, chunk_tokens)
        durations = [d + ar for d, ar in zip(durations, self._prefill_allreduce_s(plan, chunks),
                                             strict=True)]
        rate_Bps = self.machine.pcie(self.gpu, "h2d").capacity
        kernel_end = read_end = 0.0
        for i in range(plan.num_layers):
            lp = plan.layer_plan(i)
            ends: list[float] = []
            for c, duration in enumerate(durations):
                start = kernel_end
                back = _read_back_tokens(lp, chunks, c)
                if back:
                    read_end = max(read_end, ends[c - 2]) + back * kv_token / rate_Bps
                    start = max(start, read_end)
                kernel_end = start + duration
                ends.append(kernel_end)
        if not self.attention_only:
            kernel_end += self._kernel_s(lm_head_work(self.model, plan.batch, self.weight_dtype))
        return kernel_end

    def _prefill_kernels(self, plan: StepPlan, prompt_tokens: int, chunk_tokens: int | None
                         ) -> tuple[list[tuple[int, int]], list[Work], list[float]]:
        """The prompt's chunks, each one's kernel work and duration (the same in every
        layer)."""
        chunks = prefill_chunks(prompt_tokens, chunk_tokens)
        works = [prefill_layer_work(self.model, plan.batch, tokens, self.weight_dtype,
                                    self.kv_dtype, past_tokens=start,
                                    attention_only=self.attention_only)
                 for start, tokens in chunks]
        return chunks, works, [self._kernel_s(w) for w in works]

    def _prefill_allreduce_s(self, plan: StepPlan, chunks: list[tuple[int, int]]) -> list[float]:
        """Per chunk, its two all-reduces' seconds (0 without tensor parallelism)."""
        return [2 * self.allreduce_s(plan.batch, tokens) for _, tokens in chunks]

    def _hbm_s(self, work: Work) -> float:
        """Seconds a (non-attention-rate) kernel's bytes keep HBM busy: its memory term."""
        return self._kernel(work)[2]

    def _prefill(self, plan: StepPlan, prompt_tokens: int, chunk_tokens: int | None):
        env = self.env
        kv_token = plan.batch * self.model.kv_bytes_per_token_layer(self.kv_dtype)
        chunks, works, durations = self._prefill_kernels(plan, prompt_tokens, chunk_tokens)
        layer_ends, writes = [], []
        weights = None
        h2d_tail = d2h_tail = None  # the last read-back / write-out queued on each engine
        for i in range(plan.num_layers):
            if plan.offloaded_weight_bytes_per_layer:  # the decode's two-layer weight buffer
                buffer_free = layer_ends[i - 2] if i >= 2 else None
                weights = env.process(self._load_weights(plan, weights, buffer_free, _Chain(),
                                                         None))
            lp = plan.layer_plan(i)
            host_start, host_end = lp.host_range()
            spills = lp.host_tokens > 0 and not lp.host_evicted
            kernels: list[Event] = []
            landed: list[Event | None] = []  # per chunk: the layer's last write-out so far
            for c, ((start, tokens), work, duration) in enumerate(
                    zip(chunks, works, durations, strict=True)):
                waits = [] if weights is None else [weights]
                # the chunk just before this one is still in HBM; the ones before it come
                # back from host memory once written there, into the landing block that
                # kernel c-2 has finished with
                back = _read_back_tokens(lp, chunks, c)
                if back:
                    h2d_tail = env.process(self._read_kv_back(
                        (lp.placement.k_fractions, lp.placement.v_fractions),
                        (h2d_tail, landed[c - 2], kernels[c - 2]), back * kv_token))
                    waits.append(h2d_tail)
                kernel = self.stream.launch(duration, "prefill", work.flops, work.bytes_,
                                            after=tuple(waits), hbm_s=self._hbm_s(work))
                end = kernel
                if self.allreduce is not None:  # the chunk's two all-reduces follow it
                    for what in ("attention out", "ffn out"):
                        end, _ = self._launch_allreduce(plan.batch, tokens,
                                                        f"{what} (prefill)", graph=False)
                kernels.append(end)
                out = _overlap(host_start, host_end, start, start + tokens) if spills else 0
                if out:
                    d2h_tail = env.process(self._write_kv_after((d2h_tail, kernel), lp,
                                                                out * kv_token))
                    writes.append(d2h_tail)
                landed.append(d2h_tail)
            layer_ends.append(kernels[-1])
        last = layer_ends[-1]
        if not self.attention_only:  # the first token: final norm and LM head, last position
            head = lm_head_work(self.model, plan.batch, self.weight_dtype)
            last = self.stream.launch(self._kernel_s(head), "prefill final_norm+lm_head",
                                      head.flops, head.bytes_, hbm_s=self._hbm_s(head))
        yield env.all_of([last, *writes])

    def _write_kv_after(self, after: tuple[Event | None, ...], lp: LayerPlan, bytes_: float):
        """A prefill chunk's host-resident K and V, written out on the device-to-host copy
        engine once its kernel has run and the engine's previous write-out has landed."""
        yield from _each_processed(after)
        yield self._write_kv(lp, bytes_, "prefill K+V to host")

    def _read_kv_back(self, fractions: tuple[dict[str, float], dict[str, float]],
                      after: tuple[Event | None, ...], bytes_: float):
        """Earlier chunks' host-resident K and V (half of ``bytes_`` each) read back on the
        host-to-device copy engine from the tiers holding them (``fractions`` of K and of V),
        once ``after`` has happened (the engine's previous read-back, the write-out of the
        last chunk read, the kernel that last used the landing block)."""
        yield from _each_processed(after)
        half = bytes_ / 2
        yield self.machine.read(_mix((half, fractions[0]), (half, fractions[1])),
                                self.gpu, bytes_, Pattern.DMA, "prefill K+V from host")

    def _launch(self, work: Work, label: str, attention: bool = False, *, after=(),
                waits=(), always: bool = True,
                fixed_s: float | None = None) -> tuple[Event | None, float, _Node | None]:
        """Queue a kernel (unless it has no work and ``always`` is False) and add it to the
        dependency graph after the stream's previous kernel and ``waits``."""
        duration, split, hbm_s = self._kernel(work, attention, fixed_s)
        if not duration and not after and not always:
            return None, 0.0, None
        event = self.stream.launch(duration, label, work.flops, work.bytes_, after=after,
                                   hbm_s=hbm_s)
        previous = self._kernels[-1] if self._kernels else None
        node = _Node(0.0, 0.0, split, (previous, *waits), event)
        self._kernels.append(node)
        return event, duration, node

    def _chunk_works(self, chunk: PrefillChunk) -> tuple[Work, Work, Work]:
        """A prefill chunk's share of one layer (``costs.prefill_chunk_works``)."""
        return prefill_chunk_works(self.model, chunk.past_tokens, chunk.tokens,
                                   self.weight_dtype, self.kv_dtype,
                                   attention_only=self.attention_only)

    def _step(self, plan: StepPlan, measure: StepMeasure, chunk: PrefillChunk | None = None,
              packed: tuple[PrefillChunk, ...] = ()):
        env = self.env
        t0 = env.now
        self._kernels = []
        self._cores_released = {}
        self._copy_tail = None
        self._use_host(plan.host_socket)
        if plan.host_split is not None:
            self._split_host(plan.host_split)
        lp = plan.layer
        w = self.work(plan.batch, lp)
        # (a batch of none: a prefill chunk alone, the weights read for its GEMMs)
        has_host = lp.host_tokens > 0 and not lp.host_evicted and plan.batch > 0
        gpu_busy = 0.0
        # The step starts by sliding every layer's HBM window (hw_backend's executor does the
        # same), so host work over a range never misses a token still on its way out.
        evictions: list[tuple[Event, _Chain] | None] = []
        for i in range(plan.num_layers):
            wi = self.work(plan.batch, plan.layer_plan(i)) if plan.per_layer else w
            upd, d_upd, upd_node = self._launch(wi.kv_update, "kv_update", always=False)
            gpu_busy += d_upd
            evict = None
            if wi.evict_bytes and has_host:
                chain = _Chain()
                evict = (env.process(self._evict(plan.layer_plan(i), wi, upd, upd_node, chain)),
                         chain)
            evictions.append(evict)
        table = table_chain = None
        if self.graph_replay:  # the step's count table, before the first replay reads it
            table_chain = _Chain()
            table = env.process(self._stream_copy(
                self.staging, self.gpu, graph_path.count_table_bytes(plan.num_layers),
                "step counts h2d", table_chain))
        host_times: list[_HostTimes] = []
        prev_qkv: tuple[Event, _Node] | None = None
        prev_host: tuple[Event, _HostTimes] | None = None
        next_spec: tuple[Event, float, _Node] | None = None
        last: Event | None = None
        weights: Event | None = None
        weight_chain: _Chain | None = None
        post_events: list[Event] = []
        # a prefill chunk riding on the step: its GEMM FLOPs, attention, read-backs, writes
        chunk_qkv = chunk_post = chunk_attn = Work()
        chunk_kernels: list[Event | None] = []  # per layer, the chunk's attention kernel
        chunk_writes: list[Event] = []
        h2d_tail = d2h_tail = None
        reduced = plan.batch  # positions each all-reduce carries
        chunks = (chunk, *packed) if chunk is not None else ()
        for c in chunks:  # one forward: the chunks' rows and attention add up
            qkv_c, post_c, attn_c = self._chunk_works(c)
            chunk_qkv, chunk_post = _plus(chunk_qkv, qkv_c), _plus(chunk_post, post_c)
            chunk_attn = _plus(chunk_attn, attn_c)
            reduced += c.tokens
        chunk_kv_token = self.model.kv_bytes_per_token_layer(self.kv_dtype)
        if self.allreduce is not None:  # (None attention-only)
            # the vocab-parallel embedding: each rank looks up its share of the vocabulary,
            # an all-reduce sums the new tokens' hidden states before the first layer
            last, d_ar = self._launch_allreduce(reduced, 1, "embedding")
            gpu_busy += d_ar
        for i in range(plan.num_layers):
            if i and plan.per_layer is not None:  # rare: layer-specific plans
                lp = plan.layer_plan(i)
                w = self.work(plan.batch, lp)
            if plan.offloaded_weight_bytes_per_layer:
                buffer_free = post_events[i - 2] if i >= 2 else None
                previous = weight_chain
                weight_chain = _Chain()
                weights = env.process(self._load_weights(plan, weights, buffer_free,
                                                         weight_chain, previous))
            first = table if i == 0 else None
            read_back = None
            if chunk is not None:  # the prompt's earlier host-resident tokens come back
                back = chunk.read_back_tokens(lp)
                if back:
                    freed = chunk_kernels[i - 2] if i >= 2 else None
                    h2d_tail = read_back = env.process(self._read_kv_back(
                        chunk.read_back_fractions(lp),
                        (h2d_tail, freed), back * chunk_kv_token))
            qkv, d_qkv, qkv_node = self._launch(
                _plus(w.qkv, chunk_qkv), "qkv",
                after=tuple(e for e in (weights, first) if e is not None),
                waits=tuple(c for c in (weight_chain, table_chain if first else None)
                            if c is not None),
                fixed_s=self.op_fixed_s("qkv", lp))
            gpu_busy += d_qkv
            if chunk is not None:
                out = sum(c.written_tokens(lp) for c in chunks)
                if out:  # K and V that leave the HBM window, to the host tiers
                    d2h_tail = env.process(self._write_kv_after((d2h_tail, qkv), lp,
                                                                out * chunk_kv_token))
                    chunk_writes.append(d2h_tail)
            speculate = None
            if w.speculate.flops or w.speculate.bytes_:
                if next_spec is not None:  # launched one layer ahead, right after qkv(i-1)
                    speculate = next_spec
                else:
                    speculate = self._launch(w.speculate, "speculate", True,
                                             fixed_s=self.op_fixed_s("speculate"))
                    gpu_busy += speculate[1]
                next_spec = None
                if lp.lookahead and i + 1 < plan.num_layers:
                    wn = self.work(plan.batch, plan.layer_plan(i + 1))
                    next_spec = self._launch(wn.speculate, "speculate", True,
                                             fixed_s=self.op_fixed_s("speculate"))
                    gpu_busy += next_spec[1]
            host = times = None
            if has_host:
                times = _HostTimes()
                trigger = self._trigger(lp, (qkv, qkv_node), prev_qkv, prev_host, speculate,
                                        evictions[i])
                host_times.append(times)
                host = env.process(self._host_layer(lp, w, trigger, times))
            _, d_attn, _ = self._launch(w.attn, "attention", True,
                                        fixed_s=self.op_fixed_s("attention"))
            gpu_busy += d_attn
            if chunk is not None:
                kernel, d_chunk, _ = self._launch(
                    chunk_attn, "prefill chunk attention", True,
                    after=() if read_back is None else (read_back,))
                chunk_kernels.append(kernel)
                gpu_busy += d_chunk
            if host is not None:
                _, d_merge, _ = self._launch(w.merge, "merge", True, after=host, waits=(times,),
                                             fixed_s=self._merge_fixed_s(lp))
                gpu_busy += d_merge
            last, d_post, _ = self._launch(_plus(w.post, chunk_post), "out_proj+ffn",
                                           fixed_s=self.op_fixed_s("post"))
            post_events.append(last)
            gpu_busy += d_post
            if self.allreduce is not None:  # after the output projection and the FFN
                for what in ("attention out", "ffn out"):
                    last, d_ar = self._launch_allreduce(reduced, 1, what)
                    gpu_busy += d_ar
            prev_qkv, prev_host = (qkv, qkv_node), (host, times) if host is not None else None
        if not self.attention_only:  # the final norm and LM head, once per step
            heads = plan.batch + len(chunks)  # each chunk's last position
            last, d_head, _ = self._launch(lm_head_work(self.model, heads, self.weight_dtype),
                                           "final_norm+lm_head",
                                           fixed_s=self.op_fixed_s("lm_head"))
            gpu_busy += d_head
            if self.allreduce is not None:  # the vocab-parallel LM head's logits, gathered
                last, d_gather = self._launch_logits_gather(heads)
                gpu_busy += d_gather
        if self.graph_replay:  # every layer's new K and V to host memory, after the last replay
            tokens = _Chain()
            yield env.process(self._stream_copy(
                self.gpu, self.staging,
                graph_path.new_token_bytes(self.model, plan.batch, self.kv_dtype,
                                           plan.num_layers),
                "new tokens d2h", tokens, after=last, after_node=self._kernels[-1]))
            self._kernels.append(tokens.last)  # the step's last activity, for the critical path
        else:
            yield last
        if chunk_writes:  # the next chunk reads them back
            yield env.all_of(chunk_writes)
        measure.latency_s = env.now - t0
        measure.gpu_busy_s = gpu_busy
        # The scheduler compares the host path's elapsed time with the device *work* that can
        # hide it (HybridGen's T_dev): with lookahead the rest of layer i-1 plus layer i up to
        # its own attention, otherwise layer i's attention alone. Work, not elapsed time, so that
        # waiting on a shared link does not read as spare device capacity.
        d_qkv = self._kernel_s(w.qkv, fixed_s=self.op_fixed_s("qkv", lp))
        d_spec = self._kernel_s(w.speculate, True, self.op_fixed_s("speculate"))
        d_attn = self._kernel_s(w.attn, True, self.op_fixed_s("attention"))
        d_merge = self._kernel_s(w.merge, True, self._merge_fixed_s(lp))
        hide_first = d_qkv + d_spec + d_attn
        d_post = self._kernel_s(w.post, fixed_s=self.op_fixed_s("post"))
        d_post += 2 * self.allreduce_s(plan.batch, 1)
        hide = hide_first + (d_attn + d_merge + d_post if lp.lookahead else 0.0)
        for i, times in enumerate(host_times):
            elapsed = times.done_s - times.trigger_s
            measure.host_s += elapsed
            measure.device_s += hide if i else hide_first
            measure.cpu_busy_s += times.cpu_s
            measure.pcie_busy_s += times.pcie_s
            parts = times.fixed_s + times.variable_s
            if parts > 0:  # waiting for cores is shared out in proportion
                measure.variable_s += elapsed * times.variable_s / parts
        measure.binding = self._critical_path(t0, env.now)

    def allreduce_s(self, batch: int, tokens: int) -> float:
        """One all-reduce of the hidden states of ``tokens`` positions of ``batch`` sequences
        (0 without tensor parallelism)."""
        if self.allreduce is None:
            return 0.0
        return self.allreduce.time_s(self._allreduce_bytes(batch, tokens))

    def _allreduce_bytes(self, batch: int, tokens: int) -> float:
        from hgsim.tensor_parallel import allreduce_bytes

        return allreduce_bytes(batch, tokens, self.model.hidden_size,
                               activation_dtype(self.weight_dtype))

    def _launch_allreduce(self, batch: int, tokens: int, what: str, *,
                          graph: bool = True) -> tuple[Event, float]:
        """Queue one all-reduce on the compute stream (it blocks the layer: the next kernel
        needs the summed hidden state); in the step's dependency graph (``graph``) it binds
        to ``AllReduce.label``."""
        bytes_ = self._allreduce_bytes(batch, tokens)
        return self._launch_collective(self.allreduce.time_s(bytes_),
                                       self.allreduce.sent_bytes(bytes_), f"all-reduce {what}",
                                       graph=graph)

    def _launch_logits_gather(self, batch: int) -> tuple[Event, float]:
        """Queue the all-gather of the step's logits (each rank computed its share of the
        vocabulary) on the compute stream; it binds to ``AllReduce.label``."""
        from hgsim.tensor_parallel import logits_bytes

        bytes_ = logits_bytes(batch, self.model.vocab_size * self.allreduce.ranks,
                              activation_dtype(self.weight_dtype))
        return self._launch_collective(self.allreduce.gather_time_s(bytes_),
                                       self.allreduce.gather_sent_bytes(bytes_),
                                       "all-gather logits")

    def _launch_collective(self, duration: float, sent_bytes: float, label: str, *,
                           graph: bool = True) -> tuple[Event, float]:
        """Queue a collective of ``duration`` on the compute stream, count the bytes this rank
        sent (energy) and, in the step's dependency graph (``graph``), bind it to
        ``AllReduce.label``."""
        self.allreduce_sent_bytes += sent_bytes
        event = self.stream.launch(duration, label)
        if graph:
            previous = self._kernels[-1] if self._kernels else None
            self._kernels.append(_Node(0.0, 0.0, {self.allreduce.label: 1.0}, (previous,),
                                       event))
        return event, duration

    def _merge_fixed_s(self, lp: LayerPlan) -> float | None:
        op = graph_path.merge_op(lp)
        return None if op is None else self.op_fixed_s(op)

    # ------------------------------------------------------------------ triggers and writes
    def _trigger(self, lp: LayerPlan, qkv, prev_qkv, prev_host, speculate, evicted):
        """When the host path of layer ``i`` may start: an event, and the nodes behind it."""
        env = self.env
        if lp.transfer is Transfer.KV_ALL:
            # FlexGen's double buffer: layer i's KV loads as soon as layer i-1's has landed.
            start = prev_host if prev_host is not None else (env.timeout(0), None)
        elif speculate is not None:  # InfiniGen: the host gathers what the GPU speculated
            start = (speculate[0], speculate[2])
        elif lp.lookahead and prev_qkv is not None:
            start = prev_qkv
        else:
            start = qkv
        events, nodes = [start[0]], [start[1]]
        if evicted is not None:  # the token leaving HBM must be in host memory first
            events.append(evicted[0])
            nodes.append(evicted[1])
        return (events[0] if len(events) == 1 else env.all_of(events)), tuple(nodes)

    def _evict(self, lp: LayerPlan, w: LayerWork, update: Event | None, update_node,
               chain: _Chain):
        """The token that left this layer's HBM window, written to the host tiers by DMA."""
        if update is not None:
            yield update
        t = self.env.now
        flow = yield self._write_kv(lp, w.evict_bytes, "evict K+V")
        chain.last = _Node(t, self.env.now, _shares([flow]), (update_node,))

    def _write_kv(self, lp: LayerPlan, bytes_: float, label: str,
                  placement: KvPlacement | None = None) -> Event:
        """K and V (half of ``bytes_`` each) written by DMA from the GPU into the host tiers
        that hold each kind under ``placement`` (default: ``lp``'s)."""
        placement, half = placement or lp.placement, bytes_ / 2
        return self.machine.write(
            self.gpu, _mix((half, placement.k_fractions), (half, placement.v_fractions)),
            bytes_, label)

    def _stream_copy(self, src: str, dst: str, bytes_: float, label: str, chain: _Chain, *,
                     after: Event | None = None, after_node: _Node | None = None):
        """A copy issued on the compute stream (graph path), in order with its kernels."""
        yield from _each_processed((after,))
        t = self.env.now
        flow = yield self.machine.copy(src, dst, bytes_, label)
        chain.last = _Node(t, self.env.now, _shares([flow]),
                           (after_node,) if after_node is not None else ())

    def _load_weights(self, plan: StepPlan, previous: Event | None, buffer_free: Event | None,
                      chain: _Chain, previous_chain: _Chain | None):
        """Stream one layer's offloaded weights into a two-layer HBM buffer, in layer order."""
        yield from _each_processed((previous, buffer_free))
        t = self.env.now
        flow = yield self.machine.read({plan.weight_tier: 1.0}, self.gpu,
                                       plan.offloaded_weight_bytes_per_layer, Pattern.DMA,
                                       "weights h2d")
        preds = (previous_chain,) if previous_chain is not None else ()
        chain.last = _Node(t, self.env.now, _shares([flow]), preds)

    # ------------------------------------------------------------------ the host path
    def _host_layer(self, lp: LayerPlan, w: LayerWork, trigger, times: _HostTimes):
        """The host path of one layer: on one socket, or split over several, each running its
        own path for its share concurrently; the layer's host work ends when the last one has
        uploaded (the merge waits for every socket's)."""
        env = self.env
        # An upload's place on the copy stream, taken in layer order (the order the executor
        # submits uploads to its one copy queue), and within a split layer in the order of the
        # plan's sockets; host paths start in layer order. A layer that uploads nothing takes
        # no place.
        queued = []
        for side in self._sides:
            work = self._side_work(w, side.share)
            sources = self._upload_sources(lp, work, side)
            ahead, slot = self._copy_tail, None
            if sources:
                slot = self._copy_tail = _CopySlot(env.event())
            queued.append((side, work, sources, ahead, slot))
        if len(queued) == 1:
            yield from self._host_path(lp, trigger, times, *queued[0])
            return
        parts = [_HostTimes() for _ in queued]
        yield env.all_of([env.process(self._host_path(lp, trigger, part, *side_args))
                          for part, side_args in zip(parts, queued, strict=True)])
        # the layer as the scheduler sees it: from its trigger to the last socket's upload,
        # with the parts of the socket that finished last
        last = max(parts, key=lambda p: p.done_s)
        times.trigger_s = min(p.trigger_s for p in parts)
        times.done_s = env.now
        times.cpu_s = max(p.cpu_s for p in parts)
        times.pcie_s = max(p.pcie_s for p in parts)
        times.fixed_s, times.variable_s = last.fixed_s, last.variable_s
        times.last = _Node(env.now, env.now, {}, tuple(parts))

    @staticmethod
    def _side_work(w: LayerWork, share: float) -> LayerWork:
        """A socket's share of a layer's host work: its KV heads' scan, top-k inserts,
        gathers, staged and direct uploads and appended token; every socket receives the whole
        query and pays every host call's fixed cost."""
        if share == 1:
            return w
        return replace(
            w, cpu_k_bytes=w.cpu_k_bytes * share, cpu_v_bytes=w.cpu_v_bytes * share,
            cpu_flops=w.cpu_flops * share, cpu_topk_inserts=w.cpu_topk_inserts * share,
            gather_k_rows=w.gather_k_rows * share, gather_v_rows=w.gather_v_rows * share,
            gather_flops=w.gather_flops * share, unstaged_rows=w.unstaged_rows * share,
            staged_bytes=w.staged_bytes * share, direct_k_bytes=w.direct_k_bytes * share,
            direct_v_bytes=w.direct_v_bytes * share,
            append_host_bytes=w.append_host_bytes * share)

    def _host_path(self, lp: LayerPlan, trigger, times: _HostTimes, side: _HostSide,
                   w: LayerWork, sources: dict[str, float], ahead: _CopySlot | None,
                   slot: _CopySlot | None):
        env, machine, gpu = self.env, self.machine, self.gpu
        event, waits = trigger
        yield event
        times.trigger_s = env.now
        times.last = _Node(env.now, env.now, {}, waits)  # the join of its triggers
        if w.q_d2h_bytes or w.append_host_bytes:
            t = env.now
            fetches = [machine.copy(gpu, side.staging, w.q_d2h_bytes, "q d2h")]
            if w.append_host_bytes:  # no HBM window: the new token is written to host memory
                fetches.append(self._write_kv(lp, w.append_host_bytes, "append K+V",
                                              side.placement))
            done = yield env.all_of(fetches)
            self._segment(times, t, _shares(done.values()))
            times.pcie_s += env.now - t
            times.fixed_s += env.now - t
        if w.cpu_k_bytes or w.cpu_v_bytes or w.gather_rows or w.host_calls:
            yield from self._cpu_phase(lp, w, times, side)
        if slot is not None:
            # One copy stream, in order: this upload starts once the one queued before it has
            # landed (copies on a CUDA stream do not overlap; the executor queues every
            # layer's upload on its copy stream).
            if ahead is not None and not ahead.done.processed:
                yield ahead.done
            t = env.now
            flow = yield machine.read(sources, gpu, w.to_gpu_bytes, Pattern.DMA, "to gpu")
            self._segment(times, t, _shares([flow]), *((ahead,) if ahead is not None else ()))
            times.pcie_s += env.now - t
            times.variable_s += env.now - t
            slot.last = times.last
            slot.done.succeed()
        times.done_s = env.now

    def _segment(self, times: _HostTimes, start: float, what: dict[str, float],
                 *extra_preds) -> _Node:
        """Append a node from ``start`` to now to the host path's chain."""
        node = _Node(start, self.env.now, what, (times.last, *extra_preds))
        times.last = node
        return node

    def _upload_sources(self, lp: LayerPlan, w: LayerWork, side: _HostSide
                        ) -> dict[str, float]:
        """Where what crosses PCIe is read from, as fractions of ``w.to_gpu_bytes``."""
        if not w.to_gpu_bytes:
            return {}
        placement = side.placement or lp.placement
        return _mix((w.staged_bytes, {side.staging: 1.0}),
                    (w.direct_k_bytes, placement.k_fractions),
                    (w.direct_v_bytes, placement.v_fractions))

    def _cpu_phase(self, lp: LayerPlan, w: LayerWork, times: _HostTimes, side: _HostSide):
        """Holding every core of the socket: scan, top-k inserts, gather, call overheads."""
        env, machine, socket, cores = self.env, self.machine, side.socket, side.cores
        pool = machine.cores(socket)
        spec = machine.profile.sockets[socket]
        yield pool.acquire(cores)
        # holding the cores now: the path continues from whoever gave them back last
        times.last = _Node(env.now, env.now, {},
                           (times.last, self._cores_released.get(socket)))
        start = env.now
        placement = side.placement or lp.placement
        scan_bytes = w.cpu_k_bytes + w.cpu_v_bytes
        if scan_bytes:
            sources = _mix((w.cpu_k_bytes, placement.k_fractions),
                           (w.cpu_v_bytes, placement.v_fractions))
            t = env.now
            flow = yield machine.read(sources, socket, scan_bytes, Pattern.STREAM,
                                      "cpu scan", flops=w.cpu_flops, track=pool.name)
            self._segment(times, t, _shares([flow]))
            times.fixed_s += env.now - t
        if w.cpu_topk_inserts and spec.topk_ns_per_insert:
            yield from self._core_time(times, w.cpu_topk_inserts * spec.topk_ns_per_insert
                                       * 1e-9 / cores, "top-k inserts", socket, variable=True)
        if w.gather_rows:
            gather = (placement.gather_fractions if lp.cpu_work is not CpuWork.NONE
                      else placement.v_fractions)
            line = spec.cache_line_bytes
            row_lines = touched_bytes(1, w.row_bytes, line)
            moved = w.gather_rows * row_lines
            sources = _mix((w.gather_k_rows, placement.k_fractions), (w.gather_v_rows, gather))
            extra = []
            if w.rows_staged:  # each row is copied into the staging buffer in DRAM
                extra.append((machine.tier_write(side.staging),
                              w.row_bytes / row_lines * w.staged_share))
            # the core work per row (address, copy) overlaps the misses: a cap, not a sum
            per_byte_s = (spec.gather_ns_per_row * 1e-9 / row_lines
                          + (w.gather_flops / moved) / (spec.attention_gflops_per_core * GB))
            cap = cores / per_byte_s if per_byte_s > 0 else None
            t = env.now
            flow = yield machine.read(sources, socket, moved, Pattern.GATHER, "cpu gather",
                                      row_bytes=w.row_bytes, extra=extra, max_rate=cap,
                                      cap_label=f"{socket} cores", track=pool.name)
            self._segment(times, t, _shares([flow]))
            times.variable_s += env.now - t
        if w.host_calls and spec.op_overhead_us:
            yield from self._core_time(times, w.host_calls * spec.op_overhead_us * 1e-6,
                                       "host calls", socket, variable=False)
        self._cores_released[socket] = times.last
        pool.release(cores)
        times.cpu_s = env.now - start

    def _core_time(self, times: _HostTimes, seconds: float, label: str, socket: str, *,
                   variable: bool):
        """Core work with no memory traffic of its own (heap inserts, per-call fixed costs),
        recorded on ``socket``'s core pool: its cores are as busy as during a scan."""
        t = self.env.now
        yield self.env.timeout(seconds)
        self.machine.recorder.record(self.machine.cores(socket).name, t, self.env.now,
                                     label=label, category="cpu")
        self._segment(times, t, {f"{socket} cores": 1.0})
        if variable:
            times.variable_s += seconds
        else:
            times.fixed_s += seconds

    # ------------------------------------------------------------------ what bound the step
    def _critical_path(self, t0: float, t_end: float) -> dict[str, float]:
        """Walk back from the step's last kernel, at each node to the predecessor that
        finished last, and split the time on the path by what bound each node."""
        for node in self._kernels:
            node.settle()
        out: dict[str, float] = defaultdict(float)
        node = self._kernels[-1] if self._kernels else None
        t = t_end
        while node is not None and t > t0 + _EPS:
            start = max(node.start, t0)
            if t > start:
                span = t - start
                total = sum(node.what.values())
                if not total:
                    out["idle"] += span
                for label, share in node.what.items():
                    out[label] += span * share / total
            t = min(t, start)
            best = None
            for pred in node.preds:
                if isinstance(pred, _Chain):
                    pred = pred.last
                if pred is None:
                    continue
                pred.settle()
                if best is None or pred.end > best.end:
                    best = pred
            if best is not None and best.end < t - _EPS:
                out["idle"] += t - max(best.end, t0)  # nothing modelled kept it waiting
                t = best.end
            node = best
        if t > t0 + _EPS:
            out["idle"] += t - t0
        return dict(out)


def _shares(flows) -> dict[str, float]:
    """What bound a segment that ran ``flows`` (concurrently) to its end, as shares: each
    flow's draining time by what bound its rate, its start latency by the latency it paid."""
    what: dict[str, float] = defaultdict(float)
    for f in flows:
        if not isinstance(f, Flow):
            continue
        wait = max(f.start_s - f.issued_s, 0.0)
        if wait:
            what[f.latency_label or (f"{f.path[0].bind_label} latency" if f.path
                                     else "latency")] += wait
        for label, seconds in f.binds.items():
            what[label] += seconds
    return dict(what) if what else {"host": 1.0}


def _each_processed(events: tuple[Event | None, ...]):
    """Wait (in a process) until every event given has happened; None stands for nothing."""
    for event in events:
        if event is not None and not event.processed:
            yield event


def _read_back_tokens(lp: LayerPlan, chunks: list[tuple[int, int]], c: int) -> int:
    """Host-resident tokens per sequence that chunk ``c``'s attention reads back: those of
    chunks 0..c-2 (chunk c-1's are still in HBM); none where the plan keeps or drops them."""
    if c < 2 or lp.host_tokens <= 0 or lp.host_evicted:
        return 0
    host_start, host_end = lp.host_range()
    return _overlap(host_start, host_end, 0, chunks[c - 1][0])


def _plus(a: Work, b: Work) -> Work:
    """One kernel doing both works' FLOPs and moving both's bytes."""
    return a if not (b.flops or b.bytes_) else Work(a.flops + b.flops, a.bytes_ + b.bytes_)


def _overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> int:
    """Positions two half-open ranges share."""
    return max(0, min(a_end, b_end) - max(a_start, b_start))


def _mix(*parts: tuple[float, dict[str, float]]) -> dict[str, float]:
    """Tier fractions of a read made of several parts (bytes, tier -> fraction)."""
    total = sum(b for b, _ in parts)
    out: dict[str, float] = {}
    for bytes_, fractions in parts:
        for tier, f in fractions.items():
            if bytes_ * f > 0:
                out[tier] = out.get(tier, 0.0) + bytes_ * f / total
    return out

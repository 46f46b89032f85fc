"""Runs the simulator's partition plan on real tensors, layer by layer, and times it.

``PlanExecutor.step(plan, queries)`` executes one decode step of a ``hgsim.plan.StepPlan``
(the very object the policies give the simulator) over a ``KvStore`` split the way the plan
says. Per layer, in the simulator's order (``hgsim.sim.decode``)::

    device compute queue:  kv repartition | qkv | [speculate] | attention | merge | post
    host worker:                 q -> host, CPU kernel (logits+top-k / partial attention / gather)
    device copy queue:                                   upload (H2D) of what the host produced

* HybridGen (LOGITS_TOPK + LOGITS_AND_V + SOFTMAX_UNION): the CPU scans the host keys and keeps
  a per-head top-k; only those logits and V rows cross; the device computes one softmax over its
  own logits and the received ones (``merge.softmax_union``).
* HGCA / CPU offload / FlexGen-CPU (PARTIAL_ATTENTION or SPARSE_PARTIAL + PARTIAL_OUTPUT): the
  CPU attends over (selected) host tokens; output + LSE cross; LSE merge on the device.
* FlexGen (KV_ALL): host K/V rows of the layer are copied to the device, chained layer after
  layer (prefetch) with at most two layers in flight (FlexGen's double buffer), and attended.
* InfiniGen (KV_SELECTED): the device speculates the top-k host tokens from a query
  approximation over its partial key cache; the host gathers those K/V rows; they are copied
  and attended with exact logits.
* GPU-only and host-evicted plans (H2O without heavy hitters): device-resident tokens only.

Plans with ``Merge.NONE`` whose tokens sit in two places (FlexGen, InfiniGen) are still computed
as two blocks joined by their LSE: that is the same softmax, evaluated blockwise.

Host work of a layer is submitted before the device's attention of that layer and overlaps it;
with the plan's ``lookahead`` the host work of layer i+1 is triggered by layer i's qkv (the CPU
works one layer ahead), as the simulator triggers it. In ``step`` the queries of all layers are
given up front, so by default the look-ahead host work uses layer i+1's true query; a whole model
(``model_decode``) passes ``lookahead_queries`` instead, layer i+1's query projected from layer
i's input (HybridGen's approximation: that query exists when layer i's qkv is done), and
``hf_hook``, which gets queries one layer at a time, runs without look-ahead. Look-ahead is
also off for a layer whose new token lands in host memory (no recent window), since the host
must see that token.

How the device does its half is a ``device_side.DeviceSide``: on CUDA by default captured
graphs over static buffers (``graph_side``, ``graphs=True``), one replay per queue op; on the
CPU stand-in torch ops issued one by one (``graphs=False``, also selectable on CUDA for
comparison). With CUDA the host kernel's threads are kept off the core of the thread that
submits the device work (``cuda_host_threads``; ``submit_core``).

Timing follows the simulator's definitions (``hw_backend.timing``) so that the feedback
scheduler can be driven by measured times (``decode_loop.run_decode``).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hgsim.plan import CpuWork, StepPlan
from hgsim.results import StepTiming
from hw_backend import run_queue
from hw_backend.buffers import BufferPool
from hw_backend.device_side import DeviceSide, EagerDeviceSide
from hw_backend.device_work import DeviceWork
from hw_backend.devices import Accelerator, available_cores, cuda_host_threads
from hw_backend.host_side import HostKernels, HostPayload
from hw_backend.kv_store import KvStore
from hw_backend.layer_state import (
    HostPath,
    LayerState,
    UnsupportedPlan,
    check_host_socket,
    host_path,
)
from hw_backend.step_buffers import StepBuffers
from hw_backend.streams import Marker, ResponsiveGil, WorkerStream
from hw_backend.timing import LayerTiming, step_timing


def submit_and_host_cores() -> tuple[int | None, tuple[int, ...] | None]:
    """(the core the submitting thread runs on, the cores the host kernel gets): next to CUDA
    the thread issuing device work keeps one core to itself (``cuda_host_threads``)."""
    cores = available_cores()
    if len(cores) < 2 or not hasattr(os, "sched_setaffinity"):
        return None, None
    return cores[0], cores[1:]


@contextmanager
def pinned_to(core: int | None) -> Iterator[None]:
    """The calling thread on ``core`` for the block (Linux), its affinity restored after."""
    if core is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class StepRun:
    """One executed decode step: per-layer outputs, what the host selected, and timing."""

    plan: StepPlan
    outputs: list[torch.Tensor]  # per layer, (B, H, D) float32 on the device
    selections: list[torch.Tensor | None]  # per layer, host positions attended (B, H, k or m)
    timing: StepTiming
    layers: list[LayerTiming]
    device: str


class PlanExecutor:
    """Executes ``StepPlan`` objects over a ``KvStore`` on an ``Accelerator`` plus the CPU.

    ``host_threads`` is the C kernel's thread count (default: the accelerator's core split, or
    with CUDA every core but the one the submitting thread needs, ``cuda_host_threads``);
    ``device_work`` adds a layer's non-attention device work; ``graphs`` picks the device side
    (default: captured graphs on CUDA, eager on the stand-in); ``step_buffers`` are the static
    query and new-K/V buffers the graph path reads (default: its own, filled by copying the
    step's inputs; ``ModelDecode`` shares its model's instead).
    """

    def __init__(
        self, store: KvStore, accel: Accelerator, *, host_threads: int | None = None,
        scale: float | None = None, device_work: DeviceWork | None = None,
        kernels: HostKernels | None = None, graphs: bool | None = None,
        step_buffers: StepBuffers | None = None,
    ) -> None:
        split = getattr(accel, "split", None)
        threads = host_threads or (split.host_threads if split else cuda_host_threads())
        self.store = store
        self.accel = accel
        self.scale = scale if scale is not None else 1.0 / math.sqrt(store.head_dim)
        self.device_work = device_work
        self.kernels = kernels or HostKernels(threads, buffers=BufferPool(accel.host_empty))
        self.graphs = (not accel.standin) if graphs is None else graphs
        self.submit_core: int | None = None
        host_cores = split.host_cores() if split else None
        if not accel.standin:  # the submitting thread's core stays free of kernel threads
            self.submit_core, host_cores = submit_and_host_cores()
        self.host = WorkerStream("host-worker", cores=host_cores)
        if self.graphs:
            from hw_backend.graph_side import GraphDeviceSide

            self.side: DeviceSide = GraphDeviceSide(self, step_buffers)
        else:
            self.side = EagerDeviceSide(self)
        self._gil = ResponsiveGil()  # host, device and caller threads hand the GIL over fast
        self._run: _StepRun | None = None
        self._steps = 0

    # ------------------------------------------------------------------ whole steps
    def step(
        self, plan: StepPlan, queries: Sequence[torch.Tensor], *,
        new_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        speculative_queries: Sequence[torch.Tensor] | None = None, step: int | None = None,
        lookahead_queries: Sequence[torch.Tensor] | None = None,
    ) -> StepRun:
        """Run one decode step of ``plan`` over all layers, pipelined, and time it.

        ``queries[i]`` (B, H, D) is layer i's query on the device; ``new_kv[i]`` the new
        token's (K, V) (B, KVH, 1, D), appended before attention (omit it when the cache already
        holds ``plan.layer.context`` tokens); ``speculative_queries[i]`` InfiniGen's query
        approximation (default: the true query); ``lookahead_queries[i]`` the query the host
        uses when it starts layer i one layer early (default: the true query). Queries may be
        buffers that the device work fills before they are read (``ModelDeviceWork``).
        """
        if len(queries) != plan.num_layers:
            raise ValueError(f"{len(queries)} queries for a plan of {plan.num_layers} layers")
        with pinned_to(self.submit_core):
            run = self.begin_step(plan, appending=new_kv is not None, step=step)
            try:
                self._submit_all(run, queries, new_kv, speculative_queries, lookahead_queries)
            except BaseException:
                self._run = None  # a CUDA queue raises at submission; the step is abandoned
                raise
            return self.end_step()

    def _submit_all(
        self, run: _StepRun, queries: Sequence[torch.Tensor],
        new_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
        speculative_queries: Sequence[torch.Tensor] | None,
        lookahead_queries: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Submit every layer, host work of look-ahead layers one layer early."""
        plan = run.plan
        for i in range(plan.num_layers):
            spec = speculative_queries[i] if speculative_queries is not None else None
            run.qkv(i, queries[i], new_kv[i] if new_kv is not None else None, spec)
            if run.awaiting_launch(i):
                run.launch_host(i, run.layers[i].q_ready)
            ahead = i + 1
            if ahead < plan.num_layers and run.can_look_ahead(ahead):
                spec = speculative_queries[ahead] if speculative_queries is not None else None
                run.set_query(ahead, queries[ahead], spec)
                if lookahead_queries is not None:
                    run.layers[ahead].host_q = lookahead_queries[ahead]
                run.launch_host(ahead, run.layers[i].q_ready)
            run.prefetch_stream(i)  # no-op unless it had to wait for this layer's new token
            run.attention(i)
            run.prefetch_stream(ahead)
            run.upload(i)
            run.merge(i)
            run.post(i)

    # ------------------------------------------------------------------ layer at a time
    def begin_step(self, plan: StepPlan, *, appending: bool = True, step: int | None = None):
        """Start a step whose layers are then run one by one with ``run_layer``."""
        if self._run is not None:
            raise RuntimeError("a step is already in flight; call end_step() first")
        if plan.num_layers != len(self.store):
            raise ValueError(f"plan has {plan.num_layers} layers, the store {len(self.store)}")
        if plan.batch != self.store.batch:
            raise ValueError(f"plan is for batch {plan.batch}, the store holds {self.store.batch}")
        index = self._steps if step is None else step
        self._run = _StepRun(self, plan, appending=appending, step=index)
        return self._run

    def run_layer(
        self, layer: int, q: torch.Tensor,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        speculative_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one layer of the current step and return its attention output (B, H, D)."""
        run = self._run
        if run is None:
            raise RuntimeError("call begin_step() first")
        try:
            self.accel.wait_for_caller()  # q and the new K/V come from the caller's stream
            run.qkv(layer, q, new_kv, speculative_q)
            if run.awaiting_launch(layer):
                run.launch_host(layer, run.layers[layer].q_ready)
            run.prefetch_stream(layer)
            run.attention(layer)
            run.prefetch_stream(layer + 1)
            run.upload(layer)
            run.merge(layer)
            run.post(layer)
            state = run.layers[layer]
            state.merged.wait()
        except BaseException:
            self._run = None  # the step is abandoned; the next begin_step starts afresh
            raise
        assert state.output is not None
        return self.accel.hand_over(state.output)

    def end_step(self) -> StepRun:
        """Wait for the step in flight and return its outputs and measured timing."""
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("no step in flight")
        result = run.finish()
        self._steps = result.timing.step + 1
        return result

    def close(self) -> None:
        self.host.close()
        self._gil.close()

    @property
    def graph_stats(self):
        """Captures and replays of the graph path (None on the eager path)."""
        graphs = getattr(self.side, "graphs", None)
        return None if graphs is None else graphs.stats

    def __enter__(self) -> PlanExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StepRun:
    """Submits one step's work to the queues; ``finish`` waits and builds the records."""

    def __init__(self, ex: PlanExecutor, plan: StepPlan, *, appending: bool, step: int) -> None:
        self.ex, self.plan, self.appending, self.step = ex, plan, appending, step
        accel = ex.accel
        # Classify every layer before submitting anything: an unsupported plan changes nothing.
        check_host_socket(plan)
        self.layers = [LayerState(i, plan.layer_plan(i), ex.store[i], host_path(plan.layer_plan(i)))
                       for i in range(plan.num_layers)]
        self.side = ex.side
        self.origin = accel.origin()
        for state in self.layers:
            state.compute.append(accel.compute.submit(
                lambda s=state: self.side.repartition(s, self.appending),
                label=f"kv repartition {state.index}"))
        self.side.begin_step(self)
        self.ready = self.layers[-1].compute[-1] if self.layers else self.origin
        self._stream_launched = -1
        self.prefetch_stream(0)

    # ------------------------------------------------------------------ device queue

    def set_query(self, i: int, q: torch.Tensor, speculative_q: torch.Tensor | None) -> None:
        state = self.layers[i]
        state.q = q
        state.speculative_q = speculative_q if speculative_q is not None else q

    def qkv(
        self, i: int, q: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor] | None,
        speculative_q: torch.Tensor | None,
    ) -> None:
        """The layer's query becomes ready on the device (its new K/V appended first)."""
        self.set_query(i, q, speculative_q)
        state, work = self.layers[i], self.ex.device_work
        state.q_ready = self.ex.accel.compute.submit(
            lambda: self.side.qkv(state, new_kv, work), label=f"qkv {i}")
        state.compute.append(state.q_ready)

    def attention(self, i: int) -> None:
        """Attention over the device-resident tokens: the block the host's result joins."""
        state = self.layers[i]
        state.attn = self.ex.accel.compute.submit(lambda: self.side.attention(state),
                                                  label=f"attention {i}")
        state.compute.append(state.attn)

    def merge(self, i: int) -> None:
        state = self.layers[i]
        after = [] if state.path is None else [state.upload]
        label = f"output {i}" if state.path is None else f"merge {i}"
        state.merged = self.ex.accel.compute.submit(lambda: self.side.merge(state), after=after,
                                                    label=label)
        state.compute.append(state.merged)

    def post(self, i: int) -> None:
        work = self.ex.device_work
        if work is None:
            return
        state = self.layers[i]
        marker = self.ex.accel.compute.submit(lambda: self.side.post(state, work),
                                              label=f"post {i}")
        state.compute.append(marker)

    # ------------------------------------------------------------------ host paths
    def awaiting_launch(self, i: int) -> bool:
        state = self.layers[i]
        return state.path is not None and state.path is not HostPath.STREAM and state.trigger is None

    def new_token_on_host(self, state: LayerState) -> bool:
        """Whether this step's new token of the layer is appended to host memory (no recent
        window): host work over the range must then wait for the layer's qkv."""
        lp = state.lp
        return self.appending and lp.gpu_recent_tokens == 0 and lp.context - 1 >= lp.sink_tokens

    def can_look_ahead(self, i: int) -> bool:
        """Whether layer i's host work may start on layer i-1's qkv (see module doc)."""
        state = self.layers[i]
        if state.path in (None, HostPath.STREAM) or not state.lp.lookahead:
            return False
        return not self.new_token_on_host(state) and state.trigger is None

    def launch_host(self, i: int, trigger: Marker) -> None:
        """Submit layer i's host work, to start once ``trigger`` is done."""
        state, ex = self.layers[i], self.ex
        state.trigger = trigger
        if state.path is HostPath.SPECULATE:
            spec = ex.accel.compute.submit(lambda: self.side.speculate(state), after=[trigger],
                                           label=f"speculate {i}")
            state.compute.append(spec)
            after: Marker = spec
        else:
            after = trigger
        state.host_job = ex.host.submit(lambda: self._host_work(state, after), after=[after],
                                        label=f"host {i}")

    def _host_work(self, state: LayerState, after: Marker) -> HostPayload:
        """On the host worker: fetch what the CPU needs from the device, run the kernel
        (recording how long its thread then waited for a core: ``run_queue``)."""
        side = self.side
        t0 = time.perf_counter()
        if state.path is HostPath.SPECULATE:
            index = side.fetch_index(state, after)
        else:
            q = side.fetch_query(state, after)
        if self.new_token_on_host(state):
            side.host_append(state, after)
        state.fetch_s = time.perf_counter() - t0
        waited_before = run_queue.waited_s()
        payload = self._host_kernel(state, index if state.path is HostPath.SPECULATE else q)
        waited_after = run_queue.waited_s()
        if waited_before is not None and waited_after is not None:
            payload.wait_s = waited_after - waited_before
        return payload

    def _host_kernel(self, state: LayerState, q_or_index: torch.Tensor) -> HostPayload:
        """The plan's CPU operation (the query, or InfiniGen's speculated positions)."""
        ex, lp = self.ex, state.lp
        kernels, kv, span = ex.kernels, state.kv, lp.host_range()
        if state.path is HostPath.SPECULATE:
            return kernels.gather_kv(kv, q_or_index)
        q = q_or_index
        if state.path is HostPath.LOGITS:
            return kernels.logits_and_values(kv, span, q, lp.host_selected, ex.scale,
                                             exact=lp.exact, selection=lp.selection,
                                             group_score=lp.group_score)
        if lp.cpu_work is CpuWork.SPARSE_PARTIAL and not lp.exact:
            return kernels.sparse_partial(kv, span, q, lp.host_selected, ex.scale)
        return kernels.partial_attention(kv, span, q, ex.scale)

    def upload(self, i: int) -> None:
        """Copy the host's result to the device once the host work is done."""
        state = self.layers[i]
        if state.path in (None, HostPath.STREAM):
            return

        def run() -> None:
            payload: HostPayload = state.host_job.value
            self.side.upload(state, payload.tensors)

        state.upload = self.ex.accel.copy.submit(run, after=[state.host_job],
                                                 label=f"upload {i}")

    def prefetch_stream(self, i: int) -> None:
        """FlexGen: layer i's host K/V start copying when layer i-1's have landed and the
        double buffer's other half is free (layer i-2 merged); also after layer i's qkv when
        that appends the new token to host memory."""
        if i >= len(self.layers) or i <= self._stream_launched:
            return
        state = self.layers[i]
        if state.path is not HostPath.STREAM:
            return
        waits_for_token = self.new_token_on_host(state)
        if waits_for_token and state.q_ready is None:
            return  # launched once the layer's qkv has appended the token to host memory
        previous = self.layers[i - 1].upload if i > 0 else None
        trigger = previous or self.ready
        after = [trigger]
        if waits_for_token:
            after.append(state.q_ready)
        if i >= 2 and self.layers[i - 2].merged is not None:
            after.append(self.layers[i - 2].merged)
        start, end = state.lp.host_range()
        state.trigger = trigger
        state.upload = self.ex.accel.copy.submit(lambda: self.side.stream(state, start, end),
                                                 after=after, label=f"stream kv {i}")
        self._stream_launched = i

    # ------------------------------------------------------------------ records
    def finish(self) -> StepRun:
        accel = self.ex.accel
        work = self.ex.device_work
        if getattr(work, "after_layers", None) is not None:  # a model's final norm + LM head
            accel.compute.submit(lambda: self.side.after_layers(work), label="lm head")
        self.side.before_finish(self)
        end = accel.compute.submit(lambda: None, label="step end")
        end.wait()
        accel.synchronize()
        self.side.end_step(self)
        latency = end.elapsed_since(self.origin)
        records, selections = [], []
        for state in self.layers:
            records.append(self._layer_timing(state))
            selections.append(self._selection(state))
        plan = self.plan
        timing = step_timing(
            step=self.step, context=plan.layer.context, latency_s=latency, layers=records,
            topk_ratio=plan.layer.topk_ratio, gpu_tokens=plan.layer.gpu_tokens,
        )
        outputs = [self.side.step_output(state) for state in self.layers]
        accel.recycle_markers()  # every marker of the step has been read
        return StepRun(plan, outputs, selections, timing, records, accel.label)

    def _layer_timing(self, state: LayerState) -> LayerTiming:
        gpu_s = sum(m.duration_s() for m in state.compute)
        cpu_s = transfer_s = host_s = device_s = stall_s = variable_s = cpu_wait_s = 0.0
        upload_bytes = 0
        if state.path is not None:
            assert state.upload is not None and state.attn is not None
            assert state.trigger is not None
            upload_s = state.upload.duration_s()
            transfer_s = state.fetch_s + upload_s
            gather_s = 0.0
            if state.host_job is not None:
                payload = state.host_job.result()
                cpu_s, gather_s, cpu_wait_s = payload.cpu_s, payload.gather_s, payload.wait_s
            host_s = state.upload.elapsed_since(state.trigger)
            parts = cpu_s + transfer_s
            if state.path is not HostPath.STREAM and parts > 0:  # waiting shared out as parts
                variable_s = host_s * (gather_s + upload_s) / parts
            elif state.path is HostPath.STREAM:
                variable_s = host_s
            device_s = max(state.attn.elapsed_since(state.trigger), 0.0)
            stall_s = max(state.upload.elapsed_since(state.attn), 0.0)
            upload_bytes = sum(t.numel() * t.element_size() for t in state.uploaded.values())
        lp = state.lp
        return LayerTiming(
            step=self.step, layer=state.index, context=lp.context, cpu_s=cpu_s, gpu_s=gpu_s,
            transfer_s=transfer_s, stall_s=stall_s, host_s=host_s, device_s=device_s,
            host_tokens=lp.host_tokens, host_selected=lp.host_selected,
            gpu_tokens=lp.gpu_tokens, upload_bytes=upload_bytes, device=self.ex.accel.label,
            variable_s=variable_s, cpu_wait_s=cpu_wait_s,
        )

    @staticmethod
    def _selection(state: LayerState) -> torch.Tensor | None:
        """A copy (the host's index buffers are reused next step), per query head: a KV
        group's rows (per-KV-group selection) are what each head of the group attended."""
        if state.path is HostPath.SPECULATE:
            return state.speculated.cpu()
        if state.host_job is not None:
            index = state.host_job.result().index
            if index is None:
                return None
            heads = state.q.shape[1]
            if index.shape[1] != heads:
                return index.repeat_interleave(heads // index.shape[1], dim=1)
            return index.clone()
        return None


__all__ = [
    "HostPath", "LayerState", "PlanExecutor", "StepRun", "UnsupportedPlan", "host_path",
    "pinned_to", "submit_and_host_cores",
]

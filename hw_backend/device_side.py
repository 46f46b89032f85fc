"""The device half of a layer's work: what runs on the device's queues and what crosses to it.

``PlanExecutor`` decides *when* each piece of a layer runs (which queue, after which markers)
and records timing; a ``DeviceSide`` decides *how* the device does it. Two implement it:

* ``EagerDeviceSide`` (here): torch ops issued one by one on tensors shaped to the step (the
  CPU stand-in's path, where an "op" is a queued Python call anyway);
* ``graph_side.GraphDeviceSide``: fixed-shape programs over static buffers, each captured once
  per shape bucket as a CUDA graph and replayed (the default on CUDA).

Every method runs where the executor puts it: ``repartition`` .. ``post`` on the compute queue,
``upload`` and ``stream`` on the copy queue, ``fetch_*`` and ``host_append`` on the host worker.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod

import torch

from hw_backend.buffers import BufferPool
from hw_backend.layer_state import HostPath, LayerState
from hw_backend.merge import attend_rows, lse_merge, partial_attention, softmax_union
from hw_backend.streams import Marker


class DeviceSide(ABC):
    """See the module docstring; ``ex`` is the ``PlanExecutor`` it serves.

    The executor owns its side, so the side refers back to it weakly: a strong reference would
    make a cycle that only Python's cyclic collector frees, keeping the executor's model
    weights, KV store and staging buffers allocated after the caller dropped it. Under an HBM
    budget the next run's allocations (a validation case's fresh 16 GB of weights) then fail.
    """

    def __init__(self, ex) -> None:
        self.ex = weakref.proxy(ex)

    #: Whether every token this side puts on the device also reaches host memory by the end
    #: of its step (``LayerKv.write_through``). Set on every repartition, not once: executors
    #: of both kinds may take turns over one store (benchmarks), and an eager one inheriting a
    #: graph path's True would skip copying its device-only tokens to the host when they leave.
    writes_through = False

    # ------------------------------------------------------------------ compute queue
    def repartition(self, state: LayerState, appending: bool) -> None:
        lp, kv = state.lp, state.kv
        kv.write_through = self.writes_through
        if lp.context != kv.length + (1 if appending else 0):
            raise ValueError(f"layer {state.index}: plan context {lp.context} but cache holds "
                             f"{kv.length} tokens (appending={appending})")
        if state.path is HostPath.SPECULATE:
            kv.enable_partial_keys(lp.speculate_key_fraction or 1.0)
        kv.repartition(lp.sink_tokens, lp.gpu_recent_tokens, lp.context)

    def begin_step(self, run) -> None:  # noqa: B027 - nothing per step by default
        """Submitted once per step after every layer's repartition (the graph path's per-step
        counts)."""

    @abstractmethod
    def qkv(self, state: LayerState, new_kv, work) -> None:
        """The layer's query becomes ready (``work.before_attention``), its new K/V appended."""

    @abstractmethod
    def attention(self, state: LayerState) -> None:
        """Attention over the device-resident tokens into ``state.device_part``."""

    @abstractmethod
    def speculate(self, state: LayerState) -> None:
        """InfiniGen: the speculated host positions into ``state.speculated``."""

    @abstractmethod
    def merge(self, state: LayerState) -> None:
        """The device part and what crossed, merged into ``state.output``."""

    def post(self, state: LayerState, work) -> None:
        work.after_attention(state.index, state.output)

    # ------------------------------------------------------------------ copy queue
    @abstractmethod
    def upload(self, state: LayerState, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the host's results to the device (``state.uploaded``)."""

    @abstractmethod
    def stream(self, state: LayerState, start: int, end: int) -> None:
        """FlexGen: copy host K/V of positions [start, end) to the device."""

    # ------------------------------------------------------------------ host worker
    def fetch_query(self, state: LayerState, after: Marker) -> torch.Tensor:
        """The query the host uses (the look-ahead one when started early), on the host."""
        ex = self.ex
        source = state.host_q if state.host_q is not None else state.q
        q = ex.kernels.buffers.take((id(state.kv), "query"), tuple(source.shape), torch.float32)
        ex.accel.fetch(q, source, after)
        return q

    def fetch_index(self, state: LayerState, after: Marker) -> torch.Tensor:
        """InfiniGen's speculated positions (B, H, k), on the host, contiguous."""
        ex = self.ex
        index = ex.kernels.buffers.take((id(state.kv), "index"), tuple(state.speculated.shape),
                                        torch.int64)
        ex.accel.fetch(index, state.speculated, after)
        return index

    def host_append(self, state: LayerState, after: Marker) -> None:  # noqa: B027
        """Make this step's new token, which lands in host memory, visible to the host kernel
        (eagerly the append wrote it there already)."""

    # ------------------------------------------------------------------ step end
    def after_layers(self, work) -> None:
        """The work after the last layer (a model's final norm and LM head), on the compute
        queue inside the step."""
        work.after_layers()

    def before_finish(self, run) -> None:  # noqa: B027 - nothing to add by default
        """Submitted on the compute queue right before the step's end marker."""

    def end_step(self, run) -> None:  # noqa: B027 - nothing to do by default
        """After the device finished the step (graph path: write-through to host memory)."""

    def step_output(self, state: LayerState) -> torch.Tensor:
        """The layer's output as the step's result keeps it."""
        return state.output


class EagerDeviceSide(DeviceSide):
    """Torch ops issued one by one on tensors shaped to the step."""

    def __init__(self, ex) -> None:
        super().__init__(ex)
        self.device_buffers = BufferPool(ex.accel.empty)  # upload destinations, by layer parity

    def qkv(self, state, new_kv, work) -> None:
        if work is not None:
            work.before_attention(state.index)
        if new_kv is not None:
            state.kv.append(*new_kv)

    def attention(self, state) -> None:
        k, v = state.kv.device_kv()
        state.device_part = partial_attention(state.q, k, v, self.ex.scale)

    def speculate(self, state) -> None:
        kv, lp = state.kv, state.lp
        start, end = lp.host_range()
        query = kv.partial_query(state.speculative_q.to(kv.dtype))  # (B, KVH, G, c)
        keys = kv.partial_k[:, :, start:end]  # (B, KVH, n, c)
        scores = torch.matmul(query, keys.transpose(-1, -2)).float()
        scores = scores.reshape(query.shape[0], -1, end - start)
        state.speculated = torch.topk(scores, lp.host_selected, dim=-1).indices + start

    def merge(self, state) -> None:
        up, device_part, scale = state.uploaded, state.device_part, self.ex.scale
        if state.path is None:
            state.output = device_part[0]
            return
        if state.path is HostPath.LOGITS:
            values = up["rows"] if "rows" in up else up["values"]
            merged = softmax_union(device_part, up["logits"], values)
        elif state.path is HostPath.PARTIAL:
            merged = lse_merge([device_part, (up["out"], up["lse"])])
        elif state.path is HostPath.STREAM:
            merged = lse_merge([device_part, partial_attention(state.q, up["k"], up["v"], scale)])
        else:  # SPECULATE
            merged = lse_merge([device_part, attend_rows(state.q, up["k_rows"], up["v_rows"],
                                                         scale)])
        state.output = merged[0]

    def upload(self, state, tensors) -> None:
        parity = state.index % 2
        state.uploaded = {name: self._to_device(t, (parity, name)) for name, t in tensors.items()}

    def stream(self, state, start, end) -> None:
        kv, parity = state.kv, state.index % 2
        state.uploaded = {"k": self._to_device(kv.host_k[:, :, start:end], (parity, "k")),
                          "v": self._to_device(kv.host_v[:, :, start:end], (parity, "v"))}

    def _to_device(self, t: torch.Tensor, key: tuple[int, str]) -> torch.Tensor:
        """A real copy into a device buffer for ``key`` (non-blocking from pinned memory),
        reused by every other layer and step (``BufferPool``): layers alternate between two
        sets, since layer i's merge is done before layer i+2's host results exist (its host
        work starts at layer i+1's qkv at the earliest, FlexGen's stream waits for it)."""
        accel = self.ex.accel
        dst = self.device_buffers.take(key, tuple(t.shape), t.dtype)
        copy_blocks(dst, t, standin=accel.standin)
        return dst


def copy_blocks(dst: torch.Tensor, src: torch.Tensor, *, standin: bool) -> None:
    """``dst.copy_(src)`` from host memory, non-blocking; a (B, KVH, T, D) range of a pinned
    cache is copied per (batch, KV head), where it is contiguous (one big copy would first
    gather it into a temporary on the host)."""
    if standin or src.is_contiguous() or src.dim() != 4:
        source = src if standin or src.is_contiguous() else src.contiguous()
        if not standin and not source.is_pinned():
            source = source.pin_memory()
        dst.copy_(source, non_blocking=True)
        return
    for b in range(src.shape[0]):
        for h in range(src.shape[1]):
            dst[b, h].copy_(src[b, h], non_blocking=True)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["DeviceSide", "EagerDeviceSide", "copy_blocks", "default_scale"]

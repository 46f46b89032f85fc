"""The host half of a layer: the CPU work a plan asks for, over the host-resident tokens.

Each function runs on the host worker thread, reads the layer's host K/V in place (the C kernel
scans the plan's absolute host range ``span = [start, end)``; the plan's, not the cache's, since
with look-ahead the host may start before the layer's new token is appended), and returns the tensors that then cross to the
device, together with the CPU time it took. What crosses depends on the plan:

* ``LOGITS_TOPK`` (HybridGen): scaled logits of the selected host tokens and their V rows. In
  exact mode (every host token selected) no top-k is needed: all logits plus the contiguous V
  block of the range (per KV head, so GQA groups do not duplicate rows). Selecting per query
  head, rows (B, H, k, D) follow each head's top-k; per KV group (``plan.GroupSelect``) the
  group's distinct rows are gathered once per KV head, (B, KVH, m, D), with every head's logits
  over them (B, H, m) (``cpu_attention.logits_topk_grouped``).
* ``PARTIAL_ATTENTION`` (CPU offload, FlexGen-CPU): attention output over the range and its LSE.
* ``SPARSE_PARTIAL`` (HGCA): per-head top-k by logits, attention over those tokens, output+LSE.
* InfiniGen's gather: the K and V rows of the tokens the device speculated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hgsim.plan import GroupScore, GroupSelect
from hw_backend import cpu_attention
from hw_backend.buffers import BufferPool
from hw_backend.kv_store import LayerKv


@dataclass
class HostPayload:
    """Host tensors bound for the device plus what producing them cost."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # crosses to the device
    cpu_s: float = 0.0  # C kernel time
    # selected absolute positions (B, H, k), or (B, KVH, m) per KV group; stays on host
    index: torch.Tensor | None = None
    gather_s: float = 0.0  # of cpu_s, gathering selected rows (grows with the top-k ratio)
    wait_s: float = 0.0  # of cpu_s, the host thread runnable but waiting for a core
    # (buffers are reused: the tensors are valid until the layer's next step)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class HostKernels:
    """The CPU operations of every plan kind, run with a fixed number of kernel threads."""

    def __init__(self, threads: int, kernels: cpu_attention.CpuAttention | None = None,
                 buffers: BufferPool | None = None) -> None:
        self.threads = threads
        self.ops = kernels or cpu_attention.backend()
        # what crosses to the device is written into reused (on CUDA: pinned) buffers
        self.buffers = buffers or BufferPool(lambda shape, dtype: torch.empty(shape, dtype=dtype))

    def logits_and_values(
        self, kv: LayerKv, span: tuple[int, int], q: torch.Tensor, selected: int, scale: float, *,
        exact: bool, selection: GroupSelect = GroupSelect.PER_HEAD,
        group_score: GroupScore = GroupScore.MAX,
    ) -> HostPayload:
        """HybridGen's CPU side: host logits (top-k unless exact) and the matching V rows, per
        query head or per KV group (``selection``; one head per KV group selects per head)."""
        start, end = span
        t0 = time.perf_counter()
        batch, heads = q.shape[:2]
        if exact:  # every host token: no top-k, V crosses as the range's block per KV head
            logits = self.buffers.take((id(kv), "logits"), (batch, heads, end - start),
                                       torch.float32)
            self.ops.logits(q, kv.host_k, scale=scale, start=start, end=end,
                            num_threads=self.threads, out=logits)
            values = kv.host_v[:, :, start:end]  # a view; the upload reads it in place
            return HostPayload({"logits": logits, "values": values}, time.perf_counter() - t0)
        kv_heads = kv.host_k.shape[1]
        if GroupSelect(selection) is not GroupSelect.PER_HEAD and heads > kv_heads:
            return self._group_logits_and_values(kv, span, q, selected, scale, t0,
                                                 GroupSelect(selection), GroupScore(group_score))
        logits = self.buffers.take((id(kv), "logits"), (batch, heads, selected), torch.float32)
        index = self.buffers.take((id(kv), "selected"), (batch, heads, selected), torch.int64)
        self.ops.logits_topk(q, kv.host_k, selected, scale=scale, start=start, end=end,
                             num_threads=self.threads, out=(logits, index))
        rows = self.buffers.take((id(kv), "rows"), (batch, heads, selected, kv.host_v.shape[3]),
                                 kv.host_v.dtype)
        t1 = time.perf_counter()
        self.ops.gather_rows(kv.host_v, index, num_threads=self.threads, out=rows)
        t2 = time.perf_counter()
        return HostPayload({"logits": logits, "rows": rows}, t2 - t0, index, gather_s=t2 - t1)

    def _group_logits_and_values(
        self, kv: LayerKv, span: tuple[int, int], q: torch.Tensor, selected: int, scale: float,
        t0: float, selection: GroupSelect, group_score: GroupScore,
    ) -> HostPayload:
        """Per KV group: the group's rows (union or shared top-k), each gathered once per KV
        head, and every head's logits over them (the kernel's buffers are sized for the most
        rows a group may keep; its results, and the rows, for the widest group's m)."""
        start, end = span
        batch, heads = q.shape[:2]
        kv_heads, dim = kv.host_k.shape[1], kv.host_v.shape[3]
        cap = cpu_attention.group_capacity(selection.value, heads // kv_heads, selected,
                                           end - start)
        take = self.buffers.take
        out = (take((id(kv), "group logits"), (batch, heads, cap), torch.float32),
               take((id(kv), "group selected"), (batch, kv_heads, cap), torch.int64),
               take((id(kv), "group counts"), (batch, kv_heads), torch.int64))
        logits, index, _ = self.ops.logits_topk_grouped(
            q, kv.host_k, selected, mode=selection.value, score=group_score.value, scale=scale,
            start=start, end=end, num_threads=self.threads, out=out)
        rows = take((id(kv), "rows"), (*index.shape, dim), kv.host_v.dtype)
        t1 = time.perf_counter()
        self.ops.gather_rows(kv.host_v, index, num_threads=self.threads, out=rows)
        t2 = time.perf_counter()
        return HostPayload({"logits": logits, "rows": rows}, t2 - t0, index, gather_s=t2 - t1)

    def partial_attention(
        self, kv: LayerKv, span: tuple[int, int], q: torch.Tensor, scale: float
    ) -> HostPayload:
        """Attention over the whole host range on the CPU: output and LSE cross, nothing else."""
        start, end = span
        t0 = time.perf_counter()
        out, lse = self.ops.partial_attention(q, kv.host_k, kv.host_v, scale=scale, start=start,
                                              end=end, num_threads=self.threads)
        return HostPayload({"out": out, "lse": lse}, time.perf_counter() - t0)

    def sparse_partial(
        self, kv: LayerKv, span: tuple[int, int], q: torch.Tensor, selected: int, scale: float
    ) -> HostPayload:
        """HGCA's CPU side: attention over each head's top-``selected`` host tokens."""
        start, end = span
        t0 = time.perf_counter()
        batch, heads = q.shape[:2]
        scores = self.buffers.take((id(kv), "logits"), (batch, heads, selected), torch.float32)
        index = self.buffers.take((id(kv), "selected"), (batch, heads, selected), torch.int64)
        self.ops.logits_topk(q, kv.host_k, selected, scale=scale, start=start, end=end,
                             num_threads=self.threads, out=(scores, index))
        t1 = time.perf_counter()
        out, lse = self.ops.sparse_attention(q, kv.host_k, kv.host_v, index, scale=scale,
                                             num_threads=self.threads)
        t2 = time.perf_counter()
        return HostPayload({"out": out, "lse": lse}, t2 - t0, index, gather_s=t2 - t1)

    def gather_kv(self, kv: LayerKv, index: torch.Tensor) -> HostPayload:
        """InfiniGen's fetch: K and V rows (B, H, k, D) of the speculated tokens."""
        t0 = time.perf_counter()
        shape = (*index.shape, kv.host_k.shape[3])
        k_rows = self.buffers.take((id(kv), "k rows"), shape, kv.host_k.dtype)
        v_rows = self.buffers.take((id(kv), "v rows"), shape, kv.host_v.dtype)
        self.ops.gather_rows(kv.host_k, index, num_threads=self.threads, out=k_rows)
        self.ops.gather_rows(kv.host_v, index, num_threads=self.threads, out=v_rows)
        elapsed = time.perf_counter() - t0
        return HostPayload({"k_rows": k_rows, "v_rows": v_rows}, elapsed, index, gather_s=elapsed)


__all__ = ["HostKernels", "HostPayload"]

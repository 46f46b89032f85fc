"""Kernels per graph op, counted from the programs the graph path captures.

A captured graph replays every kernel its program issued during capture, back to back on the
device; the simulator charges a graph op ``graph_launch_overhead_us + (kernels - 1) *
graph_kernel_gap_us`` (``hgsim.graph_path``) and needs each op's kernel count for it. The count
is taken here, on the CPU stand-in, by running the same programs eagerly under a dispatch mode
that counts the ATen operators each one issues, leaving out those that launch nothing on a
GPU (views, allocations, metadata). ``tests/test_graph_kernels.py`` recounts with it so that
the simulator's declared table (``hgsim.graph_path.GRAPH_KERNELS``) cannot drift from the
programs.

An ATen operator is one kernel on CUDA for everything these programs use except cuBLAS GEMMs
at some shapes (split-K adds a reduction kernel) and ``topk`` (a sort for large k); those are
counted as one kernel each, which is the approximation the table inherits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable

from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that launch no kernel on a GPU: allocations and metadata.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh",
              "_local_scalar_dense", "t", "unsqueeze", "squeeze", "expand", "view", "reshape",
              "_reshape_alias", "as_strided", "slice", "select", "split", "split_with_sizes",
              "chunk", "unbind", "transpose", "permute", "_unsafe_view", "clone_view"}


def launches_kernel(func) -> bool:
    """Whether an ATen operator issues a device kernel (views and allocations do not)."""
    if getattr(func, "is_view", False):
        return False
    return func._schema.name.split("::")[-1] not in _NO_KERNEL


class KernelCounter(TorchDispatchMode):
    """Counts the kernel-launching ATen operators run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if launches_kernel(func):
            self.kernels += 1
            self.names.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def op_kind(key: tuple, label: str) -> str:
    """The simulator's name for a graph op (``hgsim.graph_path``) from a ``GraphCache`` key:
    merges by what the host sent (top-k or exact logits, partial, stream, rows)."""
    if label != "merge":
        return label
    path, shapes = key[2], key[3]
    if path == "logits":
        return "merge_logits_exact" if len(shapes[1]) == 4 else "merge_logits_topk"
    return {"partial": "merge_partial", "stream": "merge_stream",
            "speculate": "merge_rows"}[path]


def count_graph_kernels(side) -> dict[str, set[int]]:
    """Wrap a ``GraphDeviceSide``'s cache (eager, on the stand-in) so that every program run
    records its kernel count under its op kind; returns that (live) record."""
    counts: dict[str, set[int]] = defaultdict(set)

    def counted(key: Hashable, label: str, fn) -> Callable[[], None]:
        def program() -> None:
            with KernelCounter() as counter:
                fn()
            counts[op_kind(key, label)].add(counter.kernels)

        return program

    side.graphs.wrap_programs(counted)
    return counts


__all__ = ["KernelCounter", "count_graph_kernels", "launches_kernel", "op_kind"]

"""What hw_backend's CUDA graph path changes about a step's device work, as pure functions.

On CUDA the executor issues each device op of a layer (qkv, [speculate], attention, merge,
post) and the step's LM head as one replay of a captured graph (``hw_backend.graph_side``).
Three things then differ from a stream of separately launched kernels, and the simulator
models them when it simulates the graph path (``uses_graph_replay``):

* fixed cost: one replay launches an op's kernels back to back, so the op costs
  ``graph_launch_overhead_us + (kernels - 1) * graph_kernel_gap_us`` beyond its roofline time
  (``graph_op_fixed_us``) instead of ``kernel_launch_overhead_us`` per kernel; the kernel counts
  are ``GRAPH_KERNELS``, counted from the captured programs (``hw_backend.graph_kernels``,
  recounted by ``tests/test_graph_kernels.py`` so that the table cannot drift);
* no separate cache update: the new token's K and V are written into their device slot inside
  the qkv graph (a sliding window reuses the leaving token's slot), so the ``kv_update`` kernel
  folds into qkv (its bytes too) and costs no launch of its own, and the leaving token is not
  written to host memory (it got there at the end of the step it arrived in, below);
* padding: device attention and the merges read their counts rounded up to a shape bucket
  (``hgsim.shape_buckets.token_bucket``, the function the executor sizes its graphs with);
* two copies a step on the compute queue, in stream order with the replays: the step's count
  table (``count_table_bytes``: what every graph reads its counts from) to the device before
  the first replay, and every layer's new K and V (``new_token_bytes``) to host memory after
  the last one (the write-through that keeps host memory complete). Each pays its PCIe
  route's latency, which a short step feels.

The simulator assumes the graph path exactly when the GPU's profile carries the graph figures
``hgsim calibrate`` measures on CUDA (``graph_launch_overhead_us`` and ``graph_kernel_gap_us``):
such a profile describes a CUDA device, where the executor runs graphs by default. A profile
without them (every shipped profile, and the CPU stand-in's, whose executor runs eagerly) keeps
the per-launch model: ``kernel_launch_overhead_us`` per simulated kernel, exact sizes and a
``kv_update`` kernel of its own. A run forced onto the eager path on CUDA (``hgsim run
--eager``) is predicted with ``eager_profile``, which clears those figures.
"""

from __future__ import annotations

from dataclasses import replace

from hgsim.costs import LayerWork, Work, projects_next_query
from hgsim.plan import CpuWork, LayerPlan, Transfer
from hgsim.shape_buckets import token_bucket
from hgsim.specs.hardware import GpuSpec, HardwareProfile
from hgsim.specs.model import DTYPE_BYTES, ModelSpec

#: Kernels each graph op issues (kernel-launching ATen operators of its captured program,
#: counted on the CPU stand-in by ``hw_backend.graph_kernels``). Ops that run a model's own
#: work are keyed by (family, bytes of the weights' dtype): the norms promote 16-bit inputs to
#: float32 and back; ops over the KV cache by the bytes of the KV dtype (16-bit KV is promoted
#: to float32 for the softmax). ``append`` and ``partial_key`` are the cache writes that the
#: qkv graph adds (the new token's K and V into its slot; InfiniGen's partial key channels),
#: ``lookahead_query`` the next layer's query projection that look-ahead adds to qkv.
GRAPH_KERNELS: dict[str, dict] = {
    "qkv": {("llama", 4): 27, ("llama", 2): 30, ("qwen", 4): 28, ("qwen", 2): 31,
            ("opt", 4): 6, ("opt", 2): 10},
    "lookahead_query": {("llama", 4): 20, ("llama", 2): 23, ("qwen", 4): 21, ("qwen", 2): 24,
                        ("opt", 4): 4, ("opt", 2): 8},
    "post": {("llama", 4): 14, ("llama", 2): 18, ("qwen", 4): 14, ("qwen", 2): 18,
             ("opt", 4): 11, ("opt", 2): 16},
    "lm_head": {("llama", 4): 11, ("llama", 2): 15, ("qwen", 4): 11, ("qwen", 2): 15,
                ("opt", 4): 6, ("opt", 2): 11},
    "append": {4: 2, 2: 2},
    "partial_key": {4: 2, 2: 2},
    "attention": {4: 25, 2: 29},
    "speculate": {4: 10, 2: 12},
    "merge_logits_topk": {4: 52, 2: 54},
    "merge_logits_exact": {4: 43, 2: 45},
    "merge_partial": {4: 15, 2: 15},
    "merge_stream": {4: 38, 2: 42},
    "merge_rows": {4: 54, 2: 58},
}

#: Ops keyed by the model's family and weight dtype (the rest by the KV dtype).
MODEL_OPS = frozenset({"qkv", "lookahead_query", "post", "lm_head"})


def uses_graph_replay(gpu: GpuSpec) -> bool:
    """Whether the simulator models the graph path for this GPU (see the module doc)."""
    return gpu.graph_launch_overhead_us is not None and gpu.graph_kernel_gap_us is not None


def eager_profile(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` with its GPUs' graph figures cleared: the prediction of an executor run on
    the eager path (``hgsim run --eager``), which launches every kernel on its own."""
    gpus = {name: gpu.model_copy(update={"graph_launch_overhead_us": None,
                                         "graph_kernel_gap_us": None})
            for name, gpu in profile.gpus.items()}
    return profile.model_copy(update={"gpus": gpus})


def graph_op_fixed_us(kernels: int, graph_launch_overhead_us: float,
                      graph_kernel_gap_us: float) -> float:
    """Fixed cost of one graph replay of ``kernels`` kernels: the replay's launch, then a gap
    between consecutive kernels on the device."""
    if kernels < 1:
        raise ValueError(f"a graph op issues at least one kernel, got {kernels}")
    return graph_launch_overhead_us + (kernels - 1) * graph_kernel_gap_us


def _width(dtype: str) -> int:
    """4 for 32-bit dtypes, 2 for 16-bit ones (what changes the programs' conversions)."""
    return 4 if DTYPE_BYTES[dtype] >= 4 else 2


def op_kernels(op: str, model: ModelSpec, weight_dtype: str, kv_dtype: str) -> int:
    """``GRAPH_KERNELS`` of one op for a model and its dtypes."""
    table = GRAPH_KERNELS[op]
    if op in MODEL_OPS:
        return table[(model.family, _width(weight_dtype))]
    return table[_width(kv_dtype)]


def merge_op(lp: LayerPlan) -> str | None:
    """Which merge program the executor runs for the layer's host path (None: no merge)."""
    if not lp.host_tokens or lp.host_evicted:
        return None
    if lp.transfer is Transfer.KV_ALL:
        return "merge_stream"
    if not lp.host_selected and lp.cpu_work is not CpuWork.PARTIAL_ATTENTION:
        return None  # nothing selected: the host sends nothing
    if lp.transfer is Transfer.KV_SELECTED:
        return "merge_rows"
    if lp.transfer is Transfer.PARTIAL_OUTPUT:
        return "merge_partial"
    if lp.cpu_work is CpuWork.LOGITS_TOPK:
        return "merge_logits_exact" if lp.host_selected == lp.host_tokens else "merge_logits_topk"
    return None


def merge_count(lp: LayerPlan) -> int:
    """The count a merge's device work grows with (0: fixed size, a partial output)."""
    op = merge_op(lp)
    if op in ("merge_stream", "merge_logits_exact"):
        return lp.host_tokens
    if op in ("merge_rows", "merge_logits_topk"):
        return lp.host_selected
    return 0


def qkv_kernels(model: ModelSpec, lp: LayerPlan, weight_dtype: str, kv_dtype: str, *,
                attention_only: bool) -> int:
    """Kernels of a layer's qkv graph: the model's projections (none attention-only), the
    new token's cache write when it lands in a device slot, InfiniGen's partial keys, and the
    look-ahead query projection (``costs.projects_next_query``)."""
    kernels = 0 if attention_only else op_kernels("qkv", model, weight_dtype, kv_dtype)
    if lp.gpu_recent_tokens > 0:
        kernels += op_kernels("append", model, weight_dtype, kv_dtype)
    if lp.speculate_key_fraction and lp.host_tokens and not lp.host_evicted:
        kernels += op_kernels("partial_key", model, weight_dtype, kv_dtype)
    if projects_next_query(lp, attention_only=attention_only):
        kernels += op_kernels("lookahead_query", model, weight_dtype, kv_dtype)
    return max(kernels, 1)


#: int64 fields per layer of the step's count table (``hw_backend.graph_side.FIELDS``: device
#: tokens, append slot, host count, host range start and end, position)
COUNT_TABLE_FIELDS = 6


def count_table_bytes(layers: int) -> int:
    """Bytes of the count table copied to the device at the start of a graph-path step."""
    return layers * COUNT_TABLE_FIELDS * 8


def new_token_bytes(model: ModelSpec, batch: int, kv_dtype: str, layers: int) -> int:
    """Bytes of every layer's new K and V copied to host memory at the end of a graph-path step
    (``hw_backend.step_buffers.StepBuffers.new_tokens``)."""
    return layers * 2 * batch * model.num_kv_heads * model.head_dim * DTYPE_BYTES[kv_dtype]


def _scaled(work: Work, count: int) -> Work:
    """``work``, linear in ``count``, at the count's bucket."""
    if not count:
        return work
    factor = token_bucket(count) / count
    return Work(work.flops * factor, work.bytes_ * factor)


def graph_layer_work(w: LayerWork, lp: LayerPlan) -> LayerWork:
    """A layer's work as the graph path does it: attention over the bucket of resident tokens,
    the merge over the bucket of what the host sent, the cache update folded into qkv, and no
    eviction write (the token leaving the window reached host memory with its own step's
    ``new_token_bytes``, ``hw_backend.kv_store``'s write-through)."""
    qkv = Work(w.qkv.flops + w.kv_update.flops, w.qkv.bytes_ + w.kv_update.bytes_)
    return replace(w, qkv=qkv, kv_update=Work(), evict_bytes=0.0,
                   attn=_scaled(w.attn, lp.gpu_tokens + lp.selected_on_gpu),
                   merge=_scaled(w.merge, merge_count(lp)))


__all__ = [
    "COUNT_TABLE_FIELDS", "count_table_bytes", "new_token_bytes",
    "GRAPH_KERNELS", "MODEL_OPS", "eager_profile", "graph_layer_work", "graph_op_fixed_us", "merge_count",
    "merge_op", "op_kernels", "qkv_kernels", "uses_graph_replay",
]

"""The simulator's model of hw_backend's whole-model step and CUDA graph path, in closed form.

* every whole-model step ends with the final norm and LM head (vocab x hidden weights read);
* with the profile's graph figures an op costs ``graph_launch_overhead_us + (kernels - 1) x
  graph_kernel_gap_us`` beyond its roofline time, the cache update is part of qkv (no launch of
  its own), attention and merges read the executor's bucket sizes;
* without them, the per-launch model: ``kernel_launch_overhead_us`` per simulated kernel.
"""

from __future__ import annotations

import pytest
import simpy

from hgsim import graph_path
from hgsim.catalog import get_model
from hgsim.costs import layer_work, lm_head_work
from hgsim.policies import make_policy
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.shape_buckets import token_bucket
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
LAUNCH_US, GAP_US = 4.0, 1.5
MODEL = get_model("llama-3.1-8b")


def graph_profile():
    return profile_with_overrides(load_profile(H100), {
        "gpus.gpu0.graph_launch_overhead_us": LAUNCH_US, "gpus.gpu0.graph_kernel_gap_us": GAP_US})


def engine(profile, *, attention_only=False, dtype="bf16", **kw) -> DecodeEngine:
    return DecodeEngine(Machine(simpy.Environment(), profile), MODEL, dtype, dtype,
                        attention_only=attention_only, **kw)


def plan(policy: str, context: int, profile=None, **options):
    pol = make_policy(policy, MODEL, profile or load_profile(H100),
                      Workload(context=context, gen=1, kv_dtype="bf16", weight_dtype="bf16"),
                      options or None)
    return pol.step_plan(context)


def copy_s(eng: DecodeEngine, src: str, dst: str, bytes_: float) -> float:
    """A copy alone on its route: the route's latency plus bytes over its narrowest channel."""
    route = eng.machine.path(src, dst)
    return route.latency_s + bytes_ / min(c.capacity for c in route.channels)


def graph_path_copies_s(eng: DecodeEngine, layers: int, batch: int = 1) -> float:
    """The graph path's two copies a step: the count table in, the new K and V out."""
    return (copy_s(eng, eng.staging, "gpu0", graph_path.count_table_bytes(layers))
            + copy_s(eng, "gpu0", eng.staging,
                     graph_path.new_token_bytes(MODEL, batch, "bf16", layers)))


def test_the_lm_head_reads_vocab_times_hidden_weights():
    work = lm_head_work(MODEL, 1, "bf16")
    assert MODEL.vocab_size == 128256 and MODEL.hidden_size == 4096
    assert work.bytes_ == (128256 + 1) * 4096 * 2  # the matrix and the final norm's weights
    assert 128256 * 4096 * 2 == pytest.approx(1.05e9, rel=1e-3)
    assert lm_head_work(MODEL, 4, "bf16").flops == 4 * work.flops
    assert lm_head_work(MODEL, 1, "fp32").bytes_ == 2 * work.bytes_


@pytest.mark.parametrize("graphs", [False, True], ids=["per-launch", "graph-path"])
def test_a_whole_model_step_ends_with_the_lm_head(graphs):
    profile = graph_profile() if graphs else load_profile(H100)
    whole, only = engine(profile), engine(profile, attention_only=True)
    step = plan("gpu_only", 4096, profile)
    layers = MODEL.num_layers
    measure = whole.step(step)
    stream = whole.machine.gpu_stream("gpu0")
    assert stream.launched == 3 * layers + 1  # qkv, attention, post per layer; the LM head
    only.step(step)
    assert only.machine.gpu_stream("gpu0").launched == 3 * layers
    w, lp = whole.work(1, step.layer), step.layer
    head = whole._kernel_s(lm_head_work(MODEL, 1, "bf16"), fixed_s=whole.op_fixed_s("lm_head"))
    per_layer = (whole._kernel_s(w.qkv, fixed_s=whole.op_fixed_s("qkv", lp))
                 + whole._kernel_s(w.attn, True, whole.op_fixed_s("attention"))
                 + whole._kernel_s(w.post, fixed_s=whole.op_fixed_s("post")))
    assert measure.gpu_busy_s == pytest.approx(layers * per_layer + head, rel=1e-12)
    copies = graph_path_copies_s(whole, layers) if graphs else 0.0
    assert measure.latency_s == pytest.approx(measure.gpu_busy_s + copies, rel=1e-9)
    gpu = profile.gpus["gpu0"]
    memory_s = lm_head_work(MODEL, 1, "bf16").bytes_ / (gpu.hbm_bandwidth_gbps * 1e9
                                                        * gpu.memory_efficiency)
    fixed = (graph_path.graph_op_fixed_us(graph_path.op_kernels("lm_head", MODEL, "bf16", "bf16"),
                                          LAUNCH_US, GAP_US) if graphs
             else gpu.kernel_launch_overhead_us) * 1e-6
    assert head == pytest.approx(fixed + memory_s, rel=1e-12)


def test_a_graph_op_costs_one_replay_plus_a_gap_per_further_kernel():
    eng = engine(graph_profile())
    assert eng.graph_replay
    kernels = graph_path.GRAPH_KERNELS["attention"][2]  # bf16 KV
    assert eng.op_fixed_s("attention") == pytest.approx(
        (LAUNCH_US + (kernels - 1) * GAP_US) * 1e-6)
    assert graph_path.graph_op_fixed_us(1, LAUNCH_US, GAP_US) == LAUNCH_US
    with pytest.raises(ValueError):
        graph_path.graph_op_fixed_us(0, LAUNCH_US, GAP_US)
    step = plan("hybridgen_static", 65536, topk_ratio=0.1, gpu_share=0.3)
    lp = step.layer
    w = eng.work(1, lp)
    fixed = eng.op_fixed_s("attention")
    launch, compute_s, memory_s = eng.machine.kernel_terms("gpu0", w.attn.flops, w.attn.bytes_,
                                                           dtype="bf16",
                                                           memory_eff=eng.attn_eff)
    assert eng._kernel_s(w.attn, True, fixed) == pytest.approx(fixed + max(compute_s, memory_s))
    # qkv: the model's projections, the append into the window's slot and the look-ahead query
    k = graph_path.GRAPH_KERNELS
    assert lp.gpu_recent_tokens > 0 and lp.lookahead
    assert graph_path.qkv_kernels(MODEL, lp, "bf16", "bf16", attention_only=False) == (
        k["qkv"][("llama", 2)] + k["append"][2] + k["lookahead_query"][("llama", 2)])
    assert graph_path.qkv_kernels(MODEL, lp, "bf16", "bf16", attention_only=True) == k["append"][2]


def test_without_graph_figures_every_kernel_pays_the_launch_overhead():
    profile = load_profile(H100)
    assert profile.gpus["gpu0"].graph_launch_overhead_us is None
    eng = engine(profile)
    assert not eng.graph_replay and eng.op_fixed_s("attention") is None
    launch, _, _ = eng.machine.kernel_terms("gpu0", 1.0, 1.0)
    assert launch == profile.gpus["gpu0"].kernel_launch_overhead_us * 1e-6
    with pytest.raises(ValueError, match="graph"):
        engine(profile, graph_replay=True)
    # a graph profile predicted for an eager run: the per-launch model again
    assert not engine(graph_path.eager_profile(graph_profile())).graph_replay
    assert not engine(graph_profile(), graph_replay=False).graph_replay


def test_the_cache_update_is_part_of_the_qkv_graph():
    """A sliding window's kv_update is its own kernel per layer eagerly; inside the qkv graph
    on the graph path (its bytes moved there, no launch of its own)."""
    step = plan("hybridgen_static", 65536, topk_ratio=0.1, gpu_share=0.3)
    lp = step.layer
    eager, graphs = engine(load_profile(H100)), engine(graph_profile())
    we, wg = eager.work(1, lp), graphs.work(1, lp)
    assert we.kv_update.bytes_ > 0 and wg.kv_update.bytes_ == 0
    assert wg.qkv.bytes_ == we.qkv.bytes_ + we.kv_update.bytes_
    # the leaving token reached host memory with its own step's write-through copy
    assert wg.evict_bytes == 0 < we.evict_bytes
    layers = MODEL.num_layers
    eager.step(step)
    graphs.step(step)
    # per layer qkv, attention, merge, post (+ kv_update eagerly); the LM head once
    assert graphs.machine.gpu_stream("gpu0").launched == 4 * layers + 1
    assert eager.machine.gpu_stream("gpu0").launched == 5 * layers + 1


@pytest.mark.parametrize(("policy", "options", "count"), [
    ("hybridgen_static", {"topk_ratio": 0.1, "gpu_share": 0.3}, "host_selected"),
    ("hybridgen_exact", {"gpu_share": 0.3}, "host_tokens"),
    ("flexgen", {"gpu_kv_fraction": 0.3}, "host_tokens"),
    ("cpu_offload", {}, None),
])
def test_device_attention_and_merges_read_the_bucket_sizes(policy, options, count):
    step = plan(policy, 40000, **options)
    lp = step.layer
    eager, graphs = engine(load_profile(H100)), engine(graph_profile())
    we, wg = eager.work(1, lp), graphs.work(1, lp)
    kv_row = MODEL.kv_dim * 2
    resident = lp.gpu_tokens
    if resident:
        assert wg.attn.bytes_ == pytest.approx(2 * token_bucket(resident) * kv_row)
        assert wg.attn.bytes_ == pytest.approx(we.attn.bytes_ * token_bucket(resident) / resident)
    if count is None:  # a partial output: fixed size, nothing padded
        assert wg.merge == we.merge and we.merge.bytes_ > 0
        return
    n = getattr(lp, count)
    assert n and token_bucket(n) > n  # 40000 is not a bucket: the padding shows
    assert graph_path.merge_count(lp) == n
    assert wg.merge.bytes_ == pytest.approx(we.merge.bytes_ * token_bucket(n) / n)
    assert wg.merge.flops == pytest.approx(we.merge.flops * token_bucket(n) / n)
    assert wg.merge.bytes_ == pytest.approx(layer_work(
        MODEL, 1, _with_count(lp, count, token_bucket(n)), "bf16", "bf16").merge.bytes_, rel=0.02)


def _with_count(lp, count: str, n: int):
    """``lp`` with ``count`` (host tokens or host selections) set to n, for a closed form."""
    from dataclasses import replace

    if count == "host_selected":
        return replace(lp, host_selected=n)
    extra = n - lp.host_tokens
    selected = lp.host_selected + extra if lp.host_selected == lp.host_tokens else lp.host_selected
    return replace(lp, context=lp.context + extra, host_selected=selected)


def test_both_halves_bucket_with_one_function():
    from hw_backend import buckets

    assert buckets.token_bucket is token_bucket
    assert buckets.MIN_BUCKET == 16 and buckets.BUCKETS_PER_OCTAVE == 8


def test_the_step_copies_are_the_executors_buffers():
    """The bytes the simulator copies are the sizes of the executor's count table and its
    new-token buffer (``hw_backend.graph_side``, ``hw_backend.step_buffers``)."""
    import torch

    from hw_backend.graph_side import FIELDS
    from hw_backend.step_buffers import StepBuffers

    assert graph_path.COUNT_TABLE_FIELDS == FIELDS
    assert graph_path.count_table_bytes(32) == 32 * FIELDS * torch.int64.itemsize
    for batch, dtype, torch_dtype in ((1, "bf16", torch.bfloat16), (3, "fp32", torch.float32)):
        buffers = StepBuffers.allocate("cpu", layers=4, batch=batch, heads=MODEL.num_heads,
                                       kv_heads=MODEL.num_kv_heads, head_dim=MODEL.head_dim,
                                       kv_dtype=torch_dtype)
        got = buffers.new_tokens.numel() * buffers.new_tokens.element_size()
        assert graph_path.new_token_bytes(MODEL, batch, dtype, 4) == got


def test_the_graph_steps_copies_bracket_it():
    """With host paths in flight the two copies still bracket the step: the first replay starts
    when the count table has landed, the step ends when the new tokens have reached host memory
    (each alone on its route then), and the critical path accounts for every second."""
    profile = graph_profile()
    eng = engine(profile)
    step = plan("hybridgen_static", 65536, profile, topk_ratio=0.05)
    measure = eng.step(step)
    layers = MODEL.num_layers
    first, last = eng._kernels[0], eng._kernels[-1]
    assert first.start == pytest.approx(
        copy_s(eng, eng.staging, "gpu0", graph_path.count_table_bytes(layers)), rel=1e-9)
    assert last.end == pytest.approx(measure.latency_s, rel=1e-12)
    assert last.end - last.start == pytest.approx(
        copy_s(eng, "gpu0", eng.staging, graph_path.new_token_bytes(MODEL, 1, "bf16", layers)),
        rel=1e-9)
    assert sum(measure.binding.values()) == pytest.approx(measure.latency_s, rel=1e-9)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_only_the_eager_path_writes_the_token_leaving_the_window(graphs):
    """Eagerly the token leaving HBM's recent window is written to host memory when it leaves;
    on the graph path it is already there (every new token is written through at the end of its
    own step, ``new_token_bytes``), so the executor moves nothing then and neither may the
    simulator (that write would be paid twice, and would hold back each host path)."""
    profile = graph_profile()
    eng = engine(profile, graph_replay=graphs)
    step = plan("hybridgen_static", 65536, profile, topk_ratio=0.1, gpu_share=0.3)
    assert step.layer.gpu_recent_tokens > 0 and step.layer.host_tokens > 0
    labels = []
    write = eng.machine.write

    def recorded(src, destinations, bytes_, label="", **kw):
        labels.append(label)
        return write(src, destinations, bytes_, label, **kw)

    eng.machine.write = recorded
    eng.step(step)
    assert labels.count("evict K+V") == (0 if graphs else MODEL.num_layers)

"""The executor on a real CUDA device: the same exactness and records as on the stand-in.

Skipped cleanly without CUDA (``-m gpu`` selects these on a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from hgsim.plan import CpuWork, KvPlacement, LayerPlan, Merge, Selector, StepPlan, Transfer
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend.decode_loop import (
    SIZED_HBM_OPTIONS,
    SyntheticDecode,
    attention_model_spec,
    run_decode,
)
from hw_backend.devices import CudaAccelerator, make_accelerator
from hw_backend.executor import PlanExecutor
from hw_backend.kv_store import KvStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, H, KVH, D, LAYERS, T = 2, 8, 2, 64, 3, 4096
PLACEMENT = KvPlacement.single("ddr0")


def plans(context: int) -> dict[str, LayerPlan]:
    recent, sinks = 512, 4
    host = context - recent - sinks
    return {
        "hybridgen": LayerPlan(context, recent, sinks, host, CpuWork.LOGITS_TOPK,
                               Transfer.LOGITS_AND_V, Merge.SOFTMAX_UNION, Selector.ALL,
                               PLACEMENT, lookahead=True),
        "flexgen_cpu": LayerPlan(context, recent, sinks, host, CpuWork.PARTIAL_ATTENTION,
                                 Transfer.PARTIAL_OUTPUT, Merge.LSE, Selector.ALL, PLACEMENT),
        "hgca": LayerPlan(context, recent, sinks, host, CpuWork.SPARSE_PARTIAL,
                          Transfer.PARTIAL_OUTPUT, Merge.LSE, Selector.ALL, PLACEMENT),
        "flexgen": LayerPlan(context, recent, sinks, host, CpuWork.NONE, Transfer.KV_ALL,
                             Merge.NONE, Selector.ALL, PLACEMENT, lookahead=True),
        "infinigen": LayerPlan(context, recent, sinks, host, CpuWork.NONE, Transfer.KV_SELECTED,
                               Merge.NONE, Selector.ALL, PLACEMENT, lookahead=True,
                               speculate_key_fraction=0.3),
        "cpu_offload": LayerPlan(context, 0, 0, context, CpuWork.PARTIAL_ATTENTION,
                                 Transfer.PARTIAL_OUTPUT, Merge.NONE, Selector.ALL, PLACEMENT),
        "gpu_only": LayerPlan(context, context, 0, 0, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                              Selector.ALL, None),
    }


def reference(q, k, v):
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q.double().unsqueeze(2), kk, vv).squeeze(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(plans(T)))
def test_plan_kinds_are_exact_on_cuda(kind, dtype):
    gen = torch.Generator().manual_seed(0)
    k = [torch.randn(B, KVH, T, D, generator=gen).to(dtype) for _ in range(LAYERS)]
    v = [torch.randn(B, KVH, T, D, generator=gen).to(dtype) for _ in range(LAYERS)]
    accel = make_accelerator("cuda")
    assert isinstance(accel, CudaAccelerator) and "cuda" in accel.label
    store = KvStore(accel, num_layers=LAYERS, batch=B, kv_heads=KVH, head_dim=D, dtype=dtype,
                    capacity=T)
    for i in range(LAYERS):
        store[i].load(k[i][:, :, : T - 1], v[i][:, :, : T - 1])
    queries = [torch.randn(B, H, D, generator=gen).cuda() for _ in range(LAYERS)]
    new_kv = [(k[i][:, :, T - 1 :].cuda(), v[i][:, :, T - 1 :].cuda()) for i in range(LAYERS)]
    with PlanExecutor(store, accel) as executor:
        run = executor.step(StepPlan(kind, B, plans(T)[kind], LAYERS), queries, new_kv=new_kv)
    tol = 1e-5 if dtype is torch.float32 else 3e-2
    for i in range(LAYERS):
        want = reference(queries[i].cpu(), k[i], v[i])
        torch.testing.assert_close(run.outputs[i].double().cpu(), want, rtol=tol, atol=tol)
    assert all(t.device == accel.label and t.gpu_s > 0 for t in run.layers)
    assert run.timing.latency_s > 0


def test_feedback_loop_runs_on_cuda():
    model = attention_model_spec(layers=LAYERS, heads=H, kv_heads=KVH, head_dim=D)
    workload = Workload(batch=1, context=16384, gen=8, kv_dtype="fp32", weight_dtype="fp32")
    policy = make_policy("hybridgen", model, load_profile("dev-zen4-2core"), workload,
                         {**SIZED_HBM_OPTIONS, "gpu_share": 0.1, "interval": 2})
    source = SyntheticDecode(layers=LAYERS, batch=1, heads=H, kv_heads=KVH, head_dim=D,
                             context=16384, steps=8)
    accel = make_accelerator("cuda")
    store = KvStore(accel, num_layers=LAYERS, batch=1, kv_heads=KVH, head_dim=D,
                    capacity=16384 + 8)
    source.load(store)
    with PlanExecutor(store, accel) as executor:
        run = run_decode(policy, executor, source)
    assert len(policy.scheduler.history) == 8
    assert all(s.host_s > 0 and s.device_s > 0 for s in run.steps)
    assert set(run.steps_frame()["source"]) == {accel.label}


def test_calibration_times_the_executor_ops_on_cuda():
    from hw_backend.calibration import cuda
    from hw_backend.calibration.settings import Settings

    rows = cuda.executor_ops(Settings.make(True))
    assert {m.params["op"] for m in rows} == {"partial_attention", "lse_merge", "softmax_union"}
    assert all(m.unit == "us" and 0 < m.value < 1e5 for m in rows)


@pytest.mark.parametrize("kind", list(plans(T)))
def test_graph_path_matches_the_eager_path_and_stops_capturing(kind):
    """Captured graphs give the eager path's outputs; after the first step a steady decode
    (same buckets) only replays."""
    gen = torch.Generator().manual_seed(1)
    steps = 3
    k = [torch.randn(B, KVH, T + steps, D, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(B, KVH, T + steps, D, generator=gen) for _ in range(LAYERS)]
    queries = [[torch.randn(B, H, D, generator=gen).cuda() for _ in range(LAYERS)]
               for _ in range(steps)]
    outputs, captures = {}, []
    for graphs in (False, True):
        accel = make_accelerator("cuda")
        store = KvStore(accel, num_layers=LAYERS, batch=B, kv_heads=KVH, head_dim=D,
                        capacity=T + steps)
        for i in range(LAYERS):
            store[i].load(k[i][:, :, : T - 1], v[i][:, :, : T - 1])
        with PlanExecutor(store, accel, graphs=graphs) as executor:
            for t in range(steps):
                context = T + t
                new_kv = [(k[i][:, :, context - 1 : context].cuda(),
                           v[i][:, :, context - 1 : context].cuda()) for i in range(LAYERS)]
                run = executor.step(StepPlan(kind, B, plans(context)[kind], LAYERS),
                                    queries[t], new_kv=new_kv, step=t)
                outputs[graphs, t] = [o.cpu() for o in run.outputs]
                if graphs:
                    captures.append(executor.graph_stats.captures)
                    assert not executor.graph_stats.failures  # every program was captured
    for t in range(steps):
        for got, want in zip(outputs[True, t], outputs[False, t], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert captures[0] > 0 and captures[-1] == captures[1]


def test_whole_model_decode_on_cuda_matches_dense_float64():
    """The graph path (default on CUDA) decodes a tiny model like dense float64 attention."""
    from hgsim.catalog import get_model
    from hw_backend.model_decode import ModelDecode
    from hw_backend.transformer import DenseDecoder

    spec = get_model("tiny-llama")
    context, steps = 600, 4
    workload = Workload(context=context, gen=steps, kv_dtype="fp32", weight_dtype="fp32")
    policy = make_policy("hybridgen_exact", spec, load_profile("dev-zen4-2core"), workload,
                         {"gpu_share": 0.3, "lookahead": False})
    gen = torch.Generator().manual_seed(2)
    shape = (1, spec.num_kv_heads, context - 1, spec.head_dim)
    prefix = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
              for _ in range(spec.num_layers)]
    accel = make_accelerator("cuda")
    with ModelDecode(spec, accel, dtype="fp32", seed=3, capacity=context + steps) as model:
        assert model.executor.graphs
        model.load_prefix(prefix)
        first = model.work.tokens.cpu()
        run = model.decode(policy, steps, keep_logits=True)
        weights = model.weights.to(torch.float64, "cpu")
    dense = DenseDecoder(weights, [(a.double(), b.double()) for a, b in prefix])
    inputs = [first] + [torch.tensor(t) for t in run.tokens[:-1]]
    for got, token in zip(run.logits, inputs, strict=True):
        torch.testing.assert_close(got.double(), dense.step(token), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["hybridgen", "flexgen", "infinigen"])
def test_a_steady_graph_step_asks_cuda_for_no_memory(name):
    """After the warm-up steps (captures, buffers), a step inside one shape bucket makes no
    ``cudaMalloc``: the graphs replay over buffers allocated once, and what runs eagerly reuses
    the caching allocator's blocks."""
    from hgsim.catalog import get_model
    from hw_backend.decode_loop import profile_for_gpu_tokens
    from hw_backend.model_decode import ModelDecode

    spec = get_model("tiny-llama")
    context, warmup, steps = 3000, 3, 6
    workload = Workload(context=context, gen=warmup + steps, kv_dtype="fp32",
                        weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), spec, workload, 1000)
    policy = make_policy(name, spec, profile, workload, SIZED_HBM_OPTIONS)
    with ModelDecode(spec, make_accelerator("cuda"), dtype="fp32",
                     capacity=context + warmup + steps) as model:
        assert model.executor.graphs
        model.fill_random(context - 1)
        model.reserve_for(policy, context + warmup + steps)
        for t in range(warmup):
            model.step(policy.step_plan(model.store.length + 1), step=t)
        torch.cuda.synchronize()
        segments = torch.cuda.memory_stats()["segment.all.allocated"]
        for t in range(steps):
            model.step(policy.step_plan(model.store.length + 1), step=warmup + t)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["segment.all.allocated"] == segments
        assert not model.executor.graph_stats.failures


def test_hbm_budget_caps_torch_allocations():
    from hw_backend.devices import device_memory_bytes, limit_device_memory

    accel = make_accelerator("cuda")
    limit_device_memory(accel, 1e9)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(2e9), dtype=torch.uint8, device="cuda")
    finally:
        limit_device_memory(accel, device_memory_bytes(accel))


def test_calibration_measures_the_graph_path_on_cuda():
    from hw_backend.calibration import cuda
    from hw_backend.calibration.settings import Settings

    settings = Settings.make(True)
    rows = (cuda.graph_launch(settings) + cuda.graph_ops(settings)
            + cuda.graph_attention(settings) + cuda.decode_gemm(settings))
    names = {m.name for m in rows}
    assert {"graph_launch", "graph_kernel_gap", "graph_op", "graph_attention_fit",
            "decode_gemm"} <= names
    assert all(m.value > 0 or m.name == "graph_kernel_gap" for m in rows)
    launch = next(m for m in rows if m.name == "graph_launch")
    assert launch.value < 100  # microseconds per replay

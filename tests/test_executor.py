"""The plan executor on the CPU stand-in: every plan kind reproduces exact attention.

With every host token attended, HybridGen's softmax union, the LSE merge of partial outputs,
FlexGen's streamed KV, InfiniGen's fetched rows and GPU-only attention must all equal full
attention (torch SDPA in float64) to float32 rounding, whatever the split between device and
host, across steps whose split changes, with and without look-ahead. With top-k < all the output
must equal exact attention restricted to the tokens the executor reports it attended.
"""

from __future__ import annotations

import math

import pytest
import torch

from hgsim.plan import CpuWork, KvPlacement, LayerPlan, Merge, Selector, StepPlan, Transfer
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, attention_model_spec, profile_for_gpu_tokens
from hw_backend.devices import STANDIN_LABEL, CoreSplit, make_accelerator
from hw_backend.executor import HostPath, PlanExecutor, UnsupportedPlan, host_path
from hw_backend.kv_store import KvStore

B, H, KVH, D, LAYERS = 2, 8, 2, 64, 3  # 3 layers: FlexGen sizes buffers by layers - 2
T = 1536  # tokens attended at step 0
PLACEMENT = KvPlacement({"ddr0": 1.0}, {"ddr0": 1.0})


def layer_plan(kind: str, context: int, *, recent: int = 200, sinks: int = 4,
               selected: int | None = None, lookahead: bool = True) -> LayerPlan:
    """Hand-built plans of each kind (the policies' shapes, with chosen splits)."""
    host = context - recent - sinks
    chosen = host if selected is None else selected
    exact = Selector.ALL if chosen == host else Selector.EXACT_TOPK
    if kind == "hybridgen":
        return LayerPlan(context, recent, sinks, chosen, CpuWork.LOGITS_TOPK,
                         Transfer.LOGITS_AND_V, Merge.SOFTMAX_UNION, exact, PLACEMENT,
                         lookahead=lookahead)
    if kind == "flexgen_cpu":
        return LayerPlan(context, recent, sinks, host, CpuWork.PARTIAL_ATTENTION,
                         Transfer.PARTIAL_OUTPUT, Merge.LSE, Selector.ALL, PLACEMENT)
    if kind == "cpu_offload":
        return LayerPlan(context, 0, 0, context, CpuWork.PARTIAL_ATTENTION,
                         Transfer.PARTIAL_OUTPUT, Merge.NONE, Selector.ALL, PLACEMENT)
    if kind == "hgca":
        return LayerPlan(context, recent, sinks, chosen, CpuWork.SPARSE_PARTIAL,
                         Transfer.PARTIAL_OUTPUT, Merge.LSE, exact, PLACEMENT)
    if kind == "flexgen":
        return LayerPlan(context, recent, sinks, host, CpuWork.NONE, Transfer.KV_ALL,
                         Merge.NONE, Selector.ALL, PLACEMENT, lookahead=True)
    if kind == "infinigen":
        spec = Selector.ALL if chosen == host else Selector.SPECULATIVE_TOPK
        return LayerPlan(context, recent, sinks, chosen, CpuWork.NONE, Transfer.KV_SELECTED,
                         Merge.NONE, spec, PLACEMENT, lookahead=lookahead,
                         speculate_key_fraction=0.5)
    if kind == "gpu_only":
        return LayerPlan(context, context, 0, 0, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                         Selector.ALL, None)
    raise ValueError(kind)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention in float64 with torch SDPA (GQA by repeating KV heads)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.double().unsqueeze(2), kk, vv)
    return out.squeeze(2)


def restricted_reference(q, k, v, positions_per_head: list[list[set[int]]]) -> torch.Tensor:
    """Exact attention over a given set of positions per (batch, head), float64."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            idx = torch.tensor(sorted(positions_per_head[b][h]))
            keys, values = k[b, h // group, idx].double(), v[b, h // group, idx].double()
            weights = torch.softmax(keys @ q[b, h].double() / math.sqrt(q.shape[-1]), dim=0)
            out[b, h] = weights @ values
    return out


class Case:
    """A small multi-layer KV cache and queries; the executor runs on the stand-in, its device
    side eager or the graph path's static programs (run eagerly without CUDA)."""

    def __init__(self, steps: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0,
                 graphs: bool = False):
        gen = torch.Generator().manual_seed(seed)
        total = T + steps
        self.k = [torch.randn(B, KVH, total, D, generator=gen).to(dtype) for _ in range(LAYERS)]
        self.v = [torch.randn(B, KVH, total, D, generator=gen).to(dtype) for _ in range(LAYERS)]
        # Queries scaled up so attention is peaked: top-k vs all then differs measurably.
        self.q = [[3 * torch.randn(B, H, D, generator=gen) for _ in range(LAYERS)]
                  for _ in range(steps)]
        self.accel = make_accelerator("standin", CoreSplit(1, 1))
        self.store = KvStore(self.accel, num_layers=LAYERS, batch=B, kv_heads=KVH, head_dim=D,
                             dtype=dtype, capacity=total)
        for i in range(LAYERS):
            self.store[i].load(self.k[i][:, :, : T - 1], self.v[i][:, :, : T - 1])
        self.executor = PlanExecutor(self.store, self.accel, graphs=graphs)

    def step(self, t: int, plan: StepPlan, **kwargs):
        end = T + t
        new_kv = [(self.k[i][:, :, end - 1 : end], self.v[i][:, :, end - 1 : end])
                  for i in range(LAYERS)]
        return self.executor.step(plan, self.q[t], new_kv=new_kv, step=t, **kwargs)

    def expected(self, t: int, layer: int) -> torch.Tensor:
        end = T + t
        return reference(self.q[t][layer], self.k[layer][:, :, :end], self.v[layer][:, :, :end])

    def close(self) -> None:
        self.executor.close()
        self.accel.close()


@pytest.fixture(params=[False, True], ids=["eager", "graph-path"])
def case(request):
    c = Case(steps=3, graphs=request.param)
    yield c
    c.close()


EXACT_KINDS = ["hybridgen", "flexgen_cpu", "cpu_offload", "hgca", "flexgen", "infinigen",
               "gpu_only"]


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_every_plan_kind_is_exact_with_all_host_tokens(case, kind):
    for t, recent in enumerate([200, 260, 120]):  # the split moves between steps
        plan = StepPlan(kind, B, layer_plan(kind, T + t, recent=recent), LAYERS)
        run = case.step(t, plan)
        assert run.device == STANDIN_LABEL
        for layer in range(LAYERS):
            torch.testing.assert_close(run.outputs[layer].double(), case.expected(t, layer),
                                       rtol=1e-5, atol=2e-6)


def test_streaming_every_token_waits_for_the_new_token_on_the_host(case):
    # No recent window: each layer's new token is appended to host memory by its qkv, so the
    # prefetched copy of that layer's host K/V must not start before it (a race otherwise).
    for t in range(3):
        plan = StepPlan("flexgen", B, layer_plan("flexgen", T + t, recent=0, sinks=0), LAYERS)
        run = case.step(t, plan)
        for layer in range(LAYERS):
            torch.testing.assert_close(run.outputs[layer].double(), case.expected(t, layer),
                                       rtol=1e-5, atol=2e-6)


def test_without_lookahead_gives_the_same_output(case):
    ahead = StepPlan("h", B, layer_plan("hybridgen", T, lookahead=True), LAYERS)
    run = case.step(0, ahead)
    behind = layer_plan("hybridgen", T + 1, lookahead=False)
    run2 = case.step(1, StepPlan("h", B, behind, LAYERS))
    for layer in range(LAYERS):
        torch.testing.assert_close(run.outputs[layer].double(), case.expected(0, layer),
                                   rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(run2.outputs[layer].double(), case.expected(1, layer),
                                   rtol=1e-5, atol=2e-6)


def test_cache_already_holding_the_context_needs_no_new_token():
    c = Case(steps=1)
    try:
        for i in range(LAYERS):  # load the whole context, then attend without appending
            c.store[i].load(c.k[i][:, :, :T], c.v[i][:, :, :T])
        plan = StepPlan("h", B, layer_plan("hybridgen", T), LAYERS)
        run = c.executor.step(plan, c.q[0])
        for layer in range(LAYERS):
            torch.testing.assert_close(run.outputs[layer].double(), c.expected(0, layer),
                                       rtol=1e-5, atol=2e-6)
    finally:
        c.close()


def test_bf16_cache_matches_reference_within_bf16_tolerance():
    c = Case(steps=1, dtype=torch.bfloat16)
    try:
        for kind in ("hybridgen", "flexgen_cpu"):
            for i in range(LAYERS):  # reload: each kind starts from the prompt
                c.store[i].load(c.k[i][:, :, : T - 1], c.v[i][:, :, : T - 1])
            run = c.step(0, StepPlan(kind, B, layer_plan(kind, T), LAYERS))
            for layer in range(LAYERS):
                torch.testing.assert_close(run.outputs[layer].double(), c.expected(0, layer),
                                           rtol=0, atol=3e-2)
    finally:
        c.close()


@pytest.mark.parametrize("kind", ["hybridgen", "hgca", "infinigen"])
def test_topk_output_is_exact_attention_over_the_reported_selection(case, kind):
    plan = StepPlan(kind, B, layer_plan(kind, T, selected=64), LAYERS)
    run = case.step(0, plan)
    lp = plan.layer
    start, end = lp.host_range()
    resident = set(range(lp.sink_tokens)) | set(range(end, T))
    for layer in range(LAYERS):
        chosen = run.selections[layer]
        assert chosen.shape == (B, H, 64)
        assert int(chosen.min()) >= start and int(chosen.max()) < end
        attended = [[resident | set(chosen[b, h].tolist()) for h in range(H)] for b in range(B)]
        want = restricted_reference(case.q[0][layer], case.k[layer][:, :, :T],
                                    case.v[layer][:, :, :T], attended)
        torch.testing.assert_close(run.outputs[layer].double(), want, rtol=1e-5, atol=2e-6)
        full = case.expected(0, layer)
        assert (run.outputs[layer].double() - full).abs().max() > 1e-4  # top-k is lossy here


def test_hybridgen_topk_selection_is_the_true_per_head_topk(case):
    plan = StepPlan("h", B, layer_plan("hybridgen", T, selected=32), LAYERS)
    run = case.step(0, plan)
    start, end = plan.layer.host_range()
    k = case.k[0][:, :, :T].repeat_interleave(H // KVH, dim=1)
    logits = torch.einsum("bhd,bhtd->bht", case.q[0][0], k)[:, :, start:end]
    want = torch.topk(logits, 32, dim=-1).indices + start
    got = run.selections[0]
    assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)


# ------------------------------------------------------------------------- plans from policies
def policy_case(name: str, options: dict, gpu_tokens: int):
    model = attention_model_spec(layers=LAYERS, heads=H, kv_heads=KVH, head_dim=D)
    workload = Workload(batch=B, context=T, gen=3, kv_dtype="fp32", weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload, gpu_tokens)
    return make_policy(name, model, profile, workload, {**SIZED_HBM_OPTIONS, **options})


@pytest.mark.parametrize(("name", "options", "path"), [
    ("hybridgen_exact", {"gpu_share": 0.2}, HostPath.LOGITS),
    ("cpu_offload", {}, HostPath.PARTIAL),
    ("flexgen_cpu", {}, HostPath.PARTIAL),
    ("hgca", {"topk_ratio": 1.0}, HostPath.PARTIAL),
    ("flexgen", {}, HostPath.STREAM),
    ("infinigen", {"topk_ratio": 1.0}, HostPath.SPECULATE),
    ("gpu_only", {}, None),
])
def test_policy_plans_execute_exactly(case, name, options, path):
    policy = policy_case(name, options, gpu_tokens=600)
    for t in range(2):
        plan = policy.step_plan(T + t)
        assert host_path(plan.layer) is path
        if path is not None:
            assert plan.layer.host_tokens > 0
        run = case.step(t, plan)
        for layer in range(LAYERS):
            torch.testing.assert_close(run.outputs[layer].double(), case.expected(t, layer),
                                       rtol=1e-5, atol=2e-6)


def test_heavy_hitter_plans_are_refused():
    lp = LayerPlan(T, 100, 0, 50, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                   Selector.HEAVY_HITTER, None)
    with pytest.raises(UnsupportedPlan, match="H2O"):
        host_path(lp)


def test_host_work_on_another_socket_is_refused_and_the_executor_stays_usable(case):
    plan = StepPlan("hybridgen", B, layer_plan("hybridgen", T), LAYERS, host_socket="cpu1")
    with pytest.raises(UnsupportedPlan, match="host_socket=cpu1.*simulated only"):
        case.step(0, plan)
    run = case.step(0, StepPlan("hybridgen", B, layer_plan("hybridgen", T), LAYERS))
    for layer in range(LAYERS):
        torch.testing.assert_close(run.outputs[layer].double(), case.expected(0, layer),
                                   rtol=1e-4, atol=1e-5)


def test_plan_that_does_not_follow_the_cache_fails_loudly(case):
    plan = StepPlan("h", B, layer_plan("hybridgen", T + 5), LAYERS)
    with pytest.raises(RuntimeError, match="does not follow|plan context"):
        case.step(0, plan)


def test_steps_reuse_their_upload_buffers_and_stay_exact(case):
    """Top-k grows with the context: steps after the first reuse the layer's buffers (same
    memory, no new allocation; the graph path's top-k 41-43 share one bucket) and every output
    is still exact over its selection."""
    pointers = []
    for t in range(3):
        plan = StepPlan("h", B, layer_plan("hybridgen", T + t, selected=41 + t), LAYERS)
        run = case.step(t, plan)
        pointers.append(upload_buffers(case.executor))
        lp = plan.layer
        resident = set(range(lp.sink_tokens)) | set(range(lp.host_range()[1], T + t))
        for layer in range(LAYERS):
            chosen = run.selections[layer]
            attended = [[resident | set(chosen[b, h].tolist()) for h in range(H)]
                        for b in range(B)]
            want = restricted_reference(case.q[t][layer], case.k[layer][:, :, : T + t],
                                        case.v[layer][:, :, : T + t], attended)
            torch.testing.assert_close(run.outputs[layer].double(), want, rtol=1e-5, atol=2e-6)
    assert pointers[0] == pointers[1] == pointers[2]


def upload_buffers(executor) -> tuple[int, ...]:
    """Addresses of the device buffers host results land in."""
    side = executor.side
    if executor.graphs:
        return tuple(sorted(t.data_ptr() for t in side._landing.values()))
    return (side.device_buffers.take((0, "rows"), (1,), torch.float32).data_ptr(),)


def test_an_eager_executor_after_the_graph_path_keeps_leaving_tokens_on_the_host():
    """Benchmarks alternate eager and graph-path executors over one store. The graph path
    writes every new token through to host memory; an eager executor after it must copy its
    own device tokens to the host again when they leave the device (a 1-token window here)."""
    c = Case(steps=4)
    try:
        graph_path = PlanExecutor(c.store, c.accel, graphs=True)
        with graph_path:
            c.executor, eager = graph_path, c.executor
            c.step(0, StepPlan("flexgen_cpu", B, layer_plan("flexgen_cpu", T, recent=1), LAYERS))
        c.executor = eager
        for t in range(1, 4):
            plan = StepPlan("flexgen_cpu", B, layer_plan("flexgen_cpu", T + t, recent=1), LAYERS)
            run = c.step(t, plan)
            for layer in range(LAYERS):
                torch.testing.assert_close(run.outputs[layer].double(), c.expected(t, layer),
                                           rtol=1e-5, atol=2e-6)
    finally:
        c.close()

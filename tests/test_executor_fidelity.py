"""Measured fidelity of executed top-k plans equals the simulator's accuracy proxy.

The proxy (``hgsim.accuracy.accuracy_proxy``) scores a plan on ``synthesize_case`` tensors of
``DEFAULT_SPEC`` at the plan's context. Executing the same plan on those very tensors, the error
of the output the executor actually produced (against exact float64 attention) and the attention
mass of the tokens it actually attended must agree with the proxy: both take one softmax over the
same selected set, so only float32-vs-float64 ranking of near ties may differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hgsim.accuracy import (
    DEFAULT_SPEC,
    accuracy_proxy,
    exact_attention,
    fidelity,
    group_spec,
    next_query,
    output_error,
    resident_mask,
    synthesize,
)
from hgsim.plan import GroupSelect, StepPlan
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, attention_model_spec, profile_for_gpu_tokens
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.executor import PlanExecutor
from hw_backend.host_side import HostKernels
from hw_backend.kv_store import KvStore
from hw_backend.merge import partial_attention, softmax_union

T = 8192
SPEC = DEFAULT_SPEC.with_tokens(T)
TOL = 1e-3


@pytest.fixture(scope="module")
def data():
    q, k, v = synthesize(SPEC)
    return torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)


@pytest.fixture(scope="module")
def executor(data):
    _, k, v = data
    accel = make_accelerator("standin", CoreSplit(1, 1))
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=SPEC.kv_heads, head_dim=SPEC.head_dim,
                    capacity=T)
    store[0].load(k, v)
    ex = PlanExecutor(store, accel)
    yield ex
    ex.close()
    accel.close()


def policy_plan(name: str, options: dict, gpu_tokens: int = 8192) -> StepPlan:
    model = attention_model_spec(layers=1, heads=SPEC.heads, kv_heads=SPEC.kv_heads,
                                 head_dim=SPEC.head_dim)
    workload = Workload(batch=1, context=T, gen=1, kv_dtype="fp32", weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload,
                                     gpu_tokens)
    return make_policy(name, model, profile, workload, {**SIZED_HBM_OPTIONS, **options}).step_plan(T)


def attended_mask(plan: StepPlan, selection: torch.Tensor) -> np.ndarray:
    """(H, T) mask of what the executor attended: resident tokens plus its host selection."""
    mask = resident_mask(SPEC.heads, T, plan.layer)
    np.put_along_axis(mask, selection[0].numpy(), True, axis=1)
    return mask


# HBM sizes (in tokens) leave HybridGen room beside its landing buffers for the share asked
# for, and give HGCA (which keeps as many recent tokens as fit) a 1024-token window.
@pytest.mark.parametrize(("name", "options", "gpu_tokens"), [
    ("hybridgen", {"gpu_share": 0.125, "topk_ratio": 0.05, "adaptive": False}, 8192),
    ("hybridgen", {"gpu_share": 0.05, "topk_ratio": 0.02, "adaptive": False}, 8192),
    ("hgca", {"topk_ratio": 0.1}, 1024),
])
def test_executed_topk_matches_the_accuracy_proxy(data, executor, name, options, gpu_tokens):
    q, k, v = data
    plan = policy_plan(name, options, gpu_tokens)
    lp = plan.layer
    assert 0 < lp.host_selected < lp.host_tokens and not lp.exact
    assert lp.gpu_recent_tokens > 0  # a real device/host split
    run = executor.step(plan, [q])
    measured_error = float(np.mean(output_error(q, k, v, run.outputs[0])))
    kept = fidelity(q, k, v, attended_mask(plan, run.selections[0]))
    proxy = accuracy_proxy(lp)
    assert proxy.rel_error > 0.01  # the comparison is about a real loss
    assert measured_error == pytest.approx(proxy.rel_error, abs=TOL)
    assert kept.mass_kept == pytest.approx(proxy.mass_kept, abs=TOL)
    assert kept.rel_error == pytest.approx(measured_error, abs=TOL)


def test_infinigen_speculation_matches_fidelity_with_the_same_speculated_query(data, executor):
    q, k, v = data
    plan = policy_plan("infinigen", {"topk_ratio": 0.05, "partial_key_fraction": 1.0})
    seed = 7
    guess = next_query(q[0].numpy().astype(np.float64), 0.9, seed)  # as the proxy speculates
    speculated = torch.from_numpy(guess.astype(np.float32))[None]
    run = executor.step(plan, [q], speculative_queries=[speculated])
    measured_error = float(np.mean(output_error(q, k, v, run.outputs[0])))
    expected = fidelity(q, k, v, plan.layer, seed=seed)
    kept = fidelity(q, k, v, attended_mask(plan, run.selections[0]))
    assert measured_error == pytest.approx(expected.rel_error, abs=TOL)
    assert kept.mass_kept == pytest.approx(expected.mass_kept, abs=TOL)


def test_exact_preset_is_lossless_like_the_proxy(data, executor):
    q, k, v = data
    plan = policy_plan("hybridgen_exact", {"gpu_share": 0.125})
    run = executor.step(plan, [q])
    assert float(np.max(output_error(q, k, v, run.outputs[0]))) < 1e-5
    assert accuracy_proxy(plan.layer).rel_error == 0.0


# --- GQA: HybridGen's selection per query head or per KV group (issue 21) ----------------------
GQA_SPEC = group_spec(4).with_tokens(T)  # 8 KV heads of 4 query heads, keys shared
MODES = [("per_head", "max"), ("group_union", "max"), ("group_shared", "max"),
         ("group_shared", "sum")]


@pytest.fixture(scope="module")
def gqa_data():
    q, k, v = synthesize(GQA_SPEC)
    return torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "graphs"])
def gqa_executor(gqa_data, request):
    _, k, v = gqa_data
    accel = make_accelerator("standin", CoreSplit(1, 1))
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=GQA_SPEC.kv_heads,
                    head_dim=GQA_SPEC.head_dim, capacity=T)
    store[0].load(k, v)
    ex = PlanExecutor(store, accel, graphs=request.param)
    yield ex
    ex.close()
    accel.close()


def gqa_plan(options: dict) -> StepPlan:
    model = attention_model_spec(layers=1, heads=GQA_SPEC.heads, kv_heads=GQA_SPEC.kv_heads,
                                 head_dim=GQA_SPEC.head_dim)
    workload = Workload(batch=1, context=T, gen=1, kv_dtype="fp32", weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload, 8192)
    return make_policy("hybridgen", model, profile, workload,
                       {**SIZED_HBM_OPTIONS, **options}).step_plan(T)


@pytest.mark.parametrize(("mode", "score"), MODES)
def test_executed_group_selection_matches_the_accuracy_proxy(gqa_data, gqa_executor, mode,
                                                             score):
    """Each mode's measured output error and kept mass equal the proxy's on the same tensors
    (the proxy scored with the group structure), and what crossed shrinks with the mode."""
    q, k, v = gqa_data
    plan = gqa_plan({"gpu_share": 0.125, "topk_ratio": 0.05, "adaptive": False,
                     "selection": mode, "group_score": score})
    lp = plan.layer
    assert lp.selection is GroupSelect(mode) and not lp.exact
    run = gqa_executor.step(plan, [q])
    measured_error = float(np.mean(output_error(q, k, v, run.outputs[0])))
    mask = resident_mask(GQA_SPEC.heads, T, lp)
    np.put_along_axis(mask, run.selections[0][0].numpy(), True, axis=1)
    kept = fidelity(q, k, v, mask)
    proxy = accuracy_proxy(lp, GQA_SPEC)
    assert proxy.rel_error > 0.005
    assert measured_error == pytest.approx(proxy.rel_error, abs=TOL)
    assert kept.mass_kept == pytest.approx(proxy.mass_kept, abs=TOL)
    sent = run.layers[0].upload_bytes
    per_head_bytes = GQA_SPEC.heads * lp.host_selected * (GQA_SPEC.head_dim * 4 + 4)
    if mode == "per_head":
        assert sent == per_head_bytes
    else:  # distinct rows once per KV head (padded to the widest group), logits per head
        assert sent < per_head_bytes / 2


@pytest.mark.parametrize(("mode", "score"), MODES)
def test_group_selection_with_every_host_token_is_exact_attention(gqa_data, mode, score):
    """Top-k = all host tokens through the grouped kernels (not the exact plan's block path):
    the device's softmax over the union with the group's logits is exact attention (float64)."""
    q, k, v = gqa_data
    n = 2048
    accel = make_accelerator("standin", CoreSplit(1, 1))
    store = KvStore(accel, num_layers=1, batch=1, kv_heads=GQA_SPEC.kv_heads,
                    head_dim=GQA_SPEC.head_dim, capacity=n)
    store[0].load(k[:, :, :n], v[:, :, :n])
    kv = store[0]
    kv.repartition(0, 512, n)
    host = HostKernels(1)
    span = (0, n - 512)
    scale = 1 / np.sqrt(GQA_SPEC.head_dim)
    payload = host.logits_and_values(kv, span, q, span[1], scale, exact=False,
                                     selection=GroupSelect(mode), group_score=score)
    dev_k, dev_v = kv.device_kv()
    out, _ = softmax_union(partial_attention(q, dev_k, dev_v, scale),
                           payload.tensors["logits"], payload.tensors["rows"])
    want = exact_attention(q[0], k[0, :, :n], v[0, :, :n])
    np.testing.assert_allclose(out[0].double().numpy(), want, rtol=1e-5, atol=1e-5)
    if mode != "per_head":
        assert payload.tensors["rows"].shape == (1, GQA_SPEC.kv_heads, n - 512, GQA_SPEC.head_dim)
    accel.close()


@pytest.mark.parametrize("mode", ["group_union", "group_shared"])
def test_exact_preset_is_lossless_in_every_mode(gqa_data, gqa_executor, mode):
    q, k, v = gqa_data
    plan = gqa_plan({"gpu_share": 0.125, "topk_ratio": 1.0, "adaptive": False, "selection": mode})
    assert plan.layer.exact
    run = gqa_executor.step(plan, [q])
    assert float(np.max(output_error(q, k, v, run.outputs[0]))) < 1e-5

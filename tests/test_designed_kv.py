"""Validation's data carry the accuracy model's GQA structure (``hw_backend.designed_kv``).

The simulator sizes HybridGen's ``group_union`` from ``accuracy.groups.expected_union_rows``;
the executor, run over ``DesignedKv``'s cache and query, must select unions of that size within
sampling error, and the selections whose size is fixed (``per_head``, ``group_shared``) must
move exactly what they moved over random K/V.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hgsim.accuracy.groups import expected_union_rows, union_curve
from hgsim.accuracy.selection import SelectionModel, lag_similarity, query_history
from hgsim.accuracy.synthetic import case_logits
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, attention_model_spec, profile_for_gpu_tokens
from hw_backend.designed_kv import DesignedDecode, DesignedKv, QueryDrift
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.executor import PlanExecutor
from hw_backend.kv_store import KvStore
from hw_backend.model_decode import ModelDecode
from hw_backend.random_kv import RandomKv

CONTEXT = 8192
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 32  # 4 query heads per KV head; small dims keep it fast
GROUP = HEADS // KV_HEADS
RATIO = 0.05


def _plan(selection: str):
    model = attention_model_spec(layers=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    workload = Workload(batch=1, context=CONTEXT, gen=1, kv_dtype="fp32", weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload, 8192)
    options = {**SIZED_HBM_OPTIONS, "gpu_share": 0.125, "topk_ratio": RATIO,
               "adaptive": False, "selection": selection}
    return make_policy("hybridgen", model, profile, workload, options).step_plan(CONTEXT)


def _execute(selection: str, fill):
    """(union rows per KV group, upload bytes) of one executed step over ``fill``'s cache."""
    accel = make_accelerator("standin", CoreSplit(1, 1))
    try:
        store = KvStore(accel, num_layers=1, batch=1, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                        capacity=CONTEXT)
        query = fill(store)
        plan = _plan(selection)
        with PlanExecutor(store, accel, host_threads=1) as executor:
            run = executor.step(plan, [query])
        picked = run.selections[0][0].reshape(KV_HEADS, -1)  # a group's heads' rows, in a row
        rows = [len(torch.unique(group)) for group in picked]
        return plan.layer, rows, run.layers[0].upload_bytes
    finally:
        accel.close()


def _designed(store):
    return DesignedKv().fill(store, CONTEXT, torch.float32, HEADS)


def _random(store):
    RandomKv().fill(store, CONTEXT, torch.float32)
    return torch.randn(1, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))


def _binomial_var(tokens: int, rows: float) -> float:
    """Variance bound of one group's union size: n independent tokens, each in the union with
    probability p = rows / n (fixing each head's set at exactly k only lowers it)."""
    p = rows / tokens
    return tokens * p * (1 - p)


def test_executed_union_matches_the_accuracy_models_expected_rows():
    """The mean union over the 8 groups against the model's curve (itself a mean over the 8
    groups of a 32k-token draw, scaled from its k to ours): 4 standard deviations of both
    draws' binomial bounds, about 6% here; independent heads would give 2.4x the rows."""
    lp, rows, _ = _execute("group_union", _designed)
    n, k = lp.host_tokens, lp.host_selected
    expected = expected_union_rows(n, k, GROUP)
    curve = union_curve(GROUP)
    curve_k = RATIO * curve.tokens
    var = (_binomial_var(n, expected) / KV_HEADS
           + (k / curve_k) ** 2 * _binomial_var(curve.tokens, curve.union_at(curve_k))
           / curve.best_ranks.shape[0])
    measured = sum(rows) / len(rows)
    assert abs(measured - expected) < 4 * math.sqrt(var)
    independent = n * (1 - (1 - k / n) ** GROUP)
    assert independent > 2 * expected  # the structure the random data lacked
    _, random_rows, _ = _execute("group_union", _random)
    random_mean = sum(random_rows) / KV_HEADS
    assert abs(random_mean - independent) < 4 * math.sqrt(_binomial_var(n, independent) / KV_HEADS)


@pytest.mark.parametrize("selection", ["per_head", "group_shared"])
def test_fixed_size_selections_move_what_they_moved_over_random_data(selection):
    """per_head keeps k rows per query head and group_shared k per group whatever the data."""
    lp, rows, sent = _execute(selection, _designed)
    _, random_rows, random_sent = _execute(selection, _random)
    assert sent == random_sent
    k = lp.host_selected
    per_group = GROUP * k if selection == "per_head" else k
    assert len(rows) == KV_HEADS
    if selection == "group_shared":
        assert rows == random_rows == [k] * KV_HEADS
    else:  # a row two heads picked counts once per head in what crosses
        assert sent == HEADS * k * (HEAD_DIM * 4 + 4)
        assert all(k <= r <= per_group for r in rows)


def test_cache_and_query_are_the_accuracy_models_case():
    """Every layer and batch element holds the case's keys, cut from one build for the largest
    context, and the query sees the designed logits."""
    class Layer:
        def load(self, k, v):
            self.k, self.v = k.clone(), v.clone()

    class Store:
        batch, kv_heads, head_dim = 2, KV_HEADS, HEAD_DIM

        def __init__(self):
            self.layers = [Layer(), Layer()]

    designed = DesignedKv()
    small, large = Store(), Store()
    q = designed.fill(large, 3000, torch.float32, HEADS)
    designed.fill(small, 1000, torch.float32, HEADS)  # a cut of the larger build
    assert q.shape == (2, HEADS, HEAD_DIM)
    assert torch.equal(small.layers[1].k, large.layers[0].k[:, :, :1000])
    assert torch.equal(large.layers[0].k[0], large.layers[1].k[1])
    spec = designed.layout_spec(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, tokens=3000)
    keys = large.layers[0].k[0].double().repeat_interleave(GROUP, dim=0)  # (H, T, D)
    logits = torch.einsum("hd,htd->ht", q[0].double(), keys) / math.sqrt(HEAD_DIM)
    torch.testing.assert_close(logits, torch.from_numpy(case_logits(spec)), atol=2e-3, rtol=0)


def test_designed_decode_asks_every_layer_the_designed_query_first():
    """hgsim run's attention-only source: the cache of ``DesignedKv`` and, at the first step,
    its query (later steps drift: ``QueryDrift``)."""
    class Layer:
        def load(self, k, v):
            self.k = k.clone()

    class Store:
        batch, kv_heads, head_dim = 1, KV_HEADS, HEAD_DIM
        layers = [Layer()]

    source = DesignedDecode(layers=1, batch=1, heads=HEADS, kv_heads=KV_HEADS,
                            head_dim=HEAD_DIM, context=1001, steps=2)
    source.load(Store)
    again = DesignedKv().fill(Store, 1000, torch.float32, HEADS)
    assert torch.equal(source.query(0, 0), again)
    assert not torch.equal(source.query(1, 0), again)
    assert source.new_kv(1, 0)[0].shape == (1, KV_HEADS, 1, HEAD_DIM)


# ---------------------------------------------------------------------------- queries per step
def _drift(heads=HEADS, kv_heads=KV_HEADS, head_dim=128, tokens=CONTEXT, batch=1, seed=0):
    """A designed case's keys (KVH, T, D) and the drift of its query."""
    class Layer:
        def load(self, k, v):
            self.k = k[0].clone()

    class Store:
        kv_heads = 0
        layers = [Layer()]

    Store.batch, Store.kv_heads, Store.head_dim = batch, kv_heads, head_dim
    designed = DesignedKv()
    q0 = designed.fill(Store, tokens, torch.float32, heads)
    spec = designed.layout_spec(heads=heads, kv_heads=kv_heads, head_dim=head_dim, tokens=tokens)
    persistent, scale = designed.split(heads, kv_heads, head_dim, torch.float32)
    return Store.layers[0].k, q0, QueryDrift(q0, spec, seed=seed, persistent=persistent,
                                             drift_std=scale)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_query_drift_starts_at_the_designed_query_and_decays_as_the_models_history():
    """Step 0 is the designed query; the persistent part stays; a head's drifting parts L steps
    apart have the accuracy model's cosine ``lag_similarity`` at any pair of steps (stationary,
    not only against step 0) and keep their scale; the heads of a group stay as alike as the
    designed ones; seeded and order-independent."""
    _, q0, drift = _drift(heads=64, kv_heads=16, head_dim=128, tokens=64, batch=8)
    assert torch.equal(drift.query(0), q0)
    queries = [drift.query(t) for t in range(9)]
    parts = [drift.drifting(t) for t in range(9)]
    persistent = queries[5].double() - parts[5]
    torch.testing.assert_close(persistent, queries[2].double() - parts[2], atol=1e-5, rtol=0)
    assert 0.05 < float(persistent.square().mean()) < 0.5  # a share of the unit-scale query
    model = SelectionModel()
    for a, b in [(0, 1), (0, 4), (0, 8), (3, 5), (2, 8), (7, 8)]:
        measured = float(_cos(parts[a], parts[b]).mean())  # 512 heads' cosines
        assert abs(measured - float(lag_similarity(model, b - a))) < 0.02
        ratio = float(parts[b].square().mean() / parts[a].square().mean())
        assert abs(ratio - 1) < 0.05
    groups = parts[6].reshape(8, 16, 4, 128)
    within = _cos(groups[:, :, 0], groups[:, :, 1]).mean()
    assert abs(float(within) - drift.rho) < 0.03
    assert float(_cos(groups[:, 0, 0], groups[:, 1, 0]).mean()) < 0.1  # other groups: apart
    split = {"persistent": drift.persistent, "drift_std": drift.drift_std}
    again = QueryDrift(q0, drift.spec, seed=0, **split)
    assert torch.equal(again.query(5), queries[5])  # asked first, out of order
    assert torch.equal(again.query(2), queries[2])
    assert not torch.equal(QueryDrift(q0, drift.spec, seed=1, **split).query(2), queries[2])


def test_selections_overlap_between_steps_as_the_models_lagged_queries_do():
    """A query t steps on keeps the share of step 0's per-head top-k that the accuracy model's
    past query at lag t keeps (``query_history``: the persistent part kept, the drifting part
    at cosine ``lag_similarity(t)``), in float64, through lag 17; well under all of it. The
    group's union stays the designed step's (which the simulator sizes) within 3%."""
    k, q0, drift = _drift()
    keys = k.double().repeat_interleave(GROUP, dim=0)  # (H, T, D)
    n = CONTEXT
    top = round(RATIO * n)

    def picked(q: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("hd,htd->ht", q[0].double(), keys)
        mask = torch.zeros(HEADS, n, dtype=torch.bool)
        return mask.scatter_(1, logits.topk(top, dim=1).indices, True)

    first = picked(q0)
    union0 = first.reshape(KV_HEADS, GROUP, n).any(dim=1).sum(dim=1).double().mean()
    expected_union = expected_union_rows(n, top, GROUP)
    for step in (1, 4, 9, 17):
        similarity = float(lag_similarity(SelectionModel(), step))
        past = query_history(q0[0].numpy(), np.array([similarity]), step,
                             (q0[0].double() - drift.drifting(0)[0]).numpy())[0]
        model = picked(torch.from_numpy(past)[None])
        later = picked(drift.query(step))
        measured = float((later & first).sum()) / (HEADS * top)
        predicted = float((model & first).sum()) / (HEADS * top)
        assert abs(measured - predicted) < 0.02, (step, measured, predicted)
        assert measured < 0.85
        union = later.reshape(KV_HEADS, GROUP, n).any(dim=1).sum(dim=1).double().mean()
        assert abs(float(union) / float(union0) - 1) < 0.03, (step, float(union), float(union0))
    assert abs(float(union0) / expected_union - 1) < 0.1  # the whole context, head_dim 32


def test_designed_decode_drifts_each_layer_on_its_own():
    class Layer:
        def load(self, k, v):
            pass

    class Store:
        batch, kv_heads, head_dim = 1, KV_HEADS, HEAD_DIM
        layers = [Layer(), Layer()]

    source = DesignedDecode(layers=2, batch=1, heads=HEADS, kv_heads=KV_HEADS,
                            head_dim=HEAD_DIM, context=1001, steps=3)
    source.load(Store)
    assert torch.equal(source.query(0, 0), source.query(0, 1))
    assert not torch.equal(source.query(2, 0), source.query(2, 1))
    assert not torch.equal(source.query(2, 0), source.query(0, 0))


# ---------------------------------------------------------------------------- whole model
TINY_GQA = ModelSpec(name="tiny-llama-gqa", family="llama", num_layers=2, hidden_size=512,
                     num_heads=16, num_kv_heads=4, head_dim=32, ffn_size=512,
                     ffn_kind="swiglu", vocab_size=256, max_context=1 << 20)


def _model_step(fill: str):
    """Layer 0's union rows per KV group, its plan and the designed data of a whole-model
    step over a ``fill`` context under HybridGen's union selection."""
    spec = TINY_GQA
    workload = Workload(batch=1, context=CONTEXT, gen=1, kv_dtype="fp32", weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), spec, workload, 1100)
    options = {**SIZED_HBM_OPTIONS, "gpu_share": 0.125, "topk_ratio": RATIO,
               "adaptive": False, "selection": "group_union"}
    policy = make_policy("hybridgen", spec, profile, workload, options)
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, capacity=CONTEXT + 1, host_threads=1) as decoder:
        if fill == "designed":
            decoder.fill_designed(CONTEXT - 1)
        else:
            decoder.fill_random(CONTEXT - 1)
        plan = policy.step_plan(CONTEXT)
        run = decoder.step(plan, step=0)[0]
        picked = run.selections[0][0].reshape(spec.num_kv_heads, -1)
        return [torch.unique(group) for group in picked], plan.layer


def test_whole_model_attention_selects_the_designed_union():
    """The whole model's attention over ``fill_designed``'s cache selects exactly the union of
    the designed query's per-head top-k (a float64 reference over the same keys: the random
    weights' projections are replaced, not mixed in), and its size is the model's; over random
    K/V the heads pick independently."""
    spec = TINY_GQA
    group = spec.num_heads // spec.num_kv_heads
    rows, lp = _model_step("designed")
    keys, q0, _ = _drift(heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                         head_dim=spec.head_dim, tokens=CONTEXT - 1)
    start, n, k = lp.sink_tokens, lp.host_tokens, lp.host_selected
    logits = torch.einsum("hd,htd->ht", q0[0].double(),
                          keys.double().repeat_interleave(group, dim=0))[:, start:start + n]
    top = logits.topk(k, dim=1).indices.reshape(spec.num_kv_heads, -1) + start
    for measured, reference in zip(rows, top, strict=True):
        assert torch.equal(measured, torch.unique(reference))
    expected = expected_union_rows(n, k, group)
    mean = sum(len(r) for r in rows) / len(rows)
    assert abs(mean - expected) < 4 * math.sqrt(_binomial_var(n, expected) / len(rows))
    random_rows, _ = _model_step("random")
    independent = n * (1 - (1 - k / n) ** group)
    random_mean = sum(len(r) for r in random_rows) / len(random_rows)
    assert abs(random_mean - independent) < 4 * math.sqrt(_binomial_var(n, independent)
                                                          / len(random_rows))

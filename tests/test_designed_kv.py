"""Validation's data carry the accuracy model's GQA structure (``hw_backend.designed_kv``).

The simulator sizes HybridGen's ``group_union`` from ``accuracy.groups.expected_union_rows``;
the executor, run over ``DesignedKv``'s cache and query, must select unions of that size within
sampling error, and the selections whose size is fixed (``per_head``, ``group_shared``) must
move exactly what they moved over random K/V.
"""

from __future__ import annotations

import math

import pytest
import torch

from hgsim.accuracy.groups import expected_union_rows, union_curve
from hgsim.accuracy.synthetic import case_logits
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, attention_model_spec, profile_for_gpu_tokens
from hw_backend.designed_kv import DesignedDecode, DesignedKv
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.executor import PlanExecutor
from hw_backend.kv_store import KvStore
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


def test_designed_decode_asks_every_layer_the_designed_query():
    """hgsim run's attention-only source: the cache of ``DesignedKv`` and its query."""
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
    assert torch.equal(source.query(1, 0), again)
    assert source.new_kv(1, 0)[0].shape == (1, KV_HEADS, 1, HEAD_DIM)

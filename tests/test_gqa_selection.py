"""HybridGen's GQA selection granularity (issue 21): per query head, per KV group with the union
of the heads' top-k sets, per KV group with one shared top-k. The plan carries the mode; the
costs count distinct rows per KV head (the union's size from the accuracy model); the proxy
scores each mode on synthetic attention whose heads share keys; MHA reduces every mode to per
head."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hgsim.accuracy import (
    DEFAULT_SPEC,
    AttentionModelSpec,
    Window,
    accuracy_proxy,
    case_logits,
    expected_union_rows,
    group_spec,
    group_topk_mask,
    query_history,
    scale_problem,
    selection_mask,
    synthesize_case,
    topk_mask,
    union_curve,
)
from hgsim.accuracy.synthetic import _case_seeds, design_logit_parts
from hgsim.catalog import get_model
from hgsim.costs import host_rows_per_kv_head, layer_work
from hgsim.plan import (
    CpuWork,
    GroupScore,
    GroupSelect,
    KvPlacement,
    LayerPlan,
    Merge,
    Selector,
    Transfer,
)
from hgsim.policies import POLICIES, make_policy
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
MODES = list(GroupSelect)
GQA = get_model("llama-3.1-70b")  # 64 query heads, 8 KV heads: G = 8
MHA = get_model("llama-2-13b")
SMALL_GQA = AttentionModelSpec(n_tokens=4096, heads=16, kv_heads=4, head_dim=64, seed=3)


def hybridgen_plan(context=65536, recent=4096, selected=1500, mode=GroupSelect.PER_HEAD,
                   score=GroupScore.MAX) -> LayerPlan:
    exact = selected == context - recent
    return LayerPlan(context, recent, 0, selected, CpuWork.LOGITS_TOPK, Transfer.LOGITS_AND_V,
                     Merge.SOFTMAX_UNION, Selector.ALL if exact else Selector.EXACT_TOPK,
                     KvPlacement({"ddr0": 1.0}, {"cxl0": 1.0}), lookahead=True,
                     selection=mode, group_score=score)


# --- the plan --------------------------------------------------------------------------------

def test_plan_modes_are_enums_and_reduce_to_per_head_for_mha_or_exact_plans():
    lp = replace(hybridgen_plan(), selection="group_union", group_score="sum")
    assert lp.selection is GroupSelect.GROUP_UNION and lp.group_score is GroupScore.SUM
    assert lp.group_selection(8) is GroupSelect.GROUP_UNION
    assert lp.group_selection(1) is GroupSelect.PER_HEAD
    exact = hybridgen_plan(selected=65536 - 4096, mode=GroupSelect.GROUP_SHARED)
    assert exact.exact and exact.group_selection(8) is GroupSelect.PER_HEAD
    assert hash(lp) != hash(hybridgen_plan())  # plans key caches: the mode is part of the key
    with pytest.raises(ValueError):
        replace(lp, selection="per_token")


# --- costs: distinct rows --------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_mha_costs_equal_todays_per_head_costs_in_every_mode(mode):
    base = layer_work(MHA, 2, hybridgen_plan(), "fp16", "fp16")
    assert layer_work(MHA, 2, hybridgen_plan(mode=mode), "fp16", "fp16") == base
    assert host_rows_per_kv_head(MHA, hybridgen_plan(mode=mode)) == 1500


def test_per_head_costs_are_one_row_and_logit_per_query_head_and_pick():
    batch, k, row = 2, 1500, GQA.head_dim * 2
    w = layer_work(GQA, batch, hybridgen_plan(), "fp16", "fp16")
    picks = batch * GQA.num_heads * k
    assert w.gather_v_rows == picks and w.gather_k_rows == 0
    assert w.staged_bytes == pytest.approx(picks * (row + 4.0))
    assert w.staged_share == 1.0


def test_shared_costs_are_k_rows_per_kv_head():
    batch, k, row = 2, 1500, GQA.head_dim * 2
    lp = hybridgen_plan(mode=GroupSelect.GROUP_SHARED)
    w = layer_work(GQA, batch, lp, "fp16", "fp16")
    rows = batch * GQA.num_kv_heads * k
    assert host_rows_per_kv_head(GQA, lp) == k
    assert w.gather_v_rows == rows  # each distinct row once per KV head ...
    assert w.gather_k_rows == rows  # ... and its K row once, to score the group's heads
    assert w.unstaged_rows == rows and w.staged_share == pytest.approx(0.5)
    assert w.staged_bytes == pytest.approx(rows * row + batch * GQA.num_heads * k * 4.0)
    per_head = layer_work(GQA, batch, hybridgen_plan(), "fp16", "fp16")
    assert w.to_gpu_bytes < per_head.to_gpu_bytes / 4


@pytest.mark.parametrize("selected", [1, 300, 1500, 6000, 30000, 61439])
def test_union_rows_lie_between_k_and_g_k_and_come_from_the_accuracy_model(selected):
    lp = hybridgen_plan(selected=selected, mode=GroupSelect.GROUP_UNION)
    rows = host_rows_per_kv_head(GQA, lp)
    group = GQA.gqa_group
    assert selected <= rows <= min(group * selected, lp.host_tokens)
    assert rows == pytest.approx(expected_union_rows(lp.host_tokens, selected, group))
    w = layer_work(GQA, 2, lp, "fp16", "fp16")
    assert w.gather_v_rows == pytest.approx(2 * GQA.num_kv_heads * rows)
    shared = layer_work(GQA, 2, replace(lp, selection=GroupSelect.GROUP_SHARED), "fp16", "fp16")
    per_head = layer_work(GQA, 2, replace(lp, selection=GroupSelect.PER_HEAD), "fp16", "fp16")
    assert shared.staged_bytes <= w.staged_bytes <= per_head.staged_bytes * 1.0001 + 1


def test_exact_plans_cost_the_same_in_every_mode():
    lp = hybridgen_plan(selected=65536 - 4096)
    base = layer_work(GQA, 2, lp, "fp16", "fp16")
    for mode in MODES:
        assert layer_work(GQA, 2, replace(lp, selection=mode), "fp16", "fp16") == base


# --- the union's size ------------------------------------------------------------------------

def test_union_curve_is_between_one_and_g_and_matches_the_proxy_masks():
    group = 8
    curve = union_curve(group)
    for ratio in (0.005, 0.01, 0.05, 0.2, 0.5):
        assert 1.0 <= curve.fraction(ratio) <= group
    assert union_curve(group) is curve  # cached
    # the union the proxy actually scores for a long-context plan (scaled, another window)
    lp = hybridgen_plan(context=262144, recent=16384, selected=12288,
                        mode=GroupSelect.GROUP_UNION)
    problem = scale_problem(lp, group_spec(group))
    logits = case_logits(problem.spec)
    mask = group_topk_mask(logits, problem.window, group)
    start, end = problem.window.sink_tokens, problem.spec.n_tokens - problem.window.gpu_recent_tokens
    measured = mask[::group, start:end].sum(axis=1).mean() / problem.window.host_selected
    predicted = expected_union_rows(lp.host_tokens, lp.host_selected, group) / lp.host_selected
    assert measured == pytest.approx(predicted, rel=0.05)


def test_union_grows_when_heads_are_less_alike():
    alike = union_curve(4, DEFAULT_SPEC).fraction(0.05)
    apart = union_curve(4, replace(DEFAULT_SPEC, head_noise_std=1.5)).fraction(0.05)
    assert 1.0 < alike < apart < 4.0


def test_expected_union_edges():
    assert expected_union_rows(100, 10, 1) == 10
    assert expected_union_rows(100, 0, 8) == 0
    assert expected_union_rows(100, 100, 8) == 100
    assert expected_union_rows(100, 60, 8) <= 100
    with pytest.raises(ValueError):
        expected_union_rows(10, 11, 2)


# --- the synthetic model's groups ------------------------------------------------------------

def test_queries_of_a_group_are_correlated_as_documented():
    """The drifting parts of a group's queries correlate by ``query_correlation``; the
    persistent part is one vector per group."""
    spec = AttentionModelSpec(n_tokens=64, heads=128, kv_heads=16, head_dim=128)
    case = synthesize_case(spec)
    persistent = case.persistent_q[0].astype(np.float64)
    assert np.array_equal(persistent[0], persistent[7]) and not np.array_equal(persistent[7],
                                                                               persistent[8])
    q = case.q[0].astype(np.float64) - persistent
    unit = q / np.linalg.norm(q, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = [cos[i, j] for i in range(128) for j in range(i) if i // 8 == j // 8]
    other = [cos[i, j] for i in range(128) for j in range(i) if i // 8 != j // 8]
    assert np.mean(same) == pytest.approx(spec.query_correlation, abs=0.05)
    assert abs(np.mean(other)) < 0.05


def test_persistent_part_sees_the_structure_and_a_drifted_query_fresh_noise_of_the_design():
    """The persistent query part sees exactly the persistent logits (sinks, recency, heavy
    hitters); a query whose drifting part is turned to cosine c sees them at full strength plus
    c times the designed noise plus fresh noise of variance (1 - c^2) times the designed one
    (float64 over 32k tokens x 8 heads)."""
    spec = DEFAULT_SPEC.with_tokens(32768)
    case = synthesize_case(spec)
    persistent, drifting = design_logit_parts(spec, np.random.default_rng(_case_seeds(spec)[0]))
    k = case.k[0].astype(np.float64)
    p = case.persistent_q[0].astype(np.float64)
    seen = np.einsum("hd,htd->ht", p, k) / np.sqrt(spec.head_dim)
    np.testing.assert_allclose(seen, persistent, atol=2e-3)
    assert 0.1 < case.persistent_share < 0.4
    c = 0.5
    past = query_history(case.q[0], np.array([c]), 3, p)[0]
    logits = np.einsum("hd,htd->ht", past, k) / np.sqrt(spec.head_dim)
    fresh = logits - persistent - c * drifting
    designed = spec.noise_std**2 + spec.head_noise_std**2
    assert np.var(fresh) == pytest.approx((1 - c * c) * designed, rel=0.05)
    assert abs(np.corrcoef(fresh.ravel(), drifting.ravel())[0, 1]) < 0.02
    # the structure is seen at full strength: no more fresh noise on heavy hitters than elsewhere
    heavy = persistent > spec.heavy_logit_boost - 1e-9
    assert np.var(fresh[heavy]) == pytest.approx(np.var(fresh), rel=0.15)
    # the drifting parts lie off the persistent direction, and turning one keeps it there
    d = case.q[0].astype(np.float64) - p
    assert np.max(np.abs(np.sum(d * p, axis=1))) < 1e-3 * np.sum(p * p, axis=1).min()
    assert np.max(np.abs(np.sum((past - p) * p, axis=1))) < 1e-6 * np.sum(p * p, axis=1).min()


def test_group_logits_are_realised_exactly_with_correlated_queries():
    case = synthesize_case(SMALL_GQA)
    q, k = case.q[0].astype(np.float64), case.k[0].astype(np.float64)
    group = SMALL_GQA.heads_per_group
    logits = np.stack([q[h] @ k[h // group].T for h in range(SMALL_GQA.heads)]) / np.sqrt(64)
    np.testing.assert_allclose(logits, case.logits, atol=2e-3)
    np.testing.assert_allclose(case_logits(SMALL_GQA), case.logits)


# --- selection masks and the proxy -----------------------------------------------------------

@pytest.fixture(scope="module")
def gqa_logits():
    return synthesize_case(SMALL_GQA).logits


def test_union_mask_contains_each_heads_topk_and_is_shared_by_the_group(gqa_logits):
    window = Window(4, 256, 100, Selector.EXACT_TOPK, GroupSelect.GROUP_UNION)
    group = SMALL_GQA.heads_per_group
    union = group_topk_mask(gqa_logits, window, group)
    own = topk_mask(gqa_logits, window)
    assert np.all(union | ~own)  # union ⊇ each head's top-k
    for g in range(SMALL_GQA.kv_heads):
        rows = union[g * group : (g + 1) * group]
        assert (rows == rows[0]).all()
        host = rows[0, 4 : 4096 - 256].sum()
        assert 100 <= host <= group * 100


@pytest.mark.parametrize("score", list(GroupScore))
def test_shared_mask_keeps_k_host_tokens_per_group_by_the_aggregate(gqa_logits, score):
    window = Window(4, 256, 100, Selector.EXACT_TOPK, GroupSelect.GROUP_SHARED, score)
    group = SMALL_GQA.heads_per_group
    shared = group_topk_mask(gqa_logits, window, group)
    assert (shared[:, 4 : 4096 - 256].sum(axis=1) == 100).all()
    host = gqa_logits[:group, 4 : 4096 - 256]
    agg = host.max(axis=0) if score is GroupScore.MAX else host.sum(axis=0)
    best = np.sort(np.argsort(-agg)[:100]) + 4
    assert set(np.flatnonzero(shared[0, 4 : 4096 - 256]) + 4) == set(best)


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_per_head_with_one_head_per_group(mode):
    spec = AttentionModelSpec(n_tokens=2048, heads=4, kv_heads=4, head_dim=32, seed=5)
    case = synthesize_case(spec)
    window = Window(4, 128, 50, Selector.EXACT_TOPK)
    per_head = selection_mask(case.q, case.k, window)
    assert np.array_equal(selection_mask(case.q, case.k, replace(window, selection=mode)),
                          per_head)
    lp = hybridgen_plan(context=32768, recent=2048, selected=1000)
    assert accuracy_proxy(replace(lp, selection=mode)) == accuracy_proxy(lp)


@pytest.mark.parametrize("selected", [200, 1500, 6000])
def test_union_is_at_least_as_accurate_as_per_head_and_shared_is_not(selected):
    spec = group_spec(8)
    lp = hybridgen_plan(context=32768, recent=2048, selected=selected)
    per_head = accuracy_proxy(lp, spec)
    union = accuracy_proxy(replace(lp, selection=GroupSelect.GROUP_UNION), spec)
    shared = accuracy_proxy(replace(lp, selection=GroupSelect.GROUP_SHARED), spec)
    assert np.all(union.per_head_mass >= per_head.per_head_mass - 1e-12)  # a superset, per head
    assert union.rel_error <= per_head.rel_error
    assert np.all(shared.per_head_mass <= per_head.per_head_mass + 1e-12)  # own top-k is best
    assert 0 < per_head.rel_error and shared.mass_kept > 0.85


# --- the policy and the results --------------------------------------------------------------

def test_hybridgen_option_reaches_the_plan_and_mha_runs_per_head():
    profile = load_profile(H100)
    workload = Workload(batch=2, context=131072, gen=4)
    for mode in MODES:
        pol = make_policy("hybridgen", GQA, profile, workload, {"selection": mode.value})
        assert pol.layer_plan(131072).selection is mode
        mha = make_policy("hybridgen", MHA, profile, workload, {"selection": mode.value})
        assert mha.layer_plan(131072).selection is GroupSelect.PER_HEAD
    sum_plan = make_policy("hybridgen", GQA, profile, workload,
                           {"selection": "group_shared", "group_score": "sum"}).layer_plan(131072)
    assert sum_plan.group_score is GroupScore.SUM
    assert POLICIES["hybridgen_union"][1] == {"selection": "group_union"}
    assert POLICIES["hybridgen_shared"][1] == {"selection": "group_shared"}


def test_grouped_landing_zone_is_smaller_so_more_tokens_stay_on_the_gpu():
    profile = load_profile(H100)
    workload = Workload(batch=2, context=131072, gen=4)
    shares = {mode: make_policy("hybridgen", GQA, profile, workload,
                                {"selection": mode.value}).scheduler.gpu_share for mode in MODES}
    assert shares[GroupSelect.PER_HEAD] < shares[GroupSelect.GROUP_UNION]
    assert shares[GroupSelect.GROUP_UNION] <= shares[GroupSelect.GROUP_SHARED]


def test_rows_record_the_mode_and_grouping_sends_fewer_bytes():
    runs = {mode: simulate(H100, GQA, "hybridgen", Workload(batch=2, context=131072, gen=4),
                           policy_options={"selection": mode.value, "adaptive": False},
                           fidelity=Fidelity(decode_samples=2)) for mode in MODES}
    for mode, result in runs.items():
        assert result.to_row()["selection"] == mode.value
    h2d = {mode: r.bytes_by_resource["gpu0.h2d"] for mode, r in runs.items()}
    assert h2d[GroupSelect.GROUP_SHARED] < h2d[GroupSelect.GROUP_UNION] < h2d[GroupSelect.PER_HEAD]
    assert (runs[GroupSelect.GROUP_UNION].accuracy_rel_error
            < runs[GroupSelect.PER_HEAD].accuracy_rel_error)
    mha = simulate(H100, MHA, "hybridgen", Workload(batch=2, context=131072, gen=4),
                   policy_options={"selection": "group_union"}, fidelity=Fidelity(decode_samples=2))
    assert mha.to_row()["selection"] == "per_head"


def test_union_rows_never_shrink_as_the_heads_select_more():
    """The landing zone's ceiling bisects on r and the transfer cost follows k: both need the
    union's size non-decreasing in k, across the steps where k's share of the host range maps
    to the next whole token of the curve's body (1M host tokens: ~31 per body token)."""
    host = 1_000_000
    rows = [expected_union_rows(host, k, 4) for k in range(206_000, 206_200)]
    assert np.all(np.diff(rows) >= 0)
    curve = union_curve(8)
    ratios = np.linspace(0.3, 0.3 + 200 / curve.tokens, 2000)
    per_host_token = [r * curve.fraction(r) for r in ratios]
    assert np.all(np.diff(per_host_token) >= 0)

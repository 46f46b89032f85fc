"""Accuracy proxy: synthetic attention model, token selection, fidelity and the cached proxy."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hgsim.accuracy import (
    AttentionModelSpec,
    Fidelity,
    SelectionModel,
    Window,
    accuracy_proxy,
    attention_logits,
    exact_attention,
    fidelity,
    fidelity_from_logits,
    history_similarities,
    is_lossless,
    next_query,
    output_error,
    proxy_case,
    scale_problem,
    selection_mask,
    softmax,
    synthesize,
    synthesize_case,
)
from hgsim.accuracy.proxy import _recency_excess, cache_info, clear_caches
from hgsim.accuracy.synthetic import query_rng
from hgsim.plan import CpuWork, KvPlacement, LayerPlan, Merge, Selector, Transfer

SMALL = AttentionModelSpec(n_tokens=4096, heads=8, kv_heads=4, head_dim=64, seed=1)


def layer_plan(context: int, recent: int, selected: int, selector: Selector, sinks: int = 4):
    return LayerPlan(
        context=context,
        gpu_recent_tokens=recent,
        sink_tokens=sinks,
        host_selected=selected,
        cpu_work=CpuWork.NONE,
        transfer=Transfer.NONE,
        merge=Merge.NONE,
        selector=selector,
        placement=KvPlacement.single("dram"),
    )


def host_tokens(n_tokens: int, window: Window) -> int:
    return n_tokens - window.sink_tokens - window.gpu_recent_tokens


def uniform_spec(n_tokens: int = 1000) -> AttentionModelSpec:
    """No structure at all: every designed logit is exactly zero."""
    return AttentionModelSpec(
        n_tokens=n_tokens,
        heads=4,
        kv_heads=2,
        head_dim=32,
        sink_logit_boost=0.0,
        recency_boost=0.0,
        heavy_fraction=0.0,
        noise_std=0.0,
        head_noise_std=0.0,
    )


@pytest.fixture(scope="module")
def small_case():
    return synthesize_case(SMALL)


# --- synthetic attention model ---------------------------------------------------------------


def test_synthesised_tensors_have_documented_shapes_and_dtypes(small_case):
    q, k, v = small_case.qkv
    assert q.shape == (1, 8, 64) and k.shape == v.shape == (1, 4, 4096, 64)
    assert q.dtype == k.dtype == v.dtype == np.float32
    assert small_case.logits.shape == (8, 4096)


@pytest.mark.parametrize(
    "spec",
    [SMALL, AttentionModelSpec(n_tokens=2048, heads=32, kv_heads=4, head_dim=128, seed=5)],
    ids=["gqa2", "gqa8"],
)
def test_logits_recomputed_from_tensors_equal_the_design(spec):
    case = synthesize_case(spec)
    recomputed = attention_logits(case.q, case.k)
    np.testing.assert_allclose(recomputed, case.logits, rtol=0, atol=1e-4)


def test_design_has_sinks_recency_and_heavy_hitters(small_case):
    probs = softmax(small_case.logits)
    middle = probs[:, SMALL.sink_tokens : -256]
    density = middle.mean()
    assert probs[:, : SMALL.sink_tokens].mean() > 1000 * density  # sinks
    assert probs[:, -64:].mean() > 10 * density  # recency
    top_two_percent = np.sort(middle, axis=1)[:, -middle.shape[1] // 50 :].sum(axis=1)
    assert np.mean(top_two_percent / middle.sum(axis=1)) > 0.5  # heavy hitters


def test_synthesis_is_deterministic_per_seed():
    first, again = synthesize(SMALL), synthesize(SMALL)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = synthesize(AttentionModelSpec(n_tokens=4096, heads=8, kv_heads=4, head_dim=64, seed=2))
    for a, b in zip(first, other, strict=True):
        assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "bad",
    [
        dict(heads=6, kv_heads=4),
        dict(heads=8, kv_heads=1, head_dim=4),
        dict(sink_tokens=10, n_tokens=5),
        dict(heavy_fraction=1.5),
        dict(noise_std=-1.0),
    ],
)
def test_invalid_specs_are_rejected(bad):
    with pytest.raises(ValueError):
        AttentionModelSpec(**bad)


@given(similarity=st.floats(-1.0, 1.0), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_next_query_has_requested_cosine_and_same_norm(similarity, seed):
    q = np.random.default_rng(seed).standard_normal((1, 4, 64))
    nxt = next_query(q, similarity, seed)
    cosine = np.sum(q * nxt, axis=-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(nxt, axis=-1)
    np.testing.assert_allclose(cosine, similarity, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(nxt, axis=-1), np.linalg.norm(q, axis=-1))
    np.testing.assert_array_equal(nxt, next_query(q, similarity, seed))


def test_query_rng_feeds_numpy_flat_entropy(monkeypatch):
    """The decode loop seeds with ``[run, layer, step]``; numpy before 2.3 rejects nested
    sequences in ``SeedSequence``, so the entropy must reach numpy flat, whatever numpy the
    machine has (the lent H200 had one that raised)."""
    seen = []
    real = np.random.default_rng

    def recording_default_rng(entropy=None):
        seen.append(entropy)
        return real(entropy)

    monkeypatch.setattr(np.random, "default_rng", recording_default_rng)
    rng = query_rng([7, 3, np.int64(11)])
    assert all(isinstance(word, int) for word in seen[-1])
    assert rng.random() == query_rng([7, 3, 11]).random()
    assert query_rng([7, 3, 11]).random() != query_rng([7, 3, 12]).random()
    assert query_rng(5).random() == query_rng([5]).random()


# --- fidelity: lossless and closed-form cases ----------------------------------------------


@pytest.mark.parametrize(
    "window",
    [
        Window(4, 256, 0, Selector.ALL),
        Window(4, 256, 4096 - 260, Selector.EXACT_TOPK),
        Window(4, 256, 4096 - 260, Selector.SPECULATIVE_TOPK),
        Window(4, 256, 4096 - 260, Selector.HEAVY_HITTER),
        Window(0, 4096, 0, Selector.DROPPED),
    ],
    ids=["all", "topk-all", "speculative-all", "h2o-all", "everything-resident"],
)
def test_exact_selections_are_lossless(small_case, window):
    result = fidelity(*small_case.qkv, window, per_head=True)
    assert result.mass_kept == pytest.approx(1.0, abs=1e-12)
    assert result.rel_error < 1e-6
    assert result.per_head_mass.shape == (8,)


def test_exact_plan_through_proxy_is_lossless():
    for plan in (
        layer_plan(1 << 20, 1024, 0, Selector.ALL),
        layer_plan(1 << 20, 1024, (1 << 20) - 1028, Selector.EXACT_TOPK),
    ):
        result = accuracy_proxy(plan)
        assert (result.mass_kept, result.rel_error) == (1.0, 0.0)


@pytest.mark.parametrize("kept", [1, 10, 333, 999, 1000])
def test_uniform_logits_keep_exactly_the_kept_fraction(kept):
    spec = uniform_spec(1000)
    case = synthesize_case(spec)
    assert np.all(case.logits == 0.0)
    mask = np.zeros((spec.heads, spec.n_tokens), dtype=bool)
    mask[:, :kept] = True
    exact = fidelity_from_logits(case.logits, case.v[0], mask)
    assert exact.mass_kept == pytest.approx(kept / spec.n_tokens, abs=1e-12)
    # closed form output error: mean of kept values against mean of all values
    values = np.repeat(case.v[0].astype(np.float64), spec.heads_per_group, axis=0)
    expected = np.linalg.norm(values[:, :kept].mean(1) - values.mean(1), axis=-1)
    expected /= np.linalg.norm(values.mean(1), axis=-1)
    assert exact.rel_error == pytest.approx(expected.mean(), rel=1e-5)
    # the realised float32 tensors carry the same logits up to rounding
    measured = fidelity(*case.qkv, mask)
    assert measured.mass_kept == pytest.approx(kept / spec.n_tokens, abs=1e-5)


def test_exact_attention_matches_torch_float64_sdpa(small_case):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).double() for x in small_case.qkv)
    group = SMALL.heads_per_group
    reference = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    )[:, :, 0]
    ours = exact_attention(*small_case.qkv)
    np.testing.assert_allclose(ours, reference[0].numpy(), rtol=1e-12, atol=1e-14)
    assert output_error(*small_case.qkv, reference).max() < 1e-12


def test_lossy_rel_error_matches_torch_masked_sdpa(small_case):
    torch = pytest.importorskip("torch")
    window = Window(4, 256, 200, Selector.EXACT_TOPK)
    mask = selection_mask(small_case.q[0], small_case.k[0], window)
    q, k, v = (torch.from_numpy(x).double() for x in small_case.qkv)
    group = SMALL.heads_per_group
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    attn_mask = torch.from_numpy(mask)[None, :, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    masked = sdpa(q[:, :, None], k, v, attn_mask=attn_mask)[0, :, 0]
    full = sdpa(q[:, :, None], k, v)[0, :, 0]
    expected = (torch.linalg.norm(masked - full, dim=-1) / torch.linalg.norm(full, dim=-1)).numpy()
    result = fidelity(*small_case.qkv, mask, per_head=True)
    np.testing.assert_allclose(result.per_head_error, expected, rtol=1e-5)
    assert 0 < result.rel_error < 1


def test_fidelity_accepts_torch_tensors_and_batches(small_case):
    torch = pytest.importorskip("torch")
    window = Window(4, 256, 100, Selector.EXACT_TOPK)
    single = fidelity(*small_case.qkv, window)
    tensors = [torch.from_numpy(x) for x in small_case.qkv]
    assert fidelity(*tensors, window) == single
    batched = [np.concatenate([x, x]) for x in small_case.qkv]
    assert fidelity(*batched, window) == pytest.approx(single)
    unbatched = [x[0] for x in small_case.qkv]
    assert fidelity(*unbatched, window) == single


def test_empty_attended_set_has_zero_mass_and_full_error(small_case):
    result = fidelity(*small_case.qkv, np.zeros((8, 4096), dtype=bool))
    assert result.mass_kept == 0.0 and result.rel_error == pytest.approx(1.0)


# --- selection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selector", [Selector.EXACT_TOPK, Selector.SPECULATIVE_TOPK, Selector.HEAVY_HITTER]
)
def test_selectors_keep_resident_tokens_and_exactly_k_host_tokens(small_case, selector):
    window = Window(4, 256, 123, selector)
    mask = selection_mask(small_case.q[0], small_case.k[0], window)
    assert mask[:, :4].all() and mask[:, -256:].all()
    np.testing.assert_array_equal(mask[:, 4:-256].sum(axis=1), 123)


def test_selection_accepts_batched_and_torch_inputs(small_case):
    torch = pytest.importorskip("torch")
    window = Window(4, 256, 50, Selector.SPECULATIVE_TOPK)
    reference = selection_mask(small_case.q[0], small_case.k[0], window, seed=3)
    batched = selection_mask(small_case.q, small_case.k, window, seed=3)
    tensors = selection_mask(
        torch.from_numpy(small_case.q), torch.from_numpy(small_case.k), window, seed=3
    )
    np.testing.assert_array_equal(batched, reference)
    np.testing.assert_array_equal(tensors, reference)


def test_dropped_attends_only_resident_tokens(small_case):
    mask = selection_mask(small_case.q[0], small_case.k[0], Window(4, 256, 0, Selector.DROPPED))
    assert mask.sum() == 8 * 260 and mask[:, :4].all() and mask[:, -256:].all()


@given(
    ks=st.lists(st.integers(0, 4096 - 260), min_size=2, max_size=6, unique=True),
    seed=st.integers(0, 3),
)
@settings(max_examples=25, deadline=None)
def test_mass_kept_grows_monotonically_with_host_selected(ks, seed):
    case = _cached_small(seed)
    masses = [
        fidelity(*case.qkv, Window(4, 256, k, Selector.EXACT_TOPK)).mass_kept for k in sorted(ks)
    ]
    assert all(b >= a - 1e-12 for a, b in zip(masses, masses[1:], strict=False))


_SMALL_CASES: dict[int, object] = {}


def _cached_small(seed: int):
    if seed not in _SMALL_CASES:
        spec = AttentionModelSpec(n_tokens=4096, heads=8, kv_heads=4, head_dim=64, seed=seed)
        _SMALL_CASES[seed] = synthesize_case(spec)
    return _SMALL_CASES[seed]


@pytest.mark.parametrize("budget", [40, 200, 800])
def test_exact_topk_keeps_at_least_as_much_mass_as_approximate_selectors(budget):
    results = {
        s: [] for s in (Selector.EXACT_TOPK, Selector.SPECULATIVE_TOPK, Selector.HEAVY_HITTER)
    }
    for seed in range(4):
        case = _cached_small(seed)
        for selector, found in results.items():
            result = fidelity(*case.qkv, Window(4, 256, budget, selector), seed=seed, per_head=True)
            found.append(result.per_head_mass)
    exact = np.array(results[Selector.EXACT_TOPK])
    for selector in (Selector.SPECULATIVE_TOPK, Selector.HEAVY_HITTER):
        approx = np.array(results[selector])
        assert np.all(exact >= approx - 1e-12)  # top-k of the true logits is optimal per head
        assert exact.mean() > approx.mean()


def test_heavy_hitters_keep_the_attention_sinks(small_case):
    """H2O plans keep no sinks explicitly; accumulated attention must find them."""
    window = Window(0, 256, 100, Selector.HEAVY_HITTER)
    mask = selection_mask(small_case.q, small_case.k, window)
    assert mask[:, : SMALL.sink_tokens].all()


def test_history_similarity_decays_with_lag_towards_the_floor():
    model = SelectionModel(history_queries=5, decision_lag=2, history_similarity_floor=0.3)
    similarities = history_similarities(model)  # oldest first
    assert len(similarities) == 5 and np.all(np.diff(similarities) > 0)
    assert similarities[-1] == pytest.approx(0.3 + 0.7 * 0.9**2)
    assert np.all(similarities > 0.3)


def test_perfect_speculation_is_exact_topk(small_case):
    q, k = small_case.q[0], small_case.k[0]
    exact = selection_mask(q, k, Window(4, 256, 150, Selector.EXACT_TOPK))
    perfect = SelectionModel(speculation_similarity=1.0)
    speculated = selection_mask(q, k, Window(4, 256, 150, Selector.SPECULATIVE_TOPK), perfect)
    np.testing.assert_array_equal(exact, speculated)


def test_speculation_degrades_with_query_dissimilarity():
    def mass(similarity: float, dims: float = 1.0) -> float:
        model = SelectionModel(speculation_similarity=similarity, speculation_dim_fraction=dims)
        window = Window(4, 256, 150, Selector.SPECULATIVE_TOPK)
        return np.mean(
            [
                fidelity(*_cached_small(s).qkv, window, model=model, seed=s).mass_kept
                for s in range(4)
            ]
        )

    assert mass(1.0) > mass(0.9) > mass(0.5) > mass(0.0)
    assert mass(0.9, dims=0.25) < mass(0.9)


def test_dropped_with_small_recent_window_loses_mass(small_case):
    result = fidelity(*small_case.qkv, Window(4, 64, 0, Selector.DROPPED))
    assert result.mass_kept < 0.8 and result.rel_error > 0.2


def test_windows_larger_than_the_context_are_rejected(small_case):
    with pytest.raises(ValueError):
        selection_mask(small_case.q[0], small_case.k[0], Window(100, 4000, 0, Selector.DROPPED))
    with pytest.raises(ValueError):
        selection_mask(small_case.q[0], small_case.k[0], Window(4, 256, 5000, Selector.EXACT_TOPK))


# --- the simulator's proxy -------------------------------------------------------------------


def test_proxy_matches_fidelity_on_the_same_data():
    """What hw_backend measures on the synthetic tensors is what the simulator predicts."""
    spec = AttentionModelSpec(n_tokens=4096, heads=4, kv_heads=2, head_dim=64, seed=7)
    for selector, selected in ((Selector.EXACT_TOPK, 200), (Selector.DROPPED, 0)):
        plan = layer_plan(4096, 256, selected, selector)
        measured = fidelity(*synthesize(spec), plan)
        predicted = accuracy_proxy(plan, spec)
        assert predicted.mass_kept == pytest.approx(measured.mass_kept, abs=1e-12)
        assert predicted.rel_error == pytest.approx(measured.rel_error, rel=1e-9)


def test_real_topk_execution_matches_the_proxy():
    """A kernel attending the proxy's tensors with real top-k agrees with the prediction."""
    torch = pytest.importorskip("torch")
    spec = AttentionModelSpec(heads=8, kv_heads=2, head_dim=64, seed=3)
    plan = layer_plan(1 << 16, 2048, 3000, Selector.EXACT_TOPK)  # scaled onto 32k tokens
    case, window = proxy_case(plan, spec)
    q, k, v = (torch.tensor(x, dtype=torch.float64) for x in case.qkv)
    group = spec.heads_per_group
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    # HybridGen's split: GPU attends sinks + recent, the "CPU" picks per-head top-k host logits
    logits = (q[0, :, None] * k[0]).sum(-1) / math.sqrt(spec.head_dim)
    start, end = window.sink_tokens, logits.shape[1] - window.gpu_recent_tokens
    chosen = torch.topk(logits[:, start:end], window.host_selected, dim=1).indices + start
    attend = torch.zeros_like(logits, dtype=torch.bool)
    attend[:, :start] = attend[:, end:] = True
    attend.scatter_(1, chosen, True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=attend[None, :, None]
    )
    measured = output_error(*case.qkv, out[0, :, 0])
    predicted = accuracy_proxy(plan, spec)
    np.testing.assert_allclose(measured, predicted.per_head_error, rtol=1e-6)
    assert not case.k.flags.writeable  # cached tensors are shared


def test_dropped_plans_are_never_lossless():
    plan = layer_plan(8192, 512, 0, Selector.DROPPED)
    full = LayerPlan(
        8192, 512, 4, 8192 - 516, CpuWork.NONE, Transfer.NONE, Merge.NONE, Selector.DROPPED, None
    )
    assert not is_lossless(plan) and not is_lossless(full)
    assert is_lossless(layer_plan(8192, 8188, 0, Selector.DROPPED))  # nothing on the host
    assert accuracy_proxy(full, SMALL).mass_kept < 1.0


def test_default_spec_separates_topk_from_truncation():
    context = 32768
    host = context - 4 - 1024
    topk = accuracy_proxy(layer_plan(context, 1024, round(0.05 * host), Selector.EXACT_TOPK))
    truncated = accuracy_proxy(layer_plan(context, 1024, 0, Selector.DROPPED))
    assert topk.mass_kept > 0.9 > 0.7 > truncated.mass_kept
    assert topk.rel_error < 0.1 < truncated.rel_error


def test_huge_contexts_scale_down_preserving_ratios():
    spec = AttentionModelSpec()
    plan = layer_plan(1 << 20, 1 << 15, 52_428, Selector.EXACT_TOPK)  # recent 1/32, top-k ~5%
    problem = scale_problem(plan, spec, max_tokens=32768)
    window = problem.window
    assert problem.spec.n_tokens == 32768 and problem.factor == pytest.approx(1 / 32)
    assert window.sink_tokens == 4 and window.gpu_recent_tokens == 1024
    assert window.host_selected / host_tokens(32768, window) == pytest.approx(
        plan.topk_ratio, rel=1e-3
    )
    assert problem.spec.recency_tokens == pytest.approx(spec.recency_tokens / 32)
    # the recency boost is re-solved so that recency's extra mass shrinks with the context
    zoomed = problem.spec
    assert _recency_excess(zoomed.recency_boost, zoomed.recency_tokens, 32768) == pytest.approx(
        _recency_excess(spec.recency_boost, spec.recency_tokens, 1 << 20) / 32
    )
    assert problem.spec.sink_logit_boost == pytest.approx(spec.sink_logit_boost - math.log(32))
    small = scale_problem(layer_plan(8192, 512, 100, Selector.DROPPED), spec)
    assert small.factor == 1.0 and small.spec.n_tokens == 8192
    assert small.window == Window(4, 512, 100, Selector.DROPPED)


@given(
    context=st.integers(1, 1 << 30),
    sinks=st.integers(0, 64),
    recent_share=st.floats(0.0, 1.0),
    selected_share=st.floats(0.0, 1.0),
    selector=st.sampled_from(list(Selector)),
    max_tokens=st.integers(16, 1 << 16),
)
@example(1000, 999, 0.0, 1.0, Selector.EXACT_TOPK, 16)  # sinks alone would fill the budget
def test_scaled_windows_are_valid_and_keep_their_kind(
    context, sinks, recent_share, selected_share, selector, max_tokens
):
    sinks = min(sinks, context)
    recent = round(recent_share * (context - sinks))
    host = context - sinks - recent
    plan = layer_plan(context, recent, round(selected_share * host), selector, sinks=sinks)
    problem = scale_problem(plan, AttentionModelSpec(), max_tokens=max_tokens)
    window, n_tokens = problem.window, problem.spec.n_tokens
    assert n_tokens == min(context, max_tokens)
    scaled_host = host_tokens(n_tokens, window)
    assert window.sink_tokens >= 0 and window.gpu_recent_tokens >= 0
    assert scaled_host >= 0 and 0 <= window.host_selected <= scaled_host
    assert (scaled_host == 0) == (host == 0)
    assert (window.host_selected == 0) == (plan.host_selected == 0) or scaled_host == 0
    if plan.host_selected == host:
        assert window.host_selected == scaled_host


def test_scaling_keeps_partial_selections_partial():
    plan = layer_plan(1 << 24, 10, 1, Selector.EXACT_TOPK)
    window = scale_problem(plan, AttentionModelSpec(), max_tokens=4096).window
    assert window.gpu_recent_tokens == 1 and window.host_selected == 1
    assert 0 < window.host_selected < host_tokens(4096, window)


def test_zoomed_problem_keeps_attention_mass_shares():
    """A 128k context and its zoom onto 32k tokens give each token class a similar share."""
    spec = AttentionModelSpec(heads=4, kv_heads=4, head_dim=16)
    plan = layer_plan(131072, 4096, 0, Selector.DROPPED)

    def shares(problem_spec: AttentionModelSpec, recent: int) -> np.ndarray:
        probs = softmax(synthesize_case(problem_spec).logits)
        sinks = probs[:, :4].sum(1).mean()
        return np.array([sinks, probs[:, -recent:].sum(1).mean()])

    zoom = scale_problem(plan, spec, max_tokens=32768)
    full = shares(spec.with_tokens(131072), 4096)
    zoomed = shares(zoom.spec, zoom.window.gpu_recent_tokens)
    np.testing.assert_allclose(zoomed, full, atol=0.06)


def test_proxy_caches_scaled_problems():
    clear_caches()
    spec = AttentionModelSpec(n_tokens=8192, heads=4, kv_heads=4, head_dim=32)
    plan = layer_plan(1 << 21, 1 << 16, 1 << 15, Selector.EXACT_TOPK)
    first = accuracy_proxy(plan, spec, max_tokens=8192)
    # a different plan for the hardware (CPU work, merge, placement) with the same selection
    other = replace(
        plan,
        cpu_work=CpuWork.LOGITS_TOPK,
        merge=Merge.SOFTMAX_UNION,
        placement=KvPlacement({"dram": 0.5, "cxl": 0.5}, {"cxl": 1.0}),
    )
    again = accuracy_proxy(other, spec, max_tokens=8192)
    less = accuracy_proxy(replace(plan, host_selected=1 << 14), spec, max_tokens=8192)
    info = cache_info()
    assert again is first
    assert info["results"].hits == 1 and info["results"].misses == 2
    assert info["cases"].misses == 1  # both selections scored on the same synthetic tensors
    assert 0.5 < less.mass_kept < first.mass_kept < 1.0
    assert not first.per_head_mass.flags.writeable
    assert isinstance(first, Fidelity)

"""The opt-in power law over the non-sink tokens (``AttentionModelSpec.rank_exponent``): off it
changes nothing; on, an exact top-k of a fixed share keeps more of the mass at longer contexts,
by the closed form of the sums of i^-s where nothing else moves the logits, and the proxy's zoom
keeps that form exactly (its buckets are the exact sums) and the noisy model's scores closely."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from hgsim import api
from hgsim.accuracy import AttentionModelSpec, accuracy_proxy
from hgsim.accuracy import synthetic as synthetic_module
from hgsim.accuracy.overrides import FieldError
from hgsim.accuracy.proxy import zoom_spec
from hgsim.accuracy.shape import RANKED_SHARE, attention_shares
from hgsim.accuracy.synthetic import (
    ATTENTION,
    _case_seeds,
    case_logits,
    case_ranks,
    design_logit_parts,
    heavy_hitter_boosts,
    persistent_energy_share,
    rank_bucket_sums,
    rank_logits,
    structure_logits,
    synthesize_case,
)
from hgsim.plan import CpuWork, KvPlacement, LayerPlan, Merge, Selector, Transfer

SMALL = AttentionModelSpec(heads=4, kv_heads=2, head_dim=32, seed=3)
# the law alone: no sinks, no recency, no heavy hitters, no noise
BARE = AttentionModelSpec(heads=2, kv_heads=2, head_dim=32, sink_tokens=0, recency_boost=0.0,
                          heavy_fraction=0.0, noise_std=0.0, head_noise_std=0.0,
                          rank_exponent=1.0)


def partial_sums(exponent: float, n: int) -> np.ndarray:
    """S(k) = sum_{i <= k} i^-s for k = 0..n."""
    return np.concatenate([[0.0], np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)])


def plan(context: int, selected: int, recent: int = 0, sinks: int = 0) -> LayerPlan:
    return LayerPlan(context=context, gpu_recent_tokens=recent, sink_tokens=sinks,
                     host_selected=selected, cpu_work=CpuWork.LOGITS_TOPK,
                     transfer=Transfer.LOGITS_AND_V, merge=Merge.SOFTMAX_UNION,
                     selector=Selector.EXACT_TOPK, placement=KvPlacement.single("ddr"))


def test_law_off_draws_exactly_what_the_model_drew_before():
    """rank_exponent 0: the logits are the old draws in the old order (heavy hitters, then the
    group's noise, then each head's), whatever the other rank fields say."""
    spec = SMALL.with_tokens(3000)
    rng = np.random.default_rng(_case_seeds(spec)[0])
    persistent = structure_logits(spec) + heavy_hitter_boosts(spec, rng)
    drifting = np.repeat(spec.noise_std * rng.standard_normal(persistent.shape), 2, axis=0)
    drifting += spec.head_noise_std * rng.standard_normal(drifting.shape)
    for variant in (spec, replace(spec, rank_logit_boost=-3.0, rank_span=7.5)):
        got = design_logit_parts(variant, np.random.default_rng(_case_seeds(spec)[0]))
        np.testing.assert_array_equal(got[0], persistent)
        np.testing.assert_array_equal(got[1], drifting)
    assert not case_ranks(spec).any()
    assert persistent_energy_share(replace(spec, rank_span=9.0), persistent) == \
        persistent_energy_share(spec, persistent)


def test_law_on_keeps_the_earlier_draws_and_adds_a_permutation_of_the_rank_logits():
    spec = SMALL.with_tokens(2000)
    on = replace(spec, rank_exponent=1.2, rank_logit_boost=6.0)
    off_parts = design_logit_parts(spec, np.random.default_rng(_case_seeds(spec)[0]))
    on_parts = design_logit_parts(on, np.random.default_rng(_case_seeds(on)[0]))
    np.testing.assert_array_equal(on_parts[1], off_parts[1])  # the noise is untouched
    law = on_parts[0] - off_parts[0]
    assert not law[:, :4].any()  # sinks are not ranked
    ranks = case_ranks(on)
    assert (ranks[:, :4] == 0).all()
    for g in range(2):
        assert sorted(ranks[g, 4:]) == list(range(1, 1997))
        np.testing.assert_allclose(law[g, 4:], 6.0 - 1.2 * np.log(ranks[g, 4:]), atol=1e-12)


@pytest.mark.parametrize("exponent", [0.8, 1.0, 1.2, 2.0])
def test_zoom_buckets_are_the_exact_sums_of_their_ranks(exponent, monkeypatch):
    terms = np.arange(1, 300_001, dtype=np.float64) ** -exponent
    for buckets in (1, 7, 1000):
        ends = np.arange(buckets + 1) * 300_000 // buckets
        exact = np.array([terms[a:b].sum() for a, b in zip(ends[:-1], ends[1:], strict=True)])
        np.testing.assert_allclose(rank_bucket_sums.__wrapped__(exponent, buckets, 300_000),
                                   exact, rtol=1e-12)
        # beyond _EXACT_RANKS a bucket is its midpoint integral: 1e-8 already past rank 5,000
        monkeypatch.setattr(synthetic_module, "_EXACT_RANKS", 5000)
        np.testing.assert_allclose(rank_bucket_sums.__wrapped__(exponent, buckets, 300_000),
                                   exact, rtol=1e-8)
        monkeypatch.undo()


def test_zoomed_rank_logits_hold_the_real_ranks_mass_less_the_zoom():
    """16k tokens (4 sinks) onto 4k: each synthetic rank is its bucket's log-sum less ln(span),
    so the law's weight shrinks by the span, as every other class's does."""
    spec = replace(SMALL, rank_exponent=1.0, rank_logit_boost=5.0)
    zoomed = zoom_spec(spec, 16384, 4096)
    assert zoomed.rank_span == pytest.approx((16384 - 4) / (4096 - 4))
    logits = rank_logits(zoomed)
    sums = partial_sums(1.0, 16380)
    ends = np.arange(4093) * 16380 // 4092
    np.testing.assert_allclose(np.exp(logits - 5.0) * zoomed.rank_span,
                               sums[ends[1:]] - sums[ends[:-1]], rtol=1e-9)  # cumsum rounding
    sizes = np.diff(ends)  # 4 ranks a bucket but every ~350th, which has 5: it may outweigh
    same = sizes[1:] == sizes[:-1]  # the one before it; buckets of one size fall with the rank
    assert np.all(np.diff(logits)[same] < 0) and not same.all()


@pytest.mark.parametrize("exponent", [0.8, 1.0, 1.5])
def test_exact_topk_keeps_the_closed_form_share_and_more_at_longer_contexts(exponent):
    """Noise-free law alone: a top 1/16 keeps S(k)/S(N) of the mass, unscaled at 4k and 16k,
    and zoomed from 64k onto 16k (every bucket 4 whole ranks): more at every longer context."""
    spec = replace(BARE, rank_exponent=exponent)
    kept = {}
    for context, max_tokens in ((4096, 4096), (16384, 16384), (65536, 16384)):
        result = accuracy_proxy(plan(context, context // 16), spec, max_tokens=max_tokens)
        sums = partial_sums(exponent, context)
        assert result.mass_kept == pytest.approx(sums[context // 16] / sums[context], abs=1e-5)
        kept[context] = result.mass_kept
    assert kept[4096] < kept[16384] < kept[65536]


def test_zoom_scores_an_exact_topk_as_the_unscaled_context_does():
    """The noisy model with heavy hitters, 16k zoomed onto 4k against 16k unscaled: an exact
    top-k's mass kept and error agree to within the spread of a few seeds' heads."""
    spec = AttentionModelSpec(heads=4, kv_heads=4, head_dim=32, rank_exponent=1.0)
    for ratio in (0.01, 0.05):
        selected = round(ratio * (16384 - 4 - 128))
        zoom, full = [], []
        for seed in range(4):
            seeded = replace(spec, seed=seed)
            layer = plan(16384, selected, recent=128, sinks=4)
            zoom.append(accuracy_proxy(layer, seeded, max_tokens=4096))
            full.append(accuracy_proxy(layer, seeded, max_tokens=16384))
        for metric in ("mass_kept", "rel_error"):
            zoomed = np.mean([getattr(f, metric) for f in zoom])
            unscaled = np.mean([getattr(f, metric) for f in full])
            assert zoomed == pytest.approx(unscaled, abs=0.015), (ratio, metric)


def test_a_zoom_past_the_drawable_tokens_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(synthetic_module, "MAX_ZOOMED_TOKENS", 10_000)
    zoomed = zoom_spec(replace(SMALL, rank_exponent=1.0), 20_000, 4096)
    with pytest.raises(ValueError, match="rank_exponent: .* up to 10,000 tokens, got 19,996"):
        case_logits(zoomed)


def test_persistent_share_counts_the_laws_variance():
    """Without heavy hitters or recency the persistent logits over the non-sink tokens are the
    rank logits permuted: their variance is what the share is built on, and a shift of every
    rank logit alike (which the softmax ignores) leaves the share as it was."""
    spec = replace(SMALL, n_tokens=5000, heavy_fraction=0.0, recency_boost=0.0,
                   rank_exponent=1.0, rank_logit_boost=7.0)
    persistent, _ = design_logit_parts(spec, np.random.default_rng(0))
    variance = float(np.var(persistent[:, 4:]))
    drift = spec.noise_std**2 + spec.head_noise_std**2
    share = persistent_energy_share(spec, persistent)
    assert share == pytest.approx(variance / (variance + drift))
    shifted = replace(spec, rank_logit_boost=-3.0)
    assert persistent_energy_share(shifted, persistent) == pytest.approx(share)
    heavy = replace(spec, heavy_fraction=0.02)
    assert persistent_energy_share(heavy, persistent) > persistent_energy_share(spec, persistent)
    case = synthesize_case(spec)
    np.testing.assert_allclose(case.logits, case_logits(spec), atol=1e-9)


def test_shape_reports_the_mass_on_the_laws_top_ranks():
    spec = replace(BARE, rank_exponent=1.0)
    shares = attention_shares(spec, context=4096, recent_tokens=0, ratios=(0.05,))
    sums = partial_sums(1.0, 4096)
    assert shares.ranked == pytest.approx(sums[round(RANKED_SHARE * 4096)] / sums[4096])
    assert shares.heavy == 0.0 and shares.sinks == 0.0
    assert attention_shares(context=4096, ratios=(0.05,)).ranked == 0.0
    longer = attention_shares(replace(spec, sink_tokens=4), context=1 << 20, recent_tokens=0,
                              ratios=(0.05,))
    assert 0.0 < longer.ranked < 1.0


@pytest.mark.parametrize("fields, message", [
    ({"rank_exponent": -0.5}, "rank_exponent must be a number in [0, 4], got -0.5"),
    ({"rank_exponent": 5}, "rank_exponent must be a number in [0, 4], got 5"),
    ({"rank_logit_boost": 80.0}, "rank_logit_boost must be a number in [-50, 50], got 80.0"),
])
def test_overrides_refuse_out_of_bounds_values_in_one_line(fields, message):
    with pytest.raises(FieldError) as info:
        ATTENTION.build(fields)
    assert str(info.value) == message
    with pytest.raises(FieldError, match="unknown attention field 'rank_span'"):
        ATTENTION.build({"rank_span": 2.0})  # the zoom's, not a user's
    assert ATTENTION.build({"rank_exponent": 1, "rank_logit_boost": 9}) == \
        AttentionModelSpec(rank_exponent=1.0, rank_logit_boost=9.0)


def test_the_api_scores_a_run_on_the_law_it_is_given():
    """``attention={"rank_exponent": ...}`` reaches the run's accuracy: at 128k a lossy
    policy's error on the concentrated attention is below the default shape's."""
    args = dict(context="128k", batch=8, gen=4, samples=2)
    plain = api.simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "infinigen", **args)
    law = api.simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "infinigen",
                       attention={"rank_exponent": 1.1}, **args)
    assert law.tokens_per_s == plain.tokens_per_s  # the time does not depend on the shape
    assert 0.0 < law.accuracy_rel_error < plain.accuracy_rel_error


def test_cli_refuses_a_bad_exponent_with_one_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "hgsim", "attention", "--context", "8k",
                           "--attention", "rank_exponent=9"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "rank_exponent must be a number in [0, 4], got 9" in done.stderr

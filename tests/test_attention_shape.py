"""``attention_shares`` and ``hgsim attention``: where the synthetic attention's mass goes, checked
against closed forms on shapes whose softmax can be written down."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hgsim.accuracy import AttentionModelSpec
from hgsim.accuracy.groups import union_curve
from hgsim.accuracy.selection import SelectionModel
from hgsim.accuracy.shape import attention_shares, step_overlaps
from hgsim.accuracy.synthetic import persistent_energy_share
from hgsim.cli import main

# no noise, no recency, no heavy hitters: every token but the sinks has logit 0
FLAT = AttentionModelSpec(recency_boost=0.0, heavy_fraction=0.0, noise_std=0.0,
                          head_noise_std=0.0, sink_logit_boost=8.0)


def flat_share(tokens: float, n: int) -> float:
    """Mass of ``tokens`` logit-0 tokens under FLAT over ``n`` tokens."""
    return tokens / (4 * math.exp(8.0) + n - 4)


@pytest.mark.parametrize("n", [4096, 32768])
def test_flat_shape_gives_the_closed_form_shares(n):
    shares = attention_shares(FLAT, context=n, recent_tokens=1024, ratios=(0.05, 1.0))
    z = 4 * math.exp(8.0) + n - 4
    assert shares.sinks == pytest.approx(4 * math.exp(8.0) / z, rel=1e-9)
    assert shares.recent == pytest.approx(flat_share(1024, n), rel=1e-9)
    assert shares.heavy == 0.0
    assert shares.other == pytest.approx(flat_share(n - 4 - 1024, n), rel=1e-9)
    middle = n - 4 - 1024
    k = round(0.05 * middle)
    assert shares.topk_kept[0.05] == pytest.approx(shares.sinks + flat_share(1024 + k, n),
                                                   rel=1e-9)
    assert shares.topk_kept[1.0] == pytest.approx(1.0, rel=1e-12)


def test_beyond_the_proxys_tokens_the_zoom_keeps_each_class_share():
    """128k tokens are scored on 32k standing for them: the sinks' boost grows by log 4, so
    their share is the 128k closed form (up to the four sink tokens the zoom counts once)."""
    n = 131072
    shares = attention_shares(FLAT, context=n, recent_tokens=4096, ratios=(0.05,))
    assert shares.sinks == pytest.approx(4 * math.exp(8.0) / (4 * math.exp(8.0) + n - 4),
                                         rel=1e-3)
    assert shares.recent == pytest.approx(flat_share(4096, n), rel=1e-3)


def test_shares_add_up_and_the_default_shape_matches_its_description():
    """The default spec's doc: ~20% on the sinks and a ~96% top-5% at 32k; a longer context
    dilutes the fixed-boost sinks."""
    at32k = attention_shares(context=32768)
    assert at32k.sinks + at32k.recent + at32k.heavy + at32k.other == pytest.approx(1.0)
    assert 0.15 < at32k.sinks < 0.25 and 0.95 < at32k.topk_kept[0.05] < 0.975
    kept = list(at32k.topk_kept.values())
    assert kept == sorted(kept)
    assert attention_shares(context=131072).sinks < at32k.sinks < \
        attention_shares(context=4096).sinks


def test_union_per_k_is_the_simulators_union_curve():
    one = attention_shares(context=32768, heads_per_group=1)
    four = attention_shares(context=32768, heads_per_group=4)
    assert set(one.union_per_k.values()) == {1.0}
    assert four.union_per_k[0.05] == union_curve(4).fraction(0.05)


def test_lag_cosine_is_the_persistent_share_plus_the_turned_drifting_part():
    model = SelectionModel(history_similarity_floor=0.3, history_decay=0.8)
    lags = step_overlaps(selection=model, lags=(0, 1, 5), context=8192)
    share = persistent_energy_share(AttentionModelSpec(), np.zeros(1))
    for lag in lags:
        assert lag.query_cosine == pytest.approx(share + (1 - share) * (0.3 + 0.7 * 0.8**lag.lag))
    assert lags[0].overlap == 1.0 and 1.0 > lags[1].overlap > lags[2].overlap


def test_a_query_that_never_drifts_keeps_its_top_k_and_one_that_forgets_keeps_the_floor():
    """A drifting part that stays (floor 1) is the same query at every lag: the same top-k. One
    redrawn at every step (floor 0, decay 0) keeps only what the persistent heavy hitters give,
    the same at lag 1 as at lag 30."""
    still = step_overlaps(selection=SelectionModel(history_similarity_floor=1.0),
                          lags=(1, 30), context=8192)
    assert [lag.overlap for lag in still] == [1.0, 1.0]
    gone = step_overlaps(selection=SelectionModel(history_similarity_floor=0.0,
                                                  history_decay=0.0), lags=(1, 30), context=8192)
    assert gone[0].overlap == pytest.approx(gone[1].overlap, abs=0.03)
    assert 0.2 < gone[0].overlap < 0.6


def test_with_no_tokens_between_the_sinks_and_the_newest_nothing_moves():
    lags = step_overlaps(spec=AttentionModelSpec(sink_tokens=4096), lags=(0, 1), context=4096)
    assert [lag.overlap for lag in lags] == [1.0, 1.0]
    assert lags[0].query_cosine == 1.0 > lags[1].query_cosine


def test_cli_prints_the_tables_and_json(capsys):
    assert main(["attention", "--model", "llama-3.1-8b", "--attention", "heavy_fraction=0.05"]) \
        == 0
    text = capsys.readouterr().out
    assert "4 query heads per KV head (heavy_fraction=0.05)" in text
    assert "rows of the group's union per k selected" in text
    assert main(["attention", "--context", "4k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["context"] == 4096 and data["topk_kept"]["0.05"] > 0.99
    assert main(["attention", "--context", "8k", "--lags", "1", "4", "--selection",
                 "history_decay=0.8"]) == 0
    text = capsys.readouterr().out
    assert "L decode steps apart (drift: history_decay=0.8)" in text and "top-k overlap" in text


@pytest.mark.parametrize("args, message", [
    (["--context", "1"], "--context: must be at least 2 tokens"),
    (["--group", "0"], "--group: must be a whole number in [1, 64], got 0"),
    (["--model", "llama-3.1-8b", "--group", "2"], "--group: give --model or --group"),
    (["--attention", "heavy_fraction=-1"], "--attention heavy_fraction: heavy_fraction must be"),
    (["--selection", "history_decay=0.8"], "--selection: sets the drift --lags shows"),
    (["--lags", "1", "--ratio", "nan"], "--ratio: must lie in (0, 1], got nan"),
])
def test_cli_errors_are_one_line_exit_2(capsys, args, message):
    assert main(["attention", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err

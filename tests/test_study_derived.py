"""Derived metrics on a hand-made results table, where every expected value is arithmetic."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hgsim.study.derived import compute_derived, summarize
from hgsim.study.schema import DerivedSpec

AXES = ["bw", "workload.context", "policy"]


@pytest.fixture
def frame() -> pd.DataFrame:
    rows = []
    tput = {  # (bw, context) -> policy -> tokens/s
        (16, 32768): {"hybridgen": 30.0, "flexgen": 10.0, "hgca": 20.0},
        (16, 131072): {"hybridgen": 8.0, "flexgen": 2.0, "hgca": float("nan")},  # infeasible
        (64, 32768): {"hybridgen": 45.0, "flexgen": 15.0, "hgca": 30.0},
        (64, 131072): {"hybridgen": 12.0, "flexgen": 3.0, "hgca": 6.0},
    }
    for (bw, ctx), per_policy in tput.items():
        for policy, value in per_policy.items():
            rows.append({"bw": bw, "workload.context": ctx, "policy": policy,
                         "tokens_per_s": value, "latency_mean_ms": 1000.0 / value})
    return pd.DataFrame(rows)


def value(frame, column, **coords):
    mask = pd.Series(True, index=frame.index)
    for k, v in coords.items():
        mask &= frame[k.replace("context", "workload.context")] == v
    (out,) = frame.loc[mask, column].tolist()
    return out


def test_speedup_vs_each_baseline_at_same_other_coordinates(frame):
    spec = DerivedSpec(metric="tokens_per_s", of={"policy": "hybridgen"},
                       vs={"policy": ["flexgen", "hgca"]})
    out = compute_derived(frame, {"speedup": spec}, AXES)
    assert value(out, "speedup_vs_flexgen", bw=16, context=32768, policy="hybridgen") == 3.0
    assert value(out, "speedup_vs_flexgen", bw=64, context=131072, policy="hybridgen") == 4.0
    assert value(out, "speedup_vs_hgca", bw=64, context=32768, policy="hybridgen") == 1.5
    # baseline infeasible -> no value; rows outside `of` -> no value
    assert math.isnan(value(out, "speedup_vs_hgca", bw=16, context=131072, policy="hybridgen"))
    assert out.loc[out.policy != "hybridgen", "speedup_vs_flexgen"].isna().all()


def test_speedup_of_lower_is_better_metric_inverts(frame):
    spec = DerivedSpec(metric="latency_mean_ms", vs={"policy": "flexgen"})
    out = compute_derived(frame, {"lat": spec}, AXES)
    assert value(out, "lat", bw=16, context=32768, policy="hybridgen") == pytest.approx(3.0)
    assert value(out, "lat", bw=16, context=32768, policy="flexgen") == pytest.approx(1.0)


def test_ratio_and_difference_and_count_values(frame):
    derived = {
        "r": DerivedSpec(metric="tokens_per_s", kind="ratio", vs={"workload.context": "32k"}),
        "d": DerivedSpec(metric="tokens_per_s", kind="difference", vs={"bw": 16}),
    }
    out = compute_derived(frame, derived, AXES)
    assert value(out, "r", bw=64, context=131072, policy="flexgen") == pytest.approx(0.2)
    assert value(out, "d", bw=64, context=32768, policy="hgca") == pytest.approx(10.0)


def test_summary_geomean_min_max_per_group(frame):
    spec = DerivedSpec(metric="tokens_per_s", of={"policy": "hybridgen"},
                       vs={"policy": ["flexgen", "hgca"]}, group_by=["workload.context"])
    out = compute_derived(frame, {"speedup": spec}, AXES)
    table = summarize(out, {"speedup": spec}).set_index(["vs", "workload.context"])
    row = table.loc[("flexgen", 32768)]
    assert row["n"] == 2 and row["min"] == 3.0 and row["max"] == 3.0
    row = table.loc[("flexgen", 131072)]
    assert row["geomean"] == pytest.approx(math.sqrt(4.0 * 4.0))
    assert table.loc[("hgca", 131072)]["n"] == 1  # the infeasible baseline is left out
    assert table.loc[("hgca", 32768)]["geomean"] == pytest.approx(1.5)


def _upgrades() -> pd.DataFrame:
    """Two upgrades zipped with the hardware they make (memory_purchase's shape)."""
    rows = []
    for label, ddr_gb, scale in (("baseline", 768, 1.0), ("+DDR", 1536, 2.0), ("H200", 768, 4.0)):
        for policy, tput in (("hybridgen", 3.0), ("flexgen", 1.0)):
            rows.append({"label.upgrade": label, "hardware.tiers.ddr0.capacity_gb": ddr_gb,
                         "policy": policy, "tokens_per_s": tput * scale})
    return pd.DataFrame(rows)


UPGRADE_AXES = ["label.upgrade", "hardware.tiers.ddr0.capacity_gb", "policy"]
ZIPPED = {"label.upgrade": ["hardware.tiers.ddr0.capacity_gb"],
          "hardware.tiers.ddr0.capacity_gb": ["label.upgrade"]}


def test_baseline_found_across_axes_zipped_with_vs():
    """The hardware an upgrade label is zipped with changes with it: a comparison against the
    baseline label cannot hold it equal (it did, so every upgrade had no baseline)."""
    spec = DerivedSpec(metric="tokens_per_s", vs={"label.upgrade": "baseline"})
    out = compute_derived(_upgrades(), {"up": spec}, UPGRADE_AXES, ZIPPED)
    assert value(out, "up", **{"label.upgrade": "H200", "policy": "flexgen"}) == 4.0
    assert value(out, "up", **{"label.upgrade": "+DDR", "policy": "hybridgen"}) == 2.0


def test_best_policy_compared_across_its_zipped_options():
    """A policy zipped with its own option (docs/studies.md) is compared with the other
    policies at each point; grouping by the option too left one policy per group."""
    from hgsim.study.report import best_table, binding_table

    frame = pd.DataFrame({"workload.context": [32768, 32768], "policy": ["hybridgen", "hgca"],
                          "policy_options.topk_ratio": [0.05, 0.1],
                          "tokens_per_s": [3.0, 2.0], "binding": ["ddr0 read", "cxl0 read"],
                          "binding_share": [0.9, 0.8]})
    axes = ["workload.context", "policy", "policy_options.topk_ratio"]
    zipped = {"policy": ["policy_options.topk_ratio"], "policy_options.topk_ratio": ["policy"]}
    (row,) = best_table(frame, axes, "policy", "tokens_per_s", zipped).to_dict("records")
    assert (row["best"], row["runner-up"], row["margin"]) == ("hybridgen", "hgca", 1.5)
    (binds,) = binding_table(frame, axes, "policy", zipped).to_dict("records")
    assert binds["hybridgen"] == "ddr0 read (90%)" and binds["hgca"] == "cxl0 read (80%)"


def test_summary_leaves_out_baseline_rows_and_counts_missing(frame):
    """A ratio to the 32k point summarised over every point: the 32k rows are 1 by
    construction and would pull the geometric mean toward 1; rows without a value (an
    infeasible point or baseline) are counted, not silently dropped."""
    spec = DerivedSpec(metric="tokens_per_s", kind="ratio", vs={"workload.context": "32k"},
                       group_by=["policy"])
    out = compute_derived(frame, {"r": spec}, AXES)
    table = summarize(out, {"r": spec}).set_index("policy")
    assert table.loc["flexgen", "n"] == 2
    assert table.loc["flexgen", "geomean"] == pytest.approx(math.sqrt(0.2 * 0.2))
    assert table.loc["hgca", "n"] == 1 and table.loc["hgca", "no value"] == 1
    assert table.loc["flexgen", "no value"] == 0
    up = DerivedSpec(metric="tokens_per_s", vs={"label.upgrade": "baseline"}, group_by=["policy"])
    out = compute_derived(_upgrades(), {"up": up}, UPGRADE_AXES, ZIPPED)
    table = summarize(out, {"up": up}).set_index("policy")
    assert table.loc["flexgen", "n"] == 2
    assert table.loc["flexgen", "geomean"] == pytest.approx(math.sqrt(2.0 * 4.0))


def test_summary_has_a_row_per_zipped_setting_of_its_group():
    """HybridGen at two zipped top-k ratios: one geometric mean per ratio, not one over both
    under the name hybridgen."""
    frame = pd.DataFrame({"workload.context": [32768] * 3 + [131072] * 3,
                          "policy": ["hybridgen", "hybridgen", "flexgen"] * 2,
                          "policy_options.topk_ratio": [0.05, 0.2, None] * 2,
                          "tokens_per_s": [8.0, 4.0, 2.0, 2.0, 1.0, 1.0]})
    axes = ["policy", "policy_options.topk_ratio", "workload.context"]
    zipped = {"policy": ["policy_options.topk_ratio"], "policy_options.topk_ratio": ["policy"]}
    spec = DerivedSpec(metric="tokens_per_s", of={"policy": "hybridgen"},
                       vs={"policy": "flexgen"})
    out = compute_derived(frame, {"s": spec}, axes, zipped)
    table = summarize(out, {"s": spec}, zipped).set_index("policy")
    assert table.loc["hybridgen (topk_ratio 0.05)", "geomean"] == pytest.approx(8.0 ** 0.5)
    assert table.loc["hybridgen (topk_ratio 0.2)", "geomean"] == pytest.approx(2.0 ** 0.5)


def test_best_policy_tied_to_the_simulations_rounding_is_a_tie_not_a_win():
    """Two policies equal to a millionth (gpu_only and hybridgen when the KV cache fits in
    HBM run the same plan) tie: which one the sort put first is not a win, and the margin is
    to the next distinct value; the written order is the table's, not the sort's whim."""
    from hgsim.study.report import best_table

    frame = pd.DataFrame({"workload.context": [32768] * 3 + [131072] * 3,
                          "policy": ["flexgen", "hybridgen", "gpu_only"] * 2,
                          "tokens_per_s": [2.0, 4.0, 4.0 * (1 + 1e-9), 1.0, 3.0, 2.0]})
    axes = ["workload.context", "policy"]
    rows = best_table(frame, axes, "policy", "tokens_per_s").to_dict("records")
    assert (rows[0]["best"], rows[0]["runner-up"]) == ("hybridgen = gpu_only", "flexgen")
    assert rows[0]["margin"] == pytest.approx(2.0)
    assert (rows[1]["best"], rows[1]["runner-up"], rows[1]["margin"]) == ("hybridgen",
                                                                          "gpu_only", 1.5)
    near = frame.assign(tokens_per_s=[2.0, 4.0, 4.0 * (1 + 1e-4), 1.0, 3.0, 2.0])
    row = best_table(near, axes, "policy", "tokens_per_s").to_dict("records")[0]
    assert (row["best"], row["runner-up"]) == ("gpu_only", "hybridgen")  # 0.01% is a result
    assert row["margin"] == pytest.approx(1 + 1e-4)

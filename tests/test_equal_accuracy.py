"""Accuracy beside speed: each lossy row's proxy reflects its setting, the equal-accuracy search
finds the cheapest setting meeting a target, studies compare policies at equal accuracy, and
Pareto fronts keep exactly the undominated points."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_study_common import results, write_study

from hgsim.accuracy import accuracy_proxy
from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.equal_accuracy import (
    KNOBS,
    ProxyProbe,
    cheapest_setting,
    knob_for,
    knob_grid,
    probe_setting,
)
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, mean_ratio_plan, simulate
from hgsim.study import RunOptions, run_study
from hgsim.study.pareto import pareto_mask
from hgsim.workload import Workload

PROFILE = load_profile("h100-80gb-spr-cxl")
MODEL = get_model("llama-2-13b")
# 128k tokens of Llama-2-13B at batch 2: most of the KV sits on host tiers for every policy
LONG = Workload(batch=2, context=131072, gen=8)
FAST = Fidelity(decode_samples=2)
LOSSY = ("hybridgen", "h2o", "infinigen", "hgca")


def probe(policy: str, value: float, workload: Workload = LONG) -> ProxyProbe:
    return probe_setting(policy, MODEL, PROFILE, workload, {}, knob_for(policy), value)


# ---------------------------------------------------------------- the proxy in result rows
@pytest.mark.parametrize("policy", LOSSY)
def test_knob_at_all_tokens_has_error_exactly_zero(policy):
    assert probe(policy, 1.0).rel_error == 0.0


@pytest.mark.parametrize("policy", ["flexgen", "flexgen_cpu", "cpu_offload", "hybridgen_exact"])
def test_exact_policies_report_zero_error_exactly(policy):
    row = simulate(PROFILE, MODEL, policy, LONG, fidelity=FAST).to_row()
    assert row["accuracy_rel_error"] == 0.0 and row["accuracy_mass_kept"] == 1.0


def test_lossy_row_without_the_proxy_reports_no_number():
    result = simulate(PROFILE, MODEL, "hgca", LONG,
                      fidelity=Fidelity(decode_samples=2, accuracy=False))
    assert math.isnan(result.accuracy_rel_error) and math.isnan(result.accuracy_mass_kept)


@pytest.mark.parametrize("policy, options", [("hgca", {"topk_ratio": 0.2}),
                                             ("infinigen", {"topk_ratio": 0.3}),
                                             ("h2o", {"budget": 0.15})])
def test_static_policy_row_scores_its_configured_setting(policy, options):
    knob = knob_for(policy)
    row = simulate(PROFILE, MODEL, policy, LONG, policy_options=options, fidelity=FAST)
    assert row.feasible
    expected = probe_setting(policy, MODEL, PROFILE, LONG, {}, knob, options[knob.option])
    assert row.accuracy_rel_error == pytest.approx(expected.rel_error, rel=1e-3)


def test_adaptive_hybridgen_row_scores_the_ratio_the_run_used():
    """The scheduler moves r during the run: the row scores the run's mean r, not the initial
    or the final one."""
    workload = Workload(batch=2, context=131072, gen=32)
    result = simulate(PROFILE, MODEL, "hybridgen", workload, fidelity=Fidelity(decode_samples=8))
    ratios = [s.topk_ratio for s in result.steps]
    assert len(set(ratios)) > 1  # the scheduler did adapt
    row = result.to_row()
    assert row["mean_topk_ratio"] == pytest.approx(np.mean(ratios))
    initial = probe("hybridgen", 0.05, workload).rel_error  # worst-case plan at the floor
    assert result.accuracy_rel_error != pytest.approx(initial, rel=1e-3)
    # recomputed from the plan the run used at its median step
    from hgsim.policies import make_policy

    pol = make_policy("hybridgen", MODEL, PROFILE, workload)
    median = pol.step_plan(workload.context + workload.gen // 2).layer
    lo, hi = sorted([accuracy_proxy(mean_ratio_plan(median, r)).rel_error
                     for r in (min(ratios), max(ratios))])
    assert lo <= result.accuracy_rel_error <= hi


# ---------------------------------------------------------------- the knob and the search
@pytest.mark.parametrize("policy", LOSSY)
def test_proxy_error_does_not_grow_with_the_knob(policy):
    """The search's premise: more of the knob never costs accuracy (property over a grid)."""
    values = [0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9, 1.0]
    errors = [probe(policy, v).rel_error for v in values]
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > errors[-1] == 0.0


@settings(max_examples=60, deadline=None)
@given(target=st.floats(0.0, 0.99), resolution=st.sampled_from([0.5, 0.1, 0.05, 0.01, 0.005]),
       power=st.floats(0.5, 4.0))
def test_search_finds_the_cheapest_grid_value_meeting_the_target(target, resolution, power):
    """Closed form: error(v) = (1 - v)^p; the answer is the first grid value at or above
    1 - target^(1/p), and the grid value below it misses the target."""
    def error_at(value: float) -> ProxyProbe:
        return ProxyProbe(value, (1.0 - value) ** power, True, None)

    search = cheapest_setting(error_at, target, resolution)
    grid = knob_grid(resolution)
    expected = next(v for v in grid if (1.0 - v) ** power <= target)
    assert search.found.value == expected
    assert search.found.rel_error <= target
    if expected != grid[0]:
        assert search.cheaper.value == grid[grid.index(expected) - 1]
        assert search.cheaper.rel_error > target
    assert search.probes <= math.ceil(math.log2(len(grid))) + 2


@pytest.mark.parametrize("policy", LOSSY)
def test_zero_error_target_chooses_all_tokens(policy):
    search = cheapest_setting(lambda v: probe(policy, v), 0.0, 0.05)
    assert search.found.value == 1.0 and search.found.rel_error == 0.0
    assert search.cheaper.value == pytest.approx(0.95) and search.cheaper.rel_error > 0


def test_search_result_meets_target_and_next_cheaper_misses_it():
    search = cheapest_setting(lambda v: probe("hgca", v), 0.01, 0.01)
    assert search.found.rel_error <= 0.01 < search.cheaper.rel_error
    assert search.found.value - search.cheaper.value == pytest.approx(0.01)


def test_unreachable_target_has_no_setting():
    search = cheapest_setting(lambda v: ProxyProbe(v, 0.5, True, None), 0.01, 0.1)
    assert search.found is None and search.probes == 1


def test_unreachable_reason_blames_memory_when_the_cheaper_setting_does_not_fit_either():
    """A target whose setting does not fit is the target's fault only when a cheaper setting
    fits: when that one is short of memory too, the configuration does not fit as such."""
    from hgsim.equal_accuracy import SettingSearch
    from hgsim.study.equal_accuracy import AccuracyTarget, _unreachable

    goal = AccuracyTarget(0.05, knob_for("hybridgen"), 0.005)
    fits, short = ProxyProbe(0.09, 0.06, True, None), ProxyProbe(0.09, 0.06, False, "ddr0 short")
    need = ProxyProbe(0.095, 0.049, False, "ddr0 short")

    def why(found, cheaper):
        return _unreachable(goal, SettingSearch(0.05, found, cheaper, 3))

    assert why(ProxyProbe(0.095, 0.049, True, None), fits) == ""
    assert why(None, None).startswith("accuracy target 0.05 unreachable")
    assert why(need, fits) == ("accuracy target 0.05 needs min_ratio>=0.095, which does not "
                               "fit: ddr0 short")
    assert why(need, short) == ("does not fit in memory at min_ratio=0.095, which accuracy "
                                "target 0.05 needs, nor at the cheaper 0.09: ddr0 short")
    assert why(need, None).startswith("does not fit in memory even at min_ratio=0.095, the "
                                      "cheapest setting")


def test_hybridgens_exact_preset_is_exact_so_no_search_rewrites_its_ratio():
    """``hybridgen_exact`` (r = 1, static) attends to every token: its twin is the configured
    point, where the search used to set its knob and run a lossy HybridGen in its name."""
    from hgsim.policies import is_lossy
    from hgsim.study.equal_accuracy import knob_of

    assert not is_lossy("hybridgen_exact") and is_lossy("hybridgen")
    assert knob_of("hybridgen_exact", {}) is None
    with pytest.raises(ValueError, match="exact"):
        knob_for("hybridgen_exact")
    run = simulate(PROFILE, MODEL, "hybridgen_exact", LONG, fidelity=FAST)
    assert run.accuracy_rel_error == 0.0


def test_knob_registry_covers_the_lossy_builtins_and_rejects_exact_ones():
    assert set(KNOBS) == set(LOSSY)
    assert knob_for("hybridgen_static").option == "min_ratio"
    with pytest.raises(ValueError, match="exact"):
        knob_for("flexgen")
    with pytest.raises(ValueError, match="no option 'budgt'"):
        knob_for("h2o", "budgt")
    # HybridGen's floor: the initial ratio starts there, the cap never sits below it
    opts = KNOBS["hybridgen"].options({"max_ratio": 0.2}, 0.3)
    assert opts == {"min_ratio": 0.3, "topk_ratio": 0.3, "max_ratio": 0.3}



def test_naming_a_tied_option_searches_the_same_setting():
    """``knobs: {hybridgen: topk_ratio}`` names the option tied to HybridGen's floor: the search
    must still set the floor, or the scheduler lowers r below the setting found (0.32 to 0.16
    here) and the run misses the error the search reported (0.015 against 0.0099)."""
    knob = knob_for("hybridgen", "topk_ratio")
    assert knob.options({"max_ratio": 0.2}, 0.3) == KNOBS["hybridgen"].options(
        {"max_ratio": 0.2}, 0.3)
    workload = Workload(batch=2, context=131072, gen=16)
    result = simulate(PROFILE, MODEL, "hybridgen", workload,
                      policy_options=knob.options({}, 0.32), fidelity=Fidelity(decode_samples=4))
    assert min(s.topk_ratio for s in result.steps) >= 0.32 * (1 - 1e-4)  # k rounds to tokens
    assert result.accuracy_rel_error <= probe("hybridgen", 0.32, workload).rel_error + 1e-12


# ---------------------------------------------------------------- studies
STUDY = """\
name: eq
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-13b
  workload: {batch: 2, context: 128k, gen: 4}
  fidelity: {decode_samples: 2}
sweep:
  grid:
    policy: [hybridgen, h2o, hgca, flexgen]
equal_accuracy: {target_rel_error: [0.01, 0], resolution: 0.01}
derived:
  speedup: {metric: tokens_per_s, of: {policy: hybridgen}, vs: {policy: [hgca, h2o, flexgen]},
            group_by: [accuracy.target]}
plots:
  front: {kind: pareto, x: accuracy_rel_error, y: tokens_per_s, hue: policy,
          style: accuracy.target}
"""


@pytest.fixture(scope="module")
def equal_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eq")
    run = run_study(write_study(tmp, STUDY), RunOptions(out=tmp / "out", quiet=True))
    assert run.ok, (run.stats.errors, run.figure_errors)
    return tmp / "out", results(tmp / "out")


def test_study_rows_at_each_target(equal_study):
    _, frame = equal_study
    rows = frame.set_index(["policy", "accuracy.target"])
    assert set(frame["accuracy.target"]) == {"configured", "rel_error<=0.01", "rel_error<=0"}
    for policy in ("hybridgen", "hgca"):
        at = rows.loc[(policy, "rel_error<=0.01")]
        assert at["target_reached"] and at["accuracy_rel_error"] <= 0.01 + 1e-9
        assert at["cheaper_rel_error"] > 0.01
        assert rows.loc[(policy, "rel_error<=0"), "setting_at_target"] == 1.0
        assert rows.loc[(policy, "rel_error<=0"), "accuracy_rel_error"] == 0.0
    # exact policies: the configured point, error 0, no search
    assert rows.loc[("flexgen", "rel_error<=0.01"), "tokens_per_s"] == \
        rows.loc[("flexgen", "configured"), "tokens_per_s"]
    assert pd.isna(rows.loc[("flexgen", "rel_error<=0.01"), "setting_knob"])


def test_unreachable_target_is_marked_not_crashed(equal_study):
    """H2O at 128k would need most of the KV in HBM beside the weights: it does not fit."""
    _, frame = equal_study
    h2o = frame[(frame["policy"] == "h2o") & (frame["accuracy.target"] != "configured")]
    assert not h2o["feasible"].any() and not h2o["target_reached"].any()
    assert h2o["reason"].str.contains("does not fit").all()
    hyb = frame[(frame["policy"] == "hybridgen") & (frame["accuracy.target"] != "configured")]
    assert hyb["speedup_vs_h2o"].isna().all()  # no equal-accuracy speed to compare with


def test_derived_speedups_as_configured_and_at_equal_accuracy(equal_study):
    out, frame = equal_study
    rows = frame.set_index(["policy", "accuracy.target"])
    for target in ("configured", "rel_error<=0.01"):
        expected = rows.loc[("hybridgen", target), "tokens_per_s"] / \
            rows.loc[("hgca", target), "tokens_per_s"]
        assert rows.loc[("hybridgen", target), "speedup_vs_hgca"] == pytest.approx(expected)
    report = (out / "report.md").read_text()
    assert "## Equal accuracy" in report and "## Pareto fronts" in report
    assert (out / "figures" / "front.png").exists()


STUDY_ERRORS = {
    "negative target": ("target_rel_error: [0.01, 0]", "target_rel_error: -0.1",
                        "must lie in [0, 1)"),
    "unknown knob": ("resolution: 0.01}", "resolution: 0.01, knobs: {h2o: budgt}}",
                     "equal_accuracy.knobs.h2o: policy 'h2o' has no option 'budgt'"),
    "exact policy knob": ("resolution: 0.01}", "resolution: 0.01, knobs: {flexgen: x}}",
                          "is exact"),
    # a union (a number or a list): the field, not pydantic's member tag (...error.float), and
    # the list's bad element, not "should be a number" for the list
    "NaN target": ("target_rel_error: [0.01, 0]", "target_rel_error: .nan",
                   "equal_accuracy.target_rel_error: input should be a finite number"),
    "text in the list": ("target_rel_error: [0.01, 0]", "target_rel_error: [0.01, x]",
                         "equal_accuracy.target_rel_error[1]: input should be a valid number"),
}


@pytest.mark.parametrize("case", STUDY_ERRORS)
def test_bad_equal_accuracy_block_is_one_line_exit_2(tmp_path, capsys, case):
    old, new, message = STUDY_ERRORS[case]
    path = write_study(tmp_path, STUDY.replace(old, new))
    code = main(["study", str(path), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert "Traceback" not in err


# ---------------------------------------------------------------- Pareto fronts
def test_pareto_mask_keeps_exactly_the_undominated_points():
    x = pd.Series([0.0, 0.01, 0.02, 0.02, 0.05, np.nan])  # error: lower is better
    y = pd.Series([1.0, 3.0, 2.0, 3.0, 5.0, 9.0])  # tokens/s: higher is better
    mask = pareto_mask(x, y, "lower", "higher")
    # (0.02, 2) and (0.02, 3) are beaten by (0.01, 3); NaN is never optimal
    assert mask.tolist() == [True, True, False, False, True, False]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_pareto_front_is_undominated_and_dominates_the_rest(points):
    x = pd.Series([p[0] for p in points], dtype=float)
    y = pd.Series([p[1] for p in points], dtype=float)
    mask = pareto_mask(x, y, "higher", "higher")
    front = [(a, b) for (a, b), m in zip(points, mask, strict=True) if m]
    assert front
    for a, b in points:
        dominated = any(c >= a and d >= b and (c > a or d > b) for c, d in points)
        assert dominated != ((a, b) in front)

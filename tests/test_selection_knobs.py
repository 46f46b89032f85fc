"""The approximate selectors' parameters (``SelectionModel``) as fidelity settings: a study's
``fidelity.selection``, ``api.simulate(selection=...)`` and ``hgsim simulate --selection`` reach
the accuracy proxy, in configured rows and in the equal-accuracy search; they change accuracy,
never time; bad ones are one-line errors; studies that do not set them keep their keys."""

from __future__ import annotations

import pytest
from test_study_common import refused_study, results, write_study

from hgsim import api
from hgsim.accuracy import SelectionModel
from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.equal_accuracy import knob_for, probe_setting
from hgsim.errors import UserError
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.study import RunOptions, load_study, run_study
from hgsim.workload import Workload

PROFILE = load_profile("h100-80gb-spr-cxl")
MODEL = get_model("llama-2-7b")
# 256k tokens of Llama-2-7B: the KV spills to host tiers, so every lossy policy selects there
LONG = Workload(batch=1, context=262144, gen=4)

HEAD = """\
name: sel
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {context: 256k, gen: 4}
  fidelity: {decode_samples: 2}
"""

HISTORY = HEAD + """\
sweep:
  grid:
    policy: [h2o, hybridgen_static]
    fidelity.selection.history_decay: [0.5, 0.99]
"""

SPECULATION = HEAD + """\
sweep:
  grid:
    policy: [infinigen]
    fidelity.selection.speculation_similarity: [0.8, 1.0]
equal_accuracy: {target_rel_error: 0.05, resolution: 0.05}
"""


def run(tmp_path, text: str):
    out = tmp_path / "out"
    outcome = run_study(write_study(tmp_path, text), RunOptions(out=out, quiet=True,
                                                                figures=False))
    assert outcome.ok, outcome.stats.errors
    return out, results(out)


@pytest.fixture(scope="module")
def history_study(tmp_path_factory):
    return run(tmp_path_factory.mktemp("history"), HISTORY)


@pytest.fixture(scope="module")
def speculation_study(tmp_path_factory):
    return run(tmp_path_factory.mktemp("speculation"), SPECULATION)


def test_history_decay_changes_h2os_accuracy_never_its_time(history_study):
    _, frame = history_study
    h2o = frame[frame["policy"] == "h2o"].set_index("fidelity.selection.history_decay")
    assert len(h2o) == 2
    assert h2o.loc[0.5, "accuracy_rel_error"] != h2o.loc[0.99, "accuracy_rel_error"]
    assert h2o.loc[0.5, "tokens_per_s"] == h2o.loc[0.99, "tokens_per_s"]
    # exact top-k does not depend on H2O's history at all
    exact = frame[frame["policy"] == "hybridgen_static"]
    assert exact["accuracy_rel_error"].nunique() == 1 and exact["tokens_per_s"].nunique() == 1


def test_rows_score_the_selection_model_they_name(history_study):
    _, frame = history_study
    row = frame[(frame["policy"] == "h2o")
                & (frame["fidelity.selection.history_decay"] == 0.5)].iloc[0]
    direct = simulate(PROFILE, MODEL, "h2o", LONG, fidelity=Fidelity(
        decode_samples=2, selection=SelectionModel(history_decay=0.5)))
    assert row["accuracy_rel_error"] == direct.accuracy_rel_error


def test_report_and_resolved_study_show_the_overrides(tmp_path):
    text = HEAD.replace("{decode_samples: 2}", "{decode_samples: 2, selection: "
                        "{history_decay: 0.95}}") + "sweep:\n  grid:\n    policy: [flexgen]\n"
    out, _ = run(tmp_path, text)
    report = (out / "report.md").read_text()
    assert "| fidelity.selection.history_decay | 0.950 |" in report
    assert "selection: {history_decay: 0.95}" in (out / "study.resolved.yaml").read_text()


def test_perfect_speculation_lowers_infinigens_error(speculation_study):
    """Similarity 1 speculates the true query (up to rounding), so InfiniGen's selection is the
    exact top-k of its plan; at 0.8 it misses tokens."""
    _, frame = speculation_study
    rows = frame[frame["accuracy.target"] == "configured"].set_index(
        "fidelity.selection.speculation_similarity")
    assert rows.loc[1.0, "accuracy_rel_error"] < rows.loc[0.8, "accuracy_rel_error"]
    assert rows.loc[1.0, "tokens_per_s"] == rows.loc[0.8, "tokens_per_s"]


def test_equal_accuracy_search_uses_the_overrides(speculation_study):
    _, frame = speculation_study
    twins = frame[frame["accuracy.target"] != "configured"].set_index(
        "fidelity.selection.speculation_similarity")
    assert twins["target_reached"].all()
    # better speculation meets the target at a smaller top-k ratio
    assert twins.loc[1.0, "setting_at_target"] < twins.loc[0.8, "setting_at_target"]
    knob = knob_for("infinigen")
    for similarity in (0.8, 1.0):
        probe = probe_setting("infinigen", MODEL, PROFILE, LONG, {}, knob,
                              twins.loc[similarity, "setting_at_target"],
                              SelectionModel(speculation_similarity=similarity))
        assert twins.loc[similarity, "setting_rel_error"] == probe.rel_error


def test_default_selection_is_the_old_result_bit_for_bit():
    plain = simulate(PROFILE, MODEL, "infinigen", LONG, fidelity=Fidelity(decode_samples=2))
    named = simulate(PROFILE, MODEL, "infinigen", LONG,
                     fidelity=Fidelity(decode_samples=2, selection=SelectionModel()))
    assert plain.accuracy_rel_error == named.accuracy_rel_error
    assert plain.accuracy_mass_kept == named.accuracy_mass_kept


def test_keys_of_studies_without_overrides_stay_the_same(tmp_path):
    """Overrides change a point's key only where the policy's accuracy depends on them (H2O:
    history, InfiniGen: speculation); an exact policy's and HybridGen's (exact top-k) runs are
    the same whatever they say, so a sweep over them computes those once."""
    def keys(fidelity: str) -> dict[str, str]:
        text = HEAD.replace("{decode_samples: 2}", fidelity) + \
            "sweep:\n  grid:\n    policy: [h2o, infinigen, hybridgen, flexgen]\n"
        return {p.spec.policy: p.spec.key
                for p in load_study(write_study(tmp_path, text)).expansion.points}

    plain = keys("{decode_samples: 2}")
    assert keys("{decode_samples: 2, selection: {}}") == plain
    assert keys("{decode_samples: 2, selection: {history_decay: 0.9}}") == plain  # default
    history = keys("{decode_samples: 2, selection: {history_decay: 0.95}}")
    assert history["h2o"] != plain["h2o"]
    assert {p: history[p] for p in ("infinigen", "hybridgen", "flexgen")} == \
        {p: plain[p] for p in ("infinigen", "hybridgen", "flexgen")}
    speculation = keys("{decode_samples: 2, selection: {speculation_similarity: 0.8}}")
    assert speculation["infinigen"] != plain["infinigen"] and speculation["h2o"] == plain["h2o"]


STUDY_ERRORS = {
    "base value": ("{decode_samples: 2}",
                   "{decode_samples: 2, selection: {speculation_dim_fraction: 0}}",
                   "base.fidelity.selection.speculation_dim_fraction: speculation_dim_fraction "
                   "must be a number in (0, 1], got 0"),
    "base unknown": ("{decode_samples: 2}", "{decode_samples: 2, selection: {decay: 0.5}}",
                     "base.fidelity.selection.decay: unknown selection field 'decay' (known: "
                     "speculation_similarity,"),
    "axis unknown": ("fidelity.selection.history_decay", "fidelity.selection.history_dekay",
                     "fidelity.selection.history_dekay: unknown selection field "
                     "'history_dekay' (known:"),
    "axis zero": ("fidelity.selection.history_decay: [0.5, 0.99]",
                  "fidelity.selection.history_queries: [4, 0]",
                  "fidelity.selection.history_queries[1]: history_queries must be a whole "
                  "number from 1 to 4,096, got 0"),
    # a million past queries were drawn and scored one by one (out of memory, no message)
    "axis huge": ("fidelity.selection.history_decay: [0.5, 0.99]",
                  "fidelity.selection.history_queries: [4, 1000000]",
                  "fidelity.selection.history_queries[1]: history_queries must be a whole "
                  "number from 1 to 4,096, got 1000000"),
    "axis text": ("fidelity.selection.history_decay: [0.5, 0.99]",
                  "fidelity.selection.speculation_similarity: [high]",
                  "speculation_similarity[0]: speculation_similarity must be a number in "
                  "[-1, 1], got 'high'"),
}


@pytest.mark.parametrize("case", STUDY_ERRORS)
def test_bad_selection_in_a_study_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    old, new, message = STUDY_ERRORS[case]
    assert old in HISTORY
    assert message in refused_study(tmp_path, capsys, HISTORY.replace(old, new))


def test_api_selection_changes_accuracy_not_time_and_names_bad_fields():
    args = dict(context="256k", gen=4, samples=2)
    plain = api.simulate("h100-80gb-spr-cxl", "llama-2-7b", "h2o", **args)
    moved = api.simulate("h100-80gb-spr-cxl", "llama-2-7b", "h2o",
                         selection={"history_decay": 0.5}, **args)
    assert moved.accuracy_rel_error != plain.accuracy_rel_error
    assert moved.tokens_per_s == plain.tokens_per_s
    with pytest.raises(UserError, match=r"^selection\.history_queries: .*got true"):
        api.simulate("h100-80gb-spr-cxl", "llama-2-7b", "h2o",
                     selection={"history_queries": True}, **args)
    # an OverflowError traceback from NumPy's lags (int64) before the bound
    with pytest.raises(UserError, match=r"^selection\.decision_lag: .*from 1 to 16,777,216, got 10+$"):
        api.simulate("h100-80gb-spr-cxl", "llama-2-7b", "h2o",
                     selection={"decision_lag": 10**30}, **args)
    with pytest.raises(UserError, match="selection: expected a mapping"):
        api.simulate("h100-80gb-spr-cxl", "llama-2-7b", "h2o", selection=0.5, **args)


@pytest.mark.parametrize("pair, message", [
    ("history_decay=1.5", "--selection history_decay: history_decay must be a number in [0, 1]"),
    ("decay=0.5", "--selection decay: unknown selection field 'decay'"),
    ("history_decay", "--selection: expects KEY=VALUE"),
])
def test_cli_selection_errors_are_one_line_exit_2(capsys, pair, message):
    code = main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-2-7b",
                 "--policy", "h2o", "--context", "16k", "--gen", "4", "--selection", pair])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err

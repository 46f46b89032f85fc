"""The ``answer`` block and ``label.<name>`` axes: a question answered from the results frame
in report.md's first lines, checked by hand on a small frame, then end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_study_common import write_study

from hgsim.cli import main
from hgsim.study import load_study
from hgsim.study.answer import answer_lines, ranking
from hgsim.study.schema import AnswerSpec

AXES = ["label.upgrade", "workload.context", "policy"]
NAN = math.nan


def _frame() -> pd.DataFrame:
    # (upgrade, capex, context, {policy: tokens/s or NaN for infeasible})
    points = [
        ("baseline", 100_000, 131072, {"hybridgen": 10, "flexgen": 4, "cpu_offload": 5}),
        ("A", 110_000, 131072, {"hybridgen": 12, "flexgen": 4, "cpu_offload": 8}),
        ("B", 101_000, 131072, {"hybridgen": 11, "flexgen": NAN, "cpu_offload": 5}),
        ("baseline", 100_000, 1048576, {"hybridgen": NAN, "flexgen": 1, "cpu_offload": NAN}),
        ("A", 110_000, 1048576, {"hybridgen": 2, "flexgen": 1, "cpu_offload": NAN}),
        ("B", 101_000, 1048576, {"hybridgen": NAN, "flexgen": 1, "cpu_offload": NAN}),
    ]
    rows = []
    for upgrade, capex, context, speeds in points:
        for policy, tps in speeds.items():
            rows.append({"label.upgrade": upgrade, "workload.context": context,
                         "policy": policy, "feasible": not math.isnan(tps),
                         "tokens_per_s": NAN if math.isnan(tps) else float(tps),
                         "capex_usd": float(capex)})
    return pd.DataFrame(rows)


SPEC = AnswerSpec(
    question="Which upgrade buys the most tokens/s per dollar?", choose="label.upgrade",
    metric="tokens_per_s", gain_vs="baseline", cost="capex_usd", scale=1000,
    per=["workload.context"],
    among={"column": "policy", "sets": {"HybridGen": ["hybridgen"],
                                        "best baseline": ["flexgen", "cpu_offload"]}},
)


def test_gain_per_cost_over_the_reference_choice_by_hand():
    table = ranking(_frame(), AXES, SPEC)
    value = {(r["workload.context"], r["policy"], r["label.upgrade"]): r["value"]
             for _, r in table.iterrows()}
    # 128k, HybridGen: A gains 2 tokens/s for 10,000 USD, B 1 for 1,000 (per 1,000 USD)
    assert value[131072, "HybridGen", "A"] == pytest.approx(0.2)
    assert value[131072, "HybridGen", "B"] == pytest.approx(1.0)
    # best baseline: cpu_offload everywhere at 128k (5 -> 8 with A, 5 with B)
    assert value[131072, "best baseline", "A"] == pytest.approx(0.3)
    assert value[131072, "best baseline", "B"] == pytest.approx(0.0)
    # 1M: HybridGen does not fit on the baseline (0 tokens/s) and fits with A only
    assert value[1048576, "HybridGen", "A"] == pytest.approx(0.2)
    assert value[1048576, "HybridGen", "B"] == pytest.approx(0.0)
    # the reference is no choice: listed last, unvalued, so each gain can be checked by hand
    reference = table[table["label.upgrade"] == "baseline (reference)"]
    assert len(reference) == 4 and reference["value"].isna().all()
    members = {(r["workload.context"], r["policy"], r["label.upgrade"]): r["represented by"]
               for _, r in table.iterrows()}
    assert members[131072, "best baseline", "A"] == "cpu_offload"
    assert members[1048576, "best baseline", "B"] == "flexgen"
    assert members[1048576, "HybridGen", "B"] == "none feasible"


def test_answer_lines_name_the_best_choice_per_group_in_order():
    lines = answer_lines(_frame(), AXES, SPEC)
    assert len(lines) == 4
    assert lines[0].startswith("- context 128k, HybridGen: **B** (1 tokens_per_s gained over "
                               "baseline per 1,000 capex_usd spent; policy hybridgen)")
    assert "runner-up A (0.200)" in lines[0]
    assert lines[1].startswith("- context 128k, best baseline: **A** (0.300 ")
    assert "policy cpu_offload" in lines[1]
    assert lines[2].startswith("- context 1M, HybridGen: **A** (0.200 ")
    assert lines[3].startswith("- context 1M, best baseline: no choice gains over baseline")


def test_without_gain_the_metric_ranks_and_lower_is_better_for_costs():
    frame = _frame().assign(usd_per_mtok=lambda f: 1e6 / f["tokens_per_s"])
    spec = AnswerSpec(question="Cheapest?", choose="label.upgrade", metric="usd_per_mtok",
                      per=["workload.context"], among={"column": "policy",
                                                       "sets": {"HybridGen": ["hybridgen"]}})
    lines = answer_lines(frame, AXES, spec)
    assert lines[0].startswith("- context 128k, HybridGen: **A** (83,333 usd_per_mtok")
    assert "runner-up B (90,909)" in lines[0]


STUDY = """\
name: upgrades
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {batch: 1, context: 32k, gen: 2}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  - zip:
      label.upgrade: [baseline, faster ddr]
      hardware.tiers.ddr0.bandwidth_gbps: [280, 400]
  - grid:
      policy: [hybridgen, flexgen]
answer:
  question: Which host memory is worth it?
  choose: label.upgrade
  metric: usd_per_mtok
  among: {column: policy, sets: {HybridGen: [hybridgen], baseline: [flexgen]}}
"""


def test_a_study_answers_its_question_in_the_reports_first_lines(tmp_path):
    plan = load_study(write_study(tmp_path, STUDY))
    assert [p.coords["label.upgrade"] for p in plan.expansion.points] == [
        "baseline", "baseline", "faster ddr", "faster ddr"]
    out = tmp_path / "out"
    assert main(["study", str(write_study(tmp_path, STUDY)), "--out", str(out), "--jobs", "1",
                 "--no-figures", "--quiet"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    assert lines[0] == "# Study `upgrades`"
    assert lines[2] == "## Which host memory is worth it?"
    assert lines[4].startswith("- HybridGen: **") and "usd_per_mtok" in lines[4]
    assert lines[5].startswith("- baseline: **")
    frame = pd.read_parquet(out / "results.parquet")
    assert {"label.upgrade", "usd_per_mtok", "energy_j_per_token", "capex_usd"} <= set(frame)
    # the label names the hardware zipped with it: the tables show the label alone
    text = (out / "report.md").read_text()
    best = text[text.index("## Best policy"):text.index("## What binds")]
    assert "Columns zipped with `upgrade` are named by it (1 column;" in best
    assert "| upgrade | best | tokens_per_s | runner-up | margin |" in best
    assert "`margin`: best / runner-up tokens_per_s" in best
    binds = text[text.index("## What binds"):]
    assert "tiers.ddr0.bandwidth_gbps" not in binds.split("## Figures")[0]


@pytest.mark.parametrize("old, new, expected", [
    ("choose: label.upgrade", "choose: label.upgrad",
     "column 'label.upgrad' is not produced"),
    ("metric: usd_per_mtok", "metric: usd_per_tok", "column 'usd_per_tok' is not produced"),
    ("baseline: [flexgen]}}", "baseline: [flexgn]}}", "'flexgn' is not a value of axis"),
    ("metric: usd_per_mtok", "metric: usd_per_mtok\n  gain_vs: baseline",
     "gain_vs and cost go together"),
    # each of these ran every point, then the report died with a pandas traceback (exit 1):
    # "cannot insert ..., already exists", "Grouper for 'policy' not 1-dimensional", ...
    ("metric: usd_per_mtok", "metric: usd_per_mtok\n  per: [label.upgrade]",
     "per: 'label.upgrade' is the column chosen (choose)"),
    ("metric: usd_per_mtok", "metric: usd_per_mtok\n  per: [workload.batch, workload.batch]",
     "per: 'workload.batch' is listed twice"),
    ("metric: usd_per_mtok", "metric: usd_per_mtok\n  per: [usd_per_mtok]",
     "per: 'usd_per_mtok' ranks the choices (metric, cost)"),
    ("metric: usd_per_mtok", "metric: usd_per_mtok\n  per: [policy]",
     "among.column: 'policy' is also in per"),
    ("choose: label.upgrade", "choose: policy", "among.column: 'policy' is also in choose"),
])
def test_a_bad_answer_block_is_a_one_line_error(tmp_path, capsys, old, new, expected):
    assert old in STUDY
    study = write_study(tmp_path, STUDY.replace(old, new, 1))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{study}:" in err and expected in err, err


def test_runner_up_that_gains_nothing_is_not_named_and_ties_are_said():
    """A runner-up at 0 gain is one of every choice that buys nothing (memory_purchase named
    '+CXL x8 (0)' out of four tied at 0); a tie for first is not a win."""
    lines = answer_lines(_frame(), AXES, SPEC)
    assert "runner-up" not in lines[1]
    assert lines[1].endswith("; no other choice gains over baseline")
    assert "runner-up" not in lines[2] and lines[2].endswith("no other choice gains over "
                                                             "baseline")
    frame = _frame()
    frame.loc[(frame["label.upgrade"] == "A") & (frame.policy == "hybridgen")
              & (frame["workload.context"] == 131072), "tokens_per_s"] = 20.0
    frame.loc[frame["label.upgrade"] == "A", "capex_usd"] = 110_000.0  # gains 10 per 10k
    frame.loc[(frame["label.upgrade"] == "B") & (frame.policy == "hybridgen")
              & (frame["workload.context"] == 131072), "tokens_per_s"] = 11.0
    first = answer_lines(frame, AXES, SPEC)[0]  # A: 1.0 per 1,000 USD, B: 1.0 too
    assert "tied with" in first and "runner-up" not in first


def test_the_ranking_table_is_never_cut_since_no_file_holds_it():
    """report.max_rows (40 by default) cut it with '... more rows in results.csv', which has no such rows."""
    from hgsim.study.answer import section

    text = section(_frame(), AXES, [SPEC])
    assert "more rows" not in text
    # 2 sets x (2 choices + the reference, last and unvalued, to check each gain by hand)
    assert text.count("| 128k |") == 6 and text.count("| 1M |") == 6
    assert "| 1M | best baseline | flexgen | baseline (reference) | 1 | 100,000 | - |" in text


def _settings_frame() -> pd.DataFrame:
    """HybridGen at two top-k ratios and InfiniGen at one, each zipped with its ratio."""
    speeds = {131072: {0.05: 4.5, 0.2: 2.5, 0.1: 5.5}, 524288: {0.05: 0.9, 0.2: 0.5, 0.1: NAN}}
    policies = {0.05: "hybridgen", 0.2: "hybridgen", 0.1: "infinigen"}
    rows = []
    for context, by_ratio in speeds.items():
        for ratio, tps in by_ratio.items():
            rows.append({"policy": policies[ratio], "policy_options.topk_ratio": ratio,
                         "workload.context": np.int64(context), "feasible": tps == tps,
                         "tokens_per_s": tps})
    return pd.DataFrame(rows)


SETTINGS_AXES = ["policy", "policy_options.topk_ratio", "workload.context"]
SETTINGS_ZIP = {"policy": ["policy_options.topk_ratio"],
                "policy_options.topk_ratio": ["policy"]}


def test_a_policy_at_two_zipped_settings_is_two_choices_named_by_setting():
    spec = AnswerSpec(question="Fastest?", choose="policy", metric="tokens_per_s",
                      per=["workload.context"])
    table = ranking(_settings_frame(), SETTINGS_AXES, spec, SETTINGS_ZIP)
    got = {(r["workload.context"], r["policy"]): r["value"] for _, r in table.iterrows()}
    # not hybridgen's two ratios averaged into one "hybridgen" (3.5 and 0.7)
    assert got[131072, "hybridgen (topk_ratio 0.05)"] == 4.5
    assert got[131072, "hybridgen (topk_ratio 0.2)"] == 2.5
    assert got[524288, "hybridgen (topk_ratio 0.05)"] == 0.9
    lines = answer_lines(_settings_frame(), SETTINGS_AXES, spec, SETTINGS_ZIP)
    assert lines[0] == ("- context 128k: **infinigen (topk_ratio 0.1)** (5.50 tokens_per_s); "
                        "runner-up hybridgen (topk_ratio 0.05) (4.50)")
    assert lines[1].startswith("- context 512k: **hybridgen (topk_ratio 0.05)** (0.900")


def test_an_among_set_compares_its_members_across_their_zipped_settings():
    spec = AnswerSpec(question="Which context?", choose="workload.context",
                      metric="tokens_per_s", among={"column": "policy", "sets": {
                          "lossy": ["hybridgen", "infinigen"]}})
    table = ranking(_settings_frame(), SETTINGS_AXES, spec, SETTINGS_ZIP)
    # one representative per context, the fastest member at any of its settings
    assert table["value"].tolist() == [5.5, 0.9]
    assert table["represented by"].tolist() == ["infinigen (topk_ratio 0.1)",
                                                "hybridgen (topk_ratio 0.05)"]
    (line,) = answer_lines(_settings_frame(), SETTINGS_AXES, spec, SETTINGS_ZIP)
    assert line.startswith("- lossy: **128k** (5.50 tokens_per_s")  # np.int64 reads 128k
    assert line.endswith("runner-up 512k (0.900)")


def test_best_and_binding_tables_name_each_zipped_setting():
    from hgsim.study.report import best_table, binding_table

    frame = _settings_frame().assign(binding="ddr0 read", binding_share=0.5)
    best = best_table(frame, SETTINGS_AXES, "policy", "tokens_per_s", SETTINGS_ZIP)
    assert best[["best", "runner-up"]].values.tolist() == [
        ["infinigen (topk_ratio 0.1)", "hybridgen (topk_ratio 0.05)"],
        ["hybridgen (topk_ratio 0.05)", "hybridgen (topk_ratio 0.2)"]]
    binds = binding_table(frame, SETTINGS_AXES, "policy", SETTINGS_ZIP)
    assert list(binds.columns) == ["workload.context", "hybridgen (topk_ratio 0.05)",
                                   "hybridgen (topk_ratio 0.2)", "infinigen (topk_ratio 0.1)"]

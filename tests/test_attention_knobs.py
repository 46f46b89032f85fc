"""The synthetic attention's shape (``AttentionModelSpec``'s sinks, recency, heavy hitters and
noise) as fidelity settings: a study's ``fidelity.attention``, ``api.simulate(attention=...)``
and ``hgsim simulate --attention`` reach the accuracy proxy and the row count of HybridGen's GQA
group union (so its PCIe bytes and time), never an exact policy; bad ones are one-line errors;
studies that do not set them keep their keys."""

from __future__ import annotations

import json

import pytest
from test_study_common import refused_study, results, write_study

from hgsim import api
from hgsim.accuracy import AttentionModelSpec
from hgsim.accuracy.groups import expected_union_rows, union_curve
from hgsim.accuracy.synthetic import ATTENTION, attention_model
from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.costs import host_rows_per_kv_head, layer_work
from hgsim.equal_accuracy import knob_for, probe_setting
from hgsim.errors import UserError
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.study import RunOptions, load_study, run_study
from hgsim.study.load import resolved_yaml
from hgsim.workload import Workload

PROFILE = load_profile("h100-80gb-spr-cxl")
MODEL = get_model("llama-3.1-8b")  # four query heads per KV head
# eight 128k sequences: the KV spills to host tiers, so every lossy policy selects there
LOAD = Workload(batch=8, context=131072, gen=4)
ALIKE, APART = AttentionModelSpec(head_noise_std=0.0), AttentionModelSpec(head_noise_std=1.5)

HEAD = """\
name: attn
base:
  profile: h100-80gb-spr-cxl
  model: llama-3.1-8b
  workload: {context: 128k, batch: 8, gen: 4}
  fidelity: {decode_samples: 2}
"""

SWEEP = HEAD + """\
sweep:
  grid:
    policy: [hybridgen_union, infinigen, flexgen]
    fidelity.attention.head_noise_std: [0.5, 1.5]
"""


def union_plan(attention: AttentionModelSpec | None = None):
    policy = make_policy("hybridgen_union", MODEL, PROFILE, LOAD, {"adaptive": False},
                         attention=attention)
    return policy.step_plan(LOAD.context).layer


def test_identical_heads_send_exactly_k_rows_and_differing_heads_more():
    """With no per-head deviation the heads of a group rank every token alike, so the union of
    their top-k sets is the top-k itself; the further apart they are, the larger the union,
    within [k, G k]. The row count the costs gather is that expected union, per KV head."""
    plan = union_plan()
    k, host = plan.host_selected, plan.host_tokens
    assert 0 < k < host
    rows = {spec: host_rows_per_kv_head(MODEL, plan, spec) for spec in (ALIKE, None, APART)}
    assert rows[ALIKE] == k
    assert k < rows[None] < rows[APART] <= MODEL.gqa_group * k
    assert rows[APART] == expected_union_rows(host, k, MODEL.gqa_group, APART)
    work = layer_work(MODEL, LOAD.batch, plan, "fp16", "fp16", attention=APART)
    assert work.gather_v_rows == LOAD.batch * MODEL.num_kv_heads * rows[APART]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attention")
    out = tmp / "out"
    outcome = run_study(write_study(tmp, SWEEP), RunOptions(out=out, quiet=True, figures=False))
    assert outcome.ok, outcome.stats.errors
    return out, results(out)


def rows_of(frame, policy: str):
    return frame[frame["policy"] == policy].set_index("fidelity.attention.head_noise_std")


def test_head_noise_moves_the_union_and_every_lossy_error_never_exact_rows(sweep):
    _, frame = sweep
    union, spec, exact = (rows_of(frame, p) for p in ("hybridgen_union", "infinigen", "flexgen"))
    # heads further apart: a larger union, more bytes over PCIe, a slower HybridGen
    assert union.loc[1.5, "tokens_per_s"] < union.loc[0.5, "tokens_per_s"]
    assert union.loc[1.5, "accuracy_rel_error"] != union.loc[0.5, "accuracy_rel_error"]
    # InfiniGen's time depends on its plan alone; its error on the attention it selects from
    assert spec.loc[1.5, "tokens_per_s"] == spec.loc[0.5, "tokens_per_s"]
    assert spec.loc[1.5, "accuracy_rel_error"] != spec.loc[0.5, "accuracy_rel_error"]
    # an exact policy is the same point, computed once
    assert exact["point"].nunique() == 1 and exact["tokens_per_s"].nunique() == 1


def test_rows_are_what_simulate_gives_for_the_attention_they_name(sweep):
    _, frame = sweep
    row = rows_of(frame, "hybridgen_union").loc[1.5]
    direct = simulate(PROFILE, MODEL, "hybridgen_union", LOAD,
                      fidelity=Fidelity(decode_samples=2, attention=APART))
    assert row["tokens_per_s"] == direct.tokens_per_s
    assert row["accuracy_rel_error"] == direct.accuracy_rel_error


def test_report_and_resolved_study_show_the_overrides(sweep, tmp_path):
    out, _ = sweep
    report = (out / "report.md").read_text()
    assert "| fidelity.attention.head_noise_std |" in report
    # what each setting means: the union a 4-head group sends per row selected, as costed
    section = report.split("## Accuracy model")[1]
    for shown, spec in (("0.500", None), ("1.50", APART)):
        union = union_curve(4, spec).fraction(0.05)
        assert f"| head_noise_std={shown} |" in section and f"| {union:.2f} |" in section
    text = HEAD.replace("{decode_samples: 2}", "{decode_samples: 2, attention: "
                        "{heavy_fraction: 0.05}}") + "sweep:\n  grid:\n    policy: [h2o]\n"
    plan = load_study(write_study(tmp_path, text))
    assert plan.expansion.points[0].spec.fidelity.attention == \
        AttentionModelSpec(heavy_fraction=0.05)
    assert "attention: {heavy_fraction: 0.05}" in resolved_yaml(plan)


def test_defaults_named_are_no_override_and_keys_move_only_for_lossy_policies(tmp_path):
    assert attention_model({"heavy_fraction": 0.02}) == AttentionModelSpec()
    assert ATTENTION.overrides_of(AttentionModelSpec()) == {}

    def keys(fidelity: str) -> dict[str, str]:
        text = HEAD.replace("{decode_samples: 2}", fidelity) + \
            "sweep:\n  grid:\n    policy: [h2o, hybridgen_union, hybridgen_exact, flexgen]\n"
        return {p.spec.policy: p.spec.key
                for p in load_study(write_study(tmp_path, text)).expansion.points}

    plain = keys("{decode_samples: 2}")
    assert keys("{decode_samples: 2, attention: {}}") == plain
    assert keys("{decode_samples: 2, attention: {heavy_fraction: 0.02}}") == plain
    moved = keys("{decode_samples: 2, attention: {heavy_fraction: 0.05}}")
    assert all(moved[p] != plain[p] for p in ("h2o", "hybridgen_union"))
    assert all(moved[p] == plain[p] for p in ("hybridgen_exact", "flexgen"))


def test_a_capacity_search_sizes_the_union_by_the_attention_it_names(tmp_path):
    """HybridGen's group-union landing buffers grow with the union, so heads further apart
    leave room for a shorter context; each setting is a search of its own (a default-valued
    one keeps the key a search without it has)."""
    text = HEAD.replace("workload: {context: 128k, batch: 8, gen: 4}",
                        "workload: {batch: 8, gen: 4}") + """\
search: {maximize: workload.context, lo: 1k, hi: 16M, step: 1k}
sweep:
  grid:
    policy: [hybridgen_union]
    policy_options.max_ratio: [0.5]
    fidelity.attention.head_noise_std: [0.0, 0.5, 3.0]
"""
    out = tmp_path / "out"
    outcome = run_study(write_study(tmp_path, text), RunOptions(out=out, quiet=True,
                                                                figures=False))
    assert outcome.ok, outcome.stats.errors
    rows = results(out).set_index("fidelity.attention.head_noise_std")
    assert rows["point"].nunique() == 3
    assert rows.loc[0.0, "max_context"] > rows.loc[0.5, "max_context"] > \
        rows.loc[3.0, "max_context"]
    plain = load_study(write_study(tmp_path, text.replace(
        "    fidelity.attention.head_noise_std: [0.0, 0.5, 3.0]\n", ""), name="plain.yaml"))
    assert plain.expansion.points[0].spec.key == rows.loc[0.5, "point"]


def test_equal_accuracy_probe_scores_on_the_attention_it_is_given():
    """More heavy hitters concentrate the mass on fewer, stronger tokens: the same top-k keeps
    more of it."""
    knob = knob_for("infinigen")
    plain = probe_setting("infinigen", MODEL, PROFILE, LOAD, {}, knob, 0.05)
    heavy = probe_setting("infinigen", MODEL, PROFILE, LOAD, {}, knob, 0.05,
                          attention=AttentionModelSpec(heavy_fraction=0.05))
    assert heavy.rel_error < plain.rel_error


STUDY_ERRORS = {
    "base value": ("{decode_samples: 2}", "{decode_samples: 2, attention: {heavy_fraction: 2}}",
                   "base.fidelity.attention.heavy_fraction: heavy_fraction must be a number in "
                   "[0, 1], got 2"),
    "base unknown": ("{decode_samples: 2}", "{decode_samples: 2, attention: {heavy: 0.5}}",
                     "base.fidelity.attention.heavy: unknown attention field 'heavy' (known: "
                     "sink_tokens,"),
    "axis unknown": ("fidelity.attention.head_noise_std", "fidelity.attention.head_noise",
                     "fidelity.attention.head_noise: unknown attention field 'head_noise' "
                     "(known:"),
    "axis bad": ("fidelity.attention.head_noise_std: [0.5, 1.5]",
                 "fidelity.attention.recency_tokens: [64, 0]",
                 "fidelity.attention.recency_tokens[1]: recency_tokens must be a number in "
                 "(0, 1000000], got 0"),
    "law exponent bad": ("fidelity.attention.head_noise_std: [0.5, 1.5]",
                         "fidelity.attention.rank_exponent: [1.1, 5]",
                         "fidelity.attention.rank_exponent[1]: rank_exponent must be a number in "
                         "[0, 4], got 5"),
    "fidelity group": ("fidelity.attention.head_noise_std: [0.5, 1.5]",
                       "fidelity.attentions.noise_std: [1.0]",
                       "unknown fidelity field 'attentions.noise_std' (known: decode_samples, "
                       "accuracy, selection.<field>, attention.<field>)"),
}


@pytest.mark.parametrize("case", STUDY_ERRORS)
def test_bad_attention_in_a_study_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    old, new, message = STUDY_ERRORS[case]
    assert old in SWEEP
    assert message in refused_study(tmp_path, capsys, SWEEP.replace(old, new))


def test_api_attention_reaches_the_run_and_names_bad_fields():
    args = dict(context="128k", batch=8, gen=4, samples=2)
    moved = api.simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "hybridgen_union",
                         attention={"head_noise_std": 1.5}, **args)
    direct = simulate(PROFILE, MODEL, "hybridgen_union", LOAD,
                      fidelity=Fidelity(decode_samples=2, attention=APART))
    assert moved.tokens_per_s == direct.tokens_per_s
    assert moved.accuracy_rel_error == direct.accuracy_rel_error
    with pytest.raises(UserError, match=r"^attention\.seed: seed must be a whole number >= 0, "
                                        r"got -1$"):
        api.simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "h2o", attention={"seed": -1}, **args)
    with pytest.raises(UserError, match="attention: expected a mapping"):
        api.simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "h2o", attention=[1], **args)


def test_cli_result_says_what_the_accuracy_model_was_set_to(capsys):
    args = ["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b",
            "--policy", "infinigen", "--context", "16k", "--gen", "2", "--samples", "1",
            "--attention", "heavy_fraction=0.05", "--selection", "speculation_similarity=0.9",
            "--selection", "history_decay=0.5"]
    assert main(args) == 0
    assert "accuracy model: selection.history_decay=0.5, attention.heavy_fraction=0.05" in \
        capsys.readouterr().out  # the default-valued similarity is no setting
    assert main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["fidelity.attention.heavy_fraction"] == 0.05
    assert "fidelity.selection.speculation_similarity" not in row
    assert main(args[:11] + ["--json"]) == 0
    assert not any(key.startswith("fidelity.") for key in json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("pairs, message", [
    (["noise_std=nan"], "--attention noise_std: noise_std must be a number in [0, 20], got nan"),
    (["sinks=4"], "--attention sinks: unknown attention field 'sinks'"),
    (["seed"], "--attention: expects KEY=VALUE, got 'seed'"),
    (["seed=1", "seed=2"], "--attention: 'seed' is given twice (seed=1 and seed=2); give each "
                           "field once"),
])
def test_cli_attention_errors_are_one_line_exit_2(capsys, pairs, message):
    flags = [arg for pair in pairs for arg in ("--attention", pair)]
    code = main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b",
                 "--policy", "h2o", "--context", "16k", "--gen", "4", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err

"""Study files are checked in full before anything runs: each mistake is one line naming the
file, line and key, exit code 2, and no output folder."""

from __future__ import annotations

import pytest
from test_study_common import TINY, write_study

from hgsim.cli import main
from hgsim.errors import ConfigError
from hgsim.study import load_study


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(["study", *args])
    err = capsys.readouterr().err
    return code, err


# (replace this, with this) in TINY -> (line, text expected in the one-line error)
CASES = {
    "unknown top-level key": ("name: tiny", "name: tiny\nsweeps: []", 2, "unknown key"),
    "unknown base key": ("  fidelity: {", "  fidelty: {", 6, "base.fidelty: unknown key"),
    # a misspelt required key read as "base.profile: required field is missing"
    "misspelt required key": ("  profile: h100", "  profle: h100", 3,
                              "base.profle: unknown key (did you mean 'profile'?)"),
    "unknown workload field": ("gen: 4}", "gen: 4, contxt: 1}", 5, "unknown workload field"),
    # a mapping or list as a label ran every point, then the report's answer and tables
    # died on "TypeError: unhashable type: 'dict'" (a traceback, no report)
    "label of a mapping": ("      workload.context: [32k, 64k]", "      label.x: [a, {b: 1}]", 9,
                           "sweep[0].grid.label.x[1]: a label is a name or a number, got dict "
                           "{'b': 1}"),
    # a mapping or list as a swept profile: "TypeError: unhashable type" (a traceback)
    "profile axis of a mapping": ("      workload.context: [32k, 64k]",
                                  "      profile: [h100-80gb-spr-cxl, {x: 1}]", 9,
                                  "sweep[0].grid.profile[1]: profile must be a name or path, "
                                  "got {'x': 1}"),
    "profile axis of a list": ("      workload.context: [32k, 64k]",
                               "      profile: [[h100-80gb-spr-cxl]]", 9,
                               "sweep[0].grid.profile[0]: profile must be a name or path, got ["),
    "label of a list": ("      workload.context: [32k, 64k]", "      label.x: [[1, 2]]", 9,
                        "sweep[0].grid.label.x[0]: a label is a name or a number, got list"),
    # YAML reads on/off as booleans: a label 'on' plotted and reported as True
    "label of a YAML boolean": ("      workload.context: [32k, 64k]",
                                "      label.cache: [kept, off]", 9,
                                "sweep[0].grid.label.cache[1]: a label is a name or a number, "
                                "got the YAML boolean false"),
    # accepted: NumPy and torch take no negative seed (`hgsim run --seed -5`: a traceback)
    "negative seed": ("gen: 4}", "gen: 4, seed: -1}", 5,
                      "base.workload.seed: input should be greater than or equal to 0"),
    "unknown axis": ("      policy: [hybridgen", "      polcy: [hybridgen", 10,
                     "unknown axis 'polcy'"),
    "bad hardware path": ("      workload.context: [32k, 64k]",
                          "      hardware.tiers.cxl9.latency_ns: [100, 200]", 9,
                          "unknown key 'cxl9'"),
    "hardware value with wrong unit": ("      workload.context: [32k, 64k]",
                                       "      hardware.tiers.cxl0.latency_ns: [100, 5 GB/s]", 9,
                                       "wrong unit"),
    "unknown policy": ("flexgen, cpu_offload]\nderived", "flexgn, cpu_offload]\nderived", 10,
                       "unknown policy 'flexgn' (did you mean 'flexgen'?)"),
    "unknown model": ("model: llama-2-7b", "model: llama-9-7b", 4, "unknown model"),
    "unknown profile": ("profile: h100-80gb-spr-cxl", "profile: h100-xyz", 3,
                        "unknown hardware profile"),
    "plot column not produced": ("y: tokens_per_s, hue", "y: tokens_per_sec, hue", 17,
                                 "column 'tokens_per_sec' is not produced"),
    "derived baseline not swept": ("vs: {policy: [flexgen, cpu_offload]}",
                                   "vs: {policy: [flexgen, h2o]}", 15,
                                   "'h2o' is not a value of axis 'policy'"),
    "derived vs not an axis": ("vs: {policy: [flexgen, cpu_offload]}", "vs: {model: x}", 15,
                               "'model' is not a sweep axis"),
    "best_by not an axis": ("derived:", "report: {best_by: model}\nderived:", 11,
                            "report.best_by: 'model' is not a sweep axis"),
    "option the policy lacks": ("      workload.context: [32k, 64k]",
                                "      policy_options.topk_ratio: [0.1]", 9,
                                "policy 'flexgen' has no option 'topk_ratio'"),
    "socket the profile lacks": ("      workload.context: [32k, 64k]",
                                 "      policy_options.host_socket: [0, 1]", 9,
                                 "profile h100-80gb-spr-cxl has no socket 1; its sockets: "
                                 "0 (cpu0)"),
    "zip lengths differ": ("  - grid:\n      workload.context: [32k, 64k]",
                           "  - zip:\n      workload.context: [32k, 64k]\n"
                           "      workload.gen: [4]\n    grid:", 8,
                           "zip axes must have the same number of values"),
    "plot filter value not in axis": ("logx: true}", "logx: true, where: {workload.context: 48k}}",
                                      17, "'48k' is not a value of axis 'workload.context'"),
    "axis in two groups": ("derived:", "  - grid: {policy: [h2o]}\nderived:", 11,
                           "axis 'policy' appears in more than one group"),
    "heatmap without value": ("value: tokens_per_s}", "hue: policy}", 18, "needs 'value'"),
    # a derived metric named as a column replaced that column (the policy, a metric) with
    # its own values; a metric of text, or a sensitivity metric no point has, came out empty
    "derived named as a column": ("  speedup:\n    metric: tokens_per_s\n    of: {policy: "
                                  "hybridgen}\n    vs: {policy: [flexgen, cpu_offload]}",
                                  "  tokens_per_s:\n    metric: tokens_per_s\n    vs: "
                                  "{policy: flexgen}", 12, "derived column 'tokens_per_s' is "
                                  "already a column"),
    "derived metric of a text column": ("metric: tokens_per_s\n    of", "metric: policy\n    of",
                                        13, "column 'policy' holds text"),
    "plot of a text column": ("y: tokens_per_s, hue", "y: model, hue", 17,
                              "column 'model' holds text"),
    # (model, not y's policy: a value that repeats x or y is refused as such first)
    "heatmap colour of a text column": ("value: tokens_per_s}", "value: model}", 18,
                                        "column 'model' holds text"),
    # a value given twice, however spelt, gave the same points twice as duplicate rows
    "grid value twice": ("workload.context: [32k, 64k]", "workload.context: [32k, 32768]", 9,
                         "sweep[0].grid.workload.context[1]: repeats [0] (32k)"),
    "model twice in another case": ("      workload.context: [32k, 64k]",
                                    "      model: [llama-2-7b, Llama-2-7B]", 9,
                                    "model[1]: repeats [0] (llama-2-7b)"),
    "zip tuple twice": ("  - grid:\n      workload.context: [32k, 64k]",
                        "  - zip:\n      workload.context: [32k, 32k]\n"
                        "      workload.gen: [4, 4]\n    grid:", 9,
                        "zip.workload.context[1]: repeats [0] (32k, 4)"),
    "sensitivity metric not produced": ("derived:", "sensitivity: {parameters: [tiers.cxl0."
                                        "latency_ns], metric: tokens_per_sec}\nderived:", 11,
                                        "column 'tokens_per_sec' is not produced"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schema_error_is_one_line_with_file_line_and_key(tmp_path, capsys, case):
    old, new, line, expected = CASES[case]
    assert old in TINY, case
    study = write_study(tmp_path, TINY.replace(old, new, 1))
    out = tmp_path / "out"
    code, err = run_main(capsys, str(study), "--out", str(out))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert f"{study}:{line}:" in err, err
    assert expected in err, err
    assert not out.exists()


def test_sweep_may_be_a_single_group_mapping(tmp_path):
    text = TINY.replace("  - grid:\n      workload", "  grid:\n    workload").replace(
        "      policy: [hybridgen", "    policy: [hybridgen")
    plan = load_study(write_study(tmp_path, text))
    assert len(plan.expansion.points) == 6


def test_error_inside_single_group_mapping_keeps_its_line(tmp_path):
    text = TINY.replace("  - grid:\n      workload", "  grid:\n    workload").replace(
        "      policy: [hybridgen", "    policx: [hybridgen")
    with pytest.raises(ConfigError, match=r"study.yaml:10: sweep\[0\]\.grid\.policx"):
        load_study(write_study(tmp_path, text))


def test_missing_context_is_reported(tmp_path):
    text = TINY.replace("context: 32k, ", "").replace("workload.context: [32k, 64k]",
                                                      "workload.batch: [1, 2]")
    text = text.replace("x: workload.context", "x: workload.batch")
    with pytest.raises(ConfigError, match="context: required"):
        load_study(write_study(tmp_path, text))


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main(capsys, str(write_study(tmp_path)), "--out", str(out), "--dry-run")
    assert code == 0 and "6 to compute" in err
    assert not out.exists()


def test_a_bad_profile_file_is_named_with_its_own_line(tmp_path, capsys):
    """The study's line was kept but the profile file's own line and path were dropped
    ('base.profile: file not found'), and a relative path missing beside the study was looked
    for in the working directory instead."""
    from test_study_common import REPO

    folder = tmp_path / "profiles"
    folder.mkdir()
    text = (REPO / "hardware_profiles" / "h100-80gb-spr-cxl.yaml").read_text()
    bad = folder / "bad.yaml"
    bad.write_text(text.replace("read_bandwidth_gbps: ", "read_bandwidth_gbps: -", 1))
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if ": -" in s)
    for name, expected in (("profiles/bad.yaml", f"{bad}:{line}: tiers."),
                           ("profiles/none.yaml", f"{folder}/none.yaml: file not found")):
        study = write_study(tmp_path, TINY.replace("profile: h100-80gb-spr-cxl",
                                                   f"profile: {name}"))
        code, err = run_main(capsys, str(study), "--out", str(tmp_path / "out"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{study}:3: base.profile: {expected}" in err, err

"""``hgsim.api``: the CLI's verbs from Python, with the same numbers and the same errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hgsim import api
from hgsim.errors import ConfigError, UserError
from hgsim.results import SimResult, StepTiming

REPO = Path(__file__).resolve().parents[1]
H100 = "h100-80gb-spr-cxl"


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_hgsim_stays_cheap_and_api_loads_on_use():
    result = _python(
        "import sys, hgsim\n"
        "heavy = [m for m in ('pandas', 'numpy', 'simpy', 'pydantic', 'hgsim.api') "
        "if m in sys.modules]\n"
        "print(heavy)\n"
        "print(callable(hgsim.api.simulate))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_simulate_matches_the_cli():
    result = api.simulate(H100, "llama-2-13b", "hybridgen", context="32k", batch=2, gen=8,
                          samples=4)
    cli = subprocess.run([sys.executable, "-m", "hgsim", "simulate", "--profile", H100, "--model",
                          "llama-2-13b", "--context", "32k", "--batch", "2", "--gen", "8",
                          "--samples", "4", "--json"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr
    row = json.loads(cli.stdout, parse_constant=_not_json)  # strict: jq and JSON.parse refuse NaN
    assert row["ttft_s"] is None and math.isnan(result.ttft_s)  # no prefill was simulated
    assert isinstance(result, SimResult)
    assert result.tokens_per_s == pytest.approx(row["tokens_per_s"], rel=1e-12)
    assert result.to_row()["latency_p99_ms"] == pytest.approx(row["latency_p99_ms"], rel=1e-12)


def test_result_views():
    result = api.simulate(H100, "llama-2-13b", "hybridgen", context="128k", batch=2, gen=8,
                          samples=4)
    frame = result.to_frame()
    assert frame.shape[0] == 1 and frame.loc[0, "policy"] == "hybridgen"
    assert frame.loc[0, "tokens_per_s"] == pytest.approx(result.tokens_per_s)
    table = result.table()
    assert table.index.name == "metric" and list(table.columns) == ["value"]
    assert table.loc["context", "value"] == 131072 and table.loc["mem_cxl0_gb", "value"] > 0
    steps = result.steps_frame()
    assert list(steps.columns) == list(StepTiming.__dataclass_fields__)
    assert len(steps) == 8 and steps["simulated"].sum() == 4
    assert steps["latency_s"].sum() == pytest.approx(result.decode_s)
    assert "tokens_per_s" in result._repr_html_()


def test_hardware_overrides_change_the_machine():
    slow = {"tiers.cxl0.bandwidth_gbps": 8}
    args = dict(context="128k", batch=2, gen=8, samples=4, accuracy=False)
    base = api.simulate(H100, "llama-2-13b", **args)
    via_kwarg = api.simulate(H100, "llama-2-13b", hardware=slow, **args)
    profile = api.with_overrides(H100, slow)
    via_profile = api.simulate(profile, "llama-2-13b", **args)
    assert profile.tiers["cxl0"].read_bandwidth_gbps == profile.tiers["cxl0"].write_bandwidth_gbps == 8
    assert api.load_profile(H100).tiers["cxl0"].read_bandwidth_gbps == 24  # original untouched
    assert via_kwarg.tokens_per_s == pytest.approx(via_profile.tokens_per_s, rel=1e-12)
    assert via_kwarg.tokens_per_s < base.tokens_per_s


def test_mistakes_are_one_line_user_errors():
    with pytest.raises(UserError, match="unknown key 'cxl9' in tiers; did you mean 'cxl0'"):
        api.with_overrides(H100, {"tiers.cxl9.latency_ns": 300})
    with pytest.raises(UserError, match="overrides must map dotted paths"):
        api.with_overrides(H100, "tiers.cxl0.latency_ns=300")
    with pytest.raises(UserError, match="context"):
        api.simulate(H100, "llama-2-13b", context="32q")
    with pytest.raises(UserError, match="unknown policy 'hybridgn'"):
        api.simulate(H100, "llama-2-13b", "hybridgn", context="32k")
    with pytest.raises(UserError, match="samples: input should be greater than or equal to 0"):
        api.simulate(H100, "llama-2-13b", context="32k", samples=-1)


@pytest.mark.parametrize("kwargs, expected", [
    # each of these raised TypeError, AttributeError, ValueError or (trace, after the whole
    # simulation) FileNotFoundError, naming no argument
    ({"samples": "x"}, "samples: input should be a valid integer"),
    ({"samples": 1.5}, "samples: input should be a valid integer"),
    ({"accuracy": "perhaps"}, "accuracy: input should be a valid boolean"),
    ({"options": "topk_ratio=0.1"}, "options: expected a mapping of option names"),
    ({"options": {"topk": 0.1}}, "policy_options.topk: policy 'hybridgen' has no option 'topk' "
                                 "(its options: "),
    ({"trace": "no/such/folder/t.json"}, "trace: folder no/such/folder does not exist"),
    ({"profile": None}, "profile: expected a profile name, a YAML path or a HardwareProfile"),
    ({"model": 13}, "model: expected a model name, a model file path or a ModelSpec, got 13"),
    # these were TypeErrors from os.fspath / keyword arguments, naming no argument
    ({"trace": 5}, "trace: expected a file path, got 5"),
    ({"options": {5: 0.1}}, "options: option names are text, got 5"),
])
def test_wrong_arguments_are_user_errors_naming_the_argument(kwargs, expected):
    call = {"profile": H100, "model": "llama-2-13b", "context": "32k", "gen": 4, "samples": 2,
            **kwargs}
    with pytest.raises(UserError, match=re.escape(expected)):
        api.simulate(**call)


def test_run_study_of_something_that_is_no_study_is_a_user_error():
    with pytest.raises(UserError, match="study: expected a study YAML path or the mapping"):
        api.run_study(42)
    with pytest.raises(UserError, match="jobs: must be a whole number >= 1, got 1.5"):
        api.run_study(STUDY, jobs=1.5)
    with pytest.raises(UserError, match="out: expected a folder path or None, got 5"):
        api.run_study(STUDY, out=5)  # was a TypeError from pathlib


@pytest.mark.parametrize("name", [None, 5])
def test_load_profile_of_something_that_is_no_name_is_a_user_error(name):
    # was a TypeError from os.fspath
    with pytest.raises(UserError, match=f"profile: expected a profile name or a YAML path, "
                                        f"got {name}"):
        api.load_profile(name)


def test_infeasible_is_a_result_not_an_error():
    result = api.simulate(H100, "llama-2-13b", "gpu_only", context="1M", gen=4)
    assert not result.feasible and "hbm short by" in result.reason
    assert result.to_frame().loc[0, "feasible"] == False  # noqa: E712 - numpy bool


def test_listings():
    assert H100 in api.list_profiles()
    assert "llama-2-13b" in api.list_models()
    assert api.list_policies()["hybridgen"].startswith("attention logit parallelism")


STUDY = {
    "name": "api_tiny",
    "base": {"profile": H100, "model": "llama-2-7b", "workload": {"context": "8k", "gen": 4},
             "fidelity": {"decode_samples": 2, "accuracy": False}},
    "sweep": {"grid": {"policy": ["hybridgen", "flexgen"]}},
    "derived": {"speedup": {"metric": "tokens_per_s", "of": {"policy": "hybridgen"},
                            "vs": {"policy": "flexgen"}}},
}


def test_run_study_from_a_dict(tmp_path):
    frame = api.run_study(STUDY, out=tmp_path / "out", jobs=1, figures=False)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["policy"]) == ["hybridgen", "flexgen"] and "speedup" in frame.columns
    assert frame.attrs["out"] == str(tmp_path / "out")
    stored = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert stored["tokens_per_s"].tolist() == pytest.approx(frame["tokens_per_s"].tolist())
    assert STUDY["sweep"] == {"grid": {"policy": ["hybridgen", "flexgen"]}}  # not modified
    again = api.run_study(STUDY, out=tmp_path / "out", jobs=1, figures=False)
    runs = json.loads((tmp_path / "out" / "run.json").read_text())
    assert runs[-1]["computed"] == 0 and runs[-1]["reused"] == 2
    assert again["tokens_per_s"].tolist() == frame["tokens_per_s"].tolist()


def test_run_study_from_a_file(tmp_path):
    import yaml

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    frame = api.run_study(path, out=tmp_path / "out", jobs=1, figures=False)
    assert len(frame) == 2


def test_run_study_dict_errors_name_the_field(tmp_path):
    bad = {**STUDY, "sweep": {"grid": {"policy": ["hybridgen", "flexgn"]}}}
    with pytest.raises(ConfigError, match=r"^<study>: sweep\[0\].grid.policy\[1\]: unknown policy "
                                          r"'flexgn' \(did you mean 'flexgen'\?\)"):
        api.run_study(bad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from hgsim.study import load_study_data

    with pytest.raises(ConfigError, match="a study is a mapping"):
        load_study_data(["not", "a", "mapping"])


def test_notebook_example_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "notebook_api.py")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "slow CXL" in result.stdout and "study outputs in results/notebook_api" in result.stdout
    assert (tmp_path / "results" / "notebook_api" / "results.parquet").is_file()

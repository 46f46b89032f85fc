"""A ``serving.<field>`` axis holds each value once, in the field's type: spellings of one value
(``4k``, ``4096``, ``4K``; ``2``, ``'2'``, ``2.0``) are refused as repeats, and what is stored
is the normalised value (counts as ints), never the text as written."""

from __future__ import annotations

import pytest
from test_serving_study import PLAIN
from test_study_common import write_study

from hgsim.cli import main
from hgsim.study import RunOptions, load_study, run_study
from hgsim.study.execute import ExecOptions

AXES = "- grid:\n      serving.seed: [3, 4]\n      workload.kv_dtype: [fp16, fp8]"
assert AXES in PLAIN


def _study(tmp_path, axes: str) -> str:
    text = PLAIN.replace(AXES, "- grid:\n" + axes)
    return text[:text.index("plots:")]


@pytest.mark.parametrize("axis, values, shown", [
    ("serving.prompt", "[4k, 4096, 4K]", "(4k)"),
    ("serving.prompt", "[uniform:2k:4k, 'uniform:2048:4096']", "(uniform:2k:4k)"),
    ("serving.output", "[8, '8']", "(8)"),
    ("serving.turns", "[2, '2']", "(2)"),
    ("serving.max_batch", "[4, 4.0]", "(4)"),
    ("serving.requests", "[24, '24']", "(24)"),
    ("serving.rate_per_s", "[2, 2.0]", "(2)"),
])
def test_spellings_of_one_value_are_a_repeat(tmp_path, capsys, axis, values, shown):
    text = _study(tmp_path, f"      {axis}: {values}")
    out = tmp_path / "out"
    code = main(["study", str(write_study(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"sweep[0].grid.{axis}[1]: repeats [0] {shown}" in err, err
    assert not out.exists()


def test_a_repeat_across_two_axes_is_refused_before_any_point_runs(tmp_path, capsys):
    """Six points of one configuration were run and written as six identical rows."""
    text = _study(tmp_path, "      serving.prompt: [4k, 4096]\n      serving.seed: [3, '3']")
    code = main(["study", str(write_study(tmp_path, text)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "serving.prompt[1]: repeats [0] (4k)" in err, err


def test_an_axis_stores_its_values_in_the_fields_type(tmp_path):
    text = _study(tmp_path, "      serving.turns: [2, '3', 4.0]\n"
                            "      serving.prompt: [4096, 8k, uniform:2048:4k]\n"
                            "      serving.think_s: [1, 2.5]")
    plan = load_study(write_study(tmp_path, text))
    coords = [p.coords for p in plan.expansion.points]
    turns = [c["serving.turns"] for c in coords]
    assert set(turns) == {2, 3, 4} and all(type(t) is int for t in turns)
    assert [p.spec.serving.turns for p in plan.expansion.points] == turns
    # lengths as the row's own ``prompt`` column writes them
    assert {c["serving.prompt"] for c in coords} == {"4k", "8k", "uniform:2k:4k"}
    assert {c["serving.think_s"] for c in coords} == {1.0, 2.5}
    assert all(type(c["serving.think_s"]) is float for c in coords)
    assert plan.expansion.axis_values["serving.turns"] == [2, 3, 4]
    assert len(coords) == 18 and len({p.spec.key for p in plan.expansion.points}) == 18


def test_a_filter_matches_the_normalised_values(tmp_path):
    text = _study(tmp_path, "      serving.prompt: [4k, 8192]\n      serving.turns: [2, 3]"
                  ) + ("plots:\n  r: {kind: bar, x: serving.turns, y: ttft_mean_s, "
                       "where: {serving.prompt: 4096, serving.turns: ['2', 3.0]}}\n")
    plan = load_study(write_study(tmp_path, text))
    assert plan.expansion.axis_values["serving.prompt"] == ["4k", "8k"]


def test_a_find_rate_axis_ranks_each_kind_of_point_by_its_own_metric(tmp_path):
    """Fixed-rate points read "none feasible" under a max_rate_per_s ranking they never had."""
    text = ("name: fr\nbase: {profile: h100-80gb-spr-cxl, model: llama-3.1-8b}\n"
            "serving: {rate_per_s: 2, requests: 6, prompt: 2k, output: 8, max_batch: 8,\n"
            "          slo: {ttft_s: 0.5, tpot_ms: 20, attainment: 0.9}}\n"
            "sweep:\n  - grid: {serving.find_rate: [false, true], policy: [gpu_only, "
            "hybridgen]}\n")
    run = run_study(write_study(tmp_path, text), RunOptions(
        out=tmp_path / "out", quiet=True, figures=False, execution=ExecOptions(jobs=1)))
    assert run.ok, run.stats.errors
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Best policy per point at the fixed rate (by slo_attainment)" in report
    assert "## Best policy per point at the highest rate meeting the SLO (by max_rate_per_s)" \
        in report
    assert "none feasible" not in report and "no policy feasible" not in report
    assert "by output_tokens_per_s" not in report

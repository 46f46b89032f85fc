"""A finished study leaves data, figures, a report and a resolved study that reruns to the same
points; the Dask executor gives the same table as the local process pool."""

from __future__ import annotations

import pandas as pd
import pytest
from test_study_common import REPO, TINY, write_study

from hgsim.cli import main
from hgsim.study import RunOptions, load_study, run_study
from hgsim.study.load import resolved_yaml

# A policy fixed in base: no policy axis, so the default best-by axis is not swept.
FIXED_POLICY = """\
name: fixed
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  policy: hgca
  workload: {batch: 2, context: 32k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep: {grid: {hardware.tiers.cxl0.latency_ns: [150, 400]}}
"""
SIMULATION_STUDIES = sorted(p.name for p in (REPO / "studies").glob("*.yaml")
                            if not p.name.startswith("validation"))  # validation: hgsim validate


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "out"
    code = main(["study", str(write_study(tmp)), "--out", str(out), "--jobs", "2", "--quiet"])
    assert code == 0
    return out


def test_outputs_exist(finished):
    for name in ("results.parquet", "results.csv", "report.md", "study.resolved.yaml",
                 "figures/tput.png", "figures/tput.svg", "figures/heat.png", "figures/heat.svg"):
        path = finished / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert len(list((finished / "points").glob("*.json"))) == 6


def test_table_has_axes_metrics_and_derived(finished):
    frame = pd.read_parquet(finished / "results.parquet")
    csv = pd.read_csv(finished / "results.csv")
    assert len(frame) == len(csv) == 6
    assert list(frame.columns[:2]) == ["workload.context", "policy"]
    for column in ("tokens_per_s", "latency_p99_ms", "feasible", "reason", "point",
                   "speedup_vs_flexgen", "speedup_vs_cpu_offload"):
        assert column in frame
    hyb = frame[frame.policy == "hybridgen"].set_index("workload.context")
    flex = frame[frame.policy == "flexgen"].set_index("workload.context")
    assert (hyb["speedup_vs_flexgen"] == hyb["tokens_per_s"] / flex["tokens_per_s"]).all()


def test_report_has_key_tables(finished):
    report = (finished / "report.md").read_text()
    for heading in ("## Configuration", "## Best policy per point", "## Derived metrics",
                    "## Infeasible points", "![tput](figures/tput.png)"):
        assert heading in report, heading
    assert "| speedup | flexgen |" in report
    assert "## Accuracy model" not in report  # the study sets no attention shape


def test_resolved_study_reruns_to_the_same_points(finished, tmp_path):
    resolved = finished / "study.resolved.yaml"
    original = {s.key for s in load_study(resolved).expansion.unique_specs()}
    stored = {p.stem for p in (finished / "points").glob("*.json")}
    assert original == stored


def test_a_rerun_removes_the_figures_it_did_not_draw(finished, tmp_path, capsys):
    """A rerun with --no-figures (all its points reused) left the earlier run's figures beside
    its new tables, where they passed for this run's; a user's other files stay."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "figures" / "notes.txt").write_text("mine")
    study = write_study(tmp_path)
    assert main(["study", str(study), "--out", str(out), "--no-figures"]) == 0
    assert [p.name for p in (out / "figures").iterdir()] == ["notes.txt"]
    assert f"removed 4 figure file(s) of an earlier run that this run did not draw from " \
           f"{out / 'figures'}" in capsys.readouterr().err


def _points(plan) -> list[tuple[str, str]]:
    return [(repr(p.coords), p.spec.key) for p in plan.expansion.points]  # repr: NaN == NaN


@pytest.mark.parametrize("text", [TINY, FIXED_POLICY], ids=["policy swept", "policy fixed"])
def test_a_resolved_study_loads_back_to_the_same_points(tmp_path, text):
    """The resolved file is what the loader accepts: written defaults (best_by) must not
    become explicit settings that fail validation or change the expansion."""
    plan = load_study(write_study(tmp_path, text))
    again = load_study(write_study(tmp_path, resolved_yaml(plan), name="study.resolved.yaml"))
    assert _points(again) == _points(plan)
    assert again.columns == plan.columns
    assert again.study.report == plan.study.report


@pytest.mark.parametrize("name", SIMULATION_STUDIES)
def test_every_shipped_study_resolves_to_a_file_that_reruns_it(tmp_path, name):
    plan = load_study(REPO / "studies" / name)
    again = load_study(write_study(tmp_path, resolved_yaml(plan), name="study.resolved.yaml"))
    assert _points(again) == _points(plan)
    assert again.columns == plan.columns


def test_dask_local_cluster_matches_process_pool(finished, tmp_path):
    distributed = pytest.importorskip("distributed")
    study = write_study(tmp_path)
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster:
        options = RunOptions(out=out, quiet=True, figures=False)
        options.execution.executor = "dask"
        options.execution.scheduler = cluster.scheduler_address
        options.execution.chunk = 2
        run = run_study(study, options)
    assert run.ok and run.stats.computed == 6
    volatile = ["wall_s", "events"]  # events: simpy bookkeeping, not a result
    local = pd.read_parquet(finished / "results.parquet").drop(columns=volatile)
    remote = pd.read_parquet(out / "results.parquet").drop(columns=volatile)
    pd.testing.assert_frame_equal(local, remote)


def test_dask_without_scheduler_is_a_user_error(tmp_path, capsys):
    code = main(["study", str(write_study(tmp_path)), "--out", str(tmp_path / "o"),
                 "--executor", "dask"])
    assert code == 2
    assert "--scheduler" in capsys.readouterr().err


def test_a_study_whose_every_point_is_infeasible_still_reports(tmp_path, capsys):
    """Infeasible rows carry no metrics; with no feasible row at all, the table once lacked
    tokens_per_s and the derived metric, answer and line plot raised KeyError (traceback)."""
    study = write_study(tmp_path, """\
name: nowhere
base:
  profile: dev-zen4-2core
  model: opt-6.7b
  workload: {batch: 1, context: 200k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  grid:
    policy: [flexgen, hybridgen]
derived:
  speedup: {metric: tokens_per_s, of: {policy: hybridgen}, vs: {policy: flexgen}}
plots:
  tput: {kind: line, x: policy, y: tokens_per_s, hue: policy}
answer: {question: Which policy is fastest, choose: policy, metric: tokens_per_s}
""")
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--jobs", "1", "--quiet"]) == 0, \
        capsys.readouterr().err
    frame = pd.read_parquet(out / "results.parquet")
    assert not frame["feasible"].any()
    assert frame[["tokens_per_s", "latency_p99_ms", "speedup"]].isna().all().all()
    assert (out / "figures" / "tput.png").is_file()
    assert "- no choice is feasible (tokens_per_s)" in (out / "report.md").read_text()


def _normalised_svg(path) -> str:
    """SVG text without its date line, element ids numbered in order of appearance:
    matplotlib salts each id with a fresh uuid per save (rcParams svg.hashsalt unset), so two
    saves of one figure differ there and nowhere else."""
    import re

    ids: dict[str, str] = {}
    text = "\n".join(line for line in path.read_text().splitlines() if "<dc:date>" not in line)
    return re.sub(r"\b([A-Za-z]+)([0-9a-f]{10})\b",
                  lambda m: ids.setdefault(m.group(0), f"{m.group(1)}#{len(ids)}"), text)


def test_figures_drawn_in_a_pool_equal_those_drawn_in_process(finished, tmp_path):
    import numpy as np
    from matplotlib.image import imread

    from hgsim.study.plots import draw_all
    from hgsim.study.run import figure_args

    plan = load_study(finished / "study.resolved.yaml")
    frame = pd.read_parquet(finished / "results.parquet")
    drawn = {}
    for jobs in (1, 2):
        files, errors = draw_all(*figure_args(plan, frame, tmp_path / f"jobs{jobs}"), jobs=jobs)
        assert errors == {}
        drawn[jobs] = files
    names = [p.name for p in drawn[1]]
    assert names == [p.name for p in drawn[2]] == ["tput.png", "tput.svg", "heat.png",
                                                   "heat.svg"]
    for serial, pooled in zip(drawn[1], drawn[2], strict=True):
        if serial.suffix == ".svg":
            assert _normalised_svg(serial) == _normalised_svg(pooled), serial.name
        else:
            assert np.array_equal(imread(serial), imread(pooled)), serial.name


def test_a_figure_failing_in_the_pool_is_reported_and_leaves_no_file(finished, tmp_path):
    from hgsim.study.plots import draw_all
    from hgsim.study.run import figure_args
    from hgsim.study.schema import PlotSpec

    plan = load_study(finished / "study.resolved.yaml")
    frame = pd.read_parquet(finished / "results.parquet")
    frame_, plots, *rest = figure_args(plan, frame, tmp_path)
    plots = {**plots, "bad": PlotSpec(kind="line", x="workload.context", y="no_such_metric")}
    (tmp_path / "bad.png").write_bytes(b"an earlier run's figure")
    files, errors = draw_all(frame_, plots, *rest, jobs=2)
    assert list(errors) == ["bad"] and "no_such_metric" in errors["bad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)
    assert len(files) == 4


def test_a_figure_worker_that_dies_fails_its_figures_and_leaves_no_part_of_them(
        finished, tmp_path, monkeypatch):
    """A worker ended midway (killed, out of memory) leaves its written_whole temporary;
    the figures the broken pool did not finish are reported and none of their files stay."""
    import multiprocessing
    import os

    from hgsim.study import plots
    from hgsim.study.run import figure_args

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("the dying draw is patched in this process; only fork workers inherit it")
    monkeypatch.setattr(plots, "process_context", lambda: multiprocessing.get_context("fork"))
    real = plots.draw

    def dying(frame, name, spec, axis_values, out, *rest):
        if name == "heat":
            (out / f".heat.png.{os.getpid()}.tmp").write_bytes(b"half a figure")
            os._exit(1)
        return real(frame, name, spec, axis_values, out, *rest)

    monkeypatch.setattr(plots, "draw", dying)
    plan = load_study(finished / "study.resolved.yaml")
    frame = pd.read_parquet(finished / "results.parquet")
    (tmp_path / "heat.svg").write_text("an earlier run's figure")
    files, errors = plots.draw_all(*figure_args(plan, frame, tmp_path), jobs=2)
    assert "heat" in errors and "BrokenProcessPool" in errors["heat"]
    assert set(errors) | {p.stem for p in files} == {"tput", "heat"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)


@pytest.mark.parametrize("size, message", [
    ("height: 1e5", "plots.tput.height: input should be less than or equal to 50"),
    ("height: 10, aspect: 6", "plots.tput: aspect: panels 10 inches high and 6 times as wide "
                              "are 60 inches wide, over 50"),
])
def test_a_figure_too_large_to_draw_is_refused_before_the_run(tmp_path, capsys, size, message):
    # height 1e5 ran every point, then failed the figure on matplotlib's size limit (exit 1,
    # a "figure failed: ValueError" line); now a one-line error at the plot's line, exit 2
    _refused_before_the_run(tmp_path, capsys, "hue: policy, logx: true}",
                            f"hue: policy, logx: true, {size}}}", f"17: {message}")


@pytest.mark.parametrize("fmt", ["zz%", "{:.2f}"])
def test_a_heatmap_format_python_cannot_write_is_refused_before_the_run(tmp_path, capsys, fmt):
    # ran every point, then "figure heat failed: ValueError: Invalid format specifier" (exit 1)
    _refused_before_the_run(tmp_path, capsys, "value: tokens_per_s}",
                            f"value: tokens_per_s, fmt: '{fmt}'}}",
                            f"18: plots.heat: fmt: '{fmt}' is not a number format such as .2f")


@pytest.mark.parametrize("axes, message", [
    ("x: workload.context, y: workload.context, value: tokens_per_s",
     "y: a heatmap's x, y and value are three different columns"),
    ("x: workload.context, y: policy, value: workload.context",
     "value: a heatmap's x, y and value are three different columns"),
])
def test_a_heatmap_of_one_column_twice_is_refused_before_the_run(tmp_path, capsys, axes,
                                                                 message):
    # ran every point, then "figure heat failed: ValueError: Grouper for 'workload.context'
    # not 1-dimensional" (exit 1)
    _refused_before_the_run(tmp_path, capsys,
                            "x: workload.context, y: policy, value: tokens_per_s", axes,
                            f"18: plots.heat: {message}")


def _refused_before_the_run(tmp_path, capsys, old, new, message):
    """TINY with ``old`` replaced by ``new`` is a one-line error ending ``message`` (after
    the file's name and ``:``), exit 2, and writes no output folder."""
    assert old in TINY
    study = write_study(tmp_path, TINY.replace(old, new))
    out = tmp_path / "out"
    code = main(["study", str(study), "--out", str(out), "--jobs", "1", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{study}:{message}" in err, err
    assert not out.exists()

"""A study folder is always either one complete, consistent run or clearly incomplete: a run of
a changed study removes the old study's tables, figures and report before it starts (so Ctrl-C
cannot leave them beside the new study.resolved.yaml), and temporaries of writers killed
mid-write are removed on the next run, those of live writers kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from test_study_common import TINY, write_study

import hgsim.study.run as study_run
from hgsim.study import RunOptions, load_study, run_study

# the tiny study with other contexts and without its heatmap
CHANGED = TINY.replace("[32k, 64k]", "[16k, 48k]").split("  heat:")[0]
STUDY_LEVEL = ("results.parquet", "results.csv", "report.md")


def options(out, figures=True) -> RunOptions:
    opts = RunOptions(out=out, quiet=True, figures=figures)
    opts.execution.jobs = 1
    return opts


def interrupted(monkeypatch, study, out, figures=True) -> None:
    """Runs ``study`` as if Ctrl-C came once its first point is stored."""
    real = study_run.execute

    def ctrl_c(todo, store, execution):
        real(todo[:1], store, execution)
        raise KeyboardInterrupt

    monkeypatch.setattr(study_run, "execute", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, options(out, figures))
    monkeypatch.undo()


def history(out) -> list[dict]:
    return json.loads((out / "run.json").read_text())


def test_ctrl_c_in_a_changed_study_leaves_no_results_of_the_old_one(tmp_path, monkeypatch):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out)).ok
    assert (out / "figures" / "heat.png").is_file()
    study.write_text(CHANGED)

    interrupted(monkeypatch, study, out)
    assert "16k" in (out / "study.resolved.yaml").read_text()
    assert [p.name for p in out.iterdir() if p.name in STUDY_LEVEL] == []
    assert list((out / "figures").iterdir()) == []
    assert history(out)[-1]["status"] == "incomplete"
    assert len(list((out / "points").glob("*.json"))) == 6 + 1  # no point is lost

    run = run_study(study, options(out))
    assert run.ok and run.stats.computed == 5
    frame = pd.read_parquet(out / "results.parquet")
    assert sorted(frame["workload.context"].unique()) == [16 * 1024, 48 * 1024]
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["tput.png", "tput.svg"]
    assert [e["status"] for e in history(out)] == ["complete", "incomplete", "complete"]


def test_a_changed_study_run_without_figures_drops_the_old_figures(tmp_path):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out)).ok
    study.write_text(CHANGED)
    assert run_study(study, options(out, figures=False)).ok
    assert list((out / "figures").iterdir()) == []
    assert "![tput]" not in (out / "report.md").read_text()


def test_ctrl_c_in_the_same_study_keeps_its_last_complete_results(tmp_path, monkeypatch):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out, figures=False)).ok
    before = {name: (out / name).read_bytes() for name in STUDY_LEVEL}
    interrupted(monkeypatch, study, out, figures=False)  # e.g. a --force rerun, cut short
    assert {name: (out / name).read_bytes() for name in STUDY_LEVEL} == before
    keys = {s.key for s in load_study(out / "study.resolved.yaml").expansion.unique_specs()}
    assert set(pd.read_parquet(out / "results.parquet")["point"]) == keys
    assert history(out)[-1]["status"] == "incomplete"


def test_temporaries_of_killed_writers_are_removed_those_of_live_ones_kept(tmp_path):
    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out, figures=False)).ok
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead, live = int(gone.stdout), os.getppid()
    key = sorted((out / "points").glob("*.json"))[0].stem
    left = {
        "dead": [out / f".report.md.{dead}.tmp", out / "figures" / f".tput.png.{dead}.tmp",
                 out / "points" / f".{key}.json.{dead}.tmp"],
        "live": [out / f".results.csv.{live}.tmp", out / "figures" / f".heat.svg.{live}.tmp",
                 out / "points" / f".{key}.json.{live}.tmp"],
    }
    (out / "figures").mkdir(exist_ok=True)
    for path in left["dead"] + left["live"]:
        path.write_text("half a file")
    assert run_study(study, options(out, figures=False)).ok
    assert [p for p in left["dead"] if p.exists()] == []
    assert all(p.read_text() == "half a file" for p in left["live"])


def test_a_figure_that_fails_leaves_no_earlier_figure_of_its_name(tmp_path, monkeypatch):
    import hgsim.study.plots as plots

    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out)).ok
    real = plots.draw

    def heat_fails(frame, name, spec, axis_values, folder, *rest):
        if name == "heat":
            raise ValueError("no colours left")
        return real(frame, name, spec, axis_values, folder, *rest)

    monkeypatch.setattr(plots, "draw", heat_fails)
    run = run_study(study, options(out))
    assert run.figure_errors == {"heat": "ValueError: no colours left"}
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["tput.png", "tput.svg"]


def test_ctrl_c_while_outputs_are_rebuilt_leaves_no_earlier_report(tmp_path, monkeypatch):
    """The earlier report says how many points failed; beside tables rebuilt with those points
    computed it would be wrong, so it goes before the tables are rewritten."""
    study = write_study(tmp_path)
    out = tmp_path / "out"
    assert run_study(study, options(out)).ok

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_run, "draw_all", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, options(out))
    assert not (out / "report.md").exists()
    assert history(out)[-1]["status"] == "incomplete"

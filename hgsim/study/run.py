"""A study from file to report: validate, compute the missing points, write every output.

The order matters for the "results that survive" promise: everything is validated before the
output folder is created; points are stored one by one as they finish; tables, figures and
the report are rebuilt from all stored points at the end, so a run after an interruption
produces exactly what an uninterrupted run would have. Until that end, the folder holds the
outputs of the last complete run only when it was a run of this same study (``folder``), and
``run.json``'s last entry says "incomplete".
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hgsim.errors import UserError
from hgsim.outputs import remove_earlier, written_whole
from hgsim.study import sensitivity as sens
from hgsim.study.derived import compute_derived, ratio_columns
from hgsim.study.execute import ExecOptions, ExecStats, default_jobs, execute
from hgsim.study.folder import (
    check_study_folder,
    read_run_log,
    stale_outputs,
    study_fingerprint,
)
from hgsim.study.frame import assemble, write_tables
from hgsim.study.load import StudyPlan, load_study, resolved_yaml
from hgsim.study.plots import FORMATS, draw_all, draw_elasticity
from hgsim.study.report import RunInfo, write_report
from hgsim.study.store import PointStore
from hgsim.study.validate import produced_columns


@dataclass
class RunOptions:
    out: Path | None = None  # default: results/<study name>
    force: bool = False  # recompute points that are already stored
    figures: bool = True
    quiet: bool = False
    dry_run: bool = False
    execution: ExecOptions = field(default_factory=ExecOptions)


@dataclass
class StudyRun:
    plan: StudyPlan
    out: Path
    total: int  # distinct points (configurations)
    todo: int
    stats: ExecStats
    frame: pd.DataFrame | None = None
    outputs: list[Path] = field(default_factory=list)
    figure_errors: dict[str, str] = field(default_factory=dict)
    #: figures an earlier run drew that this one did not, removed (outputs.remove_earlier)
    removed: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.stats.errors and not self.figure_errors


def run_study(study: str | Path | StudyPlan, options: RunOptions | None = None) -> StudyRun:
    """Run a study file, or a plan already loaded (``load_study_data`` for a dict)."""
    options = options or RunOptions()
    t0 = time.perf_counter()
    # a file raises ConfigError (one line) here, before anything is written
    plan = study if isinstance(study, StudyPlan) else load_study(study)
    out = options.out or Path("results") / plan.study.name
    store = PointStore(out / "points")
    specs = plan.expansion.unique_specs()
    check_study_folder(out)  # so does an output folder that cannot take the results
    stored = set() if options.force else set(store.load([s.key for s in specs]))
    todo = [s for s in specs if s.key not in stored]
    say = _Say(options.quiet)
    say(f"study {plan.study.name}: {len(plan.expansion.points)} points, {len(specs)} distinct "
        f"configurations, {len(specs) - len(todo)} stored, {len(todo)} to compute -> {out}")
    run = StudyRun(plan, out, len(specs), len(todo), ExecStats())
    if options.dry_run:
        return run

    created = _first_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = study_fingerprint(plan.study.model_dump(mode="json"), [s.key for s in specs])
    stale = stale_outputs(out, fingerprint)  # judged by the last run recorded, so first
    started = _start_run_log(out, fingerprint)  # from here on, an interruption reads "incomplete"
    for path in stale:  # before the new study.resolved.yaml lands beside them
        path.unlink(missing_ok=True)
    with written_whole(out / "study.resolved.yaml") as fh:
        fh.write(resolved_yaml(plan))
    try:
        run.stats = execute(todo, store, options.execution)
    except UserError:  # e.g. no Dask scheduler at --scheduler: nothing computed, nothing left
        _remove_if_untouched(created, {out / "study.resolved.yaml", out / "run.json"})
        raise
    except KeyboardInterrupt:
        done = len(store.load([s.key for s in specs]))
        print(f"hgsim study: interrupted; {done} of {len(specs)} points are stored in "
              f"{store.dir}; run the same command again to compute the rest", file=sys.stderr)
        raise
    store.clean_temporary()
    records = store.load([s.key for s in specs])
    frame = assemble(plan.expansion, records, produced_columns(plan.study, plan.expansion))
    if plan.study.derived and len(frame):
        frame = compute_derived(frame, plan.study.derived, plan.expansion.axes,
                                plan.study.zipped())
    run.frame = frame
    # the report is written last: without it, a folder cut short while its tables and figures
    # are rewritten reads as unfinished, not as an earlier report beside newer tables
    (out / "report.md").unlink(missing_ok=True)
    run.outputs += write_tables(frame, out)
    elasticity = pd.DataFrame()
    if plan.study.sensitivity is not None and len(frame):
        elasticity = sens.elasticities(frame, plan.expansion.axes, plan.study.sensitivity.metric)
        run.outputs += _write_csv(elasticity, out / "elasticity.csv")
    figures: list[Path] = []
    if options.figures and plan.study.plots and len(frame):
        figures, run.figure_errors = draw_all(*figure_args(plan, frame, out / "figures"),
                                              jobs=_figure_jobs(options.execution))
    if options.figures and len(elasticity):
        heat, errors = draw_elasticity(elasticity, plan.expansion, plan.study.sensitivity,
                                       out / "figures")
        figures += heat
        run.figure_errors.update(errors)
    run.outputs += figures
    # an earlier run's figure that this one did not draw (--no-figures, no rows, a plot since
    # taken out of the study) would pass for this run's beside its tables
    run.removed = remove_earlier(_figure_files(out / "figures"), figures)
    info = RunInfo(
        source=str(plan.source), total=len(specs), computed=run.stats.computed,
        reused=len(specs) - len(todo), missing=len(specs) - len(records),
        errors=run.stats.errors, figures=figures, figure_errors=run.figure_errors,
        elapsed_s=time.perf_counter() - t0,
    )
    run.outputs.append(write_report(out / "report.md", plan.study, frame,
                                    plan.expansion.axes, info, elasticity))
    _write_run_log(out, info, run, started)
    for error in run.stats.errors[:3]:
        print(f"hgsim study: point {error['key']} failed: {error['error']}", file=sys.stderr)
    for name, error in run.figure_errors.items():
        print(f"hgsim study: figure {name} failed: {error}", file=sys.stderr)
    say(f"done in {info.elapsed_s:.1f} s: {info.computed} computed, {info.reused} reused, "
        f"{len(run.stats.errors)} failed; report: {out / 'report.md'}")
    if run.removed:
        say(f"removed {len(run.removed)} figure file(s) of an earlier run that this run did not "
            f"draw from {out / 'figures'}")
    return run


def figure_args(plan: StudyPlan, frame: pd.DataFrame, folder: Path) -> tuple:
    """``draw_all``'s arguments for a study's plots from its results table (with derived
    columns): what a run draws, so benchmarks and tests can redraw a finished run's figures."""
    return (sens.base_rows(frame), plan.study.plots, plan.expansion.axis_values, folder,
            ratio_columns(plan.study.derived), plan.study.zipped(), plan.study.derived)


def _figure_jobs(execution: ExecOptions) -> int:
    """Processes drawing figures: as many as the study's local workers (``--jobs``, else
    every core of this machine, where a Dask study's figures are drawn too)."""
    return execution.jobs or default_jobs()


def _figure_files(folder: Path) -> list[Path]:
    """The figure files (plots.FORMATS) in ``folder``."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.suffix[1:] in FORMATS and p.is_file()]


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (None: ``path`` exists)."""
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def _remove_if_untouched(created: Path | None, own: set[Path]) -> None:
    """Removes the folders this run created when they hold nothing but its ``own`` files."""
    if created is None:
        return
    files = [p for p in created.rglob("*") if not p.is_dir()]
    if set(files) <= own:
        for path in files:
            path.unlink()
        for folder in sorted((p for p in created.rglob("*") if p.is_dir()),
                             key=lambda p: -len(p.parts)):
            folder.rmdir()
        created.rmdir()


def _write_csv(frame: pd.DataFrame, path: Path) -> list[Path]:
    with written_whole(path, newline="") as fh:
        frame.to_csv(fh, index=False)
    return [path]


def _start_run_log(out: Path, fingerprint: str) -> dict[str, Any]:
    """Appends this run to ``run.json`` as "incomplete": what an interrupted run leaves, so
    the folder says its tables and report (if any) are not this run's."""
    entry: dict[str, Any] = {"time": time.time(), "status": "incomplete",
                             "fingerprint": fingerprint}
    _save_run_log(out, read_run_log(out) + [entry])
    return entry


def _write_run_log(out: Path, info: RunInfo, run: StudyRun, started: dict[str, Any]) -> None:
    """``run.json``: counts of this run (tests and scripts read it; appended history), in
    place of the "incomplete" entry it started with."""
    entry: dict[str, Any] = {
        "time": started["time"], "status": "complete", "fingerprint": started["fingerprint"],
        "total": info.total, "computed": info.computed, "reused": info.reused,
        "missing": info.missing, "failed": len(info.errors),
        "elapsed_s": round(info.elapsed_s, 3),
    }
    history = [e for e in read_run_log(out) if e != started]
    _save_run_log(out, history + [entry])


def _save_run_log(out: Path, history: list[dict[str, Any]]) -> None:
    with written_whole(out / "run.json") as fh:
        fh.write(json.dumps(history, indent=1))


class _Say:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr)

"""``hgsim study FILE.yaml``: run a parameter study and write data, figures and a report.

Interrupting is safe: every finished point is stored, and running the same command again
computes only the missing ones (``--force`` recomputes everything).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hgsim.commands.checks import local_workers
from hgsim.errors import UserError
from hgsim.outputs import check_usable_name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study",
        help="run a YAML parameter study (sweeps, derived metrics, figures, report)",
        description=(
            "Run the study in FILE: every combination of its sweep axes is simulated (or "
            "capacity-searched), stored per point under OUT/points, and summarised as "
            "OUT/results.parquet, results.csv, figures/*.png|svg, report.md and "
            "study.resolved.yaml. Re-running resumes: stored points are reused."
        ),
    )
    parser.add_argument("file", metavar="FILE", help="study YAML (see studies/)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default results/<name>)")
    parser.add_argument("--jobs", "-j", type=int, metavar="N",
                        help="local worker processes, for points and figures "
                             "(default: all cores; 1 = in-process)")
    parser.add_argument("--executor", choices=["local", "dask"], default="local",
                        help="where points run (default local process pool)")
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="Dask scheduler address, e.g. tcp://10.0.0.5:8786")
    parser.add_argument("--scheduler-file", metavar="PATH",
                        help="Dask scheduler file (dask-jobqueue / dask-mpi deployments)")
    parser.add_argument("--chunk", type=int, metavar="N",
                        help="points per task (default: automatic, at most 16)")
    parser.add_argument("--force", action="store_true", help="recompute stored points")
    parser.add_argument("--no-figures", action="store_true", help="skip drawing figures")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate and count points (stored / to compute); write nothing")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bar or summary lines (errors still print)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hgsim.study import RunOptions, run_study
    from hgsim.study.execute import ExecOptions
    from hgsim.study.load import load_study

    if args.jobs is not None and args.jobs < 1:
        raise UserError("must be >= 1", field="--jobs")
    if args.chunk is not None and args.chunk < 1:
        raise UserError("must be >= 1", field="--chunk")
    if args.executor == "local" and (args.scheduler or args.scheduler_file):
        raise UserError("--scheduler/--scheduler-file need --executor dask")
    if args.out is not None and not args.out.strip():
        raise UserError("is empty; give a folder (or leave --out out for results/<name>)",
                        field="--out")
    if args.executor == "dask":  # before run_study writes anything
        _check_dask(args.scheduler, args.scheduler_file)
    plan = load_study(args.file)  # a mistake in it is the one line printed, before any warning
    jobs = local_workers(args.jobs, "--jobs", "study") if args.executor == "local" else args.jobs
    options = RunOptions(
        out=Path(args.out) if args.out else None, force=args.force,
        figures=not args.no_figures, quiet=args.quiet, dry_run=args.dry_run,
        execution=ExecOptions(
            executor=args.executor, jobs=jobs, scheduler=args.scheduler,
            scheduler_file=args.scheduler_file, chunk=args.chunk, progress=not args.quiet,
        ),
    )
    result = run_study(plan, options)
    return 0 if result.ok else 1


#: How long ``--scheduler-file`` may take to appear (a scheduler that is starting writes it);
#: the Dask client itself would wait for ever.
SCHEDULER_FILE_WAIT_S = 20.0


def _check_dask(scheduler: str | None, scheduler_file: str | None) -> None:
    """One way to reach the scheduler, and its file there (or appearing soon)."""
    import time

    if scheduler is not None and not scheduler.strip():
        raise UserError("is empty; give the scheduler's address, e.g. tcp://10.0.0.5:8786",
                        field="--scheduler")
    if scheduler_file is None:
        if not scheduler:
            raise UserError("--executor dask needs --scheduler ADDRESS or --scheduler-file PATH")
        return
    check_usable_name(scheduler_file, "--scheduler-file")
    path = Path(scheduler_file)
    if not scheduler_file.strip() or path.is_dir():
        raise UserError(f"{scheduler_file!r} is a folder or empty; give the scheduler's JSON "
                        "file", field="--scheduler-file")
    if not path.parent.is_dir():
        raise UserError(f"folder {path.parent} does not exist", field="--scheduler-file")
    deadline = time.monotonic() + SCHEDULER_FILE_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise UserError(f"{path} did not appear within {SCHEDULER_FILE_WAIT_S:g} s (the "
                            "Dask scheduler writes it when it starts: start it first)",
                            field="--scheduler-file")
        time.sleep(0.1)

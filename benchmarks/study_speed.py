"""What the study machinery costs on top of the simulations it runs.

Reports, for the shipped studies:
  expand    validating and expanding the file into resolved, hashed points (points/s)
  store     writing and re-reading per-point JSON records (records/s)
  dispatch  the local pool's per-point overhead: a capacity study (each point ~1-25 ms of
            work) run with --jobs 1 (in process) and with all cores, against the in-process
            cost of the same points
  outputs   tables, derived metrics, figures and report from stored points (--no compute)
  figures   the figure phase alone of a finished run, drawn in process (jobs 1) and on a
            pool of all cores, alternating, median of ``--repeat`` each, and whether the
            files are the same (PNG pixels; SVG text but the date and uuid-salted ids)

Usage: python benchmarks/study_speed.py
       python benchmarks/study_speed.py figures OUT [--repeat 3]
           (OUT: a finished run's folder, e.g. after
            python -m hgsim study studies/cxl_sweep.yaml --out /tmp/cxl --no-figures)
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hgsim.study import RunOptions, load_study, run_study  # noqa: E402
from hgsim.study.execute import default_jobs  # noqa: E402
from hgsim.study.store import PointStore  # noqa: E402
from hgsim.study.worker import run_point  # noqa: E402

STUDIES = REPO / "studies"


def bench_expand() -> None:
    for name in ("cxl_sweep", "paper_reproduction", "capacity", "scheduler_ablation"):
        t0 = time.perf_counter()
        plan = load_study(STUDIES / f"{name}.yaml")
        wall = time.perf_counter() - t0
        n = len(plan.expansion.points)
        print(f"expand   {name:20s} {n:5d} points in {wall * 1e3:7.1f} ms "
              f"({n / wall:,.0f} points/s)")


def bench_store() -> None:
    plan = load_study(STUDIES / "capacity.yaml")
    record = run_point(plan.expansion.points[0].spec)
    with tempfile.TemporaryDirectory() as tmp:
        store = PointStore(tmp)
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            store.write({**record, "key": f"k{i:06d}"})
        write = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = store.load(store.keys())
        read = time.perf_counter() - t0
    assert len(loaded) == n
    print(f"store    {n} records: write {n / write:,.0f}/s, load {n / read:,.0f}/s")


def bench_dispatch() -> None:
    plan = load_study(STUDIES / "capacity.yaml")
    specs = plan.expansion.unique_specs()
    t0 = time.perf_counter()
    for spec in specs:
        run_point(spec)
    inline = time.perf_counter() - t0
    print(f"dispatch {len(specs)} capacity searches computed inline: {inline:.2f} s "
          f"({inline / len(specs) * 1e3:.1f} ms each)")
    for jobs in sorted({1, default_jobs()}):
        with tempfile.TemporaryDirectory() as tmp:
            options = RunOptions(out=Path(tmp), quiet=True, figures=False)
            options.execution.jobs = jobs
            t0 = time.perf_counter()
            run = run_study(STUDIES / "capacity.yaml", options)
            wall = time.perf_counter() - t0
        print(f"dispatch capacity study, --jobs {jobs}: {wall:.2f} s end to end for "
              f"{run.total} points (incl. tables and report)")


def bench_outputs() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        options = RunOptions(out=Path(tmp), quiet=True)
        run_study(STUDIES / "capacity.yaml", options)
        t0 = time.perf_counter()
        run_study(STUDIES / "capacity.yaml", options)  # all points stored: outputs only
        wall = time.perf_counter() - t0
    print(f"outputs  capacity study from stored points (tables, 1 figure, report): {wall:.2f} s")


def bench_figures(out: Path, repeat: int = 3) -> None:
    import numpy as np
    import pandas as pd
    from matplotlib.image import imread

    from hgsim.study.plots import draw_all
    from hgsim.study.run import figure_args

    plan = load_study(out / "study.resolved.yaml")
    frame = pd.read_parquet(out / "results.parquet")
    pooled_jobs = max(2, default_jobs())
    walls: dict[int, list[float]] = {1: [], pooled_jobs: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for jobs in walls:  # alternating, so drift in the machine's load hits both
                folder = Path(tmp) / f"jobs{jobs}"
                t0 = time.perf_counter()
                files, errors = draw_all(*figure_args(plan, frame, folder), jobs=jobs)
                walls[jobs].append(time.perf_counter() - t0)
                assert not errors, errors
                print(f"figures  round {i + 1} jobs {jobs}: {len(files)} files "
                      f"in {walls[jobs][-1]:.2f} s")
        serial, pooled = Path(tmp) / "jobs1", Path(tmp) / f"jobs{pooled_jobs}"
        same = 0
        for path in sorted(serial.iterdir()):
            other = pooled / path.name
            equal = (_normalised_svg(path) == _normalised_svg(other) if path.suffix == ".svg"
                     else np.array_equal(imread(path), imread(other)))
            same += equal
            if not equal:
                print(f"figures  DIFFERENT: {path.name}")
        total = len(list(serial.iterdir()))
    one, many = statistics.median(walls[1]), statistics.median(walls[pooled_jobs])
    print(f"figures  {plan.study.name}: {len(plan.study.plots)} plots; median of {repeat}: "
          f"jobs 1 {one:.2f} s, jobs {pooled_jobs} {many:.2f} s, ratio {one / many:.2f}x; "
          f"{same} of {total} files the same")


def _normalised_svg(path: Path) -> str:
    """SVG text without its date line, ids numbered in order of appearance (matplotlib
    salts each with a fresh uuid per save unless rcParams svg.hashsalt is set)."""
    ids: dict[str, str] = {}
    text = "\n".join(line for line in path.read_text().splitlines() if "<dc:date>" not in line)
    return re.sub(r"\b([A-Za-z]+)([0-9a-f]{10})\b",
                  lambda m: ids.setdefault(m.group(0), f"{m.group(1)}#{len(ids)}"), text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["figures"]:
        import argparse

        parser = argparse.ArgumentParser(prog="study_speed.py figures")
        parser.add_argument("out", type=Path)
        parser.add_argument("--repeat", type=int, default=3)
        args = parser.parse_args(sys.argv[2:])
        bench_figures(args.out, args.repeat)
        sys.exit(0)
    bench_expand()
    bench_store()
    bench_dispatch()
    bench_outputs()

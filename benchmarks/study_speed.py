"""What the study machinery costs on top of the simulations it runs.

Reports, for the shipped studies:
  expand    validating and expanding the file into resolved, hashed points (points/s)
  store     writing and re-reading per-point JSON records (records/s)
  dispatch  the local pool's per-point overhead: a capacity study (each point ~1-25 ms of
            work) run with --jobs 1 (in process) and with all cores, against the in-process
            cost of the same points
  outputs   tables, derived metrics, figures and report from stored points (--no compute)

Usage: python benchmarks/study_speed.py
"""

from __future__ import annotations

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


if __name__ == "__main__":
    bench_expand()
    bench_store()
    bench_dispatch()
    bench_outputs()

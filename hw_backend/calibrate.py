"""``hgsim calibrate``: measure this machine and write a hardware profile the simulator can load.

Runs the microbenchmarks of ``hw_backend.calibration`` (memory per NUMA node and thread count:
bandwidth, latency, memory-level parallelism, loaded latency and the core work per gathered row;
the C attention kernel; and either the CUDA device or the CPU stand-in accelerator), then writes

* ``<out>``: the profile, every figure commented "measured by hgsim calibrate on <date>: <what>";
* ``<out stem>.calibration.json``: metadata, the derived figures and every raw measurement;
* ``<out stem>.calibration.csv``: the raw measurements as one flat table.

The profile is loaded back with ``hgsim.profiles.load_profile`` before returning, so a profile
that does not validate is a bug here, never a surprise in a later study.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hgsim.errors import UserError
from hgsim.outputs import check_output_file, written_whole
from hw_backend.calibration import (
    cpu_kernel,
    cuda,
    energy_source,
    loaded,
    memory,
    mlp,
    power,
    row_cost,
    standin,
)
from hw_backend.calibration.assemble import Context, build
from hw_backend.calibration.quiet import wait_for_quiet
from hw_backend.calibration.records import Measurements
from hw_backend.calibration.settings import Job, Settings
from hw_backend.calibration.timing import STATISTICS
from hw_backend.calibration.timing import statistic as timing_statistic
from hw_backend.calibration.topology import discover


@dataclass(frozen=True)
class CalibrationResult:
    profile_path: Path
    json_path: Path
    csv_path: Path
    measurements: Measurements
    summary: dict
    used_cuda: bool
    seconds: float


def sidecar_paths(profile_path: Path) -> tuple[Path, Path]:
    """Where the raw measurements of a profile live: ``<stem>.calibration.json`` / ``.csv``."""
    stem = profile_path.with_suffix("")
    return stem.with_name(stem.name + ".calibration.json"), stem.with_name(
        stem.name + ".calibration.csv")


def calibrate(
    out: Path, *, quick: bool = False, name: str | None = None, kv_dtype: str = "fp32",
    use_cuda: bool | None = None, device_threads: int | None = None, pin: bool = True,
    quiet_wait_s: float = 0.0, progress: bool = True, statistic: str = "median",
    energy_from: str | None = None,
) -> CalibrationResult:
    """Measure, write the profile and its raw data, and check that the profile loads.

    ``use_cuda`` None means "if available". Without CUDA the stand-in accelerator gets
    ``device_threads`` cores (default: half, as ``CoreSplit.even``) and the rest are the host's.
    ``quiet_wait_s`` > 0 waits up to that long before each benchmark for other processes to stop
    (``calibration.quiet``). ``statistic`` turns each benchmark's repeats into its figure
    ("median" or "min", ``calibration.timing``). ``energy_from`` (a profile name or path)
    lends its energy and cost figures where none were measured (``calibration.energy_source``);
    package and GPU idle power are measured where RAPL / NVML answer (``calibration.power``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix not in (".yaml", ".yml") and not out.is_dir():
        raise UserError(f"{out}: a profile must end in .yaml or .yml", field="--out")
    check_output_file(out, "--out")  # first: a folder ('', '.') has no sidecar names
    for path in sidecar_paths(out):  # before measuring: minutes of it otherwise lost
        check_output_file(path, "--out")
    energy = energy_source.load(energy_from) if energy_from is not None else None
    _require_extension()
    if statistic not in STATISTICS:
        raise UserError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}",
                        field="--statistic")
    settings = Settings.make(quick, kv_dtype)
    machine = discover()
    has_cuda = cuda.available()
    if use_cuda and not has_cuda:
        raise UserError("--cuda was given but torch.cuda.is_available() is False")
    with_cuda = has_cuda if use_cuda is None else use_cuda

    kernel_threads: tuple[int, ...] = ()
    if with_cuda:  # the count the executor gives the kernel there, so validation finds it
        from hw_backend.devices import cuda_host_threads

        kernel_threads = (cuda_host_threads(),)
    jobs = (memory.plan(machine, settings) + mlp.plan(machine, settings)
            + loaded.plan(machine, settings) + row_cost.plan(machine, settings)
            + cpu_kernel.plan(machine, settings, kernel_threads))
    power_jobs, rapl_note = power.rapl_job(settings, len(machine.usable_cpus))
    power_notes = {"rapl": rapl_note}
    if with_cuda:
        gpu_jobs, power_notes["gpu"] = power.gpu_idle_job(settings)
        power_jobs = gpu_jobs + power_jobs  # the GPU's idle first: nothing has run on it yet
    jobs = power_jobs + jobs  # idle readings before the benchmarks warm anything up
    cleanups: list[Callable[[], None]] = []
    split = None
    if with_cuda:
        jobs += cuda.plan(settings)
    else:
        split = _split(device_threads, pin)
        standin_jobs, close = standin.plan(settings, split)
        jobs += standin_jobs
        cleanups.append(close)
    date = _dt.date.today().isoformat()
    with timing_statistic(statistic):  # measuring and summarising alike
        failed: dict[str, str] = {}
        try:
            rows = _run(jobs, progress, quiet_wait_s, failed)
        finally:
            for cleanup in cleanups:
                cleanup()
        ctx = Context(name or out.stem, date, machine, rows,
                      cuda.device_info() if with_cuda else None, split, kv_dtype, quick,
                      settings.copy_fit_max, energy, power_notes, file_stem=out.stem)
        text, summary = build(ctx)
    json_path, csv_path = sidecar_paths(out)
    meta = {
        "date": date, "tool": "hgsim calibrate", "quick": quick, "kv_dtype": kv_dtype,
        "statistic": statistic,
        "host": platform.node(), "cpu_model": machine.cpu_model,
        "usable_cpus": list(machine.usable_cpus), "numa_nodes": [n.id for n in machine.nodes],
        "cuda": ctx.cuda, "split": None if split is None else {
            "device_threads": split.device_threads, "host_threads": split.host_threads,
            "pin": split.pin},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "energy_from": energy.name if energy else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "failed_jobs": failed,
    }
    rows.write_json(json_path, meta, summary)
    rows.write_csv(csv_path)
    with written_whole(out) as fh:  # last: a profile is never there without its raw data
        fh.write(text)
    _check(out)
    return CalibrationResult(out, json_path, csv_path, rows, summary, with_cuda,
                             time.perf_counter() - t0)


def _split(device_threads: int | None, pin: bool):
    from hw_backend.devices import CoreSplit, available_cores

    cores = len(available_cores())
    if device_threads is None:
        return CoreSplit.even(cores, pin=pin)
    if not 1 <= device_threads < max(cores, 2):
        raise UserError(f"--device-threads must be in [1, {max(cores - 1, 1)}] on this machine "
                        f"({cores} cores)")
    return CoreSplit(device_threads, max(1, cores - device_threads), pin)


def _require_extension() -> None:
    try:
        from hw_backend import _cpu_attention, _membench  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the C kernels are not built ({exc}); install with a C compiler "
                        "(pip install -e .) before calibrating") from None


def _run(jobs: list[Job], progress: bool, quiet_wait_s: float,
         failed: dict[str, str] | None = None) -> Measurements:
    """Every job's rows; an ``optional`` job that raises is recorded in ``failed`` (label ->
    error) and skipped, any other error ends the calibration."""
    failed = {} if failed is None else failed
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rows = Measurements()
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("calibrating", total=len(jobs))
        for job in jobs:
            if quiet_wait_s > 0:
                bar.update(task, description=f"waiting for a quiet moment: {job.label}")
                runnable = wait_for_quiet(quiet_wait_s)
            else:
                runnable = None
            bar.update(task, description=job.label)
            try:
                produced = job.run()
            except Exception as exc:
                if not job.optional:
                    raise
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                failed[job.label] = reason[:300]
                print(f"hgsim calibrate: warning: {job.label} failed ({reason[:200]}); "
                      "its figures are left out", file=sys.stderr)
                produced = []
            for row in produced:
                row.params["runnable_before"] = runnable
                rows.append(row)
            bar.advance(task)
        bar.update(task, description="calibration done")
    return rows


def _check(path: Path) -> None:
    from hgsim.profiles import load_profile

    load_profile(path)  # raises ConfigError (a bug here) if the written profile is invalid

"""Measured half of ``hgsim validate``: run each case's plans on this machine with the executor.

For every case of a validation study (``hgsim.validation``) the policy is built exactly as the
simulator builds it (same model, profile, workload and options), its plan for every step is
executed by ``hw_backend.executor.PlanExecutor`` and the executor's ``StepTiming`` records come
back. Both the attention-only path and the whole model run over the accuracy model's synthetic
attention (``designed_kv``: the heads of a KV group agree on heavy hitters as the simulator's
union sizes assume; the whole model's attention reads the designed queries in place of its
random weights' projections, ``ModelDecode.fill_designed``), with queries that drift from step
to step as the model's (``designed_kv.QueryDrift``). The accelerator is CUDA when available,
else the CPU stand-in with the case's core split (``devices.CoreSplit``), the same kind of device the
calibrated profile describes.

``run_validation`` also runs the simulator on the same cases, checks that both ran the same
plans, and writes the CSV and the scatter plot; MAPE decides pass or fail.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hgsim.errors import UserError
from hgsim.micro import (
    Extras,
    LatencyDrift,
    MicroCase,
    MicroResult,
    Numa,
    micro_cases,
    micro_mape,
    route,
)
from hgsim.micro import predict as predict_micro
from hgsim.outputs import check_output_file, remove_earlier, written_whole
from hgsim.profiles import load_profile, resolve_profile
from hgsim.results import StepTiming
from hgsim.specs.hardware import HardwareProfile
from hgsim.validation import (
    Case,
    CaseResult,
    Drift,
    ThreadFigures,
    ValidationStudy,
    case_profile,
    cases,
    check_same_plans,
    load_study,
    mape,
    predict,
    study_profile,
    workload,
)
from hw_backend.calibration.quiet import wait_for_quiet
from hw_backend.designed_kv import DesignedDecode, DesignedKv
from hw_backend.devices import available_cores

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: What a run writes: ``<prefix>.csv``, the micro-cases' ``<prefix>.micro.csv`` and the
#: scatter plot as PNG and SVG.
OUTPUT_SUFFIXES = (".csv", ".micro.csv", ".png", ".svg")


# ------------------------------------------------------------------------------ one case
def measure(case: Case, study: ValidationStudy, profile: HardwareProfile,
            accelerator: str = "auto", before_steps: Callable[[], object] | None = None,
            designed_kv: DesignedKv | None = None) -> tuple[list[StepTiming], str]:
    """Execute the case's plans step by step; (measured steps, device label).

    ``before_steps`` runs after the cache is filled, right before the first timed step;
    ``designed_kv`` can be shared between calls so that the cache values are made once.
    """
    import torch

    from hgsim.policies import make_policy
    from hw_backend.devices import CoreSplit, make_accelerator
    from hw_backend.executor import PlanExecutor, UnsupportedPlan
    from hw_backend.kv_store import KvStore

    model = study.model_spec()
    wl = workload(study, case)
    policy = make_policy(case.policy, model, case_profile(profile, case), wl, case.options)
    if not policy.feasible:
        raise UserError(f"{case.label}: infeasible: {policy.infeasibility()}")
    plans = [policy.step_plan(case.context + s) for s in range(wl.gen)]
    dtype = getattr(torch, TORCH_DTYPES[study.kv_dtype])
    split = CoreSplit(case.device_threads, case.host_threads, case.pin)
    accel = make_accelerator(accelerator, split)
    if study.hbm_budget_gb is not None:
        from hw_backend.devices import limit_device_memory

        limit_device_memory(accel, study.hbm_budget_gb * 1e9)
    if study.whole_model:
        try:
            return _measure_model(case, study, policy, plans, accel, before_steps,
                                  designed_kv), accel.label
        finally:
            accel.close()
    try:
        store = KvStore(accel, num_layers=model.num_layers, batch=study.batch,
                        kv_heads=model.num_kv_heads, head_dim=model.head_dim, dtype=dtype,
                        capacity=case.context + wl.gen)
        source = DesignedDecode(layers=model.num_layers, batch=study.batch,
                                heads=model.num_heads, kv_heads=model.num_kv_heads,
                                head_dim=model.head_dim, context=case.context,
                                steps=len(plans), dtype=dtype, designed_kv=designed_kv)
        source.load(store)
        inputs = _inputs(accel, model, source, dtype, len(plans))
        if before_steps is not None:
            before_steps()
        steps = []
        with PlanExecutor(store, accel, host_threads=case.host_threads) as executor:
            buffers = _static_inputs(executor, model, study.batch, dtype)
            for s, plan in enumerate(plans):
                queries, new_kv = inputs[s]
                if buffers is not None:  # the graph path reads them from fixed buffers
                    queries, new_kv = buffers.load(queries, new_kv)
                try:
                    run = executor.step(plan, queries, new_kv=new_kv, step=s)
                except UnsupportedPlan as exc:
                    raise UserError(f"{case.label}: the executor cannot run this plan: "
                                    f"{exc}") from None
                steps.append(run.timing)
        return steps, accel.label
    finally:
        accel.close()


def _measure_model(case: Case, study: ValidationStudy, policy, plans, accel,
                   before_steps: Callable[[], object] | None,
                   designed_kv: DesignedKv | None) -> list[StepTiming]:
    """The whole model (random weights at the study model's shapes) decoding the case's plans
    over the designed cache, its attention reading the designed queries."""
    from hw_backend.executor import UnsupportedPlan
    from hw_backend.model_decode import ModelDecode

    model = study.model_spec()
    with ModelDecode(model, accel, batch=study.batch, dtype=study.weight_dtype,
                     kv_dtype=study.kv_dtype, capacity=case.context + len(plans),
                     host_threads=case.host_threads) as decoder:
        decoder.fill_designed(case.context - 1, designed_kv)
        decoder.reserve_for(policy, case.context + len(plans) - 1)
        if before_steps is not None:
            before_steps()
        steps = []
        for s, plan in enumerate(plans):
            try:
                run = decoder.step(plan, step=s)[0]
            except UnsupportedPlan as exc:
                raise UserError(f"{case.label}: the executor cannot run this plan: "
                                f"{exc}") from None
            steps.append(run.timing)
    return steps


def _static_inputs(executor, model, batch: int, dtype):
    """On the graph path, the executor's own input buffers (filled before each step)."""
    if not executor.graphs:
        return None
    from hw_backend.step_buffers import StepBuffers

    buffers = StepBuffers.allocate(executor.accel.device, layers=model.num_layers, batch=batch,
                                   heads=model.num_heads, kv_heads=model.num_kv_heads,
                                   head_dim=model.head_dim, kv_dtype=dtype)
    executor.side.buffers = buffers
    return buffers


def _inputs(accel, model, source: DesignedDecode, dtype, count: int):
    """Per step: each layer's query (``source``'s: designed, then drifting) and the new
    token's random K/V, made before timing starts."""
    import torch

    generator = torch.Generator().manual_seed(1)
    batch = source.batch
    out = []
    for step in range(count):
        queries = [source.query(step, layer).to(accel.device, copy=True)
                   for layer in range(model.num_layers)]
        new_kv = [tuple(torch.randn(batch, model.num_kv_heads, 1, model.head_dim,
                                    generator=generator).to(dtype).to(accel.device)
                        for _ in range(2)) for _ in range(model.num_layers)]
        out.append((queries, new_kv))
    return out


# ------------------------------------------------------------------------------ a study
@dataclass
class ValidationRun:
    profile: HardwareProfile
    study: ValidationStudy
    results: list[CaseResult]
    mape_pct: float
    threshold_pct: float
    outputs: list[Path]
    seconds: float
    load_average: tuple[float, float]  # 1-minute load average before and after (shared machines)
    drift: Drift | None = None  # None without calibration data beside the profile
    micro: list[MicroResult] = field(default_factory=list)  # the study's micro-cases
    micro_latency: list[LatencyDrift] = field(default_factory=list)  # routes they gathered on
    micro_statistic: str = "median"  # how the micro-cases' repeats became their times
    #: How much slower calibration found the host kernel while the CPU stand-in attended on the
    #: other cores (None with CUDA or without the measurement). The simulator does not charge
    #: it, since a GPU has its own memory and cores; scaling the host's rate by it in overlapping
    #: cases was tried and over-corrected (docs/calibration.md, history), so it is reported to
    #: explain HybridGen's errors.
    host_slowdown: float | None = None
    #: (case, error) of cases that raised on CUDA and were skipped; any fails the run
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: earlier runs' files under this run's output names that it did not write, removed
    removed: list[Path] = field(default_factory=list)

    @property
    def micro_mape_pct(self) -> float:
        return micro_mape(self.micro)

    @property
    def passed(self) -> bool:
        """Every MAPE that was measured is within the threshold (plan cases, micro-cases)."""
        errors = [e for e in (self.mape_pct, self.micro_mape_pct) if not math.isnan(e)]
        return not self.failed and bool(errors) and all(
            math.isfinite(e) and e <= self.threshold_pct for e in errors)


@dataclass(frozen=True)
class Calibration:
    """What calibration recorded beside the profile that the profile schema cannot hold."""

    split: tuple[int, int] | None  # (device, host) threads of the stand-in
    per_threads: ThreadFigures  # per-core CPU figures by kernel thread count
    probe: tuple[int, float] | None = None  # (context, GB/s) of the drift probe when calibrated
    #: mean time of the host kernel while the stand-in attends / alone, from calibration;
    #: reported, not charged (see ``ValidationRun.host_slowdown``)
    host_slowdown: float | None = None
    #: the stand-in's attention efficiency with the host kernel idle (for cases without host
    #: work; the profile holds the rate next to it), ``hgsim.validation.predict``
    attention_alone: float | None = None
    numa: Numa | None = None  # NUMA node of each profile socket and tier
    micro: Extras = field(default_factory=Extras)  # what the micro-cases need besides
    #: how calibration turned repeats into figures; the micro-cases take theirs the same way
    statistic: str = "median"

    @staticmethod
    def beside(profile_path: Path, profile: HardwareProfile) -> Calibration:
        from hw_backend.calibrate import sidecar_paths

        json_path, _ = sidecar_paths(profile_path)
        from hw_backend.calibration.cpu_kernel import calibrated_probe

        try:
            doc = json.loads(json_path.read_text())
        except (OSError, ValueError):
            return Calibration(None, {})
        split = doc.get("meta", {}).get("split")
        socket = profile.gpus[profile.primary_gpu].socket
        figure = doc.get("summary", {}).get(socket, {}).get("per_threads", {})
        per_threads = {int(n): v for n, v in (figure.get("value") or {}).items()}
        pair = (int(split["device_threads"]), int(split["host_threads"])) if split else None
        summary = doc.get("summary", {})
        gpu0 = summary.get("gpu0", {})
        slowdown = gpu0.get("host_loaded_slowdown") or {}
        alone = (gpu0.get("attention_efficiency_alone") or {}).get("value")
        mapping = summary.get("numa")
        numa = Numa(dict(mapping["sockets"]), dict(mapping["tiers"])) if mapping else None
        return Calibration(pair, per_threads, calibrated_probe(doc), slowdown.get("value"),
                           attention_alone=alone, numa=numa, micro=_extras(summary, profile),
                           statistic=doc.get("meta", {}).get("statistic", "median"))

    def default_split(self, cuda: bool) -> tuple[int, int]:
        """(device, host) threads: with CUDA every core but the submitting thread's is the
        host's (``cuda_host_threads``); with the stand-in the calibrated split, else half the
        cores each."""
        from hw_backend.devices import CoreSplit, cuda_host_threads

        if cuda:
            return 1, cuda_host_threads()
        if self.split:
            return self.split
        even = CoreSplit.even()
        return even.device_threads, even.host_threads


def _extras(summary: dict, profile: HardwareProfile) -> Extras:
    """Per socket: the probe's core work per row and the per-core figures by kernel thread
    count (the row gathers' gain by row size is in the profile, as the simulator uses it)."""
    probe, threads = {}, {}
    for socket in profile.sockets:
        figs = summary.get(socket, {})
        values = (figs.get("probe_ns_per_row") or {}).get("value") or {}
        probe[socket] = {int(k): float(v) for k, v in values.items()}
        per = (figs.get("per_threads") or {}).get("value") or {}
        threads[socket] = {int(n): v for n, v in per.items()}
    return Extras(probe, threads)


def _uses_cuda(accelerator: str) -> bool:
    import torch

    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda, but torch.cuda.is_available() is False")
    return accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())


def check_feasible(profile: HardwareProfile, study: ValidationStudy, todo: list[Case],
                   per_threads: ThreadFigures | None = None) -> None:
    """Every plan case can run on ``profile`` (building its policy is cheap), so that an
    impossible one (a huge ``--steps``) is reported before the micro-cases are measured, not
    after them."""
    from hgsim.policies import make_policy

    model = study.model_spec()
    for case in todo:
        machine = case_profile(profile, case, per_threads)
        policy = make_policy(case.policy, model, machine, workload(study, case), case.options)
        if not policy.feasible:
            raise UserError(f"{case.label}: infeasible on {profile.name}: "
                            f"{policy.infeasibility()}")


def run_validation(
    profile: str | Path, study_path: str | Path, *, threshold: float = 10.0,
    out: Path | None = None, max_context: int | None = None, steps: int | None = None,
    accelerator: str = "auto", statistic: str = "min", quiet_wait_s: float = 0.0,
    progress: bool = True, on_case: Callable[[CaseResult], None] | None = None,
    which: str = "all",
) -> ValidationRun:
    """Measure and predict every case, write CSV and plots, and return the comparison.

    ``which`` picks the cases: "all", "plans" (the study's configurations) or "micro" (its
    micro-cases, which run first: they are short, and closest to the calibration in time).
    """
    if which not in ("all", "plans", "micro"):
        raise UserError(f"cases must be all, plans or micro, got {which!r}", field="--cases")
    t0 = time.perf_counter()
    load0 = _load()
    path = resolve_profile(profile)
    study = load_study(study_path)
    prefix = output_prefix(out, path)  # checked before measuring: or every case is lost
    prof = study_profile(load_profile(path), study)
    if steps is not None:
        study = study.model_copy(update={"steps": steps})
    calibration = Calibration.beside(path, prof)
    cuda = _uses_cuda(accelerator)
    device, host = calibration.default_split(cuda)
    todo = (cases(study, device_threads=device, host_threads=host, max_context=max_context,
                  cpus=len(available_cores()))
            if which != "micro" else [])
    if which != "micro" and not todo and max_context is not None:
        every = cases(study, device_threads=device, host_threads=host)
        if every:  # the limit, not the study, left nothing: say so before any work
            raise UserError(f"--max-context {max_context} leaves none of the study's "
                            f"{len(every)} cases (the smallest context is "
                            f"{min(c.context for c in every)})")
    check_feasible(prof, study, todo, calibration.per_threads)
    micro, micro_latency = (run_micro(prof, study, calibration, quiet_wait_s, max_context)
                            if which != "plans" else ([], []))
    if not todo and not micro:
        raise UserError("nothing to run: no configuration (check --max-context and the study's "
                        "contexts) and no micro-case (the study's micro section)")
    probe = None
    if calibration.probe is not None and study.kv_dtype == "fp32" and todo:
        from hw_backend.calibration.cpu_kernel import KernelProbe

        probe = KernelProbe(calibration.probe[0])
    results = []
    designed_kv = DesignedKv()
    failed: list[tuple[Case, str]] = []
    for case in _progress(todo, progress):
        probe_gbps = probe.gbps() if probe is not None else None
        predicted = predict(prof, study, case, calibration.per_threads,
                            None if cuda else calibration.attention_alone)
        runnable: list[float] = []
        settle = (lambda out=runnable: out.append(wait_for_quiet(quiet_wait_s))
                  ) if quiet_wait_s > 0 else None
        try:
            measured, label = measure(case, study, prof, accelerator, settle, designed_kv)
        except UserError:
            raise
        except Exception as exc:
            if not cuda:  # on the stand-in an error here is a bug: let it show
                raise
            from hw_backend.run_failure import failure_reason

            failed.append((case, failure_reason(exc, cuda)))  # out of memory, say
            continue
        check_same_plans(case, measured, predicted)
        result = CaseResult(case, measured, predicted, label, study.warmup_steps, statistic,
                            runnable[0] if runnable else None, probe_gbps)
        results.append(result)
        if on_case is not None:
            on_case(result)
    del probe, designed_kv  # as much KV as the largest context's
    error = mape(results)
    load = (load0, _load())
    probes = tuple(r.probe_gbps for r in results if r.probe_gbps is not None)
    drift = (Drift(calibration.probe[1], probes, calibration.probe[0])
             if probes and calibration.probe else None)
    outputs = _write(results, micro, error, threshold, prefix, prof, study, load, failed)
    removed = remove_earlier([prefix.with_name(prefix.name + s) for s in OUTPUT_SUFFIXES],
                             outputs)
    return ValidationRun(prof, study, results, error, threshold, outputs,
                         time.perf_counter() - t0, load, drift, micro, micro_latency,
                         calibration.statistic,
                         None if cuda or not results else calibration.host_slowdown,
                         [(case.label, why) for case, why in failed], removed)



def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def output_prefix(out: Path | None, profile_path: Path) -> Path:
    """Where ``<prefix>.csv/.png/.svg`` go: ``out``, or the default name inside ``out`` when it
    is a folder, or ``_default_out``; UserError if any of them cannot be written."""
    prefix = out or _default_out(profile_path)
    if prefix.is_dir():
        prefix = prefix / _default_out(profile_path).name
    for suffix in OUTPUT_SUFFIXES:
        check_output_file(prefix.with_name(prefix.name + suffix), "--out")
    return prefix


def _default_out(profile_path: Path) -> Path:
    """``./<profile>.validation``: the working directory, never a shipped profile's folder."""
    return Path.cwd() / (profile_path.stem + ".validation")


def _progress(items: list[Case], enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, disable=not enabled, transient=True) as bar:
        task = bar.add_task("validating", total=len(items))
        for item in items:
            bar.update(task, description=f"{item.label} (measure + simulate)")
            yield item
            bar.advance(task)


def run_micro(profile: HardwareProfile, study: ValidationStudy, calibration: Calibration,
              quiet_wait_s: float, max_context: int | None = None
              ) -> tuple[list[MicroResult], list[LatencyDrift]]:
    """The study's micro-cases, measured here and predicted from the profile, and the idle
    latency of the routes they gathered on while they ran (against the profile's). Scans over
    more than ``max_context`` tokens are left out, as the configurations above it are: a quick
    ``--max-context 4k`` run spent most of its time scanning 64k tokens.

    A case's time is its repeats' statistic as calibration took its figures (the median by
    default), not ``--statistic``: the fastest of seven repeats against figures from medians
    read 4 KiB gathers 10-20% faster than calibration's own sweep of the same rows."""
    from hw_backend import micro as measured

    if study.micro is None:
        return [], []
    model = study.model_spec()
    numa = calibration.numa
    if numa is None:
        from hw_backend.numa import numa_nodes

        if len(numa_nodes()) > 1:
            raise UserError("micro-cases need the NUMA node of each profile tier, which "
                            "calibration records beside the profile; re-run hgsim calibrate")
        numa = Numa.only_node(profile)
    todo: list[MicroCase] = micro_cases(study.micro, profile, numa, heads=model.num_heads,
                                        kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                                        kv_dtype=study.kv_dtype)
    if max_context is not None:
        todo = [c for c in todo if c.kind != "scan" or c.context <= max_context]
    timed, latency = measured.measure(todo, study.micro.repeats, quiet_wait_s)
    out = []
    for case, runs in zip(todo, timed, strict=True):
        cpu_s, wall_s, share = measured.representative(runs, calibration.statistic,
                                                       case.threads)
        out.append(MicroResult(case, cpu_s, predict_micro(profile, case, calibration.micro),
                               wall_s, share, measured.together(runs, case.threads)))
    drift = []
    for (cpu_node, node), (before, after) in sorted(latency.items()):
        case = next(c for c in todo if (c.cpu_node, c.node) == (cpu_node, node))
        drift.append(LatencyDrift(f"{case.tier} from {case.socket}",
                                  route(profile, case.socket, case.tier).latency_s * 1e9,
                                  before, after))
    return out, drift


def _write(results: list[CaseResult], micro: list[MicroResult], error: float, threshold: float,
           prefix: Path, profile: HardwareProfile, study: ValidationStudy,
           load: tuple[float, float], failed: Sequence[tuple[Case, str]] = ()) -> list[Path]:
    """CSV of the compared cases (with a row per case that raised, measured empty and its
    reason under ``failure``, so the file says what was attempted), the micro-cases' CSV and
    the scatter plots."""
    from hgsim.validation import frame, scatter

    if not prefix.parent.is_dir():
        raise UserError(f"folder {prefix.parent} does not exist", field="--out")
    written = []
    if micro:
        import pandas as pd

        micro_path = prefix.with_name(prefix.name + ".micro.csv")
        table = pd.DataFrame([r.row() for r in micro])
        table["mape_pct"] = micro_mape(micro)
        table["profile"] = profile.name
        with written_whole(micro_path, newline="") as fh:
            table.to_csv(fh, index=False)
        written.append(micro_path)
    if not results and not failed:
        return written
    import pandas as pd

    csv_path = prefix.with_name(prefix.name + ".csv")
    table = frame(results)
    if failed:
        rows = [{"config": c.config, "policy": c.policy, "context": c.context,
                 "device_threads": c.device_threads, "host_threads": c.host_threads,
                 "options": c.options, "failure": why} for c, why in failed]
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    table["mape_pct"] = error
    table["profile"] = profile.name
    table["load_average_before"], table["load_average_after"] = load
    with written_whole(csv_path, newline="") as fh:
        table.to_csv(fh, index=False)
    if not results:
        return [csv_path, *written]
    title = f"{study.name}: {profile.name} ({results[0].device})"
    plots = scatter(results, error, threshold, prefix, title)
    return [csv_path, *plots, *written]

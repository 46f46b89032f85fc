"""Simulator-side half of ``hgsim validate``: the study file, the predictions, the comparison.

A validation study lists configurations (policy, options, contexts, the executor's thread split)
that ``hw_backend.validate`` runs for real and this module runs through the simulator, with the
same model, the same workload (``attention_only`` unless the study sets ``whole_model``: then
the executor decodes the whole model, projections, norms and FFN included) and the same policy,
so both execute the very same partition plans. ``hbm_budget_gb`` caps the GPU memory both sides
plan with (``hgsim.hbm_budget``), so a study can force offload on a large GPU. That the plans agree is
checked step by step (context, top-k ratio, GPU-resident tokens), not assumed.

The simulator's machine is the calibrated profile with one change per configuration: the
socket's ``cores`` become the executor's host-kernel threads, because the simulated CPU phase
uses every core of the socket and the executor gives its C kernel exactly that many (and, when
calibration measured that thread count, the per-core rate scaled by the efficiency measured at
it; ``case_profile``).

Nothing here imports torch: the comparison, MAPE, table and plot work on plain step records.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from hgsim import model_files
from hgsim.catalog import get_model
from hgsim.config_io import load_yaml, validate
from hgsim.errors import OptionError, UserError
from hgsim.micro import MicroStudy
from hgsim.outputs import written_whole
from hgsim.policies import checked_options, registry
from hgsim.profiles import profile_with_overrides
from hgsim.results import StepTiming
from hgsim.specs.base import SpecModel
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.units import parse_count
from hgsim.workload import Workload

DEFAULT_STUDY = Path(__file__).resolve().parent.parent / "studies" / "validation.yaml"


# ------------------------------------------------------------------------------ study file
class ValidationConfig(SpecModel):
    """One policy setting, run at each of ``contexts``."""

    name: str
    policy: str
    options: dict[str, Any] = Field(default_factory=dict)
    contexts: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    device_threads: int | None = Field(default=None, ge=1)  # None: the calibrated split
    host_threads: int | None = Field(default=None, ge=1)  # None: the calibrated split
    pin: bool = True  # pin each role's threads to its own cores

    @field_validator("contexts", mode="before")
    @classmethod
    def _counts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [parse_count(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("contexts")
    @classmethod
    def _distinct(cls, contexts: list[int]) -> list[int]:
        for i, context in enumerate(contexts):  # one case measured and listed twice
            if context in contexts[:i]:
                raise ValueError(f"[{i}]: context {context} is listed twice")
        return contexts


class ValidationStudy(SpecModel):
    name: str
    description: str = ""
    model: ModelSpec | str  # inline spec, a model name or a model file (resolved on load)
    batch: int = Field(default=1, ge=1)
    kv_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    weight_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    warmup_steps: int = Field(default=2, ge=0)  # run, not compared (allocations, caches)
    steps: int = Field(default=6, ge=1)  # compared
    whole_model: bool = False  # decode the whole model (random weights), not attention alone
    hbm_budget_gb: float | None = Field(default=None, gt=0)  # usable GPU memory, both sides
    configs: list[ValidationConfig]
    #: One access pattern at a time (random row gathers, the kernel's K scan), predicted by
    #: ``hgsim.memory``'s closed forms from the profile (``hgsim.micro``); none when absent.
    micro: MicroStudy | None = None

    def model_spec(self) -> ModelSpec:
        return get_model(self.model) if isinstance(self.model, str) else self.model


def load_study(path: str | Path) -> ValidationStudy:
    """Parse and check ``path``, policies and their options included, so a misspelt name fails
    before any case is measured."""
    doc = load_yaml(path)
    study = validate(ValidationStudy, doc)
    if isinstance(study.model, str):  # a model file is relative to the study file
        try:
            spec = get_model(model_files.beside(study.model, Path(path).resolve().parent))
        except UserError as exc:
            raise doc.error(("model",), str(exc)) from None
        study = study.model_copy(update={"model": spec})
    if study.hbm_budget_gb is not None:  # the device's size is checked when it is known
        from hgsim.hbm_budget import HbmBudget

        try:
            HbmBudget(study.hbm_budget_gb).check(
                device_bytes=None, model=study.model_spec(), weight_dtype=study.weight_dtype,
                attention_only=not study.whole_model, field="hbm_budget_gb")
        except UserError as exc:
            raise doc.error(("hbm_budget_gb",), str(exc).removeprefix("hbm_budget_gb: ")) \
                from None
    names = [cfg.name for cfg in study.configs]
    for i, cfg in enumerate(study.configs):
        if cfg.name in names[:i]:  # the name tells its rows of the results apart
            raise doc.error(("configs", i, "name"), f"'{cfg.name}' names configs"
                                                    f"[{names.index(cfg.name)}] too")
        try:
            checked_options(cfg.policy, cfg.options)
        except registry.UnknownPolicyError as exc:
            raise doc.error(("configs", i, "policy"), str(exc)) from None
        except OptionError as exc:
            raise doc.error(("configs", i, "options", exc.option), exc.reason) from None
    return study


@dataclass(frozen=True)
class Case:
    """One configuration at one context: the unit that is measured and predicted."""

    config: str
    policy: str
    options: dict[str, Any]
    context: int
    device_threads: int
    host_threads: int
    pin: bool

    @property
    def label(self) -> str:
        return f"{self.config} @ {_tokens(self.context)}"


def cases(study: ValidationStudy, *, device_threads: int, host_threads: int,
          max_context: int | None = None, cpus: int | None = None) -> list[Case]:
    """Every (config, context) of the study; unset thread counts take the given defaults.

    ``cpus``: this machine's; a role's threads beyond them are capped with a warning, since
    they could only take turns on the same cores while the simulator would give each a core
    (a study written for a larger machine)."""
    out = []
    for cfg in study.configs:
        device = _threads(cfg.device_threads or device_threads, cpus, cfg.name, "device_threads")
        host = _threads(cfg.host_threads or host_threads, cpus, cfg.name, "host_threads")
        for context in cfg.contexts:
            if max_context is not None and context > max_context:
                continue
            out.append(Case(cfg.name, cfg.policy, dict(cfg.options), context, device, host,
                            cfg.pin))
    return out


def _threads(requested: int, cpus: int | None, config: str, field: str) -> int:
    if cpus is None:
        return requested
    from hgsim.commands.checks import local_workers

    return local_workers(requested, f"{config}: {field}", "validate", cpus)


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


# ------------------------------------------------------------------------------ simulator side
def workload(study: ValidationStudy, case: Case) -> Workload:
    return Workload(batch=study.batch, context=case.context,
                    gen=study.warmup_steps + study.steps, kv_dtype=study.kv_dtype,
                    weight_dtype=study.weight_dtype, attention_only=not study.whole_model)


def study_profile(profile: HardwareProfile, study: ValidationStudy) -> HardwareProfile:
    """The profile both sides use: the study's HBM budget applied, if it has one."""
    if study.hbm_budget_gb is None:
        return profile
    from hgsim.hbm_budget import HbmBudget

    return HbmBudget(study.hbm_budget_gb).apply(profile)


#: Calibration's figures per kernel-thread count n: ``scaling_efficiency`` (per-core rate of the
#: streaming kernel at n threads over its single-thread rate), ``stream_inflight_bytes`` and
#: ``gather_inflight_bytes`` (what each of n cores keeps in flight on the n-thread read and on
#: n-thread random gathers of the KV row size, by Little's law over the loaded latency).
ThreadFigures = dict[int, dict[str, Any]]


def case_profile(profile: HardwareProfile, case: Case,
                 per_threads: ThreadFigures | None = None) -> HardwareProfile:
    """The profile as the executor uses the machine: the host kernel gets ``host_threads``.

    The simulator scales a per-core rate linearly with cores; when calibration measured the
    kernel at exactly ``host_threads`` (> 1) threads, the profile's per-core attention rate is
    scaled by the efficiency measured at that count and the per-core bandwidth and per-call
    overhead are the ones measured there, so sub-linear scaling on a shared memory system is
    not predicted away.
    """
    spec_socket = profile.gpus[profile.primary_gpu].socket
    key = f"sockets.{spec_socket}"
    overrides: dict[str, Any] = {f"{key}.cores": case.host_threads}
    measured = (per_threads or {}).get(case.host_threads, {}) if case.host_threads > 1 else {}
    if measured.get("scaling_efficiency"):
        rate = profile.sockets[spec_socket].attention_gflops_per_core
        overrides[f"{key}.attention_gflops_per_core"] = rate * measured["scaling_efficiency"]
    for figure in ("stream_inflight_bytes", "gather_inflight_bytes"):
        if measured.get(figure):
            overrides[f"{key}.{figure}"] = measured[figure]
    if measured.get("op_overhead_us") is not None:
        overrides[f"{key}.op_overhead_us"] = measured["op_overhead_us"]
    return profile_with_overrides(profile, overrides)


def predict(profile: HardwareProfile, study: ValidationStudy, case: Case,
            per_threads: ThreadFigures | None = None,
            attention_alone: float | None = None) -> list[StepTiming]:
    """Every step of the case, simulated (no sampling, no accuracy proxy).

    ``attention_alone``: the CPU stand-in's attention efficiency measured with the host kernel
    idle. A stand-in profile carries the rate measured next to the host kernel (the two share
    the host's cores and memory); the stand-in's attention runs at that rate only while the host
    kernel runs (``standin_attention``). None (a GPU) changes nothing.
    """
    from hgsim.simulate import Fidelity, simulate
    from hgsim.standin_attention import standin_profile

    wl = workload(study, case)
    machine = standin_profile(case_profile(profile, case, per_threads), study.model_spec(),
                              case.policy, wl, case.options, attention_alone)
    result = simulate(machine, study.model_spec(), case.policy, wl, policy_options=case.options,
                      fidelity=Fidelity(decode_samples=0, accuracy=False))
    if not result.feasible:
        raise UserError(f"{case.label}: infeasible on {profile.name}: {result.reason}")
    return result.steps


# ------------------------------------------------------------------------------ comparison
#: How a case's measured steps become one number. Interference from other processes only adds
#: time, so on a shared machine the fastest step is the reproducible estimate of what the
#: hardware does (calibration takes the fastest repeat for the same reason); the median is the
#: alternative when the machine is known to be quiet.
STATISTICS = ("min", "median")


@dataclass(frozen=True)
class CaseResult:
    case: Case
    measured: list[StepTiming]
    predicted: list[StepTiming]
    device: str
    warmup: int
    statistic: str = "min"
    runnable_before: float | None = None  # mean runnable tasks when the steps started
    probe_gbps: float | None = None  # machine-state probe right before the case (drift)

    def _compared(self, steps: list[StepTiming]) -> list[StepTiming]:
        return steps[self.warmup:]

    @property
    def measured_s(self) -> float:
        """Measured step latency: fastest or median compared step (``statistic``)."""
        latencies = [s.latency_s for s in self._compared(self.measured)]
        return min(latencies) if self.statistic == "min" else statistics.median(latencies)

    @property
    def predicted_s(self) -> float:
        return statistics.fmean(s.latency_s for s in self._compared(self.predicted))

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.predicted_s - self.measured_s) / self.measured_s

    def row(self) -> dict[str, Any]:
        c, compared = self.case, self._compared(self.measured)
        spread = [s.latency_s for s in compared]
        return {
            "config": c.config, "policy": c.policy, "context": c.context,
            "topk_ratio": compared[0].topk_ratio, "gpu_tokens": compared[0].gpu_tokens,
            "device_threads": c.device_threads, "host_threads": c.host_threads,
            "measured_ms": 1e3 * self.measured_s, "predicted_ms": 1e3 * self.predicted_s,
            "error_pct": self.error_pct,
            "statistic": self.statistic, "measured_min_ms": 1e3 * min(spread),
            "measured_median_ms": 1e3 * statistics.median(spread),
            "measured_max_ms": 1e3 * max(spread),
            "measured_cpu_ms": 1e3 * statistics.median(s.cpu_busy_s for s in compared),
            "measured_cpu_wait_ms": 1e3 * statistics.median(s.cpu_wait_s for s in compared),
            "predicted_cpu_ms": 1e3 * statistics.fmean(
                s.cpu_busy_s for s in self._compared(self.predicted)),
            "measured_gpu_ms": 1e3 * statistics.median(s.gpu_busy_s for s in compared),
            "predicted_gpu_ms": 1e3 * statistics.fmean(
                s.gpu_busy_s for s in self._compared(self.predicted)),
            "steps": len(compared), "device": self.device, "options": c.options,
            "runnable_before": self.runnable_before, "probe_gbps": self.probe_gbps,
        }


def check_same_plans(case: Case, measured: list[StepTiming], predicted: list[StepTiming]) -> None:
    """Both sides must have run the same plans; a mismatch makes the comparison meaningless
    (e.g. an adaptive policy fed different observations), so it is an error, not a footnote."""
    if len(measured) != len(predicted):
        raise UserError(f"{case.label}: {len(measured)} measured steps vs "
                        f"{len(predicted)} simulated")
    for m, p in zip(measured, predicted, strict=True):
        same = (m.context == p.context and m.gpu_tokens == p.gpu_tokens
                and math.isclose(m.topk_ratio, p.topk_ratio, rel_tol=1e-9))
        if not same:
            raise UserError(
                f"{case.label}: step {m.step} ran different plans (measured context "
                f"{m.context}, top-k {m.topk_ratio:.4g}, gpu tokens {m.gpu_tokens}; simulated "
                f"{p.context}, {p.topk_ratio:.4g}, {p.gpu_tokens}); use static policies "
                "(e.g. adaptive: false) for validation")


def mape(results: list[CaseResult]) -> float:
    """Mean absolute percentage error of per-step latency over the cases."""
    if not results:
        return float("nan")
    return statistics.fmean(abs(r.error_pct) for r in results)


def breakdown(results: list[CaseResult]) -> list[tuple[str, float, float]]:
    """(configuration, MAPE, mean signed error) per configuration, in study order.

    The signed mean separates a model that is off in one direction (a missing cost, a
    calibration taken in another machine state) from scatter around the truth.
    """
    groups: dict[str, list[CaseResult]] = {}
    for r in results:
        groups.setdefault(r.case.config, []).append(r)
    return [(name, mape(rs), statistics.fmean(r.error_pct for r in rs))
            for name, rs in groups.items()]


# ------------------------------------------------------------------------------ outputs
@dataclass(frozen=True)
class Drift:
    """How far the machine moved from its calibration while the validation ran.

    The same small probe (a single-thread C-kernel pass that calibration also timed) runs
    before every case. On a shared or virtual machine the memory system can speed up or slow
    down by tens of percent within minutes; a profile calibrated in one state cannot predict
    measurements taken in another, and this says by how much the states differed.
    """

    calibrated_gbps: float
    probes_gbps: tuple[float, ...]
    tokens: int = 16384  # context of the probe (calibration's run nearest 16k)

    @property
    def range_pct(self) -> tuple[float, float]:
        lo, hi = min(self.probes_gbps), max(self.probes_gbps)
        return (100.0 * (lo / self.calibrated_gbps - 1.0), 100.0 * (hi / self.calibrated_gbps - 1.0))

    def describe(self) -> str:
        lo, hi = min(self.probes_gbps), max(self.probes_gbps)
        a, b = self.range_pct
        return (f"machine drift: the calibration probe (1-thread C kernel, {_tokens(self.tokens)} "
                f"tokens) ran at "
                f"{lo:.1f}-{hi:.1f} GB/s during validation vs {self.calibrated_gbps:.1f} GB/s "
                f"when calibrated ({a:+.0f}% to {b:+.0f}%)")

    def exceeds(self, threshold_pct: float) -> bool:
        return max(abs(x) for x in self.range_pct) > threshold_pct


def frame(results: list[CaseResult]):
    import pandas as pd

    return pd.DataFrame([r.row() for r in results])


def print_table(results: list[CaseResult], error: float, threshold: float, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("configuration", "policy", "top-k", "GPU tok", "thr d/h", "measured ms",
                "predicted ms", "error"):
        table.add_column(col, justify="left" if col in ("configuration", "policy") else "right")
    for r in results:
        row = r.row()
        colour = "green" if abs(r.error_pct) <= threshold else "red"
        table.add_row(r.case.label, r.case.policy, f"{row['topk_ratio']:.3g}",
                      str(row["gpu_tokens"]), f"{r.case.device_threads}/{r.case.host_threads}",
                      f"{row['measured_ms']:.2f}", f"{row['predicted_ms']:.2f}",
                      f"[{colour}]{r.error_pct:+.1f}%[/{colour}]")

    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    console.print(table)
    verdict = "[green]PASS[/green]" if error <= threshold else "[red]FAIL[/red]"
    console.print(f"MAPE {error:.2f}% over {len(results)} configurations "
                  f"(threshold {threshold:g}%): {verdict}")
    if results:
        signed = statistics.fmean(r.error_pct for r in results)
        parts = ", ".join(f"{name} {m:.1f}% ({b:+.1f}%)" for name, m, b in breakdown(results))
        console.print(f"by configuration, MAPE (mean signed error): {parts}; "
                      f"all {signed:+.1f}%")


def scatter(results: list[CaseResult], error: float, threshold: float, path: Path,
            title: str) -> list[Path]:
    """Predicted vs measured per-step latency, y = x and the threshold band; PNG and SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    measured = [1e3 * r.measured_s for r in results]
    predicted = [1e3 * r.predicted_s for r in results]
    lo = min(measured + predicted) / 1.3
    hi = max(measured + predicted) * 1.3
    line = [lo, hi]
    ax.plot(line, line, color="black", lw=1, label="y = x")
    band = threshold / 100
    ax.fill_between(line, [v * (1 - band) for v in line], [v * (1 + band) for v in line],
                    color="grey", alpha=0.15, label=f"±{threshold:g}%")
    configs = sorted({r.case.config for r in results})
    cmap = plt.get_cmap("tab10" if len(configs) <= 10 else "tab20")
    for i, name in enumerate(configs):
        xs = [1e3 * r.measured_s for r in results if r.case.config == name]
        ys = [1e3 * r.predicted_s for r in results if r.case.config == name]
        ax.scatter(xs, ys, s=28, color=cmap(i % cmap.N), label=name, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured per-step latency (ms)")
    ax.set_ylabel("predicted per-step latency (ms)")
    ax.set_title(f"{title}\nMAPE {error:.1f}% over {len(results)} configurations", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths = [path.with_name(path.name + ".png"), path.with_name(path.name + ".svg")]
    for p in paths:
        with written_whole(p, "wb") as fh:
            fig.savefig(fh, format=p.suffix[1:], dpi=130)
    plt.close(fig)
    return paths

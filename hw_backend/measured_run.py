"""One real decode next to its simulation: the work behind ``hgsim run`` and the speed-up study.

``check`` builds everything that can be wrong before any work (the model fits the device, the
HBM budget fits the device and holds the weights, the policy is feasible under it and keeps its
weights in HBM, which the executor requires); ``measure`` then decodes on the accelerator:
the whole model (``model_decode``; no prefill is run) or, with ``attention_only``, the
attention path alone (``decode_loop.run_decode``), both over the accuracy model's synthetic
attention (``designed_kv``, whose GQA heads overlap as the simulated union selection assumes;
the whole model's attention reads its queries, ``ModelDecode.fill_designed``). ``predict`` simulates the same model, policy, workload and
budgeted profile. Both become ``SimResult`` objects of the same steps, the first ``warmup``
(allocation, graph capture) left out of each, so every table that prints a simulated result
prints a measured one beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hgsim.capacity import hbm_capacity_bytes
from hgsim.errors import UserError
from hgsim.hbm_budget import HbmBudget
from hgsim.policies import make_policy
from hgsim.policies.base import Policy
from hgsim.results import SimResult, StepTiming
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.units import size_text
from hgsim.workload import Workload

if TYPE_CHECKING:
    from hw_backend.validate import Calibration

#: Share of host RAM the stand-in may give a model's weights (its "HBM" is host DRAM, which
#: also holds the KV cache the host side reads).
STANDIN_WEIGHT_SHARE = 0.5


@dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    policy: str
    context: int  # tokens attended at the first decode step
    gen: int  # measured steps
    options: dict[str, Any] = field(default_factory=dict)
    warmup: int = 2  # steps run first and left out of both sides
    batch: int = 1
    dtype: str | None = None  # weights, activations and KV; None: bf16 on CUDA, fp32 stand-in
    attention_only: bool = False
    hbm_budget: HbmBudget | None = None
    seed: int = 0
    accelerator: str = "auto"
    host_threads: int | None = None
    graphs: bool | None = None  # the executor's CUDA graph path (None: on CUDA, not stand-in)

    @property
    def steps(self) -> int:
        return self.warmup + self.gen


@dataclass
class RunResult:
    config: RunConfig
    measured: SimResult
    simulated: SimResult | None
    device: str
    token_s: list[float]  # wall time per measured token (whole model: embedding + LM head too)
    run: Any  # the DecodeRun (steps, layers, plans, scheduler trace)


@dataclass(frozen=True)
class Prepared:
    """What ``check`` established: the workload and the profile under the budget."""

    workload: Workload
    profile: HardwareProfile
    dtype: str


#: Shipped profiles by a substring of the CUDA device's name, for runs without ``--profile``
#: and without a calibrated ``local`` profile.
SHIPPED_BY_GPU = (("H100", "h100-80gb-spr-cxl"), ("A100", "a100-40gb-spr-cxl"),
                  ("5090", "rtx5090-cxl"))
#: The profile ``hgsim calibrate --out hardware_profiles/local.yaml`` writes.
CALIBRATED_PROFILE = "local"


def describes_standin(profile: HardwareProfile) -> bool:
    return "cpu-standin" in profile.gpus[profile.primary_gpu].model


def default_profile(cuda: bool) -> str:
    """The profile a run is predicted with when none is named: the calibrated ``local`` one if
    it describes this kind of device, else (CUDA) the shipped profile of the same GPU."""
    from hgsim.profiles import list_profiles, load_profile

    if CALIBRATED_PROFILE in list_profiles():
        if describes_standin(load_profile(CALIBRATED_PROFILE)) != cuda:
            return CALIBRATED_PROFILE
    if cuda:
        import torch

        name = torch.cuda.get_device_name(0)
        for key, profile in SHIPPED_BY_GPU:
            if key in name:
                return profile
        raise UserError(f"no profile describes {name}: calibrate it (hgsim calibrate --out "
                        "hardware_profiles/local.yaml) or pass --profile")
    raise UserError("no calibrated profile of the CPU stand-in: run `hgsim calibrate --out "
                    "hardware_profiles/local.yaml` first, or pass --profile")


def uses_cuda(accelerator: str) -> bool:
    import torch

    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda, but torch.cuda.is_available() is False")
    return accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())


def _device_bytes(cuda: bool) -> tuple[float, str]:
    import os

    if cuda:
        import torch

        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), props.name
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this host's RAM"


def check(config: RunConfig, profile: HardwareProfile) -> Prepared:
    """Every input checked before any work; returns the workload and the budgeted profile."""
    cuda = uses_cuda(config.accelerator)
    if config.graphs is not None and not cuda:
        raise UserError("the CPU stand-in has no CUDA graphs: it always issues device work op "
                        "by op, so --eager applies to CUDA runs only", field="--eager")
    dtype = config.dtype or ("bf16" if cuda else "fp32")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise UserError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}", field="--dtype")
    if config.gen < 1 or config.warmup < 0:
        raise UserError("--gen must be >= 1 and --warmup >= 0")
    if config.context < 2:
        raise UserError("--context must be at least 2 (a context token and the new one)")
    device_bytes, device = _device_bytes(cuda)
    model = config.model
    workload = Workload(batch=config.batch, context=config.context, gen=config.steps,
                        kv_dtype=dtype, weight_dtype=dtype, attention_only=config.attention_only,
                        seed=config.seed)
    weights = workload.weight_bytes(model)
    room = device_bytes * (1.0 if cuda else STANDIN_WEIGHT_SHARE)
    if weights > room:
        hint = ("" if cuda else "; without CUDA use a tiny model (--model tiny-llama) or "
                "--attention-only")
        raise UserError(f"{model.name}'s {size_text(weights)} of {dtype} weights do not fit "
                        f"{device} ({size_text(room)} usable){hint}", field="--model")
    if config.hbm_budget is not None:
        config.hbm_budget.check(device_bytes=device_bytes, model=model, weight_dtype=dtype,
                                device=device, attention_only=config.attention_only)
        profile = config.hbm_budget.apply(profile)
    policy = make_policy(config.policy, model, profile, workload, config.options)
    if not policy.feasible:
        raise UserError(f"{config.policy} cannot run {model.name} at context {config.context} "
                        f"on {profile.name}: {policy.infeasibility()}")
    _check_executable(policy, config)
    if policy.offloaded_weight_bytes and not config.attention_only:
        hbm = hbm_capacity_bytes(profile)
        reserve = policy.options.reserve.bytes_(hbm)
        raise UserError(f"{config.policy} would stream {size_text(policy.offloaded_weight_bytes)} "
                        f"of weights from host memory every step ({size_text(hbm)} of HBM less "
                        f"its {size_text(reserve)} reserve leaves them too little room), which "
                        "hw_backend does not execute; give the GPU more memory (--hbm-budget) "
                        "or keep less in reserve (--option hbm_reserve_gb=...)")
    return Prepared(workload, profile, dtype)


def _check_executable(policy: Policy, config: RunConfig) -> None:
    """The executor can run the policy's plans (H2O's host-evicted heavy hitters, for one,
    are simulated only), checked on the first and last step's plans: before any work rather
    than as an ``UnsupportedPlan`` traceback once decoding starts."""
    from hw_backend.layer_state import UnsupportedPlan, check_host_socket, host_path

    for context in sorted({config.context, config.context + config.steps - 1}):
        plan = policy.step_plan(context)
        try:
            check_host_socket(plan)
            for index in range(plan.num_layers):
                host_path(plan.layer_plan(index))
        except UnsupportedPlan as exc:
            raise UserError(f"hw_backend cannot execute {config.policy}'s plan at context "
                            f"{context}: {exc}", field="--policy") from None


def calibration_beside(profile_path: Path, profile: HardwareProfile) -> Calibration | None:
    """What ``hgsim calibrate`` recorded beside ``profile_path`` (thread split, per-thread
    figures, the stand-in's idle attention rate), or None for a profile not calibrated here (a
    shipped one describes another machine)."""
    from hw_backend.calibrate import sidecar_paths
    from hw_backend.validate import Calibration

    if not sidecar_paths(profile_path)[0].is_file():
        return None
    return Calibration.beside(profile_path, profile)


def executor_host_threads(config: RunConfig) -> int:
    """The C kernel's threads as ``measure`` runs it (``PlanExecutor``'s default)."""
    from hw_backend.devices import CoreSplit, cuda_host_threads

    if config.host_threads:
        return config.host_threads
    return cuda_host_threads() if uses_cuda(config.accelerator) else CoreSplit.even().host_threads


def predict(config: RunConfig, prepared: Prepared, *, samples: int = 0,
            calibration: Calibration | None = None) -> SimResult:
    """The simulator's run of the same configuration, warm-up steps left out.

    With the ``calibration`` of the profile (it describes this machine), the machine is the one
    the executor uses, as ``hgsim validate`` predicts it: the socket's cores are the C kernel's
    threads (``validation.case_profile``) and, on the CPU stand-in, its attention runs at its
    idle rate except beside the host kernel (``standin_attention``).
    """
    from hgsim.graph_path import eager_profile
    from hgsim.simulate import Fidelity, simulate

    # the eager path launches kernel by kernel: predicted without the graph figures
    profile = eager_profile(prepared.profile) if config.graphs is False else prepared.profile
    if calibration is not None:
        from hgsim.standin_attention import standin_profile
        from hgsim.validation import Case, case_profile

        case = Case("run", config.policy, dict(config.options), config.context, 1,
                    executor_host_threads(config), True)
        profile = case_profile(profile, case, calibration.per_threads)
        alone = None if uses_cuda(config.accelerator) else calibration.attention_alone
        profile = standin_profile(profile, config.model, config.policy, prepared.workload,
                                  config.options, alone)
    result = simulate(profile, config.model, config.policy, prepared.workload,
                      policy_options=config.options,
                      fidelity=Fidelity(decode_samples=samples))
    return window(result, config)


def window(result: SimResult, config: RunConfig) -> SimResult:
    steps = [replace(s, step=s.step - config.warmup) for s in result.steps[config.warmup:]]
    return replace(result, steps=steps, gen=config.gen)


def measure(config: RunConfig, prepared: Prepared, *, progress: bool = True) -> RunResult:
    """Decode on the accelerator and return the measured side (``simulated`` left None)."""
    from hw_backend.devices import limit_device_memory, make_accelerator

    workload, profile = prepared.workload, prepared.profile
    policy = make_policy(config.policy, config.model, profile, workload, config.options)
    accel = make_accelerator("cuda" if uses_cuda(config.accelerator) else "standin")
    try:
        if config.hbm_budget is not None:
            limit_device_memory(accel, config.hbm_budget.bytes_)
        with _Progress(progress, config) as bar:
            if config.attention_only:
                run, token_s = _attention_only(config, prepared, policy, accel, bar)
            else:
                run, token_s = _whole_model(config, prepared, policy, accel, bar)
    finally:
        accel.close()
    steps: list[StepTiming] = run.steps
    measured = SimResult(
        profile=profile.name, model=config.model.name, policy=config.policy,
        batch=config.batch, context=config.context, gen=config.steps, feasible=True,
        steps=steps, footprint_bytes=dict(policy.footprint.used_bytes),
        capacity_bytes=dict(policy.footprint.capacity_bytes), options=dict(config.options),
        accuracy_mass_kept=float("nan"), accuracy_rel_error=float("nan"),
    )
    return RunResult(config, window(measured, config), None, run.device,
                     token_s[config.warmup:], run)


def _whole_model(config: RunConfig, prepared: Prepared, policy: Policy, accel, bar):
    from hw_backend.model_decode import ModelDecode

    capacity = config.context + config.steps
    with ModelDecode(config.model, accel, batch=config.batch, dtype=prepared.dtype,
                     seed=config.seed, capacity=capacity, host_threads=config.host_threads,
                     graphs=config.graphs) as model:
        bar.phase("filling the context with the accuracy model's K/V")
        model.fill_designed(config.context - 1, seed=config.seed)
        model.reserve_for(policy, capacity - 1)
        bar.phase("decoding")
        run = model.decode(policy, config.steps, on_step=bar.advance)
    return run, run.token_s


def _attention_only(config: RunConfig, prepared: Prepared, policy: Policy, accel, bar):
    import time

    from hw_backend.decode_loop import run_decode
    from hw_backend.designed_kv import DesignedDecode
    from hw_backend.executor import PlanExecutor
    from hw_backend.kv_store import KvStore
    from hw_backend.model_decode import TORCH_DTYPES

    spec, dtype = config.model, TORCH_DTYPES[prepared.dtype]
    source = DesignedDecode(layers=spec.num_layers, batch=config.batch, heads=spec.num_heads,
                            kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                            context=config.context, steps=config.steps, dtype=dtype,
                            seed=config.seed)
    store = KvStore(accel, num_layers=spec.num_layers, batch=config.batch,
                    kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, dtype=dtype,
                    capacity=config.context + config.steps)
    bar.phase("filling the context with the accuracy model's K/V")
    source.load(store)
    bar.phase("decoding (attention only)")
    with PlanExecutor(store, accel, host_threads=config.host_threads,
                      graphs=config.graphs) as executor:
        t0 = time.perf_counter()
        run = run_decode(policy, executor, source, on_step=bar.advance)
        elapsed = time.perf_counter() - t0
    # attention-only steps have no embedding or LM head: a token's time is its step's
    token_s = [s.latency_s for s in run.steps] or [elapsed]
    return run, token_s


class _Progress:
    """A progress bar over the decode steps, with the set-up phases named."""

    def __init__(self, enabled: bool, config: RunConfig) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[progress.description]{task.description}"),
                             BarColumn(), TextColumn("{task.completed}/{task.total}"),
                             TimeElapsedColumn(), disable=not enabled, transient=True)
        self._total = config.steps

    def __enter__(self) -> _Progress:
        self._bar.__enter__()
        self._task = self._bar.add_task("loading the model", total=self._total)
        return self

    def phase(self, text: str) -> None:
        self._bar.update(self._task, description=text)

    def advance(self, _step: int) -> None:
        self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)


__all__ = [
    "CALIBRATED_PROFILE", "SHIPPED_BY_GPU", "Prepared", "RunConfig", "RunResult",
    "calibration_beside", "check", "default_profile", "describes_standin",
    "executor_host_threads", "measure", "predict", "uses_cuda", "window",
]

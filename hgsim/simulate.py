"""One simulation: a model on a hardware profile under a policy for a workload.

Decode steps are simulated one after another on one machine model. Exact per-step simulation
of hundreds of steps is wasteful when latency changes smoothly with context, so the
``decode_samples`` fidelity knob simulates that many evenly spaced steps and interpolates the
rest; the policy's scheduler still sees an observation for every step (the nearest simulated
one), so its decisions follow the same cadence as in a full run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from hgsim.catalog import get_model
from hgsim.costs import prefill_layer_work
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.results import SimResult, StepTiming
from hgsim.sim.decode import DecodeEngine
from hgsim.sim.machine import Machine
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload


@dataclass(frozen=True)
class Fidelity:
    """Accuracy/speed knobs of the simulator itself."""

    decode_samples: int = 32  # simulated decode steps; 0 = every step
    accuracy: bool = True  # compute the accuracy proxy for lossy policies
    record: bool = False  # keep every activity (needed for traces)


def sample_steps(gen: int, samples: int) -> list[int]:
    if samples <= 0 or samples >= gen:
        return list(range(gen))
    return sorted({int(round(x)) for x in np.linspace(0, gen - 1, samples)})


def simulate(
    profile: HardwareProfile | str,
    model: ModelSpec | str,
    policy: str,
    workload: Workload,
    *,
    policy_options: dict[str, Any] | None = None,
    fidelity: Fidelity = Fidelity(),
    trace_path: str | Path | None = None,
) -> SimResult:
    wall0 = time.perf_counter()
    profile = load_profile(profile) if isinstance(profile, str) else profile
    model = get_model(model) if isinstance(model, str) else model
    pol = make_policy(policy, model, profile, workload, policy_options)
    result = SimResult(
        profile=profile.name, model=model.name, policy=policy, batch=workload.batch,
        context=workload.context, gen=workload.gen, feasible=pol.feasible,
        reason=pol.infeasibility(), footprint_bytes=dict(pol.footprint.used_bytes),
        capacity_bytes=dict(pol.footprint.capacity_bytes), options=dict(policy_options or {}),
    )
    if not pol.feasible:
        result.wall_s = time.perf_counter() - wall0
        return result

    record = fidelity.record or trace_path is not None
    env = simpy.Environment()
    machine = Machine(env, profile, record=record)
    engine = DecodeEngine(machine, model, workload.kv_dtype, workload.weight_dtype,
                          attention_only=workload.attention_only)
    if workload.include_prefill:
        result.ttft_s = _prefill(engine, model, workload)

    t_decode0 = env.now
    sampled = set(sample_steps(workload.gen, fidelity.decode_samples))
    steps: list[StepTiming | None] = []
    last = None
    binding: dict[str, float] = {}
    markers: list[tuple[float, str, dict]] = []
    sched = pol.scheduler
    for step in range(workload.gen):
        context = workload.context + step
        plan = pol.step_plan(context)
        if step in sampled:
            m = engine.step(plan)
            last = m
        m = last
        for label, seconds in m.binding.items():
            binding[label] = binding.get(label, 0.0) + seconds / workload.gen
        decision = ""
        if m.host_s:
            pol.observe(m.host_s, m.device_s, m.variable_s)
            record = sched.history[-1] if sched is not None and sched.history else None
            if record is not None and record.decision is not None:
                decision = record.decision.value
                result.last_reason = f"{decision}: {record.reason}"
                markers.append((env.now, f"scheduler: {decision}", {
                    "reason": record.reason, "step": step, "ratio": sched.ratio,
                    "gpu_share": sched.gpu_share}))
        steps.append(StepTiming(
            step=step, context=context, latency_s=m.latency_s, gpu_busy_s=m.gpu_busy_s,
            cpu_busy_s=m.cpu_busy_s, pcie_busy_s=m.pcie_busy_s,
            stall_s=max(m.latency_s - m.gpu_busy_s, 0.0), host_s=m.host_s, device_s=m.device_s,
            topk_ratio=plan.layer.topk_ratio, gpu_tokens=plan.layer.gpu_tokens,
            simulated=step in sampled, variable_s=m.variable_s, decision=decision,
        ))
    result.steps = _interpolate(steps)
    # HybridGen's GQA top-k granularity that ran (per_head for every other policy)
    result.selection = pol.step_plan(workload.context).layer.selection.value
    result.binding_s = binding
    if sched is not None:
        result.decisions = dict(sched.decisions())
    window = (t_decode0, env.now)
    summary = machine.recorder.summary(window)
    result.utilisation = {name: s.utilisation for name, s in summary.items()}
    result.bytes_by_resource = {name: s.bytes_ for name, s in summary.items() if s.bytes_}
    result.events = next(env._eid)  # simpy's running count of scheduled events
    if fidelity.accuracy and pol.lossy:
        _accuracy(result, pol, workload)
    if trace_path is not None:
        from hgsim.sim.trace import write_chrome_trace

        write_chrome_trace(machine.recorder, trace_path, metadata=result.to_row(),
                           markers=markers)
    result.wall_s = time.perf_counter() - wall0
    return result


def _interpolate(steps: list[StepTiming]) -> list[StepTiming]:
    """Replace the latency of unsimulated steps by linear interpolation between neighbours."""
    simulated = [i for i, s in enumerate(steps) if s.simulated]
    if len(simulated) == len(steps) or len(simulated) < 2:
        return steps
    xs = np.array(simulated, dtype=float)
    out = list(steps)
    fields = ("latency_s", "gpu_busy_s", "cpu_busy_s", "pcie_busy_s", "stall_s", "host_s",
              "device_s", "variable_s")
    series = {f: np.array([getattr(steps[i], f) for i in simulated]) for f in fields}
    for i, s in enumerate(steps):
        if s.simulated:
            continue
        values = {f: float(np.interp(i, xs, series[f])) for f in fields}
        out[i] = StepTiming(step=s.step, context=s.context, topk_ratio=s.topk_ratio,
                            gpu_tokens=s.gpu_tokens, simulated=False, decision=s.decision,
                            **values)
    return out


def _prefill(engine: DecodeEngine, model: ModelSpec, workload: Workload) -> float:
    """Prompt processing on the GPU, layer by layer, with host-bound KV written out over PCIe
    behind the compute. Returns time to first token."""
    env, machine = engine.env, engine.machine
    work = prefill_layer_work(model, workload.batch, workload.context, workload.weight_dtype)
    duration = engine._kernel_s(work)
    kv_layer = workload.batch * workload.context * model.kv_bytes_per_token_layer(workload.kv_dtype)
    t0 = env.now

    def run():
        copies = []
        for _ in range(model.num_layers):
            k = engine.stream.launch(duration, "prefill", work.flops, work.bytes_)
            yield k
            copies.append(machine.copy(engine.gpu, engine.socket, kv_layer, "kv offload"))
        yield env.all_of(copies)

    env.run(until=env.process(run()))
    return env.now - t0


def _accuracy(result: SimResult, policy, workload: Workload) -> None:
    from hgsim.accuracy import accuracy_proxy, group_spec

    # Fidelity at the mean plan of the run: the plan at the median step, on synthetic
    # attention with the model's query heads per KV head (GQA groups share keys).
    plan = policy.step_plan(workload.context + workload.gen // 2).layer
    fid = accuracy_proxy(plan, group_spec(policy.model.gqa_group))
    result.accuracy_mass_kept = float(fid.mass_kept)
    result.accuracy_rel_error = float(fid.rel_error)

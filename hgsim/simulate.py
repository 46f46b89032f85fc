"""One simulation: a model on a hardware profile under a policy for a workload.

Decode steps are simulated one after another on one machine model. Exact per-step simulation
of hundreds of steps is wasteful when latency changes smoothly with context, so the
``decode_samples`` fidelity knob simulates that many evenly spaced steps and interpolates the
rest; the policy's scheduler still sees an observation for every step (the nearest simulated
one), so its decisions follow the same cadence as in a full run.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from hgsim import energy, tco
from hgsim.catalog import get_model
from hgsim.costs import PREFILL_CHUNK_AUTO, prefill_chunks
from hgsim.errors import TraceTooLarge
from hgsim.outputs import TRACE_MAX_BYTES, remove_earlier
from hgsim.plan import LayerPlan, Selector
from hgsim.policies import make_policy
from hgsim.policies.base import host_shared
from hgsim.profiles import load_profile
from hgsim.results import SimResult, StepTiming
from hgsim.sim.decode import PAST_ON_HOST, DecodeEngine, PrefillChunk
from hgsim.sim.machine import Machine
from hgsim.sim.trace import trace_bytes
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.tensor_parallel import (
    RankView,
    check_data_parallel,
    check_tensor_parallel,
    rank_gpus,
    rank_view,
    socket_mirror,
)
from hgsim.workload import Workload

if TYPE_CHECKING:
    from hgsim.accuracy.selection import SelectionModel
    from hgsim.accuracy.synthetic import AttentionModelSpec
    from hgsim.policies.base import Policy


@dataclass(frozen=True)
class Fidelity:
    """Accuracy/speed knobs of the simulator itself."""

    decode_samples: int = 32  # simulated decode steps; 0 = every step
    accuracy: bool = True  # compute the accuracy proxy for lossy policies
    record: bool = False  # keep every activity (needed for traces)
    # the approximate selectors' parameters the accuracy proxy scores with (InfiniGen's
    # speculation, H2O's history; ``hgsim.accuracy.SelectionModel``); None: its defaults
    selection: SelectionModel | None = None
    # the shape of the synthetic attention (``hgsim.accuracy.AttentionModelSpec``'s sinks,
    # recency, heavy hitters and noise) the proxy scores on and a group union's rows come
    # from; None: its defaults
    attention: AttentionModelSpec | None = None


def accuracy_context(workload: Workload) -> int:
    """The context at which a run's accuracy is scored: its median decode step (the
    equal-accuracy search scores its settings there too)."""
    return workload.context + workload.gen // 2


def sample_steps(gen: int, samples: int) -> list[int]:
    if samples <= 0 or samples >= gen:
        return list(range(gen))
    return sorted({int(round(x)) for x in np.linspace(0, gen - 1, samples)})


def simulate(
    profile: HardwareProfile | str,
    model: ModelSpec | str | os.PathLike[str],
    policy: str,
    workload: Workload,
    *,
    policy_options: dict[str, Any] | None = None,
    fidelity: Fidelity = Fidelity(),
    trace_path: str | Path | None = None,
    trace_max_bytes: float | None = TRACE_MAX_BYTES,
    on_step: Callable[[int, int], None] | None = None,
    settled: Callable[[Policy], None] | None = None,
) -> SimResult:
    """Simulate ``workload`` (its prefill first, if it has one, then its decode); a prefill
    chunk of ``auto`` is chosen first (``hgsim.prefill_chunk``) and the result says which.
    With ``trace_path`` every activity is kept and written there; a trace estimated from the
    first simulated step to exceed ``trace_max_bytes`` (None: no limit) raises
    ``TraceTooLarge`` before the other steps run. ``on_step(done, total)`` is called after
    each simulated decode step (a progress bar's feed); ``settled(policy)`` is called with the
    policy as a feasible run leaves it (its scheduler where the decode took it), for a caller
    that goes on from there (``mixed_step``)."""
    wall0 = time.perf_counter()
    profile = load_profile(profile) if isinstance(profile, str) else profile
    profile = profile.for_kv_dtype(workload.kv_dtype)  # the host kernel's rate for this KV type
    model = model if isinstance(model, ModelSpec) else get_model(model)
    profile.gpus[profile.primary_gpu].peak_flops(workload.weight_dtype)  # the GPU can run it
    check_tensor_parallel(model, workload.tensor_parallel)  # the model shards, and over
    rank_gpus(profile, workload.tensor_parallel)  # GPUs the profile has, for every replica
    check_data_parallel(profile, workload.tensor_parallel, workload.data_parallel)
    auto = workload.include_prefill and workload.prefill_chunk_tokens == PREFILL_CHUNK_AUTO
    if auto:
        from hgsim.prefill_chunk import choose_prefill_chunk

        chunk = choose_prefill_chunk(profile, model, policy, workload, policy_options, fidelity)
        workload = workload.model_copy(update={"prefill_chunk_tokens": chunk})
    result = simulate_prepared(profile, model, policy, workload, policy_options=policy_options,
                               fidelity=fidelity, trace_path=trace_path,
                               trace_max_bytes=trace_max_bytes, on_step=on_step,
                               settled=settled)
    result.prefill_chunk_auto = auto
    result.wall_s = time.perf_counter() - wall0
    return result


def simulate_prepared(
    profile: HardwareProfile,
    model: ModelSpec,
    policy: str,
    workload: Workload,
    *,
    policy_options: dict[str, Any] | None = None,
    fidelity: Fidelity = Fidelity(),
    trace_path: str | Path | None = None,
    time_prefill: bool = True,
    trace_max_bytes: float | None = TRACE_MAX_BYTES,
    on_step: Callable[[int, int], None] | None = None,
    settled: Callable[[Policy], None] | None = None,
) -> SimResult:
    """``simulate`` once the profile is set for the KV type, the model looked up and the
    prefill chunk a number or None. ``time_prefill`` False holds the prefill's workspace in
    HBM, so the placement is the one the prefill leaves, but skips simulating the prefill:
    the decode alone, as the chunk chooser weighs it."""
    wall0 = time.perf_counter()
    # tensor parallelism: rank 0's shard on its share of the host, the system counted whole
    view = rank_view(profile, model, workload.tensor_parallel, host_shared(policy_options),
                     workload.data_parallel, workload.gpu_placement)
    system = view.system
    pol = make_policy(policy, model, profile, workload, policy_options,
                      attention=fidelity.attention)
    result = SimResult(
        profile=profile.name, model=model.name, policy=policy, batch=workload.batch,
        context=workload.context, gen=workload.gen, feasible=pol.feasible,
        reason=pol.infeasibility(), footprint_bytes=dict(pol.footprint.used_bytes),
        capacity_bytes=dict(pol.footprint.capacity_bytes), options=dict(policy_options or {}),
        capex_usd=tco.capex_usd(system), capex_usd_per_s=tco.capex_usd_per_s(system),
        electricity_usd_per_j=tco.electricity_usd_per_j(system),
        tensor_parallel=workload.tensor_parallel, data_parallel=workload.data_parallel,
        gpu_placement=workload.gpu_placement,
    )
    if workload.include_prefill:  # tokens per chunk, as run (the whole prompt: one chunk)
        result.prefill_chunk_tokens = prefill_chunks(workload.context,
                                                     workload.prefill_chunk_tokens)[0][1]
    if not pol.feasible:
        if trace_path is not None:  # an earlier run's trace there would pass for this run's
            remove_earlier([Path(trace_path)], ())
        result.wall_s = time.perf_counter() - wall0
        return result

    engine = new_engine(profile, model, workload, record=fidelity.record or trace_path is not None,
                        attention=fidelity.attention, view=view)
    env, machine = engine.env, engine.machine
    spans: list[tuple[float, float, str, dict]] = []  # the trace's track of prefill and steps
    prefill = workload.include_prefill and time_prefill
    if prefill:
        t_prefill = env.now
        before_prefill = machine.recorder.snapshot()
        sent_prefill = engine.allreduce_sent_bytes
        result.ttft_s = engine.prefill(pol.step_plan(workload.context), workload.context,
                                       workload.prefill_chunk_tokens)
        spans.append((t_prefill, env.now, "prefill", {"context": workload.context,
                                                      "batch": workload.batch}))
    t_decode0 = env.now
    before = machine.recorder.snapshot()
    sent_before = engine.allreduce_sent_bytes
    if prefill:  # the prefill's joules, apart from the decode's
        result.prefill_energy_j = energy.energy_by_component_j(system, _system_activity(
            view, energy.activity_between(machine, before_prefill, before, result.ttft_s),
            sent_before - sent_prefill))
    moved_before = machine.recorder.bytes_by_resource()
    sampled = set(sample_steps(workload.gen, fidelity.decode_samples))
    steps: list[StepTiming | None] = []
    last = None
    last_step = 0  # the simulated step whose measure ``last`` is
    step_binding: list[dict[str, float]] = []  # each step's split, from its simulated step
    markers: list[tuple[float, str, dict]] = []
    sched = pol.scheduler
    scored = None  # the plan the accuracy proxy scores: the one the run used at its median step
    done = 0  # simulated steps so far (``on_step``)
    for step in range(workload.gen):
        context = workload.context + step
        plan = pol.step_plan(context)
        if context == accuracy_context(workload):
            scored = plan.layer
        if step in sampled:
            t_step = env.now
            sized = trace_path is not None and trace_max_bytes is not None and last is None
            before_bytes = trace_bytes(machine.recorder, spans=spans) if sized else 0
            m = engine.step(plan)
            last, last_step = m, step
            spans.append((t_step, env.now, f"decode step {step}",
                          {"step": step, "context": context, "simulated": True}))
            if sized:
                _check_trace_size(trace_bytes(machine.recorder, spans=spans), before_bytes,
                                  len(sampled), trace_max_bytes)
            if on_step is not None:
                done += 1
                on_step(done, len(sampled))
        m = last
        step_binding.append(m.binding)
        decision = ""
        if m.host_s:
            pol.observe(m.host_s, m.device_s, m.variable_s)
            record = sched.history[-1] if sched is not None and sched.history else None
            if record is not None and record.decision is not None:
                decision = record.decision.value
                result.last_reason = f"{decision}: {record.reason}"
                markers.append((env.now, f"scheduler: {decision}", {
                    "reason": record.reason, "step": step, "simulated": step in sampled,
                    "observed_step": last_step, "ratio": sched.ratio,
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
    result.binding_s = _mean_binding(result.steps, step_binding)
    if sched is not None:
        result.decisions = dict(sched.decisions())
    window = (t_decode0, env.now)
    summary = machine.recorder.summary(window)
    result.utilisation = {name: s.utilisation for name, s in summary.items()}
    moved = machine.recorder.bytes_by_resource()  # the decode's traffic, not the prefill's
    result.bytes_by_resource = {name: b - moved_before.get(name, 0.0)
                                for name, b in moved.items() if b > moved_before.get(name, 0.0)}
    activity = _system_activity(view, energy.activity_between(
        machine, before, machine.recorder.snapshot(), env.now - t_decode0),
        engine.allreduce_sent_bytes - sent_before)
    result.energy_j = energy.energy_by_component_j(system, activity)
    result.energy_window_s = activity.window_s
    result.events = next(env._eid)  # simpy's running count of scheduled events
    if pol.lossy and not fidelity.accuracy:  # not computed: no number rather than a wrong one
        result.accuracy_mass_kept = result.accuracy_rel_error = float("nan")
    elif pol.lossy and scored is not None:
        _accuracy(result, scored, pol.model, fidelity)
    if trace_path is not None:
        _write_trace(machine, trace_path, result, spans, markers)
    if settled is not None:
        settled(pol)
    result.wall_s = time.perf_counter() - wall0
    return result


def mixed_step(profile: HardwareProfile, model: ModelSpec, pol: Policy, workload: Workload,
               context: int, chunk_past: int, chunk_tokens: int, *, alone: bool = False,
               policy_options: dict[str, Any] | None = None,
               past_from: str | None = None,
               packed: Sequence[tuple[int, int]] = (), adapted: int = 0
               ) -> tuple[float, float]:
    """One decode step of ``workload.batch`` sequences at ``context`` tokens under ``pol``'s
    plans as they stand, with positions ``chunk_past`` to ``chunk_past + chunk_tokens`` of a
    prompt prefilled in the same step (``DecodeEngine.step``; ``alone``: the chunk without a
    decode, the prompt placed as ``pol`` places a sequence of ``context`` tokens; with
    ``past_from`` its whole past read back from the host, ``PrefillChunk.past_from``) and
    ``packed``, more prompts' chunks (past, tokens) with their past in place, on a fresh
    machine: its seconds and the machine's joules over it (NaN: the profile lacks energy
    figures). ``adapted``: the step after that many such steps, the policy's scheduler
    observing each (on a copy of ``pol``), as it would over a long prompt's chunks."""
    view = rank_view(profile, model, workload.tensor_parallel, host_shared(policy_options),
                     workload.data_parallel, workload.gpu_placement)
    chunk = PrefillChunk(chunk_past, chunk_tokens, past_from,
                         pol.host_kv_placement() if past_from == PAST_ON_HOST else None)
    if adapted:
        pol = copy.deepcopy(pol)
    for step in range(adapted + 1):
        engine = new_engine(profile, model, workload, view=view)
        machine = engine.machine
        plan = pol.step_plan(max(context, 1))
        if alone:
            plan = replace(plan, batch=0)
        before = machine.recorder.snapshot()
        m = engine.step(plan, chunk, [PrefillChunk(past, tokens) for past, tokens in packed])
        if step < adapted:  # the scheduler sees the step (pol is a copy)
            pol.observe(m.host_s, m.device_s, m.variable_s)
    activity = _system_activity(view, energy.activity_between(
        machine, before, machine.recorder.snapshot(), m.latency_s), engine.allreduce_sent_bytes)
    joules = energy.energy_by_component_j(view.system, activity)
    return m.latency_s, (sum(joules.values()) if joules else math.nan)


def new_engine(profile: HardwareProfile, model: ModelSpec, workload: Workload, *,
               record: bool = False, attention: AttentionModelSpec | None = None,
               view: RankView | None = None, host_shared: bool = False) -> DecodeEngine:
    """A decode engine for ``workload`` on a fresh machine of ``profile`` (``attention``: the
    synthetic attention a group union's row count comes from; None: the defaults). Under
    tensor parallelism the machine is rank 0's view and the model its shard (``view``, made
    from ``profile`` and ``model`` when not given; ``host_shared``: every rank's host work on
    the same sockets, ``hgsim.policies.base.host_shared``), and the engine issues the
    all-reduces."""
    view = view or rank_view(profile, model, workload.tensor_parallel, host_shared,
                             workload.data_parallel, workload.gpu_placement)
    machine = Machine(simpy.Environment(), view.profile, record=record)
    return DecodeEngine(machine, view.model, workload.kv_dtype, workload.weight_dtype,
                        attention_only=workload.attention_only, attention=attention,
                        allreduce=view.allreduce)


def _system_activity(view: RankView, rank: energy.Activity,
                     allreduce_sent_bytes: float) -> energy.Activity:
    """The whole system's activity from rank 0's (identical ranks): every rank's GPU and its
    PCIe link did what rank 0's did; every rank used the host as rank 0 did, seen from its own
    socket (``tensor_parallel.socket_mirror``: a rank on another socket charges its local
    cores, DRAM and CXL where rank 0 charged rank 0's); and each rank sent
    ``allreduce_sent_bytes`` in all-reduces, over its NVLink to the next rank of its replica
    (or out and in over PCIe through host memory). One GPU: ``rank`` unchanged."""
    if view.ranks == 1 and view.system is view.profile:
        return rank
    n, system = view.n, view.system
    gpu = next(iter(view.profile.gpus))
    pcie = view.profile.gpus[gpu].link
    mirrors = [socket_mirror(system, system.gpus[gpu].socket, spec.socket)
               for spec in system.gpus.values()]

    def spread(used: dict[str, float], skip: str | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for mirror in mirrors:
            for name, value in used.items():
                if name != skip:
                    out[mirror.get(name, name)] = out.get(mirror.get(name, name), 0.0) + value
        return out

    links = spread(rank.link_bytes, skip=pcie)
    for spec in system.gpus.values():
        links[spec.link] = rank.link_bytes.get(pcie, 0.0)
    if view.allreduce is not None and allreduce_sent_bytes:
        gpus = list(system.gpus)
        for first in range(0, len(gpus), n):  # each replica's ring
            ring = gpus[first:first + n]
            for i, a in enumerate(ring):
                b = ring[(i + 1) % n]
                if view.allreduce.via == "nvlink":
                    name = next(k for k, link in system.links.items()
                                if link.kind == "nvlink" and set(link.endpoints) == {a, b})
                    links[name] = links.get(name, 0.0) + allreduce_sent_bytes
                else:  # out over a's PCIe link, in over b's
                    for g in (a, b):
                        links[system.gpus[g].link] += allreduce_sent_bytes
    return energy.Activity(
        window_s=rank.window_s,
        gpu_flops=dict.fromkeys(system.gpus, rank.gpu_flops.get(gpu, 0.0)),
        gpu_hbm_bytes=dict.fromkeys(system.gpus, rank.gpu_hbm_bytes.get(gpu, 0.0)),
        core_seconds=spread(rank.core_seconds),
        tier_read_bytes=spread(rank.tier_read_bytes),
        tier_write_bytes=spread(rank.tier_write_bytes),
        link_bytes=links)


def _check_trace_size(first_bytes: int, before_bytes: int, steps: int,
                      limit_bytes: float) -> None:
    """TraceTooLarge when the trace, sized after its first simulated step (``first_bytes``;
    ``before_bytes`` before it, the prefill's), would pass ``limit_bytes`` with ``steps``
    simulated steps: a step's activities vary little from one step to the next (the context
    grows by one token a step), so the first one's times the count is the trace."""
    per_step = first_bytes - before_bytes
    estimate = first_bytes + per_step * (steps - 1)
    if estimate > limit_bytes:
        raise TraceTooLarge(estimate, per_step, steps, limit_bytes)


def _write_trace(machine: Machine, path: str | Path, result: SimResult,
                 spans: list[tuple[float, float, str, dict]],
                 markers: list[tuple[float, str, dict]]) -> None:
    """The run's Perfetto trace: the machine's activities, a track of the prefill and the
    simulated steps, the scheduler's decisions. With ``decode_samples`` only the simulated
    steps ran, so each step's span says which steps it stands for (itself and the
    interpolated ones after it) and the metadata counts them: the timeline is shorter than
    the run's decode time, and nothing in it pretends otherwise."""
    from hgsim.sim.trace import write_chrome_trace

    simulated = [s.step for s in result.steps if s.simulated]
    nexts = [*simulated[1:], len(result.steps)]
    stands = {k: str(k) if nxt - 1 == k else f"{k}-{nxt - 1}"
              for k, nxt in zip(simulated, nexts, strict=True)}
    for _, _, _, args in spans:
        if "step" in args:
            step = result.steps[args["step"]]
            args.update(stands_for_steps=stands[step.step], latency_ms=step.latency_s * 1e3)
    metadata = {**result.to_row(), "trace_simulated_steps": len(simulated),
                "trace_note": (f"{len(simulated)} of {len(result.steps)} decode steps were "
                               "simulated and are in this trace; the others were interpolated "
                               "(span args: stands_for_steps)")}
    write_chrome_trace(machine.recorder, path, metadata=metadata, markers=markers, spans=spans)


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


def _mean_binding(steps: list[StepTiming],
                  splits: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds per step on each resource of the critical path. An interpolated step takes
    the split of the simulated step it follows, scaled to its own latency, so that the split
    adds up to the mean step latency however many steps were simulated."""
    out: dict[str, float] = {}
    for step, split in zip(steps, splits, strict=True):
        total = sum(split.values())
        scale = step.latency_s / total if total > 0 else 0.0
        for label, seconds in split.items():
            out[label] = out.get(label, 0.0) + seconds * scale / len(steps)
    return out


def _accuracy(result: SimResult, median_plan: LayerPlan, model: ModelSpec,
              fidelity: Fidelity) -> None:
    """Proxy fidelity of the selection the run actually made.

    The plan the run used at its median step, with its top-k ratio replaced by the mean over
    every step: an adaptive scheduler's r changes during the run, and the mean is what the run
    attended on average. Static policies have one ratio, so this is their plan unchanged. The
    synthetic attention (``fidelity.attention``) has the model's query heads per KV head;
    ``fidelity.selection`` holds the selectors' parameters.
    """
    from hgsim.accuracy import accuracy_proxy, group_spec

    plan = mean_ratio_plan(median_plan, float(np.mean([s.topk_ratio for s in result.steps])))
    fid = accuracy_proxy(plan, group_spec(model.gqa_group, fidelity.attention),  # GQA: shared keys
                         model=fidelity.selection)
    result.accuracy_mass_kept = float(fid.mass_kept)
    result.accuracy_rel_error = float(fid.rel_error)


def mean_ratio_plan(plan: LayerPlan, mean_ratio: float) -> LayerPlan:
    """``plan`` selecting ``mean_ratio`` of its host tokens (at least one); a plan that attends
    every host token, or has none, is kept as it is."""
    if plan.host_tokens == 0 or plan.selector is Selector.ALL:
        return plan
    selected = min(plan.host_tokens, max(1, round(mean_ratio * plan.host_tokens)))
    return replace(plan, host_selected=selected)

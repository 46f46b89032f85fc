"""Measured timing drives the simulator's feedback scheduler; records match the simulator's.

The policy's ``FeedbackScheduler`` (the code ``hgsim.simulate`` drives with simulated times)
receives the executor's measured host/device times: it must shrink the top-k ratio when the host
path is the bottleneck and grow it when device work hides the host path. Step records use the
simulator's ``StepTiming`` schema and sum the per-layer records, and every record says it was
measured on the CPU stand-in.
"""

from __future__ import annotations

from dataclasses import fields

import pytest

from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.results import StepTiming
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload
from hw_backend.decode_loop import (
    SIZED_HBM_OPTIONS,
    SyntheticDecode,
    attention_model_spec,
    run_decode,
)
from hw_backend.device_work import FixedDelayWork
from hw_backend.devices import STANDIN_LABEL, CoreSplit, make_accelerator
from hw_backend.executor import PlanExecutor
from hw_backend.kv_store import KvStore
from hw_backend.timing import compare_steps

LAYERS, HEADS, KV_HEADS, DIM = 3, 8, 2, 64
CONTEXT, STEPS = 8192, 8
MODEL = attention_model_spec(layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM)
WORKLOAD = Workload(batch=1, context=CONTEXT, gen=STEPS, kv_dtype="fp32", weight_dtype="fp32")
PROFILE = load_profile("dev-zen4-2core")


@pytest.fixture(scope="module")
def source():
    return SyntheticDecode(layers=LAYERS, batch=1, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM,
                           context=CONTEXT, steps=STEPS)


def decode(source, policy_name: str, options: dict, device_work=None):
    policy = make_policy(policy_name, MODEL, PROFILE, WORKLOAD, {**SIZED_HBM_OPTIONS, **options})
    with make_accelerator("standin", CoreSplit(1, 1)) as accel:
        store = KvStore(accel, num_layers=LAYERS, batch=1, kv_heads=KV_HEADS, head_dim=DIM,
                        capacity=CONTEXT + STEPS)
        source.load(store)
        with PlanExecutor(store, accel, device_work=device_work) as executor:
            return policy, run_decode(policy, executor, source)


def test_scheduler_receives_the_measured_times(source):
    policy, run = decode(source, "hybridgen", {"gpu_share": 0.05, "interval": 2})
    history = policy.scheduler.history
    assert len(history) == STEPS
    assert [h.host_s for h in history] == [s.host_s for s in run.steps]
    assert [h.device_s for h in history] == [s.device_s for s in run.steps]
    # Each step's plan used the ratio the scheduler held before that step.
    ratios = [policy.scheduler.config.initial_ratio] + [h.ratio for h in history[:-1]]
    for step, ratio in zip(run.steps, ratios, strict=True):
        host = step.context - step.gpu_tokens
        assert step.topk_ratio == pytest.approx(max(1, round(ratio * host)) / host)


def test_host_bottleneck_moves_tokens_to_the_gpu_or_shrinks_the_ratio(source):
    # No device work and no look-ahead: nothing hides the CPU scan of ~7.8k host tokens.
    policy, run = decode(source, "hybridgen",
                         {"gpu_share": 0.05, "interval": 2, "lookahead": False})
    assert sum(s.host_s for s in run.steps) > sum(s.device_s for s in run.steps)
    sched = policy.scheduler
    # A scan-bound host keeps its ratio and gets a larger GPU share, else the ratio shrinks.
    assert sched.gpu_share > 0.05 or sched.ratio < sched.config.initial_ratio
    assert run.steps[-1].gpu_tokens >= run.steps[0].gpu_tokens
    if sched.gpu_share > 0.05:  # the executor really moved the boundary between steps
        assert run.steps[-1].gpu_tokens > run.steps[0].gpu_tokens


def test_device_work_that_hides_the_host_grows_the_topk_ratio(source):
    busy = FixedDelayWork(before_s=0.004, after_s=0.004)  # a slow FFN on the device
    policy, run = decode(source, "hybridgen", {"gpu_share": 0.05, "interval": 2}, busy)
    # host_s < device_s: the host path (started at its trigger, like the device's work) was
    # done before the device needed it, i.e. the CPU work ran hidden behind device work.
    assert sum(s.host_s for s in run.steps) < sum(s.device_s for s in run.steps)
    assert sum(s.cpu_busy_s for s in run.steps) > 0
    assert policy.scheduler.ratio > policy.scheduler.config.initial_ratio


def test_records_follow_the_simulator_schema(source):
    _, run = decode(source, "hybridgen_exact", {"gpu_share": 0.1})
    assert all(isinstance(s, StepTiming) for s in run.steps)
    assert len(run.layers) == STEPS * LAYERS
    for step in run.steps:
        layers = [t for t in run.layers if t.step == step.step]
        assert step.gpu_busy_s == pytest.approx(sum(t.gpu_s for t in layers))
        assert step.cpu_busy_s == pytest.approx(sum(t.cpu_s for t in layers))
        assert step.pcie_busy_s == pytest.approx(sum(t.transfer_s for t in layers))
        assert step.host_s == pytest.approx(sum(t.host_s for t in layers))
        assert step.device_s == pytest.approx(sum(t.device_s for t in layers))
        assert step.stall_s == pytest.approx(max(step.latency_s - step.gpu_busy_s, 0.0))
        assert step.topk_ratio == 1.0 and step.latency_s > 0
        assert all(t.cpu_s > 0 and t.transfer_s > 0 and t.host_s > 0 for t in layers)
    assert {t.device for t in run.layers} == {STANDIN_LABEL}
    steps = run.steps_frame()
    assert set(steps["source"]) == {STANDIN_LABEL}
    assert {f.name for f in fields(StepTiming)} <= set(steps.columns)
    assert {"layer", "cpu_s", "gpu_s", "transfer_s", "stall_s"} <= set(run.layers_frame().columns)


def test_measured_and_simulated_steps_share_one_table(source):
    _, run = decode(source, "cpu_offload", {})
    simulated = simulate(PROFILE, MODEL, "cpu_offload", WORKLOAD,
                         policy_options=SIZED_HBM_OPTIONS, fidelity=Fidelity(decode_samples=0))
    table = compare_steps(run.steps, simulated.steps, device=run.device)
    assert list(table["source"].value_counts().sort_index().items()) == [
        (STANDIN_LABEL, STEPS), ("simulated", STEPS)]
    side_by_side = table.pivot(index="step", columns="source", values="latency_s")
    assert side_by_side.notna().all().all()
    # Same contexts, same plan: CPU offload keeps every token on the host.
    assert (table.groupby("source")["gpu_tokens"].max() == 0).all()

"""An attention-only workload (hw_backend's attention validation) has no weights: the executor
runs attention alone and holds none, so the plan it shares with the simulator must not give
them HBM room or stream them.

Before, a policy placed the model's weights for an attention-only workload as for a whole
model: under an HBM budget that left no room for them it offloaded them, and the simulator
streamed 3.5 GB of weights over PCIe every step that the executor never loaded (an
attention-only validation under a 3.2 GB budget was predicted 2-6x too slow).
"""

from __future__ import annotations

import json

import pytest

from hgsim.hbm_budget import HbmBudget
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

MODEL = "llama-3.1-8b"


def _workload(attention_only: bool) -> Workload:
    return Workload(batch=1, context=32768, gen=2, kv_dtype="bf16", weight_dtype="bf16",
                    attention_only=attention_only)


@pytest.mark.parametrize("policy", ["hybridgen", "hgca", "flexgen_cpu", "cpu_offload"])
def test_attention_only_plans_hold_no_weights(policy):
    profile = HbmBudget(8.0).apply(load_profile("h100-80gb-spr-cxl"))  # under 8B's 16 GB
    whole = make_policy(policy, _get(MODEL), profile, _workload(False))
    alone = make_policy(policy, _get(MODEL), profile, _workload(True))
    assert whole.offloaded_weight_bytes > 0  # the budget cannot hold them next to any KV
    assert alone.offloaded_weight_bytes == 0
    assert alone.step_plan(32768).offloaded_weight_bytes_per_layer == 0
    # the weights' HBM room (resident part and streaming buffer) is KV room now
    assert alone.footprint.used_bytes["hbm"] < whole.footprint.used_bytes["hbm"]
    assert alone.step_plan(32768).layer.gpu_tokens >= whole.step_plan(32768).layer.gpu_tokens


def test_an_attention_only_step_streams_no_weights():
    """CPU offload keeps every token on the host whatever the HBM: with no weights to place,
    an 8 GB budget runs the attention-only step exactly as the whole 80 GB card does."""
    full = load_profile("h100-80gb-spr-cxl")
    fidelity = Fidelity(decode_samples=0, accuracy=False)
    capped = simulate(HbmBudget(8.0).apply(full), MODEL, "cpu_offload", _workload(True),
                      fidelity=fidelity)
    whole_card = simulate(full, MODEL, "cpu_offload", _workload(True), fidelity=fidelity)
    assert [s.latency_s for s in capped.steps] == pytest.approx(
        [s.latency_s for s in whole_card.steps], rel=1e-12)


def _get(name):
    from hgsim.catalog import get_model

    return get_model(name)


def test_an_hbm_budget_need_not_hold_the_weights_of_an_attention_only_run(capsys):
    """The budget check asks a budget to hold the weights only where the run loads them: an
    attention-only run under a budget smaller than the model's weights runs, and measures and
    simulates the same split of the context, as an attention-only validation under it does."""
    from hgsim.cli import main
    from hgsim.errors import UserError

    tiny = _get("tiny-llama")
    budget = HbmBudget.parse("0.1MB")
    assert tiny.weight_bytes("fp32") > budget.bytes_
    with pytest.raises(UserError, match="cannot hold"):  # a whole-model run loads them
        budget.check(device_bytes=80e9, model=tiny, weight_dtype="fp32")
    budget.check(device_bytes=80e9, model=tiny, weight_dtype="fp32", attention_only=True)
    code = main(["run", "--model", "tiny-llama", "--profile", "dev-zen4-2core", "--no-progress",
                 "--accelerator", "standin", "--policy", "hgca", "--context", "1k", "--gen",
                 "2", "--warmup", "0", "--attention-only", "--hbm-budget", "0.1MB",
                 "--option", "hbm_reserve_gb=0", "--option", "hbm_reserve_fraction=0",
                 "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    measured, simulated = rows["measured"], rows["simulated"]
    # the budget holds part of the context: the plan splits it on both sides
    assert 0 < measured["final_gpu_tokens"] == simulated["final_gpu_tokens"] < 1024


@pytest.mark.parametrize("attention_only", [False, True])
def test_an_hbm_sized_for_gpu_tokens_keeps_exactly_those_tokens(attention_only):
    """``profile_for_gpu_tokens`` sizes HBM as the plan fills it: the weights where the plan
    places them, and the KV of the given tokens. HGCA keeps as many recent tokens as fit, so
    it keeps exactly those, attention-only (no weights placed) or not."""
    from hw_backend.decode_loop import (
        SIZED_HBM_OPTIONS,
        attention_model_spec,
        profile_for_gpu_tokens,
    )

    model = attention_model_spec(layers=2, heads=8, kv_heads=2, head_dim=64, vocab=32000)
    workload = Workload(batch=1, context=4000, gen=1, kv_dtype="fp32", weight_dtype="fp32",
                        attention_only=attention_only)
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload, 1000)
    policy = make_policy("hgca", model, profile, workload, SIZED_HBM_OPTIONS)
    assert policy.step_plan(4000).layer.gpu_tokens == 1000

"""An attention-only workload (hw_backend's attention validation) has no weights: the executor
runs attention alone and holds none, so the plan it shares with the simulator must not give
them HBM room or stream them.

Before, a policy placed the model's weights for an attention-only workload as for a whole
model: under an HBM budget that left no room for them it offloaded them, and the simulator
streamed 3.5 GB of weights over PCIe every step that the executor never loaded (an
attention-only validation under a 3.2 GB budget was predicted 2-6x too slow).
"""

from __future__ import annotations

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

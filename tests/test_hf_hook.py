"""A transformers Llama model decoding through the plan executor gives the unmodified tokens.

A tiny random-initialised Llama (no downloads) decodes 16 tokens greedily, first as is, then
with ``HybridAttentionHook`` replacing its decode attention by the executor's plan-driven
hybrid attention over a KV cache split per the plan. Exact plans must reproduce the tokens (and
the logits to float32 rounding); a top-k plan must visibly change the logits, which shows the
hook really computes the attention.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hgsim.policies import make_policy  # noqa: E402
from hgsim.profiles import load_profile  # noqa: E402
from hgsim.workload import Workload  # noqa: E402
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, attention_model_spec  # noqa: E402
from hw_backend.devices import STANDIN_LABEL, CoreSplit, make_accelerator  # noqa: E402
from hw_backend.hf_hook import HybridAttentionHook, greedy_decode  # noqa: E402

LAYERS, HEADS, KV_HEADS, HIDDEN = 3, 4, 2, 128
PROMPT, NEW_TOKENS = 96, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        initializer_range=0.3,  # peaked attention and varied tokens from random weights
        attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(model, prompt):
    return greedy_decode(model, prompt, NEW_TOKENS, return_logits=True)


def policy(name: str, options: dict):
    spec = attention_model_spec(layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                                head_dim=HIDDEN // HEADS)
    workload = Workload(batch=1, context=PROMPT + 1, gen=NEW_TOKENS, kv_dtype="fp32",
                        weight_dtype="fp32")
    return make_policy(name, spec, load_profile("dev-zen4-2core"), workload,
                       {**SIZED_HBM_OPTIONS, **options})


def decode_with_hook(model, prompt, pol):
    with make_accelerator("standin", CoreSplit(1, 1)) as accel:
        with HybridAttentionHook(model, plan_for=pol, accel=accel) as hook:
            tokens, logits = greedy_decode(model, prompt, NEW_TOKENS, return_logits=True)
    return tokens, logits, hook


@pytest.mark.parametrize(("name", "options"), [
    ("hybridgen_exact", {"gpu_share": 0.25}),
    ("cpu_offload", {}),
    ("gpu_only", {}),
])
def test_exact_plans_reproduce_the_unmodified_tokens(model, prompt, reference, name, options):
    pol = policy(name, options)
    tokens, logits, hook = decode_with_hook(model, prompt, pol)
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(logits, reference[1], rtol=1e-4, atol=1e-4)
    assert len(hook.steps) == NEW_TOKENS - 1  # the first token comes from the prefill
    assert {r.device for r in hook.layer_records} == {STANDIN_LABEL}
    if name != "gpu_only":
        assert all(t.host_tokens > 0 and t.cpu_s > 0 for t in hook.layer_records)


def test_topk_plan_changes_the_logits_and_feeds_the_scheduler(model, prompt, reference):
    pol = policy("hybridgen", {"gpu_share": 0.1, "topk_ratio": 0.05, "interval": 2})
    _, logits, hook = decode_with_hook(model, prompt, pol)
    assert (logits[:, 1:] - reference[1][:, 1:]).abs().max() > 1e-3
    assert pol.scheduler.steps == NEW_TOKENS - 1
    assert [h.host_s for h in pol.scheduler.history] == [s.host_s for s in hook.steps]


def test_removing_the_hook_restores_the_model(model, prompt, reference):
    decode_with_hook(model, prompt, policy("hybridgen", {"gpu_share": 0.1}))
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(greedy_decode(model, prompt, NEW_TOKENS), reference[0])

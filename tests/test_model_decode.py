"""Whole-model decode through the plan executor on the CPU stand-in (tiny models).

Where a policy's plan is exact (every host token attended), the executor's decode must give the
logits and greedy tokens of the same model decoded with dense attention in float64, for every
split between device and host the policies choose. Lossy plans keep their invariants: finite
logits, the selection sizes the plan asked for, and the scheduler fed every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from hgsim.catalog import MODELS, get_model
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, profile_for_gpu_tokens
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.model_decode import ModelDecode
from hw_backend.transformer import (
    DenseDecoder,
    ModelWeights,
    apply_rotary,
    inverse_frequencies,
    rotary_tables,
)

T, STEPS = 300, 4  # context at the first step, decoded tokens
TINY_OPT = ModelSpec(name="tiny-opt", family="opt", num_layers=2, hidden_size=64, num_heads=4,
                     num_kv_heads=4, head_dim=16, ffn_size=128, ffn_kind="relu", vocab_size=200,
                     max_context=1 << 20, qkv_bias=True, tied_embeddings=True)


def prefix_kv(spec: ModelSpec, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    shape = (1, spec.num_kv_heads, T - 1, spec.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
            for _ in range(spec.num_layers)]


def policy_for(spec: ModelSpec, name: str, options: dict, gpu_tokens: int | None):
    workload = Workload(context=T, gen=STEPS, kv_dtype="fp32", weight_dtype="fp32")
    profile = load_profile("dev-zen4-2core")
    if gpu_tokens is not None:  # an HBM that holds the weights and this many tokens
        profile = profile_for_gpu_tokens(profile, spec, workload, gpu_tokens)
        options = {**SIZED_HBM_OPTIONS, **options}
    return make_policy(name, spec, profile, workload, options)


def decode(spec: ModelSpec, weights: ModelWeights, policy, prefix, graphs: bool = False):
    """The stand-in decodes; ``graphs`` runs the CUDA graph path's programs (eagerly here)."""
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, weights=weights, capacity=T + STEPS, graphs=graphs) as model:
        model.load_prefix(prefix)
        return model.decode(policy, STEPS, keep_logits=True)


def reference(spec: ModelSpec, weights: ModelWeights, prefix, tokens):
    """Float64 dense decode fed the tokens the executor's run chose (teacher forcing)."""
    dense = DenseDecoder(weights.to(torch.float64), [(k.double(), v.double()) for k, v in prefix])
    first = torch.randint(spec.vocab_size, (1,), generator=torch.Generator().manual_seed(1))
    inputs = [first] + [torch.tensor(t) for t in tokens[:-1]]
    return [dense.step(x) for x in inputs]


EXACT = [  # (policy, options, HBM sized for this many tokens or None for the dev profile)
    ("gpu_only", {}, None),
    ("cpu_offload", {}, None),
    ("flexgen", {"gpu_kv_fraction": 0.3}, None),
    ("flexgen_cpu", {"gpu_kv_fraction": 0.3}, None),
    ("hybridgen_exact", {"gpu_share": 0.3, "lookahead": False}, None),
    ("hybridgen_exact", {"gpu_share": 0.0, "lookahead": False}, None),
    ("hgca", {"topk_ratio": 1.0}, 120),
    ("infinigen", {"topk_ratio": 1.0}, 450),  # its prefetch buffer takes HBM first
]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen", "tiny-opt"])
@pytest.mark.parametrize(("policy", "options", "gpu_tokens"), EXACT,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(EXACT)])
def test_exact_plans_decode_like_dense_attention(model_name, policy, options, gpu_tokens,
                                                 graphs):
    spec = TINY_OPT if model_name == "tiny-opt" else get_model(model_name)
    weights = ModelWeights.random(spec, seed=3)
    prefix = prefix_kv(spec)
    pol = policy_for(spec, policy, options, gpu_tokens)
    run = decode(spec, weights, pol, prefix, graphs)
    plan = run.plans[0].layer
    if policy not in ("gpu_only", "cpu_offload") and options.get("gpu_share") != 0.0:
        # the split really splits (gpu_share 0: every token, the new one too, on the host)
        assert 0 < plan.gpu_tokens < plan.context, (plan.gpu_tokens, plan.context)
    want = reference(spec, weights, prefix, run.tokens)
    for step, (got, expected) in enumerate(zip(run.logits, want, strict=True)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
        assert run.tokens[step] == expected.argmax(-1).tolist()
    assert [s.context for s in run.steps] == [T + t for t in range(STEPS)]
    assert all(s.latency_s > 0 for s in run.steps)
    assert all(tok >= s.latency_s for tok, s in zip(run.token_s, run.steps, strict=True))


def test_lookahead_host_logits_use_the_previous_layers_input():
    """HybridGen's look-ahead scans layer i+1 with layer i+1's query projected from layer i's
    input: exact in selection (every token) but approximate in its logits, so the output moves
    away from dense attention; without look-ahead the same plan is exact (test above)."""
    spec = get_model("tiny-llama")
    weights = ModelWeights.random(spec, seed=3)
    prefix = prefix_kv(spec)
    pol = policy_for(spec, "hybridgen_exact", {"gpu_share": 0.3}, None)
    run = decode(spec, weights, pol, prefix)
    assert run.plans[0].layer.lookahead
    want = reference(spec, weights, prefix, run.tokens)
    diffs = [(got.double() - expected).abs().max().item()
             for got, expected in zip(run.logits, want, strict=True)]
    assert all(math.isfinite(d) for d in diffs)
    assert max(diffs) > 1e-3  # the approximation is really used


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_adaptive_hybridgen_feeds_its_scheduler_every_step(graphs):
    spec = get_model("tiny-llama")
    weights = ModelWeights.random(spec, seed=3)
    pol = policy_for(spec, "hybridgen", {"gpu_share": 0.3, "interval": 1}, None)
    run = decode(spec, weights, pol, prefix_kv(spec), graphs)
    assert len(run.scheduler) == STEPS
    for t, plan in enumerate(run.plans):
        lp = plan.layer
        assert 0 < lp.host_selected < lp.host_tokens
        assert run.steps[t].topk_ratio == pytest.approx(lp.topk_ratio)
        assert torch.isfinite(run.logits[t]).all()
    hosts = [r for r in run.layers if r.host_tokens]
    assert hosts and all(r.host_s > 0 and r.cpu_s > 0 and r.upload_bytes > 0 for r in hosts)


def test_random_weights_have_the_catalog_shapes():
    spec = get_model("tiny-qwen")
    weights = ModelWeights.random(spec)
    norms = spec.num_layers * 2 * spec.hidden_size + spec.hidden_size
    biases = spec.num_layers * (spec.q_dim + 2 * spec.kv_dim)
    assert weights.nbytes == 4 * (spec.num_params() + norms + biases)
    layer = weights.layers[0]
    assert layer.w_qkv.shape == (spec.hidden_size, spec.q_dim + 2 * spec.kv_dim)
    assert layer.w_up.shape == (spec.hidden_size, 2 * spec.ffn_size)  # SwiGLU: gate | up


def test_tiny_models_stay_out_of_the_catalog_listing():
    assert "tiny-llama" not in MODELS and get_model("Tiny_Llama").name == "tiny-llama"


def test_rotary_keeps_norms_and_depends_on_relative_position():
    spec = get_model("llama-3.1-8b")
    inv = inverse_frequencies(spec)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, spec.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, spec.head_dim, generator=g, dtype=torch.float64)

    def at(x, position):
        cos, sin = rotary_tables(torch.tensor([position]), inv, torch.float64)
        return apply_rotary(x, cos, sin)

    assert torch.allclose(at(q, 977).norm(), q.norm())
    score = (at(q, 1000) * at(k, 990)).sum()
    assert torch.allclose(score, (at(q, 60_010) * at(k, 60_000)).sum())


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_a_truncated_context_decodes_as_a_freshly_loaded_one(graphs):
    """Benchmarks run several policies over one filled context: after ``truncate`` the next
    decode must see exactly the context it would after a fresh load."""
    spec = get_model("tiny-llama")
    weights = ModelWeights.random(spec, seed=3)
    prefix = prefix_kv(spec)
    first = policy_for(spec, "hybridgen", {"gpu_share": 0.3, "adaptive": False}, None)
    second = policy_for(spec, "flexgen_cpu", {"gpu_kv_fraction": 0.3}, None)
    with make_accelerator("standin", CoreSplit(1, 1)) as accel:
        with ModelDecode(spec, accel, weights=weights, capacity=T + STEPS, graphs=graphs) as m:
            m.load_prefix(prefix)
            m.decode(first, STEPS)
            store = m.store
        store.truncate(T - 1)
        with ModelDecode(spec, accel, weights=weights, store=store, graphs=graphs) as m:
            reused = m.decode(second, STEPS, keep_logits=True)
    fresh = decode(spec, weights, policy_for(spec, "flexgen_cpu", {"gpu_kv_fraction": 0.3},
                                             None), prefix, graphs)
    for got, want in zip(reused.logits, fresh.logits, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_a_dropped_decoder_frees_its_weights_and_cache_at_once(graphs):
    """Validation draws fresh weights per case under an HBM budget: the previous case's must be
    freed when it is dropped, not whenever Python's cyclic collector next runs."""
    import gc
    import weakref

    spec = get_model("tiny-llama")
    policy = policy_for(spec, "hybridgen_exact", {"gpu_share": 0.3, "lookahead": False}, None)
    with make_accelerator("standin", CoreSplit(1, 1)) as accel:
        gc.collect()
        gc.disable()
        try:
            with ModelDecode(spec, accel, capacity=T + STEPS, graphs=graphs) as model:
                model.load_prefix(prefix_kv(spec))
                model.decode(policy, 2)
                alive = [weakref.ref(model.weights.embed),
                         weakref.ref(model.store.layers[0].host_k),
                         weakref.ref(model.executor)]
            del model
            assert [ref() is None for ref in alive] == [True, True, True]
        finally:
            gc.enable()

"""The simulator's kernels per graph op (``hgsim.graph_path.GRAPH_KERNELS``) recounted from the
executor's graph programs, run eagerly on the CPU stand-in under a counting dispatch mode.

Every op kind the graph path captures, for every plan kind that reaches it, at 32-bit and
16-bit weights and KV, for each model family: the counts the executor's programs issue must be
the ones the simulator charges, so that the table cannot drift from the programs.
"""

from __future__ import annotations

import pytest
import torch

from hgsim.catalog import get_model
from hgsim.costs import projects_next_query
from hgsim.graph_path import GRAPH_KERNELS, MODEL_OPS, merge_op, op_kernels, qkv_kernels
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, profile_for_gpu_tokens
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.graph_kernels import KernelCounter, count_graph_kernels, launches_kernel
from hw_backend.model_decode import TORCH_DTYPES, ModelDecode
from hw_backend.transformer import ModelWeights

T, STEPS = 300, 2
TINY_OPT = ModelSpec(name="tiny-opt", family="opt", num_layers=2, hidden_size=64, num_heads=4,
                     num_kv_heads=4, head_dim=16, ffn_size=128, ffn_kind="relu", vocab_size=200,
                     max_context=1 << 20, qkv_bias=True, tied_embeddings=True)
#: (policy, options, HBM sized for this many tokens or None): together every op and merge
PLANS = [
    ("hybridgen_static", {"topk_ratio": 0.1, "gpu_share": 0.3}, None),  # top-k, look-ahead
    ("hybridgen_exact", {"gpu_share": 0.3, "lookahead": False}, None),
    ("cpu_offload", {}, None),  # no device window: qkv without the append
    ("flexgen", {"gpu_kv_fraction": 0.3}, None),
    ("infinigen", {"topk_ratio": 1.0}, 450),  # speculation, partial keys, rows
]
MODELS = {"llama": "tiny-llama", "qwen": "tiny-qwen", "opt": None}


def spec_of(family: str) -> ModelSpec:
    return TINY_OPT if MODELS[family] is None else get_model(MODELS[family])


def policy_for(spec: ModelSpec, name: str, options: dict, gpu_tokens: int | None, dtype: str):
    workload = Workload(context=T, gen=STEPS, kv_dtype=dtype, weight_dtype=dtype)
    profile = load_profile("dev-zen4-2core")
    if gpu_tokens is not None:
        profile = profile_for_gpu_tokens(profile, spec, workload, gpu_tokens)
        options = {**SIZED_HBM_OPTIONS, **options}
    return make_policy(name, spec, profile, workload, options)


def counted_run(spec: ModelSpec, weights: ModelWeights, policy, dtype: str):
    """The graph path's programs run on the stand-in: kernels per op kind, and the plans."""
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, weights=weights, capacity=T + STEPS, graphs=True,
                        dtype=dtype, kv_dtype=dtype) as model:
        model.fill_random(T - 1)
        counts = count_graph_kernels(model.executor.side)
        run = model.decode(policy, STEPS)
    return counts, run.plans


def expected_counts(spec: ModelSpec, lp, dtype: str) -> dict[str, set[int]]:
    """What the simulator charges each op the executor ran for this layer plan."""
    def k(op: str) -> int:
        return op_kernels(op, spec, dtype, dtype)

    qkv = qkv_kernels(spec, lp, dtype, dtype, attention_only=False)
    want = {"qkv": {qkv}, "post": {k("post")}, "lm_head": {k("lm_head")}}
    if projects_next_query(lp):  # the last layer projects no next query
        want["qkv"].add(qkv - k("lookahead_query"))
    if lp.gpu_tokens:
        want["attention"] = {k("attention")}
    if lp.speculate_key_fraction and lp.host_tokens:
        want["speculate"] = {k("speculate")}
    merge = merge_op(lp)
    if merge is not None:
        want[merge] = {k(merge)}
    return want


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_declared_kernel_counts_are_the_programs_counts(dtype):
    covered: set[tuple[str, object]] = set()
    for family in MODELS:
        spec = spec_of(family)
        weights = ModelWeights.random(spec, seed=3, dtype=TORCH_DTYPES[dtype])
        plans = PLANS if family == "llama" else PLANS[:3]  # KV ops do not depend on the family
        for name, options, gpu_tokens in plans:
            policy = policy_for(spec, name, options, gpu_tokens, dtype)
            counts, step_plans = counted_run(spec, weights, policy, dtype)
            lp = step_plans[0].layer
            want = expected_counts(spec, lp, dtype)
            got = {op: set(v) for op, v in counts.items()}
            assert got == want, (family, name, dtype)
            width = 4 if dtype == "fp32" else 2
            covered |= {(op, (family, width) if op in MODEL_OPS else width) for op in got}
            if projects_next_query(lp):
                covered.add(("lookahead_query", (family, width)))
            if lp.gpu_recent_tokens:
                covered.add(("append", width))
            if lp.speculate_key_fraction:
                covered.add(("partial_key", width))
    width = 4 if dtype == "fp32" else 2
    declared = {(op, key) for op, table in GRAPH_KERNELS.items() for key in table
                if (key[1] if isinstance(key, tuple) else key) == width}
    assert declared == covered  # every entry of the table is checked against a program


def test_views_and_allocations_launch_no_kernel():
    x = torch.ones(4, 6)
    with KernelCounter() as counter:
        y = x.view(2, 12)
        y.t().unsqueeze(0)
        torch.empty(3)
        y.reshape(-1)
    assert counter.kernels == 0
    with KernelCounter() as counter:
        x.t().reshape(-1)  # a non-contiguous view reshaped is a copy
    assert counter.kernels == 1
    with KernelCounter() as counter:
        torch.matmul(x, x.t()).add_(1.0)
    assert counter.kernels == 2 and counter.names == ["mm", "add_"]
    assert not launches_kernel(torch.ops.aten.view.default)

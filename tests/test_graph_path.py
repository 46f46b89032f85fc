"""The CUDA graph path's CPU-testable parts: shape buckets, the fixed-shape programs, and the
executor's graph side run eagerly on the stand-in (capture itself is in test_executor_gpu).

Padded programs must equal the exact-shape math in float64 whatever the padding holds, never
produce NaN for empty blocks, and a steady decode must replay the same programs over the same
buffers step after step (what lets a GPU capture them once).
"""

from __future__ import annotations

import math

import pytest
import torch

from hgsim.catalog import get_model
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend import graph_programs as gp
from hw_backend.buckets import MIN_BUCKET, buckets_between, token_bucket
from hw_backend.devices import CoreSplit, make_accelerator
from hw_backend.graphs import GraphCache, buffer_key
from hw_backend.merge import attend_rows, lse_merge, partial_attention, softmax_union
from hw_backend.model_decode import ModelDecode

F64 = torch.float64


# ----------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("count", [0, 1, 16, 17, 100, 1000, 4097, 32768, 32769, 131071, 10**6])
def test_a_bucket_holds_its_count_with_at_most_an_eighth_of_padding(count):
    bucket = token_bucket(count)
    assert bucket >= count
    assert bucket == MIN_BUCKET or bucket <= math.ceil(count * 1.125)


def test_buckets_are_monotonic_and_few():
    buckets = [token_bucket(n) for n in range(1, 20000)]
    assert buckets == sorted(buckets)
    # a 64-token decode from 32k crosses at most one bucket boundary
    assert len(buckets_between(32768, 32768 + 64)) <= 2
    assert len(set(buckets)) == len(buckets_between(1, 19999)) < 90  # 8 per doubling


def test_bucket_is_capped_by_capacity():
    assert token_bucket(100, limit=101) == 101
    with pytest.raises(ValueError):
        token_bucket(102, limit=101)


# ----------------------------------------------------------------------------- programs
def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def padded(t: torch.Tensor, dim: int, size: int, fill=float("nan")) -> torch.Tensor:
    """``t`` grown along ``dim`` to ``size`` with ``fill`` (NaN: padding must never leak)."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat((t, torch.full(shape, fill, dtype=t.dtype)), dim=dim)


def count(n: int) -> torch.Tensor:
    return torch.tensor([n])


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding (the device math accumulates in float32, as ``merge`` does)."""
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


B, H, KVH, D = 2, 8, 2, 16


@pytest.mark.parametrize(("n", "bucket"), [(37, 40), (16, 16), (1, 16)])
def test_masked_attention_equals_attention_over_the_valid_slots(n, bucket):
    q, k, v = randn(B, H, D), randn(B, KVH, n, D, seed=1), randn(B, KVH, n, D, seed=2)
    # the padding holds finite stale rows (the executor zeroes its slots)
    kp, vp = padded(k, 2, bucket, 7.0), padded(v, 2, bucket, 7.0)
    got, lse = gp.masked_partial_attention(q, kp, vp, count(n), 0.25)
    group = H // KVH
    scores = torch.einsum("bhd,bhtd->bht", q, k.repeat_interleave(group, 1)) * 0.25
    want = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), v.repeat_interleave(group, 1))
    close(got, want)
    close(lse, torch.logsumexp(scores, -1))


def test_an_empty_block_has_no_nan():
    q, k = randn(B, H, D), torch.zeros(B, KVH, 16, D, dtype=F64)
    out, lse = gp.masked_partial_attention(q, k, k, count(0), 0.25)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    merged, total = gp.lse_merge_pair((out, lse), (out, lse))
    assert not torch.isnan(merged).any() and torch.all(total == float("-inf"))


def test_unflatten_padded_reads_the_contiguous_prefix():
    k, bucket = 5, 8
    data = randn(B * H, k, D)
    flat = padded(data.reshape(-1), 0, B * H * bucket * D, 3.0)
    rows, mask = gp.unflatten_padded(flat, B * H, count(k), bucket, D)
    torch.testing.assert_close(rows[:, :k], data)
    assert mask.tolist() == [True] * k + [False] * (bucket - k)
    assert torch.isfinite(rows).all()


@pytest.mark.parametrize("per_head", [True, False])
def test_softmax_union_padded_equals_hybridgens_merge(per_head):
    n_dev, k, bucket = 30, 11, 16
    q = randn(B, H, D)
    device = partial_attention(q, randn(B, KVH, n_dev, D, seed=1), randn(B, KVH, n_dev, D,
                                                                          seed=2), 0.25)
    logits = randn(B, H, k, seed=3)
    flat_logits = padded(logits.reshape(-1), 0, B * H * bucket, 9.0)
    if per_head:
        rows = randn(B, H, k, D, seed=4)
        values = padded(rows.reshape(-1), 0, B * H * bucket * D, 9.0)
        want = softmax_union(device, logits, rows)
    else:  # exact mode: one V block per KV head, padded along its tokens
        block = randn(B, KVH, k, D, seed=4)
        values = padded(block, 2, bucket, 9.0)
        want = softmax_union(device, logits, block)
    got = gp.softmax_union_padded(device, flat_logits, values, count(k), per_head=per_head)
    close(got[0], want[0])
    close(got[1], want[1])


def test_softmax_union_padded_with_rows_per_kv_group_equals_the_eager_merge():
    """Per-KV-group selection (issue 21): (B, KVH, m, D) distinct rows, every head's logits over
    its group's rows, padding rows inside m at logit -inf, columns past m masked."""
    n_dev, m, bucket = 30, 11, 16
    q = randn(B, H, D)
    device = partial_attention(q, randn(B, KVH, n_dev, D, seed=1), randn(B, KVH, n_dev, D,
                                                                          seed=2), 0.25)
    logits = randn(B, H, m, seed=3)
    logits[:, : H // KVH, m - 3 :] = float("-inf")  # group 0 kept fewer rows: padding
    rows = randn(B, KVH, m, D, seed=4)
    want = softmax_union(device, logits, rows)  # the eager path's merge
    got = gp.softmax_union_padded(device, padded(logits.reshape(-1), 0, B * H * bucket, 9.0),
                                  padded(rows.reshape(-1), 0, B * KVH * bucket * D, 9.0),
                                  count(m), per_head=True, kv_heads=KVH)
    close(got[0], want[0])
    close(got[1], want[1])


def test_stream_and_rows_merges_equal_the_eager_ones():
    n, bucket, scale = 21, 24, 0.25
    q = randn(B, H, D)
    device = partial_attention(q, randn(B, KVH, 9, D, seed=1), randn(B, KVH, 9, D, seed=2), scale)
    k, v = randn(B, KVH, n, D, seed=3), randn(B, KVH, n, D, seed=4)
    got = gp.stream_merge(device, q, padded(k, 2, bucket, 0.0), padded(v, 2, bucket, 0.0),
                          count(n), scale)
    want = lse_merge([device, partial_attention(q, k, v, scale)])
    close(got[0], want[0])
    kr, vr = randn(B, H, 5, D, seed=5), randn(B, H, 5, D, seed=6)
    got = gp.rows_merge(device, q, padded(kr.reshape(-1), 0, B * H * 8 * D, 1.0),
                        padded(vr.reshape(-1), 0, B * H * 8 * D, 1.0), count(5), 8, scale)
    want = lse_merge([device, attend_rows(q, kr, vr, scale)])
    close(got[0], want[0])


def test_speculation_picks_the_top_k_inside_the_host_range():
    c, span, start, end, k, columns = 4, 64, 10, 50, 6, 8
    query, keys = randn(B, KVH, H // KVH, c), randn(B, KVH, span, c, seed=1)
    got = gp.speculate_topk(query, keys, torch.tensor([start]), torch.tensor([end]), columns)
    scores = torch.matmul(query, keys[:, :, start:end].transpose(-1, -2)).reshape(B, H, -1)
    want = torch.topk(scores, k, dim=-1).indices + start
    assert torch.equal(got[..., :k], want)
    assert int(got[..., :k].min()) >= start and int(got[..., :k].max()) < end


# ----------------------------------------------------------------------------- the cache
def test_graph_cache_counts_what_a_gpu_would_capture():
    cache = GraphCache(capture=False)
    x = torch.zeros(3)
    for _ in range(4):
        cache.run(("add", buffer_key(x)), lambda: x.add_(1), "add")
    cache.run(("add", buffer_key(torch.zeros(3))), lambda: None, "add")
    assert torch.equal(x, torch.full((3,), 4.0))
    assert cache.stats.keys == 2 and cache.stats.eager_runs == 5 and cache.stats.captures == 0


def test_a_steady_decode_replays_the_same_programs_over_the_same_buffers():
    """After the first steps, every step uses graphs already seen (no capture on a GPU) and
    allocates no new device buffers."""
    spec = get_model("tiny-llama")
    context, steps = 600, 8
    workload = Workload(context=context, gen=steps, kv_dtype="fp32", weight_dtype="fp32")
    policy = make_policy("hybridgen", spec, load_profile("dev-zen4-2core"), workload,
                         {"gpu_share": 0.3, "adaptive": False})
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, capacity=context + steps, graphs=True) as model:
        model.fill_random(context - 1)
        model.reserve_for(policy, context + steps)
        side = model.executor.side
        seen, buffers = [], []
        for t in range(steps):
            model.step(policy.step_plan(model.store.length + 1), step=t)
            seen.append(side.graphs.stats.keys)
            buffers.append(sorted(b.data_ptr() for b in [*side._static.values(),
                                                         *side._landing.values()]))
    layers = spec.num_layers
    assert seen[0] == 4 * layers + 1  # qkv, attention, merge and post of every layer; LM head
    assert seen[1:] == [seen[1]] * (steps - 1)
    assert buffers[1:] == [buffers[1]] * (steps - 1)


def test_inputs_loaded_into_the_fixed_buffers_give_the_eager_outputs():
    """An attention-only caller on the graph path copies each step's inputs into the executor's
    buffers before the step (``StepBuffers.load``); outputs equal the eager path's."""
    from hgsim.plan import StepPlan
    from hw_backend.executor import PlanExecutor
    from hw_backend.kv_store import KvStore
    from hw_backend.random_kv import RandomDecode
    from hw_backend.step_buffers import StepBuffers

    layers, context, steps = 2, 700, 3
    spec = get_model("tiny-llama")
    workload = Workload(context=context, gen=steps, kv_dtype="fp32", weight_dtype="fp32")
    policy = make_policy("hybridgen_exact", spec, load_profile("dev-zen4-2core"), workload,
                         {"gpu_share": 0.25})
    source = RandomDecode(layers=layers, batch=1, heads=spec.num_heads,
                          kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, context=context,
                          steps=steps)
    outputs = {}
    for graphs in (False, True):
        with make_accelerator("standin", CoreSplit(1, 1)) as accel:
            store = KvStore(accel, num_layers=layers, batch=1, kv_heads=spec.num_kv_heads,
                            head_dim=spec.head_dim, capacity=context + steps)
            source.load(store)
            buffers = StepBuffers.allocate("cpu", layers=layers, batch=1, heads=spec.num_heads,
                                           kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                           kv_dtype=torch.float32)
            with PlanExecutor(store, accel, graphs=graphs, step_buffers=buffers) as ex:
                for t in range(steps):
                    plan = StepPlan("h", 1, policy.step_plan(context + t).layer, layers)
                    queries = [source.query(t, i) for i in range(layers)]
                    new_kv = [source.new_kv(t, i) for i in range(layers)]
                    if graphs:
                        queries, new_kv = buffers.load(queries, new_kv)
                    run = ex.step(plan, queries, new_kv=new_kv, step=t)
                    outputs[graphs, t] = [o.clone() for o in run.outputs]
    for t in range(steps):
        for got, want in zip(outputs[True, t], outputs[False, t], strict=True):
            close(got, want)


def test_captured_code_never_reads_device_values_back():
    """What runs inside a captured graph may not synchronise with the host (CUDA capture fails
    on it, and nothing here can check that without a GPU): no ``.item()``, ``.tolist()``,
    ``.cpu()``, ``.numpy()``, host tensor creation or data-dependent shapes in the programs,
    the model's layer math, or the graph side's program bodies."""
    import ast
    import inspect
    import re
    import textwrap

    from hw_backend import graph_side, transformer

    sources = [inspect.getsource(gp)]
    sources += [inspect.getsource(getattr(transformer, name)) for name in (
        "norm", "rotary_tables", "apply_rotary", "project_qkv", "project_query",
        "feed_forward", "finish_layer")]
    side = ast.parse(textwrap.dedent(inspect.getsource(graph_side.GraphDeviceSide)))
    sources += [ast.unparse(node) for node in ast.walk(side)
                if isinstance(node, ast.FunctionDef) and node.name == "program"]
    forbidden = re.compile(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(|torch\.tensor\(|nonzero|"
                           r"\.synchronize\(|masked_select|torch\.unique")
    assert len(sources) > 12
    for source in sources:
        code = _code_only(source)
        assert not forbidden.search(code), forbidden.search(code).group(0)


def _code_only(source: str) -> str:
    """``source`` without its docstrings and comments."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)

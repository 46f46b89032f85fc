"""The grouped top-k under GQA (``cpu_attention.logits_topk_grouped``, issue 21) for the C and
NumPy backends: the union of the group's per-head top-k sets or one shared top-k by the group's
max or summed scores, every head's scores over the group's rows, padding, exactness at top-k =
all against float64 attention, and argument checking."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kernel_backends import DTYPES, needs_c  # noqa: E402

import hw_backend.cpu_attention as ca  # noqa: E402

MODES = [("group_union", "max"), ("group_shared", "max"), ("group_shared", "sum")]


def make_qk(B, H, KVH, T, D, dtype="float32", seed=0, correlated=0.0):
    """Random q, K, V; ``correlated`` mixes a shared component into the queries of a group
    (heads that agree, as GQA heads do) so unions are neither k nor G k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g)
    if correlated:
        shared = torch.randn(B, KVH, D, generator=g).repeat_interleave(H // KVH, 1)
        q = correlated**0.5 * shared + (1 - correlated) ** 0.5 * q
    K = torch.randn(B, KVH, T, D, generator=g).to(DTYPES[dtype])
    V = torch.randn(B, KVH, T, D, generator=g).to(DTYPES[dtype])
    return q, K, V


def scores64(q, K, start=0, end=None):
    """float64 scaled scores (B, H, n) over [start, end), GQA by repeat_interleave."""
    G = q.shape[1] // K.shape[1]
    k64 = K[:, :, start:end].double().repeat_interleave(G, 1)
    return (q.double()[:, :, None] @ k64.transpose(-1, -2))[:, :, 0] / np.sqrt(q.shape[-1])


def expected_rows(scores, k, mode, score, G):
    """Per (b, kv head) the set of relative positions the mode keeps (float64 scores)."""
    B, H, n = scores.shape
    s = scores.reshape(B, H // G, G, n)
    if mode == "group_union":
        picked = torch.topk(s, k, dim=-1).indices.reshape(B, H // G, G * k)
    else:
        agg = s.amax(dim=2) if score == "max" else s.sum(dim=2)
        picked = torch.topk(agg, k, dim=-1).indices
    return [[set(picked[b, kh].tolist()) for kh in range(H // G)] for b in range(B)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "score"), MODES)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_grouped_topk_keeps_the_modes_rows_and_scores_them_for_every_head(be, dtype, mode,
                                                                          score, G):
    B, KVH, T, D, k, start = 2, 2, 1500, 64, 40, 100
    q, K, _ = make_qk(B, G * KVH, KVH, T, D, dtype, seed=G, correlated=0.8)
    values, indices, counts = be.logits_topk_grouped(q, K, k, mode=mode, score=score,
                                                     start=start)
    ref = scores64(q, K, start)
    m = indices.shape[2]
    assert values.shape == (B, G * KVH, m) and counts.shape == (B, KVH)
    assert int(counts.max()) == m
    want = expected_rows(ref, k, mode, score, G)
    for b in range(B):
        for kh in range(KVH):
            n = int(counts[b, kh])
            rows = indices[b, kh, :n] - start
            assert torch.all(rows[1:] > rows[:-1])  # ascending, distinct
            assert torch.all(indices[b, kh, n:] == indices[b, kh, n - 1])  # padding repeats
            got = set(rows.tolist())
            # ranking ties within float32 error aside
            assert len(got ^ want[b][kh]) <= 2 * max(1, len(want[b][kh]) // 50)
            heads = slice(kh * G, (kh + 1) * G)
            np.testing.assert_allclose(values[b, heads, :n].double(),
                                       ref[b, heads][:, rows], rtol=1e-5, atol=1e-5)
            assert torch.all(values[b, heads, n:] == float("-inf"))
    if mode == "group_shared":
        assert torch.all(counts == k)
    else:
        assert torch.all(counts >= k) and torch.all(counts <= G * k)


@pytest.mark.parametrize("G", [2, 8])
def test_union_contains_each_heads_own_topk(be, G):
    q, K, _ = make_qk(1, 2 * G, 2, 900, 32, seed=3, correlated=0.5)
    _, indices, counts = be.logits_topk_grouped(q, K, 25, mode="group_union", start=7)
    _, own = be.logits_topk(q, K, 25, start=7)
    for h in range(2 * G):
        kept = set(indices[0, h // G, : int(counts[0, h // G])].tolist())
        assert set(own[0, h].tolist()) <= kept


@pytest.mark.parametrize(("mode", "score"), MODES)
def test_one_head_per_group_is_the_per_head_topk(be, mode, score):
    q, K, _ = make_qk(2, 3, 3, 400, 16, seed=4)
    values, indices, counts = be.logits_topk_grouped(q, K, 30, mode=mode, score=score)
    ref_values, ref_indices = be.logits_topk(q, K, 30)
    assert torch.all(counts == 30)
    order = torch.argsort(ref_indices, dim=-1)
    assert torch.equal(indices, torch.gather(ref_indices, -1, order))
    np.testing.assert_allclose(values, torch.gather(ref_values, -1, order), rtol=1e-6,
                               atol=1e-6)


@needs_c
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN in the reference
@pytest.mark.parametrize(("mode", "score"), MODES)
@pytest.mark.parametrize("k", [1, 13, 200])
def test_compiled_equals_the_reference_at_every_simd_level(simd, mode, score, k):
    """Same rows and counts as the NumPy reference, on scores with ties, NaN and infinities
    (the order of top-k candidates must not depend on the instruction set)."""
    q, K, _ = make_qk(2, 8, 2, 600, 64, seed=k, correlated=0.7)
    K[0, 0, 50] = float("nan")
    K[1, 1, 10:20] = K[1, 1, 9]  # identical rows: ties
    K[1, 0, 30] = float("inf")
    got = ca.logits_topk_grouped(q, K, k, mode=mode, score=score, start=3, end=590)
    ref = ca.backend("numpy").logits_topk_grouped(q, K, k, mode=mode, score=score, start=3,
                                                 end=590)
    assert torch.equal(got[2], ref[2]) and torch.equal(got[1], ref[1])
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NaN in the reference
@pytest.mark.parametrize(("mode", "score"), MODES)
def test_a_nan_in_one_head_but_the_first_makes_its_group_nan(simd, mode, score):
    """The group's aggregate takes NaN from any head, not just the first one it starts from,
    and keeps it against every later head's number (NaN ranks above +inf, ties to the lower
    position): the NaN group keeps its first k positions, the other groups are unaffected."""
    q, K, _ = make_qk(1, 8, 2, 400, 64, seed=9, correlated=0.5)
    q[0, 6, 3] = float("nan")  # head 6: the third head of KV group 1
    got = ca.logits_topk_grouped(q, K, 10, mode=mode, score=score)
    ref = ca.backend("numpy").logits_topk_grouped(q, K, 10, mode=mode, score=score)
    assert torch.equal(got[2], ref[2]) and torch.equal(got[1], ref[1])
    if mode == "group_shared":
        assert torch.equal(got[1][0, 1], torch.arange(10))
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("mode", "score"), MODES)
def test_topk_all_is_exact_attention_against_float64(be, dtype, mode, score):
    """At k = every token each group keeps every row, and one softmax over every head's
    scores with the gathered rows is exact attention (float64 SDPA on the same values)."""
    B, G, KVH, T, D = 1, 4, 2, 300, 64
    q, K, V = make_qk(B, G * KVH, KVH, T, D, dtype, seed=5)
    start = 20
    values, indices, counts = be.logits_topk_grouped(q, K, T - start, mode=mode, score=score,
                                                     start=start)
    assert torch.all(counts == T - start)
    rows = be.gather_rows(V, indices)  # (B, KVH, n, D): one row per KV head
    weights = torch.softmax(values.double(), -1).reshape(B, KVH, G, -1)
    out = (weights @ rows.double()).reshape(B, G * KVH, D)
    k64 = K[:, :, start:].double().repeat_interleave(G, 1)
    v64 = V[:, :, start:].double().repeat_interleave(G, 1)
    want = F.scaled_dot_product_attention(q.double()[:, :, None], k64, v64)[:, :, 0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_out_buffers_are_filled_and_results_are_their_prefixes(be):
    q, K, _ = make_qk(1, 8, 2, 500, 32, seed=6, correlated=0.5)
    cap = ca.group_capacity("group_union", 4, 20, 500)
    assert cap == 80
    out = (torch.empty(1, 8, cap), torch.empty(1, 2, cap, dtype=torch.int64),
           torch.empty(1, 2, dtype=torch.int64))
    values, indices, counts = be.logits_topk_grouped(q, K, 20, out=out)
    fresh = be.logits_topk_grouped(q, K, 20)
    m = indices.shape[2]
    assert counts is out[2] and values.data_ptr() == out[0].data_ptr()
    assert torch.equal(out[0].reshape(-1)[: 8 * m].reshape(1, 8, m), values)
    for a, b in zip((values, indices, counts), fresh, strict=True):
        assert torch.equal(a, b)
    arrays = be.logits_topk_grouped(q.numpy(), K.numpy(), 20)
    assert isinstance(arrays[0], np.ndarray)
    np.testing.assert_array_equal(arrays[1], indices.numpy())


def _bad_calls():
    q, K, _ = make_qk(1, 4, 2, 10, 8)
    cap = ca.group_capacity("group_union", 2, 3, 10)
    good = (np.empty((1, 4, cap), np.float32), np.empty((1, 2, cap), np.int64),
            np.empty((1, 2), np.int64))
    return [
        ("mode", lambda: ca.logits_topk_grouped(q, K, 3, mode="per_head")),
        ("score", lambda: ca.logits_topk_grouped(q, K, 3, mode="group_shared", score="mean")),
        ("k", lambda: ca.logits_topk_grouped(q, K, 11)),
        ("k", lambda: ca.logits_topk_grouped(q, K, 3, start=8)),
        ("k", lambda: ca.logits_topk_grouped(q, K, 0)),
        ("end", lambda: ca.logits_topk_grouped(q, K, 3, end=11)),
        ("q", lambda: ca.logits_topk_grouped(torch.zeros(1, 3, 8), K, 3)),
        ("K", lambda: ca.logits_topk_grouped(q, K.transpose(2, 3), 3)),
        ("out", lambda: ca.logits_topk_grouped(q, K, 3, out=good[:2])),
        (r"out\[0\]", lambda: ca.logits_topk_grouped(q, K, 3, out=(np.empty((1, 4, 3),
                                                                             np.float32),
                                                                    *good[1:]))),
        (r"out\[2\]", lambda: ca.logits_topk_grouped(q, K, 3, out=(*good[:2],
                                                                    np.empty((1, 2),
                                                                             np.float32)))),
        ("num_threads", lambda: ca.logits_topk_grouped(q, K, 3, num_threads=0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


@needs_c
def test_extension_checks_its_own_arguments_before_any_work():
    """A direct call with inconsistent buffers, codes or thread counts raises."""
    ext = sys.modules["hw_backend._cpu_attention"]
    q = np.zeros((1, 4, 8), np.float32)
    K = np.zeros((1, 2, 10, 8), np.float32)
    vals, idx, cnt = (np.zeros((1, 4, 6), np.float32), np.zeros((1, 2, 6), np.int64),
                      np.zeros((1, 2), np.int64))

    def call(*, mode=1, score=0, k=3, threads=1, v=vals, i=idx, c=cnt, end=10):
        return ext.logits_topk_group(q, K, 0, 0, end, 1.0, threads, k, mode, score, v, i, c)

    assert call() >= 3
    for kwargs, match in [({"mode": 0}, "mode"), ({"mode": 3}, "mode"), ({"score": 2}, "score"),
                          ({"k": 0}, "k"), ({"k": 11}, "k"), ({"end": 11}, "start/end"),
                          ({"threads": -1}, "nthreads"),
                          ({"v": np.zeros((1, 4, 5), np.float32)}, "values"),
                          ({"i": np.zeros((1, 4, 6), np.int64)}, "indices"),
                          ({"c": np.zeros((1, 3), np.int64)}, "counts"),
                          ({"i": np.zeros((1, 2, 6), np.float32)}, "indices"),
                          ({"mode": 2}, "values")]:  # shared: capacity k = 3, not 6
        with pytest.raises(ValueError, match=match):
            call(**kwargs)

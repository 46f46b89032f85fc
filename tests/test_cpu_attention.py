"""CPU attention kernels against float64 torch SDPA, for both the C and NumPy backends.

Low-precision KV is compared with SDPA on the *same rounded* values (the bf16/fp16 tensor
upcast to float64), so every tolerance measures only float32 accumulation error.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from kernel_backends import DTYPES, SIMD_LEVELS, needs_c  # noqa: E402

import hw_backend  # noqa: E402
import hw_backend.cpu_attention as ca  # noqa: E402

REL = 1e-5  # float32 accumulation; low-precision KV is compared on the same rounded values


def make_qkv(B, H, KVH, T, D, dtype="float32", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g)
    K = torch.randn(B, KVH, T, D, generator=g).to(DTYPES[dtype])
    V = torch.randn(B, KVH, T, D, generator=g).to(DTYPES[dtype])
    return q, K, V


def reference(q, K, V, *, start=0, end=None, scale=None):
    """float64 SDPA (GQA by repeat_interleave) plus scores and their logsumexp."""
    G = q.shape[1] // K.shape[1]
    k64 = K[:, :, start:end].double().repeat_interleave(G, 1)
    v64 = V[:, :, start:end].double().repeat_interleave(G, 1)
    q64 = q.double()[:, :, None]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    out = F.scaled_dot_product_attention(q64, k64, v64, scale=scale)[:, :, 0]
    scores = (q64 @ k64.transpose(-1, -2))[:, :, 0] * scale
    return out.numpy(), torch.logsumexp(scores, -1).numpy(), scores


def assert_close(actual, expected, rel=REL):
    """Elementwise error within rel x (own magnitude + the array's largest magnitude).

    The array-wide term covers outputs that are small through cancellation (a mean of
    many V rows), where float32 accumulation error is relative to the terms, not the sum.
    """
    expected = np.asarray(expected, np.float64)
    finite = np.abs(expected[np.isfinite(expected)])
    largest = finite.max() if finite.size else 0.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rel, atol=rel * largest
    )


def assert_topk_valid(values, indices, ref_scores, k, offset=0):
    """Indices are a correct top-k of the float64 scores (ties within float32 error aside)."""
    ref = ref_scores.numpy()
    idx = np.asarray(indices) - offset
    kth = np.sort(ref, axis=-1)[..., -k][..., None]
    picked = np.take_along_axis(ref, idx, -1)
    assert (picked >= kth - 1e-5).all()
    assert_close(values, picked)
    assert (np.diff(np.asarray(values), axis=-1) <= 0).all()
    assert all(len(set(row)) == k for row in idx.reshape(-1, k).tolist())


# --------------------------------------------------------------------------------------------
# partial attention and merge
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("T", [1, 3, 127, 1025])
@pytest.mark.parametrize("D", [64, 128])
def test_partial_attention_matches_sdpa(be, dtype, gqa, T, D):
    q, K, V = make_qkv(2, 2 * gqa, 2, T, D, dtype, seed=T + gqa)
    out, lse = be.partial_attention(q, K, V)
    ref_out, ref_lse, _ = reference(q, K, V)
    assert out.dtype == torch.float32 and out.shape == (2, 2 * gqa, D)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@pytest.mark.parametrize("D", [13, 72, 80, 96, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_dims(be, D, dtype):
    q, K, V = make_qkv(1, 6, 2, 129, D, dtype, seed=D)
    out, lse = be.partial_attention(q, K, V, scale=0.3)
    ref_out, ref_lse, _ = reference(q, K, V, scale=0.3)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [13, 72, 128])
@pytest.mark.parametrize("gqa", [1, 3, 4])
def test_every_simd_level(simd, dtype, D, gqa):
    assert ca.simd_level() == simd
    q, K, V = make_qkv(2, 2 * gqa, 2, 300, D, dtype, seed=D + gqa)
    ref_out, ref_lse, ref_scores = reference(q, K, V, start=5, end=290)
    out, lse = ca.partial_attention(q, K, V, start=5, end=290)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    assert_close(ca.logits(q, K, start=5, end=290), ref_scores.numpy())
    values, indices = ca.logits_topk(q, K, 17, start=5, end=290)
    assert_topk_valid(values, indices, ref_scores, 17, offset=5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_context_split_k(be, dtype):
    """131072 tokens in one KV head: the C path splits tokens across threads and merges."""
    q, K, V = make_qkv(1, 4, 1, 131072, 64, dtype, seed=7)
    q *= 3  # sharper softmax, as in real decoding
    ref_out, ref_lse, ref_scores = reference(q, K, V)
    out, lse = be.partial_attention(q, K, V, num_threads=2)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)
    values, indices = be.logits_topk(q, K, 64)
    assert_topk_valid(values, indices, ref_scores, 64)


def test_split_then_merge_equals_whole(be):
    q, K, V = make_qkv(2, 8, 2, 1000, 64, "bfloat16", seed=3)
    whole = be.partial_attention(q, K, V)
    parts = [
        be.partial_attention(q, K, V, start=a, end=b)
        for a, b in [(0, 1), (1, 400), (400, 400), (400, 1000)]
    ]
    out, lse = ca.merge(parts)
    assert_close(out, whole[0].numpy())
    assert_close(lse, whole[1].numpy())


def test_thread_counts_agree(be):
    q, K, V = make_qkv(1, 8, 2, 5000, 64, "float32", seed=4)
    one = be.partial_attention(q, K, V, num_threads=1)
    two = be.partial_attention(q, K, V, num_threads=2)
    assert_close(one[0], two[0].numpy())


@needs_c
def test_prefetch_distance_never_changes_results(simd):
    """Prefetch is a hint: every distance (none, one line, the default, far past the end of
    the buffer) gives bit-identical outputs, and a bad distance is a ValueError."""
    q, K, V = make_qkv(1, 8, 2, 3000, 128, "float32", seed=9)
    results = []
    previous = ca.set_prefetch_bytes(0)
    try:
        for nbytes in (0, 64, 24576, 1 << 20):
            ca.set_prefetch_bytes(nbytes)
            out, lse = ca.partial_attention(q, K, V, num_threads=2)
            results.append((out.numpy().copy(), lse.numpy().copy()))
        with pytest.raises(ValueError, match="nbytes"):
            ca.set_prefetch_bytes(-1)
    finally:
        ca.set_prefetch_bytes(previous)
    for out, lse in results[1:]:
        np.testing.assert_array_equal(out, results[0][0])
        np.testing.assert_array_equal(lse, results[0][1])


def test_empty_range_is_zero_and_neg_inf(be):
    q, K, V = make_qkv(1, 4, 2, 10, 64)
    out, lse = be.partial_attention(q, K, V, start=6, end=6)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_ignores_neg_inf_partials():
    out = np.random.default_rng(0).standard_normal((1, 2, 4)).astype(np.float32)
    lse = np.array([[0.5, -1.0]], np.float32)
    junk = np.full_like(out, np.nan)
    ninf = np.full_like(lse, -np.inf)
    m_out, m_lse = ca.merge([(junk, ninf), (out, lse), (junk, ninf)])
    assert_close(m_out, out, rel=0)
    assert_close(m_lse, lse, rel=0)
    e_out, e_lse = ca.merge([(junk, ninf), (junk, ninf)])
    assert (e_out == 0).all() and np.isneginf(e_lse).all()


def test_merge_propagates_nan():
    out = np.ones((1, 1, 4), np.float32)
    lse = np.zeros((1, 1), np.float32)
    m_out, m_lse = ca.merge([(out, lse), (out, np.full_like(lse, np.nan))])
    assert np.isnan(m_out).all() and np.isnan(m_lse).all()


def test_nan_in_q_only_poisons_that_head(be):
    q, K, V = make_qkv(1, 8, 2, 300, 64, seed=5)
    q[0, 3, 7] = float("nan")
    out, lse = be.partial_attention(q, K, V)
    assert torch.isnan(out[0, 3]).all() and torch.isnan(lse[0, 3])
    others = [h for h in range(8) if h != 3]
    assert torch.isfinite(out[0, others]).all() and torch.isfinite(lse[0, others]).all()


def test_nan_in_k_poisons_its_gqa_group(be):
    q, K, V = make_qkv(1, 8, 2, 300, 64, seed=6)
    K[0, 1, 123, 5] = float("nan")
    out, lse = be.partial_attention(q, K, V)
    assert torch.isnan(out[0, 4:]).all() and torch.isnan(lse[0, 4:]).all()
    ref_out, _, _ = reference(q[:, :4], K[:, :1], V[:, :1])
    assert_close(out[0, :4], ref_out[0])


# --------------------------------------------------------------------------------------------
# logits, top-k, gather, sparse attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_match_reference(be, dtype):
    q, K, _ = make_qkv(2, 8, 2, 257, 64, dtype, seed=8)
    _, _, ref_scores = reference(q, K, K, start=10, end=200)
    scores = be.logits(q, K, start=10, end=200)
    assert scores.shape == (2, 8, 190)
    assert_close(scores, ref_scores.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gqa", [1, 4])
def test_topk_and_logits_topk_match_torch_topk(be, dtype, gqa):
    q, K, _ = make_qkv(2, 2 * gqa, 2, 3000, 64, dtype, seed=9)
    _, _, ref_scores = reference(q, K, K, start=100)
    ref_values, ref_idx = torch.topk(ref_scores, 50, dim=-1)
    values, indices = be.logits_topk(q, K, 50, start=100)
    assert indices.dtype == torch.int64 and values.shape == (2, 2 * gqa, 50)
    assert_topk_valid(values, indices, ref_scores, 50, offset=100)
    assert (indices - 100 == ref_idx).float().mean() > 0.99  # ties within fp32 error aside
    assert_close(values, ref_values.numpy())
    v2, i2 = be.topk(be.logits(q, K, start=100), 50)
    assert torch.equal(v2, values) and torch.equal(i2 + 100, indices)


def test_topk_ties_and_nan_order(be):
    scores = np.array([[[1.0, 3.0, 3.0, np.nan, -np.inf, 3.0, np.inf]]], np.float32)
    values, indices = be.topk(scores, 5)
    assert indices.tolist() == [[[3, 6, 1, 2, 5]]]
    assert np.isnan(values[0, 0, 0]) and values[0, 0, 1] == np.inf


@needs_c
@pytest.mark.parametrize("k", [1, 7, 64, 150, 300])
def test_topk_selection_matches_reference_exactly(simd, k):
    """Ties, NaN, infinities and signed zeros ordered exactly as the NumPy reference."""
    scores = np.random.default_rng(k).standard_normal((2, 3, 300)).astype(np.float32)
    scores[0, 0, [50, 130, 250]] = np.nan
    scores[0, 1, ::7] = scores[0, 1].max()  # many ties at the top
    scores[1, 0, :] = 0.0
    scores[1, 0, ::3] = -0.0
    scores[1, 1, [3, 299]] = [np.inf, -np.inf]
    scores[1, 2] = np.sort(scores[1, 2])  # ascending: every score beats the threshold
    values, indices = ca.topk(scores, k)
    ref_values, ref_indices = ca.backend("numpy").topk(scores, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values, ref_values)  # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(values), np.signbit(ref_values))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_exact(be, dtype):
    _, _, V = make_qkv(2, 2, 2, 100, 64, dtype, seed=10)
    idx = torch.randint(0, 100, (2, 8, 11), generator=torch.Generator().manual_seed(0))
    rows = be.gather_rows(V, idx)
    assert rows.dtype == V.dtype and rows.shape == (2, 8, 11, 64)
    expected = V.repeat_interleave(4, 1).gather(2, idx[..., None].expand(-1, -1, -1, 64))
    assert torch.equal(
        rows.view(torch.int16) if dtype != "float32" else rows,
        expected.view(torch.int16) if dtype != "float32" else expected,
    )


def test_gather_rows_numpy_bits_with_kv_dtype(be):
    V = np.arange(2 * 1 * 5 * 3, dtype=np.uint16).reshape(2, 1, 5, 3)
    idx = np.array([[[4, 0]], [[1, 1]]])
    rows = be.gather_rows(V, idx, kv_dtype="bfloat16")
    assert rows.dtype == np.uint16
    np.testing.assert_array_equal(rows, np.stack([V[0, 0, [4, 0]], V[1, 0, [1, 1]]])[:, None])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sparse_attention_matches_sdpa_on_selected_rows(be, dtype):
    q, K, V = make_qkv(1, 8, 2, 500, 64, dtype, seed=11)
    _, idx = be.logits_topk(q, K, 40)
    out, lse = be.sparse_attention(q, K, V, idx)
    Ks = be.gather_rows(K, idx)
    Vs = be.gather_rows(V, idx)
    ref_out = F.scaled_dot_product_attention(q.double()[:, :, None], Ks.double(), Vs.double())
    scores = (q.double()[:, :, None] @ Ks.double().transpose(-1, -2))[:, :, 0] / 8.0
    assert_close(out, ref_out[:, :, 0].numpy())
    assert_close(lse, torch.logsumexp(scores, -1).numpy())


@needs_c
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_kv_widening_is_exact(simd, dtype):
    """One-hot queries read single K elements: checks bf16/fp16 -> fp32 in every tail path."""
    D, T = 13, 70
    g = torch.Generator().manual_seed(12)
    K = (torch.randn(1, 1, T, D, generator=g) * 1e-5).to(DTYPES[dtype])  # fp16 subnormals
    q = torch.eye(D)[None]
    scores = ca.logits(q, K, scale=1.0)
    assert torch.equal(scores[0], K[0, 0].float().T)


# --------------------------------------------------------------------------------------------
# inputs: zero copy, dtypes, errors
# --------------------------------------------------------------------------------------------


def test_numpy_in_numpy_out_and_uint16_bfloat16(be):
    q, K, V = make_qkv(1, 4, 1, 50, 64, "bfloat16", seed=13)
    Kn, Vn = K.view(torch.int16).numpy(), V.view(torch.int16).numpy().view(np.uint16)
    out, lse = be.partial_attention(q.numpy(), Kn, Vn, kv_dtype="bfloat16")
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert_close(out, reference(q, K, V)[0])


def test_ml_dtypes_bfloat16(be):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, K, V = make_qkv(1, 4, 1, 50, 64, "bfloat16", seed=14)
    Kb = K.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    Vb = V.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    out, _ = be.partial_attention(q.numpy(), Kb, Vb)
    assert_close(out, reference(q, K, V)[0])


def test_views_are_zero_copy():
    K = torch.randn(1, 2, 8, 16).bfloat16()
    arr, dtype = ca.as_kv_view(K)
    assert dtype == "bfloat16" and arr.ctypes.data == K.data_ptr()
    K32 = np.zeros((1, 2, 8, 16), np.float32)
    assert ca.as_kv_view(K32)[0] is K32


def test_torch_inputs_that_need_the_checked_conversion():
    """CPU float tensors take one t.numpy(); autograd, bfloat16 and strided tensors take the
    checked path and must come out the same (or fail with the tensor's own message)."""
    q, K, V = make_qkv(1, 8, 2, 40, 16, seed=21)
    ref_out, ref_lse = ca.partial_attention(q, K, V)
    arr, dtype = ca.as_kv_view(K)
    assert dtype == "float32" and arr.ctypes.data == K.data_ptr()
    grad_q, grad_K = q.clone().requires_grad_(), K.clone().requires_grad_()
    out, lse = ca.partial_attention(grad_q, grad_K, V)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    out16, _ = ca.partial_attention(q.bfloat16(), K, V)  # a bfloat16 query is widened
    assert torch.allclose(out16, ca.partial_attention(q.bfloat16().float(), K, V)[0])
    strided_q = q.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="q: tensor is not contiguous"):
        ca.partial_attention(strided_q, K, V)
    with pytest.raises(ValueError, match="K: tensor is not contiguous"):
        ca.partial_attention(q, K.transpose(2, 3).contiguous().transpose(2, 3), V)


def _bad_calls():
    q, K, V = make_qkv(1, 4, 2, 10, 8)
    idx = torch.zeros(1, 4, 2, dtype=torch.int64)
    return [
        ("q", lambda: ca.partial_attention(q[0], K, V)),
        ("K", lambda: ca.partial_attention(q, K[0], V)),
        ("K", lambda: ca.partial_attention(q, K.transpose(2, 3), V)),  # non-contiguous
        ("K", lambda: ca.partial_attention(q, K.double(), V)),
        ("K", lambda: ca.partial_attention(q, K.numpy()[:, :, ::2], V)),
        ("K", lambda: ca.partial_attention(q, K.numpy().view(np.uint16).copy(), V)),
        ("K", lambda: ca.partial_attention(q, K[:, :, :, :4].contiguous(), V)),
        ("K", lambda: ca.partial_attention(torch.zeros(2, 4, 8), K, V)),  # batch mismatch
        ("q", lambda: ca.partial_attention(torch.zeros(1, 3, 8), K, V)),
        ("V", lambda: ca.partial_attention(q, K, V[:, :, :5].contiguous())),
        ("start", lambda: ca.partial_attention(q, K, V, start=-1)),
        ("end", lambda: ca.partial_attention(q, K, V, end=11)),
        ("end", lambda: ca.partial_attention(q, K, V, start=5, end=4)),
        ("scale", lambda: ca.partial_attention(q, K, V, scale=float("inf"))),
        ("num_threads", lambda: ca.partial_attention(q, K, V, num_threads=0)),
        ("kv_dtype", lambda: ca.partial_attention(q, K, V, kv_dtype="int8")),
        ("k", lambda: ca.logits_topk(q, K, 11)),
        ("k", lambda: ca.logits_topk(q, K, 3, start=8)),
        ("k", lambda: ca.logits_topk(q, K, 0)),
        ("scores", lambda: ca.topk(np.zeros((1, 2, 5)), 2)),
        ("idx", lambda: ca.gather_rows(V, idx + 10)),
        ("idx", lambda: ca.gather_rows(V, idx - 1)),
        ("idx", lambda: ca.gather_rows(V, idx.float())),
        ("idx", lambda: ca.gather_rows(V, idx[:, :3].contiguous())),
        ("idx", lambda: ca.sparse_attention(q, K, V, idx[:, :2].contiguous())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_value_error(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


@needs_c
def test_extension_rejects_inconsistent_buffers():
    """Direct calls with mismatched buffers raise instead of reading out of bounds."""
    ext = sys.modules["hw_backend._cpu_attention"]
    q = np.zeros((1, 4, 8), np.float32)
    K = np.zeros((1, 2, 10, 8), np.float32)
    out, lse = np.zeros((1, 4, 8), np.float32), np.zeros((1, 3), np.float32)
    with pytest.raises(ValueError, match="lse"):
        ext.partial_attention(q, K, 0, K, 0, 0, 10, 1.0, 1, out, lse)
    with pytest.raises(ValueError, match="K"):
        ext.partial_attention(q, K, 1, K, 1, 0, 10, 1.0, 1, out, lse[:, :2])
    with pytest.raises(ValueError, match="next"):
        ext.pointer_chase(np.array([5, 0]), 3, 0)


@needs_c
def test_simd_level_control():
    assert ca.simd_level() in SIMD_LEVELS
    with pytest.raises(ValueError, match="level"):
        ca.set_simd_level("sse9")
    root = os.path.dirname(os.path.dirname(hw_backend.__file__))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HGSIM_SIMD="scalar", PYTHONPATH=path)
    code = "import hw_backend.cpu_attention as ca; print(ca.simd_level())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "scalar"
    env["HGSIM_SIMD"] = "bogus"
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "HGSIM_SIMD ignored" in result.stderr and result.stdout.strip() == SIMD_LEVELS[-1]


def test_missing_extension_falls_back_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "hw_backend._cpu_attention", None)
    monkeypatch.delattr(hw_backend, "_cpu_attention", raising=False)
    spec = importlib.util.spec_from_file_location("ca_without_ext", ca.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    with pytest.warns(RuntimeWarning, match="NumPy reference"):
        spec.loader.exec_module(module)
    assert module.BACKEND == "numpy-fallback" and module.simd_level() == "none"
    q, K, V = make_qkv(1, 2, 1, 20, 8)
    assert_close(module.partial_attention(q, K, V)[0], reference(q, K, V)[0])


@needs_c
def test_gil_is_released_during_compute():
    """Another thread runs while the main thread is inside the kernel.

    With a huge switch interval the main thread never hands over the GIL on its own, so
    the worker can only count if the C call releases it.
    """
    q, K, V = make_qkv(1, 32, 8, 32768, 128, "bfloat16")
    # NumPy inputs: torch calls in the wrapper could release the GIL themselves
    q, K, V = q.numpy(), K.view(torch.int16).numpy(), V.view(torch.int16).numpy()
    go, done = threading.Event(), threading.Event()
    counter = [0]

    def worker():
        go.wait()
        for _ in range(1000):
            counter[0] += 1
        done.wait()

    old = sys.getswitchinterval()
    thread = threading.Thread(target=worker)
    thread.start()
    sys.setswitchinterval(100.0)
    try:
        go.set()
        for _ in range(3):
            ca.partial_attention(q, K, V, num_threads=1, kv_dtype="bfloat16")
        seen = counter[0]
    finally:
        sys.setswitchinterval(old)
        done.set()
        thread.join()
    assert seen == 1000


# --------------------------------------------------------------------------------------------
# caller-provided output buffers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_out_buffers_are_filled_in_place(be, dtype):
    """logits, logits_topk and gather_rows write into the caller's buffers (numpy or torch)
    and give the same numbers as freshly allocated results."""
    q, K, V = make_qkv(1, 8, 2, 700, 64, dtype, seed=11)
    scores = torch.empty(1, 8, 600)
    assert be.logits(q, K, start=100, out=scores) is scores
    assert_close(scores, be.logits(q, K, start=100).numpy())
    values, indices = np.empty((1, 8, 33), np.float32), torch.empty(1, 8, 33, dtype=torch.int64)
    got = be.logits_topk(q, K, 33, start=100, out=(values, indices))
    assert got[0] is values and got[1] is indices
    fresh = be.logits_topk(q, K, 33, start=100)
    np.testing.assert_array_equal(values, fresh[0].numpy())
    np.testing.assert_array_equal(indices.numpy(), fresh[1].numpy())
    rows = torch.empty(1, 8, 33, 64, dtype=DTYPES[dtype])
    assert be.gather_rows(V, indices, out=rows) is rows
    assert torch.equal(rows, be.gather_rows(V, indices))


def test_out_buffers_wrong_shape_or_dtype_is_value_error(be):
    q, K, V = make_qkv(1, 4, 2, 50, 64)
    with pytest.raises(ValueError, match="out"):
        be.logits(q, K, out=np.empty((1, 4, 49), np.float32))
    with pytest.raises(ValueError, match=r"out\[1\]"):
        be.logits_topk(q, K, 5, out=(np.empty((1, 4, 5), np.float32), np.empty((1, 4, 5))))
    with pytest.raises(ValueError, match="out"):
        be.logits_topk(q, K, 5, out=np.empty((1, 4, 5), np.float32))
    idx = torch.zeros(1, 4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="out"):
        be.gather_rows(V, idx, out=torch.empty(1, 4, 3, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out"):
        be.gather_rows(V, idx, out=torch.empty(1, 4, 2, 64))
    frozen = np.empty((1, 4, 50), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        be.logits(q, K, out=frozen)

"""Runs kernel calls described as JSON, in a child process, and reports how each one ended.

``tests/test_kernel_fuzz.py`` generates the descriptions (random shapes, dtypes, strides,
thread counts, ranges) and runs this file with them on stdin, so that a call that kills the
process (SIGFPE, SIGSEGV, abort from the OpenMP runtime) fails the test instead of pytest.
Each call is announced on stdout before it runs (the last announcement names the culprit
of a crash), then reported as one JSON line:

* ``ok``: it returned, and its result matches the NumPy reference on the same inputs;
* ``raised``: it raised (the exception's type and message are reported);
* ``wrong``: it returned something that differs from the reference.

``expect`` says whether the call's arguments are valid (``valid``/``invalid``) by the kernels'
documented contract, so the parent can also check that valid calls succeed and invalid ones
are refused, never silently run.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings

import numpy as np

from hw_backend import _cpu_attention as ext
from hw_backend import cpu_attention as ca

C = ca.backend("c")
REF = ca.backend("numpy")
CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
KV_DTYPES = tuple(CODES)
TOL = {"rtol": 1e-4, "atol": 1e-4}
#: Entries that take q and K (and so a batch and head_dim shared between them).
WITH_QK = ("partial_attention", "logits", "logits_topk", "logits_topk_grouped",
           "logits_topk_group", "sparse_attention")
GROUPED = ("logits_topk_grouped", "logits_topk_group")
GROUP_MODE_CODES = {"group_union": 1, "group_shared": 2}
GROUP_SCORE_CODES = {"max": 0, "sum": 1}
WITH_V = ("partial_attention", "sparse_attention", "gather_rows")
WITH_IDX = ("sparse_attention", "gather_rows")


# ------------------------------------------------------------------------------ inputs
def _kv(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, layout: str) -> np.ndarray:
    """Random KV of ``dtype`` (bfloat16 as uint16 bits) with the requested memory layout."""
    full = list(shape)
    if layout == "strided":
        full[2] *= 2
    elif layout == "transposed":
        full[2], full[3] = full[3], full[2]
    data = rng.standard_normal(full).astype(np.float32)
    if dtype == "bfloat16":
        data = (data.view(np.uint32) >> 16).astype(np.uint16)
    elif dtype != "float32":
        data = data.astype(dtype)
    if layout == "strided":
        return data[:, :, ::2]
    if layout == "transposed":
        return np.swapaxes(data, 2, 3)
    return data


def build(spec: dict) -> dict:
    rng = np.random.default_rng(spec["seed"])
    B, H, KVH, T, D = (spec[n] for n in ("B", "H", "KVH", "T", "D"))
    mismatch = spec["mismatch"]
    k_shape = (B + (mismatch == "batch"), KVH, T, D + (mismatch == "head_dim"))
    v_shape = (k_shape[0], KVH, T + (mismatch == "v_tokens"), k_shape[3])
    idx_heads = H + (mismatch == "idx_heads")
    k = max(spec["k"], 0)
    lo, hi = spec["idx_range"]
    return {
        "q": rng.standard_normal((B, H, D)).astype(np.float32),
        "K": _kv(rng, k_shape, spec["dtype"], spec["layout"]),
        "V": _kv(rng, v_shape, spec["dtype"], spec["layout"]),
        "scores": _kv(rng, (B, H, T, 1), "float32", spec["layout"])[..., 0],
        "idx": rng.integers(lo, max(hi, lo + 1), (B, idx_heads, k), dtype=np.int64),
        "scale": 1.0 / np.sqrt(max(D, 1)),
    }


# ------------------------------------------------------------------------------ contract
def expected_valid(spec: dict, a: dict) -> bool:
    """Whether the kernels' contract accepts these arguments (the oracle of the test).

    Shapes and contiguity are read off the arrays built (a transposed array with a dimension
    of 1 is still C-contiguous, and some mismatches change nothing for some entries).
    """
    entry, raw = spec["entry"], spec["api"] == "raw"
    if entry == "pointer_chase":  # single-threaded: no thread count
        return spec["k"] >= 0 and 0 <= spec["start"] < spec["T"] and _in_range(_links(spec),
                                                                             spec["T"])
    threads = spec["threads"]
    if threads is not None and not ((0 if raw else 1) <= threads <= sys.maxsize):
        return False
    if entry == "stream_read":
        return True
    if entry == "topk":
        s = a["scores"]
        return (s.flags.c_contiguous and s.shape[0] >= 1 and s.shape[1] >= 1
                and 1 <= spec["k"] <= s.shape[2])
    if spec["dtype"] not in KV_DTYPES:
        return False
    if raw and spec["kdt_code"] is not None:
        declared = spec["kdt_code"]
        if declared not in CODES.values() or (declared == 0) != (spec["dtype"] == "float32"):
            return False
    q, K, V, idx = a["q"], a["K"], a["V"], a["idx"]
    if entry == "gather_rows":
        Bv, KVH, T, D = V.shape
        heads = idx.shape[1]
        if not V.flags.c_contiguous or idx.shape[0] != Bv:
            return False
        if min(Bv, KVH, D, heads) < 1 or heads % KVH:
            return False
        return _in_range(idx, T)
    B, H, D = q.shape
    KVH, T = K.shape[1], K.shape[2]
    if not K.flags.c_contiguous or min(B, H, D, KVH) < 1 or H % KVH:
        return False
    if K.shape[0] != B or K.shape[3] != D:
        return False
    if entry in WITH_V and (V.shape != K.shape or not V.flags.c_contiguous):
        return False
    if entry == "sparse_attention":
        return idx.shape[:2] == (B, H) and _in_range(idx, T)
    start, end = spec["start"], T if spec["end"] is None else spec["end"]
    if not 0 <= start <= end <= T:
        return False
    if entry == "logits_topk":
        return 1 <= spec["k"] <= end - start
    if entry in GROUPED:
        return (spec["group_mode"] in GROUP_MODE_CODES and spec["group_score"] in GROUP_SCORE_CODES
                and 1 <= spec["k"] <= end - start)
    return True


def _in_range(values: np.ndarray, T: int) -> bool:
    """Indices (or links) all lie in [0, T), or there are none."""
    return values.size == 0 or (int(values.min()) >= 0 and int(values.max()) < T)


# ------------------------------------------------------------------------------ calls
def _kdt(spec: dict) -> int:
    code = spec["kdt_code"]
    return CODES.get(spec["dtype"], 0) if code is None else code


def _declared(spec: dict) -> str:
    """The KV type the call declares (what the reference must read the bits as)."""
    names = {v: n for n, v in CODES.items()}
    return names.get(_kdt(spec), spec["dtype"]) if spec["api"] == "raw" else spec["dtype"]


def call(spec: dict, a: dict):
    entry, threads = spec["entry"], spec["threads"]
    if spec["api"] == "raw":
        return _call_raw(spec, a, entry, 0 if threads is None else threads)
    kv = {"kv_dtype": spec["dtype"]} if spec["dtype"] in KV_DTYPES else {}
    rng = {"start": spec["start"], "end": spec["end"]}
    if entry == "partial_attention":
        return C.partial_attention(a["q"], a["K"], a["V"], num_threads=threads, **rng, **kv)
    if entry == "logits":
        return C.logits(a["q"], a["K"], num_threads=threads, **rng, **kv)
    if entry == "logits_topk":
        return C.logits_topk(a["q"], a["K"], spec["k"], num_threads=threads, **rng, **kv)
    if entry == "logits_topk_grouped":
        return C.logits_topk_grouped(a["q"], a["K"], spec["k"], mode=spec["group_mode"],
                                     score=spec["group_score"], num_threads=threads, **rng, **kv)
    if entry == "topk":
        return C.topk(a["scores"], spec["k"], num_threads=threads)
    if entry == "sparse_attention":
        return C.sparse_attention(a["q"], a["K"], a["V"], a["idx"], num_threads=threads, **kv)
    if entry == "gather_rows":
        return C.gather_rows(a["V"], a["idx"], num_threads=threads, **kv)
    raise AssertionError(f"the wrapper has no {entry}")


def _call_raw(spec: dict, a: dict, entry: str, threads: int):
    q, K, V, idx = a["q"], a["K"], a["V"], a["idx"]
    B, H = q.shape[:2]
    kdt = _kdt(spec)
    start = spec["start"]
    end = K.shape[2] if spec["end"] is None else spec["end"]
    k = max(spec["k"], 0)
    if entry == "partial_attention":
        out, lse = np.empty(q.shape, np.float32), np.empty((B, H), np.float32)
        ext.partial_attention(q, K, kdt, V, kdt, start, end, a["scale"], threads, out, lse)
        return out, lse
    if entry == "logits":
        out = np.empty((B, H, max(end - start, 0)), np.float32)
        ext.logits(q, K, kdt, start, end, a["scale"], threads, out)
        return out
    if entry == "logits_topk":
        values, indices = np.empty((B, H, k), np.float32), np.empty((B, H, k), np.int64)
        ext.logits_topk(q, K, kdt, start, end, a["scale"], threads, values, indices)
        return values, indices
    if entry == "logits_topk_group":
        mode, score = spec["group_mode"], spec["group_score"]
        KVH = K.shape[1]
        group = H // KVH if KVH and H % KVH == 0 else 1
        tokens = end - start
        cap = (ca.group_capacity(mode, group, k, tokens)
               if mode in GROUP_MODE_CODES and 1 <= k <= tokens else k)
        values = np.empty((B, H, cap), np.float32)
        indices, counts = np.empty((B, KVH, cap), np.int64), np.empty((B, KVH), np.int64)
        codes = (GROUP_MODE_CODES.get(mode, mode if isinstance(mode, int) else 0),
                 GROUP_SCORE_CODES.get(score, score if isinstance(score, int) else 5))
        m = ext.logits_topk_group(q, K, kdt, start, end, a["scale"], threads, k, *codes, values,
                                  indices, counts)
        return (values.reshape(-1)[: B * H * m].reshape(B, H, m),
                indices.reshape(-1)[: B * KVH * m].reshape(B, KVH, m), counts)
    if entry == "topk":
        s = a["scores"]
        values = np.empty(s.shape[:2] + (k,), np.float32)
        indices = np.empty(s.shape[:2] + (k,), np.int64)
        ext.topk(s, threads, values, indices)
        return values, indices
    if entry == "sparse_attention":
        out, lse = np.empty(q.shape, np.float32), np.empty((B, H), np.float32)
        ext.sparse_attention(q, K, kdt, V, kdt, idx, a["scale"], threads, out, lse)
        return out, lse
    if entry == "gather_rows":
        out = np.empty(idx.shape + (V.shape[3],), V.dtype)
        ext.gather_rows(V, kdt, idx, threads, out)
        return out
    if entry == "stream_read":
        return ext.stream_read(np.ones(max(spec["T"], 0) * 8 + 3, np.uint8), threads)
    if entry == "pointer_chase":
        return ext.pointer_chase(_links(spec), spec["k"], start)
    raise AssertionError(entry)


# ------------------------------------------------------------------------------ checking
def check(spec: dict, a: dict, got) -> str | None:
    """None when ``got`` is the right answer for ``spec``, else what is wrong."""
    entry = spec["entry"]
    if entry == "stream_read":
        want = spec["T"] * 0x0101010101010101 % 2**64  # T words of bytes 0x01
        return None if got == want else f"checksum {got}, expected {want}"
    if entry == "pointer_chase":
        at = spec["start"]
        links = _links(spec)
        for _ in range(spec["k"]):
            at = int(links[at])
        return None if got == at else f"ended at {got}, expected {at}"
    kv = {"kv_dtype": _declared(spec)}
    raw = spec["api"] == "raw"
    rng = {"start": spec["start"], "end": spec["end"]}
    scale = {"scale": a["scale"]} if raw else {}
    q, K, V, idx = a["q"], a["K"], a["V"], a["idx"]
    if kv["kv_dtype"] != "float32" and entry != "topk":  # bits as the declared 16-bit type
        K, V = K.view(np.uint16), V.view(np.uint16)  # (topk reads scores, not K and V)
    if entry in ("partial_attention", "sparse_attention"):
        ref = (REF.partial_attention(q, K, V, **rng, **kv, **scale) if entry[0] == "p"
               else REF.sparse_attention(q, K, V, idx, **kv, **scale))
        return _close(got, ref)
    if entry == "logits":
        return _close((got,), (REF.logits(q, K, **rng, **kv, **scale),))
    if entry == "gather_rows":
        rows = REF.gather_rows(V, idx, **kv)
        return None if np.array_equal(np.asarray(got).view(rows.dtype), rows) else "rows differ"
    scores = a["scores"] if entry == "topk" else REF.logits(q, K, **rng, **kv, **scale)
    if entry in GROUPED:
        return _grouped_ok(got, scores, spec)
    return _topk_ok(got, scores, 0 if entry == "topk" else spec["start"])


def _links(spec: dict) -> np.ndarray:
    lo, hi = spec["idx_range"]
    rng = np.random.default_rng(spec["seed"])
    return rng.integers(lo, max(hi, lo + 1), spec["T"]).astype(np.int64)


def _close(got, ref) -> str | None:
    for g, r in zip(got, ref, strict=True):
        try:
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), **TOL)
        except AssertionError as exc:
            return str(exc).strip().splitlines()[0]
    return None


def _topk_ok(got, scores: np.ndarray, start: int) -> str | None:
    """Right values (the k largest, sorted) at their own positions; order among near-ties
    may differ from the reference's float64 scores, so positions are checked by value."""
    values, indices = (np.asarray(x) for x in got)
    k = values.shape[-1]
    best = -np.sort(-scores, axis=-1)[..., :k]
    at = np.take_along_axis(scores, indices - start, axis=-1)
    if not np.allclose(values, best, **TOL):
        return "values are not the k largest"
    if not np.allclose(at, values, **TOL):
        return "indices do not hold their values"
    return None


def _grouped_ok(got, scores: np.ndarray, spec: dict) -> str | None:
    """Each group's rows ascending and distinct, padded with the last one and score -inf; every
    head's scores over them right; and they hold what the mode must keep: every token some
    head of the group (union) or the group's aggregate (shared) ranks clearly inside its
    top-k (near-ties between float32 scores computed in another order may go either way)."""
    values, indices, counts = (np.asarray(x) for x in got)
    B, H, n = scores.shape
    KVH = indices.shape[1]
    G, k, start = H // KVH, spec["k"], spec["start"]
    if counts.shape != (B, KVH) or int(counts.max()) != indices.shape[2]:
        return f"counts {counts.tolist()} do not fit width {indices.shape[2]}"
    tol = 1e-4 * (1.0 + np.abs(scores).max()) * G
    for b in range(B):
        for kh in range(KVH):
            c = int(counts[b, kh])
            rows = indices[b, kh, :c] - start
            heads = scores[b, kh * G : (kh + 1) * G]
            if c < 1 or np.any(np.diff(rows) <= 0) or rows.min() < 0 or rows.max() >= n:
                return f"group ({b}, {kh}): rows {rows.tolist()} not ascending in range"
            if np.any(indices[b, kh, c:] != indices[b, kh, c - 1]) or np.any(
                    values[b, kh * G : (kh + 1) * G, c:] != -np.inf):
                return f"group ({b}, {kh}): bad padding"
            if not np.allclose(values[b, kh * G : (kh + 1) * G, :c], heads[:, rows], **TOL):
                return f"group ({b}, {kh}): scores differ"
            if spec["group_mode"] == "group_union":
                if not k <= c <= G * k:
                    return f"group ({b}, {kh}): union of {c} rows for k = {k}, G = {G}"
                ranked = heads
            else:
                if c != k:
                    return f"group ({b}, {kh}): shared top-k of {c} rows for k = {k}"
                ranked = (heads.max(axis=0) if spec["group_score"] == "max"
                          else heads.astype(np.float64).sum(axis=0))[None]
            for row in ranked:
                kth = np.sort(row)[::-1][k - 1]
                if not set(np.flatnonzero(row > kth + tol)) <= set(rows.tolist()):
                    return f"group ({b}, {kh}): a clear top-k token is missing"
    return None


# ------------------------------------------------------------------------------ main
def run(spec: dict) -> dict:
    report = {"entry": spec["entry"], "api": spec["api"]}
    try:
        arrays = build(spec)
        report["expect"] = "valid" if expected_valid(spec, arrays) else "invalid"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = call(spec, arrays)
        report["warnings"] = [str(w.message) for w in caught]
    except Exception as exc:  # reported, judged by the parent
        report.update(outcome="raised", error=f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, (ValueError, TypeError, OverflowError)):
            report["traceback"] = traceback.format_exc()
        return report
    try:
        problem = check(spec, arrays, got)
    except Exception:  # a result the reference cannot even be compared with
        problem = traceback.format_exc()
    report.update(outcome="ok" if problem is None else "wrong", problem=problem)
    return report


def main() -> None:
    specs = json.load(sys.stdin)
    for number, spec in enumerate(specs):
        print(json.dumps({"start": number, "spec": spec}), flush=True)
        print(json.dumps({"done": number, **run(spec)}), flush=True)


if __name__ == "__main__":
    main()

"""CPU attention kernels for HybridGen-style CPU-GPU collaborative decoding.

During long-context decode the CPU owns part of the KV cache (host DRAM or a CXL node). It
either scores the keys there and keeps a per-head top-k (``logits_topk``) or a top-k per KV
group under GQA (``logits_topk_grouped``: the union of the group's per-head sets, or one
shared top-k), ships the selected rows to the GPU (``gather_rows``; per KV head for grouped
indices), or computes attention over a token range itself
(``partial_attention``) so that the GPU's partial result and the CPU's merge exactly
(``merge``).

Shapes (decode, one query token per sequence)::

    q      (B, H, D)          float32 (bfloat16 / float16 / float64 are converted: q is tiny)
    K, V   (B, KVH, T, D)     float32, bfloat16 or float16, used in place (never copied)

with GQA when H is a multiple of KVH: query head h reads KV head ``h // (H // KVH)``.
Accumulation is float32. Scores are ``scale * q.k`` with ``scale = 1/sqrt(D)`` by default.

Inputs may be NumPy arrays or CPU torch tensors (torch is imported only if the caller
already did). Results follow the inputs: torch tensors in, torch tensors out (zero-copy
wraps), else NumPy arrays. bfloat16 arrives as a torch bfloat16 tensor, an ``ml_dtypes``
bfloat16 array, or a uint16/int16 array together with ``kv_dtype="bfloat16"``.
Non-contiguous KV raises ValueError instead of being silently copied.

The compiled extension (``hw_backend._cpu_attention``) is used when it was built; otherwise
a NumPy reference runs and ``BACKEND == "numpy-fallback"``, announced by a RuntimeWarning at
import because it is far slower. ``backend("numpy")`` gives the reference explicitly (tests
compare both). ``HGSIM_SIMD=scalar|avx2|avx512`` (or ``set_simd_level``) caps the
instruction set.
"""

from __future__ import annotations

import math
import operator
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from hw_backend import _cpu_attention as _ext
except ImportError as _exc:  # pragma: no cover - exercised only where the build failed
    _ext = None
    warnings.warn(
        "hw_backend._cpu_attention is not built "
        f"({_exc}); hw_backend.cpu_attention uses the NumPy reference, which is much slower. "
        "Reinstall with a C compiler (pip install -e .) to get the compiled kernels.",
        RuntimeWarning,
        stacklevel=2,
    )

BACKEND = "c" if _ext is not None else "numpy-fallback"

KV_DTYPES = ("float32", "bfloat16", "float16")
_DTYPE_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}
#: Grouped top-k modes and aggregates (``logits_topk_grouped``), as the extension numbers them.
GROUP_MODES = {"group_union": 1, "group_shared": 2}
GROUP_SCORES = {"max": 0, "sum": 1}

__all__ = [
    "BACKEND",
    "KV_DTYPES",
    "CpuAttention",
    "as_kv_view",
    "available_simd_levels",
    "backend",
    "gather_rows",
    "group_capacity",
    "logits",
    "logits_topk",
    "logits_topk_grouped",
    "max_threads",
    "merge",
    "partial_attention",
    "set_prefetch_bytes",
    "set_simd_level",
    "simd_level",
    "sparse_attention",
    "topk",
]


# --------------------------------------------------------------------------------------------
# SIMD level and threads
# --------------------------------------------------------------------------------------------


def simd_level() -> str:
    """Instruction set the compiled kernels use now ("none" for the NumPy fallback)."""
    return _ext.simd_level() if _ext is not None else "none"


def available_simd_levels() -> tuple[str, ...]:
    """Instruction sets this CPU can run, lowest first (empty for the NumPy fallback)."""
    return tuple(_ext.supported_simd_levels()) if _ext is not None else ()


def set_simd_level(level: str) -> str:
    """Use ``level`` (scalar, avx2 or avx512) for later calls; returns the previous level.

    Lets tests and benchmarks exercise every code path on one machine. A level above what
    the CPU supports raises ValueError. The setting is process-wide.
    """
    if _ext is None:
        raise RuntimeError("set_simd_level: the compiled extension is not built")
    return _ext.set_simd_level(level)


def set_prefetch_bytes(nbytes: int) -> int:
    """Software-prefetch distance of dense K/V scans, in bytes ahead; returns the previous one.

    The compute loops alone keep too few loads in flight to stream from DRAM, so the kernels
    prefetch each K and V row this far ahead (0 turns it off). The default (24 KiB) was
    tuned on Zen 4; other memory systems may want another value, and the benchmark can sweep
    it (benchmarks/cpu_attention.py --prefetch-bytes). Results never depend on it. Process-wide.
    """
    if _ext is None:
        raise RuntimeError("set_prefetch_bytes: the compiled extension is not built")
    return _ext.set_prefetch_bytes(_int_arg(nbytes, "nbytes"))


def max_threads() -> int:
    """Threads a call uses when ``num_threads`` is None (OpenMP default, OMP_NUM_THREADS),
    at most the machine's CPUs (more are capped, with a RuntimeWarning)."""
    return _ext.max_threads() if _ext is not None else 1


def _apply_simd_env() -> None:
    """Honour HGSIM_SIMD at import; a bad or unsupported value warns and keeps the best."""
    wanted = os.environ.get("HGSIM_SIMD")
    if not wanted or _ext is None:
        return
    try:
        _ext.set_simd_level(wanted)
    except ValueError as exc:
        warnings.warn(f"HGSIM_SIMD ignored: {exc}", RuntimeWarning, stacklevel=3)


_apply_simd_env()


# --------------------------------------------------------------------------------------------
# Zero-copy input views
# --------------------------------------------------------------------------------------------


def _torch_module():
    """torch if the caller already imported it; we never import it ourselves."""
    return sys.modules.get("torch")


def _is_tensor(x: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_to_numpy(t: Any, name: str) -> tuple[np.ndarray, str | None]:
    """Zero-copy NumPy view of a CPU tensor; bfloat16 comes back as int16 storage.

    The common case, a CPU tensor of a NumPy dtype without autograd, takes one ``t.numpy()``
    and NumPy-side checks: a decode step calls the kernels right after scanning megabytes, so
    each torch call runs from cold caches. With the torch-side checks of
    ``_checked_tensor_to_numpy`` for every tensor, such a call cost 186-196 us before any work;
    this way 147-152 us (measured). Other tensors still take those checks.
    """
    bf16 = t.dtype == _torch_module().bfloat16
    arr = _plain_numpy(t, bf16)
    if arr is None:  # GPU or autograd tensors
        return _checked_tensor_to_numpy(t, name)
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: tensor is not contiguous; call .contiguous() explicitly")
    return arr, "bfloat16" if bf16 else _NUMPY_KV_NAMES.get(arr.dtype.char)


def _plain_numpy(t: Any, bf16: bool = False) -> np.ndarray | None:
    """``t.numpy()`` (bfloat16 as its int16 storage), or None where torch refuses (outside the
    except block, so errors raised for such tensors do not chain torch's refusal).

    bfloat16 is viewed as int16 before asking: NumPy has no bfloat16, and letting ``t.numpy()``
    raise first cost each bfloat16 KV tensor 11.6 us instead of 1.0 us (measured)."""
    try:
        return t.view(_torch_module().int16).numpy() if bf16 else t.numpy()
    except (TypeError, RuntimeError):
        return None


#: NumPy dtype characters of the KV types NumPy has natively.
_NUMPY_KV_NAMES = {"f": "float32", "e": "float16"}


def _check_cpu_contiguous(t: Any, name: str) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: tensor is on {t.device}, CPU kernels need a CPU tensor")
    if not t.is_contiguous():
        raise ValueError(f"{name}: tensor is not contiguous; call .contiguous() explicitly")


def _checked_tensor_to_numpy(t: Any, name: str) -> tuple[np.ndarray, str | None]:
    torch = _torch_module()
    _check_cpu_contiguous(t, name)
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy(), str(t.dtype).removeprefix("torch.")
    return t.numpy(), None


def _check_contiguous(a: np.ndarray, name: str) -> None:
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: array is not C-contiguous (strides {a.strides}); "
            "pass np.ascontiguousarray(...) explicitly if a copy is intended"
        )


def as_kv_view(x: Any, name: str = "K", kv_dtype: str | None = None) -> tuple[np.ndarray, str]:
    """Zero-copy NumPy view of a KV tensor plus its element type name.

    Returns (array, dtype) where dtype is one of KV_DTYPES and the array shares memory with
    ``x`` (bfloat16 is viewed as uint16/int16 storage). Raises ValueError for anything that
    would need a copy (non-contiguous, GPU tensor) or is not a supported KV type.
    """
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype: expected one of {KV_DTYPES}, got {kv_dtype!r}")
    if _is_tensor(x):
        arr, found = _tensor_to_numpy(x, name)
    elif isinstance(x, np.ndarray):
        _check_contiguous(x, name)
        arr, found = x, None
    else:
        raise ValueError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if found is None:
        arr, found = _numpy_kv(arr, name, kv_dtype)
    if kv_dtype is not None and kv_dtype != found:
        raise ValueError(f"{name}: holds {found} but kv_dtype={kv_dtype!r}")
    return arr, found


def _numpy_kv(arr: np.ndarray, name: str, kv_dtype: str | None) -> tuple[np.ndarray, str]:
    if arr.dtype == np.float32:
        return arr, "float32"
    if arr.dtype == np.float16:
        return arr, "float16"
    if arr.dtype.name == "bfloat16":  # ml_dtypes
        return arr.view(np.uint16), "bfloat16"
    if arr.dtype in (np.uint16, np.int16):
        if kv_dtype not in ("bfloat16", "float16"):
            raise ValueError(
                f"{name}: 16-bit integer storage needs kv_dtype='bfloat16' or 'float16'"
            )
        return arr, kv_dtype
    raise ValueError(f"{name}: unsupported dtype {arr.dtype}; expected one of {KV_DTYPES}")


def _query(q: Any) -> np.ndarray:
    """q as a contiguous float32 (B, H, D) array; converting is fine, q is tiny."""
    if _is_tensor(q):
        arr = _plain_numpy(q)  # zero-copy: the common case, checked below (_tensor_to_numpy)
        if arr is None:  # GPU, autograd or bfloat16 tensors
            _check_cpu_contiguous(q, "q")
            arr = q.detach().float().numpy()
        q = arr
        if not q.flags.c_contiguous:
            raise ValueError("q: tensor is not contiguous; call .contiguous() explicitly")
    if not isinstance(q, np.ndarray):
        raise ValueError(f"q: expected a numpy array or torch tensor, got {type(q).__name__}")
    _check_contiguous(q, "q")
    if q.dtype.kind != "f" and q.dtype.name != "bfloat16":
        raise ValueError(f"q: expected a floating dtype, got {q.dtype}")
    if q.ndim != 3:
        raise ValueError(f"q: expected shape (B, H, D), got {q.shape}")
    return np.ascontiguousarray(q, dtype=np.float32)


def _indices(idx: Any, name: str = "idx") -> np.ndarray:
    """Integer token positions as a contiguous int64 (B, H, k) array."""
    if _is_tensor(idx):
        idx, _ = _tensor_to_numpy(idx, name)
    if not isinstance(idx, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array or torch tensor")
    _check_contiguous(idx, name)
    if idx.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected an integer dtype, got {idx.dtype}")
    if idx.ndim != 3:
        raise ValueError(f"{name}: expected shape (B, H, k), got {idx.shape}")
    return idx.astype(np.int64, copy=False)


def _int_arg(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _threads(num_threads: int | None) -> int:
    """0 tells the extension to use its OpenMP default.

    More threads than the machine has CPUs are capped by the extension, with a
    RuntimeWarning (it checks, so direct calls are as safe as these).
    """
    if num_threads is None:
        return 0
    n = _int_arg(num_threads, "num_threads")
    if n < 1:
        raise ValueError(f"num_threads: must be >= 1, got {n}")
    if n > sys.maxsize:
        raise ValueError(f"num_threads: {n} is not a thread count")
    return n


def _check_sizes(name: str, shape: tuple[int, ...], labels: tuple[str, ...]) -> None:
    """Every labelled dimension at least 1: an empty batch or head set is a caller's mistake
    (and once divided a kernel by zero)."""
    for size, label in zip(shape, labels, strict=False):
        if label and size < 1:
            raise ValueError(f"{name}: {label} must be >= 1, got shape {tuple(shape)}")


@dataclass(frozen=True)
class _Call:
    """Validated arguments of one attention call."""

    q: np.ndarray
    K: np.ndarray
    kdt: str
    V: np.ndarray | None
    vdt: str | None
    start: int
    end: int
    scale: float
    threads: int
    torch_out: bool

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(B, H, KVH, T, D)."""
        B, H, D = self.q.shape
        return B, H, self.K.shape[1], self.K.shape[2], D


def _prepare(
    q, K, V=None, *, scale=None, start=0, end=None, num_threads=None, kv_dtype=None
) -> _Call:
    """Checks every argument of a q/K(/V) call and returns zero-copy views."""
    torch_out = any(_is_tensor(x) for x in (q, K, V))
    qa = _query(q)
    Ka, kdt = as_kv_view(K, "K", kv_dtype)
    if Ka.ndim != 4:
        raise ValueError(f"K: expected shape (B, KVH, T, D), got {Ka.shape}")
    B, H, D = qa.shape
    _check_sizes("q", qa.shape, ("batch", "heads", "head_dim"))
    if Ka.shape[0] != B:
        raise ValueError(f"K: batch {Ka.shape[0]} differs from q's {B}")
    if Ka.shape[3] != D:
        raise ValueError(f"K: head_dim {Ka.shape[3]} differs from q's {D}")
    kvh = Ka.shape[1]
    _check_sizes("K", Ka.shape, ("", "kv heads"))
    if H % kvh:
        raise ValueError(f"q: {H} heads is not a multiple of K's {kvh} kv heads")
    Va, vdt = (None, None)
    if V is not None:
        Va, vdt = as_kv_view(V, "V", kv_dtype)
        if Va.shape != Ka.shape:
            raise ValueError(f"V: shape {Va.shape} differs from K's {Ka.shape}")
    T = Ka.shape[2]
    start = _int_arg(start, "start")
    end = T if end is None else _int_arg(end, "end")
    if not 0 <= start <= T:
        raise ValueError(f"start: {start} is outside [0, {T}]")
    if not start <= end <= T:
        raise ValueError(f"end: {end} is outside [start={start}, {T}]")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: must be finite, got {scale}")
    return _Call(qa, Ka, kdt, Va, vdt, start, end, scale, _threads(num_threads), torch_out)


def _out_view(out: Any, shape: tuple[int, ...], dtype: type, name: str) -> np.ndarray:
    """Writable zero-copy NumPy view of a caller's output buffer (array or CPU tensor).

    Output buffers let a decode loop reuse its memory step after step: a fresh allocation
    above glibc's mmap threshold is page-faulted and zeroed on every call, which costs as
    much as the kernel that fills it.
    """
    if _is_tensor(out):
        out, _ = _tensor_to_numpy(out, name)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array or torch tensor")
    _check_contiguous(out, name)
    if out.dtype != dtype or out.shape != shape:
        raise ValueError(
            f"{name}: expected {np.dtype(dtype).name} {shape}, got {out.dtype} {out.shape}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
    return out


def _check_k(k: Any, tokens: int) -> int:
    k = _int_arg(k, "k")
    if not 1 <= k <= tokens:
        raise ValueError(f"k: {k} is outside [1, {tokens}] (tokens in range)")
    return k


def _to_torch(a: np.ndarray, dtype_name: str | None = None):
    """Zero-copy torch tensor over a result array (bfloat16 storage reinterpreted)."""
    torch = _torch_module()
    if dtype_name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _wrap(torch_out: bool, *arrays: np.ndarray):
    out = tuple(_to_torch(a) if torch_out else a for a in arrays)
    return out if len(out) > 1 else out[0]


# --------------------------------------------------------------------------------------------
# Kernels: compiled and NumPy reference, same contract on validated arrays
# --------------------------------------------------------------------------------------------


class _CompiledKernels:
    """Thin calls into the C extension; outputs are allocated here."""

    name = "c"

    def logits(self, c: _Call, out: np.ndarray | None = None) -> np.ndarray:
        B, H, _, _, _ = c.shape
        if out is None:
            out = np.empty((B, H, c.end - c.start), np.float32)
        _ext.logits(c.q, c.K, _DTYPE_CODE[c.kdt], c.start, c.end, c.scale, c.threads, out)
        return out

    def logits_topk(
        self, c: _Call, k: int, values: np.ndarray | None = None, indices: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        B, H, _, _, _ = c.shape
        values = np.empty((B, H, k), np.float32) if values is None else values
        indices = np.empty((B, H, k), np.int64) if indices is None else indices
        _ext.logits_topk(
            c.q, c.K, _DTYPE_CODE[c.kdt], c.start, c.end, c.scale, c.threads, values, indices
        )
        return values, indices

    def logits_topk_grouped(
        self, c: _Call, k: int, mode: str, score: str, values: np.ndarray,
        indices: np.ndarray, counts: np.ndarray,
    ) -> int:
        return _ext.logits_topk_group(
            c.q, c.K, _DTYPE_CODE[c.kdt], c.start, c.end, c.scale, c.threads, k,
            GROUP_MODES[mode], GROUP_SCORES[score], values, indices, counts,
        )

    def topk(self, scores: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        values = np.empty(scores.shape[:2] + (k,), np.float32)
        indices = np.empty(scores.shape[:2] + (k,), np.int64)
        _ext.topk(scores, threads, values, indices)
        return values, indices

    def partial_attention(self, c: _Call) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty(c.q.shape, np.float32)
        lse = np.empty(c.q.shape[:2], np.float32)
        _ext.partial_attention(
            c.q,
            c.K,
            _DTYPE_CODE[c.kdt],
            c.V,
            _DTYPE_CODE[c.vdt],
            c.start,
            c.end,
            c.scale,
            c.threads,
            out,
            lse,
        )
        return out, lse

    def sparse_attention(self, c: _Call, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty(c.q.shape, np.float32)
        lse = np.empty(c.q.shape[:2], np.float32)
        _ext.sparse_attention(
            c.q, c.K, _DTYPE_CODE[c.kdt], c.V, _DTYPE_CODE[c.vdt], idx, c.scale, c.threads, out, lse
        )
        return out, lse

    def gather_rows(
        self, V: np.ndarray, vdt: str, idx: np.ndarray, threads: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        B, H, k = idx.shape
        if out is None:
            out = np.empty((B, H, k, V.shape[3]), V.dtype)
        _ext.gather_rows(V, _DTYPE_CODE[vdt], idx, threads, out)
        return out


def _widen(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 copy of a KV slice (reference path only)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16" and a.dtype.kind in "iu":  # float16 bits in 16-bit integer storage
        return a.view(np.float16).astype(np.float32)
    return a.astype(np.float32)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordering floats ascending with NaN above +inf (matches the C kernels)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    keys = np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)
    keys[np.isnan(values)] = 0xFFFFFFFF
    return keys


class _NumpyKernels:
    """Reference implementation: obviously correct, slow, used where the build failed."""

    name = "numpy"

    @staticmethod
    def _groups(c: _Call):
        """Yields (b, kv head, query head slice) for every KV group."""
        B, H, KVH, _, _ = c.shape
        G = H // KVH
        for b in range(B):
            for kh in range(KVH):
                yield b, kh, slice(kh * G, (kh + 1) * G)

    def logits(self, c: _Call, out: np.ndarray | None = None) -> np.ndarray:
        B, H, _, _, _ = c.shape
        if out is None:
            out = np.empty((B, H, c.end - c.start), np.float32)
        for b, kh, heads in self._groups(c):
            keys = _widen(c.K[b, kh, c.start : c.end], c.kdt)
            out[b, heads] = (c.q[b, heads] @ keys.T) * np.float32(c.scale)
        return out

    def logits_topk(
        self, c: _Call, k: int, values: np.ndarray | None = None, indices: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        found, order = self.topk(self.logits(c), k, c.threads)
        order += c.start
        if values is None or indices is None:
            return found, order
        np.copyto(values, found)
        np.copyto(indices, order)
        return values, indices

    def logits_topk_grouped(
        self, c: _Call, k: int, mode: str, score: str, values: np.ndarray,
        indices: np.ndarray, counts: np.ndarray,
    ) -> int:
        B, H, KVH, _, _ = c.shape
        G = H // KVH
        scores = self.logits(c).reshape(B, KVH, G, -1)
        if mode == "group_union":
            _, picked = self.topk(scores.reshape(B * KVH, G, -1), k, c.threads)
            picked = picked.reshape(B, KVH, G * k)
        else:
            total = scores[:, :, 0].copy()
            for g in range(1, G):  # in the extension's order (sum) and NaN rule (max)
                x = scores[:, :, g]
                if score == "sum":
                    total += x
                else:
                    total = np.where((x > total) | np.isnan(x), x, total)
            _, picked = self.topk(total, k, c.threads)
        sets = [[np.unique(picked[b, kh]) for kh in range(KVH)] for b in range(B)]
        counts[...] = [[len(rows) for rows in per_b] for per_b in sets]
        m = int(counts.max())
        out_v = values.reshape(-1)[: B * H * m].reshape(B, H, m)
        out_i = indices.reshape(-1)[: B * KVH * m].reshape(B, KVH, m)
        out_v[...] = -np.inf
        for b in range(B):
            for kh in range(KVH):
                rows = sets[b][kh]
                out_i[b, kh, : len(rows)] = rows + c.start
                out_i[b, kh, len(rows):] = rows[-1] + c.start
                out_v[b, kh * G : (kh + 1) * G, : len(rows)] = scores[b, kh][:, rows]
        return m

    def topk(self, scores: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(~_order_keys(scores), axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(scores, order, -1), order.astype(np.int64)

    def _attend(self, q: np.ndarray, keys: np.ndarray, vals: np.ndarray, scale: float):
        """Softmax attention of q (G, D) over keys/vals (n, D); NaN scores give NaN."""
        if keys.shape[0] == 0:
            return np.zeros(q.shape, np.float32), np.full(q.shape[0], -np.inf, np.float32)
        s = (q.astype(np.float64) @ keys.T.astype(np.float64)) * scale
        m = s.max(axis=1, keepdims=True)
        p = np.exp(s - m)
        denom = p.sum(axis=1)
        out = (p @ vals.astype(np.float64)) / denom[:, None]
        return out.astype(np.float32), (m[:, 0] + np.log(denom)).astype(np.float32)

    def partial_attention(self, c: _Call) -> tuple[np.ndarray, np.ndarray]:
        out = np.empty(c.q.shape, np.float32)
        lse = np.empty(c.q.shape[:2], np.float32)
        for b, kh, heads in self._groups(c):
            keys = _widen(c.K[b, kh, c.start : c.end], c.kdt)
            vals = _widen(c.V[b, kh, c.start : c.end], c.vdt)
            out[b, heads], lse[b, heads] = self._attend(c.q[b, heads], keys, vals, c.scale)
        return out, lse

    def sparse_attention(self, c: _Call, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        B, H, KVH, _, _ = c.shape
        out = np.empty(c.q.shape, np.float32)
        lse = np.empty(c.q.shape[:2], np.float32)
        for b in range(B):
            for h in range(H):
                kh = h // (H // KVH)
                keys = _widen(c.K[b, kh, idx[b, h]], c.kdt)
                vals = _widen(c.V[b, kh, idx[b, h]], c.vdt)
                o, s = self._attend(c.q[b, h : h + 1], keys, vals, c.scale)
                out[b, h], lse[b, h] = o[0], s[0]
        return out, lse

    def gather_rows(
        self, V: np.ndarray, vdt: str, idx: np.ndarray, threads: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        B, H, _ = idx.shape
        heads = np.arange(H) // (H // V.shape[1])
        rows = V[np.arange(B)[:, None, None], heads[None, :, None], idx]
        if out is None:
            return rows
        np.copyto(out, rows)
        return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class CpuAttention:
    """The public operations on top of one kernel set (compiled or NumPy reference)."""

    def __init__(self, kernels: _CompiledKernels | _NumpyKernels):
        self._k = kernels
        self.name = kernels.name

    def __repr__(self) -> str:
        return f"CpuAttention({self.name!r})"

    def logits(
        self, q, K, *, scale=None, start=0, end=None, num_threads=None, kv_dtype=None, out=None
    ):
        """Scores ``scale * q.k`` for tokens [start, end): float32 (B, H, end - start).

        ``out``, when given, is filled and returned instead of a new array (see ``_out_view``).
        """
        c = _prepare(
            q, K, scale=scale, start=start, end=end, num_threads=num_threads, kv_dtype=kv_dtype
        )
        if out is None:
            return _wrap(c.torch_out, self._k.logits(c))
        B, H, _, _, _ = c.shape
        self._k.logits(c, _out_view(out, (B, H, c.end - c.start), np.float32, "out"))
        return out

    def topk(self, scores, k, *, num_threads=None):
        """Per-head top-k of float32 scores (B, H, T).

        Returns (values float32 (B, H, k), indices int64 (B, H, k)) sorted by descending
        value; ties go to the lower index and NaN ranks above +inf (as torch.topk).
        """
        torch_out = _is_tensor(scores)
        if torch_out:
            scores, _ = _tensor_to_numpy(scores, "scores")
        if not isinstance(scores, np.ndarray) or scores.dtype != np.float32:
            raise ValueError("scores: expected a float32 numpy array or torch tensor")
        _check_contiguous(scores, "scores")
        if scores.ndim != 3:
            raise ValueError(f"scores: expected shape (B, H, T), got {scores.shape}")
        _check_sizes("scores", scores.shape, ("batch", "heads"))
        k = _check_k(k, scores.shape[2])
        return _wrap(torch_out, *self._k.topk(scores, k, _threads(num_threads)))

    def logits_topk(
        self, q, K, k, *, scale=None, start=0, end=None, num_threads=None, kv_dtype=None,
        out=None,
    ):
        """Fused scan + per-head top-k: the CPU's selection pass in HybridGen.

        Like ``topk(logits(...), k)`` but the compiled path never stores a full score row:
        each thread keeps a bounded heap per head while it streams K. Indices are absolute
        token positions (start already added). ``out`` = (values, indices), when given, is
        filled and returned instead of new arrays.
        """
        c = _prepare(
            q, K, scale=scale, start=start, end=end, num_threads=num_threads, kv_dtype=kv_dtype
        )
        k = _check_k(k, c.end - c.start)
        if out is None:
            return _wrap(c.torch_out, *self._k.logits_topk(c, k))
        B, H, _, _, _ = c.shape
        if not isinstance(out, tuple | list) or len(out) != 2:
            raise ValueError("out: expected a (values, indices) pair")
        values = _out_view(out[0], (B, H, k), np.float32, "out[0]")
        indices = _out_view(out[1], (B, H, k), np.int64, "out[1]")
        self._k.logits_topk(c, k, values, indices)
        return tuple(out)

    def logits_topk_grouped(
        self, q, K, k, *, mode="group_union", score="max", scale=None, start=0, end=None,
        num_threads=None, kv_dtype=None, out=None,
    ):
        """Top-k per KV group under GQA and every head's scores over the group's rows.

        The G = H / KVH query heads of a KV group share its K and V rows. ``mode`` picks the
        rows of each (batch, kv head) among tokens [start, end):

        * ``"group_union"``: the union of the G heads' own top-k sets (ties to the lower
          index, NaN above +inf, as ``logits_topk``): between k and min(G k, tokens) rows;
        * ``"group_shared"``: the top-k of the group's scores aggregated by ``score``,
          ``"max"`` or ``"sum"`` (NaN in any head makes the aggregate NaN): k rows.

        Returns ``(values float32 (B, H, m), indices int64 (B, KVH, m), counts int64 (B, KVH))``:
        each group's absolute positions ascending, then padded to the widest group's count m
        with its last position and score -inf (weight 0 in a softmax); ``values[b, h, j]`` is
        head h's scaled score of ``indices[b, h // G, j]``, computed again on the gathered K
        rows (the fused scan keeps no score rows). With G = 1 both modes are the per-head
        top-k, by position. ``out`` = (values (B, H, capacity), indices (B, KVH, capacity),
        counts (B, KVH)) with ``capacity = group_capacity(mode, G, k, end - start)``, when
        given, is filled: the results are then views of its contiguous prefixes.
        """
        if mode not in GROUP_MODES:
            raise ValueError(f"mode: expected one of {tuple(GROUP_MODES)}, got {mode!r}")
        if score not in GROUP_SCORES:
            raise ValueError(f"score: expected one of {tuple(GROUP_SCORES)}, got {score!r}")
        c = _prepare(
            q, K, scale=scale, start=start, end=end, num_threads=num_threads, kv_dtype=kv_dtype
        )
        k = _check_k(k, c.end - c.start)
        B, H, KVH, _, _ = c.shape
        cap = group_capacity(mode, H // KVH, k, c.end - c.start)
        if out is None:
            bufs = (np.empty((B, H, cap), np.float32), np.empty((B, KVH, cap), np.int64),
                    np.empty((B, KVH), np.int64))
            given = tuple(_to_torch(x) for x in bufs) if c.torch_out else bufs
        else:
            if not isinstance(out, tuple | list) or len(out) != 3:
                raise ValueError("out: expected a (values, indices, counts) triple")
            bufs = (_out_view(out[0], (B, H, cap), np.float32, "out[0]"),
                    _out_view(out[1], (B, KVH, cap), np.int64, "out[1]"),
                    _out_view(out[2], (B, KVH), np.int64, "out[2]"))
            given = tuple(out)
        m = self._k.logits_topk_grouped(c, k, mode, score, *bufs)
        values, indices, counts = given
        return (values.reshape(-1)[: B * H * m].reshape(B, H, m),
                indices.reshape(-1)[: B * KVH * m].reshape(B, KVH, m), counts)

    def partial_attention(
        self, q, K, V, *, scale=None, start=0, end=None, num_threads=None, kv_dtype=None
    ):
        """Attention over tokens [start, end) plus its log-sum-exp, for exact merging.

        Returns (out float32 (B, H, D), lse float32 (B, H)) with
        ``lse = log(sum_j exp(s_j))`` over the already scaled scores (natural log). An empty
        range gives out = 0 and lse = -inf; NaN in q or K makes the affected heads NaN.
        One online-softmax pass over K and V, split over threads by (batch, kv head, chunk).
        """
        c = _prepare(
            q, K, V, scale=scale, start=start, end=end, num_threads=num_threads, kv_dtype=kv_dtype
        )
        return _wrap(c.torch_out, *self._k.partial_attention(c))

    def sparse_attention(self, q, K, V, idx, *, scale=None, num_threads=None, kv_dtype=None):
        """Attention of each head over its own selected tokens ``idx`` (B, H, k).

        Returns (out, lse) like ``partial_attention``; with idx from ``logits_topk`` this is
        the CPU-side top-k attention. k = 0 gives out = 0, lse = -inf.
        """
        c = _prepare(q, K, V, scale=scale, num_threads=num_threads, kv_dtype=kv_dtype)
        idx_a = _check_indices(idx, c.shape)
        return _wrap(c.torch_out or _is_tensor(idx), *self._k.sparse_attention(c, idx_a))

    def gather_rows(self, V, idx, *, num_threads=None, kv_dtype=None, out=None):
        """rows[b, h, j] = V[b, h // G, idx[b, h, j]]: (B, H, k, D) in V's own dtype.

        This is what crosses PCIe, so it is never widened. A torch V gives a torch tensor
        of the same dtype; a NumPy V gives an array of V's NumPy dtype. ``out`` (same element
        type as V), when given, is filled and returned instead of a new array.
        """
        torch_out = _is_tensor(V)
        Va, vdt = as_kv_view(V, "V", kv_dtype)
        if Va.ndim != 4:
            raise ValueError(f"V: expected shape (B, KVH, T, D), got {Va.shape}")
        B, KVH, T, _ = Va.shape
        _check_sizes("V", Va.shape, ("batch", "kv heads", "", "head_dim"))
        idx_a = _indices(idx)
        if idx_a.shape[0] != B:
            raise ValueError(f"idx: batch {idx_a.shape[0]} differs from V's {B}")
        _check_sizes("idx", idx_a.shape, ("", "heads"))
        if idx_a.shape[1] % KVH:
            raise ValueError(f"idx: {idx_a.shape[1]} heads is not a multiple of {KVH} kv heads")
        _check_index_range(idx_a, T)
        if out is not None:
            target, _ = as_kv_view(out, "out", vdt)
            shape = (*idx_a.shape, Va.shape[3])
            if target.shape != shape:
                raise ValueError(f"out: expected shape {shape}, got {target.shape}")
            if not target.flags.writeable:
                raise ValueError("out: array is read-only")
            self._k.gather_rows(Va, vdt, idx_a, _threads(num_threads), target.view(Va.dtype))
            return out
        rows = self._k.gather_rows(Va, vdt, idx_a, _threads(num_threads))
        if torch_out:
            return _to_torch(rows, vdt)
        return rows.view(V.dtype) if V.dtype.name == "bfloat16" else rows


def group_capacity(mode: str, group: int, k: int, tokens: int) -> int:
    """Rows ``logits_topk_grouped`` may keep per (batch, kv head): k for ``"group_shared"``,
    at most ``group * k`` and at most ``tokens`` for ``"group_union"``."""
    if mode not in GROUP_MODES:
        raise ValueError(f"mode: expected one of {tuple(GROUP_MODES)}, got {mode!r}")
    return k if mode == "group_shared" else min(group * k, tokens)


def _check_indices(idx: Any, shape: tuple[int, int, int, int, int]) -> np.ndarray:
    B, H, _, T, _ = shape
    idx_a = _indices(idx)
    if idx_a.shape[:2] != (B, H):
        raise ValueError(f"idx: expected shape ({B}, {H}, k), got {idx_a.shape}")
    _check_index_range(idx_a, T)
    return idx_a


def _check_index_range(idx: np.ndarray, T: int) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= T):
        bad = idx[(idx < 0) | (idx >= T)][0]
        raise ValueError(f"idx: index {bad} is outside [0, {T})")


def merge(partials):
    """Combines partial attention results over disjoint token sets into the exact whole.

    ``partials`` is a sequence of (out (B, H, D), lse (B, H)) pairs, e.g. one from the GPU
    and one from ``partial_attention`` on the CPU. Partials with lse = -inf (empty ranges)
    contribute nothing, even if their out is not finite; if all are -inf the result is
    out = 0, lse = -inf. NaN in any used partial propagates. Computed in float64, returned
    as float32 (torch tensors if any input was one).
    """
    partials = list(partials)
    if not partials:
        raise ValueError("partials: need at least one (out, lse) pair")
    torch_out = any(_is_tensor(x) for pair in partials for x in pair)
    outs = np.stack([_merge_input(o, "out") for o, _ in partials]).astype(np.float64)
    lses = np.stack([_merge_input(s, "lse") for _, s in partials]).astype(np.float64)
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"partials: out shapes {outs.shape[1:]} and lse {lses.shape[1:]} differ")
    top = lses.max(axis=0)
    ref = np.where(np.isneginf(top), 0.0, top)
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp(lses - ref)
        contrib = np.where(w[..., None] == 0.0, 0.0, w[..., None] * outs).sum(axis=0)
        total = w.sum(axis=0)
        empty = total == 0.0
        out = np.where(empty[..., None], 0.0, contrib / np.where(empty, 1.0, total)[..., None])
    with np.errstate(divide="ignore"):
        lse = ref + np.log(total)
    return _wrap(torch_out, out.astype(np.float32), lse.astype(np.float32))


def _merge_input(x: Any, name: str) -> np.ndarray:
    if _is_tensor(x):
        return x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


_BACKENDS: dict[str, CpuAttention] = {"numpy": CpuAttention(_NumpyKernels())}
if _ext is not None:
    _BACKENDS["c"] = CpuAttention(_CompiledKernels())


def backend(name: str | None = None) -> CpuAttention:
    """The operations bound to one implementation: "c" (compiled) or "numpy" (reference).

    None gives the module default (compiled when built). Asking for "c" when the extension
    is not built raises RuntimeError.
    """
    if name is None:
        return _DEFAULT
    if name == "c" and _ext is None:
        raise RuntimeError("backend: the compiled extension is not built")
    if name not in ("c", "numpy"):
        raise ValueError(f"name: expected 'c' or 'numpy', got {name!r}")
    return _BACKENDS[name]


_DEFAULT = _BACKENDS["c"] if _ext is not None else _BACKENDS["numpy"]

logits = _DEFAULT.logits
topk = _DEFAULT.topk
logits_topk = _DEFAULT.logits_topk
logits_topk_grouped = _DEFAULT.logits_topk_grouped
partial_attention = _DEFAULT.partial_attention
sparse_attention = _DEFAULT.sparse_attention
gather_rows = _DEFAULT.gather_rows

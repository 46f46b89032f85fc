"""The kernel's argument guards, case by case: the calls that once ended the interpreter.

A batch of zero divided by zero in ``logits``, ``logits_topk`` and ``partial_attention``
(SIGFPE); a thread count far above the machine's CPUs crashed (SIGSEGV) or ended the process
from libgomp. Each is now a ValueError, or a cap with a RuntimeWarning, in the C entry points
themselves (so direct calls are safe) and in the wrapper. Calls that might crash run in a child
process (``tests/kernel_calls.py``), so a regression fails here instead of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_kernel_fuzz import ROOT, run_calls

import hw_backend.cpu_attention as ca

pytestmark = pytest.mark.skipif(ca.BACKEND != "c", reason="compiled extension not built")

CPUS = os.cpu_count() or 1
ENTRIES = ["partial_attention", "logits", "logits_topk", "logits_topk_grouped", "topk",
           "sparse_attention", "gather_rows"]


def spec(entry: str, api: str, **changes) -> dict:
    if api == "raw" and entry == "logits_topk_grouped":
        entry = "logits_topk_group"  # the extension's name for it
    base = {"api": api, "entry": entry, "B": 1, "H": 4, "KVH": 2, "T": 40, "D": 16,
            "dtype": "float32", "layout": "contiguous", "mismatch": None, "threads": None,
            "start": 0, "end": None, "k": 3, "idx_range": [0, 40], "kdt_code": None, "seed": 1,
            "group_mode": "group_union", "group_score": "max"}
    return {**base, **changes}


@pytest.mark.parametrize("api", ["wrapper", "raw"])
def test_empty_batch_heads_or_head_dim_is_a_value_error(api):
    cases = [(entry, dim) for entry in ENTRIES for dim in ("B", "H", "D")
             if (entry, dim) != ("topk", "D")]  # scores have no head_dim
    specs = [spec(entry, api, **{dim: 0}) for entry, dim in cases]
    for (entry, dim), report in zip(cases, run_calls(specs), strict=True):
        assert report["outcome"] == "raised", (entry, dim, report)
        assert report["error"].startswith("ValueError: "), (entry, dim, report)
        label = {"B": "batch", "H": "heads", "D": "head_dim"}[dim]
        assert label in report["error"], (entry, dim, report)


@pytest.mark.parametrize("api", ["wrapper", "raw"])
def test_thread_counts_above_the_machine_are_capped_with_a_warning(api):
    counts = [CPUS + 1, 100_000, 2**31 - 1]
    specs = [spec(entry, api, threads=n) for entry in ENTRIES for n in counts]
    if api == "raw":
        specs += [spec("stream_read", api, threads=n) for n in counts]
    for s, report in zip(specs, run_calls(specs), strict=True):
        assert report["outcome"] == "ok", (s, report)
        assert report["warnings"] == [
            f"nthreads: {s['threads']} is more than the {CPUS} CPUs of this machine; "
            f"using {CPUS}"], report


def test_raw_thread_counts_below_zero_or_beyond_any_int_raise():
    specs = [spec(entry, "raw", threads=n) for entry in [*ENTRIES, "stream_read"]
             for n in (-1, 2**63)]
    for s, report in zip(specs, run_calls(specs), strict=True):
        expected = "ValueError: nthreads: must be >= 0" if s["threads"] < 0 else "OverflowError"
        assert report["error"].startswith(expected), (s, report)


def test_wrapper_thread_counts_below_one_or_beyond_any_int_raise():
    for n in (0, -1, 2**63):
        with pytest.raises(ValueError, match="num_threads"):
            ca.partial_attention(*_qkv(), num_threads=n)


def test_thread_cap_warning_as_error_raises_instead_of_running():
    code = ("import warnings, numpy as np; from hw_backend import _cpu_attention as ext\n"
            "warnings.simplefilter('error')\n"
            "try:\n    ext.stream_read(np.zeros(64), 10**6)\n"
            "except RuntimeWarning as exc:\n    print('raised', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("raised nthreads: 1000000 is more than"), proc.stdout


def test_max_threads_never_exceeds_the_machine():
    assert 1 <= ca.max_threads() <= CPUS


def test_numpy_reference_reads_float16_bits_in_integer_storage():
    """uint16 storage with kv_dtype="float16" holds float16 bits (the fuzz tests found the
    reference converting them as integers)."""
    q, K, V = _qkv(np.float16)
    bits = {"K": K.view(np.uint16), "V": V.view(np.uint16)}
    ref = ca.backend("numpy")
    np.testing.assert_allclose(ref.logits(q, bits["K"], kv_dtype="float16"), ref.logits(q, K),
                               rtol=1e-6)
    out, _ = ref.partial_attention(q, bits["K"], bits["V"], kv_dtype="float16")
    np.testing.assert_allclose(out, ref.partial_attention(q, K, V)[0], rtol=1e-6)


def _qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    K = rng.standard_normal((1, 2, 10, 8)).astype(dtype)
    V = rng.standard_normal((1, 2, 10, 8)).astype(dtype)
    return q, K, V

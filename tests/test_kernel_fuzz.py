"""Every CPU kernel entry point, called with random arguments, raises or is right: never a signal.

The calls run in a child process (``tests/kernel_calls.py``) so that a division by zero, a
segfault or the OpenMP runtime ending the process fails a test instead of killing pytest.
Both the public wrapper (``hw_backend.cpu_attention``) and the raw extension
(``hw_backend._cpu_attention``) are called: the C entry points check their own arguments, so
a direct call is as safe as one through the wrapper. Each call must either raise
ValueError/TypeError/OverflowError (and only when its arguments break the documented contract)
or return what the NumPy reference computes on the same inputs.

Example counts are kept small (each example is one child process running a batch of 12
calls, ~0.2 s) so the whole suite stays within its CI budget on two cores;
HGSIM_FUZZ_EXAMPLES=400 runs a longer search (it passed 400 of each before this was committed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hw_backend.cpu_attention as ca  # noqa: E402

pytestmark = pytest.mark.skipif(ca.BACKEND != "c", reason="compiled extension not built")

CHILD = Path(__file__).with_name("kernel_calls.py")
ROOT = CHILD.parent.parent
CPUS = os.cpu_count() or 1
WRAPPER_ENTRIES = ["partial_attention", "logits", "logits_topk", "logits_topk_grouped", "topk",
                   "sparse_attention", "gather_rows"]
RAW_ENTRIES = [*(e if e != "logits_topk_grouped" else "logits_topk_group"
                 for e in WRAPPER_ENTRIES), "stream_read", "pointer_chase"]
#: None: the default; then the ordinary, the machine's limit, and counts that once crashed
#: (thousands of threads) or that no C int holds.
THREADS = [None, 0, 1, 2, CPUS, CPUS + 1, 64, 100_000, 2**31 - 1, 2**31, -1, 2**63]
ALLOWED_ERRORS = ("ValueError", "TypeError", "OverflowError")
SETTINGS = settings(max_examples=int(os.environ.get("HGSIM_FUZZ_EXAMPLES", "25")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def kernel_call(draw, api: str) -> dict:
    """One call: shapes near the edges (0, 1, GQA groups, odd head sizes), every KV dtype and
    some unsupported ones, non-contiguous layouts, ranges and k on and off their bounds."""
    T = draw(st.sampled_from([0, 1, 2, 31, 33, 257]) | st.integers(0, 300))
    kvh = draw(st.sampled_from([0, 1, 2, 3]))
    return {
        "api": api,
        "entry": draw(st.sampled_from(RAW_ENTRIES if api == "raw" else WRAPPER_ENTRIES)),
        "B": draw(st.sampled_from([0, 1, 1, 2, 3])),
        "H": draw(st.sampled_from([0, kvh, 2 * kvh, 4 * kvh, 5])),
        "KVH": kvh,
        "T": T,
        "D": draw(st.sampled_from([0, 1, 7, 8, 16, 64, 80]) | st.integers(0, 130)),
        "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"])),
        "layout": draw(st.sampled_from(["contiguous"] * 4 + ["strided", "transposed"])),
        "mismatch": draw(st.sampled_from([None] * 5 + ["batch", "head_dim", "v_tokens",
                                                       "idx_heads"])),
        "threads": draw(st.sampled_from(THREADS)),
        "start": draw(st.sampled_from([0, 0, 1, -1, T, T + 1]) | st.integers(0, max(T, 0))),
        "end": draw(st.sampled_from([None, None, T, T - 1, T + 1, 0]) | st.integers(0, T + 1)),
        "k": draw(st.sampled_from([-1, 0, 1, T, T + 1]) | st.integers(1, 40)),
        "idx_range": draw(st.sampled_from([(0, T), (0, T), (0, 1), (-1, T), (0, T + 1)])),
        "kdt_code": draw(st.sampled_from([None] * 4 + [0, 1, 2, 3, -1])),
        # grouped top-k: mode and aggregate, by name (wrapper) or code (raw), some invalid
        "group_mode": draw(st.sampled_from(["group_union", "group_shared"] * 3
                                           + ["per_head", 0, 3])),
        "group_score": draw(st.sampled_from(["max", "sum"] * 3 + ["mean", 2])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def run_calls(specs: list[dict]) -> list[dict]:
    """Runs ``specs`` in a child; fails on a signal, returns one report per call."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(CHILD)], input=json.dumps(specs), env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [line for line in lines if "start" in line]
    last = started[-1]["spec"] if started else None
    assert proc.returncode >= 0, (
        f"the child died of signal {-proc.returncode} during {json.dumps(last)}\n"
        f"{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in lines if "done" in line]
    assert len(reports) == len(specs)
    return reports


def judge(specs: list[dict], reports: list[dict]) -> None:
    for spec, report in zip(specs, reports, strict=True):
        where = json.dumps(spec)
        if report["outcome"] == "raised":
            assert report["error"].split(":")[0] in ALLOWED_ERRORS, (where, report)
            assert report["expect"] == "invalid", f"valid call refused: {where}\n{report}"
        else:
            assert report["outcome"] == "ok", f"wrong result: {where}\n{report['problem']}"
            assert report["expect"] == "valid", f"invalid call accepted: {where}\n{report}"


@SETTINGS
@given(st.lists(kernel_call("wrapper"), min_size=12, max_size=12))
def test_wrapper_calls_raise_or_match_the_reference(specs):
    judge(specs, run_calls(specs))


@SETTINGS
@given(st.lists(kernel_call("raw"), min_size=12, max_size=12))
def test_raw_extension_calls_raise_or_match_the_reference(specs):
    judge(specs, run_calls(specs))

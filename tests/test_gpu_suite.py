"""``benchmarks/gpu_suite.sh --cpu-smoke``: the GPU suite's plumbing on a machine without one.

Every stage (device time, quick calibration, attention-only and whole-model validation,
speed-ups) runs against the CPU stand-in with tiny models, within the suite's time budget, and
the summary collects each stage's results. The numbers are the stand-in's, not a GPU's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")
def test_cpu_smoke_runs_every_stage_and_writes_one_summary(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": sys.executable, "SUITE_BUDGET_S": "300",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    pack = tmp_path / "suite.tgz"
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke",
                             f"--pack={pack}", str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = dict(line.split()[0:2] for line in (out / "stages.txt").read_text().splitlines())
    assert stages == {name: "rc=0" for name in ("device_time", "calibrate",
                                                 "validate_attention", "validate_model",
                                                 "speedups", "gpu_tests")}
    summary = (out / "summary.md").read_text()
    for heading in ("## Machine", "## 1. Device time", "## 3. Calibration",
                    "## 4. Validation, attention only", "## 4. Validation, whole model",
                    "## 5. Speed-ups", "## CUDA tests"):
        assert heading in summary
    assert "cpu-standin (no CUDA)" in summary and "torch" in (out / "env.txt").read_text()
    assert "MAPE" in summary and "HybridGen over" in summary
    assert "cpu0 attention_rate_by_kv_dtype" in summary  # the host kernel beside the GPU
    assert "skipped" in summary.split("## CUDA tests")[1]  # collected, and skip without CUDA
    assert (out / "local.yaml").exists() and (out / "validate_model.csv").exists()
    with tarfile.open(pack) as packed:  # one file to copy back, holding the whole folder
        assert {"./summary.md", "./local.yaml", "./stages.txt"} <= set(packed.getnames())


def test_the_summary_lists_a_failed_case_and_leaves_it_out_of_the_mape(tmp_path):
    """validate writes a case that raised on CUDA as a row with its reason under ``failure``;
    the summary counts and averages only the compared cases and names the failed one."""
    from test_speedups_benchmark import load_benchmark

    summary = load_benchmark("gpu_suite_summary")
    (tmp_path / "validate_model.csv").write_text(
        "config,policy,context,measured_ms,predicted_ms,error_pct,failure\n"
        "hybrid,hybridgen_static,32768,10.0,11.0,10.0,\n"
        "offload,cpu_offload,32768,20.0,18.0,-10.0,\n"
        "hgca,hgca,32768,,,,RuntimeError: CUDA out of memory\n")
    text = "\n".join(summary.validation(tmp_path, "validate_model"))
    assert text.startswith("2 cases; MAPE 10.0% overall; mean signed +0.0%")
    assert "| hgca |" not in text and "hgca @ 32768 |" not in text
    assert "FAILED case hgca @ 32768: RuntimeError: CUDA out of memory" in text


def test_the_summary_of_a_stage_whose_every_case_failed_lists_the_failures(tmp_path):
    """When every case raised, validate's CSV holds only the failed rows (no timing columns at
    all): the summary says no case was compared and names each failure instead of raising."""
    from test_speedups_benchmark import load_benchmark

    summary = load_benchmark("gpu_suite_summary")
    (tmp_path / "validate_model.csv").write_text(
        "config,policy,context,device_threads,host_threads,options,failure,mape_pct,profile\n"
        "hgca,hgca,32768,1,1,{},RuntimeError: CUDA out of memory,,local\n"
        "hybrid,hybridgen_static,65536,1,1,{},RuntimeError: CUDA error: misaligned,,local\n")
    text = "\n".join(summary.validation(tmp_path, "validate_model"))
    assert text.startswith("0 cases compared (2 failed)")
    assert "FAILED case hgca @ 32768: RuntimeError: CUDA out of memory" in text
    assert "FAILED case hybrid @ 65536: RuntimeError: CUDA error: misaligned" in text
    assert "overall" not in text and "| case |" not in text

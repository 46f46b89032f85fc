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

pytestmark = pytest.mark.slow


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
    assert "skipped" in summary.split("## CUDA tests")[1]  # collected, and skip without CUDA
    assert (out / "local.yaml").exists() and (out / "validate_model.csv").exists()
    with tarfile.open(pack) as packed:  # one file to copy back, holding the whole folder
        assert {"./summary.md", "./local.yaml", "./stages.txt"} <= set(packed.getnames())

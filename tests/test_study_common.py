"""Helpers shared by the study tests (tiny, fast studies), and the CLI's own contract:
a broken study exits 2 with one line on stderr and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]

TINY = """\
name: tiny
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {batch: 2, context: 32k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  - grid:
      workload.context: [32k, 64k]
      policy: [hybridgen, flexgen, cpu_offload]
derived:
  speedup:
    metric: tokens_per_s
    of: {policy: hybridgen}
    vs: {policy: [flexgen, cpu_offload]}
plots:
  tput: {kind: line, x: workload.context, y: tokens_per_s, hue: policy, logx: true}
  heat: {kind: heatmap, x: workload.context, y: policy, value: tokens_per_s}
"""


def write_study(tmp_path: Path, text: str = TINY, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused_study(tmp_path: Path, capsys, text: str) -> str:
    """Run ``text`` as a study from the command line; it must be refused with one line and
    exit code 2, writing nothing. Returns the line."""
    from hgsim.cli import main

    code = main(["study", str(write_study(tmp_path, text)), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HGSIM_PROFILE_PATH"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120, **kwargs)


def last_run(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())[-1]


def results(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def test_cli_bad_study_exits_2_with_one_line_and_writes_nothing(tmp_path):
    study = write_study(tmp_path, TINY.replace("policy: [hybridgen", "polciy: [hybridgen"))
    out = tmp_path / "out"
    proc = run_cli("study", str(study), "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{study}:10:" in lines[0] and "polciy" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_runs_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("study", str(write_study(tmp_path)), "--out", str(out), "--jobs", "2",
                   "--no-figures")
    assert proc.returncode == 0, proc.stderr
    assert last_run(out)["computed"] == 6
    assert len(results(out)) == 6

"""The CLI runs end to end as a user would start it (`python -m hgsim ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hgsim.catalog import MODELS
from hgsim.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HGSIM_PROFILE_PATH", "HGSIM_MODEL_PATH")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["--help"], ["profiles", "--help"], ["models", "--help"]])
def test_help_exits_0(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "usage: hgsim" in result.stdout


def test_no_command_prints_help():
    result = run_cli()
    assert result.returncode == 0 and "profiles" in result.stdout and "models" in result.stdout


def test_profiles_lists_all():
    result = run_cli("profiles")
    assert result.returncode == 0, result.stderr
    for name in ("a100-40gb-spr-cxl", "h100-80gb-spr-cxl", "rtx5090-cxl", "h100-2socket-cxl",
                 "dev-zen4-2core"):
        assert name in result.stdout
    assert "PCIe GB/s" in result.stdout


def test_profiles_show():
    result = run_cli("profiles", "show", "h100-2socket-cxl")
    assert result.returncode == 0, result.stderr
    for text in ("GPU gpu0", "3,350", "GB/s", "upi0", "cpu1", "cxl0-link", "latency ns"):
        assert text in result.stdout


def test_models_table():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in MODELS)
    assert "KV KiB/token fp16" in result.stdout


def test_unknown_names_exit_2_with_one_line(capsys):
    assert main(["models", "llama-9-1b"]) == 2
    assert main(["profiles", "show", "no-such-box"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("hgsim models: error: unknown model 'llama-9-1b'")
    assert err[1].startswith("hgsim profiles: error: unknown hardware profile 'no-such-box'")


def test_models_in_process(capsys):
    assert main(["models", "Llama-2-70B"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-70b" in out and "320" in out  # 327,680 B = 320 KiB per token


def test_policy_options_are_listed_as_option_takes_them(capsys):
    """`hgsim policies NAME` prints each default as `--option` accepts it (enum values, not
    their Python names, which the option rejects)."""
    assert main(["policies", "hybridgen_per_head"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "selection=per_head" in out and "group_score=max" in out
    assert "GroupSelect" not in out and "GroupScore" not in out

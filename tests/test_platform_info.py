"""The line naming what a measurement ran on (card, driver, torch and CUDA, CPU)."""

from __future__ import annotations

import json
import sys
import types

import pytest

torch = pytest.importorskip("torch")

from hw_backend import platform_info  # noqa: E402


def test_the_standin_line_names_torch_and_the_cpu():
    line = platform_info.describe(False)
    assert line.startswith("device cpu-standin (no CUDA); torch ")
    assert torch.__version__ in line and platform_info.cpu_model() in line


def test_a_gpu_line_names_card_driver_torch_and_cuda(monkeypatch):
    nvml = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                 nvmlSystemGetDriverVersion=lambda: b"580.159.04")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    line = platform_info.describe(True)
    assert line.startswith("device NVIDIA H100 80GB HBM3; driver 580.159.04; torch ")
    assert "(CUDA 13.0); CPU " in line


def test_without_nvml_the_driver_is_unknown_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert platform_info.gpu_driver_version() is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "GPU")
    assert "; driver unknown; " in platform_info.describe(True)


def test_hgsim_run_reports_where_it_measured(capsys):
    from hgsim.cli import main

    args = ["run", "--model", "tiny-llama", "--profile", "dev-zen4-2core", "--context", "1k",
            "--gen", "2", "--warmup", "1", "--no-progress"]
    assert main(args) == 0
    assert "measured on: device cpu-standin (no CUDA); torch " in capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["platform"].startswith("device cpu-standin (no CUDA)")

"""``benchmarks/speedups.py`` on the CPU stand-in: one store for every context, and a policy whose
run raises becomes a row with its reason instead of ending the stage (on a borrowed GPU, one
policy running out of memory must not cost the others' rows)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark",
                                                  REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_policy_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from hw_backend.model_decode import ModelDecode

    speedups = load_benchmark("speedups")
    decode = ModelDecode.decode
    fills = []

    def flaky(self, policy, steps, **kw):
        if policy.name == "flexgen_cpu":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return decode(self, policy, steps, **kw)

    fill_random = ModelDecode.fill_random

    def counted_fill(self, tokens, *args, **kw):
        fills.append(tokens)
        return fill_random(self, tokens, *args, **kw)

    monkeypatch.setattr(ModelDecode, "decode", flaky)
    monkeypatch.setattr(ModelDecode, "fill_random", counted_fill)
    out = tmp_path / "speedups"
    code = speedups.main(["--cpu-smoke", "--profile", "dev-zen4-2core", "--contexts", "1k", "2k",
                          "--policies", "hybridgen", "flexgen_cpu", "cpu_offload", "--gen", "2",
                          "--warmup", "1", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "speedups.json").read_text())["rows"]
    assert [(r["context"], r["policy"]) for r in rows] == [
        (2048, "hybridgen"), (2048, "flexgen_cpu"), (2048, "cpu_offload"),
        (1024, "hybridgen"), (1024, "flexgen_cpu"), (1024, "cpu_offload")]
    failed = [r for r in rows if r["policy"] == "flexgen_cpu"]
    assert all(r["infeasible"] == "failed: RuntimeError: CUDA out of memory. Tried to allocate "
               "2.00 GiB" for r in failed)
    assert all(r["measured_tokens_per_s"] > 0 for r in rows if r["policy"] != "flexgen_cpu")
    assert fills == [2047]  # one fill, at the largest context, for every context and policy
    table = (out / "speedups.md").read_text()
    assert "not run: failed: RuntimeError" in table and "| 1024 | cpu_offload |" in table


def test_device_time_records_a_failing_path_and_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    device_time = load_benchmark("device_time")
    measure = device_time.measure

    def flaky(model, policy, label, graphs, args, cuda):
        if graphs and policy.name == "hgca":
            raise RuntimeError("operation not permitted when stream is capturing")
        return measure(model, policy, label, graphs, args, cuda)

    monkeypatch.setattr(device_time, "measure", flaky)
    out = tmp_path / "device_time"
    assert device_time.main(["--cpu-smoke", "--steps", "1", "--warmup", "1", "--only", "hgca",
                             "cpu_offload", "--out", str(out)]) == 0
    rows = json.loads((out / "device_time.json").read_text())
    assert [(r["policy"], r["path"]) for r in rows] == [
        ("hgca", "eager"), ("hgca", "graphs"), ("cpu_offload", "eager"),
        ("cpu_offload", "graphs")]
    assert rows[1]["infeasible"] == ("failed: RuntimeError: operation not permitted when stream "
                                     "is capturing")
    assert "| LSE merge (hgca) | graphs: failed: RuntimeError" in (out / "device_time.md").read_text()


def test_a_failure_in_a_broken_cuda_context_is_still_one_line(monkeypatch, capsys):
    """After a sticky CUDA error (an illegal address, say) draining the device raises again;
    that must not escape the handler that records the run and goes on to the next."""
    torch = pytest.importorskip("torch")
    from hw_backend.run_failure import failure_reason

    def broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\ndetails")
    except RuntimeError as exc:
        reason = failure_reason(exc, cuda=True)
    assert reason == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" in capsys.readouterr().err

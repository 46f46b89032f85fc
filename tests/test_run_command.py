"""``hgsim run``: a real decode on this machine printed beside its simulation.

Without CUDA it runs on the CPU stand-in with a tiny model. Every mistake is a one-line error
with exit code 2 before anything is built; the HBM budget changes what the policy keeps on the
device exactly as a smaller GPU would.
"""

from __future__ import annotations

import json

import pytest

from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.errors import UserError
from hgsim.hbm_budget import HbmBudget
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.workload import Workload
from hw_backend import measured_run

TINY = ["--model", "tiny-llama", "--profile", "dev-zen4-2core", "--no-progress",
        "--accelerator", "standin"]
NO_RESERVE = ["--option", "hbm_reserve_gb=0", "--option", "hbm_reserve_fraction=0"]


def test_tiny_model_runs_and_prints_both_columns(capsys, tmp_path):
    code = main(["run", *TINY, "--policy", "hybridgen", "--context", "1k", "--gen", "3",
                 "--hbm-budget", "0.9MB", *NO_RESERVE, "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert "measured (cpu-standin (no CUDA))" in out and "simulated (dev-zen4-2core)" in out
    assert "per-token latency mean" in out and "token wall time" in out
    assert "synthetic K/V (no prefill)" in out
    assert "does not describe this run's device" in out  # dev-zen4-2core is a GPU profile
    summary = json.loads((tmp_path / "r.json").read_text())
    measured, simulated = summary["measured"], summary["simulated"]
    assert measured["gen"] == simulated["gen"] == 3 and measured["tokens_per_s"] > 0
    assert measured["accuracy_mass_kept"] is None  # not measured, and strict JSON
    # the budget left room for only part of the context: the plan split it on both sides
    assert 0 < measured["final_gpu_tokens"] == simulated["final_gpu_tokens"] < 1024
    steps = (tmp_path / "r.steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 2 * 3


def test_attention_only_json(capsys):
    code = main(["run", *TINY, "--policy", "cpu_offload", "--context", "512", "--gen", "2",
                 "--warmup", "0", "--attention-only", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["device"] == "cpu-standin (no CUDA)"
    assert rows["measured"]["final_gpu_tokens"] == 0 and rows["simulated"]["gen"] == 2


def test_json_with_out_keeps_stdout_one_json_document(capsys, tmp_path):
    code = main(["run", *TINY, "--policy", "cpu_offload", "--context", "512", "--gen", "2",
                 "--warmup", "0", "--attention-only", "--json", "--out", str(tmp_path / "r")])
    assert code == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["simulated"]["gen"] == 2  # the notice is not on stdout
    assert captured.err.startswith("outputs: ") and str(tmp_path / "r.json") in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["--context", "1k", "--hbm-budget", "5000TB"], "exceeds this host's RAM"),
    (["--context", "1k", "--hbm-budget", "0.1MB"], "cannot hold tiny-llama's 0.4 MB of"),
    # a budget the HBM reserve fills: the tiny weights in MB (not "0.0 GB"), the reserve named
    (["--context", "1k", "--hbm-budget", "1.1GB"],
     "would stream 0.4 MB of weights from host memory every step (1.1 GB of HBM less its"),
    (["--context", "1k", "--hbm-budget", "24 GB/s"], "wrong unit"),
    (["--context", "lots"], "--context"),
    (["--context", "1k", "--policy", "gpu_only", "--hbm-budget", "0.7MB", *NO_RESERVE],
     "gpu_only cannot run tiny-llama at context 1024"),
    (["--context", "1k", "--policy", "hybridgenn"], "did you mean 'hybridgen'"),
    (["--context", "1k", "--option", "topk_ratio"], "KEY=VALUE"),
    (["--context", "1k", "--dtype", "fp32", "--out", "/no/such/dir/x"], "does not exist"),
    (["--context", "1k", "--batch", "0"], "--batch must be >= 1"),
    (["--context", "1k", "--option", "bogus=1"], "policy 'hybridgen' has no option 'bogus'"),
    (["--context", "1k", "--hbm-budget", ""], "--hbm-budget: cannot read '' as a quantity"),
    (["--context", "1k", "--out", ""], "--out: '' is a folder or empty; give a file prefix"),
    (["--context", "1k", "--out", "/"], "--out: '/' is a folder or empty"),
    (["--context", "1k", "--out", "/proc/no-such-run"], "--out: cannot write in /proc"),
    (["--context", "1k", "--eager"], "--eager: the CPU stand-in has no CUDA graphs"),
    (["--context", "1k", "--policy", "h2o"],
     "--policy: hw_backend cannot execute h2o's plan at context 1024: host-evicted plans"),
    (["--context", "1k", "--option", "host_socket=1"],
     "--option host_socket: profile dev-zen4-2core has no socket 1"),
    (["--context", "1k", "--profile", "h100-2socket-cxl", "--option", "host_socket=1"],
     "--policy: hw_backend cannot execute hybridgen's plan at context 1024: host_socket=cpu1"),
    (["--context", "1k", "--profile", "h100-2socket-cxl", "--option", "host_socket=all"],
     "--policy: hw_backend cannot execute hybridgen's plan at context 1024: host_socket=all"),
    (["--context", "1000000000000000"], "--context: 1e+15 is not a plausible value"),
    (["--context", "1k", "--seed", "99999999999999999999999"],
     "--seed: 1e+23 is not a plausible value"),
    # was a traceback after the model was built ("ValueError: expected non-negative integer")
    (["--context", "1k", "--seed", "-5"], "--seed: input should be greater than or equal to 0"),
])
def test_mistakes_are_one_line_before_any_work(monkeypatch, capsys, args, message):
    monkeypatch.setattr(measured_run, "measure", _must_not_run)
    assert main(["run", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hgsim run: error:") and message in err[0]


def test_an_out_folder_is_an_error_and_nothing_is_written_beside_it(monkeypatch, capsys,
                                                                     tmp_path):
    """``--out DIR`` used to write DIR.steps.csv and DIR.json next to the folder, after the
    run (and ``--out /`` failed with a traceback there)."""
    monkeypatch.setattr(measured_run, "measure", _must_not_run)
    folder = tmp_path / "results"
    folder.mkdir()
    for out in (str(folder), f"{folder}/"):
        assert main(["run", *TINY, "--context", "1k", "--out", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"hgsim run: error: --out: {out!r} is a folder or empty; give a file "
                       "prefix such as results/run (writes results/run.steps.csv and "
                       "results/run.json)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert list(folder.iterdir()) == []


def test_host_threads_beyond_the_machine_are_capped_with_a_warning(monkeypatch, capsys):
    import os

    seen = {}

    def measure(config, prepared, progress=True):
        seen["threads"] = config.host_threads
        raise KeyboardInterrupt  # enough: the decode would start here

    monkeypatch.setattr(measured_run, "measure", measure)
    assert main(["run", *TINY, "--context", "1k", "--host-threads", "1000000000"]) == 130
    cpus = os.cpu_count()
    assert seen["threads"] == cpus
    assert (f"hgsim run: warning: --host-threads 1000000000 is more than the {cpus} CPUs of "
            f"this machine; using {cpus}") in capsys.readouterr().err


def test_a_large_model_without_cuda_points_to_the_tiny_ones(monkeypatch, capsys):
    monkeypatch.setattr(measured_run, "measure", _must_not_run)
    monkeypatch.setattr(measured_run, "_device_bytes", lambda cuda: (32e9, "this host's RAM"))
    assert main(["run", "--model", "llama-3.1-8b", "--profile", "dev-zen4-2core",
                 "--context", "1k", "--accelerator", "standin"]) == 2
    assert "--model tiny-llama" in capsys.readouterr().err


def test_the_standin_needs_a_calibrated_profile(monkeypatch):
    monkeypatch.setattr("hgsim.profiles.list_profiles", lambda: ["dev-zen4-2core"])
    with pytest.raises(UserError, match="hgsim calibrate --out hardware_profiles/local.yaml"):
        measured_run.default_profile(cuda=False)


@pytest.mark.parametrize("policy", ["cpu_offload", "gpu_only", "hybridgen_static"])
def test_a_run_on_a_calibrated_machine_is_predicted_as_validate_predicts_it(policy):
    """With the calibration beside its profile, ``hgsim run`` predicts the machine the executor
    uses, as ``hgsim validate`` does: the socket's cores are the C kernel's threads, and the
    stand-in's attention runs at its idle rate except beside the host kernel. Before, run
    simulated every core of the socket for a one-thread kernel and the loaded rate always."""
    from hgsim.validation import ValidationStudy, cases
    from hgsim.validation import predict as validate_predict
    from hw_backend.validate import Calibration

    profile = load_profile("dev-zen4-2core").model_copy(deep=True)
    calibration = Calibration(split=(1, 1), per_threads={}, attention_alone=0.9)
    options = {"topk_ratio": 0.05, "gpu_share": 0.5} if policy == "hybridgen_static" else {}
    config = measured_run.RunConfig(model=get_model("llama-3.1-8b"), policy=policy,
                                    context=16384, gen=2, warmup=0, options=options,
                                    dtype="fp32", attention_only=True, accelerator="standin",
                                    host_threads=1)
    prepared = measured_run.check(config, profile)
    run = measured_run.predict(config, prepared, calibration=calibration)
    study = ValidationStudy.model_validate({
        "name": "s", "model": "llama-3.1-8b", "kv_dtype": "fp32", "weight_dtype": "fp32",
        "warmup_steps": 0, "steps": 2,
        "configs": [{"name": "c", "policy": policy, "options": options,
                     "contexts": [16384]}]})
    case = cases(study, device_threads=1, host_threads=1)[0]
    validated = validate_predict(prepared.profile, study, case, {}, 0.9)
    assert [s.latency_s for s in run.steps] == pytest.approx([s.latency_s for s in validated])
    plain = measured_run.predict(config, prepared)
    assert plain.steps[0].latency_s != pytest.approx(run.steps[0].latency_s)


def test_hbm_budget_makes_kv_spill_as_on_a_smaller_gpu():
    model = get_model("llama-3.1-8b")
    workload = Workload(context=65536, gen=64, kv_dtype="bf16", weight_dtype="bf16")
    big = load_profile("h100-80gb-spr-cxl")
    small = big.model_copy(update={"gpus": {"gpu0": big.gpus["gpu0"].model_copy(
        update={"hbm_capacity_gb": 24.0})}})
    budget = HbmBudget.parse("24GB")
    for policy in ("hybridgen", "flexgen", "hgca", "infinigen"):
        on_small = make_policy(policy, model, small, workload).step_plan(65536).layer
        budgeted = make_policy(policy, model, budget.apply(big), workload).step_plan(65536).layer
        unbudgeted = make_policy(policy, model, big, workload).step_plan(65536).layer
        assert budgeted == on_small
        assert budgeted.gpu_tokens < unbudgeted.gpu_tokens
    with pytest.raises(UserError, match="exceeds"):
        budget.check(device_bytes=16e9, model=model, weight_dtype="bf16")
    with pytest.raises(UserError, match="cannot hold"):
        HbmBudget.parse("12GB").check(device_bytes=80e9, model=model, weight_dtype="bf16")


def _must_not_run(*args, **kwargs):
    raise AssertionError("measured before the input was checked")


def test_running_out_of_gpu_memory_is_one_line_naming_the_budget(monkeypatch, capsys):
    import torch

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...\n"
                               "more lines")

    monkeypatch.setattr(measured_run, "measure", oom)
    assert main(["run", *TINY, "--context", "1k", "--hbm-budget", "24GB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "hgsim run: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert "the 24GB budget" in err[0] and "--hbm-budget" in err[0]

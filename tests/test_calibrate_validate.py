"""`hgsim calibrate --quick` and `hgsim validate` end to end, plus their pure helpers.

The end-to-end tests run the real benchmarks and the real executor on whatever machine CI has
(no GPU needed: the CPU stand-in plays the device), so they assert what must hold anywhere -- the
profile loads and cites its measurements, the outputs exist, MAPE is a finite number, and the exit
code follows the threshold -- never a particular accuracy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from hgsim.cli import main
from hgsim.errors import UserError
from hgsim.profiles import load_profile
from hgsim.results import StepTiming
from hgsim.validation import (
    Case,
    CaseResult,
    Drift,
    breakdown,
    check_same_plans,
    load_study,
    mape,
)

pytest.importorskip("torch")
pytest.importorskip("hw_backend._cpu_attention", reason="C kernels not built")

from hw_backend.calibration.cpu_kernel import calibrated_probe  # noqa: E402

TINY_STUDY = """
name: ci-tiny
model:
  name: synthetic-llama-2l
  family: llama
  num_layers: 2
  hidden_size: 4096
  num_heads: 32
  num_kv_heads: 8
  head_dim: 128
  ffn_size: 14336
  ffn_kind: swiglu
  vocab_size: 32000
  max_context: 131072
warmup_steps: 1
steps: 2
configs:
  - name: hybrid
    policy: hybridgen_static
    options: {topk_ratio: 0.05, gpu_share: 0.25}
    contexts: [1k, 2k]
  - name: cpu-offload
    policy: cpu_offload
    contexts: [1k]
micro:
  repeats: 2
  gather: {row_bytes: [64, 512], threads: [1, 2], buffer_mb: 16, call_mb: 1}
  scan: {contexts: [1k], threads: [1], footprint_mb: 4}
"""


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A --quick profile of this machine, made once for the module."""
    out = tmp_path_factory.mktemp("calibration") / "ci.yaml"
    assert main(["calibrate", "--out", str(out), "--quick", "--no-progress"]) == 0
    return out


def test_quick_calibration_writes_a_loadable_cited_profile(calibrated: Path):
    profile = load_profile(calibrated)
    assert profile.name == "ci"
    assert profile.sockets and profile.tiers and profile.gpus
    text = calibrated.read_text()
    assert "measured by hgsim calibrate on" in text
    numeric = [line for line in text.splitlines()
               if ":" in line and not line.lstrip().startswith("#")
               and _is_number(line.split("#")[0].split(":", 1)[1])]
    assert numeric and all("measured by hgsim calibrate on" in line for line in numeric)
    raw = json.loads(calibrated.with_name("ci.calibration.json").read_text())
    groups = {m["group"] for m in raw["measurements"]}
    assert {"memory", "cpu_kernel"} <= groups and groups & {"standin", "cuda"}
    if "standin" in groups:  # host kernel next to the stand-in: a mean time ratio, in turns
        slowdown = raw["summary"]["gpu0"]["host_loaded_slowdown"]
        assert 0.5 < slowdown["value"] < 10 and "taken in turns" in slowdown["what"]
        (row,) = [m for m in raw["measurements"] if m["name"] == "host_loaded"]
        assert len(row["seconds"]) >= 8 and row["params"]["device_tokens"] >= 1
    assert raw["meta"]["quick"] is True
    table = pd.read_csv(calibrated.with_name("ci.calibration.csv"))
    assert len(table) == len(raw["measurements"]) and (table["value"] >= 0).all()
    names = {m["name"] for m in raw["measurements"] if m["group"] == "memory"}
    assert {"chase", "chase_ref", "gather", "gather_cached", "gather_probe_cached",
            "latency_footprint"} <= names
    if len(os.sched_getaffinity(0)) > 1:  # a second core loads the memory for the chase
        assert {"loaded_idle", "loaded_latency"} <= names


def test_quick_profile_cites_the_memory_parallelism_probes(calibrated: Path):
    text = calibrated.read_text()
    line = next(x for x in text.splitlines() if "gather_inflight_bytes" in x)
    assert "interleaved pointer chases" in line and "plateau" in line
    queue = next(x for x in text.splitlines() if "queue_delay_at_half_load_ns" in x)
    assert "least squares of q u/(1-u)" in queue or "NOT measured" in queue
    assert "gather_rows" in next(x for x in text.splitlines() if "gather_ns_per_row" in x)
    raw = json.loads(calibrated.with_name("ci.calibration.json").read_text())
    assert raw["summary"]["numa"]["tiers"] == {"ddr0": raw["meta"]["numa_nodes"][0]}
    per = raw["summary"]["cpu0"]["per_threads"]["value"]
    assert "gather_inflight_by_row_bytes" in per["1"]
    assert set(raw["summary"]["cpu0"]["probe_ns_per_row"]["value"]) == {"64", "512", "4096"}
    gains = next(x for x in text.splitlines() if "gather_row_gain" in x)
    assert "lines in flight by row size" in gains  # in the profile, where the simulator reads it
    from hgsim.profiles import load_profile

    assert load_profile(calibrated).sockets["cpu0"].gather_row_gain[64] == 1.0


def test_validate_end_to_end_and_exit_code_follows_threshold(calibrated: Path, tmp_path: Path,
                                                              capsys):
    study = tmp_path / "study.yaml"
    study.write_text(TINY_STUDY)
    prefix = tmp_path / "val"
    args = ["validate", "--profile", str(calibrated), "--study", str(study), "--out", str(prefix),
            "--no-progress"]
    assert main([*args, "--threshold", "1e6"]) == 0
    for suffix in (".csv", ".png", ".svg"):
        assert prefix.with_name("val" + suffix).stat().st_size > 0
    assert not prefix.with_name("val.partial.csv").exists()  # the final CSV holds every case
    table = pd.read_csv(prefix.with_name("val.csv"))
    assert len(table) == 3
    micro = pd.read_csv(prefix.with_name("val.micro.csv"))
    cores = len(os.sched_getaffinity(0))
    assert len(micro) == (4 if cores > 1 else 2) + 1  # gathers at 1 (and 2) threads, one scan
    assert (micro["measured_ms"] > 0).all() and (micro["predicted_ms"] > 0).all()
    assert set(micro["kind"]) == {"gather", "scan"} and micro["mape_pct"].map(math.isfinite).all()
    assert table["mape_pct"].map(math.isfinite).all()
    assert (table["measured_ms"] > 0).all() and (table["predicted_ms"] > 0).all()
    assert (table["probe_gbps"] > 0).all()  # the drift probe ran before every case
    assert main([*args, "--threshold", "0.0001"]) == 1
    out = capsys.readouterr().out
    assert "machine drift: the calibration probe" in out
    assert "micro-case MAPE" in out
    import torch

    if not torch.cuda.is_available():  # the stand-in's contention on the host, reported
        assert "contention: during calibration the host kernel ran" in out


TINY_MODEL_STUDY = """
name: ci-tiny-model
model: tiny-llama
whole_model: true
hbm_budget_gb: 0.0009
warmup_steps: 1
steps: 2
configs:
  - name: hybrid
    policy: hybridgen_static
    options: {topk_ratio: 0.05, hbm_reserve_gb: 0, hbm_reserve_fraction: 0}
    contexts: [1k]
  - name: hgca
    policy: hgca
    options: {hbm_reserve_gb: 0, hbm_reserve_fraction: 0}
    contexts: [1k]
  - name: cpu-offload
    policy: cpu_offload
    options: {hbm_reserve_gb: 0, hbm_reserve_fraction: 0}
    contexts: [512]
"""


def test_whole_model_study_validates_on_this_machine(calibrated: Path, tmp_path: Path):
    """The whole model decodes each case's plans (its HBM budget splitting the context on both
    sides) and the simulator predicts the same model with its projections and FFN."""
    from hw_backend.validate import run_validation

    study = tmp_path / "model.yaml"
    study.write_text(TINY_MODEL_STUDY)
    run = run_validation(calibrated, study, threshold=1e6, out=tmp_path / "m", progress=False)
    assert len(run.results) == 3 and math.isfinite(run.mape_pct)
    by_config = {r.case.config: r for r in run.results}
    for name in ("hybrid", "hgca"):  # the budget leaves room for part of the context only
        steps = by_config[name].measured
        assert all(0 < s.gpu_tokens < s.context for s in steps)
        assert all(s.host_s > 0 for s in steps)
    for r in run.results:
        assert r.measured_s > 0 and r.predicted_s > 0
        # the prediction includes the projections and FFN (attention_only off)
        assert all(p.gpu_busy_s > 0 for p in r.predicted)


def test_a_case_that_raises_on_cuda_is_skipped_and_fails_the_run(calibrated: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch):
    """On CUDA (a borrowed GPU) one case out of memory must not cost the cases after it: it is
    listed, left out of the MAPE, and the run fails. On the stand-in the error propagates."""
    from hw_backend import validate as hv

    real = hv.measure

    def flaky(case, *args, **kw):
        if case.config == "hgca":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\ndetails")
        return real(case, *args, **kw)

    study = tmp_path / "model.yaml"
    study.write_text(TINY_MODEL_STUDY)
    monkeypatch.setattr(hv, "measure", flaky)
    with pytest.raises(RuntimeError):
        hv.run_validation(calibrated, study, threshold=1e6, out=tmp_path / "a", progress=False)
    monkeypatch.setattr(hv, "_uses_cuda", lambda accelerator: True)
    run = hv.run_validation(calibrated, study, threshold=1e6, out=tmp_path / "b",
                            progress=False, which="plans")
    assert [r.case.config for r in run.results] == ["hybrid", "cpu-offload"]
    assert run.failed == [("hgca @ 1k",
                           "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")]
    assert math.isfinite(run.mape_pct) and not run.passed
    # the CSV says what was attempted: the failed case is a row with its reason, no timing
    import pandas as pd

    table = pd.read_csv(tmp_path / "b.csv")
    assert list(table["config"]) == ["hybrid", "cpu-offload", "hgca"]
    failed = table[table["config"] == "hgca"].iloc[0]
    assert failed["failure"].startswith("RuntimeError: CUDA out of memory")
    assert math.isnan(failed["measured_ms"]) and math.isnan(failed["predicted_ms"])
    assert table[table["config"] != "hgca"]["failure"].isna().all()


def test_a_validation_removes_the_earlier_outputs_it_did_not_write(calibrated: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch):
    """Every case failed (on CUDA, out of memory): the CSV said so, while the scatter plots and
    micro-case table of an earlier run stayed beside it as if they were this run's."""
    from hw_backend import validate as hv

    def out_of_memory(case, *args, **kw):
        raise RuntimeError("CUDA out of memory")

    study = tmp_path / "model.yaml"
    study.write_text(TINY_MODEL_STUDY)
    monkeypatch.setattr(hv, "measure", out_of_memory)
    monkeypatch.setattr(hv, "_uses_cuda", lambda accelerator: True)
    earlier = [tmp_path / f"v{suffix}" for suffix in (".png", ".svg", ".micro.csv")]
    for path in earlier:
        path.write_text("an earlier run's")
    run = hv.run_validation(calibrated, study, threshold=1e6, out=tmp_path / "v",
                            progress=False, which="plans")
    assert not run.results and not run.passed
    assert run.outputs == [tmp_path / "v.csv"] and sorted(run.removed) == sorted(earlier)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.yaml", "v.csv"]


def test_validate_can_run_the_micro_cases_alone(calibrated: Path, tmp_path: Path, capsys):
    study = tmp_path / "study.yaml"
    study.write_text(TINY_STUDY)
    prefix = tmp_path / "micro"
    assert main(["validate", "--profile", str(calibrated), "--study", str(study), "--out",
                 str(prefix), "--no-progress", "--cases", "micro", "--threshold", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "micro-case MAPE" in out and "per-step latency" not in out
    assert "ddr0 from cpu0: idle latency" in out and "in the profile" in out
    assert prefix.with_name("micro.micro.csv").exists()
    assert not prefix.with_name("micro.csv").exists()


def test_max_context_leaves_out_micro_scans_over_more_tokens(calibrated: Path, tmp_path: Path):
    """--max-context 512 leaves out the 1k-token scan as it leaves out the 1k configurations;
    gathers (no context) stay. A quick --max-context 4k run had spent most of its time
    scanning 64k tokens."""
    import pandas as pd

    study = tmp_path / "study.yaml"
    study.write_text(TINY_STUDY)
    prefix = tmp_path / "capped"
    assert main(["validate", "--profile", str(calibrated), "--study", str(study), "--out",
                 str(prefix), "--no-progress", "--cases", "micro", "--threshold", "1e6",
                 "--max-context", "512"]) == 0
    kinds = pd.read_csv(prefix.with_name("capped.micro.csv"))["case"].str.split().str[0]
    assert set(kinds) == {"gather"} and len(kinds) == 4


def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys):
    assert main(["validate", "--profile", str(tmp_path / "missing.yaml")]) == 2
    assert main(["calibrate", "--out", str(tmp_path / "no" / "such" / "dir.yaml")]) == 2
    assert main(["calibrate", "--out", str(tmp_path / "profile.txt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 3


def test_bad_study_is_a_config_error(tmp_path: Path):
    study = tmp_path / "bad.yaml"
    study.write_text(TINY_STUDY.replace("warmup_steps", "warmup_stepz"))
    with pytest.raises(UserError, match="warmup_stepz"):
        load_study(study)


@pytest.mark.parametrize("old, new, expected", [
    # 0 and -4 failed without a file or line ('Workload.context: ...'); [] ran nothing for the
    # configuration; 1k twice or a name twice measured and listed the same case twice; a
    # budget below the weights failed at the first case as 'infeasible on <profile>'
    ("contexts: [1k, 2k]", "contexts: [0, 2k]", "bad.yaml:21: configs[0].contexts[0]: input "
                                                "should be greater than 0"),
    ("contexts: [1k, 2k]", "contexts: []", "bad.yaml:21: configs[0].contexts: list should "
                                           "have at least 1 item"),
    ("contexts: [1k, 2k]", "contexts: [1k, 1024]", "bad.yaml:21: configs[0].contexts: [1]: "
                                                   "context 1024 is listed twice"),
    ("name: cpu-offload", "name: hybrid", "bad.yaml:22: configs[1].name: 'hybrid' names "
                                          "configs[0] too"),
    ("steps: 2", "steps: 2\nwhole_model: true\nhbm_budget_gb: 1", "bad.yaml:18: "
     "hbm_budget_gb: 1 GB cannot hold synthetic-llama-2l's 2.8 GB of fp32 weights"),
])
def test_a_validation_study_with_impossible_cases_is_refused_at_its_line(tmp_path: Path, old,
                                                                          new, expected):
    assert old in TINY_STUDY
    study = tmp_path / "bad.yaml"
    study.write_text(TINY_STUDY.replace(old, new, 1))
    with pytest.raises(UserError) as info:
        load_study(study)
    assert str(info.value).startswith(f"{tmp_path}/{expected}"), str(info.value)


def test_threads_beyond_the_machine_are_capped_with_a_warning(tmp_path: Path, capsys):
    """A study written for a larger machine: the executor's 64 threads would take turns on this
    one's cores while the simulator gave each its own."""
    from hgsim.validation import cases

    path = tmp_path / "big.yaml"
    path.write_text(TINY_STUDY.replace("    policy: cpu_offload\n",
                                       "    policy: cpu_offload\n    host_threads: 64\n"))
    todo = cases(load_study(path), device_threads=1, host_threads=1, cpus=2)
    assert [c.host_threads for c in todo] == [1, 1, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hgsim validate: warning: cpu-offload: host_threads 64 is more than the 2 "
                   "CPUs of this machine; using 2"]


# ---------------------------------------------------------------------------- pure helpers
def _step(i: int, latency: float, ratio: float = 0.05, gpu: int = 10) -> StepTiming:
    return StepTiming(step=i, context=100 + i, latency_s=latency, gpu_busy_s=0.0, cpu_busy_s=0.0,
                      pcie_busy_s=0.0, stall_s=0.0, host_s=0.0, device_s=0.0, topk_ratio=ratio,
                      gpu_tokens=gpu)


CASE = Case("c", "hybridgen_static", {}, 100, 1, 1, True)


def test_drift_reports_the_probe_range_against_calibration():
    drift = Drift(20.0, (18.0, 25.0), 32768)
    assert drift.range_pct == pytest.approx((-10.0, 25.0))
    assert drift.exceeds(10.0) and not drift.exceeds(30.0)
    assert "18.0-25.0 GB/s" in drift.describe() and "-10% to +25%" in drift.describe()
    assert "32k tokens" in drift.describe()


def test_calibrated_probe_picks_the_one_thread_run_nearest_16k():
    def m(threads, context, value, name="partial_attention"):
        return {"group": "cpu_kernel", "name": name, "value": value,
                "params": {"threads": threads, "context": context, "kv_dtype": "fp32"}}

    doc = {"measurements": [m(1, 4096, 10.0), m(1, 32768, 12.0), m(2, 16384, 30.0),
                            m(1, 16384, 99.0, name="logits")]}
    assert calibrated_probe(doc) == (32768, 12.0)
    assert calibrated_probe({"measurements": []}) is None


def test_case_result_error_and_mape():
    measured = [_step(0, 9.0), _step(1, 1.0), _step(2, 1.2)]
    predicted = [_step(0, 5.0), _step(1, 1.1), _step(2, 1.1)]
    fastest = CaseResult(CASE, measured, predicted, "dev", warmup=1, statistic="min")
    assert fastest.measured_s == 1.0 and fastest.predicted_s == pytest.approx(1.1)
    assert fastest.error_pct == pytest.approx(10.0)
    middle = CaseResult(CASE, measured, predicted, "dev", warmup=1, statistic="median")
    assert middle.measured_s == pytest.approx(1.1)
    assert mape([fastest, middle]) == pytest.approx(5.0)
    assert math.isnan(mape([]))


def test_breakdown_gives_each_configuration_its_mape_and_bias():
    def result(config: str, measured: float, predicted: float) -> CaseResult:
        case = Case(config, "cpu_offload", {}, 4096, device_threads=1, host_threads=1,
                    pin=False)
        return CaseResult(case, [_step(0, measured)], [_step(0, predicted)], "dev", warmup=0)

    rows = [result("a", 1.0, 1.2), result("a", 1.0, 0.9), result("b", 2.0, 1.0)]
    assert breakdown(rows) == [("a", pytest.approx(15.0), pytest.approx(5.0)),
                               ("b", pytest.approx(50.0), pytest.approx(-50.0))]


def test_different_plans_are_refused():
    same = [_step(0, 1.0)]
    check_same_plans(CASE, same, [_step(0, 2.0)])
    with pytest.raises(UserError, match="different plans"):
        check_same_plans(CASE, same, [_step(0, 1.0, ratio=0.1)])
    with pytest.raises(UserError, match="different plans"):
        check_same_plans(CASE, same, [_step(0, 1.0, gpu=11)])


def test_random_kv_is_drawn_once_and_copied_into_every_layer():
    import torch

    from hw_backend.random_kv import RandomKv

    class Layer:
        def load(self, k, v):
            self.k, self.v = k.clone(), v.clone()

    class Store:
        batch, kv_heads, head_dim = 1, 2, 16

        def __init__(self, layers: int):
            self.layers = [Layer() for _ in range(layers)]

    kv = RandomKv()
    small, large = Store(3), Store(2)
    kv.fill(small, 1000, torch.float32)
    kv.fill(large, 4000, torch.float32)  # larger than the first draw: drawn again
    assert small.layers[0].k.shape == (1, 2, 1000, 16)
    assert large.layers[1].v.shape == (1, 2, 4000, 16)
    for store in (small, large):
        assert all(torch.equal(layer.k, store.layers[0].k) for layer in store.layers)
    assert not torch.equal(large.layers[0].k, large.layers[0].v)
    repeat = Store(1)
    RandomKv().fill(repeat, 4000, torch.float32)  # seeded: every run measures the same cache
    assert torch.equal(repeat.layers[0].k, large.layers[0].k)
    k = large.layers[0].k
    assert abs(float(k.mean())) < 0.02 and abs(float(k.std()) - 1) < 0.02
    again = Store(1)
    kv.fill(again, 0, torch.float32)  # an empty prompt loads nothing
    assert not hasattr(again.layers[0], "k")


def test_fit_line_and_thread_counts():
    from hw_backend.calibration.settings import Settings
    from hw_backend.calibration.timing import fit_line

    intercept, slope = fit_line([1, 2, 3], [3, 5, 7])
    assert intercept == pytest.approx(1) and slope == pytest.approx(2)
    intercept, slope = fit_line([1, 2], [2, 1])  # a negative slope is refitted through 0
    assert intercept == 0 and slope > 0
    assert Settings.make(False).thread_counts(6) == (1, 2, 4, 6)
    assert Settings.make(True).thread_counts(6) == (1, 6)
    assert Settings.make(True).thread_counts(1) == (1,)


def test_next_to_cuda_the_kernel_leaves_the_submitting_thread_a_core(monkeypatch):
    """With CUDA the executor, validation and calibration all use every core but one for the C
    kernel, and calibration times the kernel at exactly that count (validation looks it up)."""
    from hw_backend import devices, validate
    from hw_backend.calibration import cpu_kernel
    from hw_backend.calibration.settings import Settings
    from hw_backend.calibration.topology import discover

    monkeypatch.setattr(devices, "available_cores", lambda: tuple(range(16)))
    assert devices.cuda_host_threads() == 15
    assert validate.Calibration(None, {}).default_split(cuda=True) == (1, 15)
    monkeypatch.setattr(devices, "available_cores", lambda: (0,))
    assert devices.cuda_host_threads() == 1

    machine = discover()
    cores = len(machine.cpus_of(machine.cpu_nodes[0]))
    plain = cpu_kernel.plan(machine, Settings.make(False))
    extra = max(1, cores - 1)
    with_extra = cpu_kernel.plan(machine, Settings.make(False), (extra, cores + 5))
    labels = [job.label for job in with_extra]
    assert any(f": {extra} thread(s)" in label for label in labels)
    assert len(with_extra) == len(plain) + (extra not in Settings.make(False).thread_counts(cores))
    assert not any(f": {cores + 5} thread(s)" in label for label in labels)  # more than exist


def test_net_rate_is_the_median_rate_after_the_fixed_cost():
    from hw_backend.calibration.timing import net_rate

    # 2 units per second after a fixed cost of 1; the last size caught a phase 3x slower
    sizes, times = [2, 4, 8, 16], [2, 3, 5, 25]
    assert net_rate(sizes, times, 1.0) == pytest.approx(2.0)
    assert net_rate([10], [1.0], 0.9) == pytest.approx(20.0)  # at most half a call is fixed
    with pytest.raises(ValueError):
        net_rate([1, 2], [1], 0.0)


def test_device_queue_timings_are_taken_in_turns():
    from hw_backend.calibration.standin import _on_queue_in_turns

    order = []

    class Marker:
        def __init__(self, fn):
            fn()

        def wait(self):
            pass

        def duration_s(self):
            return float(len(order))

    class Queue:
        def submit(self, fn):
            return Marker(fn)

    timings = _on_queue_in_turns(Queue(), [lambda: order.append("a"), lambda: order.append("b")],
                                 repeats=2, warmup=1)
    assert order == ["a", "b"] * 3
    assert timings == [(3.0, 5.0), (4.0, 6.0)]


def test_profile_writer_quotes_only_when_needed():
    from hw_backend.calibration.profile_writer import Node, render

    root = Node().add("name", "local").add("kind", "on").add("text", "a: b # c")
    root.child("nested").add("value", 1.5, "why").add("count", 3)
    text = render(["header"], root)
    assert 'kind: "on"' in text and 'text: "a: b # c"' in text and "name: local" in text
    assert "value: 1.5" in text and "# why" in text and text.startswith("# header")


def _is_number(text: str) -> bool:
    try:
        float(text.strip())
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- profile assembly
def _synthetic_rows(cuda: bool):
    """Measurements of an imaginary 2-socket machine with a CXL expander (node 2)."""
    from hw_backend.calibration.records import Measurement, Measurements

    rows = Measurements()
    for node, socket, remote, bw, lat in ((0, 0, False, 100.0, 110.0), (1, 1, False, 100.0, 110.0),
                                          (2, 0, False, 30.0, 250.0), (1, 0, True, 60.0, 190.0),
                                          (0, 1, True, 60.0, 190.0)):
        for threads in (1, 8):
            if remote and threads == 1:
                continue
            params = {"node": node, "socket": socket, "remote": remote, "threads": threads,
                      "bytes": 1 << 29}
            rows.append(Measurement("memory", "read_bandwidth", bw * threads / 8, "GB/s", params))
            if not remote:
                rows.append(Measurement("memory", "write_bandwidth", bw / 2, "GB/s", params))
        rows.append(Measurement("memory", "latency", lat, "ns",
                                {"node": node, "socket": socket, "remote": remote,
                                 "bytes": 1 << 28}))
    for socket in (0, 1):
        for threads in (1, 8):
            for context in (4096, 16384):
                params = {"socket": socket, "threads": threads, "context": context}
                seconds = (context / 1e7 / threads,)
                rows.append(Measurement("cpu_kernel", "partial_attention", 1.0, "GB/s", params,
                                        seconds))
                rows.append(Measurement("cpu_kernel", "partial_attention_flops",
                                        20.0 * threads, "GFLOP/s", params, seconds))
    if cuda:
        rows += [
            Measurement("cuda", "hbm_copy", 2000.0, "GB/s", {"bytes": 1 << 31}),
            Measurement("cuda", "attention_fit", 1500.0, "GB/s", {"fixed_us": 5.0}),
            Measurement("cuda", "launch_overhead", 3.0, "us", {"kernels": 2000}),
            Measurement("cuda", "executor_op", 180.0, "us", {"op": "partial_attention", "tokens": 1}),
            Measurement("cuda", "gemm", 700.0, "TFLOP/s", {"dtype": "bf16", "n": 8192}),
            Measurement("cuda", "h2d_copy", 25.0, "GB/s", {"bytes": 1 << 28, "pinned": True}),
            Measurement("cuda", "h2d_fit", 25.0, "GB/s", {"latency_us": 8.0}),
        ]
    return rows


@pytest.mark.parametrize("cuda", [True, False])
def test_assembled_profile_maps_numa_to_sockets_cxl_and_upi(cuda: bool):
    from hgsim.config_io import parse_yaml, validate
    from hgsim.specs.hardware import HardwareProfile
    from hw_backend.calibration.assemble import Context, build
    from hw_backend.calibration.records import Measurement
    from hw_backend.calibration.topology import Machine
    from hw_backend.devices import CoreSplit
    from hw_backend.numa import NumaNode

    nodes = (NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),
             NumaNode(1, tuple(range(8, 16)), 64 << 30, 1 << 30),
             NumaNode(2, (), 128 << 30, 1 << 30))
    machine = Machine(nodes, {0: (10, 21, 14), 1: (21, 10, 24), 2: (14, 24, 10)}, "Test CPU",
                      2.0, "test", "avx512", tuple(range(16)))
    rows = _synthetic_rows(cuda)
    split = None
    if not cuda:
        split = CoreSplit(8, 8)
        base = {"device_threads": 8, "host_threads": 8, "pinned": False, "kv_dtype": "fp32"}
        rows += [
            Measurement("standin", "attention_loaded_fit", 40.0, "GB/s", {**base, "fixed_us": 0}),
            Measurement("standin", "attention_fit", 45.0, "GB/s", {**base, "fixed_us": 0}),
            Measurement("standin", "op_overhead", 80.0, "us", base),
            Measurement("standin", "gemm", 1.0, "TFLOP/s", {**base, "dtype": "bf16", "n": 2048}),
            Measurement("standin", "h2d_copy", 10.0, "GB/s", {**base, "bytes": 1 << 20}),
            Measurement("standin", "h2d_fit", 12.0, "GB/s", {**base, "latency_us": 5.0}),
            Measurement("standin", "d2h_fetch", 30.0, "us", base),
        ]
    cuda_info = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 1, "pci": None}
    ctx = Context("synthetic", "2024-01-01", machine, rows, cuda_info if cuda else None, split,
                  "fp32", False, 16 << 20)
    text, summary = build(ctx)
    profile = validate(HardwareProfile, parse_yaml(text, "synthetic"))
    assert set(profile.sockets) == {"cpu0", "cpu1"}
    assert set(profile.tiers) == {"ddr0", "ddr1", "cxl0"}
    assert profile.tiers["cxl0"].kind == "cxl" and profile.tiers["cxl0"].socket == "cpu0"
    assert profile.links["cxl0_link"].bandwidth_gbps == 30.0
    assert profile.links["cxl0_link"].latency_ns == pytest.approx(140.0)  # 250 - 110
    assert profile.links["upi_cpu0_cpu1"].bandwidth_gbps == 60.0
    assert profile.sockets["cpu0"].attention_gflops_per_core == pytest.approx(20.0)
    assert profile.tiers["ddr0"].read_bandwidth_gbps == 100.0
    # one thread reads 12.5 GB/s at 110 ns: 1375 bytes in flight (Little's law)
    assert profile.sockets["cpu0"].stream_inflight_bytes == pytest.approx(1375)
    gpu = profile.gpus["gpu0"]
    if cuda:
        assert gpu.socket == "cpu1" and gpu.hbm_bandwidth_gbps == 2000.0
        assert gpu.attention_efficiency == 0.75 and profile.links["pcie0"].latency_ns == 8000
        assert gpu.kernel_launch_overhead_us == 3.0  # recorded, not charged: see executor_ops
        assert "one-token ops from idle (us): partial_attention 180" in text
    else:
        assert "stand-in" in text.lower() and gpu.kernel_launch_overhead_us == 80.0
        assert profile.links["pcie0"].bandwidth_gbps == 12.0
    assert summary["cpu0"]["per_threads"]["value"][8]["scaling_efficiency"] == pytest.approx(1.0)


def test_kernel_figures_split_a_call_into_fixed_cost_and_rate():
    from hgsim.validation import case_profile
    from hw_backend.calibration.records import Measurement, Measurements
    from hw_backend.calibration.summarize import cpu_kernel_figures

    rows = Measurements()
    # time = fixed + flops / rate: 40 GFLOP/s and 500 us on one thread; two threads reach
    # 60 GFLOP/s together and pay 300 us
    for threads, rate, fixed_s in ((1, 40e9, 500e-6), (2, 60e9, 300e-6)):
        for tokens in (4096, 16384, 65536):
            flops = 2048.0 * 8 * tokens
            t = fixed_s + flops / rate
            params = {"socket": 0, "threads": threads, "context": tokens, "kv_dtype": "fp32"}
            for name, value in (("partial_attention_flops", flops / t / 1e9),
                                ("partial_attention", 1.0)):
                rows.append(Measurement("cpu_kernel", name, value, "x", params,
                                        (1.2 * t, t, 0.9 * t)))
    figures = cpu_kernel_figures(rows, 0)
    assert figures["attention_gflops_per_core"].value == pytest.approx(40.0, rel=1e-3)
    assert figures["op_overhead_us"].value == pytest.approx(500.0, abs=0.1)
    per_threads = figures["per_threads"].value
    assert per_threads[2]["op_overhead_us"] == pytest.approx(300.0, abs=0.1)

    profile = load_profile("h100-80gb-spr-cxl")
    socket = profile.gpus[profile.primary_gpu].socket
    case = Case("c", "cpu_offload", {}, 4096, device_threads=1, host_threads=2, pin=False)
    used = case_profile(profile, case, per_threads).sockets[socket]
    assert used.cores == 2 and used.op_overhead_us == pytest.approx(300.0, abs=0.1)
    measured = {2: {**per_threads[2], "stream_inflight_bytes": 3000.0,
                    "gather_inflight_bytes": 1500.0}}
    used = case_profile(profile, case, measured).sockets[socket]
    assert (used.stream_inflight_bytes, used.gather_inflight_bytes) == (3000.0, 1500.0)


def test_kernel_rows_whose_threads_never_ran_together_set_no_scaling():
    from hw_backend.calibration.records import Measurement, Measurements
    from hw_backend.calibration.summarize import cpu_kernel_figures

    rows = Measurements()
    for threads, clock in ((1, "cpu"), (2, "wall")):
        for tokens in (4096, 16384):
            flops = 2048.0 * 8 * tokens
            t = flops / 40e9 * (5 if clock == "wall" else 1)  # turns on one core: 5x slower
            params = {"socket": 0, "threads": threads, "context": tokens, "kv_dtype": "fp32",
                      "clock": clock}
            rows.append(Measurement("cpu_kernel", "partial_attention_flops", flops / t / 1e9,
                                    "GFLOP/s", params, (t,)))
            rows.append(Measurement("cpu_kernel", "partial_attention", 1.0, "GB/s", params,
                                    (t,)))
    figures = cpu_kernel_figures(rows, 0)
    assert figures["attention_gflops_per_core"].value == pytest.approx(40.0)
    assert "2 thr not measured (its threads never ran together)" in (
        figures["attention_gflops_per_core"].what)
    per = figures["per_threads"].value
    assert "scaling_efficiency" in per[1] and "scaling_efficiency" not in per.get(2, {})


def test_a_timed_one_block_call_sets_the_fixed_cost_not_the_extrapolated_intercept():
    from hw_backend.calibration.records import Measurement, Measurements
    from hw_backend.calibration.summarize import cpu_kernel_figures

    rows = Measurements()
    rate, fixed_s = 40e9, 200e-6
    # the biggest call caught the machine 20% slow: a line through all five would move its
    # intercept by milliseconds; the medians over contexts do not move
    for tokens, slow in ((4096, 1.0), (8192, 1.0), (16384, 1.0), (32768, 1.0), (65536, 1.2)):
        flops = 2048.0 * 8 * tokens
        t = fixed_s + slow * flops / rate
        params = {"socket": 0, "threads": 1, "context": tokens, "kv_dtype": "fp32"}
        rows.append(Measurement("cpu_kernel", "partial_attention_flops", flops / t / 1e9,
                                "GFLOP/s", params, (t,)))
    small_flops = 2048.0 * 8 * 32
    small_t = fixed_s + small_flops / rate
    rows.append(Measurement("cpu_kernel", "call_overhead", small_t * 1e6, "us",
                            {"socket": 0, "threads": 1, "context": 32, "kv_dtype": "fp32",
                             "flops": small_flops}, (small_t,)))
    figures = cpu_kernel_figures(rows, 0)
    assert figures["op_overhead_us"].value == pytest.approx(200.0, abs=1.0)
    assert figures["attention_gflops_per_core"].value == pytest.approx(40.0, rel=1e-3)
    assert "32-token call" in figures["op_overhead_us"].what
    assert figures["per_threads"].value[1]["op_overhead_us"] == pytest.approx(200.0, abs=1.0)


def test_figures_take_the_median_repeat_unless_told_the_fastest():
    from hw_backend.calibration import timing

    repeats = (3.0, 1.0, 2.0, 9.0)
    assert timing.representative(repeats) == 2.5
    with timing.statistic("min"):
        assert timing.representative(repeats) == 1.0
    assert timing.representative(repeats) == 2.5
    with pytest.raises(ValueError, match="statistic"):
        with timing.statistic("mean"):
            pass


def test_a_micro_case_whose_threads_never_ran_together_takes_its_wall_time():
    """A repeat whose scheduler waits were charged in full to a call they only straddled has
    no CPU time left (share 0); with no repeat together the case's CPU figure is its wall
    time, as calibration takes it, never 0 (its row divided by it)."""
    from hw_backend.micro import Timed, representative

    straddled = Timed(cpu_s=(0.0, 0.0, 0.0), wall_s=(3e-3, 1e-3, 2e-3), share=(0.0, 0.0, 0.0))
    assert representative(straddled, "median", 2) == (2e-3, 2e-3, 0.0)
    mixed = Timed(cpu_s=(0.0, 1.5e-3, 1.0e-3), wall_s=(3e-3, 1.6e-3, 1.1e-3),
                  share=(0.0, 0.94, 0.91))
    assert representative(mixed, "min", 2) == (1.0e-3, 1.1e-3, 0.91)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_setaffinity")
def test_a_pinned_child_process_takes_figures_with_the_parents_statistic():
    from hw_backend.calibration import timing
    from hw_backend.calibration.pinned import run_on_cpus

    cpus = sorted(os.sched_getaffinity(0))[:1]
    repeats = (3.0, 1.0, 2.0)
    with timing.statistic("min"):
        assert run_on_cpus(cpus, timing.representative, repeats, force_process=True) == 1.0
    assert run_on_cpus(cpus, timing.representative, repeats, force_process=True) == 2.0


def test_a_cuda_calibration_of_the_graph_path_sets_the_figures_it_runs_at():
    """With the graph path measured, the profile's per-op charge is a graph op's fixed cost,
    its attention and linear-layer rates the graph attention's and one-token GEMMs', and the
    eager launch, graph replay and in-graph gap keep their own fields; the profile loads."""
    from hgsim.config_io import parse_yaml, validate
    from hgsim.specs.hardware import HardwareProfile
    from hw_backend.calibration.assemble import Context, build
    from hw_backend.calibration.records import Measurement
    from hw_backend.calibration.topology import Machine
    from hw_backend.numa import NumaNode

    rows = _synthetic_rows(cuda=True)
    rows += [
        Measurement("cuda", "graph_attention_fit", 1800.0, "GB/s", {"fixed_us": 4.0}),
        Measurement("cuda", "decode_gemm", 1500.0, "GB/s", {"shape": [4096, 6144]}),
        Measurement("cuda", "decode_gemm", 1700.0, "GB/s", {"shape": [4096, 28672]}),
        Measurement("cuda", "decode_gemm", 1600.0, "GB/s", {"shape": [14336, 4096]}),
        Measurement("cuda", "graph_launch", 2.5, "us", {"replays": 2000, "host_us": 4.0}),
        Measurement("cuda", "graph_kernel_gap", 1.1, "us", {"kernels": 20, "replay_us": 23.4}),
        *(Measurement("cuda", "graph_op", us, "us", {"op": op, "bucket": 16})
          for op, us in (("attention", 14.0), ("softmax_union", 20.0), ("lse_merge", 6.0))),
    ]
    nodes = (NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),)
    machine = Machine(nodes, {0: (10,)}, "Test CPU", 2.0, "test", "avx512", tuple(range(8)))
    info = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 0, "pci": None}
    text, summary = build(Context("graphs", "2024-01-01", machine, rows, info, None, "bf16",
                                  False, 16 << 20))
    gpu = validate(HardwareProfile, parse_yaml(text, "graphs")).gpus["gpu0"]
    assert gpu.kernel_launch_overhead_us == 14.0  # median graph op
    assert gpu.single_launch_overhead_us == 3.0 and gpu.graph_launch_overhead_us == 2.5
    assert gpu.graph_kernel_gap_us == 1.1
    assert gpu.attention_efficiency == 0.9  # 1800 / 2000
    assert gpu.memory_efficiency == 0.8  # median GEMV 1600 / 2000
    assert "graph path" in text and summary["gpu0"]["graph_launch_overhead_us"]["value"] == 2.5


def test_cases_without_host_work_are_predicted_with_the_standins_idle_attention_rate():
    """The stand-in's profile holds its attention rate next to the host kernel (hybrid plans
    run both on one memory); gpu_only runs it alone and is predicted with the idle rate, and
    so is FlexGen, whose host-resident KV is copied to the device while the host kernel
    idles."""
    from hgsim.validation import ValidationStudy, cases, predict

    study = ValidationStudy.model_validate({
        "name": "s", "model": "tiny-llama", "kv_dtype": "fp32", "weight_dtype": "fp32",
        "warmup_steps": 0, "steps": 2, "whole_model": True,
        "configs": [{"name": "gpu", "policy": "gpu_only", "contexts": [8192]},
                    {"name": "cpu", "policy": "cpu_offload", "contexts": [8192]},
                    {"name": "stream", "policy": "flexgen", "contexts": [8192],
                     "options": {"gpu_kv_fraction": 0.1}}]})
    profile = load_profile("dev-zen4-2core")
    gpu_case, cpu_case, stream_case = cases(study, device_threads=1, host_threads=1)
    slow = profile.gpus["gpu0"].attention_efficiency
    for case, changes in ((gpu_case, True), (cpu_case, False), (stream_case, True)):
        loaded = predict(profile, study, case)
        alone = predict(profile, study, case, attention_alone=slow / 4)
        assert (alone[0].latency_s != loaded[0].latency_s) is changes


def test_topk_insert_cost_comes_from_two_ratios_of_the_largest_context():
    """The same scan at two top-k ratios differs only by the heap insertions: their cost per
    insertion is read there, where the scan and the call's fixed cost cancel."""
    from hw_backend.calibration.records import Measurement, Measurements
    from hw_backend.calibration.settings import HEADS
    from hw_backend.calibration.summarize import selection_figures

    def inserts(n, r):
        k = max(1, math.ceil(r * n))
        return HEADS * k * (1 + math.log(n / k))

    rows = Measurements()
    for n, per_insert in ((16384, 7e-9), (65536, 13e-9)):
        scan = 0.002 + n * 3e-7  # a call's fixed cost and the scan, the same at both ratios
        for r in (0.01, 0.05):
            t = scan + per_insert * inserts(n, r)
            rows.append(Measurement("cpu_kernel", "logits_topk", 1.0, "GB/s",
                                    {"socket": 0, "threads": 1, "context": n, "topk_ratio": r,
                                     "kv_dtype": "fp32"}, (t, t, t)))
    figure = selection_figures(rows, 0)["topk_ns_per_insert"]
    assert figure.value == pytest.approx(13.0, abs=0.05)  # the largest context's
    assert "64k" in figure.what and "16k 7.0" in figure.what


def test_an_optional_benchmark_that_fails_leaves_its_figures_out(capsys):
    """A CUDA benchmark that raises (a capture the driver refuses, say) is recorded and
    skipped; the other benchmarks' rows are kept. Any other benchmark's error still ends the
    calibration (a bug there must not be papered over)."""
    from hw_backend.calibrate import _run
    from hw_backend.calibration.records import Measurement
    from hw_backend.calibration.settings import Job

    def broken() -> list[Measurement]:
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    def fine() -> list[Measurement]:
        return [Measurement("cuda", "hbm_copy", 2000.0, "GB/s", {})]

    failed: dict[str, str] = {}
    rows = _run([Job("graphs", broken, optional=True), Job("hbm", fine)], False, 0.0, failed)
    assert [r.name for r in rows] == ["hbm_copy"]
    assert failed == {"graphs": "RuntimeError: operation not permitted when stream is capturing"}
    assert "graphs failed (RuntimeError" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        _run([Job("cpu", broken), Job("hbm", fine)], False, 0.0, {})


#: What each CUDA benchmark of ``hw_backend.calibration.cuda.plan`` measures (its rows' names).
CUDA_JOB_ROWS = {
    "CUDA: HBM bandwidth (device copy)": ("hbm_copy",),
    "CUDA: GEMM FLOP/s": ("gemm",),
    "CUDA: decode attention throughput": ("attention", "attention_fit"),
    "CUDA: decode GEMMs (one token, weight streaming)": ("decode_gemm",),
    "CUDA: graph-path attention throughput": ("graph_attention", "graph_attention_fit"),
    "CUDA: kernel launch overhead": ("launch_overhead",),
    "CUDA: graph replay cost and in-graph kernel gap": ("graph_launch", "graph_kernel_gap"),
    "CUDA: executor ops on one token, from idle": ("executor_op",),
    "CUDA: graph-path ops at their smallest bucket, from idle": ("graph_op",),
    "CUDA: pinned H2D/D2H copies by size": ("h2d_copy", "h2d_fit", "d2h_copy", "d2h_fit"),
}


def test_a_cuda_benchmark_is_optional_exactly_when_a_profile_loads_without_it():
    """An optional benchmark that fails must still leave a valid profile (else the calibration
    fails anyway, at its end, after every other benchmark ran); one whose figures the profile
    requires (HBM bandwidth, GEMM peaks, the PCIe link) must end it at once."""
    from hgsim.config_io import ConfigError, parse_yaml, validate
    from hgsim.specs.hardware import HardwareProfile
    from hw_backend.calibration.assemble import Context, build
    from hw_backend.calibration.cuda import plan as cuda_plan
    from hw_backend.calibration.records import Measurements
    from hw_backend.calibration.settings import Settings
    from hw_backend.calibration.topology import Machine
    from hw_backend.numa import NumaNode

    machine = Machine((NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),), {0: (10,)},
                      "Test CPU", 2.0, "test", "avx512", tuple(range(8)))
    info = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 0, "pci": None}

    def loads_without(names: tuple[str, ...]) -> bool:
        rows = Measurements()
        for row in _synthetic_rows(True):
            if not (row.group == "cuda" and row.name in names):
                rows.append(row)
        text, _ = build(Context("x", "2024-01-01", machine, rows, info, None, "bf16", False,
                                16 << 20))
        try:
            validate(HardwareProfile, parse_yaml(text, "x"))
        except ConfigError:
            return False
        return True

    jobs = cuda_plan(Settings.make(True))
    assert sorted(job.label for job in jobs) == sorted(CUDA_JOB_ROWS)
    assert loads_without(())
    for job in jobs:
        assert job.optional == loads_without(CUDA_JOB_ROWS[job.label]), job.label


def test_the_profile_header_names_the_raw_data_files_written_beside_it():
    """With --name, the header named '<name>.calibration.json', a file that does not exist:
    the raw data are named after the profile's file (sidecar_paths)."""
    from hw_backend.calibrate import sidecar_paths
    from hw_backend.calibration.assemble import Context, build
    from hw_backend.calibration.topology import Machine
    from hw_backend.numa import NumaNode

    machine = Machine((NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),), {0: (10,)},
                      "Test CPU", 2.0, "test", "avx512", tuple(range(8)))
    info = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 0, "pci": None}
    out = Path("profiles/local.yaml")
    text, _ = build(Context("my-box", "2024-01-01", machine, _synthetic_rows(True), info, None,
                            "bf16", False, 16 << 20, file_stem=out.stem))
    json_path, _ = sidecar_paths(out)
    assert f"saved beside this file as {json_path.name} / .csv" in text
    assert "my-box.calibration" not in text

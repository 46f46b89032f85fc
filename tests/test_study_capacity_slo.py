"""Capacity search under a per-token latency SLO: the largest batch that fits *and* whose
simulated per-token latency stays within the SLO, with the throughput there."""

from __future__ import annotations

import math

import pandas as pd
from test_study_common import write_study

from hgsim.simulate import Fidelity, simulate
from hgsim.study import RunOptions, run_study
from hgsim.study.execute import ExecOptions
from hgsim.study.load import load_study, resolved_yaml
from hgsim.study.schema import SearchSpec
from hgsim.workload import Workload

# null: memory only; 1e6 ms: an SLO nothing at batch <= 8 comes near; 60 ms: binds HybridGen
# at 128k (batch 4 is ~55 ms, 5 is ~70 ms on this host) and gpu_only's HBM binds first
SLO_STUDY = """\
name: slo
base:
  profile: h100-80gb-spr-cxl
  model: llama-3.1-8b
  workload: {batch: 1, context: 128k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
search: {maximize: workload.batch, lo: 1, hi: 8, step: 1}
sweep:
  - grid:
      search.max_token_latency_ms: [null, 1000000, 60]
      policy: [hybridgen, gpu_only]
plots:
  cap: {kind: bar, x: policy, y: max_batch, hue: search.max_token_latency_ms}
  tput: {kind: bar, x: policy, y: tokens_per_s, hue: search.max_token_latency_ms}
"""


def _latency_ms(policy: str, batch: int) -> float:
    result = simulate("h100-80gb-spr-cxl", "llama-3.1-8b", policy,
                      Workload(batch=batch, context=128 * 1024, gen=4),
                      fidelity=Fidelity(decode_samples=2, accuracy=False))
    assert result.feasible
    return result.latency_stats_ms()["mean"]


def _run_in_process(tmp_path, text: str):
    """Run study ``text`` quietly in this process (one job) into ``tmp_path/out``."""
    run = run_study(write_study(tmp_path, text), RunOptions(
        out=tmp_path / "out", quiet=True, execution=ExecOptions(jobs=1)))
    assert run.ok
    return run


def test_a_latency_slo_bounds_the_search_and_reports_the_simulation_there(tmp_path):
    out = tmp_path / "out"
    run = _run_in_process(tmp_path, SLO_STUDY)
    frame = run.frame
    slo_col = "search.max_token_latency_ms"
    rows = {(r["policy"], None if r[slo_col] is None or (isinstance(r[slo_col], float) and
                                                         math.isnan(r[slo_col]))
             else float(r[slo_col])): r for r in frame.to_dict("records")}
    assert len(rows) == 6
    for policy in ("hybridgen", "gpu_only"):
        memory, generous = rows[(policy, None)], rows[(policy, 1e6)]
        # a generous SLO answers what memory alone does, and says which bound it was
        assert generous["max_batch"] == memory["max_batch"]
        assert generous["limit"] == memory["limit"]
        assert generous["latency_mean_ms"] <= 1e6 and generous["tokens_per_s"] > 0
        # memory-only rows simulate nothing
        assert math.isnan(memory["tokens_per_s"]) and math.isnan(memory["simulations"])
    assert rows[("hybridgen", None)]["limit"] == "range"  # batch 8 fits in host memory
    assert rows[("hybridgen", None)]["capped"]
    assert rows[("gpu_only", None)]["limit"] == "memory"  # 128k KV in HBM: a few sequences
    assert rows[("gpu_only", None)]["limit_reason"].startswith("hbm short by")

    tight = rows[("hybridgen", 60.0)]
    best = int(tight["max_batch"])
    assert 1 <= best < rows[("hybridgen", None)]["max_batch"]
    assert tight["limit"] == "latency" and not tight["capped"]
    # the row's latency is the simulation at the best batch, within the SLO ...
    assert tight["latency_mean_ms"] == _latency_ms("hybridgen", best) <= 60
    assert tight["latency_p99_ms"] >= tight["latency_p50_ms"] > 0
    assert math.isclose(tight["tokens_per_s"], best * 1e3 / tight["latency_mean_ms"],
                        rel_tol=0.05)
    # ... and one step up breaks it, as the reason says
    above = _latency_ms("hybridgen", best + 1)
    assert above > 60
    assert tight["limit_reason"] == f"per-token latency {above:.4g} ms (mean) > SLO 60 ms"
    # gpu_only's HBM binds before 60 ms does: the memory-only answer, bound by memory
    assert rows[("gpu_only", 60.0)]["max_batch"] == rows[("gpu_only", None)]["max_batch"]
    assert rows[("gpu_only", 60.0)]["limit"] == "memory"

    report = (out / "report.md").read_text()
    assert "## Largest batch that fits within the latency SLO" in report
    assert "## Throughput at that batch (tokens/s)" in report
    assert (out / "figures" / "tput.png").is_file()
    # the resolved study carries the swept SLO and reproduces the same points
    plan = load_study(out / "study.resolved.yaml")
    assert {p.spec.key for p in plan.expansion.points} == set(frame["point"])


def test_nothing_within_the_slo_says_latency_and_leaves_the_metrics_empty(tmp_path):
    text = SLO_STUDY.replace("[null, 1000000, 60]", "[0.001]")
    run = _run_in_process(tmp_path, text)
    for row in run.frame.to_dict("records"):
        assert not row["feasible"] and row["limit"] == "latency"
        assert pd.isna(row["max_batch"]) and pd.isna(row["tokens_per_s"])
        assert row["reason"].startswith("per-token latency ") and "> SLO 0.001 ms" in row["reason"]


def _cli(tmp_path, capsys, text: str) -> tuple[int, str]:
    from hgsim.cli import main

    study = write_study(tmp_path, text)
    code = main(["study", str(study), "--out", str(tmp_path / "out"), "-q"])
    return code, capsys.readouterr().err.strip()


def test_a_bad_slo_is_refused_in_one_line(tmp_path, capsys):
    base = SLO_STUDY.replace("step: 1}", "step: 1, max_token_latency_ms: SLO}")
    for value, words in (("0", "greater than 0"), ("-5", "greater than 0"),
                         ("fast", "valid number")):
        code, err = _cli(tmp_path, capsys, base.replace("SLO", value))
        assert code == 2 and len(err.splitlines()) == 1, err
        assert ":7: search.max_token_latency_ms: " in err and words in err, err
    code, err = _cli(tmp_path, capsys, SLO_STUDY.replace("[null, 1000000, 60]", "[100, -1]"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert ":10: " in err and "search.max_token_latency_ms: input should be greater than 0" in err
    code, err = _cli(tmp_path, capsys, SLO_STUDY.replace("step: 1}", "step: 1, latency_stat: p90}"))
    assert code == 2 and "search.latency_stat: input should be 'mean', 'p50' or 'p99'" in err
    code, err = _cli(tmp_path, capsys, SLO_STUDY.replace("search.max_token_latency_ms", "search.lo"))
    assert code == 2 and "'search.lo' cannot be swept" in err, err
    assert not (tmp_path / "out").exists()


def _key(tmp_path, search: str, fidelity: str = "{decode_samples: 2, accuracy: false}") -> str:
    text = (f"name: k\nbase:\n  profile: h100-80gb-spr-cxl\n  model: llama-3.1-8b\n"
            f"  workload: {{context: 128k, gen: 4}}\n  fidelity: {fidelity}\n"
            f"search: {search}\n")
    (point,) = load_study(write_study(tmp_path, text, "k.yaml")).expansion.points
    return point.spec.key


def test_a_search_without_slo_keeps_its_key(tmp_path):
    plain = "{maximize: workload.batch, lo: 1, hi: 8}"
    # the search as keyed before the SLO existed: its four fields, nothing more
    assert SearchSpec(maximize="workload.batch", lo=1, hi=8).key_config() == {
        "maximize": "workload.batch", "lo": 1, "hi": 8, "step": 1}
    key = _key(tmp_path, plain)
    assert _key(tmp_path, plain.replace("}", ", max_token_latency_ms: null}")) == key
    # memory only: the decode fidelity does not enter the key (as before) ...
    assert _key(tmp_path, plain, "{decode_samples: 8}") == key
    # ... with an SLO each probe is simulated, so the SLO and the fidelity do
    slo = _key(tmp_path, plain.replace("}", ", max_token_latency_ms: 100}"))
    assert slo != key
    assert _key(tmp_path, plain.replace("}", ", max_token_latency_ms: 100}"),
                "{decode_samples: 8}") != slo
    assert _key(tmp_path, plain.replace("}", ", max_token_latency_ms: 100, "
                                             "latency_stat: p99}")) != slo


def test_resolved_yaml_names_the_slo_only_when_set(tmp_path):
    text = SLO_STUDY.replace("step: 1}", "step: 1, max_token_latency_ms: 50}")
    resolved = resolved_yaml(load_study(write_study(tmp_path, text)))
    assert "max_token_latency_ms: 50" in resolved and "latency_stat: mean" in resolved
    plain = SLO_STUDY.split("plots:")[0].replace(
        "search.max_token_latency_ms: [null, 1000000, 60]", "workload.gen: [4]")
    resolved = resolved_yaml(load_study(write_study(tmp_path, plain, "plain.yaml")))
    assert "max_token_latency_ms" not in resolved and "latency_stat" not in resolved


# pick: fastest. FlexGen at 32k keeps every sequence's KV in HBM up to batch 15 and streams
# it from host memory from 16 on, so throughput falls past 15 although batches up to the
# largest that fits all qualify.
FASTEST_STUDY = """\
name: fastest
base:
  profile: h100-80gb-spr-cxl
  model: llama-3.1-8b
  workload: {batch: 1, context: 32k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
search: {maximize: workload.batch, lo: 12, hi: 20, step: 1, pick: fastest}
sweep:
  - grid:
      policy: [flexgen]
"""


def test_pick_fastest_answers_with_the_batch_that_decodes_fastest(tmp_path):
    _run_in_process(tmp_path, FASTEST_STUDY)
    row = pd.read_parquet(tmp_path / "out" / "results.parquet").iloc[0]
    largest, fastest = int(row["max_batch"]), int(row["fastest_batch"])
    assert row["batch"] == fastest and row["limit"] == "range" and largest == 20
    rates = {b: simulate("h100-80gb-spr-cxl", "llama-3.1-8b", "flexgen",
                         Workload(batch=b, context=32 * 1024, gen=4),
                         fidelity=Fidelity(decode_samples=2, accuracy=False)).tokens_per_s
             for b in range(12, largest + 1)}
    assert fastest == max(rates, key=rates.get) and fastest < largest  # the cliff past HBM
    assert math.isclose(row["tokens_per_s"], rates[fastest], rel_tol=1e-9)
    assert rates[largest] < rates[fastest]
    assert row["simulations"] == largest - 12 + 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Fastest batch up to it" in report and "pick: fastest" in report


def test_pick_fastest_over_too_many_values_is_refused_and_largest_keeps_the_key(tmp_path):
    try:
        SearchSpec(maximize="workload.context", lo=1024, hi=1 << 20, step=1024, pick="fastest")
    except ValueError as exc:
        assert "pick: fastest simulates every value" in str(exc) and "1024" in str(exc)
    else:
        raise AssertionError("a 1024-value scan was accepted")
    plain = SearchSpec(maximize="workload.batch", lo=1, hi=8)
    assert plain.key_config() == SearchSpec(maximize="workload.batch", lo=1, hi=8,
                                            pick="largest").key_config()
    assert "pick" not in plain.key_config() and not plain.simulates
    assert SearchSpec(maximize="workload.batch", lo=1, hi=8, pick="fastest").simulates

"""Studies with a ``serving:`` block: an online server (``hgsim.serving``) at every point.

A row must be what ``serve_requests`` / ``max_rate`` give for the same configuration (the
same numbers, exactly), the serving fields must sweep like other axes, the points must resume,
and every bad value must be refused in one line before anything runs."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_study_common import last_run, refused_study, write_study

from hgsim.catalog import get_model
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.serving import LengthDist, RequestMix, Slo, StepTimes, max_rate, serve_requests
from hgsim.study import RunOptions, run_study
from hgsim.study.execute import ExecOptions
from hgsim.study.load import load_study, resolved_yaml

# gpu_only at 4k-8k prompts: a few dozen cells, a second or two a point
SERVING = """\
name: srv
base:
  profile: h100-80gb-spr-cxl
  model: llama-3.1-8b
  policy: gpu_only
  workload: {kv_dtype: fp16}
  hardware: {gpus.gpu0.peak_tflops.fp16: 600}
serving:
  rate_per_s: 2
  requests: 24
  prompt: lognormal:4k:0.5
  output: 8
  max_batch: 4
  seed: 3
  slo: {ttft_s: 2, tpot_ms: 50, attainment: 0.8}
sweep:
  - zip:
      serving.find_rate: [false, true]
      workload.kv_dtype: [fp8, fp16]
plots:
  rate: {kind: bar, x: workload.kv_dtype, y: output_tokens_per_s, hue: serving.find_rate}
"""

AXES = "- zip:\n      serving.find_rate: [false, true]\n      workload.kv_dtype: [fp8, fp16]"
assert AXES in SERVING

# one point per max_batch, each searching its rate
FIND_RATE = SERVING.replace("  rate_per_s: 2\n", "  find_rate: true\n").replace(
    AXES, "- grid:\n      serving.max_batch: [2, 4]").replace(
    "x: workload.kv_dtype", "x: serving.max_batch").replace(", hue: serving.find_rate", "")

# one rate, no find_rate axis: each bad value below is the only thing wrong
PLAIN = SERVING.replace(AXES, "- grid:\n      serving.seed: [3, 4]\n      workload.kv_dtype: "
                              "[fp16, fp8]").replace("hue: serving.find_rate", "hue: serving.seed")


def _run(tmp_path, text: str, **options):
    run = run_study(write_study(tmp_path, text), RunOptions(
        out=tmp_path / "out", quiet=True, figures=False, execution=ExecOptions(jobs=1),
        **options))
    assert run.ok, run.stats.errors
    return run


def _direct(kv_dtype: str, max_batch: int = 4, prefill_chunk: int | None = None):
    """The step times, requests and SLO of SERVING's point, built by hand."""
    profile = profile_with_overrides(load_profile("h100-80gb-spr-cxl"),
                                     {"gpus.gpu0.peak_tflops.fp16": 600})
    mix = RequestMix(LengthDist.parse("lognormal:4k:0.5", "prompt"), LengthDist.parse(8, "o"),
                     count=24, seed=3)
    times = StepTimes(profile, get_model("llama-3.1-8b"), "gpu_only", {}, kv_dtype=kv_dtype,
                      prefill_chunk=prefill_chunk,
                      longest_prompt=max(r.prompt_tokens for r in mix.requests(1.0)))
    return times, mix, Slo(ttft_s=2, tpot_s=0.05, attainment=0.8)


def _same(row: dict, expected: dict) -> None:
    for column, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(row[column]), column
        else:
            assert row[column] == value, (column, row[column], value)


def test_rows_are_the_servers_own_numbers(tmp_path):
    run = _run(tmp_path, SERVING)
    frame = run.frame
    assert len(frame) == 2
    rows = {bool(r["serving.find_rate"]): r for r in frame.to_dict("records")}
    fixed, found = rows[False], rows[True]
    assert (fixed["workload.kv_dtype"], found["workload.kv_dtype"]) == ("fp8", "fp16")
    # a fixed rate: one run at fp8 KV
    times, mix, slo = _direct("fp8")
    served = serve_requests(times, mix.requests(2.0), max_batch=4, rate_per_s=2.0, slo=slo)
    _same(fixed, served.summary())
    assert fixed["rate_per_s"] == 2 and math.isnan(fixed["max_rate_per_s"])
    # find_rate: the search at fp16 KV (rate_per_s is the fixed points' rate only)
    times, mix, slo = _direct("fp16")
    search = max_rate(times, mix, max_batch=4, slo=slo)
    assert search.rate_per_s is not None
    _same(found, search.result.summary())
    assert found["max_rate_per_s"] == search.rate_per_s == found["rate_per_s"]
    assert found["rates_tried"] == len(search.probes) and found["reason"] == ""
    assert found["slo_attainment"] >= 0.8
    # the KV dtype reached the step times: fp16 at the same rate decodes more slowly
    at_fp16 = serve_requests(times, mix.requests(2.0), max_batch=4, rate_per_s=2.0, slo=slo)
    assert at_fp16.summary()["tpot_mean_s"] > fixed["tpot_mean_s"]
    # the point's own columns: profile, model, policy and the axes; the columns validated at
    # load time (plots, derived metrics) are exactly those the rows hold
    assert set(frame["policy"]) == {"gpu_only"} and set(frame["prompt"]) == {"lognormal:4k:0.5"}
    assert set(frame.columns) == set(run.plan.columns)
    # the resolved study reproduces the same points
    out = tmp_path / "out"
    plan = load_study(out / "study.resolved.yaml")
    assert {p.spec.key for p in plan.expansion.points} == set(frame["point"])
    report = (out / "report.md").read_text()
    assert "Serving: an online server at every point" in report
    # the searching point says what its SLO is lost to, as the search named it
    assert "## What the SLO is lost to" in report and search.bound_by in ("ttft", "tpot")
    assert found["slo_bound_by"] == search.bound_by and search.bound_note in report


def test_a_serving_axis_expands_to_its_points(tmp_path):
    text = PLAIN.replace("serving.seed: [3, 4]\n      workload.kv_dtype: "
                         "[fp16, fp8]", "serving.rate_per_s: [0.5, 1]\n      serving.max_batch: "
                           "[2, 8]\n      serving.slo.tpot_ms: [20, 40]\n      serving.prompt: "
                           "[4k, uniform:4k:8k]").replace("x: workload.kv_dtype",
                                                          "x: serving.max_batch").replace(
                           "serving.seed}", "serving.prompt}")
    plan = load_study(write_study(tmp_path, text))
    points = plan.expansion.points
    assert len(points) == 16 and len({p.spec.key for p in points}) == 16
    assert plan.expansion.axes == ["serving.rate_per_s", "serving.max_batch",
                                   "serving.slo.tpot_ms", "serving.prompt"]
    for p in points:
        s = p.spec.serving
        assert (s.rate_per_s, s.max_batch, s.slo.tpot_ms, s.prompt) == (
            p.coords["serving.rate_per_s"], p.coords["serving.max_batch"],
            p.coords["serving.slo.tpot_ms"], p.coords["serving.prompt"])
        assert s.slo.ttft_s == 2 and s.slo.attainment == 0.8 and s.requests == 24
    assert {(p.spec.serving.rate_per_s, p.spec.serving.max_batch) for p in points} == {
        (0.5, 2), (0.5, 8), (1, 2), (1, 8)}
    assert "serving.slo.tpot_ms" in resolved_yaml(plan)


def test_serving_points_resume_and_a_changed_field_recomputes(tmp_path):
    text = FIND_RATE.replace("serving.max_batch: [2, 4]", "serving.max_batch: [2]")
    _run(tmp_path, text)
    out = tmp_path / "out"
    assert last_run(out)["computed"] == 1
    _run(tmp_path, text)
    assert last_run(out)["computed"] == 0
    # the same lengths written another way are the same point
    _run(tmp_path, text.replace("output: 8", "output: '8'"))
    assert last_run(out)["computed"] == 0
    for changed in (text.replace("seed: 3", "seed: 4"),
                    text.replace("attainment: 0.8", "attainment: 0.7")):
        _run(tmp_path, changed)
        assert last_run(out)["computed"] == 1


def test_copies_behind_one_queue_are_the_servers_own_numbers(tmp_path):
    """workload.data_parallel and gpu_placement reach the step times: the row is what
    ``api.serve`` gives for two copies spread over the HGX host's sockets."""
    from hgsim import api

    text = (PLAIN.replace("h100-80gb-spr-cxl", "hgx-h100x8-2socket-cxl")
            .replace("  hardware: {gpus.gpu0.peak_tflops.fp16: 600}\n", "")
            .replace("{kv_dtype: fp16}", "{kv_dtype: fp16, data_parallel: 2, "
                                         "gpu_placement: spread}")
            .replace("serving.seed: [3, 4]", "serving.seed: [3]")
            .replace("workload.kv_dtype: [fp16, fp8]", "workload.kv_dtype: [fp16]"))
    row = _run(tmp_path, text).frame.to_dict("records")[0]
    served = api.serve("hgx-h100x8-2socket-cxl", "llama-3.1-8b", "gpu_only", rate=2,
                       prompt="lognormal:4k:0.5", output=8, requests=24, seed=3, max_batch=4,
                       data_parallel=2, gpu_placement="spread", slo_ttft_s=2, slo_tpot_s=0.05,
                       attainment=0.8)
    _same(row, served.summary())
    assert (row["data_parallel"], row["gpu_placement"]) == (2, "spread")


def test_workload_lengths_are_refused(tmp_path, capsys):
    for key in ("workload.context", "workload.batch", "workload.gen"):
        err = refused_study(tmp_path, capsys, PLAIN.replace("workload.kv_dtype: [fp16, fp8]",
                                                              f"{key}: [1, 2]"))
        assert f"'{key}' cannot be swept with serving" in err and "serving.prompt" in err, err


BAD = [
    ("rate_per_s: 2", "rate_per_s: 0", ":9: serving.rate_per_s: input should be greater than 0"),
    ("rate_per_s: 2", "rate_per_s: -1", ":9: serving.rate_per_s: input should be greater than 0"),
    ("prompt: lognormal:4k:0.5", "prompt: lognormal:4k", ":11: serving.prompt: expected"),
    ("prompt: lognormal:4k:0.5", "prompt: 4q", ":11: serving.prompt: "),
    ("output: 8", "output: uniform:9:8", ":12: serving.output: needs 1 <= LO <= HI"),
    ("max_batch: 4", "max_batch: 0", ":13: serving.max_batch: input should be greater than or"),
    ("attainment: 0.8", "attainment: 0", "serving.slo.attainment: input should be greater than"),
    ("attainment: 0.8", "attainment: 1.5", "serving.slo.attainment: input should be less than"),
    ("  rate_per_s: 2\n", "  rate_per_s: 2\n  find_rate: true\n",
     ":10: serving.find_rate: searches the rate itself"),
    ("  rate_per_s: 2\n", "", ":8: serving.rate_per_s: give a Poisson arrival rate"),
    ("  slo: {ttft_s: 2, tpot_ms: 50, attainment: 0.8}\n", "", "serving.find_rate: searches "
     "the highest rate meeting an SLO"),
    ("{ttft_s: 2, tpot_ms: 50, attainment: 0.8}", "{attainment: 0.8}",
     "serving.slo: give ttft_s and/or tpot_ms"),
    ("  seed: 3\n", "  seed: 3\n  speed: 2\n", "serving.speed: "),
    ("workload.kv_dtype: [fp16, fp8]", "serving.rate_per_s: [1, -1]",
     "serving.rate_per_s[1]: input should be greater than 0"),
    ("  seed: 3\n", "  seed: 3\n  prefill_chunk: 8\n",
     "serving.prefill_chunk: must be 0 (prompts prefilled whole) or at least 16"),
    ("workload.kv_dtype: [fp16, fp8]", "serving.prefill_chunk: [1k, -1]",
     "serving.prefill_chunk[1]: input should be greater than or equal to 0"),
    ("workload.kv_dtype: [fp16, fp8]", "serving.tolerance: [1]",
     "'serving.tolerance' cannot be swept"),
    ("serving:\n", "search: {maximize: workload.batch, lo: 1, hi: 8}\nserving:\n",
     "serving: runs an online server at every point; it cannot be combined with search"),
    ("serving:\n", "sensitivity: {parameters: [tiers.cxl0.latency_ns]}\nserving:\n",
     "it cannot be combined with sensitivity"),
    ("serving:\n", "equal_accuracy: {target_rel_error: 0.01}\nserving:\n",
     "it cannot be combined with equal_accuracy"),
]


@pytest.mark.parametrize(("old", "new", "words"), BAD, ids=[b[2][:40] for b in BAD])
def test_a_bad_serving_value_is_one_line_exit_2(tmp_path, capsys, old, new, words):
    text = FIND_RATE if "slo: {" in old else PLAIN  # FIND_RATE: find_rate without an SLO
    assert old in text
    err = refused_study(tmp_path, capsys, text.replace(old, new, 1))
    assert words in err, err


def test_a_serving_axis_without_a_serving_block_is_refused(tmp_path, capsys):
    from test_study_common import TINY

    err = refused_study(tmp_path, capsys, TINY.replace("policy: [hybridgen",
                                                       "serving.max_batch: [1]\n      policy: "
                                                       "[hybridgen"))
    assert "'serving.max_batch' sweeps an online server's setting; the study has no serving" in err


def test_no_rate_meeting_the_slo_leaves_the_metrics_empty_and_says_why(tmp_path):
    text = FIND_RATE.replace("serving.max_batch: [2, 4]", "serving.max_batch: [2]").replace(
        "ttft_s: 2,", "ttft_s: 0.001,")
    (row,) = _run(tmp_path, text).frame.to_dict("records")
    assert pd.isna(row["max_rate_per_s"]) and pd.isna(row["output_tokens_per_s"])
    assert row["reason"].startswith("the SLO is missed even at ") and row["rates_tried"] > 1
    times, mix, slo = _direct("fp16", max_batch=2)
    search = max_rate(times, mix, max_batch=2, slo=Slo(ttft_s=0.001, tpot_s=0.05,
                                                       attainment=0.8))
    assert search.rate_per_s is None and row["rates_tried"] == len(search.probes)


def test_a_prefill_chunk_axis_runs_the_chunked_server(tmp_path):
    """serving.prefill_chunk: 0 is the server that prefills whole (the same point a study
    without the field had), 1k its chunked-prefill run, each the server's own numbers."""
    text = PLAIN.replace("serving.seed: [3, 4]\n      workload.kv_dtype: [fp16, fp8]",
                         "serving.prefill_chunk: [0, 1k]").replace(
        "x: workload.kv_dtype", "x: serving.prefill_chunk").replace(
        ", hue: serving.seed", "")
    frame = _run(tmp_path, text).frame
    rows = {int(r["prefill_chunk"]): r for r in frame.to_dict("records")}
    assert set(rows) == {0, 1024}
    for chunk, row in rows.items():
        times, mix, slo = _direct("fp16", prefill_chunk=chunk or None)
        served = serve_requests(times, mix.requests(2.0), max_batch=4, rate_per_s=2.0,
                                slo=slo)
        _same(row, served.summary())
    # prefill_chunk 0 is the point a study without the field stored (results resume)
    whole = {p.spec.key for p in load_study(write_study(tmp_path, PLAIN)).expansion.points
             if p.coords["serving.seed"] == 3 and p.coords["workload.kv_dtype"] == "fp16"}
    swept = {p.coords["serving.prefill_chunk"]: p.spec.key
             for p in load_study(write_study(tmp_path, text)).expansion.points}
    assert whole == {swept[0]} and swept[1024] != swept[0]  # 1k, a count

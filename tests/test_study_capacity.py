"""Capacity search: the reported maximum fits and one step more does not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_study_common import write_study

from hgsim.catalog import get_model
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.study import RunOptions, run_study
from hgsim.study.capacity_search import max_feasible
from hgsim.workload import Workload

CAPACITY = """\
name: cap
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-13b
  workload: {batch: 1, gen: 64}
search: {maximize: workload.context, lo: 1k, hi: 16M, step: 1k}
sweep:
  - grid:
      profile: [h100-80gb-spr-cxl, rtx5090-cxl]
      workload.batch: [1, 4]
      policy: [hybridgen, flexgen, gpu_only]
plots:
  cap: {kind: bar, x: policy, y: max_context, col: profile, row: workload.batch, logy: true}
"""


def test_capacity_study_finds_the_boundary(tmp_path):
    out = tmp_path / "out"
    options = RunOptions(out=out, quiet=True)
    options.execution.jobs = 1
    run = run_study(write_study(tmp_path, CAPACITY), options)
    assert run.ok
    frame = run.frame
    assert len(frame) == 12 and "max_context" in frame
    step = 1024
    model = get_model("llama-2-13b")
    for row in frame.to_dict("records"):
        profile = load_profile(row["profile"])

        def fits(context, row=row, profile=profile):
            workload = Workload(batch=row["workload.batch"], context=context, gen=64)
            return make_policy(row["policy"], model, profile, workload).feasible

        if row["feasible"]:
            top = int(row["max_context"])
            assert top % step == 0
            assert fits(top), row
            assert row["capped"] or not fits(top + step), row
        else:
            assert not fits(step)
    report = (out / "report.md").read_text()
    assert "## Largest context that fits" in report
    assert (out / "figures" / "cap.png").is_file()


@given(lo=st.integers(1, 50), span=st.integers(0, 5000), step=st.integers(1, 64),
       limit=st.integers(0, 6000))
def test_max_feasible_is_exact(lo, span, step, limit):
    hi = lo + span

    def fits(v):
        return v <= limit, None if v <= limit else f"{v} > {limit}"

    best, reason, capped = max_feasible(fits, lo, hi, step)
    candidates = [lo + k * step for k in range((hi - lo) // step + 1)]
    feasible = [c for c in candidates if c <= limit]
    assert best == (max(feasible) if feasible else None)
    assert capped == (bool(feasible) and best == candidates[-1])
    if best is not None and not capped:
        assert reason == f"{best + step} > {limit}"


def test_a_step_wider_than_the_searched_range_is_refused(tmp_path, capsys):
    # step 32M over 1k..16M had one candidate, lo: every point answered max_context 1024
    # (capped) however much fitted, without a word
    from hgsim.cli import main

    text = CAPACITY.replace("step: 1k}", "step: 32M}")
    assert text != CAPACITY
    study = write_study(tmp_path, text)
    code = main(["study", str(study), "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{study}:6: search: step: step (33554432) is wider than the range searched, " \
           "hi - lo (16776192)" in err, err
    assert not (tmp_path / "out").exists()

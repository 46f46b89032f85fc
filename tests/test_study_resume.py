"""Results survive Ctrl-C and kill -9: a re-run computes exactly the missing points, none twice;
--force recomputes everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from test_study_common import REPO, cli_env, last_run, results, run_cli, write_study

from hgsim.study import load_study
from hgsim.study.store import PointStore

# 10 contexts x 3 policies = 30 points of ~0.1-0.8 s each (every decode step simulated): slow
# enough that a kill lands midway even when this test process is starved of CPU for seconds.
SLOW = """\
name: slow
base:
  profile: h100-80gb-spr-cxl
  model: llama-2-7b
  workload: {batch: 2, context: 32k, gen: 96}
  fidelity: {decode_samples: 0, accuracy: false}
sweep:
  - grid:
      workload.context: [16k, 24k, 32k, 40k, 48k, 56k, 64k, 72k, 80k, 96k]
      policy: [hybridgen, flexgen, cpu_offload]
"""
CONTEXTS = "16k, 24k, 32k, 40k, 48k, 56k, 64k, 72k, 80k, 96k"


def fast(study: str, contexts: str) -> str:
    """``study`` over ``contexts`` only, with 4 decode steps a point (milliseconds each)."""
    assert CONTEXTS in study and "gen: 96" in study
    return study.replace(CONTEXTS, contexts).replace("gen: 96", "gen: 4")


def stored(points_dir) -> dict[str, int]:
    """Valid stored points -> file mtime (ns)."""
    store = PointStore(points_dir)
    return {k: store.path(k).stat().st_mtime_ns for k in store.load(store.keys())}


@contextmanager
def sigint_not_ignored():
    """Children started inside see SIGINT at its default, as under an interactive shell.

    A shell starts a background command (``pytest ... &``) with SIGINT ignored, exec keeps an
    ignored signal ignored, and Python installs no KeyboardInterrupt handler when it starts
    with SIGINT ignored: the CLI would rightly sleep through the Ctrl-C this test sends and
    finish the study with exit 0. A signal with a handler is reset to default by exec.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt_midway(study, out, sig: int, min_new: int) -> tuple[int, str]:
    """Start the study in its own session, send ``sig`` to the whole group once ``min_new``
    more points are stored, and return the exit code and what it printed on stderr."""
    points_dir = out / "points"
    start = len(PointStore(points_dir).keys())
    with sigint_not_ignored():
        proc = subprocess.Popen(
            [sys.executable, "-m", "hgsim", "study", str(study), "--out", str(out),
             "--jobs", "2", "--quiet", "--no-figures"],
            cwd=REPO, env=cli_env(), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(PointStore(points_dir).keys()) >= start + min_new:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the study ended before the kill: {proc.stderr.read()}"
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=20)
        return proc.returncode, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_then_kill_9_midway_then_rerun_computes_only_missing(tmp_path):
    study = write_study(tmp_path, SLOW)
    out = tmp_path / "out"
    points_dir = out / "points"
    expected = {s.key for s in load_study(study).expansion.unique_specs()}
    assert len(expected) == 30

    # Ctrl-C: exits 130 at once and its workers stop (nothing is stored afterwards).
    code, stderr = interrupt_midway(study, out, signal.SIGINT, 2)
    assert code == 130, stderr
    assert "interrupted" in stderr
    after_sigint = stored(points_dir)
    time.sleep(0.5)
    assert stored(points_dir) == after_sigint

    # kill -9 of the CLI, its workers and all: whatever was stored stays valid.
    code, stderr = interrupt_midway(study, out, signal.SIGKILL, 2)
    assert code == -signal.SIGKILL, stderr
    before = stored(points_dir)
    assert len(after_sigint) < len(before) < len(expected), "kills did not land midway"
    assert all(before[k] == after_sigint[k] for k in after_sigint)
    assert set(before) <= expected
    assert not (out / "results.parquet").exists()

    rerun = run_cli("study", str(study), "--out", str(out), "--jobs", "2", "--no-figures")
    assert rerun.returncode == 0, rerun.stderr
    log = last_run(out)
    assert log["computed"] == len(expected) - len(before)
    assert log["reused"] == len(before) and log["missing"] == 0
    after = stored(points_dir)
    assert set(after) == expected
    assert all(after[k] == before[k] for k in before)  # stored points were not recomputed
    frame = results(out)
    assert len(frame) == 30 and frame["point"].is_unique
    assert not frame.duplicated(["workload.context", "policy"]).any()
    assert not [p for p in points_dir.iterdir() if p.name.endswith(".tmp")]


def run_small(tmp_path, contexts: str):
    """A few fast points of SLOW run in this process; (study file, its folder, the options)."""
    from hgsim.study import RunOptions, run_study

    study = write_study(tmp_path, fast(SLOW, contexts))
    out = tmp_path / "out"
    options = RunOptions(out=out, quiet=True, figures=False)
    options.execution.jobs = 1
    run_study(study, options)
    return study, out, options


def test_force_recomputes_every_stored_point(tmp_path):
    study, out, _ = run_small(tmp_path, "16k, 32k")
    before = stored(out / "points")
    assert len(before) == 6

    forced = run_cli("study", str(study), "--out", str(out), "--jobs", "2", "--force",
                     "--no-figures")
    assert forced.returncode == 0, forced.stderr
    assert last_run(out)["computed"] == 6
    refreshed = stored(out / "points")
    assert set(refreshed) == set(before)
    assert all(refreshed[k] != before[k] for k in before)
    assert len(results(out)) == 6


def test_invalid_stored_point_is_recomputed(tmp_path):
    from hgsim.study import run_study

    study, out, options = run_small(tmp_path, "16k")
    store = PointStore(out / "points")
    victim = sorted(store.keys())[0]
    store.path(victim).write_text('{"key": "truncated')  # as if torn by a crash
    run = run_study(study, options)
    assert run.stats.computed == 1
    assert store.read(victim) is not None


def test_failing_point_is_reported_not_stored_and_retried(tmp_path, monkeypatch):
    import hgsim.simulate
    from hgsim.study import RunOptions, run_study

    study = write_study(tmp_path, fast(SLOW, "16k, 32k"))
    out = tmp_path / "out"
    options = RunOptions(out=out, quiet=True, figures=False)
    options.execution.jobs = 1
    real = hgsim.simulate.simulate

    def flaky(profile, model, policy, workload, **kwargs):
        if policy == "flexgen":
            raise RuntimeError("simulated bug")
        return real(profile, model, policy, workload, **kwargs)

    monkeypatch.setattr(hgsim.simulate, "simulate", flaky)
    run = run_study(study, options)
    assert not run.ok and len(run.stats.errors) == 2 and run.stats.computed == 4
    assert "simulated bug" in (out / "report.md").read_text()
    assert len(PointStore(out / "points").keys()) == 4

    monkeypatch.setattr(hgsim.simulate, "simulate", real)
    run = run_study(study, options)
    assert run.ok and run.stats.computed == 2 and len(run.frame) == 6

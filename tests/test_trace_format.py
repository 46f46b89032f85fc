"""The trace file is strict JSON in the Chrome trace format, whatever the result holds."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import simpy
from conftest import make_profile

from hgsim.sim import Machine, write_chrome_trace


def _strict(text: str):
    """json.loads that refuses NaN/Infinity, as JSON.parse (chrome://tracing) and Perfetto
    do: Python writes them by default, which makes the whole file unreadable there."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_metadata_is_written_as_null(tmp_path):
    m = Machine(simpy.Environment(), make_profile())
    m.copy("ddr0", "gpu0", 1e6, "kv")
    m.env.run()
    # a result row holds NaN where a figure is not computed (accuracy off, no prices)
    meta = {"accuracy_rel_error": float("nan"), "usd_per_mtok": float("inf"), "ok": 1.5,
            "nested": {"x": float("-inf")}}
    path = write_chrome_trace(m.recorder, tmp_path / "t.json", metadata=meta,
                              markers=[(0.0, "mark", {"ratio": float("nan")})])
    trace = _strict(open(path).read())
    assert trace["otherData"] == {"accuracy_rel_error": None, "usd_per_mtok": None, "ok": 1.5,
                                  "nested": {"x": None}}
    mark = next(e for e in trace["traceEvents"] if e["name"] == "mark")
    assert mark["args"] == {"ratio": None}


def test_the_written_trace_is_the_compact_json_trace_bytes_sizes(tmp_path, monkeypatch):
    """The file is written from one json.dumps, in slices: the same bytes as the compact,
    strict JSON of the trace, whatever the slice size, and as long as trace_bytes says."""
    from hgsim.sim import trace as trace_module

    m = Machine(simpy.Environment(), make_profile())
    for i in range(5):
        m.copy("ddr0", "gpu0", 1e6 * (i + 1), f"kv {i} \u00e9")  # a non-ASCII label too
    m.env.run()
    spans = [(0.0, m.env.now, "decode step 0", {"step": 0})]
    expected = json.dumps(trace_module.chrome_trace(m.recorder, spans=spans),
                          separators=(",", ":"), default=str, allow_nan=False).encode()
    for slice_chars in (7, 1 << 24):
        monkeypatch.setattr(trace_module, "_WRITE_SLICE", slice_chars)
        path = write_chrome_trace(m.recorder, tmp_path / f"t{slice_chars}.json", spans=spans)
        assert open(path, "rb").read() == expected
    assert trace_module.trace_bytes(m.recorder, spans=spans) == len(expected)


# ---------------------------------------------------------------------- a simulated run
def _run_trace(tmp_path, profile: str, model: str, policy: str, *, batch: int = 1,
               context: int = 131072, gen: int = 2, samples: int = 0, prefill: bool = False,
               prefill_chunk: int | None = None):
    from hgsim.simulate import Fidelity, simulate
    from hgsim.workload import Workload

    path = tmp_path / "t.json"
    result = simulate(profile, model, policy,
                      Workload(batch=batch, context=context, gen=gen, include_prefill=prefill,
                               prefill_chunk_tokens=prefill_chunk),
                      fidelity=Fidelity(decode_samples=samples, accuracy=False), trace_path=path)
    return result, _strict(path.read_text())


# Host paths on both CPU-heavy and PCIe-heavy policies, one and two sockets, MHA and GQA.
CASES = [
    ("h100-2socket-cxl", "llama-2-13b", "hybridgen", 1),
    ("h100-80gb-spr-cxl", "llama-3.1-8b", "infinigen", 16),
    ("a100-40gb-spr-cxl", "llama-3.1-8b", "flexgen", 1),
]


@pytest.mark.parametrize(("profile", "model", "policy", "batch"), CASES)
def test_a_simulated_trace_is_well_formed(tmp_path, profile, model, policy, batch):
    """What Perfetto needs: every slice has a finite start, a duration >= 0 and a named
    track in a named process; slices on one track never overlap (it draws misnested ones
    wrongly); a serial resource (a CUDA stream, a core pool held whole by each host path)
    keeps one track. The prompt is prefilled in chunks (16 x 128k tokens at once would need
    197 GB of activations), so the trace holds the chunks' read-backs too."""
    result, trace = _run_trace(tmp_path, profile, model, policy, batch=batch, prefill=True,
                               prefill_chunk=4096)
    assert result.feasible
    events = trace["traceEvents"]
    processes = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    per_track = defaultdict(list)
    for e in events:
        assert e["ph"] in ("M", "X", "C", "i")
        if e["ph"] == "X":
            assert math.isfinite(e["ts"]) and e["ts"] >= 0 and e["dur"] >= 0
            assert e["pid"] in processes and (e["pid"], e["tid"]) in threads
            per_track[e["pid"], e["tid"]].append(
                (round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)))
    for spans in per_track.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start
    names = set(threads.values())
    assert "gpu0.compute" in names and not any(n.startswith("gpu0.compute [") for n in names)
    assert not any(n.startswith("cpu0.cores [") for n in names)


def test_gen_1_trace_has_its_one_step(tmp_path):
    result, trace = _run_trace(tmp_path, "h100-80gb-spr-cxl", "llama-2-13b", "hybridgen",
                               gen=1, samples=4)
    (span,) = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "step"]
    assert span["args"]["stands_for_steps"] == "0"
    assert span["dur"] == pytest.approx(result.steps[0].latency_s * 1e6, abs=1e-3)


def test_infeasible_run_writes_no_trace(tmp_path, capsys):
    """Exit 1 (infeasible is an answer, not a mistake), no file, and a line that says so."""
    from hgsim.cli import main

    path = tmp_path / "t.json"
    code = main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-2-70b",
                 "--policy", "gpu_only", "--context", "128k", "--batch", "16", "--gen", "2",
                 "--trace", str(path)])
    assert code == 1
    assert list(tmp_path.iterdir()) == []
    assert f"no trace written to {path}" in capsys.readouterr().out


def test_infeasible_run_removes_an_earlier_trace(tmp_path, capsys):
    """A trace left from an earlier run passed for this (infeasible) run's: whatever is at
    --trace after a run is that run's, or nothing. The Python API does the same."""
    from hgsim import api
    from hgsim.cli import main

    path = tmp_path / "t.json"
    path.write_text('{"traceEvents": []}')
    code = main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-2-70b",
                 "--policy", "gpu_only", "--context", "128k", "--batch", "16", "--gen", "2",
                 "--trace", str(path)])
    assert code == 1
    assert list(tmp_path.iterdir()) == []
    assert (f"no trace written to {path} (infeasible: nothing was simulated; the earlier file "
            "there was removed)") in capsys.readouterr().out
    path.write_text('{"traceEvents": []}')
    result = api.simulate("h100-80gb-spr-cxl", "llama-2-70b", policy="gpu_only",
                          context="128k", batch=16, gen=2, trace=path)
    assert not result.feasible and not path.exists()


def test_a_trace_over_its_limit_is_refused_from_its_first_step(tmp_path, capsys):
    """--samples 0 over thousands of steps wrote gigabytes (1.25 GB for 4096 steps of
    llama-2-13b at 128k), built whole in memory first. The size is estimated after the first
    simulated step: within 10% of the file a run writes, it refuses a limit 10% under it and
    passes one 10% over it; the refusal names the flags and writes nothing."""
    from hgsim import api
    from hgsim.cli import main
    from hgsim.errors import TraceTooLarge

    run = dict(context="4k", gen=12, samples=0, accuracy=False)
    path = tmp_path / "t.json"
    api.simulate("dev-zen4-2core", "opt-6.7b", **run, trace=path, trace_max_gb=None)
    written = path.stat().st_size
    path.unlink()
    with pytest.raises(TraceTooLarge) as refused:
        api.simulate("dev-zen4-2core", "opt-6.7b", **run, trace=path,
                     trace_max_gb=0.9 * written / 1e9)
    assert refused.value.estimate_bytes == pytest.approx(written, rel=0.1)
    assert refused.value.steps == 12 and not path.exists()
    api.simulate("dev-zen4-2core", "opt-6.7b", **run, trace=path, trace_max_gb=1.1 * written / 1e9)
    assert path.stat().st_size == written
    argv = ["simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "4k",
            "--gen", "12", "--samples", "0", "--trace", str(tmp_path / "cli.json"),
            "--trace-max-gb", f"{0.5 * written / 1e9:.6f}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hgsim simulate: error: --trace: would be about ") and err.count("\n") == 1
    assert "per simulated step x 12 steps), over --trace-max-gb" in err and "--samples N" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_a_trace_limit_without_a_trace_is_refused(capsys):
    # --trace-max-gb without --trace was ignored without a word (as --prefill-chunk without
    # --prefill once was): the user believed a limit applied to something
    from bad_input import user_error

    line = user_error(capsys, "simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b",
                      "--context", "1k", "--gen", "4", "--samples", "2", "--trace-max-gb", "2")
    assert line == ("hgsim simulate: error: --trace-max-gb: limits the trace, which is written "
                    "only with --trace: add it")


def test_simulate_json_with_a_trace_says_where_it_went_on_stderr(tmp_path, capsys):
    """--json keeps stdout one JSON document; the trace's notice goes to stderr (it was not
    printed at all)."""
    import json

    from hgsim.cli import main

    path = tmp_path / "t.json"
    argv = ["simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
            "--gen", "4", "--samples", "2", "--trace", str(path), "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["feasible"]
    assert f"trace written to {path}" in captured.err and path.stat().st_size > 0

"""The online server (hgsim.serving): queueing against closed forms, its invariants, the step
times against the simulator, the rate search, request mixes and traces, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hgsim.catalog import get_model
from hgsim.errors import OptionError, TraceTooLarge, UserError
from hgsim.profiles import load_profile
from hgsim.serving import (
    LengthDist,
    Request,
    RequestMix,
    Slo,
    StepTimes,
    max_rate,
    read_trace,
    serve_requests,
)
from hgsim.serving.server import run_server
from hgsim.serving.step_times import GRID_PER_OCTAVE, bracket, grid_point


class ConstantTimes:
    """Step times of a machine whose prefill and decode step cost the same whatever the batch
    and context, and whose memory holds ``capacity_tokens`` of KV: the queueing alone."""

    def __init__(self, prefill_s: float, step_s: float, capacity_tokens: float = math.inf,
                 copies: int = 1):
        self.prefill_time, self.step, self.capacity = prefill_s, step_s, capacity_tokens
        self.simulations, self.data_parallel = 0, copies
        self.prefill_chunk, self.longest_prompt = None, 0
        self.idle_power_w, self.system = 0.0, load_profile("dev-zen4-2core")

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_time if prompt_tokens <= self.capacity else math.inf

    def prefill(self, prompt_tokens: int) -> tuple[float, float]:
        return self.prefill_s(prompt_tokens), 0.0

    def decode_step_s(self, batch: int, mean_context: float) -> float:
        return self.step

    def decode_step(self, batch: int, mean_context: float) -> tuple[float, float]:
        return self.step, 0.0

    def fits(self, batch: int, final_tokens: int) -> bool:
        return final_tokens <= self.capacity


def fixed(n: int) -> LengthDist:
    return LengthDist("fixed", n)


# ------------------------------------------------------------------ queueing: closed forms
def test_one_at_a_time_is_an_md1_queue():
    """max_batch 1, fixed lengths: each request holds the server for S = prefill + (out-1)
    steps, arrivals are Poisson: an M/D/1 queue, whose mean wait is rho S / (2 (1 - rho))
    (Pollaczek-Khinchine with zero service variance)."""
    prefill_s, step_s, output = 0.3, 0.05, 5
    service_s = prefill_s + (output - 1) * step_s
    rate = 0.6 / service_s
    mix = RequestMix(fixed(1000), fixed(output), count=40_000, seed=3)
    result = serve_requests(ConstantTimes(prefill_s, step_s), mix.requests(rate), max_batch=1)
    frame = result.requests_frame()
    rho = rate * service_s
    expected_wait = rho * service_s / (2 * (1 - rho))
    assert frame.queue_s.mean() == pytest.approx(expected_wait, rel=0.05)
    # TTFT is the wait plus the prefill; every request decodes alone at the step time
    assert np.allclose(frame.ttft_s, frame.queue_s + prefill_s)
    assert np.allclose(frame.tpot_s, step_s)
    assert np.allclose(frame.e2e_s, frame.queue_s + service_s)
    assert result.summary()["busy_fraction"] == pytest.approx(rho, rel=0.02)


def test_a_batch_that_never_fills_serves_every_request_in_its_own_time():
    """Room for everyone and a decode step that costs the same whatever the batch: a request
    waits only for the prefills ahead of it in its iteration, and once admitted it produces a
    token per step (TPOT = step, plus the prefills of later requests that interrupt it)."""
    times = ConstantTimes(prefill_s=0.0, step_s=0.01)
    mix = RequestMix(fixed(100), fixed(50), count=2_000, seed=1)
    frame = serve_requests(times, mix.requests(20.0), max_batch=10_000).requests_frame()
    # without prefill time, no request waits more than the step in progress when it came
    assert frame.queue_s.max() <= 0.01 + 1e-12
    assert np.allclose(frame.tpot_s, 0.01)


# ------------------------------------------------------------------ invariants
@pytest.fixture(scope="module")
def crowded():
    """A mixed load on a machine whose memory holds 60k tokens, with one prompt too large to
    fit alone, served in batches of at most 6."""
    mix = RequestMix(LengthDist.parse("uniform:1k:12k", "prompt"),
                     LengthDist.parse("lognormal:64:0.8", "output"), count=600, seed=5)
    requests = mix.requests(4.0)
    big = requests[17]
    requests[17] = Request(big.id, big.arrival_s, 70_000, big.output_tokens)
    times = ConstantTimes(prefill_s=0.02, step_s=0.01, capacity_tokens=60_000)
    return requests, serve_requests(times, requests, max_batch=6)


def test_every_request_gets_all_its_tokens_or_is_rejected_for_not_fitting(crowded):
    requests, result = crowded
    rejected = [s for s in result.served if s.rejected]
    assert [s.request.id for s in rejected] == [17]
    assert "do not fit alone" in rejected[0].rejected or "prefill" in rejected[0].rejected
    for s in result.served:
        if not s.rejected:
            assert s.generated == s.request.output_tokens
            assert s.request.arrival_s <= s.admitted_s <= s.first_token_s <= s.finish_s


def test_the_batch_and_the_reserved_kv_stay_within_their_limits(crowded):
    _, result = crowded
    assert max(it.batch for it in result.iterations) <= 6
    done = [s for s in result.served if not s.rejected]
    for s in done:  # at each admission, the KV reserved by everyone then present fits
        held = sum(q.request.final_tokens for q in done
                   if q.admitted_s <= s.admitted_s < q.finish_s)
        assert held <= 60_000


def test_the_iterations_frame_is_the_servers_time_series(crowded):
    _, result = crowded
    frame = result.iterations_frame()
    assert len(frame) == len(result.iterations) and (frame.batch <= 6).all()
    starts = frame.start_s.to_numpy()
    ends = starts + frame.prefill_s.to_numpy() + frame.decode_s.to_numpy()
    assert (starts[1:] >= ends[:-1] - 1e-9).all()  # one copy: iterations back to back or idle
    assert frame.admitted.sum() == sum(1 for s in result.served if not s.rejected)


def test_first_come_first_served_and_tokens_conserved(crowded):
    _, result = crowded
    done = sorted((s for s in result.served if not s.rejected), key=lambda s: s.request.id)
    admitted = [s.admitted_s for s in done]
    assert admitted == sorted(admitted)
    # every token is a prefill's first token or one decode step of one running request
    decoded = sum(it.batch for it in result.iterations)
    assert decoded + len(done) == sum(s.request.output_tokens for s in done)


# ------------------------------------------------------------------ copies behind one queue
def test_copies_behind_one_queue_pool_their_waiting():
    """Two copies of the model fed twice the rate wait less than one copy at the rate (one
    queue in front of two servers), and never run more than one request each at max batch 1;
    at a rate where requests never overlap, the copies change nothing."""
    prefill_s, step_s, output = 0.3, 0.05, 5
    service_s = prefill_s + (output - 1) * step_s
    mix = RequestMix(fixed(1000), fixed(output), count=20_000, seed=4)
    one = serve_requests(ConstantTimes(prefill_s, step_s), mix.requests(0.7 / service_s),
                         max_batch=1)
    two = serve_requests(ConstantTimes(prefill_s, step_s, copies=2),
                         mix.requests(1.4 / service_s), max_batch=1)
    assert two.requests_frame().queue_s.mean() < 0.6 * one.requests_frame().queue_s.mean()
    assert {it.copy for it in two.iterations} == {0, 1}
    busy = sorted((s.admitted_s, +1) for s in two.served) + sorted(
        (s.finish_s, -1) for s in two.served)
    in_service = np.cumsum([d for _, d in sorted(busy, key=lambda e: (e[0], e[1]))])
    assert in_service.max() <= 2
    assert two.summary()["busy_fraction"] == pytest.approx(0.7, rel=0.03)
    few = RequestMix(fixed(1000), fixed(output), count=200, seed=4)
    sparse = [serve_requests(ConstantTimes(prefill_s, step_s, copies=c), few.requests(1e-5),
                             max_batch=4).requests_frame() for c in (1, 3)]
    assert np.allclose(sparse[0].e2e_s, sparse[1].e2e_s)


def test_copies_share_the_host_in_their_step_times(h100x8):
    """Each copy's decode step is the simulator's with that many copies on the host: slower
    once the KV cache spills to the host the copies share."""
    profile, model = h100x8
    one = StepTimes(profile, model, "hybridgen")
    eight = StepTimes(profile, model, "hybridgen", data_parallel=8)
    assert eight.decode_cell(8, 131072) > 1.5 * one.decode_cell(8, 131072)
    assert eight.decode_cell(1, 4096) == pytest.approx(one.decode_cell(1, 4096), rel=1e-9)


# ------------------------------------------------------------------ step times vs the simulator
@pytest.fixture(scope="module")
def h100x8():
    return load_profile("hgx-h100x8-2socket-cxl"), get_model("llama-3.1-8b")


@pytest.fixture(scope="module")
def h100():
    return load_profile("h100-80gb-spr-cxl"), get_model("llama-3.1-8b")


def test_grid_brackets_every_value():
    for x in [1, 1.5, 2, 3, 7.9, 100, 1000.5, 32768, 10**6]:
        lo, hi = bracket(x, GRID_PER_OCTAVE)
        assert lo <= x <= hi and (lo == hi) == (x == lo)
        # neighbours on the grid: a step of 2^(1/4), or of one where rounding makes it more
        assert hi - lo <= 1 or hi / lo <= 2 ** (1 / GRID_PER_OCTAVE) + 0.01
    assert grid_point(8, 4) == 4 and grid_point(60, 4) == 32768


def test_a_request_alone_takes_its_prefill_and_each_of_its_steps(h100):
    """At a rate where requests never overlap, a request's TTFT is its prefill alone and its
    end-to-end time is that plus one batch-1 step at each context it passes through."""
    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    mix = RequestMix(fixed(4096), fixed(12), count=3, seed=0)
    frame = serve_requests(times, mix.requests(1e-3), max_batch=8).requests_frame()
    prefill = times.prefill_s(4096)
    steps = sum(times.decode_step_s(1, 4096 + k) for k in range(1, 12))
    assert np.allclose(frame.queue_s, 0.0)
    assert np.allclose(frame.ttft_s, prefill, rtol=1e-12)
    assert np.allclose(frame.e2e_s, prefill + steps, rtol=1e-12)


def test_interpolated_steps_match_the_simulator(h100):
    """Between grid cells a step is interpolated, or simulated where the cell is not
    bilinear: within 2% of the point simulated at its own batch and context (median far
    below), for a policy whose KV spills from HBM at some of these points."""
    profile, model = h100
    times = StepTimes(profile, model, "hybridgen")
    rng = np.random.default_rng(2)
    errors = []
    for _ in range(12):
        batch = int(rng.integers(1, 24))
        context = float(np.exp(rng.uniform(np.log(2_000), np.log(60_000))))
        exact = times.decode_cell(batch, round(context))
        errors.append(abs(times.decode_step_s(batch, context) / exact - 1))
    assert max(errors) < 0.02
    assert np.median(errors) < 0.002


def test_steps_at_the_memory_edge_match_the_simulator(h100):
    """Where the batch's KV cache nearly fills HBM the grid point above does not fit: the step
    is carried on from the two fine points below, within 0.5% of the point simulated."""
    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    batch, lo, hi = 24, 1_000, 1_000_000
    while hi - lo > 1:  # the longest mean context 24 sequences fit at
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if times.fits(batch, batch * mid) else (lo, mid)
    for context in (lo - 1, int(lo * 0.99), int(lo * 0.97)):
        exact = times.decode_cell(batch, context)
        assert times.decode_step_s(batch, context) == pytest.approx(exact, rel=0.005)


def test_interpolated_prefills_match_the_simulator(h100):
    """A prefill grows faster than its prompt (attention over every earlier token), so the
    chord between grid points lies above it, by little at eight points per doubling."""
    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    rng = np.random.default_rng(0)
    for _ in range(10):
        prompt = int(np.exp(rng.uniform(np.log(500), np.log(300_000))))
        exact = times.prefill_cell(prompt)
        assert exact <= times.prefill_s(prompt) * (1 + 1e-12) <= exact * 1.003


def test_a_grid_cell_is_the_simulators_settled_step(h100):
    """A cell is the last quarter of a run that ends at its context: the step the scheduler
    settles on, never the first steps from its starting ratio."""
    from hgsim.api import simulate
    from hgsim.serving import step_times

    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    steps = step_times.SETTLE_STEPS
    run = simulate(profile, model, "gpu_only", context=8192 - steps, batch=4, gen=steps,
                   samples=step_times.SETTLE_SAMPLES, accuracy=False)
    settled = [s.latency_s for s in run.steps if s.simulated]
    assert times.decode_cell(4, 8192) == pytest.approx(np.median(settled[-len(settled) // 4:]))


# ------------------------------------------------------------------ energy and cost
def test_energy_is_the_iterations_and_the_idle_draw_and_cost_follows(h100):
    """A run's joules are its iterations' (the cells' power times the step, the prefills'
    own) plus the machine's idle draw over the time it sat idle; its dollars per million
    tokens are the capital over the span plus those joules at the wall's price. Nearly idle,
    the average power is the idle draw."""
    from hgsim import tco

    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    mix = RequestMix(fixed(4096), fixed(12), count=20, seed=0)
    busy = serve_requests(times, mix.requests(5.0), max_batch=8)
    row = busy.summary()
    span, busy_s = row["span_s"], sum(it.prefill_s + it.decode_s for it in busy.iterations)
    iterations_j = sum(it.energy_j for it in busy.iterations)
    assert times.idle_power_w > 0 and iterations_j > times.idle_power_w * busy_s
    assert row["energy_j"] == pytest.approx(iterations_j + times.idle_power_w * (span - busy_s))
    tokens = 20 * 12
    assert row["energy_j_per_output_token"] == pytest.approx(row["energy_j"] / tokens)
    assert row["usd_per_mtok_capex"] == pytest.approx(
        tco.capex_usd_per_s(times.system) * span * 1e6 / tokens)
    assert row["usd_per_mtok_energy"] == pytest.approx(
        tco.electricity_usd_per_j(times.system) * row["energy_j"] * 1e6 / tokens)
    idle = serve_requests(times, mix.requests(1e-3), max_batch=8).summary()
    assert idle["power_w"] == pytest.approx(times.idle_power_w, rel=1e-3)


def test_a_cells_joules_are_the_simulators(h100):
    """At a grid point a step's joules are the settled step times the simulated run's average
    draw, and a prefill's are the simulated prefill's."""
    from hgsim.api import simulate
    from hgsim.serving import step_times

    profile, model = h100
    times = StepTimes(profile, model, "gpu_only")
    steps = step_times.SETTLE_STEPS
    run = simulate(profile, model, "gpu_only", context=8192 - steps, batch=4, gen=steps,
                   samples=step_times.SETTLE_SAMPLES, accuracy=False)
    watts = sum(run.energy_j.values()) / run.energy_window_s
    assert times.decode_step_j(4, 8192) == pytest.approx(times.decode_cell(4, 8192) * watts)
    prefill = simulate(profile, model, "gpu_only", context=8192, batch=1, gen=1, samples=1,
                       accuracy=False, prefill=True)
    assert times.prefill_j(8192) == pytest.approx(sum(prefill.prefill_energy_j.values()))


# ------------------------------------------------------------------ the rate search
def test_rate_search_finds_the_edge_of_the_slo():
    times = ConstantTimes(prefill_s=0.2, step_s=0.02, capacity_tokens=50_000)
    mix = RequestMix(fixed(8000), fixed(32), count=400, seed=2)
    slo = Slo(ttft_s=1.0, tpot_s=0.05, attainment=0.9)
    search = max_rate(times, mix, max_batch=8, slo=slo, tolerance=0.02)
    assert search.rate_per_s is not None and search.result.attainment >= 0.9
    failing = [rate for rate, share in search.probes if share < 0.9]
    assert min(r for r in failing if r > search.rate_per_s) <= search.rate_per_s * 1.02 + 1e-12


def test_rate_search_names_the_limit_the_slo_is_lost_to():
    """A tight TTFT and a loose TPOT: the queue in front of the prefills loses it. A loose
    TTFT and a TPOT just above a step: the prefills of arriving requests, which stall every
    running request's step, lose it (with long prefills they do even under a TPOT of five
    steps: the stalls come before the queue)."""
    mix = RequestMix(fixed(8000), fixed(32), count=300, seed=2)
    ttft = max_rate(ConstantTimes(prefill_s=0.5, step_s=0.01), mix, max_batch=16,
                    slo=Slo(ttft_s=2.0, tpot_s=1.0))
    assert ttft.bound_by == "ttft" and "missed TTFT" in ttft.bound_note
    tpot = max_rate(ConstantTimes(prefill_s=0.02, step_s=0.01), mix, max_batch=64,
                    slo=Slo(ttft_s=100.0, tpot_s=0.012))
    assert tpot.bound_by == "tpot" and ", 0% of requests missed TTFT" in tpot.bound_note
    stalls = max_rate(ConstantTimes(prefill_s=0.5, step_s=0.01), mix, max_batch=16,
                      slo=Slo(ttft_s=2.0, tpot_s=0.05))
    assert stalls.bound_by == "tpot"


def test_rate_search_says_when_no_rate_meets_the_slo():
    times = ConstantTimes(prefill_s=2.0, step_s=0.02)
    mix = RequestMix(fixed(8000), fixed(8), count=50)
    search = max_rate(times, mix, max_batch=8, slo=Slo(ttft_s=1.0))
    assert search.rate_per_s is None and "missed even at" in search.reason
    with pytest.raises(UserError, match="needs an SLO"):
        max_rate(times, mix, max_batch=8, slo=Slo())


@pytest.mark.parametrize("count", [1, 4, 20])
def test_rate_search_says_when_no_rate_limits_a_burst(count):
    """A loose SLO that even every request arriving at once meets: the search stops once they
    all arrive within 1% of one request's time alone (faster only squeezes the burst) and
    reports no rate, saying why, rather than the last of 30 doublings."""
    from hgsim.serving import BURST_SHARE, alone_s

    times = ConstantTimes(prefill_s=0.1, step_s=0.01)
    mix = RequestMix(fixed(8000), fixed(8), count=count, seed=1)
    search = max_rate(times, mix, max_batch=64, slo=Slo(ttft_s=100.0))
    assert search.rate_per_s is None and search.unbounded
    assert f"all {count} requests arriving at once" in search.reason
    top = max(rate for rate, _ in search.probes)
    arrivals = [r.arrival_s for r in mix.requests(top)]
    assert max(arrivals) - min(arrivals) <= BURST_SHARE * alone_s(times, mix)
    assert all(share >= 0.9 for _, share in search.probes)
    assert len(search.probes) < 30
    assert math.isnan(search.row({"policy": "x"}, 0)["max_rate_per_s"])


# ------------------------------------------------------------------ request mixes and traces
def test_every_rate_sees_the_same_requests_scaled_in_time():
    mix = RequestMix(LengthDist.parse("lognormal:16k:0.7", "p"), fixed(100), count=200, seed=9)
    slow, fast = mix.requests(0.5), mix.requests(2.0)
    assert [r.prompt_tokens for r in slow] == [r.prompt_tokens for r in fast]
    assert np.allclose([r.arrival_s for r in slow], [4 * r.arrival_s for r in fast])
    prompts = [r.prompt_tokens for r in mix.requests(1.0)]
    assert 0.85 < np.median(prompts) / 16384 < 1.15


@pytest.mark.parametrize(("text", "message"), [
    ("uniform:8k", "expected a token count"), ("uniform:9k:8k", "1 <= LO <= HI"),
    ("lognormal:8k:-1", "SIGMA"), ("lots", "lots"), ("0", "at least 1 token"),
])
def test_bad_lengths_are_one_line_naming_the_field(text, message):
    with pytest.raises(UserError, match=message) as caught:
        LengthDist.parse(text, "--prompt")
    assert str(caught.value).startswith("--prompt:") and "\n" not in str(caught.value)


def test_trace_rows_and_their_errors(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("arrival_s,prompt_tokens,output_tokens,user\n0,100,5,a\n0.5,2000,7,b\n")
    assert read_trace(good) == [Request(0, 0.0, 100, 5), Request(1, 0.5, 2000, 7)]
    # a spreadsheet's trailing comma: an unnamed column, its cells empty
    padded = tmp_path / "padded.csv"
    padded.write_text("arrival_s,prompt_tokens,output_tokens,,\n0,100,5,,\n0.5,2000,7\n")
    assert read_trace(padded) == read_trace(good)
    cases = {
        "arrival_s,prompt_tokens\n0,1\n": ":1: needs the columns",
        "arrival_s,prompt_tokens,output_tokens\n0,1,1\n0,x,1\n": ":3: prompt_tokens: expected",
        "arrival_s,prompt_tokens,output_tokens\n1,1,1\n0.5,1,1\n": ":3: arrival_s: must not be",
        "arrival_s,prompt_tokens,output_tokens\n0,1,0\n": ":2: output_tokens: must be at least",
        "arrival_s,prompt_tokens,output_tokens\n": "has no requests",
        # token counts are whole numbers; the first arrival has no row above it
        "arrival_s,prompt_tokens,output_tokens\n0,1e3,1\n":
            ":2: prompt_tokens: expected a whole number, got '1e3'",
        "arrival_s,prompt_tokens,output_tokens\n0,4096.5,1\n":
            ":2: prompt_tokens: expected a whole number, got '4096.5'",
        # digits as a CSV writer writes them (int() and float() read these too)
        "arrival_s,prompt_tokens,output_tokens\n0,1_000,1\n":
            ":2: prompt_tokens: expected a whole number, got '1_000'",
        "arrival_s,prompt_tokens,output_tokens\n0,\uff11\uff12,1\n":
            ":2: prompt_tokens: expected a whole number, got '\uff11\uff12'",
        "arrival_s,prompt_tokens,output_tokens\n1_0.5,1,1\n":
            ":2: arrival_s: expected a number of seconds, got '1_0.5'",
        "arrival_s,prompt_tokens,output_tokens\n-1,1,1\n":
            r":2: arrival_s: must be >= 0 \(seconds from the start\), got -1",
        "arrival_s,prompt_tokens,output_tokens\nnan,1,1\n": ":2: arrival_s: must be a finite",
        "arrival_s,prompt_tokens,output_tokens\n2,1,1\n1,1,1\n":
            r":3: arrival_s: must not be before the row above \(2\), got 1",
        # malformed files: a column named twice, a row longer than the header
        "arrival_s,prompt_tokens,output_tokens,arrival_s\n0,1,1,5\n":
            ":1: the header names the column 'arrival_s' twice",
        "arrival_s,prompt_tokens,output_tokens\n0,1,1\n0,1,1,7\n":
            ":3: 4 fields, more than the header's 3",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=message) as caught:
            read_trace(bad)
        assert str(caught.value).startswith(f"{bad}:") and "\n" not in str(caught.value)
    with pytest.raises(UserError, match="cannot read it"):
        read_trace(tmp_path / "missing.csv")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"arrival_s,prompt_tokens,output_tokens\n\xff\xfe")
    with pytest.raises(UserError, match=r"b.csv:2: not a text file \(byte 0xff"):
        read_trace(binary)


# ------------------------------------------------------------------ the command line
SERVE = ["serve", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b",
         "--policy", "gpu_only", "--prompt", "4k", "--output", "16", "--requests", "40"]


def test_serve_prints_percentiles_and_writes_each_request(tmp_path, capsys):
    from hgsim.cli import main

    out = tmp_path / "requests.csv"
    assert main([*SERVE, "--rate", "2", "--slo-ttft", "5", "--requests-csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TTFT" in text and "of requests met it" in text
    import pandas as pd

    frame = pd.read_csv(out)
    assert len(frame) == 40 and {"ttft_s", "tpot_s", "queue_s"} <= set(frame.columns)


def test_serve_json_with_requests_csv_keeps_stdout_one_json_document(tmp_path, capsys):
    from hgsim.cli import main

    out = tmp_path / "r2.csv"
    assert main([*SERVE, "--rate", "2", "--requests", "3", "--json", "--no-progress",
                 "--requests-csv", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["completed"] == 3
    assert captured.err == f"3 requests written to {out}\n"
    assert len(out.read_text().splitlines()) == 1 + 3


@pytest.mark.parametrize("extra", [["--prompt", "4k"], ["--output", "256"],
                                   ["--requests", "500"], ["--seed", "0"]])
def test_serve_a_trace_takes_no_drawn_requests(tmp_path, capsys, extra):
    """A trace's rows are the requests: --prompt, --output, --requests and --seed were
    silently ignored beside it (a default's value given is refused too: it was given)."""
    from hgsim.cli import main

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n")
    argv = ["serve", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b", "--policy",
            "gpu_only", "--no-progress", "--trace", str(trace)]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {extra[0]}: a trace's rows set the requests" in err
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 1


@pytest.mark.parametrize("kwargs", [{"prompt": "32k"}, {"output": 8}, {"requests": 3},
                                    {"seed": 0}])
def test_api_serve_a_trace_takes_no_drawn_requests(tmp_path, kwargs):
    from hgsim import api

    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,4\n0.5,200,3\n")
    with pytest.raises(UserError, match="a trace's rows set the requests") as caught:
        api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", trace=trace, **kwargs)
    assert caught.value.field == next(iter(kwargs))
    served = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", trace=trace)
    assert served.requests_frame().prompt_tokens.tolist() == [100, 200]


def test_serve_refuses_to_write_the_requests_over_its_trace(tmp_path, capsys, monkeypatch):
    from hgsim.cli import main

    trace = tmp_path / "t.csv"
    text = "arrival_s,prompt_tokens,output_tokens\n0,100,4\n"
    trace.write_text(text)
    (tmp_path / "link.csv").symlink_to(trace)
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b", "--policy",
            "gpu_only", "--no-progress", "--trace", "t.csv", "--requests-csv"]
    for same in ("t.csv", str(trace), "./t.csv", "link.csv"):
        assert main([*argv, same]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error: --requests-csv: " in err and "--trace" in err
        assert trace.read_text() == text  # the input untouched
    assert main([*argv, "out.csv"]) == 0
    assert trace.read_text() == text and (tmp_path / "out.csv").exists()


def test_serve_says_why_when_every_request_is_rejected(capsys, monkeypatch):
    """1M-token prompts do not fit an H100 beside an 8B model: every request is rejected.
    The run says why, and its rates of completed work are 0 over the span of the arrivals
    it refused (not NaN); latencies stay undefined (null in JSON, "-" in the table)."""
    from hgsim import api
    from hgsim.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    argv = [*SERVE[:SERVE.index("--prompt")], "--prompt", "1M", "--output", "8", "--requests",
            "20", "--rate", "1", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    assert captured.err.startswith(
        "hgsim serve: note: all 20 requests rejected: its 1048576-token prompt is longer than "
        "any whose KV fits beside the HBM its prefill needs (")
    assert len(captured.err.strip().splitlines()) == 1
    served = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", rate=1, prompt="1M",
                       output=8, requests=20)
    arrivals = served.requests_frame().arrival_s
    assert row["span_s"] == pytest.approx(arrivals.max() - arrivals.min(), rel=1e-12)
    assert row["completed"] == 0 and row["rejected"] == 20
    assert row["requests_per_s"] == row["output_tokens_per_s"] == row["busy_fraction"] == 0.0
    assert row["ttft_mean_s"] is None and row["mean_batch"] is None
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "nan" not in captured.out and "all 20 requests rejected" in captured.err
    assert "no output token to charge it to" in captured.out
    # one request: no span to count a rate over, so the rates stay undefined
    alone = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", rate=1, prompt="1M",
                      output=8, requests=1).summary()
    assert alone["completed"] == 0 and math.isnan(alone["requests_per_s"])


def test_serve_tables_keep_every_number_whole_in_80_columns(capsys, monkeypatch):
    """Piped, rich lays tables out in 80 columns and cut numbers to "0.25…" to fit: every
    number of the JSON row is printed whole, and the rate's header says its unit."""
    from hgsim.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    argv = [*SERVE, "--rate", "0.25", "--requests", "20", "--no-progress"]
    assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "requests/s" in out
    cells = [f"{row['output_tokens_per_s']:.4g}", f"{row['requests_per_s']:.4g}",
             f"{row['mean_batch']:.3g}", f"{row['ttft_p99_s']:.4g}", f"{row['e2e_mean_s']:.4g}",
             f"{row['tpot_p50_s'] * 1e3:.4g}"]
    assert all(f" {cell} " in out for cell in cells), (cells, out)


def test_serve_names_the_copies(capsys):
    from hgsim.cli import main

    argv = [*SERVE, "--rate", "4", "--data-parallel", "4", "--gpu-placement", "spread"]
    argv[argv.index("h100-80gb-spr-cxl")] = "hgx-h100x8-2socket-cxl"
    assert main(argv) == 0
    assert "4 copies (spread)" in capsys.readouterr().out


def test_serve_json_and_find_rate(capsys):
    from hgsim.cli import main

    assert main([*SERVE, "--find-rate", "--slo-ttft", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["max_rate_per_s"] > 0 and row["slo_attainment"] >= 0.9
    assert row["rate_per_s"] == pytest.approx(row["max_rate_per_s"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--rate", "0"], "--rate: must be a positive number"),
    (["--rate", "1", "--max-batch", "0"], "--max-batch: must be >= 1"),
    (["--find-rate"], "--find-rate: searches the highest rate meeting an SLO"),
    (["--rate", "1", "--prompt", "uniform:3"], "--prompt:"),
    (["--rate", "1", "--slo-ttft", "5", "--attainment", "1.5"],
     "--attainment: must be in [0, 1]"),
    # a share of requests meeting an SLO, and no SLO: else silently nothing
    (["--rate", "1", "--attainment", "0.5"], "--attainment: is the share of requests that "
                                              "must meet an SLO"),
    (["--trace", "/nonexistent/t.csv"], "cannot read it"),
    (["--rate", "1", "--requests", "0"], "--requests: must be between 1 and 1,000,000"),
    (["--rate", "1", "--requests", "1000001"], "--requests: must be between 1 and 1,000,000"),
    # requests are counted, not tokens: no k/M suffix (2k would be 2048), no fraction
    (["--rate", "1", "--requests", "1G"], "--requests: expected a whole number of requests, "
                                          "got '1G'"),
    (["--rate", "1", "--requests", "2.5"], "--requests: expected a whole number of requests, "
                                           "got '2.5'"),
    (["--rate", "1", "--requests", "-3"], "--requests: must be between 1 and 1,000,000, got -3"),
    # Python refuses to read over 4300 digits as an int (the CLI fuzz found it: ValueError)
    (["--rate", "1", "--requests", "9" * 5000], "--requests: got a 5000-digit number; a count "
                                                "of requests has at most 18 digits"),
    (["--rate", "1", "--prompt", "9" * 400], "--prompt: '999999999999999999999999'... is too "
                                             "large a count (at most 2^62)"),
    # a long value is quoted cut (was quoted whole: a line of 5000 characters)
    (["--rate", "1", "--prompt", "x" * 5000], "error: --prompt: expected a count such as 4096 "
     f"or 32k, got '{'x' * 40}'...(5,000 characters) (in '{'x' * 40}'...(5,000 characters))\n"),
    (["--rate", "1", "--prompt", "lognormal:1k:" + "9" * 5000], "error: --prompt: SIGMA must "
     f"be a number in [0, 4], got '{'9' * 40}'...(5,000 characters) (in 'lognormal:1k:"
     f"{'9' * 27}'...(5,013 characters))\n"),
    (["--rate", "1", "--turns", "2", "--followup", "9" * 5000], "error: --followup: "
     f"'{'9' * 24}'... is too large a count (at most 2^62) (in '{'9' * 40}'...(5,000 "
     "characters))\n"),
    (["--rate", "1", "--turns", "2", "--kv-offload-gb", "1", "--kv-offload-tier", "x" * 5000],
     "error: --kv-offload-tier: expected a host memory tier of h100-80gb-spr-cxl (ddr0, "
     f"cxl0), got '{'x' * 40}'...(5,000 characters)\n"),
    (["--rate", "1", "--option", "x" * 5000 + "=1"], f"error: --option {'x' * 40}...(5,000 "
     f"characters): policy 'gpu_only' has no option '{'x' * 40}'...(5,000 characters) (its "
     "options: "),
    (["--rate", "1", "--policy", "x" * 5000], f"error: --policy: unknown policy '{'x' * 40}'..."
     "(5,000 characters); known: hybridgen, "),
    # a chunk past any prompt: its lattice point was a step at a context past 10^12, refused
    # mid-run (TypeError out of simpy; the CLI fuzz found it with conversations)
    (["--rate", "2", "--output", "4", "--requests", "2", "--turns", "3", "--followup", "256",
      "--think", "1", "--prefill-chunk", "999999999745"], "error: --prefill-chunk: at most "
     "4294967296 tokens (the longest a prompt may be), got 999999999745\n"),
    (["--rate", "1", "--slo-ttft", "-1"], "--slo-ttft: must be >= 0, got -1"),
    (["--rate", "1", "--slo-tpot-ms", "-5"], "--slo-tpot-ms: must be >= 0, got -5"),
    (["--rate", "1", "--output", "2M"], "--output: at most 1048576 tokens"),
    # a prompt past the simulator's plausible workload (the fuzz found it: 924575386328)
    (["--rate", "1", "--prompt", "924575386328"], "--prompt: at most 4294967296 tokens"),
    (["--rate", "1e-320"], "--rate: 1e-320 requests per second puts arrivals beyond"),
    (["--trace", "/dev/zero"], "not a regular file"),
    (["--rate", "1", "--gpu-placement", "spread"], "--gpu-placement: spread places copies"),
    (["--rate", "1", "--data-parallel", "2"], "--data-parallel: 2 replicas x tensor_parallel 1"),
    (["--rate", "1", "--tensor-parallel", "2"], "--tensor-parallel: 2 ranks need 2 GPUs"),
])
def test_serve_bad_input_is_one_line_exit_2(extra, message, capsys):
    from hgsim.cli import main

    base = SERVE[:SERVE.index("--prompt")] if "--trace" in extra else SERVE  # rows: requests
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_api_serve_gives_the_command_lines_numbers(capsys):
    from hgsim import api
    from hgsim.cli import main

    assert main([*SERVE, "--rate", "3", "--slo-tpot-ms", "20", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    result = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", rate=3, prompt="4k",
                       output=16, requests=40, slo_tpot_s=0.02)
    summary = result.summary()
    for key in ("ttft_p99_s", "tpot_p50_s", "output_tokens_per_s", "slo_attainment"):
        assert summary[key] == pytest.approx(row[key], rel=1e-12)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "rate"), ({"rate": 1, "find_rate": True}, "rate"), ({"rate": -1}, "rate"),
    ({"rate": 1, "max_batch": 0}, "max_batch"), ({"rate": 1, "slo_ttft_s": math.nan},
                                                 "slo_ttft_s"),
    ({"find_rate": True}, "find_rate"), ({"rate": 1, "attainment": 0}, "attainment"),
    ({"rate": 1, "prompt": "big"}, "prompt"),
    # checked before the first request: inside the simulated server they surfaced mid-run
    ({"rate": 1, "options": {"nope": 1}}, "policy_options.nope"),
    ({"rate": 1, "policy": "hybridgen", "options": {"topk_ratio": 5}},
     "policy_options.topk_ratio"),
    ({"rate": 1, "options": [1]}, "options"), ({"rate": 1, "kv_dtype": "int4"}, "kv_dtype"),
    ({"rate": 1, "weight_dtype": "int3"}, "weight_dtype"),
    ({"rate": 1, "data_parallel": 2}, "data_parallel"),
    ({"rate": 1, "tensor_parallel": 2}, "tensor_parallel"),
    ({"rate": 1, "prefill_chunk": "2.5"}, "prefill_chunk"),
    ({"rate": 1, "prefill_chunk": 8}, "prefill_chunk"),
])
def test_api_serve_bad_arguments_name_the_argument(kwargs, field):
    from hgsim import api

    given = {"policy": "gpu_only", "prompt": "4k", "output": 8, "requests": 3, **kwargs}
    with pytest.raises(UserError) as caught:
        api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", **given)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and "\n" not in str(caught.value)


def test_api_serve_takes_the_prefill_chunk_as_the_command_line_does():
    from hgsim import api

    run = {"rate": 1, "prompt": "4k", "output": 8, "requests": 3}
    spelled = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", prefill_chunk="2k",
                        **run)
    counted = api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only", prefill_chunk=2048,
                        **run)
    assert spelled.summary()["prefill_chunk"] == 2048
    assert spelled.summary()["ttft_mean_s"] == counted.summary()["ttft_mean_s"]


@pytest.mark.parametrize("error", [
    UserError("bad\nvalue", source="t.csv:3", field="prompt_tokens"),
    OptionError("topk_ratio", "input should be less than or equal to 1", unknown=False),
    TraceTooLarge(2e10, 1e6, 20_000, 1e9),
])
def test_user_errors_survive_a_simulated_process_and_pickling(error):
    """simpy re-raises a process's error as ``type(exc)(*exc.args)`` and pickle rebuilds it
    the same way: each user error comes back whole, not as a TypeError."""
    import pickle

    import simpy

    def fail(env):
        yield env.timeout(1)
        raise error

    env = simpy.Environment()
    env.process(fail(env))
    with pytest.raises(type(error)) as caught:
        env.run()
    for copy in (caught.value, pickle.loads(pickle.dumps(error))):
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)
    assert str(error).count("\n") == 0


def test_an_error_of_any_kind_inside_the_server_surfaces_as_itself():
    """simpy rebuilds a process's error from its args, which pydantic's ValidationError cannot
    survive: it surfaced as a TypeError from inside simpy (the CLI fuzz found one)."""
    from pydantic import BaseModel, ValidationError

    class Spec(BaseModel):
        n: int

    class Refusing(ConstantTimes):
        def decode_step(self, batch, mean_context):
            Spec(n="not a number")

    requests = RequestMix(fixed(10), fixed(4), count=2, seed=0).requests(1.0)
    with pytest.raises(ValidationError, match="valid integer"):
        run_server(Refusing(0.0, 0.01), requests, max_batch=4)

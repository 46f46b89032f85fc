"""Conversations and the prefix cache: later turns arrive a think time after the turn before
has finished, a retained prefix is prefilled no more, the cache evicts least recently used,
and a refused turn ends its conversation."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from hgsim.catalog import get_model
from hgsim.errors import UserError
from hgsim.policies import make_policy
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.serving import KvOffload, Request, RequestMix, StepTimes, kv_offload, serve_requests
from hgsim.serving.kv_offload import KvStore
from hgsim.serving.requests import LengthDist
from hgsim.serving.server import run_server
from hgsim.serving.step_times import PREFILL_GRID_PER_OCTAVE, bracket
from hgsim.sim.decode import PAST_ON_HOST, PrefillChunk
from hgsim.simulate import new_engine
from hgsim.workload import Workload

PROFILE = "h100-80gb-spr-cxl"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def machine():
    return load_profile(PROFILE), get_model(MODEL)


def small_hbm(profile, gb: float):
    """``profile`` with every GPU's HBM cut to ``gb`` (a few conversations' KV fit)."""
    return profile_with_overrides(profile, {f"gpus.{name}.hbm_capacity_gb": gb
                                            for name in profile.gpus})


def conversation(c: int, first_id: int, arrival_s: float, turns: list[tuple[int, int]],
                 think_s: float) -> list[Request]:
    """A conversation's requests: ``turns`` of (new tokens, output tokens), each later turn
    sending the conversation so far."""
    requests, prompt, output = [], 0, 0
    for turn, (new, out) in enumerate(turns):
        prefix = prompt + output if turn else 0
        prompt, output = prefix + new, out
        requests.append(Request(first_id + turn, arrival_s if turn == 0 else math.nan, prompt,
                                output, c, turn, prefix, think_s if turn else 0.0))
    return requests


def by_id(result):
    return {s.request.id: s for s in result.served}


# ------------------------------------------------------------------ the requests
def test_a_mix_of_conversations_repeats_each_turn_before_it():
    mix = RequestMix(LengthDist.parse("8k", "p"), LengthDist.parse("uniform:10:50", "o"),
                     count=20, seed=3, turns=3, followup=LengthDist.parse("512", "f"),
                     think_s=5.0)
    requests = mix.requests(2.0)
    assert len(requests) == 60 and [r.id for r in requests] == list(range(60))
    one_turn = RequestMix(mix.prompt, mix.output, count=20, seed=3).requests(2.0)
    assert [r for r in requests if r.turn == 0] == [
        Request(r.id * 3, r.arrival_s, r.prompt_tokens, r.output_tokens, r.id, 0)
        for r in one_turn]  # the first turns are the one-turn mix's requests
    for before, after in zip(requests, requests[1:], strict=False):
        if after.turn:
            assert after.conversation == before.conversation and after.turn == before.turn + 1
            assert after.prefix_tokens == before.prompt_tokens + before.output_tokens
            assert after.prompt_tokens == after.prefix_tokens + 512
            assert math.isnan(after.arrival_s) and after.think_s >= 0
    thinks = [r.think_s for r in requests if r.turn]
    assert 2.0 < np.mean(thinks) < 10.0  # exponential, mean 5 s


@pytest.mark.parametrize("field, kwargs", [
    ("turns", {"turns": 0}), ("turns", {"turns": 1001}), ("turns", {"turns": 2.5}),
    ("think_s", {"think_s": -1.0}), ("think_s", {"think_s": math.nan}),
    ("turns", {"turns": 1000, "count": 2000}),
])
def test_bad_conversations_are_refused_naming_the_field(field, kwargs):
    with pytest.raises(UserError) as err:
        RequestMix(LengthDist.parse("1k", "p"), LengthDist.parse("8", "o"),
                   **{"count": 10, **kwargs})
    assert err.value.field == field


# ------------------------------------------------------------------ the prefix cache
@pytest.mark.parametrize("chunk", [None, 512])
def test_a_retained_prefix_is_not_prefilled_again(machine, chunk):
    """On an idle machine a later turn arrives its think time after the turn before has
    finished; with the cache its first token is the new tokens' prefill over the retained
    past (the chunks from the prefix on), without it the whole prompt's."""
    profile, model = machine
    requests = conversation(0, 0, 0.0, [(6000, 16), (700, 16), (900, 4)], think_s=7.0)
    times = StepTimes(profile, model, "gpu_only", prefill_chunk=chunk,
                      longest_prompt=requests[-1].prompt_tokens)
    for cache in (True, False):
        served = by_id(serve_requests(times, requests, max_batch=8, prefix_cache=cache))
        for turn in (1, 2):
            s, before = served[turn], served[turn - 1]
            r = s.request
            assert s.request.arrival_s == pytest.approx(before.finish_s + 7.0, abs=1e-9)
            assert s.cached_tokens == (r.prefix_tokens if cache else 0)
            if chunk is None:
                expected = (times.mixed_step(0, 0.0, r.prefix_tokens, r.prompt_tokens
                                             - r.prefix_tokens)[0] if cache
                            else times.prefill_s(r.prompt_tokens))
            else:
                start = r.prefix_tokens if cache else 0
                expected = sum(times.mixed_step(0, 0.0, past, min(chunk, r.prompt_tokens - past))[0]
                               for past in range(start, r.prompt_tokens, chunk))
            assert s.first_token_s - r.arrival_s == pytest.approx(expected, rel=1e-12)
        if cache:
            hit_ttft = served[1].first_token_s - served[1].request.arrival_s
        else:
            assert served[1].first_token_s - served[1].request.arrival_s > 3 * hit_ttft


def test_the_cache_evicts_the_least_recently_used_conversation(machine):
    """With room for the KV of two conversations but not three, the third's admission evicts
    the first's (least recently used): the second's next turn hits, the first's misses."""
    profile, model = machine
    times = StepTimes(small_hbm(profile, 22.0), model, "gpu_only", longest_prompt=40_000)
    lo, hi = 1, 1 << 20  # the most KV tokens one sequence holds
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if times.fits(1, mid) else (lo, mid)
    final = lo * 2 // 5  # two fit beside a third's reservation, three do not
    assert times.fits(1, 2 * final) and not times.fits(1, 3 * final)
    prompt = final - 8
    requests = (conversation(0, 0, 0.0, [(prompt, 8), (100, 8)], think_s=400.0)
                + conversation(1, 2, 100.0, [(prompt, 8), (100, 8)], think_s=200.0)
                + conversation(2, 4, 200.0, [(prompt, 8)], think_s=0.0))
    served = by_id(serve_requests(times, requests, max_batch=8))
    assert all(not s.rejected for s in served.values())
    assert served[3].cached_tokens == final  # conversation 1's second turn: a hit
    assert served[1].cached_tokens == 0  # conversation 0's: evicted for conversation 2
    assert served[1].request.arrival_s > served[3].request.arrival_s


def test_a_refused_turn_refuses_the_rest_of_its_conversation(machine):
    profile, model = machine
    times = StepTimes(small_hbm(profile, 22.0), model, "gpu_only", prefill_chunk=512,
                      longest_prompt=1 << 20)
    big = next(n for n in range(4_000, 1 << 20, 1_000) if not times.fits(1, n))
    requests = (conversation(0, 0, 0.0, [(big - 3_000, 8), (4_000, 8), (10, 8)], 1.0)
                + conversation(1, 3, 0.5, [(1_000, 8), (10, 8)], 1.0))
    result = serve_requests(times, requests, max_batch=8)
    served = by_id(result)
    assert len(result.served) == len(requests)  # every request is accounted for
    # (the reserve is for the longest prompt that fits alone: a longer one is refused)
    assert not served[0].rejected and "longer than any whose KV fits" in served[1].rejected
    assert served[2].rejected == "an earlier turn of its conversation was refused"
    assert not served[3].rejected and not served[4].rejected
    assert served[4].cached_tokens == served[4].request.prefix_tokens  # the others go on


def test_a_later_turn_goes_to_the_copy_that_holds_its_kv(machine):
    model = machine[1]
    mix = RequestMix(LengthDist.parse("4k", "p"), LengthDist.parse("16", "o"), count=12,
                     turns=3, followup=LengthDist.parse("256", "f"), think_s=2.0)
    requests = mix.requests(1.0)
    times = StepTimes(load_profile("hgx-h100x8-2socket-cxl"), model, "gpu_only", data_parallel=2,
                      longest_prompt=max(r.prompt_tokens for r in requests))
    result = serve_requests(times, requests, max_batch=4)
    frame = result.requests_frame()
    assert len(frame) == 36 and (frame.rejected == "").all()
    later = frame[frame.turn > 0]
    # each later turn waited for the copy that held its conversation's KV: every one a hit
    assert (later.cached_tokens == later.prompt_tokens - 256).all()
    assert {it.copy for it in result.iterations if it.admitted} == {0, 1}  # both served
    # without the cache a later turn goes to the first copy with room, as any request
    plain = serve_requests(times, requests, max_batch=4, prefix_cache=False)
    assert (plain.requests_frame().rejected == "").all()
    row = result.summary()
    assert row["prefix_cached_fraction"] == pytest.approx(
        later.cached_tokens.sum() / frame.prompt_tokens.sum())
    # a first turn's TTFT and a later one's, apart
    for stem, part in (("ttft_first", frame[frame.turn == 0]), ("ttft_later", later)):
        assert row[f"{stem}_mean_s"] == pytest.approx(part.ttft_s.mean(), rel=1e-12)
        assert row[f"{stem}_p90_s"] == pytest.approx(np.percentile(part.ttft_s, 90), rel=1e-12)
    assert row["ttft_later_mean_s"] < row["ttft_first_mean_s"]


def test_a_later_turn_waits_for_its_copy_at_most_the_affinity_wait(machine):
    """Two copies; conversation 0's first turn runs on copy 0, and just before its second
    turn arrives a short request keeps copy 1 busy a moment (so copy 0, idle longest, takes
    the next) and a 60k-token prompt lands on copy 0. Strict affinity: the second turn waits
    for copy 0 to prefill the long prompt, then hits its cache. With a 0.1 s affinity wait it
    goes to idle copy 1 exactly 0.1 s after it arrives, prefills its whole prompt there, and
    copy 0 drops the conversation's KV; its third turn then goes to copy 1."""
    model = machine[1]
    times = StepTimes(load_profile("hgx-h100x8-2socket-cxl"), model, "gpu_only",
                      data_parallel=2, longest_prompt=60_000)
    chat = conversation(0, 0, 0.0, [(4_000, 4), (500, 4), (100, 4)], 1.0)
    first = run_server(times, chat, max_batch=4, copies=2).served[0]
    assert first.copy == 0
    short = Request(3, first.finish_s + 0.5, 1_000, 2)
    long = Request(4, first.finish_s + 0.9, 60_000, 4)
    requests = [*chat, short, long]
    strict = by_id(serve_requests(times, requests, max_batch=4))
    assert strict[3].copy == 1 and strict[4].copy == 0 and strict[3].finish_s < long.arrival_s
    assert strict[1].copy == strict[2].copy == 0
    assert strict[1].cached_tokens == strict[1].request.prefix_tokens
    assert strict[1].admitted_s >= strict[4].admitted_s + times.prefill_s(60_000) * 0.99
    served = run_server(times, requests, max_batch=4, copies=2, affinity_wait_s=0.1).served
    waited = by_id(SimpleNamespace(served=served))
    assert waited[4].copy == 0 and waited[1].copy == 1 and waited[2].copy == 1
    assert waited[1].admitted_s == pytest.approx(waited[1].request.arrival_s + 0.1, abs=1e-9)
    assert waited[1].cached_tokens == 0 and waited[2].cached_tokens > 0
    # an infinite wait is strict affinity, request for request
    same = run_server(times, requests, max_batch=4, copies=2, affinity_wait_s=math.inf)
    assert [(s.admitted_s, s.copy) for s in same.served] == [
        (strict[s.request.id].admitted_s, strict[s.request.id].copy) for s in same.served]


def test_without_affinity_a_turn_hits_only_where_its_kv_is(machine):
    """A 0 s affinity wait: a later turn goes to the first copy with room; it hits the cache
    only on the copy that served its conversation's turn before (and then always)."""
    model = machine[1]
    mix = RequestMix(LengthDist.parse("4k", "p"), LengthDist.parse("16", "o"), count=16,
                     turns=3, followup=LengthDist.parse("256", "f"), think_s=1.0)
    requests = mix.requests(2.0)
    times = StepTimes(load_profile("hgx-h100x8-2socket-cxl"), model, "gpu_only",
                      data_parallel=2, longest_prompt=max(r.prompt_tokens for r in requests))
    served = run_server(times, requests, max_batch=4, copies=2, affinity_wait_s=0.0).served
    turns = {(s.request.conversation, s.request.turn): s for s in served}
    moved = 0
    for (c, turn), s in turns.items():
        assert not s.rejected
        if turn:
            before = turns[(c, turn - 1)]
            if s.copy != before.copy:
                moved += 1
                assert s.cached_tokens == 0
    assert moved > 0


# ------------------------------------------------------------------ the step with a cached past
@pytest.mark.parametrize("policy", ["gpu_only", "flexgen", "hybridgen"])
@pytest.mark.parametrize("chunk", [2048, None])
def test_a_chunk_past_off_the_lattice_reads_between_lattice_points(machine, policy, chunk):
    """A cache hit's past (or a packed prompt's resumption) is any number: read between the
    chunk lattice's points around it (without chunks, the prefill grid's), within 0.1% of the
    step simulated at that past (the chunk's attention and read-back are linear in it)."""
    profile, model = machine
    times = StepTimes(profile, model, policy, prefill_chunk=chunk, longest_prompt=70_000)
    for batch, context, past, tokens in ((0, 0.0, 33_333, 1024), (8, 20_000.0, 33_333, 1024),
                                         (16, 30_000.0, 45_555, 2048), (8, 20_000.0, 700, 2048)):
        lo, hi = times.past_bracket(past)
        assert lo < past < hi
        assert (lo, hi) == ((past // 2048 * 2048, past // 2048 * 2048 + 2048) if chunk
                            else bracket(past, PREFILL_GRID_PER_OCTAVE))
        read = times.mixed_step(batch, context, past, tokens)[0]
        exact = times._mixed_step(batch, context, past, tokens)[0]
        assert read == pytest.approx(exact, rel=1e-3)
    # on the chunk lattice, the step itself
    if chunk:
        assert times.mixed_step(4, 9_000.0, 4096, 2048) == times._mixed_step(4, 9_000.0, 4096,
                                                                              2048)


# ------------------------------------------------------------------ the host KV store
def test_the_store_keeps_the_most_recently_used_within_its_bytes():
    store = KvStore(capacity_bytes=100.0, bytes_per_token=10.0)
    store.put(1, 4)
    store.put(2, 4)
    assert store.get(1) == 4  # 1 is now the most recent
    store.put(3, 4)  # 120 bytes: the least recently used (2) goes
    assert list(store.held) == [1, 3] and store.used_bytes == 80.0
    store.put(1, 6)  # a later turn replaces the earlier one: 100 bytes, all kept
    assert store.held == {3: 4, 1: 6} and store.used_bytes == 100.0
    store.put(4, 11)  # larger than the store: not kept, nothing evicted
    assert store.get(4) == 0 and store.used_bytes == 100.0
    store.put(1, 11)  # nor a conversation that outgrew it (its old turn is gone)
    assert store.held == {3: 4} and store.used_bytes == 40.0


def test_a_stored_past_crosses_pcie_once_from_its_tier(machine):
    """A chunk alone whose past is in the store reads it all back host-to-device, every layer
    (past x K+V bytes a layer), from the store's tier alone, and takes at least that at the
    slower of PCIe and the tier; where the past is in HBM nothing crosses."""
    profile, model = machine
    past, tokens = 16384, 1024
    workload = Workload(batch=1, context=past + tokens, gen=1)
    plan = replace(make_policy("gpu_only", model, profile, workload, {}).step_plan(
        past + tokens), batch=0)
    kv_layer = model.kv_bytes_per_token_layer("fp16")
    times = {}
    for tier in (None, "ddr0", "cxl0"):
        engine = new_engine(profile, model, workload)
        measure = engine.step(plan, PrefillChunk(past, tokens, tier))
        moved = engine.machine.recorder.bytes_by_resource()
        h2d = moved.get("gpu0.h2d", 0.0)
        times[tier] = measure.latency_s
        if tier is None:
            assert h2d == 0.0
            continue
        total = plan.num_layers * past * kv_layer
        assert h2d == pytest.approx(total, rel=1e-12)
        other = {"ddr0": "cxl0", "cxl0": "ddr0"}[tier]
        assert moved.get(f"{tier}.read", 0.0) == pytest.approx(total, rel=1e-12)
        assert not moved.get(f"{other}.read", 0.0)
        rate_gbps = min(profile.links["pcie0"].bandwidth_gbps,
                        profile.tiers[tier].read_bandwidth_gbps)
        assert measure.latency_s >= total / (rate_gbps * 1e9)
    assert times[None] < times["ddr0"] < times["cxl0"]


def test_kv_offload_is_checked_against_the_profile_and_the_policy(machine):
    profile, _ = machine
    assert kv_offload(profile, "gpu_only", 0) is None
    assert kv_offload(profile, "gpu_only", 256) == KvOffload(256.0, "ddr0")
    assert kv_offload(profile, "gpu_only", 64, "cxl0") == KvOffload(64.0, "cxl0")
    for policy, gb, tier, field, words in [
            ("hybridgen", 64, None, "kv_offload_gb", "keeps KV in host memory"),
            ("gpu_only", -1, None, "kv_offload_gb", ">= 0"),
            ("gpu_only", math.inf, None, "kv_offload_gb", ">= 0"),
            ("gpu_only", 64, "gpu0", "kv_offload_tier", "host memory tier"),
            ("gpu_only", 64, "ddr9", "kv_offload_tier", "ddr0, cxl0"),
            ("gpu_only", 1e6, "cxl0", "kv_offload_gb", "more than cxl0"),
            ("gpu_only", 0, "cxl0", "kv_offload_tier", "asks for none")]:
        with pytest.raises(UserError) as err:
            kv_offload(profile, policy, gb, tier)
        assert err.value.field == field and words in str(err.value), (policy, gb, tier)


@pytest.mark.parametrize("chunk", [None, 512])
def test_a_turn_evicted_from_hbm_loads_its_prefix_from_the_store(machine, chunk):
    """With room in HBM for one conversation, the other's next turn finds its KV only in the
    store: it loads the prefix (its first chunk reads it back from the store's tier) and
    prefills only its new tokens; without the store it prefills the whole prompt."""
    profile, model = machine
    times = StepTimes(small_hbm(profile, 24.0), model, "gpu_only", prefill_chunk=chunk,
                      longest_prompt=20_000)
    lo, hi = 1, 1 << 20
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if times.fits(1, mid) else (lo, mid)
    prompt = lo * 2 // 5 - 8  # one finished conversation fits beside another, not two
    new = 300 if chunk is None else 1000  # chunked: two chunks, of 512 and 488
    requests = (conversation(0, 0, 0.0, [(prompt, 8), (new, 8)], think_s=400.0)
                + conversation(1, 2, 100.0, [(prompt, 8)], think_s=0.0)
                + conversation(2, 3, 200.0, [(prompt, 8)], think_s=0.0))
    store = kv_offload(times.profile, "gpu_only", 100, "cxl0")
    with_store = by_id(serve_requests(times, requests, max_batch=8, kv_offload=store))
    without = by_id(serve_requests(times, requests, max_batch=8))
    turn = with_store[1]
    r = turn.request
    assert without[1].cached_tokens == 0  # evicted from HBM, and no store
    assert turn.cached_tokens == turn.loaded_tokens == r.prefix_tokens
    assert r.prompt_tokens <= times.longest_prompt and r.prefix_tokens > 10_000
    # its new tokens over the past read back (the first chunk reads it; the next finds it
    # in HBM)
    p = r.prefix_tokens
    expected = (times.mixed_step(0, 0.0, p, new, "cxl0")[0] if chunk is None else
                times.mixed_step(0, 0.0, p, 512, "cxl0")[0]
                + times.mixed_step(0, 0.0, p + 512, new - 512)[0])
    assert turn.first_token_s - r.arrival_s == pytest.approx(expected, rel=1e-12)
    ttft_without = without[1].first_token_s - without[1].request.arrival_s
    assert turn.first_token_s - r.arrival_s < ttft_without / 2


def test_a_past_kept_on_the_host_is_read_back_whole_from_the_policys_tiers(machine):
    """HybridGen at batch 32 keeps keys in DRAM and values on CXL: a retained prefix comes
    back whole, K from ddr0 and V from cxl0 (its HBM window was written out when its turn
    ended), where in place only the part beyond the window would."""
    profile, model = machine
    past, tokens = 16384, 1024
    workload = Workload(batch=32, context=past + tokens, gen=1)
    plan = make_policy("hybridgen", model, profile, workload, {}).step_plan(past + tokens)
    lp = plan.layer
    assert lp.placement.k_fractions == {"ddr0": 1.0} and lp.placement.v_fractions == {
        "cxl0": 1.0}
    in_place, on_host = PrefillChunk(past, tokens), PrefillChunk(past, tokens, PAST_ON_HOST)
    assert 0 < in_place.read_back_tokens(lp) < on_host.read_back_tokens(lp) == past
    engine = new_engine(profile, model, workload)
    before = dict(engine.machine.recorder.bytes_by_resource())
    engine.step(replace(plan, batch=0), on_host)
    moved = engine.machine.recorder.bytes_by_resource()
    half = plan.num_layers * past * model.kv_bytes_per_token_layer("fp16") / 2
    for tier in ("ddr0", "cxl0"):
        assert moved[f"{tier}.read"] - before.get(f"{tier}.read", 0.0) == pytest.approx(
            half, rel=1e-12)
    # alone, the prompt fits HBM and the plan places nothing on the host: the policy's own
    # mapping says where its cache kept the prefix (keys in DRAM, values on CXL)
    alone = Workload(batch=1, context=past + tokens, gen=1)
    pol = make_policy("hybridgen", model, profile, alone, {})
    lone = pol.step_plan(past + tokens)
    assert lone.layer.placement is None
    engine = new_engine(profile, model, alone)
    engine.step(replace(lone, batch=0), PrefillChunk(past, tokens, PAST_ON_HOST,
                                                     pol.host_kv_placement()))
    moved = engine.machine.recorder.bytes_by_resource()
    for tier in ("ddr0", "cxl0"):
        assert moved[f"{tier}.read"] == pytest.approx(half, rel=1e-12)


def test_an_offloading_policys_hit_reads_its_prefix_back(machine):
    """On an idle machine a later turn under FlexGen prefills its new tokens over the prefix
    read back from the host (PAST_ON_HOST), gpu_only over the prefix still in HBM."""
    profile, model = machine
    requests = conversation(0, 0, 0.0, [(12_000, 8), (1_000, 8)], think_s=3.0)
    for policy, source in (("flexgen", PAST_ON_HOST), ("gpu_only", None)):
        times = StepTimes(profile, model, policy, longest_prompt=requests[-1].prompt_tokens)
        turn = by_id(serve_requests(times, requests, max_batch=4))[1]
        r = turn.request
        assert turn.cached_tokens == r.prefix_tokens and not turn.loaded_tokens
        expected = times.mixed_step(0, 0.0, r.prefix_tokens, 1_000, source)[0]
        assert turn.first_token_s - r.arrival_s == pytest.approx(expected, rel=1e-12)
    assert expected < times.mixed_step(0, 0.0, r.prefix_tokens, 1_000, PAST_ON_HOST)[0]

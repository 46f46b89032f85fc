"""Chunked prefill: a prompt's chunk riding on a decode step (DecodeEngine.step with a
PrefillChunk) against closed forms and bounds, and the server that schedules it."""

from __future__ import annotations

import json
import math

import pytest

from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.costs import Work, lm_head_work
from hgsim.errors import UserError
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.serving import Request, StepTimes, serve_requests
from hgsim.sim.decode import PrefillChunk
from hgsim.simulate import mixed_step, new_engine
from hgsim.workload import Workload

PROFILE = "h100-80gb-spr-cxl"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def machine():
    return load_profile(PROFILE), get_model(MODEL)


def engine_step(profile, model, workload, plan, chunk=None):
    engine = new_engine(profile, model, workload)
    measure = engine.step(plan, chunk)
    return engine, measure, engine.machine.recorder.bytes_by_resource()


# ------------------------------------------------------------------ the chunk's placement
def test_chunks_write_out_exactly_the_host_range_and_read_back_what_is_there(machine):
    """Over a prompt's chunks the positions written out are the plan's host range (each once)
    and each chunk reads back the host range as it stood when it started."""
    profile, model = machine
    workload = Workload(batch=32, context=32768, gen=1)
    lp = make_policy("hybridgen", model, profile, workload, {}).step_plan(32768).layer
    assert lp.host_tokens > 0 and lp.gpu_recent_tokens > 0  # a window in front of host tokens
    prompt, size = 32768, 2048
    chunks = [PrefillChunk(past, min(size, prompt - past)) for past in range(0, prompt, size)]
    assert sum(c.written_tokens(lp) for c in chunks) == lp.host_tokens
    written = 0
    for c in chunks:
        assert c.read_back_tokens(lp) == written  # what the chunks before it wrote
        written += c.written_tokens(lp)


def test_a_plan_that_keeps_everything_in_hbm_moves_nothing(machine):
    profile, model = machine
    workload = Workload(batch=1, context=8192, gen=1)
    lp = make_policy("gpu_only", model, profile, workload, {}).step_plan(8192).layer
    chunk = PrefillChunk(6144, 2048)
    assert chunk.read_back_tokens(lp) == chunk.written_tokens(lp) == 0


# ------------------------------------------------------------------ the mixed step
def test_pcie_carries_the_read_back_and_the_write_out_exactly(machine):
    """FlexGen at batch 32: the mixed step moves, beyond the decode step's own traffic,
    layers x read-back tokens x K+V bytes host-to-device and layers x written tokens x K+V
    bytes device-to-host."""
    profile, model = machine
    workload = Workload(batch=32, context=32768, gen=1)
    plan = make_policy("flexgen", model, profile, workload, {}).step_plan(32768)
    chunk = PrefillChunk(24576, 2048)
    back, out = chunk.read_back_tokens(plan.layer), chunk.written_tokens(plan.layer)
    assert back > 0 and out > 0
    kv = model.kv_bytes_per_token_layer("fp16")
    _, decode, alone = engine_step(profile, model, workload, plan)
    _, mixed, both = engine_step(profile, model, workload, plan, chunk)
    layers = plan.num_layers
    assert both["gpu0.h2d"] - alone["gpu0.h2d"] == pytest.approx(layers * back * kv, rel=1e-12)
    assert both["gpu0.d2h"] - alone["gpu0.d2h"] == pytest.approx(layers * out * kv, rel=1e-12)
    assert mixed.latency_s > decode.latency_s


def test_gpu_only_mixed_step_is_the_fused_kernels_in_stream_order(machine):
    """With nothing on the host the step is its kernels back to back: the chunk adds, per
    layer, its FLOPs to the qkv and post GEMMs (their weights read once), its attention
    kernel, and one position to the LM head; nothing else."""
    profile, model = machine
    workload = Workload(batch=4, context=16384, gen=1)
    plan = make_policy("gpu_only", model, profile, workload, {}).step_plan(16384)
    chunk = PrefillChunk(4096, 1024)
    engine, decode, _ = engine_step(profile, model, workload, plan)
    _, mixed, _ = engine_step(profile, model, workload, plan, chunk)
    w = engine.work(plan.batch, plan.layer)
    add_qkv, add_post, attention = engine._chunk_works(chunk)

    def k(work: Work, attention: bool = False) -> float:
        return engine._kernel_s(work, attention)

    per_layer = (k(Work(w.qkv.flops + add_qkv.flops, w.qkv.bytes_ + add_qkv.bytes_))
                 - k(w.qkv) + k(attention, True)
                 + k(Work(w.post.flops + add_post.flops, w.post.bytes_ + add_post.bytes_))
                 - k(w.post))
    head = (k(lm_head_work(model, 5, "fp16")) - k(lm_head_work(model, 4, "fp16")))
    assert mixed.latency_s - decode.latency_s == pytest.approx(
        plan.num_layers * per_layer + head, rel=1e-9)
    # the chunk's GEMM FLOPs are the prefill's: 2 x parameters per position
    assert add_qkv.flops + add_post.flops == pytest.approx(
        chunk.tokens * model.linear_flops_per_token_layer())


@pytest.mark.parametrize("policy", ["gpu_only", "hybridgen", "flexgen", "infinigen", "hgca",
                                    "cpu_offload"])
@pytest.mark.parametrize("past", [0, 24576])
def test_mixed_step_lies_between_the_longer_part_and_the_sum(machine, policy, past):
    """Riding on the decode step, the chunk can neither make it shorter nor cost more than
    running the two one after the other (it can only share the weights' reads and fill the
    GPU's waits for the host)."""
    profile, model = machine
    # batch 16 puts KV in host memory; gpu_only holds 8 at 32k
    workload = Workload(batch=8 if policy == "gpu_only" else 16, context=32768, gen=1)
    pol = make_policy(policy, model, profile, workload, {})
    assert pol.feasible
    decode = new_engine(profile, model, workload).step(pol.step_plan(32768)).latency_s
    mixed, joules = mixed_step(profile, model, pol, workload, 32768, past, 2048)
    alone, _ = mixed_step(profile, model, pol, workload, 32768, past, 2048, alone=True)
    assert max(decode, alone) <= mixed * (1 + 1e-12)
    assert mixed <= (decode + alone) * (1 + 1e-12)
    assert joules > 0


def test_hybridgen_hides_a_chunk_in_the_gpus_wait_for_the_host(machine):
    """Host-bound HybridGen (batch 32 at 32k) leaves the GPU waiting for the CPU's top-k in
    every layer: a first chunk (nothing to read back) adds under a tenth of its own time."""
    profile, model = machine
    workload = Workload(batch=32, context=32768, gen=1)
    pol = make_policy("hybridgen", model, profile, workload, {})
    decode = new_engine(profile, model, workload).step(pol.step_plan(32768)).latency_s
    mixed, _ = mixed_step(profile, model, pol, workload, 32768, 0, 2048)
    alone, _ = mixed_step(profile, model, pol, workload, 32768, 0, 2048, alone=True)
    assert mixed - decode < 0.1 * alone


@pytest.mark.parametrize(("batch", "context", "past"), [(32, 16384, 16384), (32, 32768, 30720)])
def test_the_scheduler_seeing_chunked_steps_moves_a_mixed_step_little(batch, context, past):
    """A mixed cell runs under HybridGen's scheduler as the decode cell left it. Letting it
    observe eight steps with the chunk riding on them first (a long prompt's chunks, one an
    iteration) moves the step under 2% (0.4% and 0% here: GPU-bound with the chunk, and
    host-bound with the chunk's read-back)."""
    times = StepTimes(load_profile(PROFILE), get_model(MODEL), "hybridgen", {},
                      prefill_chunk=2048, longest_prompt=32768)
    assert math.isfinite(times.decode_cell(batch, context))
    pol = times._settled[(batch, context)]
    workload = times._workload(batch, context, gen=1)
    run = dict(profile=times.serving_profile, model=times.model, pol=pol, workload=workload,
               context=context, chunk_past=past, chunk_tokens=2048)
    settled, _ = mixed_step(**run)
    adapted, _ = mixed_step(**run, adapted=8)
    assert adapted == pytest.approx(settled, rel=0.02)
    assert mixed_step(**run)[0] == settled  # the settled policy is left as it was


@pytest.mark.parametrize("prompt", [2048, 8192, 32768])
def test_a_whole_prompt_as_one_chunk_alone_is_the_prefill(machine, prompt):
    """Two code paths, one physics: the chunk alone (DecodeEngine.step, three GEMM and
    attention kernels a layer) and the prefill (DecodeEngine.prefill, one kernel a layer)
    agree within the two extra launches a layer."""
    profile, model = machine
    times = StepTimes(profile, model, "gpu_only")
    alone, _ = times.mixed_cell(0, 0, 0, prompt)
    assert alone == pytest.approx(times.prefill_cell(prompt), rel=0.01)
    assert alone >= times.prefill_cell(prompt)


# ------------------------------------------------------------------ the server
def requests(*rows: tuple[float, int, int]) -> list[Request]:
    return [Request(i, arrival, prompt, output) for i, (arrival, prompt, output)
            in enumerate(rows)]


@pytest.fixture(scope="module")
def times(machine):
    return StepTimes(*machine, "hybridgen")


@pytest.fixture(scope="module")
def chunked(machine):
    """HybridGen's step times with prefills in chunks of 2048 (and 1024) tokens."""
    return {size: StepTimes(*machine, "hybridgen", prefill_chunk=size) for size in (1024, 2048)}


def test_a_lone_request_waits_for_its_chunks_one_after_another(chunked):
    """An idle server prefills a 10,000-token prompt in 2048-token chunks (the last 1808):
    its first token comes after the chunks' times alone, then one decode step a token."""
    prompt, size, output = 10_000, 2048, 4
    times = chunked[size]
    result = serve_requests(times, requests((0.0, prompt, output)), max_batch=8)
    served = result.served[0]
    chunks = [(past, min(size, prompt - past)) for past in range(0, prompt, size)]
    ttft = sum(times.mixed_step(0, 0.0, past, n)[0] for past, n in chunks)
    assert served.first_token_s == pytest.approx(ttft, rel=1e-12)
    steps = sum(times.decode_step_s(1, prompt + k) for k in range(1, output))
    assert served.finish_s - served.first_token_s == pytest.approx(steps, rel=1e-12)
    assert [it.prefill_tokens for it in result.iterations[:len(chunks)]] == [n for _, n in chunks]


def test_chunked_prefill_keeps_a_running_request_decoding(times, chunked):
    """A request decoding when a 32k prompt arrives: prefilled whole, the prompt stalls it
    for the whole prefill; in 2048-token chunks it gets a token every iteration, so its time
    per output token falls, while the newcomer's first token comes later."""
    load = requests((0.0, 4096, 200), (0.05, 32768, 4))
    whole = serve_requests(times, load, max_batch=8)
    chunked = serve_requests(chunked[2048], load, max_batch=8)

    def tpot(result):
        s = result.served[0]
        return (s.finish_s - s.first_token_s) / (s.request.output_tokens - 1)

    assert tpot(chunked) < tpot(whole)
    assert chunked.served[1].first_token_s > whole.served[1].first_token_s
    longest = max(it.prefill_s + it.decode_s for it in chunked.iterations if it.batch)
    assert longest < times.prefill_s(32768)


def test_every_prompt_token_is_prefilled_once(chunked):
    load = requests(*((0.2 * i, 3000 + 1500 * i, 3 + i) for i in range(8)))
    result = serve_requests(chunked[1024], load, max_batch=3)
    assert all(not math.isnan(s.finish_s) for s in result.served)
    assert sum(it.prefill_tokens for it in result.iterations) == sum(
        r.prompt_tokens for r in load)
    assert max(it.batch for it in result.iterations) <= 3
    for s in result.served:
        assert s.admitted_s <= s.first_token_s <= s.finish_s


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value", [8, -1, 2.5, True, "2k"])
def test_step_times_refuse_a_bad_chunk(machine, value):
    with pytest.raises(UserError, match="prefill_chunk"):
        StepTimes(*machine, "hybridgen", prefill_chunk=value)


def test_a_chunk_of_0_is_whole_prompts(machine):
    assert StepTimes(*machine, "hybridgen", prefill_chunk=0).prefill_chunk is None


# ------------------------------------------------------------------ HBM for the prefills
def test_the_reserve_is_one_forwards_activations_and_the_landing_block(machine):
    """Whole prompts: one layer's activations over the longest prompt; in chunks: over a
    chunk, plus two layers' worth of the longest prompt's K and V to land read-backs in, for
    a policy that may keep KV in host memory (gpu_only never reads any back)."""
    from hgsim.costs import prefill_activation_bytes

    profile, model = machine
    longest, size = 100_000, 2048
    whole = StepTimes(profile, model, "hybridgen", longest_prompt=longest)
    assert whole.prefill_reserve_bytes == prefill_activation_bytes(model, 1, longest, "fp16")
    chunked = StepTimes(profile, model, "hybridgen", prefill_chunk=size, longest_prompt=longest)
    assert chunked.prefill_reserve_bytes == (prefill_activation_bytes(model, 1, size, "fp16")
                                             + 2 * longest * model.kv_bytes_per_token_layer())
    gpu_only = StepTimes(profile, model, "gpu_only", prefill_chunk=size, longest_prompt=longest)
    assert gpu_only.prefill_reserve_bytes == prefill_activation_bytes(model, 1, size, "fp16")
    # the decode steps and admission see HBM less the reserve; a prompt alone does not
    gpu = profile.primary_gpu
    assert whole.serving_profile.gpus[gpu].hbm_capacity_gb == pytest.approx(
        profile.gpus[gpu].hbm_capacity_gb - whole.prefill_reserve_bytes / 1e9)
    assert StepTimes(profile, model, "hybridgen").serving_profile is not None
    assert StepTimes(profile, model, "hybridgen").prefill_reserve_bytes == 0


def test_a_whole_prompts_reserve_shrinks_what_gpu_only_admits(machine):
    """Prefilled whole, prompts of up to 128k tokens set ~12 GB of activations aside: fewer
    32k sequences fit beside them than beside a 2048-token chunk's."""
    profile, model = machine
    whole = StepTimes(profile, model, "gpu_only", longest_prompt=131_072)
    chunked = StepTimes(profile, model, "gpu_only", prefill_chunk=2048, longest_prompt=131_072)

    def most(times):
        return max(b for b in range(1, 64) if times.fits(b, b * 32_768))

    assert whole.prefill_reserve_bytes > 10e9 > 1e9 > chunked.prefill_reserve_bytes
    assert most(whole) < most(chunked)


def test_a_prompt_longer_than_the_reserve_is_refused(machine):
    times = StepTimes(*machine, "gpu_only", longest_prompt=1000)
    with pytest.raises(ValueError, match="at most 1000 tokens"):
        serve_requests(times, requests((0.0, 2000, 2)), max_batch=2)


@pytest.mark.parametrize("value, message", [("8", "or at least 16"), ("two", "--prefill-chunk"),
                                            ("-4", "--prefill-chunk")])
def test_cli_refuses_a_bad_chunk_in_one_line(capsys, value, message):
    code = main(["serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--rate", "1",
                 "--prompt", "1k", "--output", "2", "--requests", "2",
                 "--prefill-chunk", value])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, chunk", [("1k", 1024), ("0", 0)])
def test_cli_json_names_the_chunk(capsys, flag, chunk):
    """(0: prompts prefilled whole, as without the flag)"""
    code = main(["serve", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--policy",
                 "gpu_only", "--rate", "1", "--prompt", "3k", "--output", "3", "--requests",
                 "3", "--prefill-chunk", flag, "--json", "--no-progress"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["prefill_chunk"] == chunk and row["completed"] == 3


def test_api_refuses_a_bad_chunk():
    from hgsim import api

    with pytest.raises(UserError, match="prefill_chunk"):
        api.serve("dev-zen4-2core", "opt-6.7b", "gpu_only", rate=1.0, prompt=1000, output=2,
                  requests=2, prefill_chunk=4)


def test_interpolated_mixed_steps_match_the_simulator(machine):
    """A step with a chunk is read from the decode cells' corners with the decode's weights,
    or where the chunk bends the cell (hidden in the wait for the host at one corner, not at
    another: ``mixed_linear``) from the batch's own cells: within 2% of the step simulated at
    its own batch and context (median far below)."""
    import numpy as np

    times = StepTimes(*machine, "hybridgen")
    rng = np.random.default_rng(2)
    errors = []
    for _ in range(12):
        batch = int(rng.integers(1, 64))
        context = float(np.exp(rng.uniform(np.log(2_000), np.log(60_000))))
        past = int(rng.integers(0, 16)) * 2048
        exact, _ = times.mixed_cell(batch, round(context), past, 2048)
        if math.isfinite(exact):
            errors.append(abs(times.mixed_step(batch, context, past, 2048)[0] / exact - 1))
    assert len(errors) >= 8
    assert max(errors) < 0.02
    assert np.median(errors) < 0.001


def test_a_chunk_alone_is_placed_as_one_sequence_of_its_length():
    """With no request decoding, the chunk runs on the policy for one sequence as long as the
    prompt so far: on a 32 GB card a 122k-token Llama-3.1-8B prompt already spills past
    HybridGen's window, so the chunk reads the spilled tokens back (its joules count them)."""
    profile, model = load_profile("rtx5090-cxl"), get_model(MODEL)
    times = StepTimes(profile, model, "hybridgen")
    past, tokens = 120_000, 2048
    workload = Workload(batch=1, context=past + tokens, gen=1)
    pol = make_policy("hybridgen", model, profile, workload, {})
    assert PrefillChunk(past, tokens).read_back_tokens(pol.step_plan(past + tokens).layer) > 0
    placed = mixed_step(profile, model, pol, workload, past + tokens, past, tokens, alone=True)
    assert times.mixed_cell(0, 0, past, tokens) == placed
    unplaced = mixed_step(profile, model, pol, workload, 1, past, tokens, alone=True)
    assert placed[1] > unplaced[1]


@pytest.mark.parametrize("policy, chunk", [("gpu_only", None), ("gpu_only", 2048),
                                           ("hybridgen", 2048)])
def test_the_reserve_is_for_the_longest_prompt_that_can_be_served(machine, policy, chunk):
    """Prompts far beyond any memory (a conversation's 1,000th turn) do not size the reserve:
    it is for the longest prompt that fits alone beside its own prefill's reserve (within
    0.1%), one that long fits and one 0.2% longer does not, and the server refuses the longer
    prompt while serving the short ones beside it."""
    profile, model = machine
    times = StepTimes(profile, model, policy, prefill_chunk=chunk, longest_prompt=50_000_000)
    reserved = times.reserved_prompt
    assert 10_000 < reserved < 50_000_000
    assert times._fits_alone(reserved) and not times._fits_alone(int(reserved * 1.002) + 1)
    assert times.prefill_reserve_bytes == times.reserve_bytes_for(reserved)
    result = serve_requests(times, requests((0.0, 50_000_000, 2), (0.0, 4096, 2),
                                            (0.1, 8192, 2)), max_batch=4)
    huge, *small = result.served
    assert f"longer than any whose KV fits beside the HBM its prefill needs ({reserved}" in (
        huge.rejected)
    assert all(not s.rejected and math.isfinite(s.finish_s) for s in small)
    # a longest prompt that fits is the reserve's, as before
    fits = StepTimes(profile, model, policy, prefill_chunk=chunk, longest_prompt=30_000)
    assert fits.reserved_prompt == 30_000

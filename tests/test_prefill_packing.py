"""Several prompts' chunks in one iteration (the chunk as the iteration's prefill budget, filled
from the next prompts where the head's rest is shorter, as vLLM's scheduler fills its token
budget): the simulator's step with packed chunks against closed forms and bounds, the step
times' reading of it, and the server that packs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hgsim.catalog import get_model
from hgsim.costs import Work, lm_head_work
from hgsim.policies import make_policy
from hgsim.profiles import load_profile
from hgsim.serving import Request, RequestMix, StepTimes, serve_requests
from hgsim.serving.requests import LengthDist
from hgsim.serving.server import run_server
from hgsim.sim.decode import PAST_ON_HOST, PrefillChunk
from hgsim.simulate import mixed_step, new_engine
from hgsim.workload import Workload

PROFILE = "h100-80gb-spr-cxl"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def machine():
    return load_profile(PROFILE), get_model(MODEL)


def step(profile, model, workload, plan, chunk=None, packed=()):
    engine = new_engine(profile, model, workload)
    measure = engine.step(plan, chunk, packed)
    return engine, measure, engine.machine.recorder.bytes_by_resource()


# ------------------------------------------------------------------ the simulator's step
def test_gpu_only_packed_chunks_add_their_rows_attention_and_logits(machine):
    """With nothing on the host the step is its kernels back to back: a packed chunk adds,
    per layer, its FLOPs to the fused GEMMs (their weights read once), its attention to the
    chunks' one attention kernel, and one position to the LM head; nothing else."""
    profile, model = machine
    workload = Workload(batch=4, context=16384, gen=1)
    plan = make_policy("gpu_only", model, profile, workload, {}).step_plan(16384)
    head, other = PrefillChunk(4096, 1024), PrefillChunk(0, 700)
    engine, alone, _ = step(profile, model, workload, plan, head)
    _, both, _ = step(profile, model, workload, plan, head, [other])
    w = engine.work(plan.batch, plan.layer)
    q1, p1, a1 = engine._chunk_works(head)
    q2, p2, a2 = engine._chunk_works(other)

    def k(*works: Work, attention: bool = False) -> float:
        return engine._kernel_s(Work(sum(x.flops for x in works),
                                     sum(x.bytes_ for x in works)), attention)

    per_layer = (k(w.qkv, q1, q2) - k(w.qkv, q1) + k(a1, a2, attention=True)
                 - k(a1, attention=True) + k(w.post, p1, p2) - k(w.post, p1))
    logits = k(lm_head_work(model, 6, "fp16")) - k(lm_head_work(model, 5, "fp16"))
    assert both.latency_s - alone.latency_s == pytest.approx(
        plan.num_layers * per_layer + logits, rel=1e-9)


def test_packed_chunks_write_out_what_leaves_the_window_and_read_nothing_back(machine):
    """FlexGen at batch 128 (an HBM window of 1,841 tokens a sequence): a packed first chunk
    longer than the window writes its positions beyond it to the host (layers x tokens x K+V
    bytes more device-to-host); only the head chunk reads its past back."""
    profile, model = machine
    workload = Workload(batch=128, context=32768, gen=1)
    plan = make_policy("flexgen", model, profile, workload, {}).step_plan(32768)
    head, other = PrefillChunk(24576, 2048), PrefillChunk(0, 2000)
    assert head.read_back_tokens(plan.layer) > 0 and other.read_back_tokens(plan.layer) == 0
    out = other.written_tokens(plan.layer)
    assert out > 0
    kv = model.kv_bytes_per_token_layer("fp16")
    _, alone, one = step(profile, model, workload, plan, head)
    _, both, two = step(profile, model, workload, plan, head, [other])
    assert two["gpu0.h2d"] == pytest.approx(one["gpu0.h2d"], rel=1e-12)
    assert two["gpu0.d2h"] - one["gpu0.d2h"] == pytest.approx(
        plan.num_layers * out * kv, rel=1e-12)
    assert both.latency_s > alone.latency_s


@pytest.mark.parametrize("policy", ["gpu_only", "hybridgen", "flexgen", "infinigen"])
def test_packing_costs_no_more_than_two_iterations(machine, policy):
    """A packed chunk can neither shorten the step nor cost more than prefilling it in a
    step of its own (it shares the weights' reads and the GPU's waits for the host)."""
    profile, model = machine
    workload = Workload(batch=8 if policy == "gpu_only" else 16, context=32768, gen=1)
    pol = make_policy(policy, model, profile, workload, {})
    head = mixed_step(profile, model, pol, workload, 32768, 0, 1200)[0]
    packed = mixed_step(profile, model, pol, workload, 32768, 0, 1200, packed=[(0, 800)])[0]
    other = mixed_step(profile, model, pol, workload, 32768, 0, 800, alone=True)[0]
    assert head < packed <= (head + other) * (1 + 1e-12)


def test_a_packed_chunk_must_have_its_past_in_hbm(machine):
    profile, model = machine
    workload = Workload(batch=32, context=32768, gen=1)
    plan = make_policy("flexgen", model, profile, workload, {}).step_plan(32768)
    engine = new_engine(profile, model, workload)
    with pytest.raises(ValueError, match="ride behind"):
        engine.step(plan, None, [PrefillChunk(0, 100)])
    for other in (PrefillChunk(30_000, 100), PrefillChunk(0, 100, "cxl0"),
                  PrefillChunk(0, 100, PAST_ON_HOST)):
        with pytest.raises(ValueError, match="past must be in HBM"):
            engine.step(plan, PrefillChunk(0, 100), [other])


# ------------------------------------------------------------------ the step times
def test_packed_steps_match_the_simulator(machine):
    """A packed iteration is the step with its first chunk read from the cells, plus what the
    packed chunks add at the nearest grid point: within 2% of the iteration simulated at its
    own batch and context."""
    times = StepTimes(*machine, "hybridgen", prefill_chunk=2048)
    rng = np.random.default_rng(5)
    errors = []
    for _ in range(10):
        batch = int(rng.integers(1, 48))
        context = float(np.exp(rng.uniform(np.log(2_000), np.log(40_000))))
        first = int(rng.integers(100, 1900))
        past = int(rng.integers(0, 8)) * 2048
        packed = ((0, 2048 - first),)
        exact = times.mixed_cell(batch, round(context), past, first, None, packed)[0]
        if math.isfinite(exact):
            read = times.mixed_step(batch, context, past, first, None, packed)[0]
            errors.append(abs(read / exact - 1))
    assert len(errors) >= 6
    assert max(errors) < 0.02


def test_without_packed_chunks_the_step_is_the_first_chunks(machine):
    times = StepTimes(*machine, "gpu_only", prefill_chunk=2048)
    assert times.mixed_step(4, 3000.0, 0, 900) == times.mixed_step(4, 3000.0, 0, 900, None, ())


# ------------------------------------------------------------------ the server
def requests(*rows: tuple[float, int, int]) -> list[Request]:
    return [Request(i, arrival, prompt, output) for i, (arrival, prompt, output)
            in enumerate(rows)]


def test_short_prompts_share_an_iteration(machine):
    """Three prompts arriving together (600, 700 and 1500 tokens, a 2048-token budget): the
    first iteration prefills the first two and 748 of the third, so their first tokens come at
    its end together; one prompt an iteration, each waits for those before it."""
    times = StepTimes(*machine, "gpu_only", prefill_chunk=2048, longest_prompt=1500)
    load = requests((0.0, 600, 3), (0.0, 700, 3), (0.0, 1500, 3))
    packed = run_server(times, load, max_batch=8)
    first = packed.iterations[0]
    assert first.prefill_tokens == 2048
    s = packed.served
    assert s[0].first_token_s == s[1].first_token_s == pytest.approx(
        first.prefill_s + first.decode_s, rel=1e-12)
    assert s[2].first_token_s > s[1].first_token_s
    assert packed.iterations[1].prefill_tokens == 1500 - 748
    expected = times.mixed_step(0, 0.0, 0, 600, None, ((0, 700), (0, 748)))[0]
    assert first.prefill_s + first.decode_s == pytest.approx(expected, rel=1e-12)
    one = run_server(times, load, max_batch=8, pack=False)
    assert [it.prefill_tokens for it in one.iterations[:3]] == [600, 700, 1500]
    assert one.served[0].first_token_s < s[0].first_token_s  # the head is not held back
    assert s[2].first_token_s < one.served[2].first_token_s


@pytest.mark.parametrize("policy", ["gpu_only", "hybridgen"])
def test_every_prompt_token_is_prefilled_once_within_the_budget(machine, policy):
    """Conversations with a prefix cache, prompts queueing: no iteration prefills more than
    its budget, every prompt token not cached is prefilled once, and a prompt whose past
    comes back from the host (HybridGen keeps a conversation's KV there) is never packed
    behind another: every packed chunk's past is in HBM."""
    times = StepTimes(*machine, policy, prefill_chunk=1024, longest_prompt=40_000)
    mix = RequestMix(prompt=LengthDist.parse("lognormal:3k:0.6", "prompt"),
                     output=LengthDist.parse("16", "output"), count=12, seed=3, turns=3,
                     followup=LengthDist.parse("300", "followup"), think_s=0.2)
    calls = []
    mixed = times.mixed_step

    def record(batch, context, past, tokens, past_from=None, packed=()):
        calls.append((past_from, packed))
        return mixed(batch, context, past, tokens, past_from, packed)

    times.mixed_step = record
    result = serve_requests(times, mix.requests(20.0), max_batch=16)
    done = [s for s in result.served if not s.rejected]
    assert len(done) == 36
    assert max(it.prefill_tokens for it in result.iterations) <= 1024
    assert sum(it.prefill_tokens for it in result.iterations) == sum(
        s.request.prompt_tokens - s.cached_tokens for s in done)
    assert any(packed for _, packed in calls)
    assert sum(s.cached_tokens for s in done) > 0
    if policy == "hybridgen":
        assert all(past == 0 for _, packed in calls for past, _ in packed)

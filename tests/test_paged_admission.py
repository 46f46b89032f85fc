"""Paged admission (``admission="paged"``, vLLM's paged allocator): a request is admitted on
the KV the batch holds now, and when the running requests' next tokens no longer fit, the
one admitted last is preempted (its KV freed) and recomputed later. Closed forms on a machine
of constant step times and a memory of so many tokens; invariants of the preemption
bookkeeping; the real simulator's steps at HBM's edge."""

from __future__ import annotations

import dataclasses
import math

import pytest
from test_serving import ConstantTimes, fixed

from hgsim.errors import UserError
from hgsim.serving import RequestMix, serve_requests
from hgsim.serving.server import run_server

CAPACITY = 1000  # tokens of KV the memory holds
PROMPT, OUTPUT = 100, 100


def burst(count: int, prompt: int = PROMPT, output: int = OUTPUT) -> list:
    """``count`` requests arriving together at the start."""
    return [dataclasses.replace(r, arrival_s=0.0)
            for r in RequestMix(fixed(prompt), fixed(output), count=count, seed=0).requests(1.0)]


def served(admission: str, requests, times=None, **kwargs):
    times = times or ConstantTimes(prefill_s=0.0, step_s=0.01, capacity_tokens=CAPACITY)
    return run_server(times, requests, max_batch=256, paged=admission == "paged", **kwargs)


def test_reserve_holds_the_final_kv_and_paged_the_current():
    """Reserve: floor(C / (P + O)) = 5 decode together, never more. Paged: the first
    iteration admits while each prompt, its first token and the token it decodes in the same
    iteration fit, floor(C / (P + 2)) = 9."""
    reserve, paged = served("reserve", burst(30)), served("paged", burst(30))
    assert max(it.batch for it in reserve.iterations) == CAPACITY // (PROMPT + OUTPUT)
    assert paged.iterations[0].batch == CAPACITY // (PROMPT + 2)
    assert sum(s.preemptions for s in reserve.served) == 0
    assert sum(s.preemptions for s in paged.served) > 0


@pytest.mark.parametrize("chunk", [None, 64])
def test_every_request_finishes_whole_and_the_kv_is_all_given_back(chunk):
    times = ConstantTimes(prefill_s=0.0, step_s=0.01, capacity_tokens=CAPACITY)
    times.prefill_chunk = chunk
    if chunk:  # a chunked iteration's time: the step's (the queueing alone)
        times.mixed_step = lambda batch, context, past, n, past_from=None, packed=(): (0.01, 0.0)
    server = served("paged", burst(40), times)
    assert all(s.generated == OUTPUT and math.isfinite(s.finish_s) for s in server.served)
    engine = server.engines[0]
    assert engine._context_tokens == engine._reserved_tokens == 0
    assert not engine.running and not engine.preempted
    assert not engine.prefilling and sum(s.preemptions for s in server.served) > 0
    # prefilled tokens: each prompt once, and again whatever a preemption freed
    prefilled = sum(it.prefill_tokens for it in server.iterations)
    assert prefilled == sum(s.request.prompt_tokens + s.recomputed_tokens for s in server.served)
    # what the batch held never exceeded the memory (each running request and its new token)
    for it in server.iterations:
        if it.batch:
            assert it.batch * it.mean_context + it.batch <= CAPACITY


def test_a_preempted_request_keeps_its_first_token_and_counts_the_stall_in_tpot():
    server = served("paged", burst(30))
    preempted = [s for s in server.served if s.preemptions]
    assert preempted
    for s in preempted:  # first token before it was preempted; the stall is decode time
        assert s.first_token_s < s.finish_s
        assert s.recomputed_tokens >= s.preemptions * (PROMPT + 1)
    step = 0.01
    spans = [(s.finish_s - s.first_token_s) / (OUTPUT - 1) for s in preempted]
    assert min(spans) > step  # a preempted request waited beyond its steps


def test_paged_is_reserve_where_memory_never_binds():
    """Memory for everyone: paged admission admits what reserve does, nothing is preempted,
    and every request's times are the same."""
    times = ConstantTimes(prefill_s=0.02, step_s=0.01)
    requests = RequestMix(fixed(PROMPT), fixed(OUTPUT), count=200, seed=4).requests(20.0)
    a = serve_requests(times, requests, max_batch=16, admission="reserve").requests_frame()
    b = serve_requests(times, requests, max_batch=16, admission="paged").requests_frame()
    assert (b.preemptions == 0).all()
    assert a[["ttft_s", "tpot_s", "e2e_s"]].equals(b[["ttft_s", "tpot_s", "e2e_s"]])


def test_a_request_that_cannot_fit_alone_is_refused_at_once():
    """Paged admission refuses a request whose final KV does not fit even alone when it
    reaches the head of the queue, not once the batch has drained."""
    first = burst(4)
    requests = [*first[:3], dataclasses.replace(first[3], prompt_tokens=500, output_tokens=600)]
    server = served("paged", requests)
    too_long = server.served[-1]
    assert too_long.rejected.startswith("its 1100 tokens of KV do not fit alone")
    assert all(not s.rejected for s in server.served[:-1])


def test_admission_must_be_one_of_two():
    with pytest.raises(UserError, match=r"admission: must be one of reserve, paged, got 'vllm'"):
        serve_requests(ConstantTimes(0.0, 0.01), burst(2), max_batch=4, admission="vllm")


def test_paged_on_the_simulator_at_hbm_edge():
    """gpu_only on an H100 cut to 24 GB (8 GB of KV beside the weights) with long outputs:
    paged admission decodes more together than reserving each final length, preempts, and
    every step it asks for is one the simulator runs (admission never lets in a batch whose
    KV does not fit HBM)."""
    from hgsim import api

    kwargs = dict(rate=50.0, prompt="1k", output="lognormal:4k:0.3", requests=40,
                  hardware={"gpus.gpu0.hbm_capacity_gb": 24})
    rows = {admission: api.serve("h100-80gb-spr-cxl", "llama-3.1-8b", "gpu_only",
                                 admission=admission, **kwargs).summary()
            for admission in ("reserve", "paged")}
    assert rows["paged"]["admission"] == "paged"
    assert rows["reserve"]["preemptions"] == 0 and rows["paged"]["preemptions"] > 0
    assert rows["paged"]["mean_batch"] > rows["reserve"]["mean_batch"]
    assert rows["paged"]["completed"] == rows["reserve"]["completed"] == 40
    assert 0 < rows["paged"]["recomputed_fraction"] < 1


def test_serve_paged_prints_its_preemptions(capsys):
    from test_serving import SERVE

    from hgsim.cli import main

    argv = [*SERVE, "--rate", "50", "--admission", "paged", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "paged admission" in text and "preempted" in text and "recomputed" in text


def test_serve_admission_is_a_choice(capsys):
    from test_serving import SERVE

    from hgsim.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*SERVE, "--rate", "1", "--admission", "vllm"])
    assert exit_info.value.code == 2
    assert "--admission: invalid choice: 'vllm'" in capsys.readouterr().err


def test_a_study_point_keys_admission_only_when_paged():
    from hgsim.study.schema import ServingSpec

    assert "admission" not in ServingSpec(rate_per_s=1.0).key_config()
    assert ServingSpec(rate_per_s=1.0, admission="paged").key_config()["admission"] == "paged"
    with pytest.raises(ValueError, match="admission"):
        ServingSpec(rate_per_s=1.0, admission="vllm")


@pytest.mark.parametrize(("prompt", "output"), [(999, 1), (990, 10)])
def test_a_request_whose_final_kv_just_fits_alone_is_served(prompt, output):
    """Its final KV fills the memory exactly (C = P + O): alone it is admitted on its final
    length, though the tokens counted for its first iteration (prompt, first token and the
    token decoded with it) are one more. It waited for room forever, and the server spun."""
    requests = burst(3, prompt=prompt, output=output)
    times = ConstantTimes(prefill_s=0.0, step_s=0.01, capacity_tokens=prompt + output)
    server = served("paged", requests, times)
    assert all(s.generated == output and not s.rejected for s in server.served)

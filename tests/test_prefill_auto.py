"""``prefill_chunk_tokens: auto``: the chunk size that minimises the request's time (TTFT plus
the decode), over the whole prompt and the powers of two down to 512 tokens that fit."""

from __future__ import annotations

import pytest

from hgsim import api
from hgsim.catalog import get_model
from hgsim.cli import main
from hgsim.costs import prefill_chunk_candidates
from hgsim.errors import UserError
from hgsim.policies import make_policy
from hgsim.prefill_chunk import weigh_prefill_chunks
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.simulate import Fidelity, new_engine, simulate
from hgsim.workload import Workload

H100 = "h100-80gb-spr-cxl"
EVERY_STEP = Fidelity(decode_samples=0, accuracy=False)


def test_candidates_are_the_prompt_then_powers_of_two_down_to_512():
    assert prefill_chunk_candidates(5000) == [5000, 4096, 2048, 1024, 512]
    assert prefill_chunk_candidates(4096) == [4096, 2048, 1024, 512]
    assert prefill_chunk_candidates(300) == [300]


def test_auto_chunks_a_prompt_whose_whole_prefill_does_not_fit():
    """Llama-3.1-8B, 8 x 128k, weights pinned in HBM: the whole prompt's activations (98.8 GB)
    do not fit; auto picks a chunk that does, and says so in the row."""
    whole = Workload(batch=8, context=131072, gen=1, include_prefill=True)
    options = {"weight_offload": "none"}
    assert not simulate(H100, "llama-3.1-8b", "flexgen", whole, policy_options=options,
                        fidelity=EVERY_STEP).feasible
    auto = simulate(H100, "llama-3.1-8b", "flexgen",
                    whole.model_copy(update={"prefill_chunk_tokens": "auto"}),
                    policy_options=options, fidelity=EVERY_STEP)
    assert auto.feasible and auto.prefill_chunk_auto
    assert auto.prefill_chunk_tokens in prefill_chunk_candidates(131072)[1:]
    row = auto.to_row()
    assert row["prefill_chunk_tokens"] == auto.prefill_chunk_tokens and row["prefill_chunk_auto"]
    assert row["request_s"] == pytest.approx(auto.ttft_s + auto.decode_s, rel=1e-12)


@pytest.mark.parametrize("policy", ["flexgen", "hybridgen"])
def test_auto_request_time_is_the_least_of_every_candidate(policy):
    """Brute force on a small case where chunking matters (Llama-3.1-8B, 4 x 16k, a 24 GB GPU:
    the workspace pushes weights and KV to host memory): auto's request time is the least of
    every candidate's run (4 decode steps: the chooser simulates them all, as the runs do), and
    the chooser's TTFT floor never exceeds a candidate's simulated TTFT."""
    profile = profile_with_overrides(load_profile(H100), {"gpus.gpu0.hbm_capacity_gb": 24})
    workload = Workload(batch=4, context=16384, gen=4, include_prefill=True,
                        prefill_chunk_tokens="auto")
    auto = simulate(profile, "llama-3.1-8b", policy, workload, fidelity=EVERY_STEP)
    runs = {chunk: simulate(profile, "llama-3.1-8b", policy,
                            workload.model_copy(update={"prefill_chunk_tokens": chunk}),
                            fidelity=EVERY_STEP)
            for chunk in prefill_chunk_candidates(16384)}
    assert all(r.feasible for r in runs.values())
    best = min(r.request_s for r in runs.values())
    assert auto.request_s == pytest.approx(best, rel=1e-12)
    assert auto.request_s == pytest.approx(runs[auto.prefill_chunk_tokens].request_s, rel=1e-12)
    # the trade-off is real here: neither end of the range wins
    assert auto.prefill_chunk_tokens not in (16384, 512)
    spec, ready = get_model("llama-3.1-8b"), profile.for_kv_dtype("fp16")
    for chunk, run in runs.items():
        candidate = workload.model_copy(update={"prefill_chunk_tokens": chunk})
        plan = make_policy(policy, spec, ready, candidate, None).step_plan(16384)
        floor = new_engine(ready, spec, candidate).prefill_floor_s(plan, 16384, chunk)
        assert floor <= run.ttft_s * (1 + 1e-12)
    weighed = weigh_prefill_chunks(ready, spec, policy, workload, None, EVERY_STEP)
    best_timed = min(e.request_s for e in weighed if e.ttft_s == e.ttft_s)
    assert all(e.bound_s > best_timed for e in weighed if e.ttft_s != e.ttft_s)


def test_auto_is_the_whole_prompt_where_chunking_cannot_help():
    """GPU-only, Llama-3.1-8B at 4k: everything stays in HBM whatever the chunk, so the decode
    is the same and the whole prompt's one kernel per layer gives the first token soonest."""
    workload = Workload(batch=1, context=4096, gen=4, include_prefill=True,
                        prefill_chunk_tokens="auto")
    auto = simulate(H100, "llama-3.1-8b", "gpu_only", workload, fidelity=EVERY_STEP)
    whole = simulate(H100, "llama-3.1-8b", "gpu_only",
                     workload.model_copy(update={"prefill_chunk_tokens": None}),
                     fidelity=EVERY_STEP)
    assert auto.prefill_chunk_tokens == 4096
    assert auto.ttft_s == whole.ttft_s and auto.decode_s == whole.decode_s


def test_auto_that_nothing_fits_is_infeasible_with_the_smallest_chunks_shortfall():
    """A 19 GB GPU with Llama-3.1-8B's 16 GB of weights pinned and 1 + 1.14 GB reserved
    leaves 0.8 GB: even 512 tokens x 16 sequences need 0.9 GB, so no chunk fits; the run says
    by how much HBM falls short at the smallest chunk."""
    profile = profile_with_overrides(load_profile(H100), {"gpus.gpu0.hbm_capacity_gb": 19})
    workload = Workload(batch=16, context=4096, gen=1, include_prefill=True,
                        prefill_chunk_tokens="auto")
    result = simulate(profile, "llama-3.1-8b", "flexgen", workload,
                      policy_options={"weight_offload": "none"}, fidelity=EVERY_STEP)
    assert not result.feasible and result.prefill_chunk_tokens == 512
    assert "for the prefill: one layer's activations over 512 tokens x batch 16" in result.reason
    assert "prefill_chunk_tokens" in result.reason
    assert result.to_row()["prefill_chunk_tokens"] == 512


@pytest.mark.parametrize("value", ["auto2", "0", "-1"])
def test_bad_chunk_on_the_command_line_is_one_line_naming_the_flag(capsys, value):
    code = main(["simulate", "--profile", H100, "--model", "llama-3.1-8b", "--context", "4k",
                 "--prefill", f"--prefill-chunk={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--prefill-chunk" in err[0] and "auto" in err[0]


@pytest.mark.parametrize("value", ["auto2", 0, -1])
def test_bad_chunk_in_the_api_names_the_argument(value):
    with pytest.raises(UserError, match="prefill_chunk_tokens.*auto"):
        api.simulate(H100, "llama-3.1-8b", context=4096, prefill=True,
                     prefill_chunk_tokens=value)


def test_bad_chunk_in_a_study_is_one_line_naming_the_field(tmp_path, capsys):
    from test_study_common import TINY, write_study

    study = write_study(tmp_path, TINY.replace(
        "gen: 4}", "gen: 4, include_prefill: true, prefill_chunk_tokens: auto2}"))
    out = tmp_path / "out"
    code = main(["study", str(study), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert f"{study}:5:" in err[0] and "prefill_chunk_tokens" in err[0] and "auto" in err[0]


def test_an_unresolved_auto_holds_the_smallest_workspace_of_its_candidates():
    """Where only the fit is asked (a capacity search builds policies, simulates nothing),
    auto holds the candidate with the least workspace: it fits wherever any candidate does."""
    spec = get_model("llama-3.1-70b")
    auto = Workload(batch=2, context=131072, include_prefill=True, prefill_chunk_tokens="auto")
    each = {chunk: auto.model_copy(update={"prefill_chunk_tokens": chunk})
            .prefill_workspace_bytes(spec) for chunk in prefill_chunk_candidates(131072)}
    assert auto.held_prefill_chunk(spec) == 512 == min(each, key=each.__getitem__)
    assert auto.prefill_workspace_bytes(spec) == each[512]

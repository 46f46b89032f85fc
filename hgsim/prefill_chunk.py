"""``prefill_chunk_tokens: auto``: the prefill chunk size that serves the request soonest.

The chunk size trades the two halves of a request. Smaller chunks read the earlier chunks'
host-resident K and V back more often (prompt^2 / chunk tokens per layer), so the prefill
(time to first token) can only lose; but the prefill's workspace, set aside in HBM before any
KV is placed (``Policy._hold_prefill_workspace``), shrinks with the chunk, and the HBM it frees
keeps more KV or weights on the GPU for the whole decode. Auto minimises the request's time,
TTFT + the decode's, over ``costs.prefill_chunk_candidates`` (the whole prompt and the powers of
two down to 512 tokens) that fit, each judged by simulation:

* each candidate's decode, under the placement its workspace leaves, with
  ``EVAL_DECODE_SAMPLES`` decode steps simulated (interpolated between, as any run's) and the
  prefill skipped;
* a lower bound of each candidate's TTFT (``DecodeEngine.prefill_floor_s``, no simulation);
* then, in order of bound + decode, the prefill simulated, until the next candidate's bound
  + decode cannot beat the best request time found (branch and bound: the pick is the
  minimum over every candidate, at the evaluation's fidelity).

Ties go to the larger chunk (fewer kernels, and the whole prompt when chunking gains nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hgsim.costs import prefill_chunk_candidates
from hgsim.policies import make_policy
from hgsim.policies.base import host_shared
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.workload import Workload

if TYPE_CHECKING:
    from hgsim.simulate import Fidelity

# Decode steps each candidate's decode is simulated at (the rest interpolated): the first, the
# last and two between. A step's time grows smoothly with the context, so this is within a
# percent of 32 samples (Llama-3.1-70B, 128k x2, HybridGen: 515.1 s against 514.0 s)
EVAL_DECODE_SAMPLES = 4


@dataclass(frozen=True)
class ChunkEstimate:
    """One candidate as auto weighed it; ``ttft_s`` NaN where its bound ruled it out."""

    chunk_tokens: int
    decode_s: float
    ttft_floor_s: float
    ttft_s: float = float("nan")

    @property
    def request_s(self) -> float:
        return self.ttft_s + self.decode_s

    @property
    def bound_s(self) -> float:
        return self.ttft_floor_s + self.decode_s


def choose_prefill_chunk(profile: HardwareProfile, model: ModelSpec, policy: str,
                         workload: Workload, policy_options: dict[str, Any] | None,
                         fidelity: Fidelity) -> int:
    """The chunk size (tokens per sequence) for ``workload``'s prefill; where none fits, the
    smallest candidate, whose run then says by how much HBM falls short."""
    candidates = prefill_chunk_candidates(workload.context)
    if len(candidates) == 1:  # a prompt no longer than the floor: nothing to weigh
        return candidates[0]
    estimates = weigh_prefill_chunks(profile, model, policy, workload, policy_options, fidelity)
    timed = [e for e in estimates if e.ttft_s == e.ttft_s]
    if not timed:
        return candidates[-1]
    return min(timed, key=lambda e: (e.request_s, -e.chunk_tokens)).chunk_tokens


def weigh_prefill_chunks(profile: HardwareProfile, model: ModelSpec, policy: str,
                         workload: Workload, policy_options: dict[str, Any] | None,
                         fidelity: Fidelity) -> list[ChunkEstimate]:
    """Every candidate that fits, weighed as the module says (those whose bound lost keep
    ``ttft_s`` NaN), in the order they were weighed."""
    from hgsim.simulate import new_engine, simulate_prepared

    samples = fidelity.decode_samples
    decode_fidelity = replace(fidelity, record=False, accuracy=False,
                              decode_samples=samples if 0 < samples <= EVAL_DECODE_SAMPLES
                              else EVAL_DECODE_SAMPLES)
    fitting = []
    shared = host_shared(policy_options)
    for chunk in prefill_chunk_candidates(workload.context):
        candidate = workload.model_copy(update={"prefill_chunk_tokens": chunk})
        pol = make_policy(policy, model, profile, candidate, policy_options,
                          attention=fidelity.attention)
        if not pol.feasible:
            continue
        decode = simulate_prepared(profile, model, policy, candidate,
                                   policy_options=policy_options, fidelity=decode_fidelity,
                                   time_prefill=False)
        plan = pol.step_plan(workload.context)
        engine = new_engine(profile, model, candidate, host_shared=shared)
        floor = engine.prefill_floor_s(plan, workload.context, chunk)
        fitting.append((ChunkEstimate(chunk, decode.decode_s, floor), candidate, plan))
    fitting.sort(key=lambda item: (item[0].bound_s, -item[0].chunk_tokens))
    weighed: list[ChunkEstimate] = []
    best = float("inf")
    for estimate, candidate, plan in fitting:
        if estimate.bound_s > best:  # its request cannot beat the best one's
            weighed.append(estimate)
            continue
        engine = new_engine(profile, model, candidate, host_shared=shared)
        ttft = engine.prefill(plan, workload.context, estimate.chunk_tokens)
        timed = ChunkEstimate(estimate.chunk_tokens, estimate.decode_s, estimate.ttft_floor_s,
                              ttft)
        weighed.append(timed)
        best = min(best, timed.request_s)
    return weighed

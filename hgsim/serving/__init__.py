"""Online serving: requests arriving at a rate, continuous batching, TTFT/TPOT percentiles, and
the highest rate a machine sustains within an SLO (docs/serving.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hgsim import tco
from hgsim.errors import UserError
from hgsim.serving.kv_offload import KvOffload, kv_offload
from hgsim.serving.requests import MAX_PROMPT_TOKENS, LengthDist, Request, RequestMix, read_trace
from hgsim.serving.result import ServeResult, Slo
from hgsim.serving.server import ADMISSIONS, run_server
from hgsim.serving.step_times import StepTimes

__all__ = ["ADMISSIONS", "BURST_SHARE", "MIN_PREFILL_CHUNK", "KvOffload", "LengthDist",
           "RateSearch", "Request", "RequestMix", "ServeResult", "Slo", "StepTimes", "alone_s",
           "check_admission", "check_prefill_chunk", "kv_offload", "longest_prompt", "max_rate",
           "prefill_chunk_problem", "rate_unit", "read_trace", "run_labels", "serve_requests"]


def serve_requests(times: StepTimes, requests: list[Request], *, max_batch: int,
                   rate_per_s: float = math.nan, slo: Slo | None = None,
                   labels: dict[str, Any] | None = None,
                   on_finish: Callable[[int], None] | None = None,
                   prefix_cache: bool = True, kv_offload: KvOffload | None = None,
                   affinity_wait_s: float = math.inf,
                   admission: str = "reserve") -> ServeResult:
    """Serve ``requests`` on the configuration ``times`` describes (its prefill chunk
    included), to the last request; conversations' KV kept between turns with
    ``prefix_cache``, and written to a host KV store too with ``kv_offload``
    (``hgsim.serving.kv_offload.kv_offload``); a later turn waits at most
    ``affinity_wait_s`` for the copy whose cache holds its KV. ``admission``: ``reserve``
    (each request's final KV reserved at admission) or ``paged`` (admitted on the KV held now,
    preempted when it runs out, as vLLM's paged allocator)."""
    check_admission(admission)
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise UserError(f"must be a whole number >= 1, got {max_batch!r}", field="max_batch")
    reserved, longest = times.longest_prompt, longest_prompt(requests)
    if reserved and longest > reserved:
        raise ValueError(f"a {longest}-token prompt on step times that set HBM aside for "
                         f"prompts of at most {reserved} tokens")
    server = run_server(times, requests, max_batch=max_batch, copies=times.data_parallel,
                        on_finish=on_finish, prefix_cache=prefix_cache,
                        kv_offload=kv_offload, affinity_wait_s=affinity_wait_s,
                        paged=admission == "paged")
    return ServeResult(labels=dict(labels or {}), rate_per_s=rate_per_s, served=server.served,
                       iterations=server.iterations, slo=slo or Slo(),
                       simulations=times.simulations, copies=times.data_parallel,
                       idle_power_w=times.idle_power_w,
                       capex_usd_per_s=tco.capex_usd_per_s(times.system),
                       electricity_usd_per_j=tco.electricity_usd_per_j(times.system))


# the fewest tokens a chunk of chunked prefill may hold (vLLM's smallest token budget is of
# this order; smaller chunks re-read the weights for a handful of positions)
MIN_PREFILL_CHUNK = 16


def prefill_chunk_problem(prefill_chunk: Any) -> str | None:
    """Why ``prefill_chunk`` is no prefill chunk (None or 0: prompts prefilled whole; else a
    whole number of ``MIN_PREFILL_CHUNK`` to ``MAX_PROMPT_TOKENS`` tokens), or None where it
    is one.

    A chunk longer than any prompt may be has no prompt to cut, and its lattice point past a
    cached prefix (``StepTimes.past_bracket``) was a step at a context of that many tokens:
    past 10^12 the step's workload was refused mid-run, a traceback (the CLI fuzz found
    ``--prefill-chunk 999999999745`` with conversations)."""
    whole = isinstance(prefill_chunk, int) and not isinstance(prefill_chunk, bool)
    if prefill_chunk is None or (whole and (prefill_chunk == 0 or MIN_PREFILL_CHUNK
                                            <= prefill_chunk <= MAX_PROMPT_TOKENS)):
        return None
    if whole and prefill_chunk > MAX_PROMPT_TOKENS:
        return (f"at most {MAX_PROMPT_TOKENS} tokens (the longest a prompt may be), got "
                f"{prefill_chunk}")
    return (f"must be 0 (prompts prefilled whole) or at least {MIN_PREFILL_CHUNK} tokens (a "
            f"whole number), got {prefill_chunk!r}")


def check_prefill_chunk(prefill_chunk: Any, field: str = "prefill_chunk") -> None:
    """``prefill_chunk_problem`` as a ``UserError`` naming ``field``."""
    problem = prefill_chunk_problem(prefill_chunk)
    if problem is not None:
        raise UserError(problem, field=field)


def check_admission(admission: Any, field: str = "admission") -> None:
    """``admission`` is one of ``ADMISSIONS``."""
    if admission not in ADMISSIONS:
        raise UserError(f"must be one of {', '.join(ADMISSIONS)}, got {admission!r}",
                        field=field)


def longest_prompt(requests: list[Request]) -> int:
    """The longest prompt among ``requests``: what the server's HBM is set aside for
    (``StepTimes.longest_prompt``; a mix's lengths are the same at every rate)."""
    return max((r.prompt_tokens for r in requests), default=0)


def run_labels(times: StepTimes, *, max_batch: int, mix: RequestMix,
               traced: bool, prefix_cache: bool = True,
               kv_offload: KvOffload | None = None,
               affinity_wait_s: float = math.inf,
               admission: str = "reserve") -> dict[str, Any]:
    """The columns that say what a run served: configuration, batch limit, admission, prefill
    chunk (0: prompts prefilled whole) and lengths; for conversations their turns, follow-up
    lengths, think time, whether a prefix cache keeps their KV, the host KV store's size (GB, 0:
    none) and tier, and how long a later turn waits for the copy holding its KV (inf: as long
    as it takes)."""
    conversations = {} if traced or mix.turns == 1 else {
        "turns": mix.turns, "followup": str(mix.followup), "think_s": mix.think_s,
        "prefix_cache": prefix_cache,
        "kv_offload_gb": kv_offload.capacity_gb if kv_offload else 0.0,
        "kv_offload_tier": kv_offload.tier if kv_offload else "",
        "affinity_wait_s": affinity_wait_s}
    return {"profile": times.profile.name, "model": times.model.name, "policy": times.policy,
            "tensor_parallel": times.tensor_parallel, "data_parallel": times.data_parallel,
            "gpu_placement": times.gpu_placement, "max_batch": max_batch,
            "admission": admission, "prefill_chunk": times.prefill_chunk or 0,
            "prompt": "trace" if traced else str(mix.prompt),
            "output": "trace" if traced else str(mix.output), **conversations}


@dataclass
class RateSearch:
    """The highest Poisson rate whose requests meet the SLO often enough (None: none does),
    its run, and every rate tried with the share of requests that met the SLO there."""

    rate_per_s: float | None
    result: ServeResult | None
    probes: list[tuple[float, float]] = field(default_factory=list)
    reason: str = ""
    # what the SLO is lost to at the lowest rate tried that misses it: "ttft" or "tpot" (the
    # limit more requests miss there), "" where every rate met it
    bound_by: str = ""
    bound_note: str = ""  # the shares that missed each limit there
    # no rate found because none limits: the SLO is met even by a burst of every request
    unbounded: bool = False

    def row(self, labels: dict[str, Any], simulations: int) -> dict[str, Any]:
        """The search as one row: the run at the rate found (``ServeResult.summary()``; where
        no rate meets the SLO, only ``labels`` and ``simulations``, the metrics left empty),
        then ``max_rate_per_s`` (NaN: none), ``rates_tried``, ``reason``, ``slo_bound_by``
        and ``slo_bound_note``: what ``hgsim serve --find-rate --json`` prints and a study's
        serving point stores."""
        row = (self.result.summary() if self.rate_per_s is not None
               else {**labels, "simulations": simulations})
        row["max_rate_per_s"] = self.rate_per_s if self.rate_per_s is not None else math.nan
        row["rates_tried"] = len(self.probes)
        row["reason"] = self.reason
        row["slo_bound_by"], row["slo_bound_note"] = self.bound_by, self.bound_note
        return row


def rate_unit(turns: int) -> str:
    """What an arrival rate counts: requests, or with conversations, conversations."""
    return "conversations/s" if turns > 1 else "requests/s"


def missed_limits(result: ServeResult) -> tuple[str, str]:
    """Which SLO limit more of ``result``'s requests miss (a rejected request misses TTFT),
    and the shares that miss each."""
    frame = result.requests_frame()
    slo = result.slo
    ttft = ((frame.rejected != "") | ~(frame.ttft_s <= slo.ttft_s)).mean()
    tpot = (frame.tpot_s > slo.tpot_s).mean()
    which = "ttft" if ttft >= tpot else "tpot"
    unit = rate_unit(result.labels.get("turns", 1))
    rate = "" if math.isnan(result.rate_per_s) else f"at {result.rate_per_s:.4g} {unit}, "
    return which, f"{rate}{ttft:.0%} of requests missed TTFT and {tpot:.0%} TPOT"


def alone_s(times: StepTimes, mix: RequestMix) -> float:
    """Seconds the median request of ``mix`` takes on an idle machine, times the turns of a
    conversation: the rate search's first guess at a load (1 / this)."""
    requests = [r for r in mix.requests(1.0) if r.turn == 0]
    prompts = sorted(r.prompt_tokens for r in requests)
    outputs = sorted(r.output_tokens for r in requests)
    prompt, output = prompts[len(prompts) // 2], outputs[len(outputs) // 2]
    return mix.turns * (times.prefill_s(prompt)
                        + (output - 1) * times.decode_step_s(1, prompt + output / 2))


# a rate search stops raising the rate once every request arrives within this share of one
# request's time alone: faster arrivals then add at most that to any request's wait
BURST_SHARE = 0.01


def _burst(mix: RequestMix, alone: float) -> Callable[[float], bool]:
    """Whether ``mix``'s requests (conversations) at a rate all arrive within 1% of the time
    one of them takes alone (``alone``: a conversation's turns): a burst, which arriving
    faster only squeezes (each waits at most that much longer). Arrivals are the same at
    every rate, scaled by it (``RequestMix.requests``: at rate r, those at rate 1 over r), so
    the first and the last are drawn once."""
    first_turns = [r.arrival_s for r in mix.requests(1.0) if r.turn == 0]
    earliest, latest = min(first_turns), max(first_turns)
    return lambda rate: latest / rate - earliest / rate <= BURST_SHARE * alone / mix.turns


def max_rate(times: StepTimes, mix: RequestMix, *, max_batch: int, slo: Slo,
             tolerance: float = 0.02, labels: dict[str, Any] | None = None,
             on_probe: Callable[[float, float], None] | None = None,
             prefix_cache: bool = True, kv_offload: KvOffload | None = None,
             affinity_wait_s: float = math.inf, admission: str = "reserve") -> RateSearch:
    """Bisect the Poisson arrival rate (geometrically, to within ``tolerance``) for the highest
    one at which at least ``slo.attainment`` of the requests meet ``slo``. The requests are
    the same at every rate (``RequestMix``), so the share met falls with the rate. With
    conversations the rate is of conversations (their first turns)."""
    if not slo.set:
        raise UserError("a rate search needs an SLO: a TTFT or a TPOT limit", field="slo")
    if not 0 < tolerance < 1:
        raise UserError(f"must be in (0, 1), got {tolerance!r}", field="tolerance")
    probes: list[tuple[float, float]] = []
    results: dict[float, ServeResult] = {}

    def meets(rate: float) -> bool:
        result = serve_requests(times, mix.requests(rate), max_batch=max_batch,
                                rate_per_s=rate, slo=slo, labels=labels,
                                prefix_cache=prefix_cache, kv_offload=kv_offload,
                                affinity_wait_s=affinity_wait_s, admission=admission)
        results[rate] = result
        probes.append((rate, result.attainment))
        if on_probe is not None:
            on_probe(rate, result.attainment)
        return result.attainment >= slo.attainment

    alone = alone_s(times, mix)
    if not (math.isfinite(alone) and alone > 0):
        return RateSearch(None, None, probes, "the median request does not fit alone")
    rate = 1.0 / alone
    if meets(rate):
        lo, a_burst = rate, _burst(mix, alone)
        while not a_burst(rate):
            rate *= 2
            if not meets(rate):
                break
            lo = rate
        else:
            # arriving faster only squeezes a burst that already meets the SLO: this many
            # requests set no limit on the rate
            unit = rate_unit(mix.turns).removesuffix("/s")
            return RateSearch(None, results[lo], probes,
                              f"the SLO is met even with all {mix.count} {unit} arriving "
                              "at once: a burst this size sets no limit on the rate; serve "
                              "more to find one", unbounded=True)
        hi = rate
    else:
        hi = rate
        for _ in range(20):
            rate /= 2
            if meets(rate):
                break
            hi = rate
        else:
            return RateSearch(None, results[rate], probes,
                              f"the SLO is missed even at {rate:.3g} {rate_unit(mix.turns)}, "
                              "where requests rarely overlap", *missed_limits(results[rate]))
        lo = rate
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return RateSearch(lo, results[lo], probes, "", *missed_limits(results[hi]))

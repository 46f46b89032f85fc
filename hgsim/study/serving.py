"""A study point that runs the online server (``hgsim.serving``, docs/serving.md) instead of
one simulation: requests arriving at a rate (or the highest rate meeting an SLO), batched
continuously on the point's configuration.

The step times come from the point's profile (hardware overrides applied), model, policy and
options, and its workload's dtypes, tensor and data parallelism, exactly as ``hgsim serve`` builds
them; the row is the run's ``ServeResult.summary()``, the one ``hgsim serve --json`` prints.
"""

from __future__ import annotations

import math
from typing import Any

from hgsim.study.schema import ServingSpec

#: The columns a serving row holds (``ServeResult.summary()``; the SLO's with an SLO, and
#: ``max_rate_per_s``, ``rates_tried`` and ``reason`` with ``find_rate``).
LABEL_COLUMNS = ("profile", "model", "policy", "tensor_parallel", "data_parallel",
                 "gpu_placement", "max_batch", "admission", "prefill_chunk", "prompt",
                 "output")
SUMMARY_COLUMNS = (
    "rate_per_s", "requests", "completed", "rejected", "span_s", "requests_per_s",
    "output_tokens_per_s", "mean_batch", "busy_fraction", "prefill_fraction",
    "preemptions", "recomputed_fraction",
    *(f"{stem}_{q}_s" for stem in ("queue", "ttft", "tpot", "e2e")
      for q in ("mean", "p50", "p90", "p99")),
)
SLO_COLUMNS = ("slo_ttft_s", "slo_tpot_s", "slo_attainment", "goodput_requests_per_s")
#: Energy and cost over the run (``ServeResult.energy_and_cost``).
ENERGY_COLUMNS = ("energy_j", "power_w", "energy_j_per_output_token", "usd_per_mtok",
                  "usd_per_mtok_capex", "usd_per_mtok_energy")
#: With conversations: the run's labels of them (the host KV store's GB, 0: none, and tier)
#: and the shares of prompt tokens the prefix cache held and the store loaded back.
CONVERSATION_COLUMNS = ("turns", "followup", "think_s", "prefix_cache", "kv_offload_gb",
                        "kv_offload_tier", "affinity_wait_s", "prefix_cached_fraction",
                        "prefix_loaded_fraction",
                        *(f"ttft_{turns}_{stat}_s" for turns in ("first", "later")
                          for stat in ("mean", "p50", "p90", "p99")))
FIND_RATE_COLUMNS = ("max_rate_per_s", "rates_tried", "reason", "slo_bound_by",
                     "slo_bound_note")
#: Those of them that hold words.
TEXT_COLUMNS = ("admission", "prompt", "output", "followup", "kv_offload_tier", "reason",
                "slo_bound_by", "slo_bound_note")


def serving_columns(slo: bool, find_rate: bool, conversations: bool = False) -> list[str]:
    return [*LABEL_COLUMNS, *SUMMARY_COLUMNS, *(SLO_COLUMNS if slo else ()), *ENERGY_COLUMNS,
            "simulations",
            *(FIND_RATE_COLUMNS if find_rate else ()),
            *(CONVERSATION_COLUMNS if conversations else ())]


def step_times(spec, mix):
    """The point's ``StepTimes`` (what ``hgsim serve`` builds from its flags), HBM set aside
    for the prefills of ``mix``'s longest prompt."""
    from hgsim.serving import StepTimes, longest_prompt

    workload = spec.workload
    return StepTimes(spec.profile, spec.model, spec.policy, dict(spec.policy_options),
                     kv_dtype=workload.kv_dtype, weight_dtype=workload.weight_dtype,
                     tensor_parallel=workload.tensor_parallel,
                     data_parallel=workload.data_parallel, gpu_placement=workload.gpu_placement,
                     prefill_chunk=spec.serving.prefill_chunk or None,
                     longest_prompt=longest_prompt(mix.requests(1.0)))


def request_mix(serving: ServingSpec):
    from hgsim.serving import RequestMix
    from hgsim.serving.requests import output_lengths, prompt_lengths

    return RequestMix(prompt_lengths(serving.prompt, "serving.prompt"),
                      output_lengths(serving.output, "serving.output"),
                      count=serving.requests, seed=serving.seed, turns=serving.turns,
                      followup=prompt_lengths(serving.followup, "serving.followup"),
                      think_s=float(serving.think_s))


def slo_of(serving: ServingSpec):
    from hgsim.serving import Slo

    if serving.slo is None:
        return None
    s = serving.slo
    return Slo(ttft_s=math.inf if s.ttft_s is None else s.ttft_s,
               tpot_s=math.inf if s.tpot_ms is None else s.tpot_ms / 1e3,
               attainment=s.attainment)


def kv_store(serving: ServingSpec, profile, policy: str):
    """A point's host KV store (None: none, or single requests, which keep no prefixes),
    checked against its profile (hardware overrides applied) and policy; a mistake names
    ``serving.kv_offload_gb`` or ``serving.kv_offload_tier``."""
    from hgsim.serving import kv_offload

    if serving.turns == 1:  # a point of one turn where turns is swept: it ignores the store
        return None
    return kv_offload(profile, policy, serving.kv_offload_gb, serving.kv_offload_tier,
                      gb_field="serving.kv_offload_gb", tier_field="serving.kv_offload_tier")


def serving_point(spec) -> dict[str, Any]:
    """The row of one serving point (a ``PointSpec`` whose ``serving`` is set)."""
    from hgsim.serving import max_rate, run_labels, serve_requests

    serving: ServingSpec = spec.serving
    mix = request_mix(serving)
    store = kv_store(serving, spec.profile, spec.policy)
    times = step_times(spec, mix)
    slo = slo_of(serving)
    wait = math.inf if serving.affinity_wait_s is None else serving.affinity_wait_s
    labels = run_labels(times, max_batch=serving.max_batch, mix=mix, traced=False,
                        prefix_cache=serving.prefix_cache, kv_offload=store,
                        affinity_wait_s=wait, admission=serving.admission)
    if not serving.find_rate:
        result = serve_requests(times, mix.requests(serving.rate_per_s),
                                max_batch=serving.max_batch, rate_per_s=serving.rate_per_s,
                                slo=slo, labels=labels, prefix_cache=serving.prefix_cache,
                                kv_offload=store, affinity_wait_s=wait,
                                admission=serving.admission)
        return result.summary()
    search = max_rate(times, mix, max_batch=serving.max_batch, slo=slo, labels=labels,
                      prefix_cache=serving.prefix_cache, kv_offload=store, affinity_wait_s=wait,
                      admission=serving.admission)
    return search.row(labels, times.simulations)

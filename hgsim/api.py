"""hgsim from Python (notebooks, scripts): the command line's verbs as functions.

Everything here is a thin layer over what the CLI uses (``hgsim.simulate``, ``hgsim.study``,
``hgsim.profiles``), so a notebook and ``python -m hgsim`` give the same numbers; mistakes
raise the same one-line ``hgsim.errors.UserError``. Usage: ``from hgsim import api``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hgsim.errors import UserError
from hgsim.outputs import TRACE_MAX_BYTES
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.results import SimResult
from hgsim.specs.hardware import HardwareProfile
from hgsim.specs.model import ModelSpec
from hgsim.tensor_parallel import parallelism_named

__all__ = ["list_models", "list_policies", "list_profiles", "load_profile", "run_study",
           "serve", "simulate", "with_overrides"]


def with_overrides(profile: HardwareProfile | str | os.PathLike[str],
                   overrides: Mapping[str, Any]) -> HardwareProfile:
    """A copy of ``profile`` (object, name or path) with dotted fields replaced and validated.

    The paths are the ones a study writes under ``hardware.``: ``{"tiers.cxl0.latency_ns": 300,
    "links.cxl0-link.bandwidth_gbps": "64 GB/s"}``; ``tiers.<t>.bandwidth_gbps`` sets read and
    write bandwidth, ``*`` matches every key at its level.
    """
    if not isinstance(overrides, Mapping):
        raise UserError("overrides must map dotted paths to values, e.g. "
                        "{'tiers.cxl0.latency_ns': 300}")
    if isinstance(profile, HardwareProfile):
        return profile_with_overrides(profile, dict(overrides))
    if not isinstance(profile, (str, os.PathLike)):
        raise UserError(f"expected a profile name, a YAML path or a HardwareProfile, got "
                        f"{profile!r}", field="profile")
    return profile_with_overrides(load_profile(profile), dict(overrides))


def simulate(
    profile: HardwareProfile | str | os.PathLike[str],
    model: ModelSpec | str | os.PathLike[str],
    policy: str = "hybridgen",
    *,
    context: int | str,
    batch: int | str = 1,
    gen: int | str = 256,
    kv_dtype: str = "fp16",
    weight_dtype: str = "fp16",
    prefill: bool = False,
    prefill_chunk_tokens: int | str | None = None,
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    gpu_placement: str = "packed",
    options: Mapping[str, Any] | None = None,
    hardware: Mapping[str, Any] | None = None,
    samples: int = 32,
    accuracy: bool = True,
    selection: Mapping[str, Any] | None = None,
    attention: Mapping[str, Any] | None = None,
    trace: str | os.PathLike[str] | None = None,
    trace_max_gb: float | None = TRACE_MAX_BYTES / 1e9,
) -> SimResult:
    """Simulate one configuration, as ``hgsim simulate`` does.

    ``prefill_chunk_tokens`` chunks the prefill (with ``prefill`` only; per sequence; None: the
    whole prompt at once; ``"auto"``: the size that minimises TTFT + decode time,
    ``hgsim.prefill_chunk``; the result's ``prefill_chunk_tokens`` says which ran).
    ``tensor_parallel`` shards the model over the profile's first N GPUs (``hgsim.tensor_parallel``:
    throughput the system's, memory per GPU, energy and cost the N GPUs' and the host's);
    ``data_parallel`` runs that many copies of it side by side, each on its own GPUs decoding its
    own ``batch`` sequences, all sharing the host (throughput every copy's), on the GPUs
    ``gpu_placement`` picks (``packed``: the profile's order; ``spread``: each copy on the next
    socket). ``options``
    are the policy's options (``hgsim policies NAME`` lists them), ``hardware`` dotted profile
    overrides (see ``with_overrides``), ``samples`` the decode steps simulated in full (0: all),
    ``selection`` the approximate selectors' parameters the accuracy proxy scores with
    (``{"history_decay": 0.95}``: ``hgsim.accuracy.SelectionModel``'s fields, as a study's
    ``fidelity.selection``; None: its defaults), ``attention`` the shape of the synthetic
    attention it scores on and a GQA group union's rows come from (``{"heavy_fraction": 0.05}``:
    ``hgsim.accuracy.ATTENTION``'s fields, as a study's ``fidelity.attention``; None: its
    defaults), ``trace`` a Perfetto/Chrome trace file to write (refused with ``TraceTooLarge``
    when its first simulated step says it would pass ``trace_max_gb``; None: no limit). The
    result has ``to_frame()``, ``table()`` and ``steps_frame()`` views; an infeasible
    configuration comes back with ``feasible`` False and ``reason`` set, not as an error.
    """
    from hgsim.outputs import check_output_file
    from hgsim.simulate import Fidelity
    from hgsim.simulate import simulate as run
    from hgsim.study.schema import FidelitySpec
    from hgsim.workload import Workload

    if not isinstance(model, (str, os.PathLike, ModelSpec)):
        raise UserError(f"expected a model name, a model file path or a ModelSpec, got "
                        f"{model!r}", field="model")
    options = _options(options)
    base = with_overrides(profile, hardware or {})
    # the study schema's checks of the same knobs: whole numbers, true/false, never a bool
    fidelity = _checked(FidelitySpec, {"decode_samples": samples, "accuracy": accuracy},
                        names={"decode_samples": "samples"})
    chosen = {name: _overrides(name, given)
              for name, given in (("selection", selection), ("attention", attention))}
    workload = _checked(Workload, dict(batch=batch, context=context, gen=gen, kv_dtype=kv_dtype,
                                       weight_dtype=weight_dtype, include_prefill=prefill,
                                       prefill_chunk_tokens=prefill_chunk_tokens,
                                       tensor_parallel=tensor_parallel,
                                       data_parallel=data_parallel,
                                       gpu_placement=gpu_placement),
                        names={"include_prefill": "prefill"})
    if prefill_chunk_tokens is not None and not prefill:  # else silently no prefill at all
        raise UserError("chunks the prompt's prefill, which runs only with prefill=True",
                        field="prefill_chunk_tokens")
    if trace is not None:  # before the run, whose result a bad path would lose at the end
        trace = check_output_file(trace, "trace")
    if trace_max_gb is not None and not (isinstance(trace_max_gb, (int, float))
                                         and 0 < trace_max_gb < math.inf):
        raise UserError(f"expected a positive number of GB or None, got {trace_max_gb!r}",
                        field="trace_max_gb")
    with parallelism_named("tensor_parallel", "data_parallel"):
        return run(base, model, policy, workload, policy_options=options,
                   fidelity=Fidelity(decode_samples=fidelity.decode_samples,
                                     accuracy=fidelity.accuracy, **chosen),
                   trace_path=trace,
                   trace_max_bytes=None if trace_max_gb is None else trace_max_gb * 1e9)


def serve(
    profile: HardwareProfile | str | os.PathLike[str],
    model: ModelSpec | str | os.PathLike[str],
    policy: str = "hybridgen",
    *,
    rate: float | None = None,
    trace: str | os.PathLike[str] | None = None,
    find_rate: bool = False,
    prompt: int | str | None = None,
    output: int | str | None = None,
    requests: int | None = None,
    seed: int | None = None,
    max_batch: int = 256,
    admission: str = "reserve",
    prefill_chunk: int | str | None = None,
    turns: int = 1,
    followup: int | str = "1k",
    think_s: float = 30.0,
    prefix_cache: bool = True,
    kv_offload_gb: float = 0.0,
    kv_offload_tier: str | None = None,
    affinity_wait_s: float = math.inf,
    kv_dtype: str = "fp16",
    weight_dtype: str = "fp16",
    tensor_parallel: int = 1,
    data_parallel: int = 1,
    gpu_placement: str = "packed",
    options: Mapping[str, Any] | None = None,
    hardware: Mapping[str, Any] | None = None,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    attainment: float = 0.9,
):
    """Serve requests online, as ``hgsim serve`` does (docs/serving.md).

    Exactly one load: ``rate`` (requests per second, Poisson), ``trace`` (a CSV file of
    ``arrival_s, prompt_tokens, output_tokens``) or ``find_rate`` (search the highest rate at
    which ``attainment`` of the requests meet the SLO). ``prompt`` and ``output`` are token
    counts or distributions (``"uniform:8k:64k"``, ``"lognormal:32k:0.5"``: median, sigma;
    default ``"32k"`` and 256), ``requests`` how many (default 500), ``seed`` the seed of their
    arrivals and lengths (default 0), all four set by a ``trace``'s rows instead (refused with
    one), ``max_batch`` the most decoded together (by each of the ``data_parallel`` copies of
    the model behind the one queue), ``admission`` how requests are admitted (``"reserve"``:
    each one's final KV reserved, nothing ever preempted; ``"paged"``: on the KV the batch
    holds now, the request admitted last preempted and recomputed when it runs out, as vLLM's
    paged allocator), ``prefill_chunk`` chunked prefill (at most that many
    prompt tokens an iteration, ``2048`` or ``"2k"``, in the decode step's forward; None:
    prompts prefilled whole). With ``turns`` > 1 each arrival is a conversation of that many
    turns (``rate`` and ``requests`` count conversations): a later turn sends the conversation
    so far plus ``followup`` new tokens (a count or distribution, as ``prompt``), ``think_s``
    seconds on average (exponential) after the turn before has finished, and with
    ``prefix_cache`` the server keeps a conversation's KV between its turns where memory
    allows, a later turn prefilling only its new tokens (the summary's
    ``prefix_cached_fraction``). ``kv_offload_gb`` > 0 gives that cache a host KV store of
    that many GB on ``kv_offload_tier`` (default: the DRAM tier of the GPU's socket): each
    finished turn's KV is written there too, and a later turn whose KV has left HBM loads it
    back as it prefills (the summary's ``prefix_loaded_fraction``); it needs
    ``prefix_cache`` and a policy that keeps KV in HBM (``gpu_only``). With ``data_parallel``
    copies a later turn waits for the copy whose cache holds its KV at most
    ``affinity_wait_s`` seconds (default inf: however long) before any copy with room takes
    it. ``followup``, ``think_s``, ``prefix_cache``, ``kv_offload_gb``, ``kv_offload_tier``
    and ``affinity_wait_s`` need ``turns`` > 1, and a ``trace`` takes no conversations.
    Returns a ``ServeResult`` (``summary()`` a row, ``requests_frame()`` one row per
    request), or with ``find_rate`` a ``RateSearch`` (``rate_per_s``, its ``result``, every
    rate tried in ``probes``).
    """
    from hgsim.catalog import get_model
    from hgsim.policies import checked_options
    from hgsim.serving import (
        RequestMix,
        Slo,
        StepTimes,
        check_admission,
        kv_offload,
        longest_prompt,
        max_rate,
        read_trace,
        run_labels,
    )
    from hgsim.serving import serve_requests as run
    from hgsim.serving.requests import (
        check_affinity_wait_s,
        check_think_s,
        check_turns,
        output_lengths,
        prompt_lengths,
    )
    from hgsim.workload import Workload

    loads = [name for name, given in (("rate", rate is not None), ("trace", trace is not None),
                                      ("find_rate", bool(find_rate))) if given]
    if len(loads) != 1:
        raise UserError(f"give exactly one of rate, trace and find_rate, got "
                        f"{', '.join(loads) or 'none'}", field="rate")
    if rate is not None and not (isinstance(rate, (int, float)) and not isinstance(rate, bool)
                                 and math.isfinite(rate) and rate > 0):
        raise UserError(f"must be a positive number of requests per second, got {rate!r}",
                        field="rate")
    given = next((name for name, value in (("prompt", prompt), ("output", output),
                                           ("requests", requests), ("seed", seed))
                  if value is not None), None)
    if trace is not None and given is not None:  # else silently ignored
        raise UserError(f"a trace's rows set the requests (their arrivals and lengths): drop "
                        f"{given} or trace", field=given)
    prompt = "32k" if prompt is None else prompt
    output = 256 if output is None else output
    requests = 500 if requests is None else requests
    seed = 0 if seed is None else seed
    for name, value, least in (("requests", requests, 1), ("max_batch", max_batch, 1),
                               ("seed", seed, 0), ("tensor_parallel", tensor_parallel, 1),
                               ("data_parallel", data_parallel, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UserError(f"must be a whole number >= {least}, got {value!r}", field=name)
    limits = {}
    for name, value in (("slo_ttft_s", slo_ttft_s), ("slo_tpot_s", slo_tpot_s)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and value >= 0):
            raise UserError(f"must be a number of seconds >= 0, got {value!r}", field=name)
        limits[name] = math.inf if value is None else float(value)
    if not (isinstance(attainment, (int, float)) and 0 < attainment <= 1):
        raise UserError(f"must be in (0, 1], got {attainment!r}", field="attainment")
    if gpu_placement != "packed" and data_parallel == 1:
        raise UserError("spread places copies of the model, and data_parallel asks for one",
                        field="gpu_placement")
    # what the command line's choices and --option checks refuse, refused here before the
    # first request (inside the simulated server an error would surface mid-run)
    _checked(Workload, dict(context=1, kv_dtype=kv_dtype, weight_dtype=weight_dtype,
                            gpu_placement=gpu_placement), names={})
    options = _options(options)
    checked_options(policy, options)
    prefill_chunk = _prefill_chunk(prefill_chunk)
    check_admission(admission)
    slo = Slo(ttft_s=limits["slo_ttft_s"], tpot_s=limits["slo_tpot_s"], attainment=attainment)
    if find_rate and not slo.set:
        raise UserError("searches the highest rate meeting an SLO: give slo_ttft_s and/or "
                        "slo_tpot_s", field="find_rate")
    check_turns(turns, "turns")
    check_think_s(think_s, "think_s")
    if not isinstance(prefix_cache, bool):
        raise UserError(f"must be True or False, got {prefix_cache!r}", field="prefix_cache")
    if trace is not None and turns != 1:
        raise UserError("a trace's rows are single requests: it takes no conversations",
                        field="turns")
    followup_dist = prompt_lengths(followup, "followup")
    if turns == 1:
        if str(followup_dist) != "1k":  # the default however it is spelled (1024, "1k")
            raise UserError("applies to conversations: give turns 2 or more", field="followup")
        for name, value, default in (("think_s", think_s, 30.0),
                                     ("prefix_cache", prefix_cache, True),
                                     ("kv_offload_gb", kv_offload_gb, 0.0),
                                     ("kv_offload_tier", kv_offload_tier, None),
                                     ("affinity_wait_s", affinity_wait_s, math.inf)):
            if value != default:
                raise UserError("applies to conversations: give turns 2 or more", field=name)
    if not prefix_cache and kv_offload_gb:
        raise UserError("a store serves the prefix cache: drop prefix_cache=False",
                        field="kv_offload_gb")
    check_affinity_wait_s(affinity_wait_s)
    if affinity_wait_s != math.inf and not prefix_cache:
        raise UserError("a later turn waits for the copy whose prefix cache holds its KV: "
                        "drop prefix_cache=False", field="affinity_wait_s")
    if affinity_wait_s != math.inf and data_parallel == 1:
        raise UserError("applies to several copies: give data_parallel 2 or more",
                        field="affinity_wait_s")
    mix = RequestMix(prompt_lengths(prompt, "prompt"), output_lengths(output, "output"),
                     count=requests, seed=seed, turns=turns,
                     followup=followup_dist, think_s=float(think_s))
    spec = model if isinstance(model, ModelSpec) else get_model(model)
    listed = read_trace(trace) if trace is not None else mix.requests(rate or 1.0)
    with parallelism_named("tensor_parallel", "data_parallel"):
        times = StepTimes(with_overrides(profile, hardware or {}), spec, policy,
                          options, kv_dtype=kv_dtype, weight_dtype=weight_dtype,
                          tensor_parallel=tensor_parallel, data_parallel=data_parallel,
                          gpu_placement=gpu_placement, prefill_chunk=prefill_chunk,
                          longest_prompt=longest_prompt(listed))
        times.fits(1, 2)  # the policy builds on this machine (options the profile rules out)
    store = kv_offload(times.profile, policy, kv_offload_gb, kv_offload_tier)
    labels = run_labels(times, max_batch=max_batch, mix=mix, traced=trace is not None,
                        prefix_cache=prefix_cache, kv_offload=store,
                        affinity_wait_s=float(affinity_wait_s), admission=admission)
    if find_rate:
        return max_rate(times, mix, max_batch=max_batch, slo=slo, labels=labels,
                        prefix_cache=prefix_cache, kv_offload=store,
                        affinity_wait_s=affinity_wait_s, admission=admission)
    offered = math.nan if trace is not None else rate
    return run(times, listed, max_batch=max_batch, rate_per_s=offered, slo=slo, labels=labels,
               prefix_cache=prefix_cache, kv_offload=store, affinity_wait_s=affinity_wait_s,
               admission=admission)


def _options(options: Any) -> dict[str, Any]:
    """The ``options`` argument as a dict of the policy's options (None: none), or a
    UserError naming it where it is no mapping of option names."""
    if options is not None and not isinstance(options, Mapping):
        raise UserError(f"expected a mapping of option names to values, e.g. "
                        f"{{'topk_ratio': 0.1}}, got {options!r}", field="options")
    bad_name = next((k for k in options or {} if not isinstance(k, str)), None)
    if bad_name is not None:
        raise UserError(f"option names are text, got {bad_name!r}", field="options")
    return dict(options or {})


def _prefill_chunk(prefill_chunk: Any) -> int | None:
    """``serve``'s ``prefill_chunk`` as the command line takes it: None, or a token count
    (``2048``, ``"2k"``), checked (``hgsim.serving.check_prefill_chunk``)."""
    from hgsim.serving import check_prefill_chunk
    from hgsim.units import parse_count

    if isinstance(prefill_chunk, str):
        try:
            prefill_chunk = parse_count(prefill_chunk)
        except ValueError as exc:
            raise UserError(str(exc), field="prefill_chunk") from None
    check_prefill_chunk(prefill_chunk, "prefill_chunk")
    return prefill_chunk


def _overrides(name: str, given: Mapping[str, Any] | None):
    """Argument ``name`` (``selection`` or ``attention``) as its accuracy-model dataclass
    (None: the defaults), or a UserError naming the field that is wrong."""
    from hgsim.accuracy.overrides import FieldError, override_groups

    group = override_groups()[name]
    if given is not None and not isinstance(given, Mapping):
        raise UserError(f"expected a mapping of {name} fields to values, e.g. "
                        f"{group.example}, got {given!r}", field=name)
    try:
        return group.build(given)
    except FieldError as exc:
        raise UserError(exc.reason, field=f"{name}.{exc.field}") from None


def _checked(model: type, values: dict[str, Any], names: dict[str, str]):
    """``model(**values)``, or a UserError naming the argument (``names`` maps a field to the
    argument that sets it) as a person would say it."""
    from hgsim.config_io import humane

    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        raise UserError(humane(first), field=names.get(field, field) or None) from None


def run_study(
    study: str | os.PathLike[str] | Mapping[str, Any],
    *,
    out: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    force: bool = False,
    figures: bool = True,
    quiet: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
):
    """Run a study (a YAML path, or the mapping the file would hold) and return its results
    table as a ``pandas.DataFrame``, one row per point, derived columns included.

    Outputs land in ``out`` (default ``results/<name>``) exactly as with ``hgsim study``, and
    points stored there by an earlier run are reused unless ``force``. ``jobs`` worker
    processes (default: all cores; 1 runs in this process). Profile and model paths in a
    mapping are relative to ``base_dir`` (default: the working directory).
    ``frame.attrs["out"]`` holds the output folder. Points that failed are missing from the frame and reported as a warning.
    """
    from hgsim.study import RunOptions, load_study_data
    from hgsim.study import run_study as run
    from hgsim.study.execute import ExecOptions

    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UserError(f"must be a whole number >= 1, got {jobs!r}", field="jobs")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise UserError(f"expected a folder path or None, got {out!r}", field="out")
    if not isinstance(study, (Mapping, str, os.PathLike)):
        raise UserError(f"expected a study YAML path or the mapping it would hold, got "
                        f"{study!r}", field="study")
    target = (load_study_data(study, base_dir=base_dir) if isinstance(study, Mapping)
              else Path(study))
    options = RunOptions(out=Path(out) if out is not None else None, force=force,
                         figures=figures, quiet=quiet,
                         execution=ExecOptions(jobs=jobs, progress=not quiet))
    result = run(target, options)
    if result.stats.errors:
        first = result.stats.errors[0]
        warnings.warn(f"{len(result.stats.errors)} point(s) failed, e.g. {first['key']}: "
                      f"{first['error']}", RuntimeWarning, stacklevel=2)
    frame = result.frame
    if frame is None:  # pragma: no cover - only a dry run has no frame
        raise RuntimeError("the study produced no results table")
    frame.attrs["out"] = str(result.out)
    return frame


def list_profiles() -> list[str]:
    """Profile names ``load_profile`` resolves ($HGSIM_PROFILE_PATH, then the shipped ones)."""
    from hgsim.profiles import list_profiles as names

    return names()


def list_policies() -> dict[str, str]:
    """Policy name -> description, built-in and installed plugins."""
    from hgsim.policies import registry

    return {name: entry[2] for name, entry in registry.registered().items()}


def list_models() -> list[str]:
    """Model names: user models on $HGSIM_MODEL_PATH, then the catalog
    (``hgsim.catalog.get_model`` also accepts aliases and model file paths)."""
    from hgsim.catalog import MODELS
    from hgsim.model_files import user_model_files

    return [*user_model_files(), *(name for name in MODELS if name not in user_model_files())]

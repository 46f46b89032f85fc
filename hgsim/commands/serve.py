"""``hgsim serve``: an online server under a request load, or the highest load it sustains."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from hgsim.commands.checks import argument_seed, check_gpu_placement, count, non_negative, whole
from hgsim.commands.policy_options import named_as_flags, policy_options
from hgsim.errors import UserError, fields_renamed
from hgsim.outputs import check_output_file, finite_for_json, written_whole
from hgsim.tensor_parallel import parallelism_named


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve requests arriving at a rate (continuous batching): TTFT, TPOT, goodput",
        description="Simulate an online server: requests arrive (Poisson at --rate, or a "
                    "--trace), wait, join the running batch while memory allows and leave "
                    "when done. Prints TTFT, TPOT and end-to-end percentiles and throughput; "
                    "--find-rate searches the highest rate meeting an SLO (docs/serving.md).",
    )
    p.add_argument("--profile", required=True, help="profile name or YAML path")
    p.add_argument("--model", required=True, help="model name or model file path")
    p.add_argument("--policy", default="hybridgen", help="KV policy (default: hybridgen)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option, e.g. topk_ratio=0.1 (repeatable)")
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, metavar="REQ_PER_S",
                      help="requests per second, arriving as a Poisson process")
    load.add_argument("--find-rate", action="store_true",
                      help="search the highest rate at which --attainment of the requests meet "
                           "the SLO (--slo-ttft and/or --slo-tpot-ms)")
    load.add_argument("--trace", metavar="REQUESTS.csv",
                      help="requests from a CSV file: arrival_s, prompt_tokens, output_tokens")
    p.add_argument("--prompt", metavar="DIST",
                   help="prompt tokens per request: 32k, uniform:8k:64k or lognormal:32k:0.5 "
                        "(median, sigma) (default 32k)")
    p.add_argument("--output", metavar="DIST",
                   help="tokens generated per request, the same forms (default 256)")
    p.add_argument("--requests", metavar="N",
                   help="requests to serve (default 500)")
    p.add_argument("--seed", type=argument_seed, help="seed of arrivals and lengths (default 0)")
    p.add_argument("--max-batch", type=int, default=256, metavar="N",
                   help="most requests decoded together (vLLM's max_num_seqs; default 256)")
    p.add_argument("--admission", choices=["reserve", "paged"], default="reserve",
                   help="reserve: admit a request when its final KV (prompt plus output) fits "
                        "beside the others' final KV, never preempting (the default); paged: "
                        "admit on the KV the batch holds now and preempt the request admitted "
                        "last when it runs out, recomputing it later (vLLM's paged allocator)")
    p.add_argument("--prefill-chunk", metavar="TOKENS",
                   help="chunked prefill: each iteration prefills at most TOKENS of the "
                        "waiting prompts, in order, in the same forward as the decode step "
                        "(e.g. 2048 or 2k; 0, the default: prompts prefilled whole, before "
                        "the step)")
    p.add_argument("--turns", metavar="N",
                   help="each arrival a conversation of N turns, a later turn sending the "
                        "conversation so far plus --followup new tokens; --rate and --requests "
                        "count conversations (default 1)")
    p.add_argument("--followup", metavar="DIST",
                   help="new tokens of each later turn of a conversation, the forms of --prompt "
                        "(default 1k)")
    p.add_argument("--think", type=float, metavar="SECONDS",
                   help="mean seconds (exponential) between a turn's last token and the "
                        "conversation's next turn (default 30)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="keep no conversation's KV between its turns (default: kept where "
                        "memory allows, each later turn prefilling only its new tokens)")
    p.add_argument("--kv-offload-gb", type=float, metavar="GB",
                   help="a host KV store of GB for the prefix cache: each finished turn's KV "
                        "written to host memory too, a later turn whose KV left HBM loading "
                        "it back as it prefills (vLLM's KV offloading; default 0: none)")
    p.add_argument("--kv-offload-tier", metavar="TIER",
                   help="the host memory tier of --kv-offload-gb (default: the DRAM tier of "
                        "the GPU's socket)")
    p.add_argument("--affinity-wait", type=float, metavar="SECONDS",
                   help="with --data-parallel, the most seconds a later turn waits for the "
                        "copy whose prefix cache holds its KV before any copy with room takes "
                        "it, prefilling it again (default: it waits however long)")
    p.add_argument("--kv-dtype", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="element type of the KV cache (default fp16)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over the profile's first N GPUs (default 1)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="N copies of the model behind one queue, each on its own GPUs, sharing "
                        "the host (default 1)")
    p.add_argument("--gpu-placement", choices=["packed", "spread"], default="packed",
                   help="which GPUs the copies take: packed (the profile's order) or spread "
                        "(each copy on the next socket)")
    p.add_argument("--slo-ttft", type=float, metavar="SECONDS",
                   help="time-to-first-token limit a request must meet")
    p.add_argument("--slo-tpot-ms", type=float, metavar="MS",
                   help="time-per-output-token limit a request must meet (milliseconds)")
    p.add_argument("--attainment", type=float, metavar="SHARE",
                   help="share of requests that must meet the SLO (default 0.9)")
    p.add_argument("--requests-csv", metavar="OUT.csv",
                   help="write one row per request (lengths, queueing, TTFT, TPOT)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def mix_as_flags():
    """A context in which a request mix's mistake (a rate, too many turns) names the flag
    that asked for it."""
    return fields_renamed({"rate": "--rate", "turns": "--turns"})


def arrivals(mix, rate: float):
    """``mix``'s requests at ``rate``, a mistake naming ``--rate`` (or ``--turns``)."""
    with mix_as_flags():
        return mix.requests(rate)


#: The flags of a drawn mix of requests, which a trace's rows replace, and their values when
#: not given.
MIX_FLAGS = (("prompt", "--prompt", "32k"), ("output", "--output", "256"),
             ("requests", "--requests", "500"), ("seed", "--seed", 0))


def mix_flags_of(args: argparse.Namespace) -> dict[str, object]:
    """``--prompt``, ``--output``, ``--requests`` and ``--seed``, their defaults where not
    given; a trace's rows set the requests, so with ``--trace`` each given is refused (it
    would be silently ignored)."""
    values = {}
    for name, flag, default in MIX_FLAGS:
        value = getattr(args, name)
        if value is not None and args.trace is not None:
            raise UserError(f"a trace's rows set the requests (their arrivals and lengths): "
                            f"drop {flag} or --trace", field=flag)
        values[name] = default if value is None else value
    return values


#: The flags of a conversation beside --turns, and their values when not given.
CONVERSATION_FLAGS = (("followup", "--followup"), ("think", "--think"),
                      ("no_prefix_cache", "--no-prefix-cache"),
                      ("kv_offload_gb", "--kv-offload-gb"),
                      ("kv_offload_tier", "--kv-offload-tier"),
                      ("affinity_wait", "--affinity-wait"))
DEFAULT_FOLLOWUP = "1k"
DEFAULT_THINK_S = 30.0


def conversation_of(args: argparse.Namespace) -> tuple[int, str, float, bool]:
    """``--turns``, ``--followup``, ``--think`` and whether the prefix cache is on, checked:
    a trace's rows are single requests, the flags beside --turns need conversations, and a
    host KV store (``--kv-offload-gb``) and ``--affinity-wait`` the prefix cache (the latter
    several copies too)."""
    from hgsim.serving.requests import check_affinity_wait_s, check_think_s, check_turns

    # given: not None (a switch: not False); 0 is given (--think 0, --kv-offload-gb 0)
    given = [flag for name, flag in (("turns", "--turns"), *CONVERSATION_FLAGS)
             if getattr(args, name) is not None and getattr(args, name) is not False]
    if args.trace is not None and given:
        raise UserError("a trace's rows are single requests: it takes no conversations",
                        field=given[0])
    turns = 1
    if args.turns is not None:
        turns = whole(args.turns, "--turns", "turns")
        check_turns(turns, "--turns")
    if turns == 1 and (extra := [flag for flag in given if flag != "--turns"]):
        raise UserError("applies to conversations: give --turns 2 or more", field=extra[0])
    think = DEFAULT_THINK_S if args.think is None else args.think
    check_think_s(think, "--think")
    if args.no_prefix_cache and args.kv_offload_gb:
        raise UserError("a store serves the prefix cache: drop --no-prefix-cache",
                        field="--kv-offload-gb")
    if args.affinity_wait is not None:
        check_affinity_wait_s(args.affinity_wait, "--affinity-wait")
        if args.no_prefix_cache:
            raise UserError("a later turn waits for the copy whose prefix cache holds its KV: "
                            "drop --no-prefix-cache", field="--affinity-wait")
        if args.data_parallel == 1:
            raise UserError("applies to several copies: give --data-parallel 2 or more",
                            field="--affinity-wait")
    return (turns, DEFAULT_FOLLOWUP if args.followup is None else args.followup, think,
            not args.no_prefix_cache)


def slo_of(args: argparse.Namespace):
    from hgsim.serving import Slo

    ttft = math.inf if args.slo_ttft is None else non_negative(args.slo_ttft, "--slo-ttft")
    tpot = (math.inf if args.slo_tpot_ms is None
            else non_negative(args.slo_tpot_ms, "--slo-tpot-ms") / 1e3)
    if args.attainment is None:
        attainment = 0.9
    elif math.isinf(ttft) and math.isinf(tpot):  # else silently nothing to attain
        raise UserError("is the share of requests that must meet an SLO: give --slo-ttft "
                        "and/or --slo-tpot-ms", field="--attainment")
    else:
        attainment = non_negative(args.attainment, "--attainment", most=1.0)
    if attainment == 0:
        raise UserError("must be above 0 (every rate would meet it)", field="--attainment")
    return Slo(ttft_s=ttft, tpot_s=tpot, attainment=attainment)


def run(args: argparse.Namespace) -> int:
    from hgsim.catalog import get_model
    from hgsim.profiles import load_profile
    from hgsim.serving import (
        RequestMix,
        StepTimes,
        check_prefill_chunk,
        kv_offload,
        longest_prompt,
        max_rate,
        read_trace,
        run_labels,
        serve_requests,
    )
    from hgsim.serving.requests import MAX_REQUESTS, output_lengths, prompt_lengths

    if args.max_batch < 1:
        raise UserError(f"must be >= 1, got {args.max_batch}", field="--max-batch")
    drawn = mix_flags_of(args)
    if drawn["seed"] < 0:
        raise UserError(f"must be >= 0, got {drawn['seed']}", field="--seed")
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        raise UserError(f"must be a positive number of requests per second, got {args.rate:g}",
                        field="--rate")
    check_gpu_placement(args.gpu_placement, args.data_parallel)
    slo = slo_of(args)
    if args.find_rate and not slo.set:
        raise UserError("searches the highest rate meeting an SLO: give --slo-ttft SECONDS "
                        "and/or --slo-tpot-ms MS", field="--find-rate")
    prefill_chunk = None
    if args.prefill_chunk is not None:
        prefill_chunk = count(args.prefill_chunk, "--prefill-chunk")
        check_prefill_chunk(prefill_chunk, "--prefill-chunk")
    requests_n = whole(drawn["requests"], "--requests", "requests")
    if not 1 <= requests_n <= MAX_REQUESTS:
        raise UserError(f"must be between 1 and {MAX_REQUESTS:,}, got {requests_n}",
                        field="--requests")
    turns, followup, think, prefix_cache = conversation_of(args)
    with mix_as_flags():
        mix = RequestMix(prompt_lengths(drawn["prompt"], "--prompt"),
                         output_lengths(drawn["output"], "--output"),
                         count=requests_n, seed=drawn["seed"], turns=turns,
                         followup=prompt_lengths(followup, "--followup"), think_s=think)
    if args.trace is not None and not args.trace.strip():
        raise UserError(f"needs the path of a CSV file, got {args.trace!r}", field="--trace")
    trace = read_trace(args.trace) if args.trace is not None else None
    csv_path = (check_output_file(args.requests_csv, "--requests-csv")
                if args.requests_csv is not None else None)
    if csv_path is not None and trace is not None and same_file(csv_path, args.trace):
        raise UserError(f"{csv_path} is the --trace file this run reads: writing it would "
                        "replace the trace; give another path", field="--requests-csv")
    options = policy_options(args.option, args.policy)
    model = get_model(args.model)
    listed = trace if trace is not None else (
        arrivals(mix, args.rate if args.rate is not None else 1.0))
    with named_as_flags(), parallelism_named("--tensor-parallel", "--data-parallel"):
        times = StepTimes(load_profile(args.profile), model, args.policy, options,
                          kv_dtype=args.kv_dtype, tensor_parallel=args.tensor_parallel,
                          data_parallel=args.data_parallel, gpu_placement=args.gpu_placement,
                          prefill_chunk=prefill_chunk, longest_prompt=longest_prompt(listed))
        times.fits(1, 2)  # the policy builds on this machine (options the profile rules out)
    store = kv_offload(times.profile, args.policy,
                       0.0 if args.kv_offload_gb is None else args.kv_offload_gb,
                       args.kv_offload_tier, gb_field="--kv-offload-gb",
                       tier_field="--kv-offload-tier")
    wait = math.inf if args.affinity_wait is None else args.affinity_wait
    labels = run_labels(times, max_batch=args.max_batch, mix=mix, traced=trace is not None,
                        prefix_cache=prefix_cache, kv_offload=store, affinity_wait_s=wait,
                        admission=args.admission)
    bar = RequestBar(not args.no_progress)
    with named_as_flags():
        try:
            if args.find_rate:
                search = max_rate(times, mix, max_batch=args.max_batch, slo=slo, labels=labels,
                                  on_probe=bar.probe, prefix_cache=prefix_cache,
                                  kv_offload=store, affinity_wait_s=wait,
                                  admission=args.admission)
                result = search.result
            else:
                bar.start(len(listed))
                offered = math.nan if trace is not None else args.rate
                result = serve_requests(times, listed, max_batch=args.max_batch,
                                        rate_per_s=offered, slo=slo, labels=labels,
                                        on_finish=bar.update, prefix_cache=prefix_cache,
                                        kv_offload=store, affinity_wait_s=wait,
                                        admission=args.admission)
                search = None
        finally:
            bar.close()
    if result is not None and csv_path is not None:
        with written_whole(csv_path, newline="") as fh:  # a full disk: one line naming it
            result.requests_frame().to_csv(fh, index=False)
    if search is None:
        row = result.summary()
    else:
        row = search.row(labels, times.simulations)
        row["rate_search"] = [{"rate_per_s": r, "slo_attainment": a} for r, a in search.probes]
        row["rate_search_note"] = search.reason
    if args.json:
        print(json.dumps(finite_for_json(row), indent=2, default=str))
    else:
        print_summary(row, slo, search)
    if search is None and (note := rejection_note(result)) is not None:
        print(f"hgsim serve: note: {note}", file=sys.stderr)
    if csv_path is not None and result is not None:
        notice = f"{len(result.served)} requests written to {csv_path}"
        if args.json:  # stdout stays one JSON document
            print(notice, file=sys.stderr)
        else:
            print(f"\n{notice}")
    return 0


def rejection_note(result) -> str | None:
    """Why a run served nothing: every request rejected, with the most common reason (None
    where any request completed)."""
    from collections import Counter

    reasons = Counter(s.rejected for s in result.served)
    if not result.served or "" in reasons:
        return None
    reason, times = reasons.most_common(1)[0]
    n = len(result.served)
    share = "" if times == n else f" ({times} of them)"
    return f"all {n} requests rejected: {reason}{share}"


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same resolved path (``./t.csv`` and
    ``t.csv``, through a symbolic link) or, both existing, the same inode (a hard link)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


class RequestBar:
    """Requests finished (one run) or rates tried (a search), on stderr when it is a
    terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def start(self, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="req", desc="requests", dynamic_ncols=True,
                            file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def probe(self, rate: float, attainment: float) -> None:
        if self.enabled:
            print(f"  {rate:.4g} req/s: {attainment:.1%} met the SLO", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def print_summary(row: dict, slo, search) -> None:
    from rich.console import Console
    from rich.table import Table

    from hgsim.serving import rate_unit

    console = Console()
    copies = (f", {row['data_parallel']} copies ({row['gpu_placement']})"
              if row["data_parallel"] > 1 else "")
    shards = f", TP {row['tensor_parallel']}" if row["tensor_parallel"] > 1 else ""
    title = (f"{row['model']} on {row['profile']}, {row['policy']}{shards}{copies}, max batch "
             f"{row['max_batch']}{' a copy' if copies else ''}, prompt {row['prompt']}, "
             f"output {row['output']}")
    if row.get("admission") == "paged":
        title += ", paged admission"
    if row.get("prefill_chunk"):
        title += f", prefill in chunks of {row['prefill_chunk']}"
    if row.get("turns", 1) > 1:
        title += (f", conversations of {row['turns']} turns (follow-up {row['followup']}, "
                  f"think {row['think_s']:g} s), prefix cache "
                  f"{'on' if row['prefix_cache'] else 'off'}")
        if row.get("kv_offload_gb"):
            title += f", host KV store {row['kv_offload_gb']:g} GB on {row['kv_offload_tier']}"
        wait = row.get("affinity_wait_s", math.inf)
        if wait is not None and math.isfinite(wait):
            title += f", a later turn waits at most {wait:g} s for its copy"
    if search is not None:
        if search.unbounded:
            console.print(f"[bold]{title}[/bold]\nno limit on the rate found ({slo}): "
                          f"{search.reason}")
        elif search.rate_per_s is None:
            console.print(f"[bold]{title}[/bold]\n[red]no rate meets the SLO[/red] ({slo}): "
                          f"{search.reason}")
        else:
            console.print(f"[bold]{title}[/bold]\nhighest rate meeting {slo}: "
                          f"[bold]{search.rate_per_s:.4g} {rate_unit(row.get('turns', 1))}"
                          "[/bold] "
                          f"({len(search.probes)} rates tried)")
        if search.bound_by:
            console.print(f"bound by {search.bound_by.upper()}: {search.bound_note}")
        if "requests" not in row:
            return
    cached = "prefix_cached_fraction" in row
    loaded = bool(row.get("kv_offload_gb")) and "prefix_loaded_fraction" in row
    paged = row.get("admission") == "paged"
    summary = Table(title=title if search is None else "at that rate", title_justify="left",
                    caption="batch: mean decoded together; busy: share of the time the engine "
                            "ran; prefill: share of that spent prefilling (chunked: what the "
                            "chunks added to their steps)"
                            + ("; cached: share of the served turns' prompt tokens the prefix "
                               "cache held (not prefilled again)" if cached else "")
                            + ("; loaded: share of those prompt tokens the host KV store held "
                               "(loaded back, part of cached)" if loaded else "")
                            + ("; preempted: requests' KV freed to make room, and the share "
                               "of prefilled tokens that were recomputed" if paged else ""),
                    caption_justify="left")
    # the rate's unit in its header (a trace's arrivals are its own: "trace")
    for column in (f"rate\n{rate_unit(row.get('turns', 1))}", "done", "rejected",
                   "output\ntokens/s", "req/s", "batch", "busy", "prefill",
                   *(("cached",) if cached else ()), *(("loaded",) if loaded else ()),
                   *(("preempted", "recomputed") if paged else ())):
        summary.add_column(column, justify="right")
    summary.add_row(number(row["rate_per_s"], ".4g") if math.isfinite(row["rate_per_s"])
                    else "trace", str(row["completed"]), str(row["rejected"]),
                    number(row["output_tokens_per_s"], ".4g"),
                    number(row["requests_per_s"], ".4g"), number(row["mean_batch"], ".3g"),
                    number(row["busy_fraction"], ".0%"), number(row["prefill_fraction"], ".0%"),
                    *((number(row["prefix_cached_fraction"], ".0%"),) if cached else ()),
                    *((number(row["prefix_loaded_fraction"], ".0%"),) if loaded else ()),
                    *((str(row["preemptions"]), number(row["recomputed_fraction"], ".1%"))
                      if paged else ()))
    print_whole(console, summary)
    latency = Table(title="latency per request (seconds; TPOT in ms)", title_justify="left")
    latency.add_column("")
    for q in ("mean", "p50", "p90", "p99"):
        latency.add_column(q, justify="right")
    turns = (("ttft_first", "  first turns", 1), ("ttft_later", "  later turns", 1)
             ) if "ttft_first_mean_s" in row else ()
    for stem, name, scale in (("queue", "queueing", 1), ("ttft", "TTFT", 1), *turns,
                              ("tpot", "TPOT (ms)", 1e3), ("e2e", "end to end", 1)):
        latency.add_row(name, *(number(row[f"{stem}_{q}_s"] * scale, ".4g")
                                for q in ("mean", "p50", "p90", "p99")))
    print_whole(console, latency)
    if math.isfinite(row.get("energy_j", math.nan)) and row["completed"] == 0:
        console.print(f"energy: {row['power_w']:.4g} W on average ({row['energy_j']:.4g} J), "
                      "no output token to charge it to")
    elif math.isfinite(row.get("energy_j", math.nan)):
        console.print(f"energy: {row['power_w']:.4g} W on average ({row['energy_j']:.4g} J), "
                      f"{row['energy_j_per_output_token']:.3g} J per output token; cost "
                      f"${row['usd_per_mtok']:.3g} per million output tokens "
                      f"(capital ${row['usd_per_mtok_capex']:.3g}, electricity "
                      f"${row['usd_per_mtok_energy']:.3g})")
    if "slo_attainment" in row:
        console.print(f"SLO {slo}: {row['slo_attainment']:.1%} of requests met it "
                      f"(goodput {row['goodput_requests_per_s']:.4g} requests/s)")


def number(value: float, spec: str) -> str:
    """``value`` in format ``spec``, or "-" where it is NaN (no request to measure)."""
    return "-" if math.isnan(value) else format(value, spec)


def print_whole(console, table) -> None:
    """Print ``table`` with every cell whole: at the console's width where its columns fit
    there, else as wide as they need (rich would cut numbers to "0.25…" to fit 80 columns
    when the output is a pipe)."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(10_000), table).maximum
    width = console.width
    if need <= width:
        console.print(table)
        return
    console.width = need
    try:
        console.print(table)
    finally:
        console.width = width

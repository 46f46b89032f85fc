"""``hgsim simulate``: one configuration, printed as tables (and optionally a Perfetto trace)."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from hgsim.commands.checks import check_gpu_placement, count, non_negative
from hgsim.commands.policy_options import named_as_flags, policy_options
from hgsim.errors import TraceTooLarge, UserError
from hgsim.outputs import TRACE_MAX_BYTES, check_output_file, finite_for_json
from hgsim.results import SimResult
from hgsim.search_path import shown
from hgsim.units import size_text


def decisions_between(steps: list) -> str:
    """The scheduler's decisions over a run of steps, counted (``hold x7, shrink x1``): the
    table shows every Nth step, and the scheduler decides every ``interval`` steps, so the
    shown steps alone would mostly show none."""
    counts: dict[str, int] = {}
    for s in steps:
        if s.decision:
            counts[s.decision] = counts.get(s.decision, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate one configuration and print latency, throughput and breakdowns",
        description="Simulate LLM decoding of one model on one hardware profile under one policy.",
    )
    p.add_argument("--profile", required=True, help="profile name or YAML path (see `hgsim profiles`)")
    p.add_argument("--model", required=True, help="model name (see `hgsim models`) or a "
                   "path to a Hugging Face config.json or a model YAML file")
    p.add_argument("--policy", default="hybridgen",
                   help="KV policy, built-in or plugin (see `hgsim policies`; default: hybridgen)")
    p.add_argument("--context", required=True, help="tokens in the KV cache at decode start, e.g. 32k")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--gen", default="256", help="tokens generated per sequence (default 256)")
    p.add_argument("--kv-dtype", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"],
                   help="element type of the KV cache (default fp16)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over the profile's first N GPUs by tensor parallelism "
                        "(default 1; docs/model.md, tensor parallelism)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="run N copies of the model side by side, each on its own GPUs (the "
                        "next --tensor-parallel of them) decoding its own --batch sequences, "
                        "all sharing the host (default 1; docs/model.md, data parallelism)")
    p.add_argument("--gpu-placement", choices=["packed", "spread"], default="packed",
                   help="which GPUs the copies take: packed, the profile's order (one socket's "
                        "GPUs first; default), or spread, each copy on the next socket")
    p.add_argument("--prefill", action="store_true", help="also simulate the prompt's prefill")
    p.add_argument("--prefill-chunk", metavar="TOKENS",
                   help="prefill each sequence's prompt in chunks of TOKENS, e.g. 8k, or 'auto': "
                        "the size that minimises TTFT + decode time (default: the whole prompt "
                        "at once)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option, e.g. topk_ratio=0.1 (repeatable)")
    p.add_argument("--selection", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the approximate selectors the accuracy proxy scores "
                        "with, e.g. history_decay=0.95 (repeatable; docs/studies.md, fidelity)")
    p.add_argument("--attention", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the synthetic attention's shape the accuracy proxy scores "
                        "on and a GQA group union's rows come from, e.g. heavy_fraction=0.05 "
                        "(repeatable; docs/studies.md, fidelity)")
    p.add_argument("--samples", type=int, default=32,
                   help="decode steps simulated in full, the rest interpolated (default 32; "
                        "0 = all)")
    p.add_argument("--trace", metavar="OUT.json", help="write a Chrome/Perfetto trace")
    p.add_argument("--trace-max-gb", type=float, default=None, metavar="GB",
                   help="refuse a trace estimated (from its first simulated step) above GB "
                        f"gigabytes (default {TRACE_MAX_BYTES / 1e9:g}; 40-360 kB per step)")
    p.add_argument("--json", action="store_true", help="print the result row as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help=f"no progress bar (shown on a terminal from {STEPS_FOR_A_BAR} simulated "
                        "steps, e.g. --samples 0 with a long --gen)")
    p.set_defaults(run=run)


def accuracy_model_fields(pairs: list[str], group: str):
    """``--<group> KEY=VALUE`` pairs (``selection``, ``attention``) as the accuracy model's
    dataclass (None: none given), or a UserError naming the flag and the field."""
    from hgsim.accuracy.overrides import FieldError, override_groups
    from hgsim.commands.policy_options import key_value_pairs

    flag = f"--{group}"
    values = key_value_pairs(pairs, flag, "field")
    try:
        return override_groups()[group].build(values)
    except FieldError as exc:
        raise UserError(exc.reason, field=f"{flag} {shown(str(exc.field))}") from None


def accuracy_settings(models: dict) -> dict[str, float]:
    """The accuracy model's fields set away from their defaults, by their study column names
    (``fidelity.attention.heavy_fraction``), so a printed or JSON result says what it was
    scored with."""
    from hgsim.accuracy.overrides import override_groups

    groups = override_groups()
    return {f"fidelity.{name}.{field}": value for name, model in models.items()
            for field, value in groups[name].overrides_of(model).items()}


STEPS_FOR_A_BAR = 1024  # simulated decode steps from which a run takes seconds: a bar


class StepBar:
    """A progress bar over the simulated decode steps (``simulate``'s ``on_step``), drawn on
    stderr when it is a terminal and the run simulates ``STEPS_FOR_A_BAR`` steps or more."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < STEPS_FOR_A_BAR:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", desc="decode steps", dynamic_ncols=True,
                            file=sys.stderr, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from hgsim.simulate import Fidelity, simulate
    from hgsim.workload import Workload

    try:
        workload = Workload(
            batch=count(args.batch, "--batch"), context=count(args.context, "--context"),
            gen=count(args.gen, "--gen"), kv_dtype=args.kv_dtype, include_prefill=args.prefill,
            prefill_chunk_tokens=args.prefill_chunk,  # a count or auto, checked by Workload
            tensor_parallel=args.tensor_parallel, data_parallel=args.data_parallel,
            gpu_placement=args.gpu_placement,
        )
    except ValidationError as exc:
        from hgsim.config_io import humane

        first = exc.errors(include_url=False)[0]
        flag = {"prefill_chunk_tokens": "prefill-chunk",
                "tensor_parallel": "tensor-parallel",
                "data_parallel": "data-parallel"}.get(str(first["loc"][0]),
                                                          str(first["loc"][0]))
        raise UserError(humane(first), field="--" + flag) from None
    # a valid chunk without --prefill: else silently no prefill at all
    if args.prefill_chunk is not None and not args.prefill:
        raise UserError("chunks the prompt's prefill, which runs only with --prefill: add it",
                        field="--prefill-chunk")
    check_gpu_placement(args.gpu_placement, args.data_parallel)
    if args.samples < 0:
        raise UserError(f"must be >= 0, got {args.samples}", field="--samples")
    # a limit without --trace: else silently nothing to limit (as --prefill-chunk)
    if args.trace_max_gb is not None and args.trace is None:
        raise UserError("limits the trace, which is written only with --trace: add it",
                        field="--trace-max-gb")
    trace_max_gb = non_negative(TRACE_MAX_BYTES / 1e9 if args.trace_max_gb is None
                                else args.trace_max_gb, "--trace-max-gb")
    if trace_max_gb == 0:
        raise UserError("must be above 0 (it refuses every trace)", field="--trace-max-gb")
    options = policy_options(args.option, args.policy)
    from hgsim.accuracy.overrides import override_groups

    models = {group: accuracy_model_fields(getattr(args, group), group)
              for group in override_groups()}
    # Before the simulation: a trace that cannot be written would lose its result at the end.
    # "" is a mistake, not "no trace"
    trace = check_output_file(args.trace, "--trace") if args.trace is not None else None
    earlier_trace = trace is not None and trace.exists()
    bar = StepBar(not args.no_progress)
    try:
        with named_as_flags():  # an option the profile rules out (host_socket)
            result = simulate(
                args.profile, args.model, args.policy, workload,
                policy_options=options,
                fidelity=Fidelity(decode_samples=args.samples, **models),
                trace_path=trace,
                trace_max_bytes=trace_max_gb * 1e9,
                on_step=bar,
            )
    except TraceTooLarge as big:
        raise UserError(f"would be about {size_text(big.estimate_bytes)} ({big.shape}), over "
                        f"--trace-max-gb {trace_max_gb:g}: give --samples N (simulated steps, "
                        "the rest interpolated) or a smaller --gen, or a larger --trace-max-gb",
                        field="--trace") from None
    finally:
        bar.close()
    settings = accuracy_settings(models)
    # with --json, stdout is the one JSON document: what became of the trace goes to stderr
    notices = sys.stderr if args.json else sys.stdout
    if args.json:
        print(json.dumps(finite_for_json({**result.to_row(), **settings}), indent=2, default=str))
    else:
        print_result(result)
        if settings:
            print("\naccuracy model: " + ", ".join(
                f"{key.removeprefix('fidelity.')}={value:g}" for key, value in settings.items()))
    if trace is not None and result.feasible:
        simulated = sum(s.simulated for s in result.steps)
        print(f"\ntrace written to {trace}: {trace.stat().st_size / 1e6:.2f} MB, "
              f"{simulated} of {len(result.steps)} decode steps simulated "
              "(open in https://ui.perfetto.dev)", file=notices)
    elif trace is not None:
        removed = "; the earlier file there was removed" if earlier_trace else ""
        print(f"\nno trace written to {trace} (infeasible: nothing was simulated{removed})",
              file=notices)
    return 0 if result.feasible else 1


def memory_table(result: SimResult):
    """The footprint per tier against its capacity (rich Table)."""
    from rich.table import Table

    memory = Table(title="memory footprint", title_justify="left")
    for col in ("tier", "used GB", "capacity GB", "use"):
        memory.add_column(col, justify="right" if col != "tier" else "left")
    for tier, used in result.footprint_bytes.items():
        cap = result.capacity_bytes.get(tier, 0.0)
        memory.add_row(tier, f"{used / 1e9:.1f}", f"{cap / 1e9:.1f}",
                       f"{used / cap:.0%}" if cap else "-")
    return memory


def summary_rows(result: SimResult) -> list[tuple[str, str]]:
    """(metric, value) rows of a feasible result's summary; ``hgsim run`` puts a measured
    result's rows beside a simulated one's."""
    stats = result.latency_stats_ms()
    rows = [
        ("per-token latency mean", f"{stats['mean']:.2f} ms"),
        ("per-token latency p50", f"{stats['p50']:.2f} ms"),
        ("per-token latency p99", f"{stats['p99']:.2f} ms"),
        ("throughput", f"{result.tokens_per_s:.3g} tokens/s"  # 0.64, not 0.6, when slow
         + (f" ({result.data_parallel} copies x {result.tokens_per_s / result.data_parallel:.3g})"
            if result.data_parallel > 1 else "")),
    ]
    if result.ttft_s == result.ttft_s:  # NaN: no prefill was simulated
        ttft = result.ttft_s
        rows.append(("time to first token",
                     f"{ttft:.2f} s" if ttft >= 1 else f"{ttft * 1e3:.1f} ms"))
        rows.append(("prefill chunk", prefill_chunk_text(result)))
        rows.append(("request time (TTFT + decode)", f"{result.request_s:.2f} s"))
        if result.prefill_energy_j:
            rows.append(("prefill energy", f"{result.prefill_energy_total_j:,.1f} J"))
        if result.prefill_usd == result.prefill_usd:
            rows.append(("prefill cost", f"${result.prefill_usd:.4f}"))
    rows += [(f"{k.replace('_', ' ')} (per token)", f"{v:.2f} ms")
             for k, v in result.breakdown_ms().items()]
    first, last = result.steps[0], result.steps[-1]
    rows += [
        ("top-k ratio start -> end", f"{first.topk_ratio:.3f} -> {last.topk_ratio:.3f}"),
        ("GPU-resident tokens start -> end", f"{first.gpu_tokens} -> {last.gpu_tokens}"),
        ("accuracy: attention mass kept", f"{result.accuracy_mass_kept:.4f}"),
        ("accuracy: output rel. error", f"{result.accuracy_rel_error:.2e}"),
    ]
    return rows


def prefill_chunk_text(result: SimResult) -> str:
    """The prefill's chunk as run: its tokens, whether it is the whole prompt, whether auto
    chose it."""
    chunk = result.prefill_chunk_tokens
    notes = [n for n, on in (("whole prompt", chunk == result.context),
                             ("auto", result.prefill_chunk_auto)) if on]
    return f"{chunk} tokens" + (f" ({', '.join(notes)})" if notes else "")


def energy_table(result: SimResult):
    """Average power per component over the decode and joules per token (rich Table), or None
    when the profile has no energy figures."""
    from rich.table import Table

    power = result.power_w
    if not power:
        return None
    total = result.power_total_w
    prefill = result.prefill_energy_j  # a column of its own: the decode's figures exclude it
    table = Table(title="energy (decode average" + (", and the prefill's joules)" if prefill
                                                     else ")"), title_justify="left")
    for col in ("component", "average W", "J per token", "share",
                *(("prefill J",) if prefill else ())):
        table.add_column(col, justify="right" if col != "component" else "left")
    tps = result.tokens_per_s
    for name, watts in sorted(power.items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{watts:.1f}", f"{watts / tps:.3g}", f"{watts / total:.1%}",
                      *((f"{prefill.get(name, 0.0):,.1f}",) if prefill else ()))
    table.add_row("total", f"{total:.1f}", f"{result.energy_j_per_token:.3g}", "100%",
                  *((f"{result.prefill_energy_total_j:,.1f}",) if prefill else ()))
    return table


def cost_line(result: SimResult) -> str:
    """Dollars per million tokens and their split (hgsim/tco.py)."""
    if result.usd_per_mtok != result.usd_per_mtok:  # NaN: the profile has no prices
        return "cost: the profile has no prices (see docs/profiles.md, energy and cost)"
    return (f"cost: ${result.usd_per_mtok:,.2f} per million tokens = capital "
            f"${result.usd_per_mtok_capex:,.2f} (${result.capex_usd:,.0f} amortised) + "
            f"electricity ${result.usd_per_mtok_energy:,.2f}")


def print_result(result: SimResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = (f"{result.policy} | {result.model} on {result.profile} | batch {result.batch}, "
             f"context {result.context}, gen {result.gen}")
    if result.tensor_parallel > 1 or result.data_parallel > 1:  # figures are one rank's
        parallel = " x ".join(
            f"{what} {n}" for what, n in (("tensor parallel", result.tensor_parallel),
                                          ("replicas", result.data_parallel)) if n > 1)
        if result.data_parallel > 1:
            parallel += f", {result.gpu_placement}"
        title += (f" | {parallel} (memory per GPU; tokens/s, energy and cost: every GPU and "
                  "the host)")
    memory = memory_table(result)
    if not result.feasible:
        console.print(f"[bold]{title}[/bold]")
        console.print(memory)
        console.print(f"[red]infeasible:[/red] {result.reason}")
        if result.prefill_chunk_auto:
            console.print(f"prefill chunk auto: no chunk from the whole prompt down to "
                          f"{result.prefill_chunk_tokens} tokens fits")
        return
    summary = Table(title=title, title_justify="left")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    rows = summary_rows(result) + [
        ("simulation", f"{result.events} events in {result.wall_s:.2f} s")]
    for name, value in rows:
        summary.add_row(name, value)
    console.print(summary)
    shares = result.binding_shares()
    if shares:
        binds = Table(title="what binds (critical path of a decode step, split by resource)",
                      title_justify="left")
        for col in ("resource", "ms per token", "share"):
            binds.add_column(col, justify="right" if col != "resource" else "left")
        for name, share in shares.items():
            if share >= 0.001:
                binds.add_row(name, f"{result.binding_s[name] * 1e3:.2f}", f"{share:.1%}")
        console.print(binds)
    util = Table(title="utilisation and traffic (decode)", title_justify="left")
    for col in ("resource", "busy", "GB moved"):
        util.add_column(col, justify="right" if col != "resource" else "left")
    for name, u in sorted(result.utilisation.items(), key=lambda kv: -kv[1]):
        moved = result.bytes_by_resource.get(name)
        if u > 0 or moved:
            util.add_row(name, f"{u:.0%}", f"{moved / 1e9:.2f}" if moved else "-")
    console.print(util)
    hbm = [n for n in result.utilisation if n.endswith(".hbm") and n in result.bytes_by_resource]
    if hbm:  # a kernel's bytes are in its stream's row and in HBM's: say which is which
        console.print(f"{', '.join(hbm)}: busy for the kernels' memory time (bytes / achieved "
                      "HBM bandwidth) and DMA in and out; a compute stream's GB are the HBM "
                      "bytes its kernels issued")
    energy = energy_table(result)
    if energy is not None:
        console.print(energy)
    console.print(cost_line(result))
    console.print(memory)
    if len(result.steps) > 1:
        stride = max(1, len(result.steps) // 8)
        sched = Table(title="scheduler (top-k ratio over decode)", title_justify="left",
                      caption=None if stride == 1 else
                      f"decisions: those of a row's step and the {stride - 1} after it",
                      caption_justify="left")
        for col in ("step", "context", "top-k ratio", "GPU tokens", "latency ms", "decisions"):
            sched.add_column(col, justify="right" if col != "decisions" else "left")
        for i in range(0, len(result.steps), stride):
            s = result.steps[i]
            sched.add_row(str(s.step), str(s.context), f"{s.topk_ratio:.3f}", str(s.gpu_tokens),
                          f"{s.latency_s * 1e3:.2f}",
                          decisions_between(result.steps[i:i + stride]))
        console.print(sched)
        if result.decisions:
            counts = ", ".join(f"{k} x{v}" for k, v in sorted(result.decisions.items()))
            console.print(f"scheduler decisions: {counts}\nlast: {result.last_reason}")

"""``hgsim run``: decode for real on this machine, with the simulator's prediction beside it.

Builds the model with random weights at its catalog shapes on the accelerator (CUDA when
available, else the CPU stand-in, where only tiny models or ``--attention-only`` fit), fills the
context with random K/V (no prefill is run: decode speed depends on where tokens sit, not on
their values), decodes ``--gen`` tokens under the policy's plans (HybridGen's scheduler fed the
measured times) and prints the ``simulate`` summary with a measured and a simulated column.

The prediction uses ``--profile``; without it, the calibrated profile ``local`` (written by
``hgsim calibrate --out hardware_profiles/local.yaml``) when it describes this kind of device,
else on CUDA the shipped profile of the same GPU. ``--hbm-budget`` caps the HBM the policy may
plan with and torch may allocate, so a large GPU spills KV exactly as a smaller one would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hgsim.commands.checks import argument_seed, count, local_workers
from hgsim.commands.policy_options import named_as_flags, policy_options
from hgsim.errors import UserError
from hgsim.outputs import check_output_file, check_usable_name, finite_for_json, written_whole


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="decode for real on this machine and print measured beside simulated",
        description=(
            "Run a whole-model decode (random weights at the model's shapes, random context "
            "K/V) with a policy's plans on this machine's GPU (or the CPU stand-in) and print "
            "the simulate table with the simulator's prediction beside the measurement."),
    )
    p.add_argument("--model", required=True, help="model name (see `hgsim models`), a "
                   "config.json or model YAML path, or tiny-llama / tiny-qwen for CPU smoke runs")
    p.add_argument("--policy", default="hybridgen", help="KV policy (default: hybridgen)")
    p.add_argument("--context", required=True, help="tokens attended at the first step, e.g. 64k")
    p.add_argument("--gen", default="64", help="measured decode steps (default 64)")
    p.add_argument("--warmup", default="2",
                   help="steps run before the measured ones and left out of both columns "
                        "(allocation, graph capture; default 2)")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--hbm-budget", metavar="SIZE",
                   help="usable GPU memory, e.g. 24GB: KV spills as on a GPU of that size")
    p.add_argument("--profile", help="profile for the prediction (default: the calibrated "
                   "'local' profile, else the shipped one of this GPU)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="weights, activations and KV (default bf16 on CUDA, fp32 on the stand-in)")
    p.add_argument("--attention-only", action="store_true",
                   help="run the attention path alone (no projections or FFN)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option, e.g. topk_ratio=0.1 (repeatable)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cuda", "standin"],
                   help="device role: CUDA when available (auto), or the CPU stand-in")
    p.add_argument("--host-threads", type=int, help="C-kernel threads (default: every core but "
                   "the one submitting device work)")
    p.add_argument("--eager", action="store_true",
                   help="issue device work op by op instead of as captured CUDA graphs "
                        "(the default on CUDA), for comparison")
    p.add_argument("--samples", type=int, default=0,
                   help="simulated steps, the rest interpolated (default 0: every step)")
    p.add_argument("--seed", type=argument_seed, default=0)
    p.add_argument("--out", metavar="PREFIX", help="also write PREFIX.steps.csv and PREFIX.json")
    p.add_argument("--json", action="store_true", help="print both result rows as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace):
    from hgsim.catalog import get_model
    from hgsim.hbm_budget import HbmBudget
    from hw_backend.measured_run import RunConfig

    if args.samples < 0:
        raise UserError(f"must be >= 0, got {args.samples}", field="--samples")
    if args.host_threads is not None and args.host_threads < 1:
        raise UserError("--host-threads must be >= 1")
    host_threads = local_workers(args.host_threads, "--host-threads", "run")
    batch, context = count(args.batch, "--batch"), count(args.context, "--context")
    gen, warmup = count(args.gen, "--gen"), count(args.warmup, "--warmup")
    if batch < 1:
        raise UserError("--batch must be >= 1")
    _check_workload(batch=batch, context=context, gen=gen + warmup, seed=args.seed)
    return RunConfig(
        model=get_model(args.model), policy=args.policy, context=context, gen=gen,
        options=policy_options(args.option, args.policy), warmup=warmup, batch=batch,
        dtype=args.dtype, attention_only=args.attention_only,
        # "" is a mistake too, not "no budget"
        hbm_budget=HbmBudget.parse(args.hbm_budget) if args.hbm_budget is not None else None,
        seed=args.seed, accelerator=args.accelerator, host_threads=host_threads,
        graphs=False if args.eager else None,
    )


#: Workload field -> the flag that sets it (``gen`` counts the warm-up steps too).
_WORKLOAD_FLAGS = {"batch": "--batch", "context": "--context", "gen": "--gen", "seed": "--seed"}


def _check_workload(**fields) -> None:
    """The workload's own checks (plausible sizes), reported by flag rather than as
    ``Workload.context``."""
    from pydantic import ValidationError

    from hgsim.config_io import humane
    from hgsim.workload import Workload

    try:
        Workload(**fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        flag = _WORKLOAD_FLAGS.get(str(first["loc"][0]), str(first["loc"][0]))
        if flag == "--gen":
            flag = "--gen + --warmup"
        raise UserError(humane(first), field=flag) from None


def output_files(text: str | None) -> tuple[Path, Path] | None:
    """PREFIX.steps.csv and PREFIX.json, checked before the run: a run that cannot write them
    would lose its measurement at the end."""
    if text is None:
        return None
    for name in (text, text + ".steps.csv"):  # the prefix, then the longest name it gets
        check_usable_name(name, "--out")
    prefix = Path(text)
    if not text.strip() or text.endswith(("/", "\\")) or prefix.is_dir() or not prefix.name:
        raise UserError(f"{text!r} is a folder or empty; give a file prefix such as "
                        "results/run (writes results/run.steps.csv and results/run.json)",
                        field="--out")
    files = (prefix.with_name(prefix.name + ".steps.csv"), prefix.with_name(prefix.name + ".json"))
    for path in files:
        check_output_file(path, "--out")
    return files


def run(args: argparse.Namespace) -> int:
    try:
        from hw_backend import measured_run as mr
    except ImportError as exc:
        raise UserError(f"hgsim run needs the hardware backend ({exc}); "
                        "install with `pip install -e .[hw]`") from None
    from hgsim.profiles import load_profile, resolve_profile

    config = _config(args)
    output_files(args.out)  # before any work, as every other input
    cuda = mr.uses_cuda(config.accelerator)
    profile_path = resolve_profile(args.profile or mr.default_profile(cuda))
    profile = load_profile(profile_path)
    with named_as_flags():  # every mistake is reported before any work
        prepared = mr.check(config, profile)
    import torch

    try:
        result = mr.measure(config, prepared, progress=not args.no_progress)
    except torch.OutOfMemoryError as exc:  # torch.cuda.OutOfMemoryError
        first = str(exc).splitlines()[0] if str(exc) else ""
        budget = (f"the {args.hbm_budget} budget" if args.hbm_budget
                  else "the GPU's memory")
        raise UserError(f"out of GPU memory ({first[:160]}): the model and its KV do not fit "
                        f"{budget} as this run placed them; lower --context or --batch, or "
                        "give a larger --hbm-budget") from None
    result.simulated = mr.predict(config, prepared, samples=args.samples,
                                  calibration=mr.calibration_beside(profile_path, profile))
    from hw_backend.platform_info import describe

    measured_on = describe(cuda)
    if args.json:
        print(json.dumps({"device": result.device, "platform": measured_on,
                          "measured": finite_for_json(result.measured.to_row()),
                          "simulated": finite_for_json(result.simulated.to_row())}, indent=2,
                         default=str))
    else:
        print_comparison(result, other_device=mr.describes_standin(profile) == cuda)
        print(f"measured on: {measured_on}")
    if args.out is not None:
        outputs = write_outputs(result, Path(args.out))
        # beside --json a notice goes to stderr: stdout stays one JSON document
        print("outputs: " + ", ".join(str(p) for p in outputs),
              file=sys.stderr if args.json else sys.stdout)
    return 0


def print_comparison(result, *, other_device: bool = False) -> None:
    """The simulate summary with a measured and a simulated column, the memory footprint and
    the scheduler's trace on both sides."""
    import statistics
    import sys

    from rich.console import Console
    from rich.table import Table

    from hgsim.commands.simulate import memory_table, summary_rows

    measured, simulated, config = result.measured, result.simulated, result.config
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    what = "attention only" if config.attention_only else "whole model"
    title = (f"{measured.policy} | {measured.model} ({what}) | batch {measured.batch}, "
             f"context {measured.context}, gen {measured.gen}"
             + (f", HBM budget {config.hbm_budget.gb:g} GB" if config.hbm_budget else ""))
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column(f"measured ({result.device})", justify="right")
    table.add_column(f"simulated ({simulated.profile})", justify="right")
    predicted = dict(summary_rows(simulated))
    for name, value in summary_rows(measured):
        if name.startswith("accuracy"):
            value = "not measured"
        table.add_row(name, value, predicted.get(name, "-"))
    if not config.attention_only:
        wall = 1e3 * statistics.fmean(result.token_s)
        table.add_row("token wall time incl. embedding + LM head", f"{wall:.2f} ms", "-")
    error = 100.0 * (simulated.decode_s - measured.decode_s) / measured.decode_s
    table.add_row("simulated vs measured latency", "", f"{error:+.1f}%")
    console.print(table)
    console.print(memory_table(simulated))
    sched = Table(title="steps: measured | simulated", title_justify="left")
    for col in ("step", "context", "top-k", "GPU tokens", "latency ms"):
        sched.add_column(col, justify="right")
    stride = max(1, len(measured.steps) // 8)
    for m, s in list(zip(measured.steps, simulated.steps, strict=False))[::stride]:
        sched.add_row(str(m.step), str(m.context), f"{m.topk_ratio:.3f} | {s.topk_ratio:.3f}",
                      f"{m.gpu_tokens} | {s.gpu_tokens}",
                      f"{m.latency_s * 1e3:.2f} | {s.latency_s * 1e3:.2f}")
    console.print(sched)
    console.print(f"context: {config.context - 1} tokens of the accuracy model's synthetic "
                  f"K/V (no prefill); "
                  f"{config.warmup} warm-up step(s) left out of both columns")
    if other_device:
        console.print(f"note: {simulated.profile} does not describe this run's device "
                      f"({result.device}); its prediction is for the hardware it describes")


def write_outputs(result, prefix: Path) -> list[Path]:
    """PREFIX.steps.csv (both sides' steps, one row per source and step) and PREFIX.json."""
    import pandas as pd

    from hw_backend.timing import steps_frame

    steps = prefix.with_name(prefix.name + ".steps.csv")
    summary = prefix.with_name(prefix.name + ".json")
    frame = pd.concat([steps_frame(result.measured.steps, source=result.device),
                       steps_frame(result.simulated.steps, source="simulated")],
                      ignore_index=True)
    frame["policy"] = result.measured.policy
    with written_whole(steps, newline="") as fh:
        frame.to_csv(fh, index=False)
    rows = {"device": result.device, "measured": finite_for_json(result.measured.to_row()),
            "simulated": finite_for_json(result.simulated.to_row()),
            "token_wall_ms": [1e3 * t for t in result.token_s]}
    with written_whole(summary) as fh:
        fh.write(json.dumps(rows, indent=1, default=str) + "\n")
    return [steps, summary]

"""``hgsim calibrate``: measure the machine this runs on and write a hardware profile.

Thin command-line layer over ``hw_backend.calibrate`` (which needs the hw extras: torch and the
compiled C kernels); it parses flags, prints where the results went and the headline figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hgsim.commands.checks import QUIET_WAIT_MAX_S, non_negative
from hgsim.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure this machine and write a hardware profile",
        description=(
            "Run memory, CPU-kernel and GPU (or CPU stand-in) microbenchmarks on this machine "
            "and write a hardware profile whose every figure cites its measurement. Raw data "
            "goes beside the profile as <name>.calibration.json and .csv."),
    )
    p.add_argument("--out", required=True,
                   help="profile to write, e.g. hardware_profiles/local.yaml")
    p.add_argument("--name", help="profile name (default: the file's stem)")
    p.add_argument("--quick", action="store_true",
                   help="small buffers and few repeats (seconds; for CI, not for real use)")
    p.add_argument("--kv-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="KV element type the kernels are timed with (default fp32)")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--cuda", dest="cuda", action="store_true", default=None,
                     help="require CUDA (error if unavailable)")
    gpu.add_argument("--no-cuda", dest="cuda", action="store_false",
                     help="ignore CUDA and calibrate the CPU stand-in accelerator")
    p.add_argument("--device-threads", type=int,
                   help="cores the stand-in accelerator gets (default: half)")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the stand-in's and the host's threads to separate cores")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each benchmark, wait up to SECONDS for other processes to stop "
                        "running (shared machines; default 0: do not wait)")
    p.add_argument("--statistic", choices=["median", "min"], default="median",
                   help="each benchmark's figure from its repeats: their median (default; what "
                        "sustained work sees on a machine whose speed varies) or the fastest")
    p.add_argument("--energy-from", metavar="PROFILE",
                   help="copy the energy and cost figures (power, pJ/bit, prices, cost:) from this "
                        "profile (a shipped name or a YAML path), matched by component kind; "
                        "measured power (RAPL, NVML) wins over copied")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from hw_backend.calibrate import calibrate
    except ImportError as exc:
        raise UserError(f"calibration needs the hardware backend ({exc}); "
                        "install with `pip install -e .[hw]`") from None
    non_negative(args.quiet_wait, "--quiet-wait", QUIET_WAIT_MAX_S, " seconds")
    if args.name is not None and not args.name.strip():
        raise UserError("is empty; give the profile a name (or leave --name out to use the "
                        "file's stem)", field="--name")
    out = Path(args.out)
    result = calibrate(
        out, quick=args.quick, name=args.name, kv_dtype=args.kv_dtype, use_cuda=args.cuda,
        device_threads=args.device_threads, pin=not args.no_pin, quiet_wait_s=args.quiet_wait,
        progress=not args.no_progress, statistic=args.statistic, energy_from=args.energy_from,
    )
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from hgsim.profiles import load_profile

    profile = load_profile(result.profile_path)
    table = Table(title=f"{profile.name}: calibrated figures", title_justify="left")
    for col in ("figure", "value"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    gpu = profile.gpus[profile.primary_gpu]
    for sname, sock in profile.sockets.items():
        table.add_row(f"{sname} attention GFLOP/s per core", f"{sock.attention_gflops_per_core:g}")
        if sock.attention_rate_by_kv_dtype:
            table.add_row(f"{sname} x that rate, by KV type", ", ".join(
                f"{k} {v:g}" for k, v in sock.attention_rate_by_kv_dtype.items()))
        table.add_row(f"{sname} bytes in flight per core (stream / gather)",
                      f"{sock.stream_inflight_bytes:g} / {sock.gather_inflight_bytes:g}")
    for tname, tier in profile.tiers.items():
        table.add_row(f"{tname} read / write GB/s",
                      f"{tier.read_bandwidth_gbps:g} / {tier.write_bandwidth_gbps:g}")
        table.add_row(f"{tname} latency ns (+ queueing at half load)",
                      f"{tier.latency_ns:g} (+{tier.queue_delay_at_half_load_ns:g})")
    table.add_row(f"gpu0 ({gpu.model})", "")
    table.add_row("  HBM GB/s x attention efficiency",
                  f"{gpu.hbm_bandwidth_gbps:g} x {gpu.attention_efficiency:g}")
    table.add_row("  launch overhead us", f"{gpu.kernel_launch_overhead_us:g}")
    link = profile.links[gpu.link]
    table.add_row("  PCIe GB/s, latency ns", f"{link.bandwidth_gbps:g}, {link.latency_ns:g}")
    console = Console()
    console.print(table)
    for what, note in result.summary.get("power", {}).items():
        console.print(f"power ({what}): {note}", highlight=False, soft_wrap=True)
    borrowed = result.summary.get("energy_from")
    if borrowed:
        console.print(f"energy and cost figures not measured: copied from {borrowed['profile']}",
                      highlight=False, soft_wrap=True)
        for line in borrowed["warnings"]:
            console.print(f"warning: {line}", highlight=False, soft_wrap=True)
    console.print(f"profile: {result.profile_path}\nraw data: {result.json_path}, "
                  f"{result.csv_path}\n({result.seconds:.0f} s"
                  f"{', CUDA' if result.used_cuda else ', no CUDA: gpu0 is the CPU stand-in'})")

"""``hgsim validate``: the simulator's predictions against the same plans run on this machine.

Runs every configuration of a validation study through ``hw_backend``'s executor (measured) and
through the simulator with the given profile (predicted), prints predicted vs measured per-step
latency, the mean absolute percentage error (MAPE), and writes a CSV and a scatter plot. The
study's micro-cases (``hgsim.micro``: one memory access pattern at a time) get their own table
and MAPE. The exit code is 1 when a MAPE exceeds ``--threshold``, so CI can gate on a profile
staying predictive.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hgsim.commands.checks import QUIET_WAIT_MAX_S, count, non_negative
from hgsim.errors import UserError
from hgsim.outputs import check_usable_name, written_whole


def register(sub: argparse._SubParsersAction) -> None:
    from hgsim.validation import DEFAULT_STUDY

    p = sub.add_parser(
        "validate",
        help="compare simulated and measured per-step latency on this machine",
        description=(
            "Run a validation study both on this machine (hw_backend executor) and through the "
            "simulator with PROFILE; print predicted vs measured per-step latency and MAPE, save "
            "a CSV and a scatter plot, and exit 1 when MAPE is above the threshold."),
    )
    p.add_argument("--profile", required=True, help="profile name or YAML path (e.g. a calibrated "
                   "hardware_profiles/local.yaml)")
    p.add_argument("--study", default=str(DEFAULT_STUDY),
                   help="validation study YAML (default: studies/validation.yaml)")
    p.add_argument("--threshold", type=float, default=10.0,
                   help="largest acceptable MAPE in percent (default 10)")
    p.add_argument("--out", help="output prefix for <prefix>.csv/.png/.svg, or a folder to "
                   "write <profile>.validation.* into (default: ./<profile>.validation)")
    p.add_argument("--max-context", help="skip cases above this context (e.g. 16k), micro-case "
                   "scans over more tokens included")
    p.add_argument("--steps", type=int, help="compared steps per case (overrides the study)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cuda", "standin"],
                   help="device role: CUDA when available (auto), or the CPU stand-in")
    p.add_argument("--statistic", default="min", choices=["min", "median"],
                   help="measured latency of a plan case: its fastest step (default; "
                        "interference only adds time) or the median step (micro-cases take the "
                        "statistic calibration took its figures with)")
    p.add_argument("--cases", default="all", choices=["all", "plans", "micro"],
                   help="what to run: the study's configurations (plans), its micro-cases "
                        "(one memory access pattern at a time: random row gathers, the kernel's "
                        "K scan), or both (default)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each case, wait up to SECONDS for other processes to stop "
                        "running (shared machines; default 0: do not wait)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


#: The most compared steps per case ``--steps`` takes: a validation case compares a handful
#: (the shipped studies use 6 to 16); millions are a typo that would decode for hours.
MAX_STEPS = 100_000


def _partial_writer(out: Path, profile: str):
    """Rewrites ``<prefix>.partial.csv`` after every case, so that a run stopped early (a time
    limit on a borrowed GPU) keeps the cases it finished; returns the writer and the path, which
    goes once the final outputs are written (it would only repeat them). The prefix is the one
    the final outputs get (inside ``out`` when it is a folder, not beside it)."""
    from hgsim.profiles import resolve_profile
    from hgsim.validation import frame
    from hw_backend.validate import output_prefix

    prefix = output_prefix(out, resolve_profile(profile))
    done = []
    path = prefix.with_name(prefix.name + ".partial.csv")

    def write(result) -> None:
        if not prefix.parent.is_dir():
            return
        done.append(result)
        with written_whole(path, newline="") as fh:
            frame(done).to_csv(fh, index=False)

    return write, path


def run(args: argparse.Namespace) -> int:
    non_negative(args.threshold, "--threshold")
    non_negative(args.quiet_wait, "--quiet-wait", QUIET_WAIT_MAX_S, " seconds")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.steps is not None and args.steps > MAX_STEPS:
        raise UserError(f"must be in [1, {MAX_STEPS:,}] (compared steps per case), "
                        f"got {args.steps:,}", field="--steps")
    if args.out is not None and not args.out.strip():
        raise UserError("is empty; give an output prefix or a folder", field="--out")
    if args.out is not None:
        check_usable_name(args.out, "--out")
    # "" is a mistake, not "no limit"
    max_context = (count(args.max_context, "--max-context") if args.max_context is not None
                   else None)
    try:
        from hw_backend.validate import run_validation
    except ImportError as exc:
        raise UserError(f"validation needs the hardware backend ({exc}); "
                        "install with `pip install -e .[hw]`") from None
    from hgsim.validation import print_table

    on_case, partial = _partial_writer(Path(args.out), args.profile) if args.out else (None, None)
    result = run_validation(
        args.profile, args.study, threshold=args.threshold,
        out=Path(args.out) if args.out else None, max_context=max_context, steps=args.steps,
        accelerator=args.accelerator, statistic=args.statistic, quiet_wait_s=args.quiet_wait,
        progress=not args.no_progress, which=args.cases,
        on_case=on_case,
    )
    if partial is not None:  # the final CSV holds every case now
        partial.unlink(missing_ok=True)
    if result.micro:
        from hgsim.micro import print_micro_table

        print_micro_table(result.micro, result.threshold_pct,
                          f"{result.study.name}: micro-cases, predicted vs measured time per "
                          f"call (CPU time per thread, {result.micro_statistic} of "
                          f"{result.study.micro.repeats} repeats as calibrated), "
                          f"{result.profile.name}")
        for drift in result.micro_latency:
            print(drift.describe())
    if result.results:
        title = (f"{result.study.name}: predicted vs measured per-step latency, "
                 f"{result.profile.name} on {result.results[0].device}")
        print_table(result.results, result.mape_pct, result.threshold_pct, title)
    waits = [(r.case.label, r.row()) for r in result.results]
    waited = [f"{label} {row['measured_cpu_wait_ms']:.0f}/{row['measured_cpu_ms']:.0f}"
              for label, row in waits if row["measured_cpu_wait_ms"] > 0]
    if waited:  # wall time the simulator does not model: other processes held the host's core
        print("host kernels waiting for a core, ms per step (of their measured ms): "
              + ", ".join(waited))
    before, after = result.load_average
    print(f"load average (1 min) before/after: {before:.2f}/{after:.2f}; "
          f"{result.seconds:.0f} s")
    if result.drift is not None:
        print(result.drift.describe())
        if result.drift.exceeds(result.threshold_pct):
            print(f"warning: the machine drifted more than {result.threshold_pct:g}% from its "
                  "calibration during this run; errors of that size say more about the machine "
                  "than about the simulator (re-run calibrate and validate back to back, or on "
                  "a quieter machine)")
    if result.host_slowdown is not None:
        print(f"contention: during calibration the host kernel ran {result.host_slowdown:.2f}x "
              "as long while the CPU stand-in attended on the other cores; the simulator does "
              "not charge this (a GPU has its own memory and cores), so where it is well above "
              "1 HybridGen's predictions run low")
    for label, error in result.failed:
        print(f"FAILED case {label}: {error} (left out of the MAPE; the run fails)")
    if result.results:
        from hw_backend.devices import STANDIN_LABEL
        from hw_backend.platform_info import describe

        print(f"measured on: {describe(result.results[0].device != STANDIN_LABEL)}")
    print("outputs: " + ", ".join(str(p) for p in result.outputs))
    if result.removed:
        print("removed (an earlier run's, not this one's): "
              + ", ".join(str(p) for p in result.removed))
    return 0 if result.passed else 1

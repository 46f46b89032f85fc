"""Measured tokens/s of HybridGen against every executable baseline, each beside the simulator's
prediction, at several contexts under an HBM budget that forces offload, in one run.

The weights are drawn once and the random context K/V is filled once, at the largest context;
contexts run from the largest down, each policy decoding ``--warmup`` + ``--gen`` steps over the
first ``context`` tokens of that one store (``KvStore.truncate`` in between: host rows below the
context are never written by a decode). One store, not one per context: on CUDA its host half
is pinned, and torch's pinned allocator rounds every buffer up to a power of two and keeps freed
ones, so three stores for 32k, 64k and 128k of an 8B model would pin about 60 GB, one about 34;
and the 128k fill is the only one with the whole model (``hw_backend.measured_run``), HybridGen
adaptive with its scheduler fed the measured times. Its simulation uses the same model,
workload, options and budgeted profile. Policies infeasible under the budget (gpu_only beyond
what HBM holds) are reported as such, not run. Speed-up = HybridGen's tokens/s over the
baseline's, measured and simulated.

Usage: python benchmarks/speedups.py [--model llama-3.1-8b] [--contexts 32k 64k 128k]
       [--hbm-budget 22GB] [--profile local] [--gen 8] [--out DIR]
       python benchmarks/speedups.py --cpu-smoke     # tiny model on the CPU stand-in
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hgsim.catalog import get_model  # noqa: E402
from hgsim.errors import UserError  # noqa: E402
from hgsim.hbm_budget import HbmBudget  # noqa: E402
from hgsim.policies import make_policy  # noqa: E402
from hgsim.profiles import load_profile  # noqa: E402
from hgsim.results import SimResult  # noqa: E402
from hgsim.units import parse_count  # noqa: E402
from hw_backend import measured_run as mr  # noqa: E402
from hw_backend.devices import limit_device_memory, make_accelerator  # noqa: E402
from hw_backend.model_decode import TORCH_DTYPES, ModelDecode  # noqa: E402
from hw_backend.random_kv import RandomKv  # noqa: E402
from hw_backend.run_failure import failure_reason  # noqa: E402
from hw_backend.transformer import ModelWeights  # noqa: E402

POLICIES = ["hybridgen", "cpu_offload", "flexgen", "flexgen_cpu", "hgca", "infinigen",
            "gpu_only"]
SMOKE_OPTIONS = {"hbm_reserve_gb": 0.0, "hbm_reserve_fraction": 0.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default llama-3.1-8b (CUDA), tiny-llama")
    p.add_argument("--contexts", nargs="*", default=None, help="default 32k 64k 128k")
    p.add_argument("--hbm-budget", default=None, help="default 22GB (CUDA), 1.2MB")
    p.add_argument("--profile", default=None,
                   help="profile of the prediction (default: as hgsim run chooses)")
    p.add_argument("--policies", nargs="*", default=POLICIES)
    p.add_argument("--gen", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU stand-in")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    spec = get_model(args.model or ("llama-3.1-8b" if cuda else "tiny-llama"))
    contexts = [parse_count(c) for c in (args.contexts or (["32k", "64k", "128k"] if cuda
                                                            else ["1k", "2k", "4k"]))]
    budget = HbmBudget.parse(args.hbm_budget or ("22GB" if cuda else "1.2MB"))
    profile = load_profile(args.profile or mr.default_profile(cuda))
    extra = {} if cuda else SMOKE_OPTIONS
    accel = make_accelerator("cuda" if cuda else "standin")
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        limit_device_memory(accel, budget.bytes_)
        dtype = "bf16" if cuda else "fp32"
        weights = ModelWeights.random(spec, device=accel.device, dtype=TORCH_DTYPES[dtype])
        random_kv = RandomKv()
        store = None
        capacity = max(contexts) + args.warmup + args.gen
        for context in sorted(contexts, reverse=True):
            if store is not None:
                store.truncate(context - 1)
            for name in args.policies:
                config = mr.RunConfig(model=spec, policy=name, context=context, gen=args.gen,
                                      warmup=args.warmup, hbm_budget=budget, dtype=dtype,
                                      accelerator="cuda" if cuda else "standin",
                                      options=dict(extra))
                try:
                    prepared = mr.check(config, profile)
                except UserError as exc:
                    rows.append({"context": context, "policy": name, "infeasible": str(exc)})
                    print(f"{context} {name}: not run ({exc})", flush=True)
                    continue
                policy = make_policy(name, spec, prepared.profile, prepared.workload,
                                     config.options)
                run = None
                try:
                    with ModelDecode(spec, accel, weights=weights, store=store, dtype=dtype,
                                     capacity=capacity) as model:
                        if store is None:
                            model.fill_random(max(contexts) - 1, random_kv)
                            model.store.truncate(context - 1)
                        store = model.store
                        model.reserve_for(policy, context + config.steps)
                        run = model.decode(policy, config.steps)
                except Exception as exc:  # noqa: BLE001 - one policy's failure is a row
                    rows.append({"context": context, "policy": name,
                                 "infeasible": f"failed: {failure_reason(exc, cuda)}"})
                    print(f"{context} {name}: FAILED ({rows[-1]['infeasible']})", flush=True)
                if store is not None:
                    store.truncate(context - 1)
                if run is None:
                    continue
                measured = mr.window(SimResult(
                    profile=prepared.profile.name, model=spec.name, policy=name, batch=1,
                    context=context, gen=config.steps, feasible=True, steps=run.steps), config)
                simulated = mr.predict(config, prepared)
                rows.append({"context": context, "policy": name,
                             "measured_tokens_per_s": measured.tokens_per_s,
                             "simulated_tokens_per_s": simulated.tokens_per_s,
                             "measured_ms": 1e3 * measured.decode_s / len(measured.steps),
                             "simulated_ms": 1e3 * simulated.decode_s / len(simulated.steps),
                             "gpu_tokens": measured.steps[-1].gpu_tokens,
                             "topk_ratio": measured.steps[-1].topk_ratio})
                print(f"{context} {name}: {measured.tokens_per_s:.2f} tok/s measured, "
                      f"{simulated.tokens_per_s:.2f} simulated", flush=True)
                if args.out is not None:  # a run cut short by a time limit keeps its rows
                    report(rows, spec.name, budget, accel.label, profile.name,
                           time.perf_counter() - t0, args.out, quiet=True)
    finally:
        accel.close()
    report(rows, spec.name, budget, accel.label, profile.name, time.perf_counter() - t0,
           args.out)
    return 0



def speedups(rows: list[dict]) -> list[dict]:
    """HybridGen's tokens/s over each baseline's at the same context, measured and simulated."""
    out = []
    for context in sorted({r["context"] for r in rows}):
        at = {r["policy"]: r for r in rows if r["context"] == context}
        ours = at.get("hybridgen")
        if not ours or "infeasible" in ours:
            continue
        for name, r in at.items():
            if name == "hybridgen" or "infeasible" in r:
                continue
            out.append({"context": context, "baseline": name,
                        "measured": ours["measured_tokens_per_s"] / r["measured_tokens_per_s"],
                        "simulated": ours["simulated_tokens_per_s"]
                        / r["simulated_tokens_per_s"]})
    return out


def report(rows, model: str, budget: HbmBudget, device: str, profile: str, seconds: float,
           out: Path | None, quiet: bool = False) -> None:
    lines = [f"# Speed-ups: {model}, HBM budget {budget.gb:g} GB", "",
             f"measured on {device} (torch {torch.__version__}); simulated with {profile}; "
             f"{seconds:.0f} s", "",
             "| context | policy | measured tok/s | simulated tok/s | error | GPU tokens | "
             "top-k end |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['context']} | {r['policy']} | not run: {r['infeasible']} "
                         "||||")
            continue
        err = 100 * (r["simulated_tokens_per_s"] / r["measured_tokens_per_s"] - 1)
        lines.append(f"| {r['context']} | {r['policy']} | {r['measured_tokens_per_s']:.2f} | "
                     f"{r['simulated_tokens_per_s']:.2f} | {err:+.1f}% | {r['gpu_tokens']} | "
                     f"{r['topk_ratio']:.3f} |")
    lines += ["", "| context | HybridGen over | measured | simulated |", "|---|---|---|---|"]
    lines += [f"| {s['context']} | {s['baseline']} | {s['measured']:.2f}x | "
              f"{s['simulated']:.2f}x |" for s in speedups(rows)]
    text = "\n".join(lines)
    if not quiet:
        print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speedups.md").write_text(text + "\n")
        (out / "speedups.json").write_text(json.dumps({"rows": rows,
                                                       "speedups": speedups(rows)},
                                                      indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

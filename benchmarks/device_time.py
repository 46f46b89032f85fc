"""Executor device time per layer against the GPU time of its kernels, per plan kind, side by side
for the eager device side and the CUDA graph path.

For each policy (one per plan kind: HybridGen's softmax union, HGCA's LSE merge, FlexGen's
streamed KV, InfiniGen's speculative prefetch, CPU offload, GPU only) a whole-model decode runs
its warm-up steps, then ``--steps`` steps under ``torch.profiler``:

* device time per layer: the executor's own record, its compute queue's event-timed ops summed
  over the step's layers (``LayerTiming.gpu_s``), divided by the layers;
* kernel time per layer: the GPU time of the kernels the profiler saw on the executor's compute
  stream in those steps (the stream carrying the most kernel time), divided likewise;
* their ratio (target at most 1.3: the device busy with kernels, not waiting for Python), and
  the step's wall latency over the same kernel time (idle between ops included).

Without CUDA (``--cpu-smoke`` or no GPU) the stand-in runs a tiny model and only the executor's
side is reported (there are no kernels to compare with); every row names its device.

Usage: python benchmarks/device_time.py [--model llama-3.1-8b] [--context 32k] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hgsim.catalog import get_model  # noqa: E402
from hgsim.hbm_budget import HbmBudget  # noqa: E402
from hgsim.policies import make_policy  # noqa: E402
from hgsim.profiles import load_profile  # noqa: E402
from hgsim.units import parse_count  # noqa: E402
from hgsim.workload import Workload  # noqa: E402
from hw_backend.devices import limit_device_memory, make_accelerator  # noqa: E402
from hw_backend.model_decode import ModelDecode  # noqa: E402
from hw_backend.random_kv import RandomKv  # noqa: E402
from hw_backend.run_failure import failure_reason  # noqa: E402
from hw_backend.transformer import ModelWeights  # noqa: E402

#: One policy per plan kind, with the options that give it a host part under the budget.
KINDS = [
    ("softmax union (hybridgen)", "hybridgen_static", {"topk_ratio": 0.05}),
    ("LSE merge (hgca)", "hgca", {}),
    ("streamed KV (flexgen)", "flexgen", {}),
    ("speculative prefetch (infinigen)", "infinigen", {}),
    ("CPU attention (cpu_offload)", "cpu_offload", {}),
    ("GPU only", "gpu_only", {}),
]
#: The tiny model of the smoke run needs no HBM reserve (it would swamp its KV); with two layers
#: FlexGen's double buffer holds every layer, so its GPU share is set instead.
SMOKE_OPTIONS = {"hbm_reserve_gb": 0.0, "hbm_reserve_fraction": 0.0}
SMOKE_EXTRA = {"flexgen": {"gpu_kv_fraction": 0.3}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default llama-3.1-8b (CUDA), tiny-llama")
    p.add_argument("--context", default=None, help="default 32k (CUDA), 2k")
    p.add_argument("--hbm-budget", default=None, help="default 21GB (CUDA), 1.2MB")
    p.add_argument("--profile", default="h100-80gb-spr-cxl",
                   help="profile the policies size their split from (under the budget)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per policy")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (captures)")
    p.add_argument("--only", nargs="*", help="plan kinds (substrings) to run")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU stand-in")
    p.add_argument("--out", type=Path, help="folder for device_time.json / .md")
    return p.parse_args(argv)


def kernel_time_by_stream(prof) -> dict[int, float]:
    """GPU seconds of kernels per CUDA stream, from the profiler's trace."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    out: dict[int, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "kernel" and event.get("ph") == "X":
            out[int(event.get("args", {}).get("stream", -1))] += event.get("dur", 0.0) * 1e-6
    return dict(out)


def allocation_counts() -> tuple[int, int]:
    """Cumulative device allocations so far: requests to torch's caching allocator, and the
    ``cudaMalloc`` calls (new segments) behind them. A steady step should add no segment, and
    on the graph path few requests (its programs write into buffers allocated once)."""
    stats = torch.cuda.memory_stats()
    return stats.get("allocation.all.allocated", 0), stats.get("segment.all.allocated", 0)


def measure(model: ModelDecode, policy, label: str, graphs: bool, args, cuda: bool) -> dict:
    layers = model.spec.num_layers
    for t in range(args.warmup):
        model.step(policy.step_plan(model.store.length + 1), step=t)
    records = []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
        before = allocation_counts()
    with torch.profiler.profile(activities=activities) as prof:
        for t in range(args.steps):
            records.append(model.step(policy.step_plan(model.store.length + 1),
                                      step=args.warmup + t)[0])
    device = [sum(r.gpu_s for r in run.layers) / layers for run in records]
    latency = [run.timing.latency_s / layers for run in records]
    row = {"plan kind": label, "policy": policy.name, "path": "graphs" if graphs else "eager",
           "device_ms_per_layer": 1e3 * statistics.fmean(device),
           "latency_ms_per_layer": 1e3 * statistics.fmean(latency),
           "kernel_ms_per_layer": None, "device_over_kernel": None, "latency_over_kernel": None,
           "gpu_tokens": records[-1].plan.layer.gpu_tokens,
           "host_tokens": records[-1].plan.layer.host_tokens}
    if cuda:
        after = allocation_counts()
        row["allocs_per_step"], row["cudamalloc_per_step"] = (
            (after[i] - before[i]) / args.steps for i in range(2))
        streams = kernel_time_by_stream(prof)
        if streams:
            kernel = max(streams.values()) / (args.steps * layers)
            row["kernel_ms_per_layer"] = 1e3 * kernel
            row["device_over_kernel"] = row["device_ms_per_layer"] / row["kernel_ms_per_layer"]
            row["latency_over_kernel"] = row["latency_ms_per_layer"] / row["kernel_ms_per_layer"]
    stats = model.executor.graph_stats
    row["graph_captures"] = stats.captures if stats else 0
    row["capture_failures"] = dict(stats.failures) if stats else {}
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    spec = get_model(args.model or ("llama-3.1-8b" if cuda else "tiny-llama"))
    context = parse_count(args.context or ("32k" if cuda else "2k"))
    budget = HbmBudget.parse(args.hbm_budget or ("21GB" if cuda else "1.2MB"))
    dtype = "bf16" if cuda else "fp32"
    steps = args.warmup + args.steps
    workload = Workload(context=context, gen=steps, kv_dtype=dtype, weight_dtype=dtype)
    profile = budget.apply(load_profile(args.profile))
    accel = make_accelerator("cuda" if cuda else "standin")
    rows = []
    try:
        limit_device_memory(accel, budget.bytes_)
        weights = ModelWeights.random(spec, device=accel.device,
                                      dtype=getattr(torch, {"bf16": "bfloat16",
                                                            "fp32": "float32"}[dtype]))
        store = None
        random_kv = RandomKv()
        for label, name, options in KINDS:
            if args.only and not any(o in label for o in args.only):
                continue
            if not cuda:
                options = {**options, **SMOKE_OPTIONS, **SMOKE_EXTRA.get(name, {})}
            policy = make_policy(name, spec, profile, workload, options)
            if not policy.feasible:
                rows.append({"plan kind": label, "policy": name, "path": "-",
                             "infeasible": policy.infeasibility()})
                continue
            for graphs in (False, True):
                try:
                    with ModelDecode(spec, accel, weights=weights, store=store, dtype=dtype,
                                     capacity=context + steps, graphs=graphs) as model:
                        if store is None:
                            model.fill_random(context - 1, random_kv)
                        store = model.store
                        model.reserve_for(policy, context + steps)
                        rows.append(measure(model, policy, label, graphs, args, cuda))
                except Exception as exc:  # noqa: BLE001 - one plan kind's failure is a row
                    rows.append({"plan kind": label, "policy": name,
                                 "path": "graphs" if graphs else "eager",
                                 "infeasible": f"failed: {failure_reason(exc, cuda)}"})
                if store is not None:
                    store.truncate(context - 1)
                if args.out is not None:  # a run cut short by a time limit keeps its rows
                    report(rows, spec.name, context, budget, accel.label, args.out, quiet=True)
                policy = make_policy(name, spec, profile, workload, options)
    finally:
        accel.close()
    report(rows, spec.name, context, budget, accel.label, args.out)
    return 0


def report(rows: list[dict], model: str, context: int, budget: HbmBudget, device: str,
           out: Path | None, quiet: bool = False) -> None:
    lines = [f"# Device time per layer: {model}, context {context}, HBM budget {budget.gb:g} GB",
             "", f"device: {device}; torch {torch.__version__}", "",
             "| plan kind | path | GPU tok | host tok | device ms/layer | kernel ms/layer | "
             "device/kernel | latency/kernel | graphs captured | allocs/step | "
             "cudaMalloc/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "infeasible" in r:
            why = r["infeasible"]
            why = why if why.startswith("failed") else f"infeasible: {why}"
            lines.append(f"| {r['plan kind']} | {r.get('path', '-')}: {why} |||||||||")
            continue
        fmt = (lambda v, f="{:.3f}": "n/a" if v is None else f.format(v))  # noqa: E731
        lines.append(
            f"| {r['plan kind']} | {r['path']} | {r['gpu_tokens']} | {r['host_tokens']} | "
            f"{r['device_ms_per_layer']:.3f} | {fmt(r['kernel_ms_per_layer'])} | "
            f"{fmt(r['device_over_kernel'], '{:.2f}x')} | "
            f"{fmt(r['latency_over_kernel'], '{:.2f}x')} | {r['graph_captures']} | "
            f"{fmt(r.get('allocs_per_step'), '{:.0f}')} | "
            f"{fmt(r.get('cudamalloc_per_step'), '{:.0f}')} |")
    failed = {label: error for r in rows for label, error in r.get("capture_failures", {}).items()}
    if failed:
        lines += ["", "Graph captures that FAILED (those programs ran eagerly): "
                  + "; ".join(f"{label}: {error[:200]}" for label, error in failed.items())]
    if not any(r.get("kernel_ms_per_layer") for r in rows):
        lines += ["", "No CUDA: the stand-in has no kernels to compare with; its device time is "
                  "its compute queue's op time (plumbing check only)."]
    text = "\n".join(lines)
    if not quiet:
        print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "device_time.md").write_text(text + "\n")
        (out / "device_time.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

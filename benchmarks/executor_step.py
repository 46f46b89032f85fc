"""Measured decode-step latency of the plan executor for a few policies, side by side.

Each configuration builds its policy's plans for the same synthetic attention data (sinks,
recency, heavy hitters; ``hgsim.accuracy.synthesize``), runs warm-up steps, then ``--steps``
measured steps, and prints per-step medians of latency and of the scheduler's inputs
(host_s, device_s) with the CPU/device/transfer busy times and the speed-up over HybridGen exact.

Without CUDA the device is the CPU stand-in (torch on the cores reserved for it, see
``--device-threads``), so the numbers measure the executor's partition, transfers and merge on
this machine, not a GPU; every table says which device it ran on. ``--dense`` adds each
layer's QKV/FFN GEMMs on the device (what HybridGen hides the host path behind).

Usage: python benchmarks/executor_step.py [--context 32768] [--layers 4] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgsim.policies import make_policy  # noqa: E402
from hgsim.profiles import load_profile  # noqa: E402
from hgsim.workload import Workload  # noqa: E402
from hw_backend.decode_loop import (  # noqa: E402
    SIZED_HBM_OPTIONS,
    SyntheticDecode,
    attention_model_spec,
    profile_for_gpu_tokens,
    run_decode,
)
from hw_backend.device_work import DenseLayerWork  # noqa: E402
from hw_backend.devices import CoreSplit, make_accelerator  # noqa: E402
from hw_backend.executor import PlanExecutor  # noqa: E402
from hw_backend.kv_store import KvStore  # noqa: E402

# (label, policy, options); the GPU holds ``--gpu-fraction`` of the context in every case.
CONFIGS = [
    ("hybridgen exact", "hybridgen_exact", {}),
    ("hybridgen top-k 5%", "hybridgen", {"topk_ratio": 0.05, "adaptive": False}),
    ("hybridgen adaptive", "hybridgen", {"topk_ratio": 0.05, "interval": 2}),
    ("hgca top-k 10%", "hgca", {"topk_ratio": 0.1}),
    ("cpu_offload", "cpu_offload", {}),
    ("flexgen", "flexgen", {}),  # gpu_kv_fraction set from --gpu-fraction
    ("gpu_only", "gpu_only", {}),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu-fraction", type=float, default=0.1,
                   help="share of the context resident on the device")
    p.add_argument("--device-threads", type=int, default=None)
    p.add_argument("--host-threads", type=int, default=None)
    p.add_argument("--pin", action="store_true", help="pin each role to its own cores")
    p.add_argument("--dense", action="store_true",
                   help="add each layer's QKV/o_proj/FFN GEMMs (model shapes) on the device")
    p.add_argument("--only", nargs="*", help="labels (substrings) of configurations to run")
    return p.parse_args()


def gpu_tokens_for(policy: str, args) -> int:
    """HBM size (tokens): HGCA keeps as many recent tokens as fit, so it gets ``gpu_fraction``
    of the context; the others get room to spare and are told their share by option."""
    final = args.context + args.warmup + args.steps
    return round(args.gpu_fraction * final) if policy == "hgca" else 4 * final


def run_config(label: str, name: str, options: dict, source: SyntheticDecode, args, split):
    model = attention_model_spec(layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                                 head_dim=args.head_dim)
    steps = args.warmup + args.steps
    workload = Workload(batch=1, context=args.context, gen=steps, kv_dtype="fp32",
                        weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), model, workload,
                                     gpu_tokens_for(name, args))
    if name.startswith("hybridgen"):
        options = {"gpu_share": args.gpu_fraction, **options}
    elif name == "flexgen":
        options = {"gpu_kv_fraction": args.gpu_fraction, **options}
    policy = make_policy(name, model, profile, workload, {**SIZED_HBM_OPTIONS, **options})
    with make_accelerator("auto", split) as accel:
        store = KvStore(accel, num_layers=args.layers, batch=1, kv_heads=args.kv_heads,
                        head_dim=args.head_dim, capacity=args.context + steps)
        source.load(store)
        work = None
        if args.dense:
            hidden = args.heads * args.head_dim
            work = DenseLayerWork(accel, batch=1, hidden=hidden, ffn=int(2.7 * hidden),
                                  qkv_width=hidden + 2 * args.kv_heads * args.head_dim)
        with PlanExecutor(store, accel, device_work=work, host_threads=args.host_threads) as ex:
            run = run_decode(policy, ex, source, steps, label=label)
    measured = run.steps[args.warmup:]
    layers = [t for t in run.layers if t.step >= args.warmup]

    def median(attr: str) -> float:
        return 1e3 * statistics.median(getattr(s, attr) for s in measured)

    last = run.plans[-1].layer
    return {
        "config": label,
        "device": run.device,
        "latency_ms": median("latency_s"),
        "host_ms": median("host_s"),
        "device_ms": median("device_s"),
        "cpu_ms": median("cpu_busy_s"),
        "gpu_ms": median("gpu_busy_s"),
        "xfer_ms": median("pcie_busy_s"),
        "stall_ms": median("stall_s"),
        "gpu_tokens": last.gpu_tokens,
        "host_selected": last.host_selected,
        "topk_ratio": round(measured[-1].topk_ratio, 4),
        "MB_up/step": sum(t.upload_bytes for t in layers) / len(measured) / 1e6,
    }


def main() -> None:
    args = parse_args()
    split = CoreSplit.even(pin=args.pin)
    if args.device_threads or args.host_threads:
        split = CoreSplit(args.device_threads or split.device_threads,
                          args.host_threads or split.host_threads, args.pin)
    t0 = time.perf_counter()
    source = SyntheticDecode(layers=args.layers, batch=1, heads=args.heads,
                             kv_heads=args.kv_heads, head_dim=args.head_dim,
                             context=args.context, steps=args.warmup + args.steps)
    print(f"synthetic data: {args.layers} layers x {args.context} tokens, H={args.heads} "
          f"KVH={args.kv_heads} D={args.head_dim} fp32 ({time.perf_counter() - t0:.1f} s); "
          f"cores: device {split.device_threads}, host {split.host_threads}"
          f"{' (pinned)' if split.pin else ''}; dense device work: {args.dense}")
    rows = []
    for label, name, options in CONFIGS:
        if args.only and not any(s in label for s in args.only):
            continue
        rows.append(run_config(label, name, options, source, args, split))
        print(f"  ran {label}", flush=True)
    table = pd.DataFrame(rows)
    base = table.loc[table["config"] == "hybridgen exact", "latency_ms"]
    if len(base):
        table["speedup_vs_exact"] = base.iloc[0] / table["latency_ms"]
    devices = sorted(set(table["device"]))
    print(f"\nmedian per decode step over {args.steps} steps; device: {', '.join(devices)}")
    with pd.option_context("display.width", 200, "display.max_columns", None,
                           "display.float_format", "{:.3f}".format):
        print(table.drop(columns="device").to_string(index=False))


if __name__ == "__main__":
    main()

"""Bit-identity and speed of two hgsim trees on the same configurations.

A refactor meant to be a pure speed-up must not move any result: this runs ~15 diverse
configurations (every shipped profile, the five cxl_sweep policies and others, with and
without prefill, the cxl_sweep lean-host overrides) in a child process per tree, compares
every field of every result row and every step's timings by ``float.hex``, and times the
same configurations alternately in each tree (median of ``--repeats`` runs each, so the
VM's noise hits both alike).

Usage: python benchmarks/sim_identity.py BASE_TREE NEW_TREE [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

LEAN = {"sockets.cpu0.cores": 8, "tiers.ddr0.capacity_gb": "128 GiB",
        "tiers.cxl0.capacity_gb": "1024 GiB", "tiers.cxl0.latency_ns": 300,
        "tiers.cxl0.bandwidth_gbps": 36, "links.cxl0-link.bandwidth_gbps": 36}

# (profile, overrides, model, policy, workload kwargs)
CONFIGS = [
    ("h100-80gb-spr-cxl", LEAN, "llama-2-13b", "hybridgen", {"context": "128k"}),
    ("h100-80gb-spr-cxl", LEAN, "llama-2-13b", "flexgen", {"context": "512k"}),
    ("h100-80gb-spr-cxl", LEAN, "llama-2-13b", "hgca", {"context": "128k"}),
    ("h100-80gb-spr-cxl", LEAN, "llama-2-13b", "infinigen", {"context": "128k"}),
    ("h100-80gb-spr-cxl", LEAN, "llama-2-13b", "cpu_offload", {"context": "512k"}),
    ("h100-80gb-spr-cxl", {}, "llama-2-13b", "hybridgen", {"context": "32k"}),
    ("h100-80gb-spr-cxl", {}, "llama-3.1-70b", "hybridgen",
     {"context": "32k", "include_prefill": True}),
    ("h100-80gb-spr-cxl", {}, "llama-2-13b", "flexgen",
     {"context": "32k", "include_prefill": True, "prefill_chunk_tokens": "8k"}),
    ("a100-40gb-spr-cxl", {}, "llama-2-13b", "h2o", {"context": "32k"}),
    ("a100-40gb-spr-cxl", {}, "llama-2-13b", "flexgen_cpu", {"context": "64k"}),
    ("h100-2socket-cxl", {}, "llama-2-13b", "hybridgen_interleave", {"context": "128k"}),
    ("h100-2socket-cxl", {}, "llama-2-13b", "gpu_only", {"context": "8k"}),
    ("rtx5090-cxl", {}, "llama-2-13b", "hybridgen_static", {"context": "32k"}),
    ("rtx5090-cxl", {}, "llama-2-13b", "cpu_offload",
     {"context": "16k", "include_prefill": True}),
    ("dev-zen4-2core", {}, "llama-2-13b", "hybridgen", {"context": "16k"}),
]

CHILD = r"""
import dataclasses, json, math, sys, time
from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload
configs = json.loads(sys.argv[1]); mode = sys.argv[2]

def enc(v):
    if isinstance(v, float):
        return v.hex()
    if hasattr(v, "item") and callable(v.item):
        return enc(v.item())
    if isinstance(v, dict):
        return {str(k): enc(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [enc(x) for x in v]
    return v

fid = Fidelity(decode_samples=8)
out, walls = [], []


def one_pass(keep):
    wall = cpu = 0.0
    for profile, over, model, policy, kw in configs:
        prof = profile_with_overrides(load_profile(profile), over) if over else profile
        wl = Workload(batch=2, gen=64, **kw)
        t0, c0 = time.perf_counter(), time.process_time()
        r = simulate(prof, model, policy, wl, fidelity=fid)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if keep:
            row = r.to_row(); row.pop("wall_s", None)
            steps = [{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
                     for s in r.steps]
            out.append(enc({"row": row, "steps": steps, "events": r.events,
                            "binding_s": r.binding_s, "bytes": r.bytes_by_resource,
                            "energy_j": r.energy_j}))
    return [wall, cpu]


if mode == "rows":
    one_pass(True)
else:  # a first pass (accuracy cases built) and a warm one
    walls = one_pass(False) + one_pass(False)
print(json.dumps(out if mode == "rows" else walls))
"""


def run(tree: Path, mode: str, configs: list) -> object:
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(configs), mode], env=env,
                          cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def diff(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in a.keys() ^ b.keys()]
        for k in a.keys() & b.keys():
            out += diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    base, new = args.base.resolve(), args.new.resolve()
    rows_base, rows_new = run(base, "rows", CONFIGS), run(new, "rows", CONFIGS)
    diffs = diff(rows_base, rows_new)
    fields = sum(len(r["row"]) + sum(len(s) for s in r["steps"]) for r in rows_base)
    print(f"{len(CONFIGS)} configurations, {fields} row and step fields compared by float.hex: "
          + ("identical" if not diffs else f"{len(diffs)} DIFFER"))
    for d in diffs[:20]:
        print("  ", d)
    if args.skip_speed:
        sys.exit(1 if diffs else 0)
    times: dict[Path, list[list[float]]] = {base: [], new: []}
    for _ in range(args.repeats):  # alternate, so drift in the VM's load hits both
        for tree in (base, new):
            times[tree].append(run(tree, "time", CONFIGS))
    print(f"simulate() time for the {len(CONFIGS)} configurations in one process, median "
          f"of {args.repeats} processes per tree, run alternately (base {base}, new {new}):")
    names = ("first pass (accuracy cases built), wall s", "first pass, CPU s",
             "second pass (warm), wall s", "second pass, CPU s")
    for k, name in enumerate(names):
        tb, tn = [t[k] for t in times[base]], [t[k] for t in times[new]]
        mb, mn = statistics.median(tb), statistics.median(tn)
        print(f"  {name}: base {mb:.3f}, new {mn:.3f}; base/new = {mb / mn:.3f}")
        print("    base runs:", ", ".join(f"{t:.3f}" for t in tb))
        print("    new runs: ", ", ".join(f"{t:.3f}" for t in tn))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()

"""How fast the simulator answers, at the sizes studies use.

Reports:
  one 70B    Llama-2-70B, 128k context, 256 generated tokens, batch 1, hybridgen, default
             fidelity, on h100-80gb-spr-cxl: cold (first simulation in a fresh process,
             imports aside: includes building the accuracy proxy's synthetic case) and warm.
             Target: < 2 s.
  auto chunk Llama-3.1-70B, 128k prompt x 2, 256 generated tokens, --prefill-chunk auto,
             flexgen and hybridgen, default fidelity: warm seconds, beside the same run with
             the 8k chunk it weighs against. Target: < 5 s.
  mix        the cxl_sweep configurations' shape (5 policies x 3 contexts, Llama-2-13B) in
             this process: simulated events/s and configurations/s on one core.
  cxl_sweep  ``python -m hgsim study studies/cxl_sweep.yaml --force`` end to end (process
             start, all points on all cores, tables, figures, report). Target: < 60 s.

Usage: python benchmarks/simulate_speed.py [--skip-study] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hgsim.simulate import Fidelity, simulate  # noqa: E402
from hgsim.workload import Workload  # noqa: E402

PROFILE = "h100-80gb-spr-cxl"


def one_70b() -> dict:
    workload = Workload(batch=1, context="128k", gen=256)
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        result = simulate(PROFILE, "llama-2-70b", "hybridgen", workload, fidelity=Fidelity())
        timings.append(time.perf_counter() - t0)
    return {"cold_s": timings[0], "warm_s": min(timings[1:]), "events": result.events,
            "feasible": result.feasible, "tokens_per_s": result.tokens_per_s}


def auto_chunk_70b() -> dict:
    """Warm seconds of each policy's auto run and of its 8k run (best of two each)."""
    out = {}
    for policy in ("flexgen", "hybridgen"):
        for chunk in ("auto", "8k"):
            workload = Workload(batch=2, context="128k", gen=256, include_prefill=True,
                                prefill_chunk_tokens=chunk)
            timings = []
            for _ in range(2):
                t0 = time.perf_counter()
                result = simulate(PROFILE, "llama-3.1-70b", policy, workload)
                timings.append(time.perf_counter() - t0)
            out[policy, chunk] = (min(timings), result.prefill_chunk_tokens)
    return out


def mix() -> dict:
    policies = ["hybridgen", "flexgen", "hgca", "infinigen", "cpu_offload"]
    contexts = ["32k", "128k", "512k"]
    fidelity = Fidelity(decode_samples=12)
    simulate(PROFILE, "llama-2-13b", "hybridgen", Workload(batch=2, context="32k", gen=8),
             fidelity=fidelity)  # warm caches, as a long-lived worker would be
    events = configs = 0
    per_policy: dict[str, float] = {}
    t0 = time.perf_counter()
    for policy in policies:
        for context in contexts:
            t1 = time.perf_counter()
            result = simulate(PROFILE, "llama-2-13b", policy,
                              Workload(batch=2, context=context, gen=64), fidelity=fidelity)
            per_policy[policy] = per_policy.get(policy, 0.0) + time.perf_counter() - t1
            events += result.events
            configs += 1
    wall = time.perf_counter() - t0
    return {"configs": configs, "wall_s": wall, "configs_per_s": configs / wall,
            "events": events, "events_per_s": events / wall,
            "per_policy_s": {k: round(v / len(contexts), 3) for k, v in per_policy.items()}}


def cxl_sweep(jobs: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cxl_sweep"
        cmd = [sys.executable, "-m", "hgsim", "study", "studies/cxl_sweep.yaml", "--force",
               "--quiet", "--out", str(out)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        wall = time.perf_counter() - t0
        log = json.loads((out / "run.json").read_text())[-1]
    return {"wall_s": wall, "points": log["total"], "points_per_s": log["total"] / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-study", action="store_true", help="skip the cxl_sweep run")
    parser.add_argument("--jobs", type=int, help="workers for the cxl_sweep run")
    args = parser.parse_args()

    r = one_70b()
    ok = "ok" if r["warm_s"] < 2 else "MISSED"
    print(f"70B 128k x 256 tokens (hybridgen, default fidelity): cold {r['cold_s']:.2f} s, "
          f"warm {r['warm_s']:.2f} s [target < 2 s: {ok}], {r['events']:,} events, "
          f"{r['tokens_per_s']:.2f} tokens/s simulated")
    for (policy, chunk), (wall, chosen) in auto_chunk_70b().items():
        ok = "" if chunk != "auto" else (" [target < 5 s: ok]" if wall < 5 else
                                         " [target < 5 s: MISSED]")
        print(f"70B 128k x2 --prefill-chunk {chunk} ({policy}): {wall:.2f} s warm, chunk "
              f"{chosen}{ok}")
    m = mix()
    print(f"mix ({m['configs']} configs, one core): {m['configs_per_s']:.1f} configs/s, "
          f"{m['events_per_s']:,.0f} events/s; mean s per config by policy: "
          + ", ".join(f"{k} {v}" for k, v in m["per_policy_s"].items()))
    if not args.skip_study:
        s = cxl_sweep(args.jobs)
        ok = "ok" if s["wall_s"] < 60 else "MISSED"
        print(f"cxl_sweep end to end: {s['wall_s']:.1f} s for {s['points']} points "
              f"({s['points_per_s']:.1f} points/s, {os.cpu_count()} cores) [target < 60 s: {ok}]")


if __name__ == "__main__":
    main()

"""Rows a whole model's KV groups move under HybridGen's union selection: random vs designed data.

Whole-model validation (``studies/validation_model_standin.yaml``) decodes a model with random
weights. Over random K/V its queries are its weights' projections, so the query heads of a KV
group pick their top-k rows independently and the union of their sets is near
``n (1 - (1 - k/n)^G)``; the simulator sizes that union with the accuracy model
(``accuracy.groups.expected_union_rows``), whose heads agree on heavy hitters. With
``ModelDecode.fill_designed`` the cache is the accuracy model's synthetic attention and
attention reads its queries (designed at the first step, drifting after, ``QueryDrift``).

This decodes the study's model (small-llama-4l: 8 query heads over 2 KV heads, head_dim 128,
fp32) on the CPU stand-in with ``hybridgen`` at the study's r 0.05 and GPU share 0.1, selection
``group_union`` (the study's default ``group_shared`` moves k rows per group whatever the
data), once per fill, at each context, and prints per decode step the mean union rows per KV
group and the host-to-device bytes per layer beside the model's prediction: the simulator's
union rows and the bytes they imply (each union row's V per KV head plus every query head's
logit over it, as ``HybridGen._landing_bytes_per_pick`` counts them).

Usage: python benchmarks/designed_model_union.py [--contexts 8k 32k] [--steps 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgsim.accuracy.groups import expected_union_rows  # noqa: E402
from hgsim.policies import make_policy  # noqa: E402
from hgsim.profiles import load_profile  # noqa: E402
from hgsim.units import parse_count  # noqa: E402
from hgsim.validation import load_study  # noqa: E402
from hgsim.workload import Workload  # noqa: E402
from hw_backend.decode_loop import SIZED_HBM_OPTIONS, profile_for_gpu_tokens  # noqa: E402
from hw_backend.designed_kv import DesignedKv  # noqa: E402
from hw_backend.devices import CoreSplit, make_accelerator  # noqa: E402
from hw_backend.model_decode import ModelDecode  # noqa: E402
from hw_backend.random_kv import RandomKv  # noqa: E402

STUDY = Path(__file__).resolve().parents[1] / "studies" / "validation_model_standin.yaml"
OPTIONS = {"topk_ratio": 0.05, "gpu_share": 0.1, "adaptive": False, "selection": "group_union"}


def decode_unions(spec, context: int, steps: int, fill) -> list[tuple[float, int, object]]:
    """Per step: (mean union rows per KV group over layers and groups, upload bytes of layer 0,
    layer 0's plan) of a decode whose cache ``fill(decoder)`` fills."""
    workload = Workload(batch=1, context=context, gen=steps, kv_dtype="fp32",
                        weight_dtype="fp32")
    profile = profile_for_gpu_tokens(load_profile("dev-zen4-2core"), spec, workload,
                                     context // 8 + 64)
    policy = make_policy("hybridgen", spec, profile, workload, {**SIZED_HBM_OPTIONS, **OPTIONS})
    group = spec.num_heads // spec.num_kv_heads
    out = []
    with make_accelerator("standin", CoreSplit(1, 1)) as accel, \
            ModelDecode(spec, accel, capacity=context + steps, host_threads=1) as decoder:
        fill(decoder, context - 1)
        decoder.reserve_for(policy, context + steps - 1)
        for step in range(steps):
            plan = policy.step_plan(decoder.store.length + 1)
            run = decoder.step(plan, step=step)[0]
            rows = [len(torch.unique(g)) for sel in run.selections
                    for g in sel[0].reshape(spec.num_kv_heads, group, -1).flatten(1)]
            out.append((sum(rows) / len(rows), run.layers[0].upload_bytes, plan.layer))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", nargs="+", default=["8k", "32k"])
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args(argv)
    spec = load_study(STUDY).model_spec()
    group = spec.num_heads // spec.num_kv_heads
    designed = DesignedKv()
    fills = {
        "random": lambda d, n: d.fill_random(n, RandomKv()),
        "designed": lambda d, n: d.fill_designed(n, designed),
    }
    print(f"{spec.name}: {spec.num_heads} query heads over {spec.num_kv_heads} KV heads, "
          f"head_dim {spec.head_dim}, hybridgen r {OPTIONS['topk_ratio']} group_union, stand-in")
    print(f"{'context':>7} {'step':>4} {'host n':>7} {'k':>5} | {'union rows':^28} | "
          f"{'bytes/layer (MB)':^27}")
    print(f"{'':>7} {'':>4} {'':>7} {'':>5} | {'model':>8} {'random':>9} {'designed':>9} | "
          f"{'model':>8} {'random':>8} {'designed':>8}")
    for text in args.contexts:
        context = parse_count(text)
        runs = {name: decode_unions(spec, context, args.steps, fill)
                for name, fill in fills.items()}
        for step in range(args.steps):
            lp = runs["designed"][step][2]
            n, k = lp.host_tokens, lp.host_selected
            model_rows = expected_union_rows(n, k, group)
            model_bytes = model_rows * (spec.num_kv_heads * spec.head_dim * 4 + spec.num_heads * 4)
            rnd, des = runs["random"][step], runs["designed"][step]
            print(f"{text:>7} {step:>4} {n:>7} {k:>5} | {model_rows:>8.0f} {rnd[0]:>9.0f} "
                  f"{des[0]:>9.0f} | {model_bytes / 1e6:>8.3f} {rnd[1] / 1e6:>8.3f} "
                  f"{des[1] / 1e6:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the accuracy model's history rule keep the persistence its union curve assumes? Each
step's query sees the designed structure (sinks, heavy hitters) at full strength in the union
curve (``accuracy.groups``); H2O's past queries (``selection.query_history``) keep the query's
persistent part and turn only its drifting part to cosine ``c(L) = floor + (1 - floor) decay^L``
(``selection.lag_similarity``) at lag ``L``, as ``hw_backend.designed_kv.QueryDrift`` has
validation's queries drift.

Any data in which every step sees the full structure keeps the heavy hitters in every step's
top-k, so two steps' sets overlap at least by what persistent heavy hitters alone give, reached
when the per-token noise of the two steps is independent ("floor"). This prints, per top-k ratio
of the validation studies and per lag, the model's overlap beside that floor, beside stationary
data whose noise correlates across steps as the drifting parts do (``rho = c``, what the rule
should give), and beside the earlier rule that turned the whole query (``whole``: it attenuated
the structure by ``c`` and fell below the floor past lag 9-12); and the union per KV group of
the stationary lagged step (its heads' fresh noise as alike as their designed noise, as
``QueryDrift`` draws it) beside the designed step's (which the simulator predicts).

Layout: 32 query heads over 8 KV heads, head_dim 128 (Llama-3-8B's, as every validation study
has; 4 heads per group as small-llama-4l), the accuracy proxy's spec over 16k tokens; the host
range is the tokens past the sinks and before the newest 1100 (no recency left).

Usage: python benchmarks/stationary_overlap_floor.py [--lags 1 2 4 9 12 17 31]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgsim.accuracy.proxy import DEFAULT_SPEC  # noqa: E402
from hgsim.accuracy.selection import (  # noqa: E402
    SelectionModel,
    lag_similarity,
    query_history,
    speculative_logits,
    top_per_row,
)
from hgsim.accuracy.synthetic import (  # noqa: E402
    _case_seeds,
    heavy_hitter_boosts,
    structure_logits,
    synthesize_case,
)

TOKENS, RECENT = 16384, 1100
RATIOS = (0.01, 0.02, 0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lags", nargs="+", type=int, default=[1, 2, 4, 9, 12, 17, 31])
    args = p.parse_args(argv)
    spec = replace(DEFAULT_SPEC, heads=32, kv_heads=8, head_dim=128).with_tokens(TOKENS)
    group = spec.heads_per_group
    case = synthesize_case(spec)
    # The designed logits are structure + heavy hitters + noise; the same stream gives the first
    # two, so the noise is what is left (design_logits draws heavy hitters first).
    heavy = heavy_hitter_boosts(spec, np.random.default_rng(_case_seeds(spec)[0]))
    persistent = np.repeat(structure_logits(spec)[None] + heavy, group, axis=0)
    noise0 = case.logits - persistent
    rng = np.random.default_rng(7)
    model = SelectionModel()
    host = slice(spec.sink_tokens, TOKENS - RECENT)
    n = host.stop - host.start

    def fresh_noise() -> np.ndarray:
        shared = spec.noise_std * rng.standard_normal((spec.kv_heads, TOKENS))
        return (np.repeat(shared, group, axis=0)
                + spec.head_noise_std * rng.standard_normal((spec.heads, TOKENS)))

    def union(chosen: np.ndarray) -> float:
        return float(chosen.reshape(spec.kv_heads, group, -1).any(axis=1).sum(axis=1).mean())

    print(f"{spec.heads} heads over {spec.kv_heads} KV heads, head_dim {spec.head_dim}, "
          f"host n {n}; overlap = |top-k(step 0) & top-k(step L)| / k per head, mean")
    print(f"{'r':>5} {'k':>4} {'lag':>3} {'cos':>5} | {'model':>6} {'floor':>6} "
          f"{'rho=c':>6} {'whole':>6} | {'union0':>6} {'union L (rho=c)':>15}")
    for ratio in RATIOS:
        k = int(ratio * n)
        first = top_per_row(case.logits[:, host], k)
        for lag in args.lags:
            c = float(lag_similarity(model, lag))
            past = query_history(case.q[0], np.array([c]), lag, case.persistent_q[0])[0]
            lagged = np.einsum("hd,htd->ht", past,
                               np.repeat(case.k[0].astype(np.float64), group, axis=0))
            later = top_per_row(lagged[:, host], k)
            modelled = (later & first).sum() / (spec.heads * k)
            whole = speculative_logits(case.q[0], case.k[0], c, seed=lag)[:, host]
            turned = (top_per_row(whole, k) & first).sum() / (spec.heads * k)
            floor = (top_per_row((persistent + fresh_noise())[:, host], k) & first).sum() / (
                spec.heads * k)
            drifted = persistent + c * noise0 + math.sqrt(1 - c * c) * fresh_noise()
            stationary = top_per_row(drifted[:, host], k)
            along = (stationary & first).sum() / (spec.heads * k)
            flag = "  < floor" if modelled < floor else ""
            print(f"{ratio:>5} {k:>4} {lag:>3} {c:>5.3f} | {modelled:>6.3f} {floor:>6.3f} "
                  f"{along:>6.3f} {turned:>6.3f} | {union(first):>6.0f} {union(stationary):>15.0f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the accuracy proxy's zoom carry the power law (``fidelity.attention.rank_exponent``) to
long contexts? Beyond ``max_tokens`` (32k) the proxy scores a context on 32k synthetic tokens
standing for it (``proxy.zoom_spec``): each synthetic power-law rank holds the exact weight of
its bucket of consecutive real ranks, and the top 16 are drawn as their buckets' real totals
(``synthetic._head_buckets``). This scores an exact per-head top-k (the sinks and the newest
1,024 tokens kept, a share r of the rest) on the zoom and on an unscaled synthesis of the whole
context (``max_tokens`` = the context), mass kept and relative output error, averaged over
heads and seeds (each seed draws other tokens, so the two agree to within their spread, not
exactly: the spread of the mean is printed).

Few heads (default 2 query heads, 2 KV heads) keep the unscaled tensors small: 256k tokens x
2 KV heads x 128 dims is 256 MB for K and again for V.

Usage: python benchmarks/power_law_zoom.py [--contexts 131072 262144] [--seeds 8]
       [--exponent 1.0] [--boost 9] [--heads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # attention_concentration, beside it

from attention_concentration import RECENT, SINKS, ratio_plan  # noqa: E402  (the same plan)

from hgsim.accuracy import AttentionModelSpec, accuracy_proxy, clear_caches  # noqa: E402


def _with_seed(spec: AttentionModelSpec, seed: int) -> AttentionModelSpec:
    return replace(spec, seed=seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[131072, 262144])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--exponent", type=float, default=1.0)
    p.add_argument("--boost", type=float, default=AttentionModelSpec().rank_logit_boost)
    p.add_argument("--heads", type=int, default=2, help="query heads = KV heads")
    p.add_argument("--max-tokens", type=int, default=32768)
    args = p.parse_args(argv)
    spec = AttentionModelSpec(heads=args.heads, kv_heads=args.heads, rank_exponent=args.exponent,
                              rank_logit_boost=args.boost)
    print(f"power law s = {args.exponent:g}, boost {args.boost:g}; exact top-k with {SINKS} sinks"
          f" and the newest {RECENT}; {args.heads} heads x {args.seeds} seeds; zoomed onto "
          f"{args.max_tokens} tokens against unscaled (mean, +- standard error of the mean)")
    print("| context | r | mass kept, zoom | mass kept, unscaled | rel_error, zoom | "
          "rel_error, unscaled | seconds |")
    print("|---|---|---|---|---|---|---|")
    ratios = tuple(args.ratios)
    for context in args.contexts:
        start = time.perf_counter()
        zoom = _seeded(spec, context, ratios, args.seeds, args.max_tokens)
        full = _seeded(spec, context, ratios, args.seeds, max(context, args.max_tokens))
        took = time.perf_counter() - start
        for r in ratios:
            cells = []
            for kind in (0, 1):
                for values in (zoom[r][kind], full[r][kind]):
                    sem = values.std(ddof=1) / np.sqrt(values.size)
                    cells.append(f"{values.mean():.4f} +- {sem:.4f}")
            print(f"| {context:,} | {r:g} | {' | '.join(cells)} | {took:.0f} |", flush=True)
    return 0


def _seeded(spec: AttentionModelSpec, context: int, ratios: tuple[float, ...], seeds: int,
            max_tokens: int) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    out: dict[float, tuple[list, list]] = {r: ([], []) for r in ratios}
    for seed in range(seeds):
        seeded = _with_seed(spec, seed)
        for r in ratios:
            result = accuracy_proxy(ratio_plan(context, r), seeded, max_tokens=max_tokens)
            out[r][0].append(result.per_head_mass)
            out[r][1].append(result.per_head_error)
        clear_caches()  # one unscaled case in memory at a time
    return {r: (np.concatenate(m), np.concatenate(e)) for r, (m, e) in out.items()}


if __name__ == "__main__":
    raise SystemExit(main())

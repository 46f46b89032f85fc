"""Does the synthetic attention concentrate as the context grows, as published attention does?

Published: the budget that holds an error grows only as about N^0.5-0.7 (Sparse Frontier,
arXiv 2504.17768); blocks holding 90% of the mass fall from 65% of them at 8k to 26% at 128k
(PBS-Attn); the top 4,096 of 128k columns keep 96.4-96.8% of the mass (MInference, arXiv
2407.02490). The model's default shape is scale-free within the host range, so an exact top-5%
errs more, not less, at longer contexts (docs/model.md, "Concentration against context"). This
sets the default beside the opt-in power law over the non-sink tokens
(``fidelity.attention.rank_exponent`` s, ``rank_logit_boost``), each through the accuracy proxy
as the simulator calls it (8 heads, contexts beyond 32k zoomed onto 32k):

* an exact per-head top-k (the 4 sinks and the newest 1,024 tokens kept, a share r of the rest):
  relative output error and mass kept, r 0.01 and 0.05;
* MInference's figure: the mass the sinks, the newest 1,024 and the top 3,068 others keep at
  128k (4,096 tokens in all);
* the budget: the fewest tokens of the whole context (an oracle top-k over all of them, sinks
  and newest included, each zoomed token counted as the real ones it stands for) that keep all
  but a missed mass eps of each head's attention, mean over heads, and its growth exponent
  against N (least squares of log budget on log N over 32k-1M).

Usage: python benchmarks/attention_concentration.py [--exponents 0.8 1 1.2] [--boosts 9]
       [--contexts 8192 32768 131072 524288 1048576] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgsim.accuracy import AttentionModelSpec, accuracy_proxy, clear_caches  # noqa: E402
from hgsim.accuracy.fidelity import softmax  # noqa: E402
from hgsim.accuracy.proxy import scale_problem  # noqa: E402
from hgsim.accuracy.synthetic import case_logits  # noqa: E402
from hgsim.plan import (  # noqa: E402
    CpuWork,
    KvPlacement,
    LayerPlan,
    Merge,
    Selector,
    Transfer,
)

RECENT = 1024
SINKS = 4
MISSED = (0.1, 0.05, 0.02)


def exact_topk(context: int, selected: int) -> LayerPlan:
    """An exact per-head top-``selected`` of the tokens between 4 sinks and the newest 1,024."""
    return LayerPlan(context=context, gpu_recent_tokens=RECENT, sink_tokens=SINKS,
                     host_selected=selected, cpu_work=CpuWork.LOGITS_TOPK,
                     transfer=Transfer.LOGITS_AND_V, merge=Merge.SOFTMAX_UNION,
                     selector=Selector.EXACT_TOPK,
                     placement=KvPlacement({"ddr": 1.0}, {"ddr": 1.0}))


def ratio_plan(context: int, ratio: float) -> LayerPlan:
    return exact_topk(context, round(ratio * (context - SINKS - RECENT)))


def budgets(spec: AttentionModelSpec, context: int, missed: tuple[float, ...]) -> list[float]:
    """Mean over heads of the fewest real tokens whose mass is at least 1 - eps, per eps, on
    the logits the proxy scores for ``context`` (zoomed tokens count as their span)."""
    scaled = scale_problem(ratio_plan(context, 0.05), spec).spec
    probs = softmax(case_logits(scaled))
    span = np.full(scaled.n_tokens, (context - scaled.sink_tokens)
                   / (scaled.n_tokens - scaled.sink_tokens))
    span[: scaled.sink_tokens] = 1.0
    order = np.argsort(-probs, axis=1)
    mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    tokens = np.cumsum(span[order], axis=1)
    out = []
    for eps in missed:
        first = np.argmax(mass >= 1.0 - eps, axis=1)
        out.append(float(np.mean(tokens[np.arange(len(first)), first])))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--exponents", type=float, nargs="+", default=[0.8, 1.0, 1.2])
    p.add_argument("--boosts", type=float, nargs="+",
                   default=[AttentionModelSpec().rank_logit_boost],
                   help="rank_logit_boost values, each with every exponent")
    p.add_argument("--contexts", type=int, nargs="+",
                   default=[8192, 32768, 131072, 524288, 1048576])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    base = AttentionModelSpec(seed=args.seed)
    specs = {"default (law off)": base}
    for s in args.exponents:
        for boost in args.boosts:
            specs[f"s {s:g}, boost {boost:g}"] = replace(base, rank_exponent=s,
                                                         rank_logit_boost=boost)
    contexts = args.contexts
    header = " | ".join(f"{n // 1024}k" for n in contexts)
    rule = "|---" * (len(contexts) + 1) + "|"
    rows: dict[str, list[str]] = {}
    budget_rows: dict[str, list[str]] = {}
    minference = {}
    start = time.perf_counter()
    for name, spec in specs.items():
        cells = {key: [] for key in ("err1", "err5", "kept1", "kept5")}
        found = {eps: [] for eps in MISSED}
        for n in contexts:
            for r, tag in ((0.01, "1"), (0.05, "5")):
                result = accuracy_proxy(ratio_plan(n, r), spec)
                cells[f"err{tag}"].append(result.rel_error)
                cells[f"kept{tag}"].append(result.mass_kept)
            for eps, value in zip(MISSED, budgets(spec, n, MISSED), strict=True):
                found[eps].append(value)
            clear_caches()
        minference[name] = accuracy_proxy(exact_topk(131072, 4096 - SINKS - RECENT),
                                          spec).mass_kept
        for key, label in (("err5", "top-5% rel_error"), ("err1", "top-1% rel_error"),
                           ("kept5", "top-5% mass kept"), ("kept1", "top-1% mass kept")):
            rows.setdefault(label, []).append(
                f"| {name} | " + " | ".join(f"{v:.3f}" for v in cells[key]) + " |")
        fit = [n >= 32768 for n in contexts]
        for eps in MISSED:
            values = np.array(found[eps])
            logs = np.log(np.array(contexts, dtype=float)[fit])
            slope = np.polyfit(logs, np.log(values[fit]), 1)[0] if sum(fit) >= 2 else np.nan
            budget_rows.setdefault(f"tokens keeping all but {eps:g} of the mass", []).append(
                f"| {name} | " + " | ".join(f"{v:,.0f} ({v / n:.1%})" for v, n in
                                            zip(values, contexts, strict=True))
                + f" | N^{slope:.2f} |")
    for label, lines in rows.items():
        print(f"\n{label}, exact per-head top-k with the 4 sinks and newest 1,024 (seed "
              f"{args.seed})\n\n| shape | {header} |\n{rule}")
        print("\n".join(lines))
    for label, lines in budget_rows.items():
        print(f"\n{label} (oracle top-k over the whole context; growth fitted over 32k-1M)\n\n"
              f"| shape | {header} | growth |\n{rule}---|")
        print("\n".join(lines))
    print("\nmass kept by the 4 sinks, the newest 1,024 and the top 3,068 others at 128k "
          "(MInference: 96.4-96.8%)\n\n| shape | kept |\n|---|---|")
    for name, kept in minference.items():
        print(f"| {name} | {kept:.3f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

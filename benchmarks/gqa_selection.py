"""HybridGen's GQA selection modes compared at equal accuracy: which one should be the default?

For every GQA model of the catalog on one platform (default ``h100-80gb-spr-cxl``) at each
context (default 128k and 512k), HybridGen runs with a static top-k ratio r (``adaptive:
false``, the landing zone sized for r; the GPU share is what HBM holds beside it, as by
default) under each selection mode
(``plan.GroupSelect``): per query head, per KV group with the union of the heads' top-k sets,
and per KV group with one shared top-k by the group's max or summed logits. Each mode is swept
over r; its proxy error (``accuracy_rel_error``, the simulator's accuracy proxy on synthetic
attention with the model's group size) falls as r grows and its tokens/s falls too.

The comparison is made at equal accuracy: the target is the per-head mode's error at its
default r (0.05); for each mode the r that reaches that error is interpolated (linearly in log
r between the two swept ratios around it) and so are its tokens/s and PCIe bytes per token.
A mode whose smallest swept r is already more accurate than the target is reported at that r
(a lower bound of its speed, marked ``>=``); one that never reaches it, as unreachable.

Output: a table per (model, context) on stdout and, with ``--out``, ``gqa_selection.json`` (every
swept point) and ``gqa_selection.md`` (the tables). ``--head-noise`` re-runs the comparison
with heads of a group less alike (the synthetic model's ``head_noise_std``: the union's size and
the shared top-k's loss both grow with it), to see whether the choice depends on that.

``--defaults`` instead runs HybridGen as studies do (its default options: adaptive r from 0.05,
landing zone for the scheduler's largest r) once per mode and tabulates tokens/s, PCIe bytes
per generated token and proxy error side by side.

Usage: python benchmarks/gqa_selection.py [--models ...] [--contexts 128k 512k]
       [--profile h100-80gb-spr-cxl] [--batch 2] [--gen 16] [--samples 4]
       [--head-noise 0.5 1.0 1.5] [--defaults] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hgsim.accuracy import clear_caches, proxy  # noqa: E402
from hgsim.catalog import get_model, model_names  # noqa: E402
from hgsim.simulate import Fidelity, simulate  # noqa: E402
from hgsim.units import parse_count  # noqa: E402
from hgsim.workload import Workload  # noqa: E402

MODES = {  # label -> policy options
    "per_head": {"selection": "per_head"},
    "group_union": {"selection": "group_union"},
    "group_shared_max": {"selection": "group_shared", "group_score": "max"},
    "group_shared_sum": {"selection": "group_shared", "group_score": "sum"},
}
RATIOS = [0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2]
DEFAULT_RATIO = 0.05


def gqa_models() -> list[str]:
    return [name for name in model_names() if get_model(name).gqa_group > 1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="*", default=None, help="default: every GQA model")
    p.add_argument("--contexts", nargs="*", default=["128k", "512k"])
    p.add_argument("--profile", default="h100-80gb-spr-cxl")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="simulated decode steps per point")
    p.add_argument("--ratios", nargs="*", type=float, default=RATIOS)
    p.add_argument("--head-noise", nargs="*", type=float, default=[None],
                   help="head_noise_std of the synthetic attention (default: the model's)")
    p.add_argument("--defaults", action="store_true",
                   help="each mode with HybridGen's default options, side by side")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def use_head_noise(value: float | None) -> None:
    """Run with heads of a KV group this alike: the accuracy model's default spec (which the
    simulator's proxy and union sizes read) gets ``head_noise_std = value``."""
    base = proxy.AttentionModelSpec()
    spec = base if value is None else replace(base, head_noise_std=value)
    proxy.DEFAULT_SPEC = spec
    clear_caches()


def pcie_bytes_per_token(result) -> float:
    """Host-to-device bytes per generated token over the simulated steps."""
    h2d = sum(v for k, v in result.bytes_by_resource.items() if k.endswith(".h2d"))
    simulated = sum(1 for s in result.steps if s.simulated)
    return h2d / (result.batch * simulated) if simulated else float("nan")


def point(args, model: str, context: int, mode: str, ratio: float | None) -> dict:
    # a static ratio: the landing zone is sized for it (max_ratio), not for the scheduler's 0.5;
    # no ratio: HybridGen's defaults (adaptive)
    options = dict(MODES[mode])
    if ratio is not None:
        options.update(topk_ratio=ratio, max_ratio=ratio, adaptive=False)
    result = simulate(args.profile, model, "hybridgen",
                      Workload(batch=args.batch, context=context, gen=args.gen),
                      policy_options=options, fidelity=Fidelity(decode_samples=args.samples))
    row = result.to_row()
    return {
        "model": model, "context": context, "mode": mode, "ratio": ratio,
        "feasible": result.feasible, "selection": row.get("selection", ""),
        "tokens_per_s": row.get("tokens_per_s", float("nan")),
        "error": row.get("accuracy_rel_error", float("nan")),
        "mass_kept": row.get("accuracy_mass_kept", float("nan")),
        "pcie_gb_per_token": pcie_bytes_per_token(result) / 1e9 if result.feasible else float("nan"),
        "binding": row.get("binding", ""),
    }


def at_error(points: list[dict], target: float) -> dict:
    """The mode's r, tokens/s and PCIe bytes where its error equals ``target`` (see module doc)."""
    pts = sorted((p for p in points if p["feasible"]), key=lambda p: p["ratio"])
    if not pts:
        return {"status": "infeasible"}
    if target <= 0:  # the per-head point is exact (no host top-k): nothing to trade
        return {"status": "lossless"}
    if pts[0]["error"] <= target:
        return {"status": "bound", **{k: pts[0][k] for k in ("ratio", "tokens_per_s",
                                                               "pcie_gb_per_token", "error")}}
    for lo, hi in zip(pts, pts[1:], strict=False):
        if lo["error"] >= target >= hi["error"]:
            span = lo["error"] - hi["error"]
            w = 0.0 if span <= 0 else (lo["error"] - target) / span
            x = math.exp(math.log(lo["ratio"]) + w * (math.log(hi["ratio"]) - math.log(lo["ratio"])))

            def mix(key: str, lo=lo, hi=hi, w=w) -> float:
                return math.exp(math.log(lo[key]) + w * (math.log(hi[key]) - math.log(lo[key])))

            return {"status": "ok", "ratio": x, "tokens_per_s": mix("tokens_per_s"),
                    "pcie_gb_per_token": mix("pcie_gb_per_token"), "error": target}
    return {"status": "unreachable"}


def compare(args, model: str, context: int) -> tuple[list[dict], dict]:
    points = [point(args, model, context, mode, r) for mode in MODES for r in args.ratios]
    ratios = set(args.ratios) | {DEFAULT_RATIO}
    if DEFAULT_RATIO not in args.ratios:
        points += [point(args, model, context, mode, DEFAULT_RATIO) for mode in MODES]
    base = next(p for p in points if p["mode"] == "per_head" and p["ratio"] == DEFAULT_RATIO)
    summary = {"model": model, "context": context, "target_error": base["error"],
               "per_head_tokens_per_s": base["tokens_per_s"], "ratios": sorted(ratios),
               "modes": {}}
    for mode in MODES:
        own = [p for p in points if p["mode"] == mode]
        at_default = next(p for p in own if p["ratio"] == DEFAULT_RATIO)
        equal = at_error(own, base["error"]) if base["feasible"] else {"status": "infeasible"}
        summary["modes"][mode] = {"default_r": at_default, "equal_error": equal}
    return points, summary


def table(summary: dict) -> str:
    lines = [f"### {summary['model']} at {summary['context'] // 1024}k "
             f"(target error {summary['target_error']:.4f}: per_head at r = {DEFAULT_RATIO})",
             "",
             "| mode | tok/s at r=0.05 | PCIe GB/tok | error | r at target | tok/s at target | "
             "PCIe GB/tok at target | speed-up vs per_head at target |",
             "|---|---|---|---|---|---|---|---|"]
    base = summary["per_head_tokens_per_s"]
    for mode, m in summary["modes"].items():
        d, e = m["default_r"], m["equal_error"]
        if e["status"] in ("ok", "bound"):
            mark = ">=" if e["status"] == "bound" else ""
            at = (f"{'<=' if mark else ''}{e['ratio']:.4f} | {mark}{e['tokens_per_s']:.3f} | "
                  f"{e['pcie_gb_per_token']:.2f} | {mark}{e['tokens_per_s'] / base:.2f}x")
        else:
            at = f"{e['status']} | | | "
        lines.append(f"| {mode} | {d['tokens_per_s']:.3f} | {d['pcie_gb_per_token']:.2f} | "
                     f"{d['error']:.4f} | {at} |")
    return "\n".join(lines)


def defaults_table(args, models: list[str], contexts: list[int]) -> tuple[list[dict], str]:
    """Each mode with HybridGen's default options: tokens/s, PCIe GB per token, proxy error."""
    points, lines = [], [
        "| model | context | " + " | ".join(f"{m} tok/s | GB/tok | error" for m in MODES) + " |",
        "|---|---|" + "---|---|---|" * len(MODES)]
    for model in models:
        for context in contexts:
            row = [point(args, model, context, mode, None) for mode in MODES]
            points += row
            cells = " | ".join(
                f"{p['tokens_per_s']:.3f} | {p['pcie_gb_per_token']:.2f} | {p['error']:.4f}"
                if p["feasible"] else "infeasible | | " for p in row)
            lines.append(f"| {model} | {context // 1024}k | {cells} |")
            print(lines[-1], flush=True)
    return points, "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    models = args.models or gqa_models()
    contexts = [parse_count(c) for c in args.contexts]
    if args.defaults:
        points, text = defaults_table(args, models, contexts)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gqa_defaults.json").write_text(json.dumps(points, indent=1))
            (args.out / "gqa_defaults.md").write_text(text + "\n")
        return
    report: dict = {"profile": args.profile, "batch": args.batch, "gen": args.gen,
                    "samples": args.samples, "runs": []}
    text = []
    for noise in args.head_noise:
        use_head_noise(noise)
        label = f"head_noise_std = {proxy.DEFAULT_SPEC.head_noise_std}"
        text.append(f"## {label} (query correlation {proxy.DEFAULT_SPEC.query_correlation:.2f})")
        run = {"head_noise_std": proxy.DEFAULT_SPEC.head_noise_std, "points": [], "summaries": []}
        for model in models:
            for context in contexts:
                t0 = time.perf_counter()
                points, summary = compare(args, model, context)
                run["points"] += points
                run["summaries"].append(summary)
                text.append(table(summary))
                print(text[-1], f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)
        report["runs"].append(run)
    use_head_noise(None)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gqa_selection.json").write_text(json.dumps(report, indent=1))
        (args.out / "gqa_selection.md").write_text("\n\n".join(text) + "\n")


if __name__ == "__main__":
    main()

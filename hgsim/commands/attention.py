"""``hgsim attention``: where the accuracy model's synthetic attention puts its mass.

The shape fields a study sets (``fidelity.attention``, ``simulate --attention``) are logit
boosts and noise scales; this prints what they mean in the terms measurements use (the sinks'
share, the newest tokens', how much a per-head top-k keeps, how large a GQA group's union is),
and with ``--lags`` what the selection model's drift (``fidelity.selection``) means (a query's
cosine to an earlier one, how much of a head's top-k survives), so either can be checked
against a measured figure before a study runs on it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from rich.table import Table

from hgsim.commands.checks import count
from hgsim.commands.profiles import console, fmt
from hgsim.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attention",
        help="show where the accuracy model's synthetic attention puts its mass",
        description=("The share of the softmax mass on the sinks, the newest tokens, heavy "
                     "hitters and the rest, the mass a per-head top-k keeps and a GQA group's "
                     "union size, for the accuracy model's default shape or one set with "
                     "--attention (the fields of a study's fidelity.attention)."),
    )
    p.add_argument("--context", default="32k", help="tokens attended to (default 32k)")
    p.add_argument("--model", help="take the query heads per KV head from this model")
    p.add_argument("--group", type=int, default=None, metavar="G",
                   help="query heads per KV head (default 1, or the --model's)")
    p.add_argument("--recent", default="1k", metavar="TOKENS",
                   help="newest tokens counted as the recent window (default 1k)")
    p.add_argument("--attention", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the attention's shape, e.g. heavy_fraction=0.05 "
                        "(repeatable; docs/studies.md, fidelity)")
    p.add_argument("--lags", type=int, nargs="+", metavar="L",
                   help="also show how far a head's top-k moves in L decode steps under the "
                        "selection model's drift (query cosine and top-k overlap), e.g. 1 4 16")
    p.add_argument("--ratio", type=float, default=0.05,
                   help="top-k ratio of the --lags overlap (default 0.05)")
    p.add_argument("--selection", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the selection model's drift for --lags, e.g. "
                        "history_decay=0.8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the shares as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hgsim.accuracy.shape import attention_shares, step_overlaps
    from hgsim.commands.simulate import accuracy_model_fields

    context = count(args.context, "--context")
    recent = count(args.recent, "--recent")
    if context < 2:
        raise UserError(f"must be at least 2 tokens, got {args.context}", field="--context")
    group = _heads_per_group(args)
    spec = accuracy_model_fields(args.attention, "attention")
    selection = accuracy_model_fields(args.selection, "selection")
    if args.selection and not args.lags:
        raise UserError("sets the drift --lags shows; give --lags too", field="--selection")
    if not 0 < args.ratio <= 1:  # NaN fails too
        raise UserError(f"must lie in (0, 1], got {args.ratio:g}", field="--ratio")
    if args.lags and not all(0 <= lag <= 10_000 for lag in args.lags):
        raise UserError(f"must be whole numbers in [0, 10000], got "
                        f"{' '.join(map(str, args.lags))}", field="--lags")
    shares = attention_shares(spec, context=context, heads_per_group=group, recent_tokens=recent)
    lags = [] if not args.lags else step_overlaps(
        spec, selection, lags=tuple(args.lags), ratio=args.ratio, context=context,
        heads_per_group=group, recent_tokens=recent)
    if args.json:
        print(json.dumps({**asdict(shares), "topk_kept": _keyed(shares.topk_kept),
                          "union_per_k": _keyed(shares.union_per_k),
                          "lags": [asdict(lag) for lag in lags]}))
        return 0
    _print(shares, "defaults" if spec is None else ", ".join(args.attention))
    if lags:
        _print_lags(lags, args.ratio, ", ".join(args.selection) or "defaults")
    return 0


def _heads_per_group(args: argparse.Namespace) -> int:
    if args.model is not None and args.group is not None:
        raise UserError("give --model or --group, not both (the model sets the group)",
                        field="--group")
    if args.model is not None:
        from hgsim.catalog import get_model

        return get_model(args.model).gqa_group
    group = 1 if args.group is None else args.group
    if not 1 <= group <= 64:
        raise UserError(f"must be a whole number in [1, 64], got {group}", field="--group")
    return group


def _keyed(values: dict[float, float]) -> dict[str, float]:
    return {f"{ratio:g}": value for ratio, value in values.items()}


def _print(shares, shape: str) -> None:
    out = console()
    per = "query head" if shares.heads_per_group == 1 else "query heads"
    out.print(f"Synthetic attention at {fmt(shares.context)} tokens, "
              f"{shares.heads_per_group} {per} per KV head ({shape})")
    mass = Table(show_header=True, header_style="bold")
    mass.add_column("where the mass goes")
    mass.add_column("share", justify="right")
    between = "between them" if shares.recent_tokens else "after them"
    for label, value in ((f"{fmt(shares.sink_tokens)} sinks (the oldest tokens)", shares.sinks),
                         (f"{fmt(shares.recent_tokens)} newest tokens", shares.recent),
                         (f"heavy hitters {between}", shares.heavy),
                         (f"other tokens {between}", shares.other)):
        mass.add_row(label, f"{100 * value:.1f}%")
    if shares.ranked:
        from hgsim.accuracy.shape import RANKED_SHARE

        mass.add_row(f"power law's top {100 * RANKED_SHARE:g}% of ranks {between} (overlaps "
                     "the rows above)", f"{100 * shares.ranked:.1f}%")
    out.print(mass)
    kept = Table(show_header=True, header_style="bold")
    kept.add_column(f"per-head top-k of the tokens {between}")
    for ratio in shares.topk_kept:
        kept.add_column(f"{100 * ratio:g}%", justify="right")
    kept.add_row("mass kept, with the sinks and newest tokens",
                 *(f"{100 * v:.1f}%" for v in shares.topk_kept.values()))
    if shares.heads_per_group > 1:
        kept.add_row("rows of the group's union per k selected",
                     *(f"{v:.2f}" for v in shares.union_per_k.values()))
    out.print(kept)


def _print_lags(lags, ratio: float, drift: str) -> None:
    out = console()
    out.print(f"A head's top-{100 * ratio:g}% of the tokens between, L decode steps apart "
              f"(drift: {drift})")
    table = Table(show_header=True, header_style="bold")
    table.add_column("lag L", justify="right")
    table.add_column("query cosine", justify="right")
    table.add_column("top-k overlap", justify="right")
    for lag in lags:
        table.add_row(str(lag.lag), f"{lag.query_cosine:.3f}", f"{lag.overlap:.3f}")
    out.print(table)


__all__ = ["register", "run"]

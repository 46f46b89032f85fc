"""``hgsim models``: the model catalog with the sizes that drive every simulated cost.

Weights and KV bytes per token decide what fits in HBM, DRAM and CXL, so they are printed
next to the architecture they come from, where a wrong number is easy to spot.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from hgsim.catalog import MODELS, get_model
from hgsim.specs.model import DTYPE_BYTES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model catalog (architecture, weight and KV sizes)",
        description="Table of the catalog; names and aliases such as Llama-2-70B are accepted.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these models")
    parser.add_argument(
        "--dtype", default="fp16", choices=sorted(DTYPE_BYTES),
        help="element type for the weight and KV columns (default fp16)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    specs = [get_model(n) for n in args.names] if args.names else list(MODELS.values())
    dtype = args.dtype
    table = Table(title="Model catalog")
    table.add_column("name", no_wrap=True)
    table.add_column("family")
    headers = ("layers", "hidden", "heads", "kv heads", "head_dim", "ffn", "max ctx",
               "params (B)", f"weights GB {dtype}", f"KV KiB/token {dtype}")
    for header in headers:
        table.add_column(header, justify="right")
    for spec in specs:
        table.add_row(
            spec.name, spec.family, str(spec.num_layers), str(spec.hidden_size),
            str(spec.num_heads), str(spec.num_kv_heads), str(spec.head_dim),
            str(spec.ffn_size), f"{spec.max_context:,}",
            f"{spec.num_params() / 1e9:.2f}",
            f"{spec.weight_bytes(dtype) / 1e9:.1f}",
            f"{spec.kv_bytes_per_token(dtype) / 1024:g}",
        )
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    console.print(table)
    console.print("GB = 1e9 bytes, KiB = 1024 bytes; max ctx is native (studies may exceed it)")
    return 0

"""``hgsim models``: the model catalog and the user's models, with the sizes that drive every
simulated cost.

Weights and KV bytes per token decide what fits in HBM, DRAM and CXL, so they are printed
next to the architecture they come from, where a wrong number is easy to spot. ``show`` prints
one model (a name or a model file) field by field, as ``hgsim profiles show`` does a profile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from hgsim.catalog import MODELS, get_model
from hgsim.commands.profiles import console, fmt
from hgsim.errors import UserError, one_line
from hgsim.model_files import MODEL_PATH_ENV, load_model_file, user_model_files
from hgsim.specs.model import DTYPE_BYTES, ModelSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model catalog and user models (architecture, weight and KV sizes)",
        description=("Table of the catalog and of the YAML models on $HGSIM_MODEL_PATH; names, "
                     "aliases such as Llama-2-70B and model file paths (config.json or YAML) "
                     "are accepted. `hgsim models show NAME|PATH` prints one model in full."),
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only these models, or `show NAME|PATH`")
    parser.add_argument(
        "--dtype", default="fp16", choices=sorted(DTYPE_BYTES),
        help="element type for the weight and KV columns (default fp16)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = list(args.names)
    if names[:1] == ["show"]:
        if len(names) != 2:
            raise UserError("show takes one model name or path, e.g. `hgsim models show "
                            "llama-3.1-8b`")
        return _show(get_model(names[1]), args.dtype)
    if names and names != ["list"]:
        return _table("Models", [get_model(n) for n in names], args.dtype)
    user = _user_models()
    catalog = [spec for name, spec in MODELS.items() if name not in user]
    _table("Model catalog", catalog, args.dtype)
    if user:
        _table(f"User models (${MODEL_PATH_ENV})", [spec for spec, _ in user.values()],
               args.dtype)
        out = console()
        out.print("files:")
        for name, (_, path) in user.items():
            out.print(f"  {name}: {path}")
    return 0


def _user_models() -> dict[str, tuple[ModelSpec, Path]]:
    """Name -> (spec, file) of the readable models on the path; a broken file is a warning, so
    that it does not hide the rest."""
    found = {}
    for name, path in user_model_files().items():
        try:
            found[name] = (load_model_file(path), path)
        except UserError as exc:
            print(f"hgsim models: warning: {one_line(str(exc))}", file=sys.stderr)
    return found


def _table(title: str, specs: list[ModelSpec], dtype: str) -> int:
    table = Table(title=title)
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
    out = console()
    out.print(table)
    out.print("GB = 1e9 bytes, KiB = 1024 bytes; max ctx is native (studies may exceed it)")
    return 0


def _show(spec: ModelSpec, dtype: str) -> int:
    out = console()
    out.print(f"[bold]{spec.name}[/bold]  family {spec.family}")
    out.print(f"source: {spec.source or '-'}\n")
    fields = Table(title="Architecture", show_header=False, title_justify="left")
    fields.add_column("field")
    fields.add_column("value", justify="right")
    for name, value in spec.model_dump(exclude={"name", "family", "source"}).items():
        fields.add_row(name, fmt(value) if isinstance(value, int) and not isinstance(
            value, bool) else str(value).lower())
    out.print(fields)
    derived = Table(title=f"Derived ({dtype})", show_header=False, title_justify="left")
    derived.add_column("quantity")
    derived.add_column("value", justify="right")
    derived.add_column("unit")
    rows = [
        ("query heads per KV head", fmt(spec.gqa_group), ""),
        ("parameters", fmt(spec.num_params()), f"{spec.num_params() / 1e9:.3f} B"),
        ("parameters per layer", fmt(spec.params_per_layer()), ""),
        ("weights", fmt(spec.weight_bytes(dtype) / 1e9), "GB"),
        ("KV per token", fmt(spec.kv_bytes_per_token(dtype)),
         f"bytes = {fmt(spec.kv_bytes_per_token(dtype) / 1024)} KiB"),
        ("KV per token and layer", fmt(spec.kv_bytes_per_token_layer(dtype)), "bytes"),
        ("KV at max ctx", fmt(spec.kv_bytes_per_token(dtype) * spec.max_context / 1e9),
         "GB per sequence"),
    ]
    for row in rows:
        derived.add_row(*row)
    out.print(derived)
    out.print("GB = 1e9 bytes, KiB = 1024 bytes")
    return 0

"""``hgsim policies``: every policy a study may name, built-in or from an installed plugin.

Listing plugins with the package that provides them is the quickest check that an entry point
was picked up (and the place where a broken one reports itself).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "policies",
        help="list KV policies (built-in and installed plugins) and their options",
        description="Table of the policies `simulate`, studies and `validate` accept.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only these policies, with every option and its default")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hgsim.policies import is_lossy, registry

    entries = registry.registered()
    names = args.names or list(entries)
    for name in names:
        registry.lookup(name)  # unknown names: one-line error with a suggestion
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    table = Table(title="KV policies")
    for column in ("name", "from", "lossy", "description"):
        table.add_column(column, no_wrap=column == "name")
    if args.names:
        table.add_column("options (preset or default)")
    for name in names:
        cls, preset, description = entries[name]
        plugin = registry.plugin(name)
        origin = f"{plugin.dist} {plugin.version}" if plugin else "hgsim"
        row = [name, origin, "yes" if is_lossy(name) else "no", description]
        if args.names:
            row.append(_options(cls, preset))
        table.add_row(*row)
    console.print(table)
    return 0


def _options(cls, preset: dict) -> str:
    """``key=value`` as ``--option`` takes it: enums by their value (``selection=group_shared``,
    not ``GroupSelect.GROUP_SHARED``, which the option would reject)."""
    values = cls.Options(**preset).model_dump(mode="json")
    return ", ".join(f"{key}={value}" for key, value in values.items())

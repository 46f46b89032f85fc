"""Command-line entry point: ``python -m hgsim <command>``.

Each command lives in ``hgsim/commands/<name>.py`` with ``register(subparsers)`` and a
``run(args) -> int``; this module only dispatches and turns ``UserError`` into one line on
stderr with exit code 2 (no traceback for mistakes the user can fix).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

from hgsim import __version__
from hgsim.errors import UserError

# Order is the order shown in --help.
COMMANDS = ["simulate", "run", "study", "profiles", "models", "policies", "calibrate", "validate"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a mistake it catches (a value that is not a number, a choice not
    offered, a missing flag) is one line like every other user error, not a usage block first.
    Subcommands' parsers are of this class too (``add_subparsers`` makes them of the
    parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hgsim",
        description="Simulate CPU-GPU collaborative long-context LLM decoding over tiered memory.",
    )
    parser.add_argument("--version", action="version", version=f"hgsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hgsim.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hgsim.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, not by hgsim's top-level parser
        verb = f"hgsim {args.command}" if getattr(args, "command", None) else "hgsim"
        print(f"{verb}: error: unrecognized arguments: {' '.join(extra)} (see {verb} --help)",
              file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"hgsim {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValidationError as exc:  # a check no command made first: still one line, exit 2
        from hgsim.config_io import humane

        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in (exc.title, *first["loc"]))
        print(f"hgsim {args.command}: error: {where}: {humane(first)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hgsim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0

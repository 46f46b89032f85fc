"""Command-line entry point: ``python -m hgsim <command>``.

Each command lives in ``hgsim/commands/<name>.py`` with ``register(subparsers)`` and a
``run(args) -> int``; this module only dispatches and turns ``UserError`` into one line on
stderr with exit code 2 (no traceback for mistakes the user can fix).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import re
import sys

from pydantic import ValidationError

from hgsim import __version__
from hgsim.commands.checks import argument_int
from hgsim.errors import UserError, one_line, quoted

# Order is the order shown in --help.
COMMANDS = ["simulate", "serve", "run", "study", "profiles", "models", "policies", "attention", "calibrate",
            "validate"]


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a mistake it catches (a value that is not a number, a choice not
    offered, a missing flag) is one line like every other user error, not a usage block first.
    Subcommands' parsers are of this class too (``add_subparsers`` makes them of the
    parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # every type=int flag: a 5000-digit value is 'too large' in a line of its own length
        self.register("type", int, argument_int)
        # every type=float flag: -0 is 0 (else '--slo-ttft -0' printed 'SLO TTFT <= -0 s')
        self.register("type", float, _argument_float)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(_cut_values(message))} "
                     f"(see {self.prog} --help)\n")


def _argument_float(text: str) -> float:
    """argparse's ``type=float``, with -0 read as 0, and a number past a float's range (1e999,
    400 digits) 'too large' rather than read as the inf it was not written as."""
    value = float(text) + 0.0
    if math.isinf(value) and "inf" not in text.lower():
        raise argparse.ArgumentTypeError(f"{quoted(text)} is too large a number (a float holds at "
                                         f"most {sys.float_info.max:.1e})")
    return value


#: A value argparse quotes in its message ('invalid choice: ...'), long enough to cut.
_LONG_QUOTED = re.compile(r"(?:(?<=invalid choice: )|(?<=invalid float value: ))"
                          r"'([^'\n]{41,})'")


def _cut_values(message: str) -> str:
    """argparse's ``message`` with each long quoted value cut after 40 characters: a
    5000-character --kv-dtype is not echoed whole."""
    return _LONG_QUOTED.sub(lambda m: f"'{m[1][:40]}'...({len(m[1]):,} characters)", message)


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


#: A token that can only be a (negative) value, never an option: hgsim has no option that
#: starts with a digit.
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def attach_negative_values(argv: list[str]) -> list[str]:
    """``argv`` with each negative-looking value joined to the option before it
    (``--context -1k`` -> ``--context=-1k``).

    Why: argparse takes a token that starts with "-" for an option unless it is a plain
    negative number ("-2" is a value, "-1k" and "-8k" are not), so ``--context -1k`` failed
    with "expected one argument" before hgsim could say what is wrong with the value. argparse
    has no public setting for which tokens are values; the ``--flag=value`` spelling is its
    public way to pass one that starts with "-", so this writes the command line that way and
    each flag's own check reports the value (a count: "must be a positive count"). A flag that
    takes no value then says so ("ignored explicit argument"). Nothing after ``--`` changes.
    """
    out: list[str] = []
    for i, token in enumerate(argv):
        prev = out[-1] if out else ""
        if "--" in argv[:i]:
            out.append(token)
        elif (_NEGATIVE_VALUE.match(token) and prev.startswith("-") and "=" not in prev
              and prev != "--" and not _NEGATIVE_VALUE.match(prev)):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def _cut(text: str) -> str:
    """``text`` cut after 40 characters, saying how long it was."""
    return text if len(text) <= 60 else f"{text[:40]}...({len(text):,} characters)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = attach_negative_values(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to, not by hgsim's top-level parser
        verb = f"hgsim {args.command}" if getattr(args, "command", None) else "hgsim"
        print(f"{verb}: error: unrecognized arguments: {one_line(_cut(' '.join(extra)))} "
              f"(see {verb} --help)",
              file=sys.stderr)
        return 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"hgsim {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except ValidationError as exc:  # a check no command made first: still one line, exit 2
        from hgsim.config_io import humane, schema_loc

        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in (exc.title, *schema_loc(first["loc"])))
        print(f"hgsim {args.command}: error: {one_line(f'{where}: {humane(first)}')}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hgsim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # | head: the reader has what it wanted
        _stdout_to_devnull()
        return 0
    except OSError as exc:
        if exc.errno not in _FULL:
            raise
        # the files hgsim writes say so themselves (outputs.written_whole): this is the
        # standard output, a full disk or /dev/full behind it
        _stdout_to_devnull()
        print(f"hgsim {args.command}: error: cannot write its output ({exc.strerror})",
              file=sys.stderr)
        return 2


#: A write refused for want of room: a full disk, a quota, a file past its size limit.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _stdout_to_devnull() -> None:
    """Point the standard output at /dev/null, so that the interpreter's flush at exit does
    not fail again with a second error ("Exception ignored ... <stdout>")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind it (captured)
        pass

"""Checks of command-line numbers that argparse lets through.

``type=float`` accepts ``nan``, ``inf`` and ``1e999``: a NaN threshold compares false with
everything, an infinite wait never ends. And a worker count is a number of processes this
machine must start, so a typo with extra zeros should not try to start them all.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

from hgsim.errors import UserError, quoted
from hgsim.units import MAX_DIGITS, digits_of, parse_count


def non_negative(value: float, flag: str, most: float | None = None,
                 unit: str = "") -> float:
    """A finite number >= 0 (seconds, percentages), and at most ``most`` when given."""
    if not math.isfinite(value):
        raise UserError(f"must be a finite number, got {value}", field=flag)
    if value < 0:
        raise UserError(f"must be >= 0, got {value:g}", field=flag)
    if most is not None and value > most:
        raise UserError(f"must be in [0, {most:g}]{unit}, got {value:g}", field=flag)
    return value


#: The longest ``--quiet-wait`` (seconds) before each case or benchmark: an hour is more than
#: a shared machine's neighbours need to finish; 1e15 is a typo that would wait forever.
QUIET_WAIT_MAX_S = 3600.0


def count(text: str, flag: str) -> int:
    """A token or step count as people write it (``64k``, ``1M``, ``4096``)."""
    try:
        return parse_count(text)
    except ValueError as exc:
        raise UserError(str(exc), field=flag) from None


#: A whole number as the command line gives one: digits, perhaps signed (the range is the
#: caller's to check, so a negative one is told its range, not that it is no number).
_WHOLE = re.compile(r"[+-]?[0-9]+")


def whole(text: str, flag: str, noun: str) -> int:
    """A count of things other than tokens (requests, turns): a plain whole number, no
    ``k``/``M`` suffix (those are the tokens' powers of two; 2k requests would be 2048)."""
    if not _WHOLE.fullmatch(text.strip()):
        raise UserError(f"expected a whole number of {noun}, got {text!r}", field=flag)
    digits = digits_of(text)
    if digits > MAX_DIGITS:
        raise UserError(f"got a {digits}-digit number; a count of {noun} has at most "
                        f"{MAX_DIGITS} digits", field=flag)
    return int(text)


def argument_int(text: str) -> int:
    """argparse's ``type=int`` (``_Parser`` registers it for ``int``), but a number of more
    digits than any count a flag takes is 'too large', not an 'invalid int value' quoted in
    full (past 4300 digits Python will not read it), and a long value that is no number is
    cut."""
    return _int_of(text, MAX_DIGITS)


def argument_seed(text: str) -> int:
    """A ``--seed``: any whole number Python reads (NumPy seeds from one of any size), one
    past that 'too large' in one line."""
    return _int_of(text, sys.get_int_max_str_digits() or 4300)


def _int_of(text: str, most_digits: int) -> int:
    digits = digits_of(text)
    if digits > most_digits:
        raise argparse.ArgumentTypeError(f"a {digits}-digit number is too large (at most "
                                         f"{most_digits} digits)")
    try:
        return int(text)
    except ValueError:  # argparse's own words, a long value cut
        raise argparse.ArgumentTypeError(f"invalid int value: {quoted(text)}") from None


def local_workers(requested: int | None, flag: str, command: str,
                  cpus: int | None = None) -> int | None:
    """Workers (processes, threads) for this machine's ``cpus`` (default: all it has): more
    than its CPUs are capped, with a warning (they could only take turns on the same cores)."""
    cpus = cpus or os.cpu_count() or 1
    if requested is None or requested <= cpus:
        return requested
    print(f"hgsim {command}: warning: {flag} {requested} is more than the {cpus} CPUs of this "
          f"machine; using {cpus}", file=sys.stderr)
    return cpus


def check_gpu_placement(placement: str, copies: int) -> None:
    """``--gpu-placement spread`` places copies of the model: with one (``--data-parallel
    1``) there is nothing to place, and the run would silently be the packed one."""
    if placement != "packed" and copies == 1:
        raise UserError("spread places copies of the model, and --data-parallel asks for one: "
                        "give --data-parallel 2 or more", field="--gpu-placement")

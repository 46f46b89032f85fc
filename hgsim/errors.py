"""User-facing errors.

A ``UserError`` is something the person running hgsim can fix (a bad profile, an unknown
model, an impossible study axis). The CLI prints its one-line message and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class UserError(Exception):
    """An error in the user's input: printed as one line, exit code 2.

    ``args`` are the arguments it was made with (``str`` is the one-line message), so
    ``type(exc)(*exc.args)`` rebuilds it whole, as simpy does to re-raise an error from inside
    a simulated process and pickle does to carry it out of a worker process; each subclass
    whose ``__init__`` takes other arguments sets ``args`` to them."""

    exit_code = 2

    def __init__(self, message: str, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        where = ": ".join(part for part in (source, field) if part)
        # one line whatever value it quotes (a name, a file's field), for the CLI and the API
        self.message = one_line(f"{where}: {message}" if where else message)
        super().__init__(message, source, field)

    def __str__(self) -> str:
        return self.message


@contextmanager
def fields_renamed(names: Mapping[str, str]) -> Iterator[None]:
    """A ``UserError`` raised inside that names one of ``names``' fields names what the
    caller calls it instead (the flag or argument that set it on the caller's surface)."""
    try:
        yield
    except UserError as exc:
        if exc.field not in names:
            raise
        raise UserError(str(exc).removeprefix(f"{exc.field}: "), field=names[exc.field]) \
            from None


class ConfigError(UserError):
    """A configuration file (profile, study) failed validation."""


class InfeasibleError(UserError):
    """A configuration cannot run on the hardware (e.g. KV does not fit in any tier)."""


class OptionError(UserError):
    """A policy option that is unknown to the policy or has a value it does not take.

    ``option`` and ``reason`` let each caller name the option its own way (``--option topk``
    on the command line, a line of a study file, ``policy_options.topk`` in Python)."""

    def __init__(self, option: str, reason: str, unknown: bool = False):
        self.option, self.reason, self.unknown = option, reason, unknown
        super().__init__(reason, field=f"policy_options.{option}".rstrip("."))
        self.args = (option, reason, unknown)


class TraceTooLarge(UserError):
    """A trace whose estimated size is over the limit, refused before most of the run: each
    caller names the knobs its own way (``--samples`` on the command line, ``samples`` in
    Python)."""

    def __init__(self, estimate_bytes: float, per_step_bytes: float, steps: int,
                 limit_bytes: float):
        from hgsim.units import size_text

        self.estimate_bytes, self.per_step_bytes = estimate_bytes, per_step_bytes
        self.steps, self.limit_bytes = steps, limit_bytes
        super().__init__(f"would be about {size_text(estimate_bytes)} ({self.shape}), over the "
                         f"{size_text(limit_bytes)} limit", field="trace")
        self.args = (estimate_bytes, per_step_bytes, steps, limit_bytes)

    @property
    def shape(self) -> str:
        from hgsim.units import size_text

        return f"{size_text(self.per_step_bytes)} per simulated step x {self.steps:,} steps"


#: Characters that end a line (``str.splitlines``), which an error quoting what the user
#: typed (a name, a flag's value) would otherwise carry into its one line.
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(message: str) -> str:
    """``message`` with each line break escaped as Python writes it (``\\n``, ``\\x85``), so
    an error stays one line whatever value it quotes."""
    return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], message)


def clipped(text: str, most: int = 24) -> str:
    """``text`` quoted as ``repr`` does, cut after ``most`` characters with ``...`` (a number
    too large to read: its first digits say which it was)."""
    return f"{text[:most]!r}..." if len(text) > most else repr(text)


def quoted(text: str, most: int = 40) -> str:
    """``text`` quoted as ``repr`` does, cut after ``most`` characters: an error quoting a value
    the user typed stays a line to read, whatever its length (a 5000-digit count)."""
    if len(text) <= most:
        return repr(text)
    return f"{text[:most]!r}...({len(text):,} characters)"

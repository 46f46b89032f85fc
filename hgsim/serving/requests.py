"""The requests an online server receives: when each arrives, its prompt and its output length.

Arrivals are a Poisson process (exponential gaps) or a trace's own times. The gaps are drawn
once at rate 1 and divided by the rate, so every rate sees the same requests in the same order
with the same lengths (common random numbers): a rate search then compares loads, not draws.

A multi-turn mix makes each arrival a conversation: its first turn is a prompt, each later
turn comes a think time after the turn before it has finished and sends the whole conversation
so far (earlier prompts and answers) plus a new message, as a chat client does. The later
turns' arrival times are the server's to set (they depend on when the answers finish).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hgsim.errors import UserError, clipped, quoted
from hgsim.units import MAX_DIGITS, digits_of, parse_count

#: The most requests one run serves (a typo with extra zeros would fill memory, not a queue).
MAX_REQUESTS = 1_000_000
#: The most tokens one request generates: each is one iteration of the server.
MAX_OUTPUT_TOKENS = 1 << 20
#: The longest prompt (4G tokens: far past any model's context, and within what the
#: simulator's workload takes with room for the grid point above it).
MAX_PROMPT_TOKENS = 1 << 32
#: The largest trace file read.
MAX_TRACE_BYTES = 256 << 20


#: The most turns one conversation takes.
MAX_TURNS = 1000
#: The longest think time between turns (a day: a typo with extra zeros is refused).
MAX_THINK_S = 86_400.0


@dataclass(frozen=True)
class Request:
    id: int
    arrival_s: float  # NaN for a later turn until the turn before it has finished
    prompt_tokens: int  # the whole prompt: ``prefix_tokens`` of earlier turns and the new ones
    output_tokens: int  # tokens generated, the first one by the prefill
    # a turn of a conversation: which, its number (0: the first), the tokens its prompt
    # repeats of the turn before (that turn's prompt and answer: what a prefix cache may hold),
    # and the seconds the user thinks after the turn before has finished
    conversation: int = -1
    turn: int = 0
    prefix_tokens: int = 0
    think_s: float = 0.0

    @property
    def final_tokens(self) -> int:
        """Tokens in its KV cache when it finishes (what admission reserves)."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts: ``32k`` (fixed), ``uniform:8k:64k``, or
    ``lognormal:32k:0.5`` (median, sigma of the log; long-tailed like real prompt lengths),
    drawn lengths rounded and clipped to at least 1."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int, what: str, most: int | None = None) -> LengthDist:
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if not isinstance(text, str):
            raise UserError(f"expected a token count (32k), uniform:LO:HI or lognormal:MEDIAN:SIGMA,"
                            f" got {text!r}", field=what)
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                n = parse_count(parts[0])
                dist = cls("fixed", n)
            elif parts[0] == "uniform" and len(parts) == 3:
                lo, hi = parse_count(parts[1]), parse_count(parts[2])
                if not 1 <= lo <= hi:
                    raise ValueError(f"needs 1 <= LO <= HI, got {lo} and {hi}")
                dist = cls("uniform", lo, hi)
            elif parts[0] == "lognormal" and len(parts) == 3:
                median, sigma = parse_count(parts[1]), float(parts[2])
                if not (math.isfinite(sigma) and 0 <= sigma <= 4):
                    raise ValueError(f"SIGMA must be a number in [0, 4], got {quoted(parts[2])}")
                dist = cls("lognormal", median, sigma)
            else:
                raise ValueError("expected a token count (32k), uniform:LO:HI or "
                                 "lognormal:MEDIAN:SIGMA")
        except ValueError as exc:
            raise UserError(f"{exc} (in {quoted(text)})", field=what) from None
        if dist.a < 1:
            raise UserError(f"needs at least 1 token, got {quoted(text)}", field=what)
        if most is not None and max(dist.a, dist.b if dist.kind == "uniform" else 0) > most:
            raise UserError(f"at most {most} tokens a request, got {quoted(text)}", field=what)
        return dist

    def draw(self, rng: np.random.Generator, n: int, most: float = np.inf) -> np.ndarray:
        """``n`` lengths, at most ``most`` (a lognormal's far tail is cut there)."""
        if self.kind == "fixed":
            values = np.full(n, self.a)
        elif self.kind == "uniform":
            values = rng.integers(int(self.a), int(self.b) + 1, size=n)
        else:
            values = self.a * np.exp(self.b * rng.standard_normal(n))
        return np.clip(np.rint(values), 1, min(most, 2.0 ** 62)).astype(np.int64)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return count_text(self.a)
        if self.kind == "uniform":
            return f"uniform:{count_text(self.a)}:{count_text(self.b)}"
        return f"lognormal:{count_text(self.a)}:{self.b:g}"


def prompt_lengths(text: str | int, what: str) -> LengthDist:
    """A prompt length distribution (``--prompt``, ``serving.prompt``)."""
    return LengthDist.parse(text, what, most=MAX_PROMPT_TOKENS)


def output_lengths(text: str | int, what: str) -> LengthDist:
    """An output length distribution (``--output``, ``serving.output``)."""
    return LengthDist.parse(text, what, most=MAX_OUTPUT_TOKENS)


def count_text(n: float) -> str:
    """A token count as people write it where exact: 32768 -> 32k, 1048576 -> 1M."""
    n = int(n)
    for unit, size in (("M", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@dataclass(frozen=True)
class RequestMix:
    """Requests to serve: ``count`` of them, ``prompt`` and ``output`` lengths drawn from their
    distributions, arriving as a Poisson process of ``rate_per_s`` (set per run).

    With ``turns`` > 1 each arrival is a conversation of that many turns: a later turn sends
    the conversation so far plus ``followup`` new tokens, ``think_s`` seconds on average
    (exponential) after the turn before has finished; ``count`` counts conversations."""

    prompt: LengthDist
    output: LengthDist
    count: int = 500
    seed: int = 0
    turns: int = 1
    followup: LengthDist | None = None  # new tokens of a later turn (None: as ``prompt``)
    think_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_REQUESTS:
            raise UserError(f"must be between 1 and {MAX_REQUESTS:,}, got {self.count}",
                            field="requests")
        check_turns(self.turns)
        check_think_s(self.think_s)
        if self.count * self.turns > MAX_REQUESTS:
            raise UserError(f"{self.count:,} conversations of {self.turns} turns are more than "
                            f"{MAX_REQUESTS:,} requests", field="turns")

    def requests(self, rate_per_s: float) -> list[Request]:
        if not (math.isfinite(rate_per_s) and rate_per_s > 0):
            raise UserError(f"must be a positive number of requests per second, got "
                            f"{rate_per_s!r}", field="rate")
        rng = np.random.default_rng(self.seed)
        gaps = rng.exponential(1.0, size=self.count)  # at rate 1, scaled below
        prompts = self.prompt.draw(rng, self.count, most=MAX_PROMPT_TOKENS)
        outputs = self.output.draw(rng, self.count, most=MAX_OUTPUT_TOKENS)
        with np.errstate(over="ignore"):
            arrivals = np.cumsum(gaps) / rate_per_s
        if not np.isfinite(arrivals[-1]):
            raise UserError(f"{rate_per_s!r} requests per second puts arrivals beyond any "
                            "time this can count", field="rate")
        if self.turns == 1:
            return [Request(i, float(t), int(p), int(o))
                    for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs, strict=True))]
        # the later turns drawn after the first ones, so a conversation's first turns are the
        # requests a one-turn mix of the same seed serves
        later = (self.count, self.turns - 1)
        news = (self.followup or self.prompt).draw(rng, later[0] * later[1],
                                                   most=MAX_PROMPT_TOKENS).reshape(later)
        answers = self.output.draw(rng, later[0] * later[1],
                                   most=MAX_OUTPUT_TOKENS).reshape(later)
        thinks = self.think_s * rng.exponential(1.0, size=later)
        requests: list[Request] = []
        for c in range(self.count):
            prompt, output = int(prompts[c]), int(outputs[c])
            requests.append(Request(len(requests), float(arrivals[c]), prompt, output, c, 0))
            for turn in range(1, self.turns):
                prefix = prompt + output
                prompt = prefix + int(news[c, turn - 1])
                output = int(answers[c, turn - 1])
                if prompt > MAX_PROMPT_TOKENS:
                    raise UserError(f"turn {turn + 1} of a conversation holds {prompt} tokens, "
                                    f"more than the {MAX_PROMPT_TOKENS} a prompt may",
                                    field="turns")
                requests.append(Request(len(requests), math.nan, prompt, output, c, turn,
                                        prefix, float(thinks[c, turn - 1])))
        return requests


def check_turns(turns: object, field: str = "turns") -> None:
    """``turns``: a whole number of turns a conversation, 1 to ``MAX_TURNS``."""
    if isinstance(turns, bool) or not isinstance(turns, int) or not 1 <= turns <= MAX_TURNS:
        raise UserError(f"must be a whole number of turns from 1 to {MAX_TURNS}, got {turns!r}",
                        field=field)


def check_think_s(think_s: object, field: str = "think_s") -> None:
    """``think_s``: the mean seconds between a turn's answer and the next turn, 0 to
    ``MAX_THINK_S``."""
    if isinstance(think_s, bool) or not isinstance(think_s, (int, float)) or not (
            0 <= think_s <= MAX_THINK_S):
        raise UserError(f"must be a number of seconds from 0 to {MAX_THINK_S:g}, got "
                        f"{think_s!r}", field=field)


def check_affinity_wait_s(wait_s: object, field: str = "affinity_wait_s") -> None:
    """``affinity_wait_s``: the seconds a later turn waits for the copy whose prefix cache
    holds its KV before any copy may take it, 0 or more (inf: as long as it takes)."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not wait_s >= 0:
        raise UserError(f"must be a number of seconds >= 0 (inf: wait for that copy however "
                        f"long), got {wait_s!r}", field=field)


TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")


def read_trace(path: str | Path) -> list[Request]:
    """Requests from a CSV file with a header naming ``arrival_s`` (seconds from the start),
    ``prompt_tokens`` and ``output_tokens``; other columns are ignored. A bad row is one line
    naming the file, its line and the column."""
    if not str(path).strip():
        raise UserError(f"needs the path of a CSV file, got {str(path)!r}", field="trace")
    path = Path(path)
    text = _trace_text(path)
    requests: list[Request] = []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        # the names stripped as the cells are: 'arrival_s, prompt_tokens' names prompt_tokens
        names = reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in TRACE_COLUMNS if c not in names]
        if missing:
            raise UserError(f"needs the columns {', '.join(TRACE_COLUMNS)}; missing "
                            f"{', '.join(missing)} (the header: {_header_shown(names)})",
                            source=f"{path}:1")
        twice = next((name for i, name in enumerate(names) if name and name in names[:i]), None)
        if twice is not None:  # else the last one's cells would be read, silently
            raise UserError(f"the header names the column {twice[:40]!r} twice",
                            source=f"{path}:1")
        previous = None
        for row in reader:
            line = reader.line_num
            if None in row:  # DictReader's key for the cells past the header's
                raise UserError(f"{len(names) + len(row[None])} fields, more than the header's "
                                f"{len(names)}", source=f"{path}:{line}")
            t, p, o = (_trace_cell(column, (row.get(column) or "").strip(), f"{path}:{line}")
                       for column in TRACE_COLUMNS)
            if not math.isfinite(t):
                raise UserError(f"arrival_s: must be a finite number of seconds, got {t:g}",
                                source=f"{path}:{line}")
            if previous is None and t < 0:
                raise UserError(f"arrival_s: must be >= 0 (seconds from the start), got {t:g}",
                                source=f"{path}:{line}")
            if previous is not None and t < previous:
                raise UserError(f"arrival_s: must not be before the row above ({previous:g}), "
                                f"got {t:g}", source=f"{path}:{line}")
            for column, n in (("prompt_tokens", p), ("output_tokens", o)):
                if n < 1:
                    raise UserError(f"{column}: must be at least 1, got {n}",
                                    source=f"{path}:{line}")
            if o > MAX_OUTPUT_TOKENS:
                raise UserError(f"output_tokens: at most {MAX_OUTPUT_TOKENS} a request, got {o}",
                                source=f"{path}:{line}")
            if p > MAX_PROMPT_TOKENS:
                raise UserError(f"prompt_tokens: at most {MAX_PROMPT_TOKENS} a request, got {p}",
                                source=f"{path}:{line}")
            if len(requests) == MAX_REQUESTS:
                raise UserError(f"has more than {MAX_REQUESTS:,} requests", source=str(path))
            requests.append(Request(len(requests), t, p, o))
            previous = t
    except csv.Error as exc:
        raise UserError(f"not a CSV file: {exc}", source=str(path)) from None
    if not requests:
        raise UserError("has no requests (a header and one row per request)", source=str(path))
    return requests


#: The most tokens each token column of a trace takes a request.
_CELL_MOST = {"prompt_tokens": MAX_PROMPT_TOKENS, "output_tokens": MAX_OUTPUT_TOKENS}
#: A trace's numbers as a CSV writer writes them: ASCII digits (Python's int() and float()
#: also read '1_000' and full-width or Arabic-Indic digits, which no trace means).
_CELL_WHOLE = re.compile(r"[+-]?[0-9]+")
_CELL_SECONDS = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                           r"|[+-]?(?:inf|infinity|nan)", re.IGNORECASE)


def _trace_cell(column: str, cell: str, source: str) -> float | int:
    """One cell of a trace's row: ``arrival_s`` a float, a token column an int; a cell that
    is neither is one line naming the column."""
    if column == "arrival_s":
        if not _CELL_SECONDS.fullmatch(cell):
            raise UserError(f"arrival_s: expected a number of seconds, got {cell[:40]!r}",
                            source=source)
        seconds = float(cell)
        if math.isinf(seconds) and "inf" not in cell.lower():  # 1e999, 400 digits
            raise UserError(f"arrival_s: {clipped(cell)} is too large a number of seconds (past "
                            "a float's range)", source=source)
        return seconds + 0.0  # -0 is 0
    if not _CELL_WHOLE.fullmatch(cell):
        raise UserError(f"{column}: expected a whole number, got {cell[:40]!r}", source=source)
    digits = digits_of(cell)
    if digits > MAX_DIGITS:  # a count past MAX_PROMPT_TOKENS is refused anyway
        if cell.startswith("-"):
            raise UserError(f"{column}: must be at least 1, got a negative {digits}-digit "
                            "number", source=source)
        raise UserError(f"{column}: a {digits}-digit number is too large (at most "
                        f"{_CELL_MOST[column]} a request)", source=source)
    return int(cell)


def _header_shown(names: list[str]) -> str:
    """A trace's header as its error shows it: the names it gave (a ';' or tab between them
    reads as one name), cut after 80 characters."""
    if not names:
        return "none, the first line is empty"
    text = ",".join(names)
    return quoted(text, 80)


def _trace_text(path: Path) -> str:
    """The trace file's text: a regular UTF-8 file of at most ``MAX_TRACE_BYTES``."""
    source = str(path)
    if "\x00" in source:
        raise UserError("a NUL byte (\\x00) in the file name", source=repr(source)[1:-1])
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UserError("not a regular file", source=source)
            data = fh.read(MAX_TRACE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read it: {exc.strerror or exc}", source=source) from None
    if len(data) > MAX_TRACE_BYTES:
        raise UserError(f"larger than {MAX_TRACE_BYTES >> 20} MiB", source=source)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"not a text file (byte 0x{data[exc.start]:02x} is not UTF-8; a trace "
                        "is a UTF-8 CSV file)", source=f"{source}:{line}") from None

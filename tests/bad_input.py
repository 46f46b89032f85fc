"""Helpers for the bad-input tests: a small valid profile and study to break, and the CLI's
contract for a user mistake (exit 2, one line ``hgsim <verb>: error: ...``, no traceback)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from conftest import BASE_PROFILE

from hgsim.cli import main
from hgsim.config_read import Loc, compose


def _small_profile() -> dict:
    """conftest's test machine cut to one GPU, its socket, one DDR tier and its PCIe link.

    Derived rather than written out, so that it stays valid when the schema gains a field
    (conftest's profile is kept valid by whoever adds one)."""
    base = copy.deepcopy(BASE_PROFILE)
    gpu_name, gpu = next(iter(base["gpus"].items()))
    socket, link = gpu["socket"], gpu["link"]
    tier = next(name for name, t in base["tiers"].items()
                if t["kind"] == "ddr" and t["socket"] == socket)
    return {"name": "mini", "gpus": {gpu_name: gpu}, "sockets": {socket: base["sockets"][socket]},
            "tiers": {tier: base["tiers"][tier]}, "links": {link: base["links"][link]}}


_DATA = _small_profile()
GPU, SOCKET, TIER = (next(iter(_DATA[group])) for group in ("gpus", "sockets", "tiers"))
#: A complete, valid profile in block style; tests break one line of it.
PROFILE = yaml.safe_dump(_DATA, sort_keys=False, default_flow_style=False)
#: (group, name, key, ...) -> line in PROFILE.
LINES = compose(PROFILE, "PROFILE")[1]


#: A two-point study on the shipped dev profile that runs in a second.
STUDY = """\
name: tiny
base:
  profile: dev-zen4-2core
  model: opt-6.7b
  policy: hybridgen
  workload: {batch: 1, context: 1k, gen: 4}
  fidelity: {decode_samples: 2, accuracy: false}
sweep:
  grid:
    policy: [flexgen, hybridgen]
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the ``nth`` line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


def set_value(text: str, loc: Loc, value: str) -> str:
    """``text`` (PROFILE) with the value at ``loc`` replaced by ``value`` as written."""
    return replace_line_at(text, LINES[loc], f"{loc[-1]}: {value}")


def insert_after(text: str, loc: Loc, line: str) -> str:
    """``text`` with ``line`` inserted after the line of ``loc``, at the same indent."""
    lines = text.splitlines(keepends=True)
    at = LINES[loc]
    current = lines[at - 1]
    indent = current[: len(current) - len(current.lstrip())]
    lines.insert(at, indent + line + "\n")
    return "".join(lines)


def replace_line_at(text: str, number: int, new: str) -> str:
    """``text`` with line ``number`` (1-based) replaced by ``new``, indent kept."""
    lines = text.splitlines(keepends=True)
    old = lines[number - 1]
    lines[number - 1] = old[: len(old) - len(old.lstrip())] + new + "\n"
    return "".join(lines)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def user_error(capsys, *argv: str) -> str:
    """Runs the CLI in-process; asserts a user error and returns its one line."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    verb = "profiles check" if argv[:2] == ("profiles", "check") else argv[0]
    assert lines[0].startswith(f"hgsim {verb}: error: "), lines[0]
    return lines[0]

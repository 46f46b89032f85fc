"""Writes a calibrated hardware profile as commented YAML, in the style of the shipped ones.

The shipped profiles cite a source for every figure in a trailing comment; a calibrated profile
does the same with "measured by hgsim calibrate on <date>: <what>", so that a reader can tell a
measured number from an assumed one and find the raw rows behind it. The YAML is produced line
by line (PyYAML cannot write comments); ``hgsim.profiles.load_profile`` checks the result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from hw_backend.calibration.summarize import Figure

_BARE = re.compile(r"[A-Za-z][\w.\-]*")  # plain scalars that stay strings in YAML
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "none", "y", "n"}


@dataclass
class Node:
    """A YAML mapping: (key, value-or-Node, comment) entries in order."""

    entries: list[tuple[str, Any, str | None]] = field(default_factory=list)

    def add(self, key: str, value: Any, comment: str | None = None) -> Node:
        self.entries.append((key, value, comment))
        return self

    def child(self, key: str, comment: str | None = None) -> Node:
        node = Node()
        self.entries.append((key, node, comment))
        return node

    def get(self, key: str) -> Any:
        """The value (or child Node) under ``key``; None when absent."""
        return next((value for k, value, _ in self.entries if k == key), None)

    def insert_before(self, before: str, key: str, value: Any, comment: str | None = None) -> None:
        """Add an entry ahead of ``before`` (e.g. keep ``source`` last); at the end without it."""
        at = next((i for i, (k, _, _) in enumerate(self.entries) if k == before),
                  len(self.entries))
        self.entries.insert(at, (key, value, comment))


class Stamp:
    """Formats the comments: ``measured by hgsim calibrate on <date>: <what>``."""

    def __init__(self, date: str) -> None:
        self.date = date

    def measured(self, what: str) -> str:
        return f"measured by hgsim calibrate on {self.date}: {what}"

    def figure(self, node: Node, key: str, fig: Figure | None, *, default: Any = None,
               fallback: str = "") -> None:
        """Add ``key`` from a figure, or ``default`` with the reason it was not measured."""
        if fig is not None:
            node.add(key, fig.value, self.measured(fig.what))
        elif default is not None:
            node.add(key, default, f"NOT measured by hgsim calibrate on {self.date}: {fallback}")


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = f"{value:.6g}"
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):  # a flow mapping: {64: 1.0, 128: 1.13}
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a JSON string is a valid YAML scalar


def _lines(node: Node, indent: int) -> list[tuple[str, str | None]]:
    out = []
    pad = "  " * indent
    for key, value, comment in node.entries:
        if isinstance(value, Node):
            out.append((f"{pad}{key}:", comment))
            out.extend(_lines(value, indent + 1))
        else:
            out.append((f"{pad}{key}: {_scalar(value)}", comment))
    return out


def render(header: list[str], root: Node) -> str:
    """YAML text: the header as comment lines, then the mapping with aligned comments."""
    lines = _lines(root, 0)
    width = min(max((len(text) for text, c in lines if c), default=0) + 2, 44)
    body = []
    for text, comment in lines:
        if comment:
            body.append(f"{text.ljust(width - 2)}  # {comment}")
        else:
            body.append(text)
        if text and not text.startswith(" ") and text.endswith(":") and body[:-1]:
            body.insert(len(body) - 1, "")
    head = [f"# {line}".rstrip() for line in header]
    return "\n".join(head + [""] + body).rstrip() + "\n"

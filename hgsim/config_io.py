"""Reading YAML configuration with line numbers, and turning validation errors into one line.

People edit profiles and studies by hand; an error that says ``studies/x.yaml:14: sweep.axes:
unknown key 'polcy'`` is fixed in seconds, a pydantic traceback is not.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hgsim.errors import ConfigError

Loc = tuple[Any, ...]
_FIELD_PATH = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)+$")


def _line_map(node: yaml.Node, path: Loc, lines: dict[Loc, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _line_map(item, path + (index,), lines)


class YamlDocument:
    """Parsed YAML plus where each key sits, so errors can point at a line."""

    def __init__(self, data: Any, lines: dict[Loc, int], source: str):
        self.data = data
        self.lines = lines
        self.source = source

    def line_of(self, loc: Loc) -> int | None:
        """Line of the deepest existing prefix of ``loc`` (a missing key points at its parent)."""
        for cut in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:cut]))
            if line is not None:
                return line
        return None

    def error(self, loc: Loc, message: str) -> ConfigError:
        line = self.line_of(loc)
        where = f"{self.source}:{line}" if line else self.source
        field = dotted(loc)
        return ConfigError(message, source=where, field=field or None)


def dotted(loc: Loc) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts)


def load_yaml(path: str | Path) -> YamlDocument:
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read file ({exc.strerror})", source=source) from None
    return parse_yaml(text, source)


def parse_yaml(text: str, source: str) -> YamlDocument:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"invalid YAML ({problem})", source=where) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _line_map(node, (), lines)
    return YamlDocument(data, lines, source)


def validate(model: type[BaseModel], doc: YamlDocument, *, context: dict | None = None) -> Any:
    """Validate ``doc`` into ``model``; the first error becomes a one-line ConfigError."""
    try:
        return model.model_validate(doc.data if doc.data is not None else {}, context=context)
    except ValidationError as exc:
        raise validation_error(exc, doc) from None


def validation_error(exc: ValidationError, doc: YamlDocument) -> ConfigError:
    first = exc.errors(include_url=False)[0]
    loc = tuple(part for part in first["loc"] if not _is_pydantic_tag(part))
    message = _humane(first)
    # Cross-field validators raise "a.b.c: message"; recover the field so the line is right.
    head, sep, rest = message.partition(": ")
    if sep and not loc and _FIELD_PATH.match(head):
        loc = tuple(int(p) if p.isdigit() else p for p in head.split("."))
        message = rest
    return doc.error(loc, message)


def _is_pydantic_tag(part: Any) -> bool:
    # pydantic adds tags such as 'function-after[...]' for validators; they are not keys
    return isinstance(part, str) and ("[" in part and part.endswith("]"))


def _humane(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown key (not part of the schema; check the spelling)"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    if msg.startswith("Assertion failed, "):
        return msg[len("Assertion failed, "):]
    return msg[0].lower() + msg[1:] if msg else kind

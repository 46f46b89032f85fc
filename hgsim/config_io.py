"""Reading YAML configuration with line numbers, and turning validation errors into one line.

People edit profiles and studies by hand; an error that says ``studies/x.yaml:14: sweep.axes:
unknown key 'polcy'`` is fixed in seconds, a pydantic traceback is not.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from hgsim.config_read import Loc, compose, dotted, read_text
from hgsim.errors import ConfigError

__all__ = ["Loc", "YamlDocument", "dotted", "humane", "load_yaml", "parse_yaml", "validate",
           "validation_error"]

_FIELD_PATH = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)+$")


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


def load_yaml(path: str | Path) -> YamlDocument:
    """Read and parse a profile or study; anything wrong with the file is a ConfigError
    (see ``config_read``: binary content, duplicate keys, alias bombs, ...)."""
    if not str(path).strip():  # Path("") is ".", which would be "a folder, not a file"
        raise ConfigError("an empty file name; give the path of a YAML file")
    path = Path(path)
    return parse_yaml(read_text(path), str(path))


def parse_yaml(text: str, source: str) -> YamlDocument:
    data, lines = compose(text, source)
    return YamlDocument(data, lines, source)


def validate(model: type[BaseModel], doc: YamlDocument, *, context: dict | None = None) -> Any:
    """Validate ``doc`` into ``model``; the first error becomes a one-line ConfigError."""
    try:
        return model.model_validate(doc.data if doc.data is not None else {}, context=context)
    except ValidationError as exc:
        raise validation_error(exc, doc) from None


def validation_error(exc: ValidationError, doc: YamlDocument) -> ConfigError:
    first, message = _first_cause(exc.errors(include_url=False))
    loc = schema_loc(first["loc"])
    # Cross-field validators raise "a.b.c: message"; recover the field so the line is right.
    head, sep, rest = message.partition(": ")
    if sep and not loc and _FIELD_PATH.match(head):
        loc = tuple(int(p) if p.isdigit() else p for p in head.split("."))
        message = rest
    return doc.error(loc, message)


def _first_cause(errors: list[dict]) -> tuple[dict, str]:
    """The error to report and its message: the first, except that a required field missing
    beside an unknown key is reported as that key, named with the field it likely misspells
    (a typo such as ``read_bandwidht_gbps`` is both errors, and "required field is missing"
    on another line hides it)."""
    first = _union_branch(errors, errors[0])
    if first["type"] != "missing":
        return first, humane(first)
    parent = first["loc"][:-1]
    missing = [str(e["loc"][-1]) for e in errors
               if e["type"] == "missing" and e["loc"][:-1] == parent]
    for error in errors:
        if error["type"] == "extra_forbidden" and error["loc"][:-1] == parent:
            close = difflib.get_close_matches(str(error["loc"][-1]), missing, n=1)
            if close:
                return error, f"unknown key (did you mean '{close[0]}'?)"
    return first, humane(first)


def _union_branch(errors: list[dict], first: dict) -> dict:
    """For a value of a union type (``float | list[float]``) pydantic reports one error per
    member, each under the member's tag; the one that got deepest into the value is the one
    the user meant (a list with one bad element, not "should be a number" for the list)."""
    tags = [i for i, part in enumerate(first["loc"]) if _is_pydantic_tag(part)]
    if not tags:
        return first
    prefix = first["loc"][: tags[0]]
    branches = [e for e in errors if e["loc"][: tags[0]] == prefix
                and len(e["loc"]) > tags[0] and _is_pydantic_tag(e["loc"][tags[0]])]
    return max(branches, key=lambda e: len(e["loc"]), default=first)


#: Union members pydantic names by their type alone (``target_rel_error.float``); no schema
#: has a key of these names.
_TYPE_TAGS = frozenset({"float", "int", "str", "bool", "bytes", "none"})


def schema_loc(loc: tuple) -> tuple:
    """A pydantic error's ``loc`` without the tags pydantic adds (a union member's type, a
    validator's name): the path of keys and indexes a person wrote."""
    return tuple(part for part in loc if not _is_pydantic_tag(part))


def _is_pydantic_tag(part: Any) -> bool:
    # pydantic adds tags such as 'function-after[...]' for validators and a union member's
    # type ('float', 'list[float]') for each member; they are not keys
    return isinstance(part, str) and (("[" in part and part.endswith("]"))
                                      or part in _TYPE_TAGS)


def humane(error: dict) -> str:
    """One pydantic error as a person would say it (no "Value error, " prefixes)."""
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

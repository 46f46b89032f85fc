"""Reading a hand-edited YAML file into data without crashing, hanging or guessing.

Profiles and studies come from people (and from whatever file a typo names), so before any
value is looked at:

* the file must be a regular file of at most ``MAX_FILE_BYTES`` (a FIFO or ``/dev/zero``
  would hang or fill memory), UTF-8 text without NUL bytes (a binary file is an error at its
  line, not a UnicodeDecodeError traceback);
* a key may appear only once per mapping: YAML itself keeps the last of two, so a second
  ``read_bandwidth_gbps`` under one tier, or a second tier of the same name, would silently
  replace the first;
* aliases may repeat at most ``MAX_ALIAS_REPEATS`` values and nothing may nest deeper than
  ``MAX_DEPTH``: a few lines of nested aliases otherwise expand to gigabytes.

Every problem is a ``ConfigError`` naming the file, the line and, where there is one, the key.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from hgsim.errors import ConfigError

Loc = tuple[Any, ...]

#: Larger than any profile or study by orders of magnitude (they are a few KiB).
MAX_FILE_BYTES = 8 * 1024 * 1024
#: Values reached again through aliases; legitimate reuse (a shared list, a merged mapping)
#: repeats hundreds, an alias bomb billions.
MAX_ALIAS_REPEATS = 100_000
#: Profiles nest 4 levels, studies 6.
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: Scalar tags whose construction can fail on text the resolver matched -> what they are.
_CHECKED_SCALARS = {"tag:yaml.org,2002:int": "integer", "tag:yaml.org,2002:timestamp": "date"}
_SHOWN = 4  # leading parts of a path named in errors about depth and aliases


def read_text(path: Path) -> str:
    """The file's text, or a ConfigError saying why it is not a readable UTF-8 text file."""
    source = str(path)
    if "\x00" in source:  # open() would raise ValueError ("embedded null byte")
        raise ConfigError("a NUL byte (\\x00) in the file name", source=repr(source)[1:-1])
    try:
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError("not a regular file (hgsim reads configuration from files)",
                                  source=source)
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except IsADirectoryError:
        raise ConfigError("is a folder, not a file", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read file ({exc.strerror})", source=source) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"file is larger than {MAX_FILE_BYTES // 2**20} MiB "
                          "(is it really a profile or study?)", source=source)
    return decode(data, source)


def decode(data: bytes, source: str) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); binary content is an error."""
    nul = data.find(b"\x00")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if 0 <= nul < exc.start:
            raise _binary(data, nul, "a NUL byte", source) from None
        raise _binary(data, exc.start, f"byte 0x{data[exc.start]:02x} is not UTF-8",
                      source) from None
    if nul >= 0:
        raise _binary(data, nul, "a NUL byte", source)
    return text


def _binary(data: bytes, at: int, what: str, source: str) -> ConfigError:
    line = data.count(b"\n", 0, at) + 1
    # a JSON file read here is a model's config.json, no profile or study
    kind = ("a config.json is UTF-8 JSON" if source.lower().endswith(".json") else
            "profiles and studies are UTF-8 YAML")
    return ConfigError(f"not a text file ({what}; {kind})", source=f"{source}:{line}")


def compose(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """Data of the single YAML document in ``text`` and the line of every key and item."""
    try:
        loader = yaml.SafeLoader(text)  # checks every character here, before parsing
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, source) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _NodeCheck(source, loader).walk(node)
        return loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, source) from None
    except RecursionError:
        raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", source=source) from None
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        problem = f"control character #x{exc.character:04x} is not allowed"
    else:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{source}:{line}" if line else source
    return ConfigError(f"invalid YAML ({problem})", source=where)


class _NodeCheck:
    """One walk over the composed nodes: duplicate keys, alias expansion, depth, key lines.

    Aliases make the node graph a DAG (or, with a recursive anchor, a cycle); the walk follows
    them as loading would, counting nodes reached more than once, so it stops on a bomb
    before anything is built.
    """

    def __init__(self, source: str, loader: yaml.SafeLoader):
        self.source = source
        self.loader = loader
        self.lines: dict[Loc, int] = {}
        self.seen: set[int] = set()
        self.open: set[int] = set()  # nodes on the current path (a cycle comes back to one)
        self.repeats = 0

    def walk(self, root: yaml.Node) -> dict[Loc, int]:
        self._visit(root, (), root.start_mark.line + 1)
        return self.lines

    def _visit(self, node: yaml.Node, path: Loc, line: int) -> None:
        self.lines[path] = line
        if len(path) > MAX_DEPTH:
            raise self._error(node, path[:_SHOWN], f"nested more than {MAX_DEPTH} levels deep")
        ident = id(node)
        if ident in self.open:
            raise self._error(node, path, "an alias refers to a node that contains it "
                                          "(recursive structure)")
        if ident in self.seen:
            self.repeats += 1
            if self.repeats > MAX_ALIAS_REPEATS:
                # Lines inside aliased content are those of its anchor; the top-level key
                # is where the expansion is written.
                raise self._error(node, path[:_SHOWN],
                                  f"aliases repeat more than {MAX_ALIAS_REPEATS:,} values "
                                  "(nested aliases that expand without bound?)",
                                  line=self.lines.get(path[:1]))
        self.seen.add(ident)
        if isinstance(node, yaml.ScalarNode) and node.tag in _CHECKED_SCALARS:
            self._scalar(node, path)
        if isinstance(node, yaml.MappingNode):
            self.open.add(ident)
            self._mapping(node, path)
            self.open.discard(ident)
        elif isinstance(node, yaml.SequenceNode):
            self.open.add(ident)
            for index, item in enumerate(node.value):
                self._visit(item, path + (index,), item.start_mark.line + 1)
            self.open.discard(ident)

    def _scalar(self, node: yaml.ScalarNode, path: Loc) -> None:
        """A plain scalar that YAML resolves to an integer or a date but Python cannot build
        (more digits than ``int()`` reads, the 13th month) is an error at its line, not the
        ValueError that building the document would raise without one."""
        try:
            self.loader.yaml_constructors[node.tag](self.loader, node)
        except ValueError as exc:
            kind = _CHECKED_SCALARS[node.tag]
            shown = node.value if len(node.value) <= 24 else f"{node.value[:20]}..."
            reason = (f"{len(node.value):,} characters, over the "
                      f"{sys.get_int_max_str_digits():,} digits Python reads"
                      if kind == "integer" and "digits" in str(exc) else str(exc))
            raise self._error(node, path, f"{shown}: not a valid {kind} ({reason})") from None

    def _mapping(self, node: yaml.MappingNode, path: Loc) -> None:
        first: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise self._error(key_node, path, "a key must be a name or number, not a list "
                                                  "or mapping")
            if key_node.tag == _MERGE_TAG:  # '<<: *defaults': merged keys may be overridden
                self._visit(value_node, path + ("<<",), line)
                continue
            key = key_node.value
            identity = (key_node.tag, key)
            if identity in first:
                raise self._error(key_node, path + (key,),
                                  f"duplicate key (also at line {first[identity]}; YAML would "
                                  "silently keep only the last)")
            first[identity] = line
            self._visit(value_node, path + (key,), line)

    def _error(self, node: yaml.Node, path: Loc, message: str,
               line: int | None = None) -> ConfigError:
        line = line or node.start_mark.line + 1
        return ConfigError(message, source=f"{self.source}:{line}", field=dotted(path) or None)


def dotted(loc: Loc) -> str:
    """``("tiers", "ddr0", "latency_ns")`` -> ``tiers.ddr0.latency_ns``; items as ``[i]``."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts)

"""Per-point results on disk that survive Ctrl-C and kill -9.

One small JSON file per point, ``<out>/points/<key>.json``, written through
``outputs.written_whole`` (a temporary name in the same folder moved into place with
``os.replace``, atomic on POSIX): a reader sees
either no file or a complete one, never half a point, and a point is stored at most once
because its name is its key. Files are not fsync'ed (a killed process loses nothing the
kernel already has; a power cut may leave an empty file, which ``load`` rejects like any
invalid file, so that point is simply computed again).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hgsim.outputs import finite_for_json, orphaned_temporaries, written_whole

SUFFIX = ".json"


class PointStore:
    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}{SUFFIX}"

    def write(self, record: dict[str, Any]) -> Path:
        """Store one record atomically (an existing record of the same key is replaced)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path(record["key"])
        text = json.dumps(finite_for_json(record), separators=(",", ":"), allow_nan=False)
        with written_whole(final) as fh:
            fh.write(text)
        return final

    def read(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, or None when missing or invalid (then it is recomputed)."""
        try:
            record = json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        if not isinstance(record.get("row"), dict):
            return None
        return record

    def keys(self) -> set[str]:
        """Keys with a file present (not validated; see ``load``)."""
        if not self.dir.is_dir():
            return set()
        return {p.name[: -len(SUFFIX)] for p in self.dir.iterdir()
                if p.name.endswith(SUFFIX) and not p.name.startswith(".")}

    def load(self, keys: list[str] | set[str]) -> dict[str, dict[str, Any]]:
        """Valid records of ``keys`` that are stored."""
        present = self.keys()
        out = {}
        for key in keys:
            if key in present:
                record = self.read(key)
                if record is not None:
                    out[key] = record
        return out

    def clean_temporary(self) -> int:
        """Remove leftovers of writers that were killed between write and rename (not those
        of live writers: another run storing into this folder now would lose its point)."""
        orphans = orphaned_temporaries(self.dir)
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

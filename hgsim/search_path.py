"""Names that stand for files on a search path, shared by hardware profiles and user models.

A user keeps their own YAML files in directories listed in an environment variable
(``HGSIM_PROFILE_PATH``, ``HGSIM_MODEL_PATH``); a file's stem is then a name every verb
accepts, and the first directory holding a name wins, so a user's copy shadows a shipped one.
Loaded files are cached by path, mtime and size, so editing a file reloads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from hgsim.errors import ConfigError

YAML_SUFFIXES = (".yaml", ".yml")

T = TypeVar("T")


#: Longest file name and path the file systems hgsim runs on take (Linux's NAME_MAX and
#: PATH_MAX, in bytes; macOS's are 255 and 1024, within them).
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096


def user_path(text: str) -> Path:
    """``text`` as a path with ``~`` expanded; ``~name`` of no known user stays as written
    (pathlib raises RuntimeError there), so the lookup fails as a missing file would.

    A name longer than any file system takes is a ConfigError here: asking whether it exists
    raises OSError (ENAMETOOLONG), which pathlib passes on, and no profile or model name (a
    file's stem) can be that long either."""
    if not text.strip():  # Path("") is ".", the current folder: not what anyone meant
        raise ConfigError("an empty name; give a name or the path of a file")
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        path = Path(text)
    problem = unusable_name(path)
    if problem:
        raise ConfigError(problem, source=shown(text))
    return path


def unusable_name(path: str | os.PathLike[str]) -> str | None:
    """Why no file system hgsim runs on takes ``path`` (a NUL byte, a part or the whole too
    long), or None. Checked before pathlib or open() is asked anything about it: exists(),
    is_file() and is_dir() raise OSError (ENAMETOOLONG) for such a name rather than answer
    False, and open() raises ValueError for a NUL."""
    if "\x00" in os.fspath(path):
        return "a NUL byte (\\x00) in a file name"
    parts = Path(path).parts
    longest = max((len(os.fsencode(part)) for part in parts), default=0)
    total = len(os.fsencode(path))
    if longest > NAME_MAX_BYTES:
        return f"file name too long (a part of {longest:,} bytes; at most {NAME_MAX_BYTES})"
    if total > PATH_MAX_BYTES:
        return f"file name too long ({total:,} bytes; at most {PATH_MAX_BYTES:,})"
    return None


def shown(text: str) -> str:
    """A name as a line of error can show it: unprintable characters escaped, a long one cut."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= 60 else f"{text[:40]}...({len(text):,} characters)"


def search_dirs(env_var: str, *defaults: Path) -> list[Path]:
    """The directories of ``env_var`` (os.pathsep-separated, empty parts ignored), then
    ``defaults``."""
    extra = os.environ.get(env_var, "")
    dirs = [user_path(part) for part in extra.split(os.pathsep) if part.strip()]
    dirs.extend(defaults)
    return dirs


def named_files(dirs: Iterable[Path], suffixes: tuple[str, ...] = YAML_SUFFIXES
                ) -> dict[str, Path]:
    """Stem -> file for every file with one of ``suffixes``; the first directory wins."""
    found: dict[str, Path] = {}
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in suffixes and path.is_file():
                found.setdefault(path.stem, path)
    return found


def existing_file(text: str) -> Path:
    """``text`` as a path to a regular file, or a ConfigError naming it."""
    path = user_path(text)
    if not path.is_file():
        raise ConfigError("not a regular file" if path.exists() else "file not found",
                          source=text)
    return path


def load_cached(path: Path, cache: dict[tuple[str, int, int], T],
                load: Callable[[Path], T]) -> T:
    """``load(path)``, reused while the file keeps its resolved path, mtime and size (the
    loaded objects are frozen specs, so sharing them is safe)."""
    path = path.resolve()
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = load(path)
    return hit

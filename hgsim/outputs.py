"""Checking where results will go before any work is done, and writing them whole.

A simulation, study, calibration or validation runs for seconds to hours; learning at the end
that its output path is a folder, lies under a file, or is in a place that cannot be written
loses all of it. Commands call these checks first. They leave nothing behind: whether a folder
can be written is found out by creating and at once removing a probe file, since permissions
alone do not tell (root ignores them; /proc and read-only mounts refuse regardless).

Results are then written through ``written_whole``: a trace, table or profile cut short by
Ctrl-C or a full disk would otherwise be left half-written under its final name, where a
viewer, a later run or a person takes it for the real thing. For the same reason a run that
completes leaves under its output names its own files or none (``remove_earlier``): an
infeasible simulation writes no trace and removes an earlier one. A run stopped by a mistake
in its input, before any work, touches nothing.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from hgsim.errors import UserError
from hgsim.search_path import shown, unusable_name

_PROBE_PREFIX = ".hgsim-write-check-"

#: The largest trace ``simulate`` writes unless told otherwise, in bytes: every simulated step
#: adds 40-360 kB (docs/model.md, "Recording and traces"), so ``--samples 0`` over thousands of
#: steps reaches gigabytes, and the whole trace is built in memory before it is written.
TRACE_MAX_BYTES = 1e9


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` can be created or replaced as a file; UserError naming ``flag`` if not."""
    if not isinstance(path, (str, os.PathLike)):  # the API's callers may pass anything
        raise UserError(f"expected a file path, got {path!r}", field=flag)
    if not str(path).strip():
        raise UserError("is empty; give the name of a file to write", field=flag)
    check_usable_name(path, flag)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the name of a file to write", field=flag)
    if _special(path):  # written in place (written_whole): only the path itself must take it
        if not os.access(path, os.W_OK):  # opening a pipe would wait for its reader
            raise UserError(f"cannot write {path} (permission denied)", field=flag)
        return path
    parent = path.parent
    if not parent.exists():
        raise UserError(f"folder {parent} does not exist", field=flag)
    if not parent.is_dir():
        raise UserError(f"{parent} is not a folder", field=flag)
    _probe(parent, flag)
    if path.exists():
        try:  # append mode opens for writing without changing a byte
            with open(path, "ab"):
                pass
        except OSError as exc:
            raise UserError(f"cannot write {path} ({exc.strerror})", field=flag) from None
    return path


def _special(path: Path) -> bool:
    """``path`` exists and is neither a regular file nor a folder: a device or a pipe."""
    return path.exists() and not path.is_file() and not path.is_dir()


def check_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` is a writable folder, or one that can be created; UserError if not.

    Nothing is created: a missing folder is checked through its nearest existing ancestor.
    """
    check_usable_name(path, flag)
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} exists and is not a folder", field=flag)
        _probe(path, flag)
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{ancestor} is not a folder, so {path} cannot be created", field=flag)
    _probe(ancestor, flag)
    return path


def check_usable_name(path: str | os.PathLike[str], flag: str) -> None:
    """A UserError naming ``flag`` if no file system takes this name (asking pathlib about it
    would raise OSError, or open() ValueError)."""
    problem = unusable_name(path)
    if problem:
        raise UserError(f"{shown(os.fspath(path))}: {problem}", field=flag)


def _probe(folder: Path, flag: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:
        raise UserError(f"cannot write in {folder} ({exc.strerror})", field=flag) from None
    os.close(fd)
    os.unlink(name)


def writer_is_gone(pid: int) -> bool:
    """No process ``pid`` runs on this machine, so a temporary file it was writing is an
    orphan (killed mid-write) that nobody will ever rename or remove."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def orphaned_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``written_whole`` temporaries in ``folder`` (``.<name>.<pid>.tmp``) whose writer is
    gone: a ``kill -9`` mid-write leaves them, each part of a file, for the next run to
    remove. Those of live processes (another run writing now) are not listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    orphans = []
    for path in folder.iterdir():
        parts = path.name.rsplit(".", 2)
        if (path.name.startswith(".") and len(parts) == 3 and parts[2] == "tmp"
                and parts[1].isdigit() and path.is_file() and writer_is_gone(int(parts[1]))):
            orphans.append(path)
    return orphans


@contextmanager
def written_whole(path: str | os.PathLike[str], mode: str = "w", **open_args: Any) -> Iterator[IO]:
    """``path`` opened for writing under a temporary name beside it (same folder, so the
    rename is atomic on POSIX), which replaces ``path`` only when the block completes: an
    interruption or error midway leaves the earlier file, or none, never part of one.

    A ``path`` that exists and is not a regular file (``/dev/null``, a named pipe) is written
    in place: it holds no earlier result to protect, and the rename would put a regular file
    where the device or pipe was (as root, ``--trace /dev/null`` replaced /dev/null).

    A ``path`` that is a symbolic link is written through it, as ``open`` would: the file it
    points to is replaced, the link stays.

    A write the file system refuses (a full disk, ``/dev/full``, a quota) is a UserError
    naming ``path``, not a traceback at the end of the run."""
    named = path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if _special(path):
        with _refused_as_user_error(named), open(path, mode, **open_args) as fh:
            yield fh
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _refused_as_user_error(named):
            with open(tmp, mode, **open_args) as fh:
                yield fh
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the block did not complete


@contextmanager
def _refused_as_user_error(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` as one line naming it."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write it ({exc.strerror or exc})", source=shown(str(path))
                        ) from None


def remove_earlier(names: Iterable[Path], written: Iterable[Path]) -> list[Path]:
    """Removes each of a run's output ``names`` that this run did not write; returns those
    removed. A file an earlier run left under one of them (a plot when every case now failed,
    the plans' table beside a micro-only run) would pass for this run's."""
    kept = {Path(p) for p in written}
    removed = []
    for path in map(Path, names):
        if path not in kept and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def finite_for_json(obj: Any) -> Any:
    """``obj`` with NaN/inf as None: they are not JSON (Python writes them anyway, and strict
    readers such as JSON.parse and Perfetto then refuse the whole file)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_for_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_for_json(v) for v in obj]
    return obj

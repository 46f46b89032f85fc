"""Output paths are checked before any work, and a bad one loses nothing.

``simulate --trace`` into a folder raised after the whole simulation (its result lost);
``study --out`` on an existing file or an unwritable place raised a traceback. Every command
that writes (simulate, study, calibrate, validate) now checks its outputs first: one line,
exit 2, the work never started, nothing created or changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bad_input import STUDY, user_error, write

import hgsim.simulate
import hgsim.study.run
from hgsim.outputs import check_output_dir, check_output_file
from hgsim.study.folder import STUDY_OUTPUTS

SIMULATE = ("simulate", "--profile", "dev-zen4-2core", "--model", "opt-6.7b", "--context", "1k",
            "--gen", "4", "--samples", "2")
#: /proc refuses new files even to root, for whom permission bits mean nothing.
UNWRITABLE = Path("/proc")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture
def no_work(monkeypatch):
    """Makes every entry into real work fail the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(hgsim.simulate, "simulate", refuse)
    monkeypatch.setattr(hgsim.study.run, "execute", refuse)
    try:
        import hw_backend.calibrate
        import hw_backend.validate
    except ImportError:
        return
    monkeypatch.setattr(hw_backend.calibrate, "discover", refuse)
    monkeypatch.setattr(hw_backend.validate, "cases", refuse)


def bad_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, the end of the expected message)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = write(tmp_path / "afile", "keep me")
    return {
        "folder": (folder, f"{folder} is a folder; give the name of a file to write"),
        "missing": (tmp_path / "nope" / "x", f"folder {tmp_path / 'nope'} does not exist"),
        "under a file": (afile / "x", f"{afile} is not a folder"),
        "unwritable": (UNWRITABLE / "x", "cannot write in /proc (No such file or directory)"),
    }


# ------------------------------------------------------------------ simulate --trace
@pytest.mark.parametrize("case", ["folder", "missing", "under a file", "unwritable"])
def test_simulate_trace_is_checked_before_simulating(tmp_path, capsys, no_work, case):
    path, message = bad_paths(tmp_path)[case]
    before = files_under(tmp_path)
    line = user_error(capsys, *SIMULATE, "--trace", str(path))
    assert line == f"hgsim simulate: error: --trace: {message}"
    assert files_under(tmp_path) == before
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes regardless of permissions")
def test_simulate_trace_in_a_read_only_folder(tmp_path, capsys, no_work):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    line = user_error(capsys, *SIMULATE, "--trace", str(folder / "t.json"))
    assert line == f"hgsim simulate: error: --trace: cannot write in {folder} (Permission denied)"


def test_simulate_trace_still_written_when_fine(tmp_path, capsys):
    trace = tmp_path / "t.json"
    from hgsim.cli import main

    assert main([*SIMULATE, "--trace", str(trace)]) == 0
    assert trace.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hgsim-write-check")]


# ------------------------------------------------------------------ study --out
@pytest.mark.parametrize(("case", "message"), [
    ("afile", "{afile} exists and is not a folder"),
    ("afile/sub", "{afile} is not a folder, so {afile}/sub cannot be created"),
    ("unwritable", "cannot write in /proc (No such file or directory)"),
])
def test_study_out_is_checked_before_anything_runs(tmp_path, capsys, no_work, case, message):
    study = write(tmp_path / "s.yaml", STUDY)
    afile = write(tmp_path / "afile", "keep me")
    out = {"afile": afile, "afile/sub": afile / "sub", "unwritable": UNWRITABLE / "hgsim-test" / "out"}[case]
    before = files_under(tmp_path)
    for extra in ([], ["--dry-run"]):
        line = user_error(capsys, "study", str(study), "--out", str(out), *extra)
        assert line == f"hgsim study: error: --out: {message.format(afile=afile)}"
    assert files_under(tmp_path) == before and afile.read_text() == "keep me"


@pytest.mark.parametrize("name", STUDY_OUTPUTS)
def test_study_output_name_taken_by_the_wrong_kind(tmp_path, capsys, no_work, name):
    study = write(tmp_path / "s.yaml", STUDY)
    out = tmp_path / "out"
    out.mkdir()
    entry = out / name.rstrip("/")
    if name.endswith("/"):
        write(entry, "not a folder")
    else:
        entry.mkdir()
    line = user_error(capsys, "study", str(study), "--out", str(out))
    kind = "a folder" if name.endswith("/") else "a file"
    assert line == f"hgsim study: error: --out: {entry} is in the way: the study writes {kind} there"


def test_study_results_survive_a_rerun_with_a_bad_out(tmp_path, capsys):
    """A finished study, then the same study pointed at a file: the first results stay."""
    from hgsim.cli import main

    study = write(tmp_path / "s.yaml", STUDY)
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "-j", "1", "-q", "--no-figures"]) == 0
    stored = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    user_error(capsys, "study", str(study), "--out", str(out / "results.csv"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == stored


# ------------------------------------------------------------------ calibrate / validate --out
@pytest.mark.parametrize("case", ["folder", "missing", "under a file", "unwritable"])
def test_calibrate_out_is_checked_before_measuring(tmp_path, capsys, no_work, case):
    pytest.importorskip("torch")
    path, message = bad_paths(tmp_path)[case]
    if case == "folder":
        path = path.rename(tmp_path / "p.yaml")
        message = f"{path} is a folder; give the name of a file to write"
    else:
        path = path.with_suffix(".yaml")
        message = message.replace("/x ", "/x.yaml ")
    before = files_under(tmp_path)
    line = user_error(capsys, "calibrate", "--out", str(path), "--quick", "--no-progress")
    assert line == f"hgsim calibrate: error: --out: {message}"
    assert files_under(tmp_path) == before


def test_calibrate_sidecar_in_the_way(tmp_path, capsys, no_work):
    pytest.importorskip("torch")
    (tmp_path / "p.calibration.csv").mkdir()
    line = user_error(capsys, "calibrate", "--out", str(tmp_path / "p.yaml"), "--quick")
    assert line.endswith(f"--out: {tmp_path / 'p.calibration.csv'} is a folder; give the name "
                         "of a file to write")


@pytest.mark.parametrize("case", ["missing", "under a file", "unwritable"])
def test_validate_out_is_checked_before_measuring(tmp_path, capsys, no_work, case):
    pytest.importorskip("torch")
    path, message = bad_paths(tmp_path)[case]
    before = files_under(tmp_path)
    line = user_error(capsys, "validate", "--profile", "dev-zen4-2core", "--out", str(path),
                      "--no-progress")
    assert line == f"hgsim validate: error: --out: {message.replace('/x ', '/x.csv ')}"
    assert files_under(tmp_path) == before


def test_validate_out_folder_gets_the_default_names_inside(tmp_path):
    pytest.importorskip("torch")
    from hw_backend.validate import output_prefix

    profile = Path("hardware_profiles/dev-zen4-2core.yaml")
    assert output_prefix(tmp_path, profile) == tmp_path / "dev-zen4-2core.validation"
    assert output_prefix(tmp_path / "run1", profile) == tmp_path / "run1"
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the checks themselves
def test_checks_leave_nothing_behind(tmp_path):
    check_output_file(tmp_path / "a.json", "--x")
    check_output_dir(tmp_path / "new" / "deeper", "--x")
    check_output_dir(tmp_path, "--x")
    assert list(tmp_path.iterdir()) == []


def test_resume_over_binary_garbage_in_the_study_folder(tmp_path):
    """A point file or run log overwritten with bytes that are not text (a disk error, a stray
    copy) is recomputed or restarted on the next run, never a traceback."""
    from hgsim.cli import main

    study = write(tmp_path / "s.yaml", STUDY)
    out = tmp_path / "out"
    argv = ["study", str(study), "--out", str(out), "-j", "1", "-q", "--no-figures"]
    assert main(argv) == 0
    victim = sorted((out / "points").glob("*.json"))[0]
    victim.write_bytes(b"\xff\xfe\x00" + os.urandom(64))
    (out / "run.json").write_bytes(b"\x89PNG\x00")
    assert main(argv) == 0
    import json

    assert json.loads(victim.read_text())["key"] == victim.stem
    assert [entry["computed"] for entry in json.loads((out / "run.json").read_text())] == [1]


# ------------------------------------------------------------------ written whole or not at all
def test_an_interrupted_write_leaves_the_earlier_file_and_no_part_of_the_new(tmp_path):
    from hgsim.outputs import written_whole

    path = write(tmp_path / "table.csv", "old, complete\n")
    with pytest.raises(KeyboardInterrupt), written_whole(path) as fh:
        fh.write("new, but cut")
        raise KeyboardInterrupt
    assert path.read_text() == "old, complete\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    with written_whole(path) as fh:
        fh.write("new, whole\n")
    assert path.read_text() == "new, whole\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_an_output_that_is_a_symbolic_link_is_written_through_it(tmp_path):
    """The file the link points to is replaced (whole, as any output), the link stays: a
    results folder linked elsewhere keeps its link."""
    from hgsim.outputs import written_whole

    (tmp_path / "data").mkdir()
    target = write(tmp_path / "data" / "table.csv", "old\n")
    link = tmp_path / "table.csv"
    link.symlink_to(target)
    with written_whole(link) as fh:
        fh.write("new\n")
    assert link.is_symlink() and target.read_text() == "new\n"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["table.csv"]
    dangling = tmp_path / "later.csv"
    dangling.symlink_to(tmp_path / "data" / "later.csv")
    with written_whole(dangling) as fh:
        fh.write("first\n")
    assert dangling.is_symlink() and dangling.read_text() == "first\n"


def test_simulate_interrupted_while_writing_its_trace_leaves_no_torn_trace(
        tmp_path, capsys, monkeypatch):
    """Ctrl-C while a 5 MB trace was being written left a truncated JSON file that Perfetto
    cannot open (found by interrupting a real run at 40 ms steps: 9 of 20 torn)."""
    import contextlib

    import hgsim.sim.trace
    from hgsim.cli import main

    whole = hgsim.sim.trace.written_whole

    @contextlib.contextmanager
    def cut_after_first_slice(path, **kwargs):
        with whole(path, **kwargs) as fh:
            class Cut:
                slices = 0

                def write(self, text):
                    Cut.slices += 1
                    if Cut.slices == 2:
                        raise KeyboardInterrupt
                    return fh.write(text)

            yield Cut()

    monkeypatch.setattr(hgsim.sim.trace, "_WRITE_SLICE", 64)
    monkeypatch.setattr(hgsim.sim.trace, "written_whole", cut_after_first_slice)
    trace = tmp_path / "t.json"
    assert main([*SIMULATE, "--trace", str(trace)]) == 130
    assert list(tmp_path.iterdir()) == []


def _fifo_reader(path: Path, got: list[bytes]):
    """A thread that opens the pipe ``path`` for reading and keeps what comes through."""
    import threading

    def read():
        with open(path, "rb") as fh:
            got.append(fh.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_an_output_that_is_a_pipe_or_device_is_written_in_place_not_replaced(tmp_path):
    """written_whole renamed its temporary file over the path: over /dev/null as root
    (`simulate --trace /dev/null`, drawn by the CLI fuzz) that put a regular file where the
    device was, for every program on the machine. A pipe stands in for the device here."""
    import stat

    from hgsim.outputs import written_whole

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert check_output_file(pipe, "--trace") == pipe  # no probe, no open: a reader may be late
    got: list[bytes] = []
    reader = _fifo_reader(pipe, got)
    with written_whole(pipe) as fh:
        fh.write("trace")
    reader.join(5)
    assert got == [b"trace"] and stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary left


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_an_infeasible_simulation_leaves_a_trace_path_that_is_a_pipe(tmp_path, capsys):
    """It removes an earlier trace file there, which would pass for its own; a pipe or a
    device is no earlier trace, and removing /dev/null as root broke the machine."""
    import stat

    from hgsim.cli import main

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert main(["simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-2-13b",
                 "--policy", "gpu_only", "--context", "512k", "--batch", "8", "--gen", "2",
                 "--trace", str(pipe)]) == 1
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_standard_output_with_no_room_is_one_line_exit_2():
    """``hgsim profiles > /dev/full``: the table cannot be written (a full disk behind the
    shell's redirect); one line on stderr, exit 2, not rich's traceback."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "hgsim", "profiles"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == ("hgsim profiles: error: cannot write its output (No space left on "
                           "device)\n")

"""Profiles and studies that are not what they should be: binary files, duplicate keys, alias
bombs, recursion, huge or special files. Each is one line naming the file and line (and key),
exit code 2, and nothing written, from every command that reads them."""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time

import pytest
from bad_input import (
    LINES,
    PROFILE,
    SOCKET,
    STUDY,
    TIER,
    insert_after,
    line_of,
    user_error,
    write,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from hgsim.config_io import load_yaml
from hgsim.config_read import MAX_ALIAS_REPEATS, MAX_FILE_BYTES
from hgsim.errors import ConfigError
from hgsim.profiles import load_profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def profile_commands(path) -> list[tuple[str, ...]]:
    """Every command that reads a profile, pointed at ``path``."""
    return [("profiles", "check", str(path)), ("profiles", "show", str(path)),
            ("simulate", "--profile", str(path), "--model", "opt-6.7b", "--context", "1k")]


# ------------------------------------------------------------------ files that are not text
@pytest.mark.parametrize("content", [
    # Random bytes from a fixed seed: every pytest-xdist worker must collect the same test ids.
    b"\xff" + random.Random(17).randbytes(256),  # 0xff never occurs in UTF-8
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
], ids=["random-bytes", "png-header"])
def test_binary_profile_is_one_line_at_line_1(tmp_path, capsys, content):
    path = write(tmp_path / "p.yaml", content)
    for argv in profile_commands(path):
        line = user_error(capsys, *argv)
        assert line.endswith(f"{path}:1: not a text file (byte 0x{content[0]:02x} is not UTF-8; "
                             "profiles and studies are UTF-8 YAML)"), line


@pytest.mark.parametrize(("bad", "what"), [(b"\x00", "a NUL byte"),
                                           (b"\xff", "byte 0xff is not UTF-8")])
def test_stray_byte_in_a_profile_names_its_line(tmp_path, capsys, bad, what):
    number = LINES[("sockets", SOCKET, "model")]
    lines = PROFILE.encode().splitlines(keepends=True)
    lines[number - 1] = lines[number - 1].rstrip(b"\n") + bad + b"\n"
    path = write(tmp_path / "p.yaml", b"".join(lines))
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{number}: not a text file ({what}; "
                         "profiles and studies are UTF-8 YAML)"), line


def test_stray_byte_in_a_study_names_its_line(tmp_path, capsys):
    text = STUDY.encode()
    at = text.index(b"hybridgen]")
    path = write(tmp_path / "s.yaml", text[:at] + b"\xfe" + text[at:])
    out = tmp_path / "out"
    for verb in ("study", "validate"):
        argv = ("study", str(path), "--out", str(out)) if verb == "study" else \
            ("validate", "--profile", "dev-zen4-2core", "--study", str(path))
        line = user_error(capsys, *argv)
        assert f"{path}:{line_of(STUDY, 'hybridgen]')}: not a text file (byte 0xfe" in line
    assert not out.exists()


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write(tmp_path / "p.yaml", b"\xef\xbb\xbf" + PROFILE.encode())
    assert load_profile(path).name == "mini"


def test_special_files_and_folders_are_refused_without_reading(tmp_path, capsys):
    line = user_error(capsys, "study", "/dev/zero")
    assert line.endswith("/dev/zero: not a regular file (hgsim reads configuration from files)")
    assert user_error(capsys, "study", str(tmp_path)).endswith(f"{tmp_path}: is a folder, "
                                                               "not a file")
    assert user_error(capsys, "profiles", "check", "/dev/null").endswith(
        "/dev/null: not a regular file")
    assert user_error(capsys, "profiles", "show", "/dev/zero").endswith(
        "/dev/zero: not a regular file")


def test_file_larger_than_any_config_is_refused(tmp_path, capsys):
    path = write(tmp_path / "big.yaml", b"# " + b"x" * MAX_FILE_BYTES + b"\n")
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}: file is larger than 8 MiB (is it really a profile or study?)")


# ------------------------------------------------------------------ duplicate keys
def test_duplicate_key_under_a_tier(tmp_path, capsys):
    key = ("tiers", TIER, "read_bandwidth_gbps")
    text = insert_after(PROFILE, key, "read_bandwidth_gbps: 120")
    path = write(tmp_path / "p.yaml", text)
    first = LINES[key]
    for argv in profile_commands(path):
        line = user_error(capsys, *argv)
        assert line.endswith(f"{path}:{first + 1}: tiers.{TIER}.read_bandwidth_gbps: duplicate "
                             f"key (also at line {first}; YAML would silently keep only the last)")


def test_duplicated_tier_name_is_caught_where_it_is_written(tmp_path, capsys):
    lines = PROFILE.splitlines(keepends=True)
    first, links = LINES[("tiers", TIER)], LINES[("links",)]
    tier = lines[first - 1:links - 1]  # the tier's block, repeated right after it
    text = "".join(lines[:links - 1] + tier + lines[links - 1:])
    path = write(tmp_path / "p.yaml", text)
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{links}: tiers.{TIER}: duplicate key (also at line {first}; "
                         "YAML would silently keep only the last)")


def test_second_model_in_a_study_base(tmp_path, capsys):
    text = STUDY.replace("  model: opt-6.7b\n", "  model: opt-6.7b\n  model: llama-2-7b\n")
    path = write(tmp_path / "s.yaml", text)
    out = tmp_path / "out"
    line = user_error(capsys, "study", str(path), "--out", str(out))
    assert f"{path}:{line_of(text, 'llama-2-7b')}: base.model: duplicate key (also at line " \
           f"{line_of(text, 'opt-6.7b')};" in line
    assert not out.exists()


def test_repeated_axis_inside_one_grid(tmp_path, capsys):
    text = STUDY.replace("    policy: [flexgen, hybridgen]\n",
                         "    policy: [flexgen]\n    policy: [hybridgen]\n")
    path = write(tmp_path / "s.yaml", text)
    line = user_error(capsys, "study", str(path), "--dry-run")
    assert f"{path}:{line_of(text, '[hybridgen]')}: sweep.grid.policy: duplicate key" in line


def test_merge_keys_may_override_what_they_merge(tmp_path):
    """``<<: *defaults`` then the same key is YAML's way to override, not a duplicate."""
    text = ("defaults: &d {kind: ddr, capacity_gb: 1}\n"
            "tier:\n  <<: *d\n  capacity_gb: 2\n")
    doc = load_yaml(write(tmp_path / "m.yaml", text))
    assert doc.data["tier"] == {"kind": "ddr", "capacity_gb": 2}
    assert doc.lines[("tier", "capacity_gb")] == 4


def test_keys_that_are_lists_are_an_error_not_a_crash(tmp_path):
    with pytest.raises(ConfigError, match=r"m.yaml:2: a: a key must be a name or number"):
        load_yaml(write(tmp_path / "m.yaml", "a:\n  ? [x, y]\n  : 1\n"))


# ------------------------------------------------------------------ aliases and nesting
def test_alias_bomb_fails_fast_in_little_memory(tmp_path):
    """Nine lines that expand to 387 million values: refused in well under a second, in a
    process that may not use more than 1 GiB."""
    path = write(tmp_path / "bomb.yaml", BOMB)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hgsim", "profiles", "check", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_memory)
    assert time.perf_counter() - start < 60
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"hgsim profiles check: error: {path}:6: f[0][3][3]: aliases repeat more than "
        f"{MAX_ALIAS_REPEATS:,} values (nested aliases that expand without bound?)"]


def test_modest_alias_reuse_is_fine(tmp_path):
    doc = load_yaml(write(tmp_path / "a.yaml", "xs: &xs [1, 2, 3]\nys: *xs\nzs: [*xs, *xs]\n"))
    assert doc.data["zs"] == [[1, 2, 3], [1, 2, 3]]


def test_recursive_alias_is_an_error(tmp_path, capsys):
    path = write(tmp_path / "r.yaml", "name: x\nloop: &a [1, *a]\n")
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:2: loop[1]: an alias refers to a node that contains it "
                         "(recursive structure)")


@pytest.mark.parametrize("depth", [100, 20_000])
def test_deep_nesting_is_an_error(tmp_path, capsys, depth):
    path = write(tmp_path / "d.yaml", "a: " + "[" * depth + "]" * depth + "\n")
    line = user_error(capsys, "profiles", "check", str(path))
    assert "nested more than 64 levels deep" in line and str(path) in line


def test_profile_list_warns_about_each_broken_file_and_lists_the_rest(tmp_path, capsys,
                                                                     monkeypatch):
    from hgsim.cli import main

    write(tmp_path / "binary.yaml", b"name: x\x00\n")
    dup = PROFILE.replace("name: mini\n", "name: mini\nname: again\n")
    write(tmp_path / "dup.yaml", dup)
    write(tmp_path / "good.yaml", PROFILE)
    monkeypatch.setenv("HGSIM_PROFILE_PATH", str(tmp_path))
    assert main(["profiles"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"hgsim profiles: warning: {tmp_path / 'binary.yaml'}:1: not a text file (a NUL byte; "
        "profiles and studies are UTF-8 YAML)",
        f"hgsim profiles: warning: {tmp_path / 'dup.yaml'}:2: name: duplicate key (also at "
        "line 1; YAML would silently keep only the last)",
    ]
    assert "good" in captured.out and "dev-zen4-2core" in captured.out


def test_control_character_is_an_error_at_its_line(tmp_path, capsys):
    number = LINES[("sockets", SOCKET, "model")]
    lines = PROFILE.splitlines(keepends=True)
    lines[number - 1] = lines[number - 1].rstrip("\n") + "\x07\n"
    path = write(tmp_path / "p.yaml", "".join(lines))
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{number}: invalid YAML (control character #x0007 is not "
                         "allowed)")


@settings(max_examples=150, deadline=None, database=None)
@given(st.data())
def test_any_bytes_load_or_give_a_config_error(tmp_path_factory, data):
    """Profiles damaged anywhere (bytes inserted, deleted or replaced), or YAML-ish noise:
    loading either works or raises ConfigError naming the file, never anything else."""
    text = PROFILE.encode()
    at = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 8))
    noise = data.draw(st.binary(max_size=12) | st.sampled_from(
        [b"*a", b"&a ", b"<<: ", b"? ", b"!!python/object:os.system ", b"[", b"{", b": :",
         b"\t", b"'", b'"\\', b"---\n", b"%YAML 9\n", b"\xef\xbb\xbf", b"\xc3"]))
    damaged = text[:at] + noise + text[at + cut:]
    path = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    path.write_bytes(damaged)
    try:
        load_profile(path)
    except ConfigError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)


@settings(max_examples=100, deadline=None, database=None)
@given(st.data())
def test_damaged_study_loads_or_gives_a_user_error(tmp_path_factory, data):
    from hgsim.errors import UserError
    from hgsim.study.load import load_study

    text = STUDY.encode()
    at = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(0, 12))
    noise = data.draw(st.binary(max_size=8) | st.sampled_from(
        [b"*x", b"&x ", b"1e999", b".nan", b"true", b"-1", b"[]", b"{}", b"~", b"\n  grid:",
         b"\n    policy: [h2o]", b"\nsweep: []"]))
    path = tmp_path_factory.mktemp("fuzz") / "s.yaml"
    path.write_bytes(text[:at] + noise + text[at + cut:])
    try:
        load_study(path)
    except UserError as exc:
        assert "\n" not in str(exc)

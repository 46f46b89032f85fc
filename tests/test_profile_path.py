"""``HGSIM_PROFILE_PATH``: a user's own profile directories, searched before the shipped one,
seen by every entry point (``profiles``, ``simulate``, studies) exactly as a shipped name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hgsim.errors import UserError
from hgsim.profiles import PROFILE_DIR, load_profile, profile_dirs, resolve_profile

REPO = Path(__file__).resolve().parents[1]
SHIPPED = PROFILE_DIR / "h100-80gb-spr-cxl.yaml"


def _write(directory: Path, name: str, *, cxl_latency: int = 150) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = SHIPPED.read_text().replace("name: h100-80gb-spr-cxl", f"name: {name}")
    text = text.replace("    latency_ns: 150 ", f"    latency_ns: {cxl_latency} ")
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


pytestmark = pytest.mark.usefixtures("isolated_profiles")


def test_directories_in_order_then_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv("HGSIM_PROFILE_PATH", os.pathsep.join([str(tmp_path / "a"), "",
                                                              str(tmp_path / "b")]))
    assert profile_dirs() == [tmp_path / "a", tmp_path / "b", PROFILE_DIR]


def test_first_directory_wins_even_over_a_shipped_name(tmp_path, monkeypatch):
    _write(tmp_path / "a", "h100-80gb-spr-cxl", cxl_latency=400)
    _write(tmp_path / "b", "h100-80gb-spr-cxl", cxl_latency=300)
    monkeypatch.setenv("HGSIM_PROFILE_PATH", os.pathsep.join([str(tmp_path / "a"),
                                                              str(tmp_path / "b")]))
    assert resolve_profile("h100-80gb-spr-cxl") == tmp_path / "a" / "h100-80gb-spr-cxl.yaml"
    assert load_profile("h100-80gb-spr-cxl").tiers["cxl0"].latency_ns == 400


def test_a_path_is_never_looked_up(tmp_path, monkeypatch):
    own = _write(tmp_path / "elsewhere", "mine")
    monkeypatch.setenv("HGSIM_PROFILE_PATH", str(tmp_path / "nothing-here"))
    assert load_profile(own).name == "mine"
    assert load_profile(str(own)).name == "mine"


def test_unknown_name_lists_what_was_searched(tmp_path, monkeypatch):
    _write(tmp_path, "my-box")
    monkeypatch.setenv("HGSIM_PROFILE_PATH", str(tmp_path))
    with pytest.raises(UserError, match=rf"unknown hardware profile 'my-bx'; did you mean "
                                        rf"'my-box'\? .*searched {tmp_path}, {PROFILE_DIR}"):
        load_profile("my-bx")


def _cli(profile_path: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, HGSIM_PROFILE_PATH=profile_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_and_studies_find_profiles_on_the_path(tmp_path):
    _write(tmp_path / "profiles", "my-box", cxl_latency=333)
    path = str(tmp_path / "profiles")
    listed = _cli(path, "profiles")
    assert listed.returncode == 0 and "my-box" in listed.stdout
    shown = _cli(path, "profiles", "show", "my-box")
    assert shown.returncode == 0 and "333" in shown.stdout
    sim = _cli(path, "simulate", "--profile", "my-box", "--model", "llama-2-7b", "--context",
               "8k", "--gen", "4", "--samples", "2", "--json")
    assert sim.returncode == 0 and '"profile": "my-box"' in sim.stdout
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: {profile: my-box, model: llama-2-7b, "
                     "workload: {context: 8k, gen: 4}, fidelity: {decode_samples: 2}}\n")
    run = _cli(path, "study", str(study), "--out", str(tmp_path / "out"), "-j", "1", "--quiet",
               "--no-figures")
    assert run.returncode == 0, run.stderr
    assert "profile my-box: " + str(tmp_path / "profiles" / "my-box.yaml") in (
        tmp_path / "out" / "study.resolved.yaml").read_text()


@pytest.mark.parametrize("verb, env", [("profiles", "HGSIM_PROFILE_PATH"),
                                       ("models", "HGSIM_MODEL_PATH")])
def test_a_broken_file_with_a_line_break_in_its_name_warns_on_one_line(tmp_path, monkeypatch,
                                                                        capsys, verb, env):
    """The listing warns about a broken file on the path and goes on; a line break in the
    file's name split that warning over two lines."""
    from hgsim.cli import main

    (tmp_path / "bro\nken.yaml").write_text("name: [\n")
    monkeypatch.setenv(env, str(tmp_path))
    assert main([verb]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(warnings) == 1 and warnings[0].startswith(f"hgsim {verb}: warning: ")
    assert "bro\\nken.yaml" in warnings[0]

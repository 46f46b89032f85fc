"""The example policy package (examples/hgsim-example-policy) installed with pip and used the
way docs/extending.md shows: listed, simulated, swept in a study and validated on this machine.

pip installs it into a temporary directory (``--target``) put on PYTHONPATH, so the test
environment itself is never changed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "hgsim-example-policy"


def install_example(root: Path) -> Path:
    """pip-install the example package under ``root``; returns the site directory.

    Built from a copy so that build/ and *.egg-info never land in the repository. Offline when
    setuptools is importable here (no build isolation, no index); else pip fetches it.
    """
    source, site = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *offline,
                    "--target", str(site), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    return site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install_example(tmp_path_factory.mktemp("example-policy"))


def hgsim(site: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HGSIM_PROFILE_PATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_installed_plugin_is_listed_with_its_package(site):
    result = hgsim(site, "policies", "streaming_llm")
    assert result.returncode == 0, result.stderr
    assert "streaming_llm" in result.stdout and "hgsim-example-policy 0.1.0" in result.stdout
    assert "window_tokens=4092" in result.stdout


def test_simulate_with_the_plugin(site):
    result = hgsim(site, "simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-3.1-8b",
                   "--policy", "streaming_llm", "--context", "128k", "--gen", "8", "--samples",
                   "4", "--option", "window_tokens=1020", "--json")
    assert result.returncode == 0, result.stderr
    assert '"policy": "streaming_llm"' in result.stdout
    assert '"final_gpu_tokens": 1024' in result.stdout  # 4 sinks + 1020 recent


def test_example_study_runs_the_plugin_next_to_builtins(site, tmp_path):
    out = tmp_path / "out"
    result = hgsim(site, "study", str(EXAMPLE / "study.yaml"), "--out", str(out), "-j", "1",
                   "--quiet")
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["policy"]) == {"streaming_llm", "h2o", "hybridgen"}
    streaming = frame[frame["policy"] == "streaming_llm"].set_index("workload.context")
    # A fixed cache: the same HBM at 32k and 128k, and less attention mass kept at 128k.
    assert streaming.loc[32768, "mem_hbm_gb"] == pytest.approx(streaming.loc[131072, "mem_hbm_gb"])
    assert 0 < streaming.loc[131072, "accuracy_mass_kept"] < streaming.loc[32768,
                                                                           "accuracy_mass_kept"] < 1
    assert (frame["tokens_per_s"] > 0).all()


def test_study_typo_is_one_line_with_a_suggestion(site, tmp_path):
    study = tmp_path / "typo.yaml"
    study.write_text((EXAMPLE / "study.yaml").read_text().replace(
        "[streaming_llm, h2o, hybridgen]", "[streaming_lm, h2o]"))
    result = hgsim(site, "study", str(study), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "did you mean 'streaming_llm'?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_executes_the_plugins_plans(site, tmp_path):
    result = hgsim(site, "validate", "--profile", "dev-zen4-2core", "--study",
                   str(EXAMPLE / "validation.yaml"), "--max-context", "4k", "--steps", "2",
                   "--threshold", "1000", "--no-progress", "--out", str(tmp_path / "v"))
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.read_csv(tmp_path / "v.csv")
    assert list(table["policy"]) == ["streaming_llm"] and (table["measured_ms"] > 0).all()
    assert (table["gpu_tokens"] == 2048).all()


def test_extending_md_quotes_the_example_as_it_is():
    """docs/extending.md shows the policy class; every code line it shows is in the package."""
    def code(line: str) -> str:
        return line.split("#", 1)[0].strip()

    doc = (REPO / "docs" / "extending.md").read_text()
    excerpt = doc.split("```python\n", 1)[1].split("```", 1)[0]
    source = {code(line) for line in (EXAMPLE / "hgsim_example_policy" / "__init__.py")
              .read_text().splitlines()}
    missing = [line for line in excerpt.splitlines() if code(line) and code(line) not in source]
    assert not missing, missing

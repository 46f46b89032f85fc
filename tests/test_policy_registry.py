"""Policies registered by other packages (entry points in ``hgsim.policies``): discovery, use
everywhere a built-in policy works, and one-line errors for broken or conflicting plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from hgsim.errors import UserError
from hgsim.policies import make_policy, policy_names, registry
from hgsim.simulate import Fidelity, simulate
from hgsim.workload import Workload

REPO = Path(__file__).resolve().parents[1]

GOOD = '''
from hgsim.plan import CpuWork, LayerPlan, Merge, Selector, Transfer
from hgsim.policies.base import Policy, PolicyOptions


class WindowOptions(PolicyOptions):
    window: int = 1024


class Window(Policy):
    name = "window"
    description = "a recent window in HBM, the rest dropped"
    lossy = True
    Options = WindowOptions

    def setup(self):
        self.account_gpu_kv(min(self.options.window, self.workload.final_context))

    def layer_plan(self, context):
        recent = min(self.options.window, context)
        return LayerPlan(context, recent, 0, 0, CpuWork.NONE, Transfer.NONE, Merge.NONE,
                         Selector.DROPPED if recent < context else Selector.ALL, None)


class Misnamed(Window):
    name = "something_else"


class Abstract(Policy):
    name = "abstract"
    description = "forgot layer_plan"

    def setup(self):
        pass


NOT_A_POLICY = 42
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Install fake entry points: ``plugins("window = mod:Window", ...)``."""
    (tmp_path / "fake_hgsim_plugin.py").write_text(GOOD)
    (tmp_path / "broken_hgsim_plugin.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(*specs: str) -> None:
        eps = []
        for spec in specs:
            name, _, value = (part.strip() for part in spec.partition("="))
            eps.append(metadata.EntryPoint(name, value, registry.GROUP))
        monkeypatch.setattr(registry, "_entry_points", lambda: eps)
        registry.reset()

    yield install
    registry.reset()


def test_builtin_policies_without_plugins():
    assert policy_names()[:8] == ["hybridgen", "gpu_only", "flexgen", "flexgen_cpu", "h2o",
                                  "infinigen", "hgca", "cpu_offload"]
    assert registry.plugin("hybridgen") is None


def test_registered_policy_works_like_a_builtin(plugins):
    plugins("window = fake_hgsim_plugin:Window")
    assert "window" in policy_names()
    result = simulate("h100-80gb-spr-cxl", "llama-2-7b", "window", Workload(context=8192, gen=4),
                      policy_options={"window": 512}, fidelity=Fidelity(decode_samples=2))
    assert result.feasible and result.tokens_per_s > 0
    assert result.steps[-1].gpu_tokens == 512
    assert result.accuracy_mass_kept < 1.0  # lossy: the proxy ran on its plan
    with pytest.raises(UserError, match="policy_options.windw"):
        simulate("h100-80gb-spr-cxl", "llama-2-7b", "window", Workload(context=8192, gen=4),
                 policy_options={"windw": 5})


def test_unknown_name_suggests_plugins_too(plugins):
    plugins("window = fake_hgsim_plugin:Window")
    with pytest.raises(UserError, match=r"unknown policy 'windw' \(did you mean 'window'\?\)"):
        make_policy("windw", None, None, None)


@pytest.mark.parametrize("spec, message", [
    ("broken = broken_hgsim_plugin:Thing",
     r"entry point 'broken = broken_hgsim_plugin:Thing' \(group hgsim.policies\) cannot be "
     r"loaded: ModuleNotFoundError: No module named 'no_such_module_anywhere'"),
    ("missing = fake_hgsim_plugin:NoSuchClass",
     r"entry point 'missing = fake_hgsim_plugin:NoSuchClass' .* cannot be loaded: AttributeError"),
    ("number = fake_hgsim_plugin:NOT_A_POLICY",
     r"'number = fake_hgsim_plugin:NOT_A_POLICY' .* must name a subclass of "
     r"hgsim.policies.base.Policy, not 42"),
    ("abstract = fake_hgsim_plugin:Abstract", r"Abstract does not implement layer_plan"),
    ("window = fake_hgsim_plugin:Misnamed",
     r"the class's name is 'something_else'; it must equal the entry point's name 'window'"),
    ("hybridgen = fake_hgsim_plugin:Window",
     r"'hybridgen = fake_hgsim_plugin:Window' .* takes the name of the built-in policy "
     r"'hybridgen'"),
])
def test_bad_plugin_is_one_user_error_naming_the_entry_point(plugins, spec, message):
    plugins(spec)
    with pytest.raises(registry.PolicyPluginError, match=message) as info:
        policy_names()
    assert "\n" not in str(info.value)
    with pytest.raises(registry.PolicyPluginError):  # every lookup fails, built-ins included
        registry.lookup("hybridgen")


def test_two_plugins_with_one_name(plugins):
    plugins("window = fake_hgsim_plugin:Window", "window = other_module:Window")
    with pytest.raises(registry.PolicyPluginError,
                       match=r"'window = other_module:Window' .* and entry point 'window = "
                             r"fake_hgsim_plugin:Window' .* both register policy 'window'"):
        policy_names()


def test_same_entry_point_found_twice_is_one_plugin(tmp_path, monkeypatch):
    (tmp_path / "fake_hgsim_plugin.py").write_text(GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint("window", "fake_hgsim_plugin:Window", registry.GROUP)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [ep, ep])
    registry.reset()
    try:
        assert policy_names().count("window") == 1
    finally:
        registry.reset()


# ------------------------------------------------------------------ studies and validation
def test_study_accepts_plugin_policy_and_keys_carry_its_version(plugins, tmp_path):
    from hgsim.study import load_study

    plugins("window = fake_hgsim_plugin:Window")
    study = tmp_path / "s.yaml"
    study.write_text(textwrap.dedent("""\
        name: s
        base: {profile: h100-80gb-spr-cxl, model: llama-2-7b, workload: {context: 8k, gen: 4}}
        sweep: {grid: {policy: [window, hybridgen]}}
    """))
    points = load_study(study).expansion.points
    assert [p.spec.policy for p in points] == ["window", "hybridgen"]
    builtin_key = points[1].spec.key
    registry.reset()
    plugins()  # no plugin installed: the built-in point's key does not change
    study.write_text(study.read_text().replace("[window, hybridgen]", "[hybridgen]"))
    assert load_study(study).expansion.points[0].spec.key == builtin_key


def test_study_typo_names_its_line(plugins, tmp_path):
    from hgsim.errors import ConfigError
    from hgsim.study import load_study

    plugins("window = fake_hgsim_plugin:Window")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: {profile: h100-80gb-spr-cxl, model: llama-2-7b}\n"
                     "sweep:\n  grid:\n    policy: [windw]\n")
    with pytest.raises(ConfigError, match=r"s.yaml:5: .*unknown policy 'windw' \(did you mean "
                                          r"'window'\?\)"):
        load_study(study)


def test_validation_study_checks_policies_at_load(tmp_path):
    from hgsim.errors import ConfigError
    from hgsim.validation import load_study

    text = (REPO / "studies" / "validation.yaml").read_text()
    bad = tmp_path / "v.yaml"
    bad.write_text(text.replace("policy: cpu_offload", "policy: cpu_ofload", 1))
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "cpu_ofload" in s)
    with pytest.raises(ConfigError, match=rf"v.yaml:{line}: configs\[\d\].policy: unknown policy "
                                          r"'cpu_ofload' \(did you mean 'cpu_offload'\?\)"):
        load_study(bad)
    bad.write_text(text.replace("{topk_ratio: 0.01, gpu_share: 0.1}",
                                "{topk_ratio: 0.01, gpu_shar: 0.1}", 1))
    with pytest.raises(ConfigError, match=r"configs\[0\].options.gpu_shar: policy 'hybridgen_static' has "
                                          r"no option 'gpu_shar' \(its options: "):
        load_study(bad)


# ------------------------------------------------------------------ the CLI, installed plugins
def _dist(site: Path, name: str, entry_points: str, module: str | None = None,
          source: str = "") -> None:
    """A minimal installed distribution: what pip leaves in site-packages."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[hgsim.policies]\n{entry_points}\n")
    if module:
        (site / f"{module}.py").write_text(source)


def _cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HGSIM_PROFILE_PATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


SIMULATE = ("simulate", "--profile", "h100-80gb-spr-cxl", "--model", "llama-2-7b",
            "--context", "8k", "--gen", "4", "--samples", "2")


@pytest.mark.parametrize("entry, module, source, message", [
    ("broken = broken_plugin:Policy", "broken_plugin", "raise RuntimeError('boom')\n",
     "entry point 'broken = broken_plugin:Policy' (group hgsim.policies from broken-dist 1.0) "
     "cannot be loaded: RuntimeError: boom"),
    ("hybridgen = hgsim.policies.hybridgen:HybridGen", None, "",
     "entry point 'hybridgen = hgsim.policies.hybridgen:HybridGen' (group hgsim.policies from "
     "broken-dist 1.0) takes the name of the built-in policy 'hybridgen'; rename the entry "
     "point"),
])
def test_cli_reports_a_broken_plugin_in_one_line(tmp_path, entry, module, source, message):
    _dist(tmp_path, "broken-dist", entry, module, source)
    for args in (SIMULATE, ("policies",)):
        result = _cli(tmp_path, *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [f"hgsim {args[0]}: error: {message}"]


def test_cli_study_with_broken_plugin_writes_nothing(tmp_path):
    _dist(tmp_path / "site", "broken-dist", "broken = broken_plugin:P", "broken_plugin",
          "import no_such_module_anywhere\n")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nbase: {profile: h100-80gb-spr-cxl, model: llama-2-7b, "
                     "workload: {context: 8k, gen: 4}}\n")
    result = _cli(tmp_path / "site", "study", str(study), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "entry point 'broken = broken_plugin:P'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

"""``hgsim calibrate --energy-from`` and measured power: borrowed figures land on every component
of their kind and the profile loads with all of them; the RAPL reader survives a counter wrap;
the NVML path works through a fake; a bad --energy-from is one line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hgsim.cli import main
from hgsim.errors import UserError
from hgsim.profiles import PROFILE_DIR, load_profile
from hgsim.specs.hardware import HardwareProfile
from hw_backend.calibration import energy_source, power
from hw_backend.calibration.records import Measurement, Measurements
from hw_backend.calibration.settings import Settings

SOURCE = "h100-80gb-spr-cxl"


def _context(energy=None, rows=None, notes=None):
    """The synthetic 2-socket, CXL-expander machine of test_calibrate_validate, with CUDA."""
    from test_calibrate_validate import _synthetic_rows

    from hw_backend.calibration.assemble import Context
    from hw_backend.calibration.topology import Machine
    from hw_backend.numa import NumaNode

    nodes = (NumaNode(0, tuple(range(8)), 64 << 30, 1 << 30),
             NumaNode(1, tuple(range(8, 16)), 64 << 30, 1 << 30),
             NumaNode(2, (), 128 << 30, 1 << 30))
    machine = Machine(nodes, {0: (10, 21, 14), 1: (21, 10, 24), 2: (14, 24, 10)}, "Test CPU",
                      2.0, "test", "avx512", tuple(range(16)))
    ms = _synthetic_rows(True)
    ms += rows or []
    cuda_info = {"name": "Test GPU", "total_memory": 80 << 30, "numa_node": 0, "pci": None}
    return Context("synthetic", "2024-01-01", machine, ms, cuda_info, None, "fp32", False,
                   16 << 20, energy, notes or {})


def _write_and_load(text: str, tmp_path: Path) -> HardwareProfile:
    path = tmp_path / "calibrated.yaml"
    path.write_text(text)
    return load_profile(path)


def test_copy_maps_figures_by_kind_and_the_profile_loads(tmp_path: Path):
    from hw_backend.calibration.assemble import build

    pytest.importorskip("torch")
    src = load_profile(SOURCE)
    text, summary = build(_context(energy_source.load(SOURCE)))
    profile = _write_and_load(text, tmp_path)
    gpu = profile.gpus["gpu0"]
    for key in energy_source.GPU_FIELDS:
        assert getattr(gpu, key) == getattr(src.gpus["gpu0"], key)
    for sock in profile.sockets.values():  # both sockets get the source's first socket's
        for key in energy_source.SOCKET_FIELDS:
            assert getattr(sock, key) == getattr(src.sockets["cpu0"], key)
    for name, tier in profile.tiers.items():
        twin = src.tiers["ddr0" if tier.kind == "ddr" else "cxl0"]
        for key in energy_source.TIER_FIELDS:
            assert getattr(tier, key) == getattr(twin, key), (name, key)
    assert profile.links["pcie0"].energy_pj_per_bit == src.links["pcie0"].energy_pj_per_bit
    assert profile.links["cxl0_link"].energy_pj_per_bit == src.links["cxl0-link"].energy_pj_per_bit
    assert profile.cost is not None and profile.cost.model_dump(exclude={"source"}) == \
        src.cost.model_dump(exclude={"source"})
    # the source has no UPI link: the calibrated one goes without, with one warning line
    assert profile.links["upi_cpu0_cpu1"].energy_pj_per_bit is None
    assert summary["energy_from"] == {"profile": SOURCE, "warnings": [
        f"--energy-from {SOURCE}: no upi link energy/cost figures; left out"]}
    # each copied figure cites the profile and the original source
    line = next(x for x in text.splitlines() if x.strip().startswith("tdp_w:"))
    assert f"# from {SOURCE}: NVIDIA H100 datasheet" in line
    assert "copied from profile h100-80gb-spr-cxl: prices are dated estimates" in text
    assert summary["power"]["rapl"] == "not measured: no RAPL readings"


def test_every_energy_and_cost_field_is_present_from_a_two_socket_source(tmp_path: Path):
    from hw_backend.calibration.assemble import build

    pytest.importorskip("torch")
    text, summary = build(_context(energy_source.load("h100-2socket-cxl")))
    profile = _write_and_load(text, tmp_path)
    assert summary["energy_from"]["warnings"] == []
    for group, names in (("gpus", energy_source.GPU_FIELDS),
                         ("sockets", energy_source.SOCKET_FIELDS),
                         ("tiers", energy_source.TIER_FIELDS), ("links", energy_source.LINK_FIELDS)):
        for item in getattr(profile, group).values():
            assert all(getattr(item, key) is not None for key in names), (group, item)
    assert profile.cost is not None


def test_measured_power_overrides_copied_figures(tmp_path: Path):
    from hw_backend.calibration.assemble import build

    pytest.importorskip("torch")
    rows = [Measurement("power", "package_idle", 60.0 + i, "W",
                        {"package": i, "seconds": 0.5, "domain": f"intel-rapl:{i}"})
            for i in (0, 1)]
    rows += [Measurement("power", "package_loaded", 140.0 + i, "W",
                         {"package": i, "seconds": 0.5, "domain": f"intel-rapl:{i}",
                          "threads": 16}) for i in (0, 1)]
    rows.append(Measurement("power", "gpu_idle", 65.0, "W", {"samples": 10, "seconds": 0.5}))
    text, summary = build(_context(energy_source.load(SOURCE), rows))
    profile = _write_and_load(text, tmp_path)
    assert profile.sockets["cpu1"].idle_power_w == 61.0
    assert profile.sockets["cpu1"].active_core_power_w == pytest.approx(80 / 8)  # 16 cores, 2 sockets
    assert profile.sockets["cpu0"].price_usd == 11600  # what was not measured is still copied
    assert profile.gpus["gpu0"].idle_power_w == 65.0 and profile.gpus["gpu0"].tdp_w == 700
    assert "measured by hgsim calibrate on 2024-01-01: RAPL intel-rapl:1" in text
    assert summary["power"]["rapl"].startswith("measured")
    assert summary["power"]["gpu"].startswith("measured")


def _fake_rapl(root: Path, index: int, energy_uj: int, max_uj: int, name: str = "package-0"):
    d = root / f"intel-rapl:{index}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_reader_computes_power_across_a_wraparound(tmp_path: Path, monkeypatch):
    max_uj = 262_143_328_850
    pkg = _fake_rapl(tmp_path, 0, max_uj - 1_000_000, max_uj)
    _fake_rapl(tmp_path, 1, 5_000_000, max_uj, name="package-1")
    sub = tmp_path / "intel-rapl:0:0"  # a sub-domain (core): not a package
    sub.mkdir()
    (sub / "name").write_text("core\n")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("5000000\n")
    packages, why = power.rapl_packages(tmp_path)
    assert why == "" and [p.index for p in packages] == [0, 1]
    clock = iter([100.0, 100.5])
    monkeypatch.setattr(power.time, "perf_counter", lambda: next(clock))

    def work(deadline: float) -> None:  # 60 J on package 0 across the wrap, 20 J on package 1
        assert deadline == pytest.approx(100.5)
        (pkg / "energy_uj").write_text(f"{59_000_000}\n")
        (tmp_path / "intel-rapl:1" / "energy_uj").write_text("25000000\n")

    assert power.package_power_w(packages, 0.5, work) == pytest.approx([120.0, 40.0])
    assert power.energy_delta_uj(10, 30, 100) == 20
    assert power.energy_delta_uj(90, 5, 100) == 15


def test_rapl_job_measures_idle_then_loaded_rows(tmp_path: Path, monkeypatch):
    _fake_rapl(tmp_path, 0, 0, 1 << 40)
    monkeypatch.setattr(power.time, "sleep", lambda s: None)
    jobs, why = power.rapl_job(Settings.make(True), 4, tmp_path, load=lambda deadline: None)
    assert why == "" and len(jobs) == 1
    rows = Measurements(jobs[0].run())
    assert [r.name for r in rows] == ["package_idle", "package_loaded"]
    assert rows[1].params["threads"] == 4 and rows[0].unit == "W"


def test_unreadable_rapl_is_a_reason_not_an_error(tmp_path: Path):
    assert power.rapl_packages(tmp_path / "absent") == ([], f"{tmp_path / 'absent'} absent "
                                                            "(no RAPL powercap interface, e.g. a VM)")
    _fake_rapl(tmp_path, 0, 0, 100, name="psys")  # a platform domain, not a package
    jobs, why = power.rapl_job(Settings.make(True), 2, tmp_path)
    assert jobs == [] and why.startswith("no package domain")


def test_this_machines_rapl_state_is_reported():
    """Whatever this machine offers, the reader answers without raising."""
    packages, why = power.rapl_packages()
    assert bool(packages) != bool(why)


def test_gpu_idle_power_through_a_fake_nvml(monkeypatch):
    torch = pytest.importorskip("torch")
    readings = iter([70_000] + [60_000, 62_000, 61_000, 90_000, 61_500])
    monkeypatch.setattr(torch.cuda, "power_draw", lambda device=0: next(readings), raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(power.time, "sleep", lambda s: None)
    jobs, why = power.gpu_idle_job(Settings.make(True), samples=5)
    assert why == ""
    (row,) = jobs[0].run()
    assert row.value == pytest.approx(61.5) and row.unit == "W"
    fig = power.gpu_figures(Measurements([row]))["idle_power_w"]
    assert fig.value == 61.5 and "NVML" in fig.what


def test_gpu_power_unavailable_is_a_reason(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken(device=0):
        raise RuntimeError("NVML not found")

    monkeypatch.setattr(torch.cuda, "power_draw", broken, raising=False)
    jobs, why = power.gpu_idle_job(Settings.make(True))
    assert jobs == [] and "NVML not found" in why


def test_trailing_comment_ignores_hashes_in_quotes():
    assert energy_source.trailing_comment("  a: 3   # from x") == "from x"
    assert energy_source.trailing_comment('  a: "b # c"  # why') == "why"
    assert energy_source.trailing_comment("  a: 3") is None


@pytest.mark.parametrize(("value", "message"), [
    ("no-such-profile", "--energy-from: unknown hardware profile 'no-such-profile'"),
    ("{tmp}/missing.yaml", "--energy-from: {tmp}/missing.yaml: file not found"),
    ("{tmp}", "--energy-from: {tmp}: not a regular file"),
    ("{tmp}/bare.yaml", "--energy-from: {tmp}/bare.yaml: profile bare has no energy or cost "
                        "figures to copy"),
])
def test_bad_energy_from_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, value,
                                                               message):
    src = yaml.safe_load((PROFILE_DIR / "dev-zen4-2core.yaml").read_text())
    for group in ("gpus", "sockets", "tiers", "links"):
        for item in src[group].values():
            for key in (*energy_source.GPU_FIELDS, *energy_source.SOCKET_FIELDS,
                        *energy_source.TIER_FIELDS, *energy_source.LINK_FIELDS):
                item.pop(key, None)
    src.pop("cost")
    src["name"] = "bare"
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(src))
    out = tmp_path / "out" / "p.yaml"
    out.parent.mkdir()
    value = value.format(tmp=tmp_path)
    assert main(["calibrate", "--out", str(out), "--quick", "--no-progress",
                 "--energy-from", value]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"hgsim calibrate: error: {message.format(tmp=tmp_path)}"), err[0]
    assert list(out.parent.iterdir()) == []


def test_load_refuses_through_user_error():
    with pytest.raises(UserError, match="^--energy-from: unknown hardware profile"):
        energy_source.load("nope")


def test_quick_calibration_with_energy_from_simulates_with_prices(tmp_path: Path, capsys):
    """The one end-to-end run: this machine, --quick, figures borrowed from a shipped profile."""
    import json

    pytest.importorskip("torch")
    pytest.importorskip("hw_backend._cpu_attention", reason="C kernels not built")
    out = tmp_path / "local.yaml"
    assert main(["calibrate", "--out", str(out), "--quick", "--no-progress", "--no-cuda",
                 "--energy-from", SOURCE]) == 0
    printed = capsys.readouterr().out
    assert f"copied from {SOURCE}" in printed and "power (rapl): " in printed
    profile = load_profile(out)
    assert profile.cost is not None
    assert all(getattr(s, key) is not None for s in profile.sockets.values()
               for key in energy_source.SOCKET_FIELDS)
    summary = json.loads(out.with_name("local.calibration.json").read_text())["summary"]
    packages, why = power.rapl_packages()
    assert summary["power"]["rapl"].startswith("measured" if packages else "not measured")
    assert main(["simulate", "--profile", str(out), "--model", "opt-6.7b", "--context", "1k",
                 "--gen", "2", "--samples", "2"]) == 0
    assert "no prices" not in capsys.readouterr().out

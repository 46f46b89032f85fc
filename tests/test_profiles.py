"""Hardware profiles: shipped ones load and cite their numbers; broken ones fail in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hgsim.capacity import hbm_capacity_bytes
from hgsim.errors import ConfigError, UserError
from hgsim.profiles import (
    PROFILE_DIR,
    list_profiles,
    load_profile,
    profile_with_overrides,
)
from hgsim.specs.hardware import HardwareProfile

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {
    "a100-40gb-spr-cxl",
    "h100-80gb-spr-cxl",
    "rtx5090-cxl",
    "h100-2socket-cxl",
    "dev-zen4-2core",
}
SHIPPED = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
BASE = PROFILE_DIR / "a100-40gb-spr-cxl.yaml"


pytestmark = pytest.mark.usefixtures("isolated_profiles")


# ------------------------------------------------------------------ shipped profiles
def test_required_profiles_shipped():
    assert REQUIRED <= set(list_profiles())
    assert PROFILE_DIR == REPO / "hardware_profiles"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_references_resolve(name):
    profile = load_profile(name)
    assert isinstance(profile, HardwareProfile)
    assert profile.name == name  # file name and profile name agree
    nodes = set(profile.gpus) | set(profile.sockets) | set(profile.tiers)
    for gpu_name, gpu in profile.gpus.items():
        assert gpu.socket in profile.sockets
        link = profile.links[gpu.link]
        assert link.kind == "pcie" and set(link.endpoints) == {gpu_name, gpu.socket}
    for tier in profile.tiers.values():
        assert tier.socket in profile.sockets
        if tier.kind == "cxl":
            assert profile.links[tier.link].kind == "cxl"
    for link in profile.links.values():
        assert set(link.endpoints) <= nodes
    assert profile.tiers_of_kind("ddr"), "every profile has host DRAM"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_cites_a_source(name):
    """Each numeric YAML line carries a comment saying where the figure comes from."""
    number = re.compile(r"^\s*[\w\-]+:\s*-?\d[\d.,]*(\s*[A-Za-z/]+)?\s*(#.*)?$")
    for lineno, line in enumerate((PROFILE_DIR / f"{name}.yaml").read_text().splitlines(), 1):
        if number.match(line):
            comment = line.partition("#")[2].strip()
            assert len(comment) > 10, f"{name}.yaml:{lineno}: number without a source comment"


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return out.splitlines()


def test_no_profile_or_doc_cites_a_file_outside_the_repository():
    """A figure's source is named where anyone can read it: a file name in a profile comment,
    or an upper-case note (REFERENCE.md, NOTES.md) named in a doc or the code, must be a file
    of this repository. 21 profile comments once cited REFERENCE.md, a file kept outside it."""
    tracked = _tracked_files()
    names = set(tracked) | {Path(f).name for f in tracked}
    file_like = re.compile(r"[\w./-]+\.(?:md|py|ya?ml|txt|csv|json)\b")
    note = re.compile(r"\b[A-Z][A-Z0-9_-]*\.md\b")
    missing = []
    for rel in tracked:
        path = REPO / rel
        if rel.startswith("hardware_profiles/") and rel.endswith(".yaml"):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                comment = line.partition("#")[2]
                source = line.partition("source:")[2]
                for cited in file_like.findall(f"{comment} {source}"):
                    if cited.lstrip("./") not in names:
                        missing.append(f"{rel}:{lineno}: {cited}")
        elif rel == "README.md" or (rel.startswith(("docs/", "hgsim/"))
                                    and rel.endswith((".md", ".py"))):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                missing += [f"{rel}:{lineno}: {cited}" for cited in note.findall(line)
                            if cited not in names]
    assert not missing, "cited files not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", sorted(REQUIRED - {"dev-zen4-2core"}))
def test_server_capacities_are_realistic(name):
    profile = load_profile(name)
    for tier_name in profile.tiers_of_kind("cxl"):
        assert 128 <= profile.tiers[tier_name].capacity_gb <= 1024, tier_name
    ddr = sum(profile.tiers[t].capacity_gb for t in profile.tiers_of_kind("ddr"))
    assert 512 <= ddr <= 2048
    assert profile.tiers_of_kind("cxl"), "server profiles ship a CXL expander"


def test_key_figures():
    a100 = load_profile("a100-40gb-spr-cxl")
    assert a100.gpus["gpu0"].hbm_bandwidth_gbps == 1555
    assert a100.gpus["gpu0"].peak_flops("bf16") == 312e12
    assert a100.links["pcie0"].bandwidth_gbps == 25
    h100 = load_profile("h100-80gb-spr-cxl")
    assert h100.gpus["gpu0"].hbm_bandwidth_gbps == 3350
    assert h100.links["pcie0"].bandwidth_gbps == 50
    rtx = load_profile("rtx5090-cxl")
    assert rtx.gpus["gpu0"].hbm_bandwidth_gbps == 1792


# nvidia-smi's memory total of each card (MiB): a datasheet's "80 GB" is binary
DEVICE_MIB = {"a100-40gb-spr-cxl": 40960, "h100-80gb-spr-cxl": 81559, "h100-2socket-cxl": 81559,
              "rtx5090-cxl": 32607, "dev-zen4-2core": 40960}


@pytest.mark.parametrize("name", sorted(DEVICE_MIB))
def test_device_memory_is_the_bytes_the_card_has(name):
    """``hbm_capacity_gb`` is 1e9 bytes, which is what ``hgsim calibrate`` writes (CUDA's total
    memory / 1e9); a shipped profile holds the same card's bytes, not the datasheet's
    binary "80 GB" read as 80e9 (6.9% fewer tokens fit in HBM on an H100)."""
    assert hbm_capacity_bytes(load_profile(name)) == pytest.approx(DEVICE_MIB[name] * 2**20, rel=1e-12)



# The DRAM installed in each host tier (GiB; lsmem's online memory) and its price per GiB as
# quoted for a module's "GB": DIMMs and CXL expanders are DRAM, sized in binary units.
HOST_GIB = {"a100-40gb-spr-cxl": {"ddr0": 512, "cxl0": 256},
            "h100-80gb-spr-cxl": {"ddr0": 768, "cxl0": 512},
            "h100-2socket-cxl": {"ddr0": 512, "ddr1": 512, "cxl0": 512},
            "rtx5090-cxl": {"ddr0": 768, "cxl0": 256}, "dev-zen4-2core": {"ddr0": 24}}
USD_PER_GIB = {"a100-40gb-spr-cxl": 4.5, "h100-80gb-spr-cxl": 5, "h100-2socket-cxl": 5,
               "rtx5090-cxl": 4.5, "dev-zen4-2core": 4.5}


@pytest.mark.parametrize("name", sorted(HOST_GIB))
def test_host_memory_is_the_bytes_installed(name):
    """``capacity_gb`` is 1e9 bytes, so a "768 GB" host (8 x 96 GiB RDIMMs) holds 824.6 of
    them, as the HBM holds what the card reports; per-GB rates are per 1e9 bytes too, so a
    module's price and standby power stay what they were quoted per binary GB."""
    profile = load_profile(name)
    gib = 2**30 / 1e9
    assert {n: t.capacity_gb for n, t in profile.tiers.items()} == pytest.approx(
        {n: g * gib for n, g in HOST_GIB[name].items()}, rel=1e-12)
    for tier in profile.tiers.values():
        per_gib = USD_PER_GIB[name] if tier.kind == "ddr" else 8
        assert tier.price_usd_per_gb * gib == pytest.approx(per_gib, rel=5e-3)
        watts_per_gib = 0.04 if tier.kind == "ddr" else 0.07
        assert tier.background_power_w_per_gb * gib == pytest.approx(watts_per_gib, rel=0.02)


def test_two_socket_topology():
    profile = load_profile("h100-2socket-cxl")
    assert set(profile.sockets) == {"cpu0", "cpu1"}
    assert profile.gpus["gpu0"].socket == "cpu0"
    assert {t.socket for t in profile.tiers.values() if t.kind == "ddr"} == {"cpu0", "cpu1"}
    upi = [link for link in profile.links.values() if link.kind == "upi"]
    assert len(upi) == 1 and set(upi[0].endpoints) == {"cpu0", "cpu1"}
    assert profile.tiers["cxl0"].socket == "cpu1"


def test_dev_profile_describes_this_machine_and_flags_the_gpu():
    profile = load_profile("dev-zen4-2core")
    cpu = profile.sockets["cpu0"]
    assert cpu.cores == 2 and len(profile.sockets) == 1
    assert not profile.tiers_of_kind("cxl")
    assert "HYPOTHETICAL" in profile.gpus["gpu0"].model
    # its CPU and memory figures are this machine's, each citing the calibration it came from
    text = (Path(__file__).resolve().parent.parent / "hardware_profiles"
            / "dev-zen4-2core.yaml").read_text()
    for key in ("attention_gflops_per_core", "stream_inflight_bytes", "gather_inflight_bytes",
                "gather_ns_per_row", "read_bandwidth_gbps", "latency_ns",
                "queue_delay_at_half_load_ns"):
        line = next(x for x in text.splitlines() if x.strip().startswith(key + ":")
                    and "hypothetical" not in x)
        assert "measured by hgsim calibrate on" in line, key
    assert profile.tiers["ddr0"].queue_delay_at_half_load_ns > 0
    assert "HYPOTHETICAL" in profile.description


# ------------------------------------------------------------------ loading
def test_load_by_path_and_cache(tmp_path):
    first = load_profile("a100-40gb-spr-cxl")
    assert load_profile("a100-40gb-spr-cxl") is first
    assert load_profile(BASE) is first  # same resolved file, same object
    copy = tmp_path / "mine.yaml"
    copy.write_text(BASE.read_text())
    mine = load_profile(str(copy))
    assert mine == first and mine is not first
    copy.write_text(BASE.read_text().replace('capacity_gb: "256 GiB"', 'capacity_gb: "512 GiB"'))
    os.utime(copy, ns=(0, 10**18))  # new mtime even on coarse-grained file systems
    assert load_profile(copy).tiers["cxl0"].capacity_gb == 512 * 2**30 / 1e9


def test_unknown_profile_name_lists_known():
    with pytest.raises(UserError) as info:
        load_profile("h100-80gb-spr-cx")
    message = str(info.value)
    assert "\n" not in message
    assert "did you mean 'h100-80gb-spr-cxl'" in message
    assert all(name in message for name in REQUIRED)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_profile(tmp_path / "nope.yaml")


def test_profile_path_env(tmp_path, monkeypatch):
    (tmp_path / "my-box.yaml").write_text(BASE.read_text().replace(
        "name: a100-40gb-spr-cxl", "name: my-box"))
    monkeypatch.setenv("HGSIM_PROFILE_PATH", f"{tmp_path}{os.pathsep}/does/not/exist")
    assert "my-box" in list_profiles() and REQUIRED <= set(list_profiles())
    assert load_profile("my-box").name == "my-box"


# ------------------------------------------------------------------ bad profiles
def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


BAD = {
    # case: (old, new, field, message part, text marking the expected line)
    "missing_field": (
        next(line for line in BASE.read_text().splitlines(keepends=True)
             if line.startswith("    latency_ns: 110 ")),  # ddr0's whole line
        "", "tiers.ddr0.latency_ns", "required field is missing", "  ddr0:"),
    "negative_bandwidth": (
        "read_bandwidth_gbps: 240", "read_bandwidth_gbps: -240",
        "tiers.ddr0.read_bandwidth_gbps", "greater than 0", "read_bandwidth_gbps: -240"),
    "unknown_tier_referenced": (
        "endpoints: [cpu0, cxl0]", "endpoints: [cpu0, cxl9]",
        "links.cxl0-link.endpoints", "unknown node 'cxl9'", "endpoints: [cpu0, cxl9]"),
    "unknown_socket": (
        "    socket: cpu0\n    link: pcie0", "    socket: cpu7\n    link: pcie0",
        "gpus.gpu0.socket", "unknown socket 'cpu7'", "socket: cpu7"),
    "unknown_link": (
        "link: cxl0-link\n", "link: nolink\n",
        "tiers.cxl0.link", "unknown link 'nolink'", "link: nolink"),
    "wrong_unit": (
        "bandwidth_gbps: 25 ", "bandwidth_gbps: 25 ns ",
        "links.pcie0.bandwidth_gbps", "wrong unit 'ns'", "bandwidth_gbps: 25 ns"),
    "unknown_key": (
        "    kind: pcie\n", "    kind: pcie\n    bandwdith_gbps: 3\n",
        "links.pcie0.bandwdith_gbps", "unknown key", "bandwdith_gbps: 3"),
    # a misspelt required key read as "required field is missing" on the tier's first line
    "misspelt_required_key": (
        "read_bandwidth_gbps: 240", "read_bandwidht_gbps: 240",
        "tiers.ddr0.read_bandwidht_gbps", "unknown key (did you mean 'read_bandwidth_gbps'?)",
        "read_bandwidht_gbps: 240"),
    # an empty name was accepted, and every result row then named the machine ''
    "empty_name": ("name: a100-40gb-spr-cxl", "name: ' '", "name", "the profile needs a name",
                   "name: ' '"),
}


def _write_bad(tmp_path: Path, case: str) -> tuple[Path, str]:
    old, new, *_ = BAD[case]
    text = BASE.read_text()
    assert old in text, f"fixture for {case} no longer matches the base profile"
    bad = text.replace(old, new, 1)
    path = tmp_path / f"{case}.yaml"
    path.write_text(bad)
    return path, bad


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_profile_one_line_error_with_file_line_and_field(tmp_path, case):
    _, _, field, part, marker = BAD[case]
    path, text = _write_bad(tmp_path, case)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{_line_of(text, marker)}: {field}: "), message
    assert part in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ngpus: [\n  gpu0: {}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:\d+: invalid YAML"):
        load_profile(path)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HGSIM_PROFILE_PATH"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "hgsim", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_check_bad_profile_exits_2_without_traceback(tmp_path):
    path, _ = _write_bad(tmp_path, "wrong_unit")
    result = _run_cli("profiles", "check", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "links.pcie0.bandwidth_gbps" in lines[0] and str(path) in lines[0]


def test_cli_check_good_profiles_exit_0():
    result = _run_cli("profiles", "check", *(str(PROFILE_DIR / f"{n}.yaml") for n in SHIPPED))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok:") == len(SHIPPED)


# ------------------------------------------------------------------ overrides
def test_overrides_apply_and_revalidate():
    base = load_profile("h100-2socket-cxl")
    tuned = profile_with_overrides(base, {
        "tiers.cxl0.read_bandwidth_gbps": "64 GB/s",
        "gpus.gpu0.peak_tflops.bf16": 500,
        "links.upi0.latency_ns": "0.1 us",
    })
    assert tuned.tiers["cxl0"].read_bandwidth_gbps == 64
    assert tuned.gpus["gpu0"].peak_tflops["bf16"] == 500
    assert tuned.links["upi0"].latency_ns == pytest.approx(100)
    assert base.tiers["cxl0"].read_bandwidth_gbps == 24  # the original is untouched
    assert profile_with_overrides(base, {}) is base


def test_override_shorthand_and_wildcard():
    base = load_profile("a100-40gb-spr-cxl")
    both = profile_with_overrides(base, {"tiers.cxl0.bandwidth_gbps": 64})
    assert (both.tiers["cxl0"].read_bandwidth_gbps, both.tiers["cxl0"].write_bandwidth_gbps) == (
        64, 64)
    slow = profile_with_overrides(base, {"tiers.*.latency_ns": 500})
    assert {t.latency_ns for t in slow.tiers.values()} == {500}
    fp8 = profile_with_overrides(base, {"gpus.gpu0.peak_tflops.fp8": 624})
    assert fp8.gpus["gpu0"].peak_tflops["fp8"] == 624


@pytest.mark.parametrize("path", ["tiers.cxl9.read_bandwidth_gbps", "tiers.cxl0.bandwith_gbps",
                                  "gpu.hbm_capacity_gb", "name.first"])
def test_override_unknown_path_is_named(path):
    with pytest.raises(UserError, match=re.escape(f"'{path}'")):
        profile_with_overrides(load_profile("a100-40gb-spr-cxl"), {path: 1})


def test_override_invalid_value_names_field():
    with pytest.raises(ConfigError) as info:
        profile_with_overrides(load_profile("a100-40gb-spr-cxl"),
                               {"tiers.cxl0.read_bandwidth_gbps": -1})
    assert "tiers.cxl0.read_bandwidth_gbps: input should be greater than 0" in str(info.value)
    with pytest.raises(ConfigError, match="wrong unit 'ns'"):
        profile_with_overrides(load_profile("a100-40gb-spr-cxl"), {"links.pcie0.bandwidth_gbps":
                                                                   "3 ns"})


@pytest.mark.parametrize("name", ["a100-40gb-spr-cxl", "h100-80gb-spr-cxl", "h100-2socket-cxl",
                                  "rtx5090-cxl", "dev-zen4-2core"])
def test_nothing_that_costs_time_is_zero_in_a_shipped_profile(name):
    """Host costs, memory-level parallelism and queueing all cost time on real hardware."""
    profile = load_profile(name)
    for sname, sock in profile.sockets.items():
        for field in ("topk_ns_per_insert", "gather_ns_per_row", "op_overhead_us",
                      "stream_inflight_bytes", "gather_inflight_bytes"):
            assert getattr(sock, field) > 0, f"{name}: sockets.{sname}.{field} is 0"
    for tname, tier in profile.tiers.items():
        assert tier.latency_ns > 0 and tier.queue_delay_at_half_load_ns > 0, f"{name}: {tname}"
    for gname, gpu in profile.gpus.items():
        assert gpu.kernel_launch_overhead_us > 0 and gpu.dma_inflight_bytes > 0, gname


def test_the_replaced_per_core_bandwidth_field_names_its_successors(tmp_path):
    text = (PROFILE_DIR / "h100-80gb-spr-cxl.yaml").read_text().replace(
        "    stream_inflight_bytes:", "    core_bandwidth_gbps: 15\n    stream_inflight_bytes:")
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="stream_inflight_bytes") as info:
        load_profile(path)
    assert "old.yaml" in str(info.value) and "core_bandwidth_gbps" in str(info.value)


# ------------------------------------------------------------------ compute rate by dtype
def test_a_dtype_without_its_own_figure_runs_at_the_16_bit_rate_but_fp32_needs_one():
    """fp16 and bf16 stand in for each other and for narrower types (weights dequantised to 16
    bits); a 16-bit tensor rate is no stand-in for fp32. A profile with bf16 alone once raised
    KeyError (a study called it a bug) for fp16, fp8 or fp32 weights."""
    from conftest import make_profile

    bf16_only = make_profile(gpus={"gpu0": {"peak_tflops": {"fp16": None, "bf16": 200}}})
    gpu = bf16_only.gpus["gpu0"]
    assert gpu.peak_flops("bf16") == gpu.peak_flops("fp16") == gpu.peak_flops("fp8") == 200e12
    assert make_profile().gpus["gpu0"].peak_flops("int8") == 100e12  # conftest: fp16 only
    with pytest.raises(UserError, match=r"peak_tflops: the GPU has no fp32 figure"):
        gpu.peak_flops("fp32")


def test_fp32_weights_on_a_gpu_without_an_fp32_figure_is_a_one_line_error(tmp_path, capsys):
    from bad_input import write

    from hgsim.cli import main

    text = (PROFILE_DIR / "dev-zen4-2core.yaml").read_text()
    text = re.sub(r"\n      fp32: .*", "", text)
    profile = write(tmp_path / "no-fp32.yaml", text)
    study = write(tmp_path / "study.yaml", f"""\
name: fp32
base:
  profile: {profile}
  model: opt-6.7b
  workload: {{batch: 1, context: 1k, gen: 4, weight_dtype: fp32}}
sweep:
  grid:
    policy: [gpu_only, hybridgen]
""")
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{study}:5: base.workload.weight_dtype: profile dev-zen4-2core: peak_tflops: " \
           "the GPU has no fp32 figure" in err, err
    assert not out.exists()


def test_a_profile_without_memory_tiers_is_a_one_line_error(tmp_path):
    # was accepted by `profiles check` and then an IndexError deep in the simulator (the
    # host tier PCIe copies stage in), a traceback with exit 1
    import yaml

    data = yaml.safe_load((PROFILE_DIR / "dev-zen4-2core.yaml").read_text())
    assert not any(t["kind"] == "cxl" for t in data["tiers"].values())  # no link to drop
    data["tiers"] = {}
    path = tmp_path / "no-tiers.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match="tiers: at least one host memory tier"):
        load_profile(path)
    result = _run_cli("simulate", "--profile", str(path), "--model", "opt-6.7b",
                      "--context", "1k", "--gen", "2", "--samples", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "tiers:" in lines[0], lines

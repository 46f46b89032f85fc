"""Numbers that are not plausible numbers: ``.inf``, ``.nan``, ``true``, 1e308, 1e-300.

Each was read without complaint (``true`` as 1 GB/s, infinity and 1e308 as "greater than 0")
and turned the simulation's times into inf or NaN. Now every spec and study field refuses
them at their line, through the shared base (``hgsim.specs.numbers``)."""

from __future__ import annotations

from typing import Any

import pytest
from bad_input import PROFILE, STUDY, line_of, replace_line, user_error, write
from pydantic import ValidationError

from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.specs.numbers import MAX_MAGNITUDE, MIN_MAGNITUDE, CheckedNumbers, implausible
from hgsim.workload import Workload

RANGE = (f"is not a plausible value (non-zero magnitudes must lie between {MIN_MAGNITUDE:g} "
         f"and {MAX_MAGNITUDE:g} in the field's unit)")


@pytest.mark.parametrize(("needle", "value", "message"), [
    ("read_bandwidth_gbps: 100", ".inf", "input should be a finite number"),
    ("read_bandwidth_gbps: 100", "-.inf", "input should be a finite number"),
    ("read_bandwidth_gbps: 100", ".nan", "input should be a finite number"),
    ("read_bandwidth_gbps: 100", "true", "expected a number, got true"),
    ("read_bandwidth_gbps: 100", "1e-300", f"1e-300 {RANGE}"),
    ("read_bandwidth_gbps: 100", '"1e400 GB/s"', "input should be a finite number"),
    ("capacity_gb: 256", "1e308", f"1e+308 {RANGE}"),
    ("capacity_gb: 256", '"2e12 GB"', f"2e+12 {RANGE}"),
    ("cores: 8", "true", "expected a number, got true"),
    ("cores: 8", "100000000000000000000", f"1e+20 {RANGE}"),
    ("compute_efficiency: 0.5", "false", "expected a number, got false"),
])
def test_profile_number_is_refused_at_its_line(tmp_path, capsys, needle, value, message):
    key = needle.split(":")[0]
    text = replace_line(PROFILE, needle, f"{key}: {value}")
    path = write(tmp_path / "p.yaml", text)
    group = {"read_bandwidth_gbps": "tiers.ddr0", "capacity_gb": "tiers.ddr0",
             "cores": "sockets.cpu0", "compute_efficiency": "gpus.gpu0"}[key]
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{line_of(text, f'{key}: {value}')}: {group}.{key}: "
                         f"{message}"), line


def test_number_inside_a_dict_field(tmp_path, capsys):
    text = PROFILE.replace("peak_tflops: {fp16: 100}", "peak_tflops: {fp16: 100, bf16: true}")
    path = write(tmp_path / "p.yaml", text)
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{line_of(text, 'peak_tflops')}: gpus.gpu0.peak_tflops: "
                         "bf16: expected a number, got true"), line


def test_plausible_extremes_and_zero_still_load(tmp_path):
    text = replace_line(PROFILE, "kernel_launch_overhead_us:", "kernel_launch_overhead_us: 0")
    text = replace_line(text, "capacity_gb: 256", 'capacity_gb: "2 TiB"')
    text = replace_line(text, "latency_ns: 100\n", "latency_ns: 0.001")
    profile = load_profile(write(tmp_path / "p.yaml", text))
    assert profile.gpus["gpu0"].kernel_launch_overhead_us == 0
    assert profile.tiers["ddr0"].capacity_gb == pytest.approx(2 * 1024**4 / 1e9)


def test_hardware_override_of_a_loaded_profile(tmp_path):
    profile = load_profile(write(tmp_path / "p.yaml", PROFILE))
    for value in (float("inf"), 1e308, True):
        with pytest.raises(Exception, match="tiers.ddr0.read_bandwidth_gbps"):
            profile_with_overrides(profile, {"tiers.ddr0.read_bandwidth_gbps": value})


@pytest.mark.parametrize(("old", "new", "where", "message"), [
    ("workload: {batch: 1,", "workload: {batch: true,", "base.workload.batch",
     "expected a number, got true"),
    ("workload: {batch: 1,", "workload: {batch: .inf,", "base.workload", "batch: inf is not a "
     "finite number"),
    ("fidelity: {decode_samples: 2,", "fidelity: {decode_samples: true,",
     "base.fidelity.decode_samples", "expected a number, got true"),
    ("policy: hybridgen\n", "policy: hybridgen\n  policy_options: {topk_ratio: .nan}\n",
     "base.policy_options", "topk_ratio: nan is not a finite number"),
    ("policy: [flexgen, hybridgen]", "hardware.tiers.ddr0.capacity_gb: [1, 1e308]",
     "sweep[0].grid.hardware.tiers.ddr0.capacity_gb[1]", f"1e+308 {RANGE}"),
])
def test_study_number_is_refused_at_its_line(tmp_path, capsys, old, new, where, message):
    text = STUDY.replace(old, new)
    assert text != STUDY
    path = write(tmp_path / "s.yaml", text)
    out = tmp_path / "out"
    line = user_error(capsys, "study", str(path), "--out", str(out))
    changed = new.strip().splitlines()[-1].strip()
    assert f"{path}:{line_of(text, changed)}: {where}: " in line and message in line, line
    assert not out.exists()


def test_workload_counts_are_not_flags():
    with pytest.raises(ValidationError, match="expected a number, got true"):
        Workload(context=True)


class _Example(CheckedNumbers):
    rate: float = 1.0
    counts: list[int] = []
    table: dict[str, float] = {}
    anything: dict[str, Any] = {}
    flag: bool = False


@pytest.mark.parametrize(("fields", "match"), [
    ({"rate": True}, "expected a number, got true"),
    ({"counts": [1, False]}, r"\[1\]: expected a number, got false"),
    ({"table": {"a": True}}, "a: expected a number, got true"),
    ({"anything": {"a": {"b": float("inf")}}}, "a.b: inf is not a finite number"),
    ({"rate": 1e13}, "1e\\+13 is not a plausible value"),
])
def test_checked_numbers_base(fields, match):
    with pytest.raises(ValidationError, match=match):
        _Example(**fields)


def test_flags_and_text_in_open_dicts_are_fine():
    assert _Example(anything={"a": True, "b": "x", "c": [0, 1e-3]}, flag=True).flag
    assert implausible({"x": [1.0, 2]}) is None

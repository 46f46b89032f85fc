"""Numbers that are not plausible numbers: ``.inf``, ``.nan``, ``true``, 1e308, 1e-300.

Each was read without complaint (``true`` as 1 GB/s, infinity and 1e308 as "greater than 0")
and turned the simulation's times into inf or NaN. Now every spec and study field refuses
them at their line, through the shared base (``hgsim.specs.numbers``)."""

from __future__ import annotations

from typing import Any

import pytest
from bad_input import (
    GPU,
    LINES,
    PROFILE,
    SOCKET,
    STUDY,
    TIER,
    insert_after,
    line_of,
    set_value,
    user_error,
    write,
)
from pydantic import ValidationError

from hgsim.profiles import load_profile, profile_with_overrides
from hgsim.specs.numbers import MAX_MAGNITUDE, MIN_MAGNITUDE, CheckedNumbers, implausible
from hgsim.workload import Workload

RANGE = (f"is not a plausible value (non-zero magnitudes must lie between {MIN_MAGNITUDE:g} "
         f"and {MAX_MAGNITUDE:g} in the field's unit)")


@pytest.mark.parametrize(("loc", "value", "message"), [
    (("tiers", TIER, "read_bandwidth_gbps"), ".inf", "input should be a finite number"),
    (("tiers", TIER, "read_bandwidth_gbps"), "-.inf", "input should be a finite number"),
    (("tiers", TIER, "read_bandwidth_gbps"), ".nan", "input should be a finite number"),
    (("tiers", TIER, "read_bandwidth_gbps"), "true", "expected a number, got true"),
    (("tiers", TIER, "read_bandwidth_gbps"), "1e-300", f"1e-300 {RANGE}"),
    (("tiers", TIER, "read_bandwidth_gbps"), '"1e400 GB/s"', "input should be a finite number"),
    (("tiers", TIER, "capacity_gb"), "1e308", f"1e+308 {RANGE}"),
    (("tiers", TIER, "capacity_gb"), '"2e12 GB"', f"2e+12 {RANGE}"),
    (("sockets", SOCKET, "cores"), "true", "expected a number, got true"),
    (("sockets", SOCKET, "cores"), "100000000000000000000", f"1e+20 {RANGE}"),
    (("gpus", GPU, "compute_efficiency"), "false", "expected a number, got false"),
])
def test_profile_number_is_refused_at_its_line(tmp_path, capsys, loc, value, message):
    path = write(tmp_path / "p.yaml", set_value(PROFILE, loc, value))
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{LINES[loc]}: {'.'.join(loc)}: {message}"), line


def test_number_inside_a_dict_field(tmp_path, capsys):
    peaks = ("gpus", GPU, "peak_tflops")
    first = next(loc for loc in LINES if loc[:3] == peaks and len(loc) == 4)
    path = write(tmp_path / "p.yaml", insert_after(PROFILE, first, "bf16: true"))
    line = user_error(capsys, "profiles", "check", str(path))
    assert line.endswith(f"{path}:{LINES[peaks]}: gpus.{GPU}.peak_tflops: bf16: expected a "
                         "number, got true"), line


def test_plausible_extremes_and_zero_still_load(tmp_path):
    text = set_value(PROFILE, ("gpus", GPU, "kernel_launch_overhead_us"), "0")
    text = set_value(text, ("tiers", TIER, "capacity_gb"), '"2 TiB"')
    text = set_value(text, ("tiers", TIER, "latency_ns"), "0.001")
    profile = load_profile(write(tmp_path / "p.yaml", text))
    assert profile.gpus[GPU].kernel_launch_overhead_us == 0
    assert profile.tiers[TIER].capacity_gb == pytest.approx(2 * 1024**4 / 1e9)


def test_hardware_override_of_a_loaded_profile(tmp_path):
    profile = load_profile(write(tmp_path / "p.yaml", PROFILE))
    for value in (float("inf"), 1e308, True):
        with pytest.raises(Exception, match=f"tiers.{TIER}.read_bandwidth_gbps"):
            profile_with_overrides(profile, {f"tiers.{TIER}.read_bandwidth_gbps": value})


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

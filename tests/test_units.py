"""Quantities with units: what people type in profiles and studies must read as intended."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hgsim.units import dimension_of, parse_count, parse_quantity


@pytest.mark.parametrize(
    ("text", "dimension", "expected"),
    [
        ("25 GB/s", "bandwidth_gbps", 25.0),
        ("25GB/s", "bandwidth_gbps", 25.0),
        ("1.5 TB/s", "bandwidth_gbps", 1500.0),
        ("500 MB/s", "bandwidth_gbps", 0.5),
        ("1 GiB/s", "bandwidth_gbps", 1024**3 / 1e9),
        ("25", "bandwidth_gbps", 25.0),
        ("512 GB", "capacity_gb", 512.0),
        ("1 TB", "capacity_gb", 1000.0),
        ("24684092 KiB", "capacity_gb", 24684092 * 1024 / 1e9),
        ("110 ns", "latency_ns", 110.0),
        ("1 us", "latency_ns", 1000.0),
        ("4 us", "latency_us", 4.0),
        ("2 GHz", "frequency_ghz", 2.0),
        ("2400 MHz", "frequency_ghz", 2.4),
        ("989.5 TFLOP/s", "tflops", 989.5),
        ("40 GFLOP/s", "gflops", 40.0),
        ("1e3 GB/s", "bandwidth_gbps", 1000.0),
    ],
)
def test_parse_quantity_converts_to_canonical_unit(text, dimension, expected):
    assert math.isclose(parse_quantity(text, dimension), expected, rel_tol=1e-12)


def test_parse_quantity_passes_numbers_through():
    assert parse_quantity(25, "bandwidth_gbps") == 25.0
    assert parse_quantity(0.5, "latency_ns") == 0.5


@pytest.mark.parametrize(
    ("text", "dimension", "bad_unit"),
    [
        ("25 ns", "bandwidth_gbps", "ns"),  # a latency where a bandwidth belongs
        ("25 GB", "bandwidth_gbps", "GB"),  # capacity is not bandwidth
        ("25 GB/s", "capacity_gb", "GB/s"),
        ("25 GB/s", "latency_ns", "GB/s"),
        ("3 GHz", "latency_ns", "GHz"),
    ],
)
def test_parse_quantity_rejects_wrong_dimension(text, dimension, bad_unit):
    with pytest.raises(ValueError, match=f"wrong unit '{bad_unit}'"):
        parse_quantity(text, dimension)


@pytest.mark.parametrize("value", ["fast", "25 GB/s extra", "", True, None, [25]])
def test_parse_quantity_rejects_non_quantities(value):
    with pytest.raises(ValueError):
        parse_quantity(value, "bandwidth_gbps")


@pytest.mark.parametrize(
    ("field", "dimension"),
    [
        ("hbm_bandwidth_gbps", "bandwidth_gbps"),
        ("capacity_gb", "capacity_gb"),
        ("latency_ns", "latency_ns"),
        ("kernel_launch_overhead_us", "latency_us"),
        ("frequency_ghz", "frequency_ghz"),
        ("peak_tflops", "tflops"),
        ("attention_gflops_per_core", "gflops"),
        ("cores", None),
        ("compute_efficiency", None),
    ],
)
def test_dimension_follows_field_suffix(field, dimension):
    assert dimension_of(field) == dimension


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("32k", 32768),
        ("32K", 32768),
        ("32 k", 32768),
        ("1.5k", 1536),
        ("128k", 131072),
        ("1M", 1024**2),
        ("4096", 4096),
        ("1000", 1000),  # no suffix: exactly what was written
        (4096, 4096),
        (4096.0, 4096),
    ],
)
def test_parse_count(value, expected):
    assert parse_count(value) == expected


@pytest.mark.parametrize("value", ["32kb", "many", "0.3k", "1.5", 1.5, True, None, "-5",
                                   "9" * 400, "9" * 20 + "G"])  # past float, past 2^62
def test_parse_count_rejects(value):
    with pytest.raises(ValueError):
        parse_count(value)


# ``$`` matches before a final newline and ``\s`` matches newlines and tabs, so these read as
# numbers before the parsers took a full match with plain spaces only.
_CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x00", "\x0b", "\x0c", "\x1b", "\x85"]


@pytest.mark.parametrize("char", _CONTROL_CHARACTERS)
@pytest.mark.parametrize("template", ["1{}k", "1k{}", "{}1k", "32{}", "{}32"])
def test_parse_count_refuses_control_characters(template, char):
    with pytest.raises(ValueError, match="expected a count"):
        parse_count(template.format(char))


@pytest.mark.parametrize("char", _CONTROL_CHARACTERS)
@pytest.mark.parametrize("template", ["25{}GB/s", "25 GB/s{}", "{}25 GB/s", "25{}", "{}25"])
def test_parse_quantity_refuses_control_characters(template, char):
    with pytest.raises(ValueError, match="cannot read"):
        parse_quantity(template.format(char), "bandwidth_gbps")


def test_parsers_take_ascii_digits_only():
    with pytest.raises(ValueError):
        parse_count("\u0663\u0662k")  # Arabic-Indic "32k": float() would read it
    with pytest.raises(ValueError):
        parse_quantity("\u0663\u0662 GB/s", "bandwidth_gbps")


def test_parsers_strip_plain_spaces():
    assert parse_count("  32 k  ") == 32768
    assert parse_quantity("  25 GB/s  ", "bandwidth_gbps") == 25.0
    with pytest.raises(ValueError, match="positive count"):
        parse_count("  -5")


@given(st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_gbps_round_trip(value):
    assert math.isclose(parse_quantity(f"{value!r} GB/s", "bandwidth_gbps"), value, rel_tol=1e-12)
    assert math.isclose(
        parse_quantity(f"{value!r} TB/s", "bandwidth_gbps"), value * 1e3, rel_tol=1e-12
    )


@given(st.integers(min_value=0, max_value=10**6))
def test_count_k_suffix_is_power_of_two(n):
    assert parse_count(f"{n}k") == n * 1024
    assert parse_count(str(n)) == n

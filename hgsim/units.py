"""Parsing of quantities with units.

Profiles and studies are written by people, so they may say ``25 GB/s`` or ``32k`` instead of
bare numbers. Each field's unit is fixed by its name suffix (``_gbps``, ``_gb``, ``_ns``, ...);
a string with a unit of a different dimension is rejected, so "latency_ns: 25 GB/s" cannot
slip through as 25.
"""

from __future__ import annotations

import re

from hgsim.errors import clipped, quoted

#: The most digits a whole number typed as text may have (a count, an option's value, a trace's
#: cell): none needs 10^18 (an int64 has 19), and Python reads no int of over 4300 digits.
MAX_DIGITS = 18


def digits_of(text: str) -> int:
    """How many significant digits ``text`` has as a whole number ``int()`` reads (sign,
    underscores and leading zeros aside), 0 where it is no such number: checked against
    ``MAX_DIGITS`` before ``int()``, which refuses over 4300 and quotes them all."""
    digits = text.strip().lstrip("+-").replace("_", "").lstrip("0")
    return len(digits) if digits.isdecimal() else 0

# Conversion factors into each field's canonical unit, keyed by dimension.
_DIMENSIONS: dict[str, dict[str, float]] = {
    "bandwidth_gbps": {  # canonical: GB/s (1e9 bytes per second)
        "b/s": 1e-9, "kb/s": 1e-6, "mb/s": 1e-3, "gb/s": 1.0, "tb/s": 1e3,
        "kib/s": 1024 / 1e9, "mib/s": 1024**2 / 1e9, "gib/s": 1024**3 / 1e9, "tib/s": 1024**4 / 1e9,
    },
    "capacity_gb": {  # canonical: GB (1e9 bytes)
        "b": 1e-9, "kb": 1e-6, "mb": 1e-3, "gb": 1.0, "tb": 1e3,
        "kib": 1024 / 1e9, "mib": 1024**2 / 1e9, "gib": 1024**3 / 1e9, "tib": 1024**4 / 1e9,
    },
    "bytes": {  # canonical: bytes
        "b": 1.0, "kb": 1e3, "mb": 1e6, "kib": 1024.0, "mib": 1024.0**2,
    },
    "latency_ns": {"ps": 1e-3, "ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9},
    "latency_us": {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6},
    "frequency_ghz": {"hz": 1e-9, "khz": 1e-6, "mhz": 1e-3, "ghz": 1.0},
    "tflops": {"gflop/s": 1e-3, "tflop/s": 1.0, "pflop/s": 1e3, "gflops": 1e-3, "tflops": 1.0, "pflops": 1e3},
    "gflops": {"gflop/s": 1.0, "tflop/s": 1e3, "gflops": 1.0, "tflops": 1e3},
}

# Field-name suffix -> dimension key in _DIMENSIONS.
SUFFIX_DIMENSION = {
    "_gbps": "bandwidth_gbps",
    "_gb": "capacity_gb",
    "_bytes": "bytes",
    "_ns": "latency_ns",
    "_us": "latency_us",
    "_ghz": "frequency_ghz",
    "_tflops": "tflops",
    "_gflops": "gflops",
    "_gflops_per_core": "gflops",  # attention_gflops_per_core: "40 GFLOP/s" reads as 40
}

# Both patterns are used with ``fullmatch`` and allow only plain spaces around the number and
# its unit: ``\s`` and ``$`` would let "1\nk" (``$`` matches before a final newline, ``\s``
# matches any newline or tab) read as 1024, and ``\d`` would take digits of other scripts.
_QUANTITY = re.compile(r" *([-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?) *([A-Za-z/]+)? *")


def dimension_of(field_name: str) -> str | None:
    if "_per_" in field_name and not field_name.endswith("_per_core"):
        return None  # a rate per unit (price_usd_per_gb, energy_pj_per_bit) is no capacity
    for suffix, dim in SUFFIX_DIMENSION.items():
        if field_name.endswith(suffix):
            return dim
    return None


def split_quantity(text: str) -> tuple[float, str | None]:
    """The number and unit (None: none) a quantity such as ``"768 GiB"`` is written with;
    ValueError if it is not one."""
    match = _QUANTITY.fullmatch(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a quantity")
    return float(match.group(1)), match.group(2)


def parse_quantity(value: object, dimension: str) -> float:
    """Convert ``value`` (number, or string with a unit of ``dimension``) to the canonical unit.

    Raises ValueError with a short message naming the offending unit.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a number, got {type(value).__name__}")
    number, unit = split_quantity(value)
    if unit is None:
        return number
    table = _DIMENSIONS[dimension]
    factor = table.get(unit.lower())
    if factor is None:
        allowed = ", ".join(sorted({u for u in table}))
        raise ValueError(f"wrong unit {unit!r} (expected one of: {allowed})")
    return number * factor


_COUNT = re.compile(r" *([0-9]+(?:\.[0-9]*)?) *([kKmMgG]i?)? *")


def parse_count(value: object) -> int:
    """Parse token counts such as ``32k`` (= 32768, as context lengths are quoted) or ``4096``.

    ``k``/``m`` mean powers of two (32k context = 32768 tokens), which is how context windows
    are named; ``1000`` stays exactly 1000.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a count, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a count such as 4096 or 32k, got {value!r}")
    match = _COUNT.fullmatch(value)
    if not match and value.strip(" ").startswith("-"):
        raise ValueError(f"must be a positive count such as 4096 or 32k, got {quoted(value)}")
    if not match:
        raise ValueError(f"expected a count such as 4096 or 32k, got {quoted(value)}")
    number, suffix = float(match.group(1)), match.group(2)
    if suffix:
        number *= {"k": 1024, "m": 1024**2, "g": 1024**3}[suffix[0].lower()]
    if number >= 2.0 ** 62:  # 1e309 reads as inf; no context or step count comes near 2^62
        raise ValueError(f"{clipped(value.strip())} is too large a count (at most 2^62)")
    if not number.is_integer():
        raise ValueError(f"{quoted(value)} is not a whole number of tokens")
    return int(number)


def size_text(n_bytes: float) -> str:
    """A size in GB, or in MB / kB / B where GB would print 0.0 (tiny models, small budgets)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n_bytes) >= 0.05 * scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"

"""Base model for specs: strict keys, checked numbers, and quantities with units read by
field-name suffix."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, ValidationInfo, field_validator

from hgsim.specs.numbers import CheckedNumbers
from hgsim.units import dimension_of, parse_quantity


class SpecModel(CheckedNumbers):
    """Frozen, strict (unknown keys are errors), unit-aware, and numbers are checked.

    A field named ``*_gbps`` accepts ``25`` or ``"25 GB/s"``; a dict field such as
    ``peak_tflops`` converts each value. A unit of the wrong dimension is a validation error.
    Every number, converted or not, must be finite and plausible and not a boolean
    (``CheckedNumbers``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _convert_units(cls, value: Any, info: ValidationInfo) -> Any:
        # A field validator (not a model one) so that a wrong unit is reported on the field
        # itself: "tiers.cxl0.latency_ns: wrong unit ..." at the right line, not on the model.
        dimension = dimension_of(info.field_name or "")
        if dimension is None:
            return value
        if isinstance(value, dict):
            converted = {}
            for key, item in value.items():
                try:
                    converted[key] = _convert(item, dimension)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
            return converted
        return _convert(value, dimension)


def _convert(value: Any, dimension: str) -> Any:
    if isinstance(value, str):
        return parse_quantity(value, dimension)  # ValueError -> pydantic error on this field
    return value

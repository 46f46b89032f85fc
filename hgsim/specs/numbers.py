"""Numbers in specs and studies: real numbers of a plausible size, never booleans, inf or NaN.

YAML reads ``true`` as a boolean, ``.inf`` as infinity, and ``1e308`` as a number that becomes
infinity the moment it is used (1e308 GB is 1e317 bytes). Left to pydantic, ``true`` is taken
as 1 (a 1 GB/s tier), ``gt=0`` lets infinity through, and the simulation then reports inf or
NaN times without saying why. ``CheckedNumbers`` is the base of every spec (``SpecModel``) and
study schema model, so each numeric field, and each number inside a dict or list field, gets
these checks without a per-field rule:

* a boolean where a number is expected is an error ("expected a number, got true");
* inf and NaN are errors;
* a non-zero magnitude must lie within [``MIN_MAGNITUDE``, ``MAX_MAGNITUDE``] of the field's
  own unit (GB, GB/s, ns, us, GHz, TFLOP/s, tokens, fractions...).

Why these bounds: real figures in those units lie between about 1e-3 (fractions, ns per
item) and 1e7 (tokens of context; capacities and bandwidths are at most ~1e5), so six orders
of magnitude to spare either way still reject only typos. Within them every quantity the
simulator derives from a few such factors stays finite and far from overflow: bytes are at
most 1e12 GB x 1e9 = 1e21, FLOP/s 1e24, and a time of 1e21 bytes at 1e-9 GB/s is 1e21 s.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

MAX_MAGNITUDE = 1e12
MIN_MAGNITUDE = 1e-9

#: (model class, field) -> where the field holds numbers: "scalar", "items", "values" or None
_SHAPES: dict[tuple[type, str], str | None] = {}


class CheckedNumbers(BaseModel):
    """Base model whose numeric values are finite, plausible and never booleans."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # Before pydantic's lax mode turns true into 1 (or 1.0).
        shape = _shape(cls, info.field_name or "")
        if shape == "scalar" and isinstance(value, bool):
            raise ValueError(f"expected a number, got {_yaml(value)}")
        if shape == "values" and isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, bool):
                    raise ValueError(f"{key}: expected a number, got {_yaml(item)}")
        if shape == "items" and isinstance(value, list | tuple):
            for index, item in enumerate(value):
                if isinstance(item, bool):
                    raise ValueError(f"[{index}]: expected a number, got {_yaml(item)}")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _plausible(cls, value: Any) -> Any:
        problem = implausible(value)
        if problem:
            raise ValueError(problem)
        return value


def implausible(value: Any, where: str = "") -> str | None:
    """What is wrong with the first number in ``value`` (nested dicts and lists), or None.

    Booleans are not numbers here (a dict of options may hold flags); nested models check
    themselves.
    """
    if isinstance(value, bool) or isinstance(value, BaseModel):
        return None
    if isinstance(value, int | float):
        prefix = f"{where}: " if where else ""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{prefix}{value} is not a finite number"
        size = abs(value)
        if size > MAX_MAGNITUDE or (size and size < MIN_MAGNITUDE):
            return (f"{prefix}{magnitude_text(value)} is not a plausible value (non-zero "
                    "magnitudes must lie "
                    f"between {MIN_MAGNITUDE:g} and {MAX_MAGNITUDE:g} in the field's unit)")
        return None
    if isinstance(value, dict):
        items = ((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for path, item in items:
        problem = implausible(item, path)
        if problem:
            return problem
    return None


def magnitude_text(value: int | float) -> str:
    """``value`` as ``%g`` writes it; an integer past float's range (a YAML or JSON file may
    hold 400 digits) by its digit count, since ``%g`` would raise OverflowError."""
    try:
        return f"{value:g}"
    except OverflowError:
        digits = int(abs(value).bit_length() * math.log10(2)) + 1  # str() may refuse it too
        return f"{'-' if value < 0 else ''}an integer of about {digits:,} digits"


def _yaml(flag: bool) -> str:
    return "true" if flag else "false"


def _shape(cls: type[BaseModel], name: str) -> str | None:
    key = (cls, name)
    if key not in _SHAPES:
        field = cls.model_fields.get(name)
        _SHAPES[key] = _number_shape(field.annotation) if field is not None else None
    return _SHAPES[key]


def _number_shape(annotation: Any) -> str | None:
    """Where an annotation holds numbers: itself, its items or its dict values."""
    if _is_number(annotation):
        return "scalar"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return "scalar" if any(_is_number(arg) for arg in args) else None
    if origin is dict and len(args) == 2 and _is_number(args[1]):
        return "values"
    if origin in (list, tuple, set, frozenset) and any(_is_number(arg) for arg in args):
        return "items"
    return None


def _is_number(annotation: Any) -> bool:
    return annotation in (int, float)

"""The accuracy model's settable parameters, checked alike wherever a user sets them.

Two groups of the accuracy model's assumptions can be set per run: the approximate selectors'
parameters (``selection``: ``SelectionModel``) and the shape of the synthetic attention
(``attention``: ``AttentionModelSpec``'s mass-shape fields). A study's ``fidelity.<group>``,
``api.simulate(<group>=...)`` and ``hgsim simulate --<group> KEY=VALUE`` all go through one
``OverrideGroup`` per group, so a value is refused with the same one-line reason everywhere, and
the dataclass itself applies the same check.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hgsim.errors import quoted


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What one field accepts: a whole number >= ``low`` (``whole``), or a finite number in
    ``[low, high]`` (``(low, high]`` when ``low_open``)."""

    low: float
    high: float = math.inf
    whole: bool = False
    low_open: bool = False

    def problem(self, field: str, value: Any) -> str | None:
        """Why ``value`` cannot be ``field`` (None: it can); never booleans or text."""
        if self.whole:
            if (isinstance(value, bool) or not isinstance(value, int) or value < self.low
                    or value > self.high):
                span = f">= {int(self.low):,}" if math.isinf(self.high) \
                    else f"from {int(self.low):,} to {int(self.high):,}"
                return f"{field} must be a whole number {span}, got {_shown(value)}"
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value > self.high
                or (value <= self.low if self.low_open else value < self.low)):
            return f"{field} must be a number {self._span()}, got {_shown(value)}"
        return None

    def _span(self) -> str:
        if math.isfinite(self.high):
            return f"in {'(' if self.low_open else '['}{self.low:.15g}, {self.high:.15g}]"
        return f"{'>' if self.low_open else '>='} {self.low:.15g}"

    def value(self, value: Any) -> int | float:
        return int(value) if self.whole else float(value)


class FieldError(ValueError):
    """A bad override: ``field`` names it, the message (``reason``) says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class OverrideGroup:
    """One group of settable fields of the dataclass ``cls`` (``name`` as users write it)."""

    name: str
    cls: type
    rules: Mapping[str, FieldRule]
    example: str  # one override, as a Python mapping, for messages

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.rules)

    def check(self, instance: Any) -> None:
        """Raise ``ValueError`` for the first settable field of ``instance`` out of its rule
        (for ``cls.__post_init__``)."""
        for field, rule in self.rules.items():
            problem = rule.problem(field, getattr(instance, field))
            if problem:
                raise ValueError(problem)

    def build(self, overrides: Mapping[str, Any] | None) -> Any:
        """``cls`` with ``overrides`` (field -> value) replacing its defaults; None when none
        is given (the defaults). Raises ``FieldError`` naming the first unknown field or bad
        value."""
        if not overrides:
            return None
        values: dict[str, Any] = {}
        for field, value in overrides.items():
            rule = self.rules.get(field)
            if rule is None:
                raise FieldError(field, f"unknown {self.name} field {quoted(str(field))} (known: "
                                        f"{', '.join(self.fields)})")
            problem = rule.problem(field, value)
            if problem:
                raise FieldError(field, problem)
            values[field] = rule.value(value)
        try:
            return self.cls(**values)
        except ValueError as exc:  # a combination the fields' own rules cannot see
            raise FieldError(next(iter(values)), str(exc)) from None

    def overrides_of(self, instance: Any) -> dict[str, Any]:
        """The settable fields of ``instance`` that differ from the defaults (empty for None or
        the defaults)."""
        if instance is None:
            return {}
        default = self.cls()
        return {field: getattr(instance, field) for field in self.fields
                if getattr(instance, field) != getattr(default, field)}


def _shown(value: Any) -> str:
    """A value as the YAML that gave it reads (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def override_groups() -> dict[str, OverrideGroup]:
    """Every settable group by name (``selection``, ``attention``), in that order."""
    from hgsim.accuracy.selection import SELECTION
    from hgsim.accuracy.synthetic import ATTENTION

    return {group.name: group for group in (SELECTION, ATTENTION)}


__all__ = ["FieldError", "FieldRule", "OverrideGroup", "override_groups"]

"""Numeric settings checked before any work starts: finite, of the right kind, in range.

A NaN guard turns a comparison silently off (``x > nan`` is always False), an inf budget runs
forever, and a bool passes as an int; every config in the workbench declares its numeric
fields' ranges here, once, and gets one kind of message for all of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from workbench.core.errors import WorkbenchError


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric setting.

    Attributes:
        low, high: bounds (``None``: unbounded on that side).
        low_open: ``low`` itself is not allowed (e.g. a learning rate > 0).
        integer: a whole number is required.
        optional: ``None`` is allowed (it means "off" or "default" for that setting).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f" <= {self.high:g}"
        else:
            bounds = ""
        return kind + bounds + (" (or None)" if self.optional else "")

    def admits(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


def check_ranges(owner: str, values: Mapping[str, object], ranges: Mapping[str, Range]) -> None:
    """Raise a :class:`WorkbenchError` naming the first setting of ``values`` outside its range."""
    for name, allowed in ranges.items():
        value = values[name]
        if not allowed.admits(value):
            raise WorkbenchError(f"{owner}.{name} must be {allowed.describe()}, got {value!r}")


def check_config(config: object, ranges: Mapping[str, Range]) -> None:
    """:func:`check_ranges` over a dataclass's fields (call it from ``__post_init__``)."""
    check_ranges(type(config).__name__, vars(config), ranges)

"""Values from suites and the command line, checked against what was declared, before any training.

A method's config keys and a protocol's parameters are declared with default values; a value a
user sets must have its default's type. PyYAML reads ``1e-3`` as the *string* '1e-3' (YAML 1.1
wants a dot in a float), so numeric strings are read as numbers; anything else of the wrong type
stops with one line naming the key, the bad value and what would be valid.
"""
from __future__ import annotations

import math
from typing import Any

from harness.errors import UsageError


def parse_number(value: Any) -> int | float | None:
    """``value`` as a finite int or float (numeric strings included); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return None


def coerce_like(value: Any, default: Any, name: str) -> Any:
    """``value`` converted to the type of ``default`` (the declared default of ``name``).

    bool needs a bool; int takes integers (and integral numbers or numeric strings such as
    '1e3'); float takes any finite number or numeric string (ints stay ints, strings become
    floats); str, list and dict need their own type; a None default accepts anything.
    """
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, int):
        number = parse_number(value)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        return int(number)
    if isinstance(default, float):
        number = parse_number(value)
        if number is None:
            raise UsageError(f"{name} must be a finite number, got {value!r}")
        return float(number) if isinstance(value, str) else number
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise UsageError(f"{name} must be a string, got {value!r}")
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{name} must be a list, got {value!r}")
        if default:  # elements like the default's first element
            return [coerce_like(v, default[0], f"{name}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if isinstance(default, dict):
        if isinstance(value, dict):
            return value
        raise UsageError(f"{name} must be a mapping, got {value!r}")
    return value


def number_in_range(value: Any, low: float | None, high: float | None, name: str) -> Any:
    """``value`` (a number, or a list of numbers) with ``low <= x <= high`` for each (None: unbounded);
    numeric strings are converted."""
    if isinstance(value, list):
        return [number_in_range(item, low, high, f"{name}[{i}]") for i, item in enumerate(value)]
    number = parse_number(value)
    if number is None:
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (f"in [{low}, {high}]" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        raise UsageError(f"{name} must be {bounds}, got {value!r}")
    return float(number) if isinstance(value, str) else number


#: Seeds are below 2**31: every RNG the harness seeds (torch, numpy, Python, derived per-epoch seeds) takes them.
SEED_LIMIT = 2 ** 31


def is_seed(value: Any) -> bool:
    """A non-negative integer below :data:`SEED_LIMIT` (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT


def repeated(values: list[Any]) -> list[str]:
    """The values that occur more than once in ``values``, as sorted strings."""
    return sorted({str(v) for v in values if values.count(v) > 1})


def check_unique(values: list[Any], what: str) -> None:
    """No value twice in a list the user gave (a seed twice would count one run as two seeds)."""
    twice = repeated(values)
    if twice:
        raise UsageError(f"{what} lists {', '.join(twice)} more than once; give each once")

"""Values from suites and the command line, checked against what was declared, before any training.

A method's config keys and a protocol's parameters are declared with default values; a value a
user sets must have its default's type. PyYAML reads ``1e-3`` as the *string* '1e-3' (YAML 1.1
wants a dot in a float), so numeric strings are read as numbers; anything else of the wrong type
stops with one line naming the key, the bad value and what would be valid.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Callable

from harness.errors import EnvironmentFailure, UsageError


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


# ---------------------------------------------------------------- command-line argument types
class _StoreOnce(argparse.Action):
    """argparse's plain ``store``, except that an option given twice is an error: otherwise the last value
    silently wins (``--seeds 0,1 --seeds 2`` would run seed 2 alone)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = namespace.__dict__.setdefault(_GIVEN, set())
        if self.dest in given:
            raise argparse.ArgumentError(self, "given more than once; give it once (a list is comma-separated)")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


_GIVEN = "__options_given"


class UsageParser(argparse.ArgumentParser):
    """argparse for the CLI and the benchmarks: a bad argument is a one-line UsageError (exit 2), not a usage
    block, and a value-taking option may be given only once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        parsed.__dict__.pop(_GIVEN, None)
        return parsed, rest

    def error(self, message: str) -> None:
        raise UsageError(message)


def csv_list(value: str) -> list[str]:
    """A non-empty comma-separated list, each item once (``--methods ""`` must not mean all methods)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {value!r}")
    once(items, value)
    return items


def once(items: list, value: str) -> None:
    """No item twice in one command-line list."""
    if repeated(items):
        raise argparse.ArgumentTypeError(f"{', '.join(repeated(items))} given more than once in {value!r}; "
                                         f"give each once")


#: The largest image side a suite or ``eval --image-size`` may ask for (4096 px: 50 MB per image in float32).
MAX_IMAGE_SIZE = 4096


def positive_int(value: str) -> int:
    """A whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def image_size(value: str) -> int:
    """An image side in pixels, 1 to :data:`MAX_IMAGE_SIZE`."""
    side = positive_int(value)
    if side > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGE_SIZE} pixels, got {value!r}")
    return side


def positive_ints(value: str) -> list[int]:
    """A comma-separated list of whole numbers of at least 1 (benchmark sizes)."""
    return [positive_int(item) for item in csv_list(value)]


def positive_number(value: str) -> float:
    """A finite number above 0."""
    number = parse_number(value)
    if number is None or not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return float(number)


def path_arg(value: str) -> Path:
    """A path option that names something (``--results-dir ''`` would mean the current directory)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return Path(value)


def non_empty(what: str) -> Callable[[str], str]:
    """An argument type for a string that must name something: ``run ""`` would otherwise run the default suite,
    ``tune --study ""`` use the default study."""
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return value

    check.__name__ = what
    return check


suite_arg = non_empty("a suite name or a path to a YAML file")


def output_file(value: str) -> Path:
    """A file to write (a benchmark's ``--out``), checked before the benchmark spends minutes: not a directory,
    and in a directory that exists or can be made."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value!r} is a directory; give a file path such as {str(path / 'bench.md')!r}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {value!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):  # the environment, not the value (exit 1, as for run's --results-dir)
        raise EnvironmentFailure(f"cannot write {value!r}: {str(parent)!r} is not a writable directory; fix its "
                                 f"permissions or pass another --out")
    return path

"""Training budgets: epochs, optimiser steps, samples seen, or wall-clock seconds."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from harness.errors import UsageError
from harness.execution.validate import parse_number

UNITS = ("epochs", "steps", "samples", "seconds")


@dataclass(frozen=True)
class Budget:
    """A limit on one unit. The harness's loop enforces it; adapters never count.

    The limit must be a finite positive number (``epochs=inf`` would train forever); a numeric
    string (YAML's ``{epochs: 1e2}``) is read as its number.
    """

    unit: str
    limit: float

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise UsageError(f"unknown budget unit {self.unit!r} (valid: {', '.join(UNITS)})")
        limit = parse_number(self.limit)
        if limit is None or not limit > 0:
            raise UsageError(f"budget {self.unit} must be a positive number (finite), got {self.limit!r}")
        if self.unit in ("steps", "samples") and not float(limit).is_integer():
            raise UsageError(f"budget {self.unit} must be a whole number, got {self.limit!r}")
        # one budget, one run id: "samples=1e5", {samples: 1e5} and 100000 are all the int 100000
        object.__setattr__(self, "limit", int(limit) if float(limit).is_integer() else float(limit))

    @classmethod
    def parse(cls, value: "str | dict | Budget") -> "Budget":
        """Accept ``{"epochs": 20}``, ``"epochs=20"`` or ``"20epochs"``."""
        if isinstance(value, Budget):
            return value
        if isinstance(value, dict):
            if len(value) != 1:
                raise UsageError(f"budget must name exactly one unit ({', '.join(UNITS)}), got {value!r}")
            (unit, limit), = value.items()
            return cls(unit, limit)
        text = str(value).strip().replace(" ", "")
        if text.count("=") > 1:  # "epochs=2 steps=3": two budgets
            raise UsageError(f"budget must name exactly one unit ({', '.join(UNITS)}), got {value!r}")
        if "=" in text:
            unit, num = text.split("=", 1)
        else:  # "20epochs", "1e3steps": the number, then the unit's letters
            match = re.fullmatch(r"([+-]?[0-9.]+(?:e[+-]?[0-9]+)?)([a-z]+)", text)
            num, unit = match.groups() if match else ("", "")
        if not num or not unit:
            raise UsageError(f"cannot parse budget {value!r} (expected e.g. epochs=20, steps=500, "
                             f"samples=100000, seconds=60)")
        return cls(unit, num)

    def as_dict(self) -> dict:
        return {self.unit: self.limit}

    def __str__(self) -> str:
        return f"{self.unit}={self.limit}"


@dataclass
class Usage:
    """What a run consumed; ``epochs`` counts fractional progress through the data."""

    epochs: float = 0.0
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0

    def fraction(self, budget: Budget) -> float:
        """Progress in [0, 1] towards the budget (drives the lr schedule)."""
        return min(1.0, getattr(self, budget.unit) / budget.limit)

    def exhausted(self, budget: Budget) -> bool:
        """Whether the budget is spent, up to float error relative to its limit (epochs accumulate as fractions),
        so that any positive budget, however small, trains at least one step."""
        return getattr(self, budget.unit) >= budget.limit * (1 - 1e-9)

    def as_dict(self) -> dict:
        return asdict(self)

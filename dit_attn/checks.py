"""Argument checks shared by modules that must not import each other."""
from __future__ import annotations

import math


def check_fraction(name: str, value) -> None:
    """A ValueError naming `name` unless `value` is a real number in [0, 1] (not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

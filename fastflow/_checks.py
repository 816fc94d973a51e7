"""Argument checks shared by the layers and operators: each returns the value, normalised, or
raises ``ValueError`` with a message that names the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

ON_FAIL = ("raise", "warn")


def int_at_least(value: Any, name: str, minimum: int) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def positive_int(value: Any, name: str) -> int:
    """An int (not a bool) ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def positive_float(value: Any, name: str) -> float:
    """A finite real number ``> 0``, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def non_negative_float(value: Any, name: str) -> float:
    """A finite real number ``>= 0``, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return value


def on_fail(value: Any) -> str:
    """What an iterative computation does when it does not converge: ``"raise"`` or ``"warn"``."""
    if value not in ON_FAIL:
        raise ValueError(f"on_fail must be one of {ON_FAIL}, got {value!r}")
    return value

"""How every verification compares numbers: a difference is within its tolerance only if it is finite.

`diff > tolerance` is False for NaN, so a check written that way passes a model whose outputs are all NaN.
Every stage's verification (export, merge, package) goes through `within`, and the differences it measures
through `max_abs_diff`, which is infinite when either side holds a non-finite value.
"""

from __future__ import annotations

import math

import numpy as np


def within(value: float, tolerance: float) -> bool:
    """Whether a measured difference is finite and at most `tolerance`."""
    return math.isfinite(value) and value <= tolerance


def finite(values) -> bool:
    """Whether every value of an array (or a number) is finite."""
    return bool(np.isfinite(np.asarray(values, dtype=np.float64)).all())


def max_abs_diff(a, b) -> float:
    """The largest absolute difference of two arrays of one shape; infinite if either holds NaN or infinity."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (finite(a) and finite(b)):
        return math.inf
    return float(np.abs(a - b).max(initial=0.0))


def describe(value: float) -> str:
    """A measured difference for a message: its value, or what it means when it is not finite."""
    return f"{value:.2e}" if math.isfinite(value) else "not finite (NaN or infinity in the outputs)"

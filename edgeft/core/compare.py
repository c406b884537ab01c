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


def weights_problem(expected: dict, arrays: dict) -> str | None:
    """What is wrong with `arrays` as a set of trainable tensors shaped as `expected` (name -> array or shape):
    missing or unknown names, another shape, a dtype that is not floating point, or a non-finite value; None
    when they fit. A fleet's server judges each client's update by it, and a client the global adapter."""
    missing, unknown = sorted(expected.keys() - arrays.keys()), sorted(arrays.keys() - expected.keys())
    if missing or unknown:
        parts = ([f"lacks {len(missing)} tensor(s) ({', '.join(missing[:3])})"] if missing else []) + \
                ([f"has {len(unknown)} unknown tensor(s) ({', '.join(unknown[:3])})"] if unknown else [])
        return " and ".join(parts)
    for name, want in expected.items():
        shape = tuple(getattr(want, "shape", want))
        got = np.asarray(arrays[name])
        if tuple(got.shape) != shape:
            return f"has {name} shaped {tuple(got.shape)}, not {shape}"
        if not np.issubdtype(got.dtype, np.floating):
            return f"has {name} of dtype {got.dtype}, not floating point"
        if not finite(got):
            return f"has NaN or infinite values in {name}"
    return None

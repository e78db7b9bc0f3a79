"""Argument and result checks shared by the scaling modules (pure Python and NumPy).

``scaling`` must import without JAX (``python -m scaling`` is arithmetic), so these checks
do not import it: a JAX tracer can only exist once JAX has been imported by the caller,
so it is recognised through ``sys.modules`` instead. Scalars and concrete arrays (a NumPy
grid of batch sizes, checked element-wise) raise a ``ValueError`` naming the argument,
the value and the valid interval, in the same words as ``optax_ext``'s checks; traced
values pass unchecked.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "check",
    "check_choice",
    "positive",
    "nonnegative",
    "beta",
    "finite_positive",
    "scalar",
    "single",
    "flag",
    "result",
    "is_traced",
]


def is_traced(value: Any) -> bool:
    """True for a JAX tracer (abstract value inside ``jit``); never imports JAX."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def _interval(low, high, low_open, high_open) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def check(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """Raises ``ValueError`` if a concrete ``value`` lies outside the interval.

    NaN is always rejected; so are values that are not numbers (strings, None, complex).
    Returns ``value`` so checks can be written inline.
    """
    if is_traced(value):
        return value
    if isinstance(value, bool | str | bytes | complex) or value is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    except Exception:  # a JAX array that cannot be made concrete: leave it unchecked
        return value
    bad = np.isnan(x)
    if low is not None:
        bad |= x <= low if low_open else x < low
    if high is not None:
        bad |= x >= high if high_open else x > high
    if np.any(bad):
        shown = repr(value) if x.ndim == 0 else f"{float(x[bad].flat[0])!r} (in an array)"
        raise ValueError(
            f"{name} must be in {_interval(low, high, low_open, high_open)}, got {shown}"
        )
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not isinstance(value, str | int | float) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {value!r}")
    return value


def positive(name: str, value: Any) -> Any:
    """Checks ``value`` > 0 (batch sizes, learning rates, noise scales); inf is allowed."""
    return check(name, value, 0.0, None, low_open=True)


def nonnegative(name: str, value: Any) -> Any:
    return check(name, value, 0.0, None)


def beta(name: str, value: Any) -> Any:
    """Checks an EMA/momentum coefficient lies in [0, 1)."""
    return check(name, value, 0.0, 1.0, high_open=True)


def finite_positive(name: str, value: Any) -> Any:
    check(name, value, 0.0, None, low_open=True)
    if not is_traced(value) and np.any(np.isinf(np.asarray(value, dtype=np.float64))):
        raise ValueError(f"{name} must be in (0, inf), got {value!r}")
    return value


def single(name: str, value: Any) -> float:
    """One real number (Python or NumPy scalar, 0-d array) as a float; NaN and inf pass.

    For arguments that cannot be arrays (the function returns one answer): a string,
    None, a bool or an array of several values raises ``ValueError`` naming ``name``,
    rather than NumPy's "only 0-dimensional arrays can be converted" or a silent default.
    """
    if isinstance(value, bool | np.bool_ | str | bytes | complex) or value is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        raw = np.asarray(value)
        if raw.dtype.kind not in "iufO":  # not bool, complex, strings, datetimes
            raise TypeError
        x = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if x.ndim != 0:
        raise ValueError(
            f"{name} must be a single number, got an array of shape {x.shape}; pass one "
            "value (call once per value for several)"
        )
    return float(x)


def flag(name: str, value: Any) -> bool:
    """A Python or NumPy bool, or a 0-d boolean array (a JAX scalar), as a bool.

    Anything else (``"no"``, 1, None) raises ``ValueError`` naming ``name``: a non-empty
    string would otherwise count as True.
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if hasattr(value, "dtype") and np.ndim(value) == 0:
        x = np.asarray(value)
        if x.dtype.kind == "b":
            return bool(x)
    raise ValueError(f"{name} must be a bool (True or False), got {value!r}")


def scalar(value: Any) -> Any:
    """Python float for 0-d inputs, the array otherwise (keeps results readable)."""
    if is_traced(value) or np.ndim(value) != 0:
        return value
    try:
        return float(value)
    except Exception:  # an abstract 0-d JAX value: keep it
        return value


def _show(inputs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in inputs.items())


def result(what: str, value: Any, inputs: dict[str, Any], *, positive: bool = True) -> Any:
    """Checks a computed scalar is finite (and > 0 with ``positive``), else ``ValueError``.

    Inputs that are each valid can still be too far apart for float64 (a batch ratio of
    1e600, an lr of 1e308 doubled): the answer would be ``inf``, ``nan`` or an underflowed
    0. That is reported as an error naming ``what`` and the inputs, never returned.
    Arrays and traced values pass unchecked (an array may mix good and bad entries).
    """
    if is_traced(value) or np.ndim(value) != 0:
        return value
    try:
        x = float(value)
    except Exception:
        return value
    if not math.isfinite(x) or (positive and not x > 0):
        raise ValueError(
            f"{what} is {x!r} for {_show(inputs)}: outside what float64 can represent; "
            "bring the inputs closer together"
        )
    return value


def arithmetic(what: str, inputs: dict[str, Any]) -> _Arithmetic:
    """Context manager turning ZeroDivisionError/OverflowError into :func:`result`'s error."""
    return _Arithmetic(what, inputs)


class _Arithmetic:
    def __init__(self, what, inputs):
        self.what, self.inputs = what, inputs

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, ZeroDivisionError | OverflowError):
            raise ValueError(
                f"{self.what} cannot be computed for {_show(self.inputs)} ({exc}): outside "
                "what float64 can represent; bring the inputs closer together"
            ) from None
        return False

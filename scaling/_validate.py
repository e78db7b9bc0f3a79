"""Argument checks shared by the scaling modules.

Scalars go through ``optax_ext._common.check_range`` (ValueError naming the argument, the
value and the valid interval). Concrete arrays (a NumPy grid of batch sizes) are checked
element-wise with the same message; traced values pass unchecked.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from optax_ext._common import check_range

#: ``check_range`` checks scalars and concrete arrays (element-wise) alike.
check = check_range


def positive(name: str, value: Any) -> Any:
    """Checks ``value`` > 0 (batch sizes, learning rates, noise scales)."""
    return check(name, value, 0.0, None, low_open=True)


def nonnegative(name: str, value: Any) -> Any:
    return check(name, value, 0.0, None)


def beta(name: str, value: Any) -> Any:
    """Checks an EMA/momentum coefficient lies in [0, 1)."""
    return check(name, value, 0.0, 1.0, high_open=True)


def finite_positive(name: str, value: Any) -> Any:
    check(name, value, 0.0, None, low_open=True)
    if np.ndim(value) == 0 and not isinstance(value, jax.core.Tracer):
        if math.isinf(float(value)):
            raise ValueError(f"{name} must be in (0, inf), got {value!r}")
    return value


def scalar(value: Any) -> Any:
    """Python float for 0-d inputs, the array otherwise (keeps results readable)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) == 0:
        try:
            return float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return value
    return value

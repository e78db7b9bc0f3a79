"""Learning-rate and weight-decay schedules from Su Jianlin's writing, as optax schedules.

Every function returns ``step -> value`` built from ``jnp`` operations: it can be passed
wherever optax takes a schedule (``learning_rate=``, ``optax.inject_hyperparams``) and is
traced under ``jit``. The step is optax's 0-based ``count``.

* :func:`piecewise_linear`: bert4keras's ``{step: multiplier}`` form.
* :func:`amos_lr_schedule`, :func:`amos_weight_decay_schedule`: the inverse-time
  decay that Su derives from Amos's reasoning (https://kexue.fm/archives/9344).
* :func:`constant_decay_lr_schedule`, :func:`coupled_decay_schedules`: Su's optimal
  schedules with weight decay (https://kexue.fm/archives/11459).

The ``scaling`` package has the same weight-decay formulas as plain functions of the
step for planning; these are the versions to train with.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import check_range

__all__ = [
    "DecaySchedules",
    "amos_lr_schedule",
    "amos_weight_decay_schedule",
    "constant_decay_lr_schedule",
    "coupled_decay_schedules",
    "piecewise_linear",
]


def _step(count: Any) -> jax.Array:
    # the default float dtype (float64 under x64): exact steps up to 2**24 in float32
    return jnp.asarray(count, dtype=float)


# -------------------------------------------------------------- piecewise linear


def piecewise_linear(points: Mapping[Any, Any], base: float = 1.0) -> optax.Schedule:
    r"""Su's piecewise-linear schedule: ``{step: multiplier}``, linear in between.

    The keys are sorted; if the first is not 0, the point ``(0, 0.0)`` is prepended (so
    ``{1000: 1.0}`` is a linear warm-up from 0); after the last key its value is held.
    The schedule returns ``base · multiplier(step)``, with the multiplier interpolated
    by ``jnp.interp``. Example ``{1000: 1, 2000: 0.1}``: 0 → 1 over steps [0, 1000],
    down to 0.1 at 2000, then 0.1 for ever.

    Args:
      points: mapping from step (a number ≥ 0) to multiplier (finite); not empty.
      base: finite value the multipliers scale, e.g. the peak learning rate.

    Returns:
      An optax schedule ``count -> base · multiplier``.

    Example:
      >>> sched = piecewise_linear({1000: 1.0, 2000: 0.1}, base=1e-3)
      >>> [round(float(sched(s)), 7) for s in (0, 500, 1000, 1500, 2000, 9000)]
      [0.0, 0.0005, 0.001, 0.00055, 0.0001, 0.0001]

    References:
      Su, https://kexue.fm/archives/7094 (bert4keras ``extend_with_piecewise_linear_lr``).
    """
    if not isinstance(points, Mapping):
        raise TypeError(f"points must be a mapping {{step: multiplier}}, got {points!r}")
    if not points:
        raise ValueError("points must not be empty: give at least one {step: multiplier}")
    items = []
    for step, value in points.items():
        if isinstance(step, bool) or not isinstance(step, numbers.Real):
            raise ValueError(f"piecewise_linear steps must be numbers, got the key {step!r}")
        check_range(f"piecewise_linear step {step!r}", step, 0)
        check_range(f"piecewise_linear multiplier at step {step!r}", value)
        items.append((float(step), float(value)))
    check_range("base", base)
    items.sort()
    if items[0][0] != 0.0:
        items.insert(0, (0.0, 0.0))
    xs = np.array([x for x, _ in items])
    ys = np.array([y for _, y in items])

    def schedule(count):
        t = _step(count)
        return base * jnp.interp(t, xs.astype(t.dtype), ys.astype(t.dtype))

    return schedule


# ------------------------------------------------------------------ Amos-derived


def amos_lr_schedule(alpha0: float, rho0: float) -> optax.Schedule:
    r"""Su's inverse-time learning rate from Amos's reasoning: :math:`\alpha_t =
    \alpha_0 / (2\alpha_0\rho_0 t + 1)`.

    The learning rate Su derives from Amos's analysis (spec: ``lr ∝ 1/(2α0ρ0t+1)``):
    an inverse-time decay with time constant ``1/(2α0ρ0)`` steps, to be paired with
    :func:`amos_weight_decay_schedule`. (Amos itself anneals through its accumulator
    ``b``; these schedules bring the same shape to optimizers that do not.)

    Args:
      alpha0: initial learning rate α0 > 0.
      rho0: initial weight decay per step ρ0 ≥ 0 (the fraction of θ removed per step;
        ``lr·λ`` for optax's ``adamw``).

    Returns:
      An optax schedule ``count -> α_t``.

    Example:
      >>> round(float(amos_lr_schedule(1e-2, 0.5)(100)), 9)  # 2·α0·ρ0·t = 1: half of α0
      0.005

    References:
      Su, https://kexue.fm/archives/9344; Tian & Parikh, https://arxiv.org/abs/2210.11693.
    """
    check_range("alpha0", alpha0, 0, low_open=True)
    check_range("rho0", rho0, 0)

    def schedule(count):
        return alpha0 / (2.0 * alpha0 * rho0 * _step(count) + 1.0)

    return schedule


def amos_weight_decay_schedule(alpha0: float, rho0: float) -> optax.Schedule:
    r"""The weight decay paired with :func:`amos_lr_schedule`: :math:`\rho_t =
    \rho_0 (\alpha_t/\alpha_0)^2 = \rho_0 / (2\alpha_0\rho_0 t + 1)^2`.

    The decay follows the square of the learning rate, so the equilibrium weight RMS
    ``q = α_t / sqrt(2ρ_t) = α0 / sqrt(2ρ0)`` stays put while both anneal (Amos's own
    decay, γ/2 ≈ ξ²/2, has the same square law).

    Args:
      alpha0: initial learning rate α0 > 0.
      rho0: initial weight decay per step ρ0 ≥ 0.

    Returns:
      An optax schedule ``count -> ρ_t``. ``optax.adamw`` multiplies its weight decay by
      the lr, so with it use ``λ_t = ρ_t/α_t`` (i.e. ``(ρ0/α0)·α_t/α0``).

    Example:
      >>> round(float(amos_weight_decay_schedule(1e-2, 0.5)(100)), 9)
      0.125

    References:
      Su, https://kexue.fm/archives/9344.
    """
    check_range("alpha0", alpha0, 0, low_open=True)
    check_range("rho0", rho0, 0)

    def schedule(count):
        return rho0 / jnp.square(2.0 * alpha0 * rho0 * _step(count) + 1.0)

    return schedule


# ------------------------------------------------ optimal schedules with decay


class DecaySchedules(NamedTuple):
    """A learning-rate schedule and the weight-decay schedule that goes with it."""

    learning_rate: optax.Schedule
    weight_decay: optax.Schedule


def constant_decay_lr_schedule(peak_lr: float, weight_decay: float) -> optax.Schedule:
    r"""Su's optimal learning rate under a constant (coupled) weight decay λ:
    :math:`\eta_s = \eta_{max} / (\lambda\eta_{max}s + 1)`.

    "Coupled" as in ``optax.adamw``: the step is ``-η_s (u + λθ)``.

    Args:
      peak_lr: η_max > 0.
      weight_decay: λ ≥ 0.

    Returns:
      An optax schedule ``count -> η_s``.

    Example:
      >>> round(float(constant_decay_lr_schedule(1e-3, 0.1)(10_000)), 9)
      0.0005

    References:
      Su, https://kexue.fm/archives/11459.
    """
    check_range("peak_lr", peak_lr, 0, low_open=True)
    check_range("weight_decay", weight_decay, 0)

    def schedule(count):
        return peak_lr / (weight_decay * peak_lr * _step(count) + 1.0)

    return schedule


def coupled_decay_schedules(peak_lr: float, peak_weight_decay: float) -> DecaySchedules:
    r"""Su's optimal schedules when the weight decay is scheduled with the lr,
    :math:`\lambda_s = (\lambda_{max}/\eta_{max})\,\eta_s`:

    .. math:: \eta_s = \frac{\eta_{max}}{\sqrt{2\lambda_{max}\eta_{max}s + 1}}

    Args:
      peak_lr: η_max > 0.
      peak_weight_decay: λ_max ≥ 0 (coupled, as ``optax.adamw``'s ``weight_decay``).

    Returns:
      :class:`DecaySchedules` ``(learning_rate, weight_decay)`` of optax schedules. Use
      them together, e.g. ``optax.inject_hyperparams(optax.adamw)(learning_rate=s.
      learning_rate, weight_decay=s.weight_decay)``.

    Example:
      >>> s = coupled_decay_schedules(1e-3, 0.1)
      >>> round(float(s.learning_rate(10_000)), 9), round(float(s.weight_decay(10_000)), 6)
      (0.00057735, 0.057735)

    References:
      Su, https://kexue.fm/archives/11459.
    """
    check_range("peak_lr", peak_lr, 0, low_open=True)
    check_range("peak_weight_decay", peak_weight_decay, 0)

    def learning_rate(count):
        return peak_lr * jax.lax.rsqrt(2.0 * peak_weight_decay * peak_lr * _step(count) + 1.0)

    def weight_decay(count):
        return (peak_weight_decay / peak_lr) * learning_rate(count)

    return DecaySchedules(learning_rate, weight_decay)

"""AdaX: Adam whose second moment accumulates, so its memory grows with training.

References: Li, Lan, Wang, Chen, "AdaX: Adaptive Gradient Descent with Exponential
Long Term Memory", https://arxiv.org/abs/2004.09740; Su Jianlin, "AdaX optimizer",
https://kexue.fm/archives/7387; https://github.com/bojone/adax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    canonical_dtype,
    check_choice,
    check_float_params,
    check_range,
    check_updates_match,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import reject_cycle_length
from optax_ext.optimizers._alias import alias_chain
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "ScaleByAdaxState",
    "adax",
    "adaxw",
    "scale_by_adax",
]


class ScaleByAdaxState(NamedTuple):
    """State of AdaX: step counter, first moment ``mu`` and normalised second moment ``nu``."""

    count: jax.Array  # int32, number of updates done
    mu: optax.Updates
    nu: optax.Updates


def adax_nu_weight(count: jax.Array, b2: Any) -> jax.Array:
    r"""Weight ``1 - β̂_τ = β2 / ((1+β2)^τ - 1)`` of the new ``g²`` at step τ = count + 1.

    Evaluated as ``β2 / expm1(τ·log1p(β2))``: the power ``(1+β2)^τ`` is never formed,
    so nothing overflows (for huge τ the weight underflows to 0, which is its value to
    working precision). At τ = 1 the weight is exactly 1 (``β̂_1 = 0``): the rounding
    of ``expm1(log1p(β2))`` is not allowed to leave a residue of the zero initial state.
    """
    # the default float dtype: float32, or float64 when x64 is enabled
    b2 = jnp.asarray(b2, float)
    tau = count.astype(b2.dtype) + 1.0
    weight = b2 / jnp.expm1(tau * jnp.log1p(b2))
    return jnp.where(count == 0, jnp.ones_like(weight), weight)


def scale_by_adax(
    b1: float = 0.9,
    b2: float = 1e-4,
    eps: float = 1e-6,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    *,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaX's direction: an un-debiased momentum over the root of a growing-memory average.

    With τ = t + 1 the 1-based step:

    .. math::

        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        \hat v &\leftarrow \hat\beta_\tau \hat v + (1-\hat\beta_\tau) g^2,\qquad
        \hat\beta_\tau = 1 - \frac{\beta_2}{(1+\beta_2)^\tau - 1}\quad(\hat\beta_1 = 0) \\
        u &= m / (\sqrt{\hat v} + \epsilon)

    This is the paper's ``v ← (1+β2) v + β2 g²``, ``v̂ = v / ((1+β2)^τ - 1)`` rewritten
    on the normalised ``v̂`` so that it never overflows, however long training runs.

    Where it differs from Adam:

    * ``m`` gets **no bias correction** (the paper drops it; early steps are smaller).
    * ``v̂`` is not an exponential moving average with a fixed horizon: ``β̂_τ`` rises
      toward 1 as τ grows (``1 - β̂_τ ≈ 1/τ`` while ``β2·τ ≪ 1``, then ≈ ``β2·(1+β2)^{-τ}``),
      so the second moment remembers ever more of the past and the effective step size
      stops oscillating with recent gradients. ``β2`` is therefore small (1e-4), not 0.999.

    Which AdaX: ``AdaX_V2`` of bojone/adax (its tf.keras class), ε added to the
    normalised ``√v̂``. Its ``AdaX_V1`` (plain Keras) folds the normalisation into the
    learning rate, ``lr·√((1+β2)^τ - 1)``, so its ε meets the un-normalised ``√v``: the
    same steps for ε = 0, and otherwise an ε that acts like ``ε/√((1+β2)^τ - 1)`` here
    (about 100ε at the first step with β2 = 1e-4, fading as τ grows).

    Args:
      b1: momentum coefficient β1 in [0, 1).
      b2: growth rate β2 > 0 of the second-moment memory (paper default 1e-4).
      eps: ε ≥ 0 added to ``sqrt(v̂)``.
      mu_dtype: dtype of the first moment (default: the params').
      nu_dtype: dtype of the second moment ``v̂`` (default: the params', as in
        ``optax.scale_by_adam``).
      state_rounding: ``"nearest"`` or ``"stochastic"``: how a bf16/f16 state is
        written (:func:`~optax_ext.wrappers.rounding.write_state`).
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose updates have the gradients' dtype.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_adax(), optax.scale(-1e-3))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([0.5, -2.0]), state)
      >>> [round(float(u), 8) for u in updates]  # step 1: m = 0.1 g, v̂ = g²: u ≈ 0.1·sign(g)
      [-0.0001, 0.0001]

    References:
      Li et al., `AdaX <https://arxiv.org/abs/2004.09740>`_, 2020;
      Su, `AdaX <https://kexue.fm/archives/7387>`_, 2020.
    """
    check_range("b1", b1, 0, 1, high_open=True, schedule=False)
    check_range("b2", b2, 0, low_open=True, schedule=False)
    check_range("eps", eps, 0, schedule=False)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)
    mu_dtype = canonical_dtype(mu_dtype)
    nu_dtype = canonical_dtype(nu_dtype)

    def init_fn(params):
        check_float_params(params, "adax")
        return ScaleByAdaxState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params, dtype=nu_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        reject_cycle_length(extra_args, "ox.adaxw")
        del extra_args
        check_updates_match(updates, params, "adax")
        w = adax_nu_weight(state.count, b2)

        def leaf(g, m, v):
            work = work_dtype(g)
            g = g.astype(work)
            m = b1 * m.astype(work) + (1.0 - b1) * g
            v = (1.0 - w) * v.astype(work) + w * jnp.square(g)
            return m / (jnp.sqrt(v) + eps), m, v

        out = jax.tree.map(leaf, updates, state.mu, state.nu)
        direction, mu, nu = unzip_leaves(updates, out, 3)
        new_updates = optax.tree.cast_like(direction, updates)
        write = lambda new, old, stream: write_state(
            new, old, state_rounding, rounding_seed, state.count, stream
        )
        mu, nu = write(mu, state.mu, 0), write(nu, state.nu, 1)
        count = optax.safe_increment(state.count)
        return new_updates, ScaleByAdaxState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adax(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 1e-4,
    eps: float = 1e-6,
    *,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The AdaX optimizer: ``θ ← θ - lr · m / (sqrt(v̂) + ε)``, the chain of
    :func:`scale_by_adax` and the learning rate.

    Args:
      learning_rate: a float or an optax schedule of the step (default 1e-3).
      b1, b2, eps, mu_dtype, nu_dtype, state_rounding, rounding_seed: the direction's,
        see :func:`scale_by_adax`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(3)}
      >>> tx = adax(1e-3)
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, 0.0, -1.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Li et al., `AdaX <https://arxiv.org/abs/2004.09740>`_, 2020.
    """
    direction = scale_by_adax(
        b1, b2, eps, mu_dtype, nu_dtype, state_rounding=state_rounding, rounding_seed=rounding_seed
    )
    return alias_chain(direction, learning_rate=learning_rate)


def adaxw(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 1e-4,
    eps: float = 1e-6,
    *,
    weight_decay: float = 1e-4,
    mask: Any = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaX with decoupled weight decay (multiplied by the learning rate, as ``optax.adamw``).

    .. math::

        \theta \leftarrow \theta - \mathrm{lr}_t\,\big(m/(\sqrt{\hat v}+\epsilon)
        + \lambda\,\mathrm{mask}\odot\theta\big)

    The chain of :func:`scale_by_adax`, ``optax.add_decayed_weights`` and the learning
    rate, as ``optax.adamw`` chains Adam's direction.

    Args:
      learning_rate: a float or an optax schedule of the step (default 1e-3).
      b1, b2, eps, mu_dtype, nu_dtype, state_rounding, rounding_seed: the direction's,
        see :func:`scale_by_adax`.
      weight_decay: λ ≥ 0; the step shrinks θ by ``lr·λ·θ``.
      mask: which leaves decay: a tree of booleans or a function of the params
        returning one. ``None`` (default) decays every leaf except biases and norm
        scales (``path_mask(exclude=NORM_AND_BIAS)``); ``True`` decays everything. With
        ``optax.inject_hyperparams`` give a callable mask in ``static_args=("mask",)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> tx = adaxw(1e-3, weight_decay=0.1)
      >>> state = tx.init(params)
      >>> zero = jax.tree.map(jnp.zeros_like, params)
      >>> updates, state = tx.update(zero, state, params)
      >>> round(float(updates["dense"]["kernel"][0, 0]), 10)  # -lr·λ·θ
      -0.0001
      >>> bool(jnp.all(updates["dense"]["bias"] == 0))  # biases are not decayed
      True

    References:
      Li et al., `AdaX <https://arxiv.org/abs/2004.09740>`_, 2020; Loshchilov & Hutter,
      `Decoupled weight decay <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
    direction = scale_by_adax(
        b1, b2, eps, mu_dtype, nu_dtype, state_rounding=state_rounding, rounding_seed=rounding_seed
    )
    return alias_chain(direction, learning_rate=learning_rate, weight_decay=weight_decay, mask=mask)

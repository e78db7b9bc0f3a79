"""An exponential moving average of the parameters, kept in the optimizer state.

References:
  Su Jianlin, https://kexue.fm/archives/7094 (bert4keras
  ``extend_with_exponential_moving_average``); Polyak & Juditsky, "Acceleration of
  stochastic approximation by averaging", SIAM J. Control Optim. 30(4), 1992.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import canonical_dtype, check_range, require_params

__all__ = ["ParamEMAState", "ema_params", "param_ema"]


class ParamEMAState(NamedTuple):
    """State of :func:`param_ema`."""

    count: jax.Array  # int32, steps averaged
    ema: Any  # the running average e (zero-initialised when debiased)
    weight: jax.Array  # Σ of the weights in e: 1 - Π μ_t when debiased, 1 otherwise


def _ema_dtype(param_dtype, ema_dtype):
    if ema_dtype is not None:
        return ema_dtype
    dtype = jnp.dtype(param_dtype)
    # bf16/f16 averages lose the (1-μ)·θ increments below their resolution (μ = 0.999
    # adds 0.1% per step; bf16 resolves 0.4%), so they are kept in float32.
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def param_ema(
    decay: float = 0.999,
    debias: bool = True,
    ema_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps an exponential moving average of the parameters *after* each update.

    Must be the LAST transform of a chain: it sees the final update ``u`` and the params
    θ, forms the new params exactly as ``optax.apply_updates`` will, and averages them;
    the updates pass through unchanged.

    .. math::

        \theta_{n} = \theta + u, \qquad e_n = \mu\, e_{n-1} + (1-\mu)\,\theta_n, \qquad
        \hat\theta^{\mathrm{EMA}}_n = e_n / (1 - \textstyle\prod_{i \le n} \mu_i)

    With ``debias=True`` (bert4keras's ``apply_ema_weights(bias_correction=True)``), e
    starts at 0 and is read back divided by its total weight ``w_n = μ w_{n-1} + (1-μ)``,
    i.e. ``1 - Π μ_i`` (``1 - μ^n`` for a constant μ). The weight is kept in the state and
    updated with the same rounded μ as e, so an injected or changing μ is corrected
    exactly, and the accessor needs no hyperparameters.
    With ``debias=False``, e starts as a copy of θ0 and is read back as is.
    Read the average with :func:`ema_params`.

    Args:
      decay: μ in [0, 1); may be injected with ``optax.inject_hyperparams``.
      debias: static; bias-corrected zero start (True) or start from θ0 (False).
      ema_dtype: dtype of the average. None: float32 for bfloat16/float16 params
        (their resolution is coarser than one step's (1-μ) increment), else the
        params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ParamEMAState`;
      ``update`` needs ``params`` (ValueError otherwise).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.param_ema import param_ema, ema_params
      >>> tx = optax.chain(optax.sgd(0.5), param_ema(decay=0.5))
      >>> params = jnp.array([1.0]); state = tx.init(params)
      >>> for _ in range(2):
      ...     u, state = tx.update(jnp.array([1.0]), state, params)
      ...     params = optax.apply_updates(params, u)
      >>> print(params, ema_params(state))  # θ: 0.5, 0.0 -> (0.25·0.5 + 0.5·0)/0.75
      [0.] [0.16666667]

    References:
      https://kexue.fm/archives/7094
    """
    check_range("decay", decay, 0.0, 1.0, high_open=True)
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a Python bool (it is static), got {debias!r}")
    ema_dtype = canonical_dtype(ema_dtype, "ema_dtype")

    def init_fn(params):
        def start(p):
            dtype = _ema_dtype(p.dtype, ema_dtype)
            return jnp.zeros_like(p, dtype) if debias else jnp.asarray(p, dtype)

        ema = jax.tree.map(start, params)
        weight_dtype = jnp.result_type(jnp.float32, *[e.dtype for e in jax.tree.leaves(ema)])
        return ParamEMAState(
            count=jnp.zeros([], jnp.int32),
            ema=ema,
            weight=jnp.asarray(0.0 if debias else 1.0, weight_dtype),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "param_ema", "it averages θ + update; place it last in a chain")

        def blend(e, new):
            mu = jnp.asarray(decay).astype(e.dtype)
            return mu * e + (1 - mu) * new

        def average(e, p, u):
            # Exactly the params the caller will hold after optax.apply_updates.
            new_p = optax.apply_updates(p, u).astype(e.dtype)
            if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize < e.dtype.itemsize:
                # XLA drops a down-cast followed by an up-cast inside one fusion; this
                # keeps the rounding to the params' dtype that apply_updates performs.
                fi = jnp.finfo(p.dtype)
                new_p = jax.lax.reduce_precision(new_p, fi.nexp, fi.nmant)
            return blend(e, new_p)

        ema = jax.tree.map(average, state.ema, params, updates)
        # Without debiasing the weight stays exactly 1 (e started as a copy of θ0).
        weight = blend(state.weight, jnp.ones_like(state.weight)) if debias else state.weight
        new_state = ParamEMAState(optax.safe_increment(state.count), ema, weight)
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_states(tree: Any) -> list[ParamEMAState]:
    is_state = lambda x: isinstance(x, ParamEMAState)
    return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def ema_params(opt_state: Any, params: Any = None) -> Any:
    """The averaged parameters held by the :func:`param_ema` inside an optimizer state.

    The state may be nested anywhere: in ``optax.chain``, ``optax.inject_hyperparams``,
    ``optax.MultiSteps``, ``optax.masked``, ``optax.partition``, or a Flax
    ``TrainState`` (pass ``state.opt_state`` or the train state itself).

    Args:
      opt_state: any pytree containing exactly one :class:`ParamEMAState`.
      params: optional current params. When given, the result has their dtypes, leaves
        the average does not track (masked out) are taken from ``params``, and before
        the first step (nothing averaged yet) the result is ``params``. Without it the
        result is in the average's dtype and is zero before the first debiased step.

    Returns:
      The (bias-corrected when ``debias=True``) average, a tree like the params.

    Raises:
      ValueError: no, or more than one, ``ParamEMAState`` in ``opt_state``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.param_ema import param_ema, ema_params
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> tx = optax.MultiSteps(optax.chain(tx, param_ema()), every_k_schedule=1)
      >>> params = jnp.ones(2); state = tx.init(params)
      >>> print(ema_params(state, params))
      [1. 1.]
    """
    found = _find_states(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"ema_params expects exactly one ParamEMAState (from optax_ext param_ema) in "
            f"the optimizer state, found {len(found)}"
            + ("; add param_ema() as the last transform of the chain" if not found else "")
        )
    state = found[0]
    # Before the first step the zero-started average is 0/0: report 0 (or params) instead.
    started = state.count > 0
    scale = jnp.where(started, state.weight, 1.0)

    def read(e):
        return e / scale.astype(e.dtype)

    average = jax.tree.map(read, state.ema)
    if params is None:
        return average

    is_masked = lambda x: isinstance(x, optax.MaskedNode)

    def merge(a, p):
        if is_masked(a):
            return p
        return jnp.where(started, a.astype(jnp.result_type(p)), p)

    return jax.tree.map(merge, average, params, is_leaf=is_masked)

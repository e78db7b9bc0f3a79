"""Lookahead with the slow weights in the optimizer state: plain params in and out.

References:
  Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back",
  https://arxiv.org/abs/1907.08610; Su Jianlin, https://kexue.fm/archives/6869
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_int, check_range, check_transform, require_params

__all__ = ["LookaheadState", "lookahead"]


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`."""

    count: jax.Array  # int32, fast steps taken
    inner_state: Any  # the fast (inner) optimizer's state
    slow: Any  # the slow weights, same tree, shapes and dtypes as the params


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    slow_step_size: float = 0.5,
) -> optax.GradientTransformationExtraArgs:
    r"""Lookahead around any optimizer, keeping the slow weights in the optimizer state.

    With fast weights θ (the params the model is trained and evaluated with between
    syncs), slow weights φ, k = ``sync_period`` and α = ``slow_step_size``, on step
    ``t`` (0-based) the inner optimizer proposes ``u`` and

    .. math::

        \theta' = \theta + u; \qquad
        \text{if } (t+1) \bmod k = 0:\quad
        \phi \leftarrow \phi + \alpha(\theta' - \phi),\quad \theta' \leftarrow \phi

    so the returned update is ``u`` on ordinary steps and ``φ_new - θ`` on sync steps.
    φ starts as a copy of θ0. (bert4keras's ``extend_with_lookahead`` zero-initialises
    the slow weights, which drags the first sync halfway to zero; we do not.)

    Sync timing: after inner steps k, 2k, 3k, ... (1-based), as ``optax.lookahead``.
    bert4keras tests ``iterations % k == 0`` on the Keras step counter inside the same
    update; whether that read sees the counter before or after Keras increments it is
    not pinned by a control dependency there, and read before it the syncs fall on
    steps 1, k + 1, 2k + 1, ..., the first one pulling θ to αθ with its zero slow
    weights. Our timing is the paper's (Zhang et al. 2019, algorithm 1).

    Unlike ``optax.lookahead``, which takes and returns ``optax.LookaheadParams`` (fast
    and slow), this transform takes plain params, so it drops into
    ``flax.training.train_state.TrainState`` unchanged; its params equal
    ``optax.lookahead``'s fast params step for step (to float rounding: on a sync step
    the update is ``φ' - θ``, so θ' lands on φ', where optax subtracts a correction
    from ``u``). Computing the update from φ' also lets XLA update the donated θ and φ
    in place in one pass each, with no copy of either. The sync is selected elementwise
    with ``jnp.where`` (no ``lax.cond``), so it behaves the same under ``jit``, ``pmap``
    and sharded ``jit``. The slow weights are at ``opt_state.slow`` (evaluate with them
    if you want the lookahead average between syncs; after a sync they equal θ).

    Args:
      inner: the fast optimizer (any optax transform; extra args are forwarded).
      sync_period: k, an int >= 1 (may be injected). k = 1 with α = 1 is the inner
        optimizer.
      slow_step_size: α in [0, 1]; may be injected with ``optax.inject_hyperparams``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`LookaheadState`;
      ``update`` needs ``params``. Apply its updates unmodified (e.g. do not chain
      anything after it), otherwise θ and φ fall out of step.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.lookahead import lookahead
      >>> tx = lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
      >>> params = jnp.array([1.0]); state = tx.init(params)
      >>> for _ in range(2):
      ...     u, state = tx.update(jnp.array([1.0]), state, params)
      ...     params = optax.apply_updates(params, u)
      >>> print(params, state.slow)  # fast went to 0.8, slow halfway: 0.9
      [0.9] [0.9]

    References:
      https://arxiv.org/abs/1907.08610; https://kexue.fm/archives/6869
    """
    check_transform("inner", inner)
    sync_period = check_int("sync_period", sync_period, 1)
    check_range("slow_step_size", slow_step_size, 0.0, 1.0)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return LookaheadState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            # An explicit copy: the state must not alias (and so block donation of) θ.
            slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "lookahead", "it moves them toward the slow weights")
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        sync = (state.count % sync_period) == (sync_period - 1)
        alpha = slow_step_size

        # φ' = φ + α(θ + u - φ), then on sync steps the update takes θ to φ' (θ' = φ').
        # The update is computed from φ' rather than from φ, so that XLA can write φ'
        # in place over the donated φ: a second pass over the old φ would force a copy.
        def slow_update(p, u, s):
            return jnp.where(sync, s + alpha * (p + u - s), s).astype(s.dtype)

        new_slow = jax.tree.map(slow_update, params, updates, state.slow)

        def fast_update(p, u, s_new):
            return jnp.where(sync, s_new - p, u).astype(u.dtype)

        new_updates = jax.tree.map(fast_update, params, updates, new_slow)
        count = optax.safe_increment(state.count)
        return new_updates, LookaheadState(count, inner_state, new_slow)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

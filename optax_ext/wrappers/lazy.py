"""Lazy updates: embedding rows that received no gradient do not move.

References:
  Su Jianlin, https://kexue.fm/archives/7094 (bert4keras
  ``extend_with_lazy_optimization``) and https://kexue.fm/archives/9736 (why sign
  optimizers such as Tiger/Lion need it for rare tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import EMBEDDING, check_transform, path_mask

__all__ = ["lazy", "touched_rows"]


def touched_rows(grad: jax.Array) -> jax.Array:
    """Boolean mask, broadcastable to ``grad``: True on the rows ``grad[i, ...]`` that
    hold at least one non-zero entry (for a 0-d leaf: whether it is non-zero)."""
    if grad.ndim == 0:
        return grad != 0
    return jnp.any(grad != 0, axis=tuple(range(1, grad.ndim)), keepdims=True)


def lazy(
    inner: optax.GradientTransformation,
    include: str | None = EMBEDDING,
) -> optax.GradientTransformationExtraArgs:
    r"""Freezes the rows of chosen parameters whose gradient is all zero.

    For every leaf whose ``/``-joined path matches ``include`` (``re.search``; default
    Flax ``embedding`` tables of shape ``(vocab, features)``), a *row* is ``x[i, ...]``,
    the slice at index i of axis 0 (one token's vector). With ``g`` the incoming
    gradient and ``u`` the inner optimizer's update:

    .. math::

        u'[i, \ldots] = \begin{cases} u[i, \ldots] & \text{if } g[i, \ldots] \ne 0
        \text{ somewhere} \\ 0 & \text{otherwise} \end{cases}

    Other leaves pass through. The inner optimizer still runs on the full gradient, so
    its state (momenta, counters) is exactly the non-lazy state: this is bert4keras's
    semantics. TensorFlow's ``LazyAdam`` differs: it also skips the moment updates of
    untouched rows (sparse updates), so their momentum neither decays nor is used until
    the row is touched again. Here the moments of an untouched row keep decaying while
    the row itself stays put; its pending momentum is applied, decayed, the next time
    the token appears. The point (kexue.fm/archives/9736): with Tiger/Lion, sign
    momentum and decoupled weight decay move every row of the table on every step, and
    rare tokens' rows drift; lazy updates move a row only when its token is in the batch.

    Put ``lazy`` around the whole optimizer (learning rate included), and feed it the
    gradients after the cross-device mean (a row touched on any device is touched).
    Untouched rows receive an update of ``-0.0``, so ``θ + u`` leaves them bit-identical.
    (bert4keras reduces over the last axis only, ``x[i, j, :]`` rows for a 3-D leaf; we
    take whole ``x[i, ...]`` slices, which is the same for 2-D tables.)

    Args:
      inner: any optax optimizer; its extra args are forwarded.
      include: regex on the path choosing the lazy leaves; ``None`` makes every leaf lazy.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is the inner state.

    Example:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from optax_ext.wrappers.lazy import lazy
      >>> tx = lazy(optax.adamw(0.1, weight_decay=0.1))
      >>> params = {"embed": {"embedding": jnp.ones((3, 2))}}
      >>> grads = {"embed": {"embedding": jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])}}
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)["embed"]["embedding"]
      >>> print(np.asarray(new, np.float64).round(3))  # only row 1 moved
      [[1.   1.  ]
       [0.89 0.99]
       [1.   1.  ]]

    References:
      https://kexue.fm/archives/7094; https://kexue.fm/archives/9736
    """
    check_transform("inner", inner)
    inner = optax.with_extra_args_support(inner)
    choose = path_mask(include=include)

    def update_fn(updates, state, params=None, **extra_args):
        grads = updates
        updates, state = inner.update(grads, state, params, **extra_args)

        def freeze(u, g, chosen):
            if not chosen:
                return u
            # -0.0 rather than 0.0: x + (-0.0) is x bit for bit, even for x = -0.0.
            return jnp.where(touched_rows(g), u, jnp.array(-0.0, u.dtype))

        return jax.tree.map(freeze, updates, grads, choose(grads)), state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

"""Layer adaptation (LAMB/LARS-style trust ratio) for any optimizer direction.

bert4keras's ``extend_with_layer_adaptation`` rescales each parameter's final step
``Δ = θ_new - θ`` by ``‖θ‖ / ‖Δ/lr‖``. Since ``Δ/lr`` is the direction with weight decay
already added, this is exactly ``optax.scale_by_trust_ratio()`` placed after weight
decay and before the learning rate; with Adam as the direction it is ``optax.lamb``.

References:
  Su Jianlin, https://kexue.fm/archives/7094; You et al., "Large Batch Optimization for
  Deep Learning: Training BERT in 76 minutes", https://arxiv.org/abs/1904.00962
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from optax_ext._common import check_range, check_transform, decay_mask, work_dtype

__all__ = ["layer_adapted"]


def layer_adapted(
    direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    *,
    adaptation_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer direction with weight decay, a per-leaf trust ratio and the lr.

    Per leaf, with ``d`` the direction's output (e.g. Adam's ``m̂/(√v̂+ε)``):

    .. math::

        u = d + \lambda\,\theta\,[\mathrm{mask}], \qquad
        r = \begin{cases} \|\theta\| / \|u\| & \|\theta\| > 0 \text{ and } \|u\| > 0 \\
                          1 & \text{otherwise} \end{cases}, \qquad
        \theta \leftarrow \theta - \eta_t\, r\, u

    This is bert4keras's ratio ``‖θ‖/‖Δ/lr‖`` of the final step ``Δ = -η u``. (bert4keras
    sets r = 1 when ``‖Δ/lr‖ <= 1e-7``; we, like optax, only when a norm is exactly 0.)
    With ``direction=optax.scale_by_adam(eps=1e-6)`` and ``mask=True`` this equals
    ``optax.lamb``. bert4keras keeps the step from vanishing with ``max(lr, 1e-7)`` in the
    ratio's denominator; here a zero norm gives the ratio 1 instead, as in optax.

    Args:
      direction: any optax transform producing a descent direction *before* the learning
        rate (``optax.scale_by_adam()``, ``optax.scale_by_lion()``, Tiger's
        ``scale_by_tiger``...). Not a full optimizer that already applies a learning rate.
      learning_rate: η, a number or a schedule.
      weight_decay: λ >= 0, added to the direction before the trust ratio (as in LAMB).
      mask: which leaves get weight decay, as in every alias here: None (the default
        rule: all but biases and norm scales, ``NORM_AND_BIAS``), True (all, like
        ``optax.lamb``'s default), a tree of bools or a callable of params.
      adaptation_mask: which leaves get the trust ratio (bert4keras's
        ``exclude_from_layer_adaptation``); same forms as ``mask``; None means all.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.layer_adaptation import layer_adapted
      >>> tx = layer_adapted(optax.scale_by_adam(eps=1e-6), learning_rate=0.1)
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> u, _ = tx.update({"w": jnp.array([1.0, -1.0])}, tx.init(params), params)
      >>> print(u["w"])  # ‖θ‖ = 5, ‖u‖ = √2: the step has norm 0.1·5
      [-0.3535534  0.3535534]

    References:
      https://kexue.fm/archives/7094; https://arxiv.org/abs/1904.00962
    """
    check_transform("direction", direction)
    check_range("weight_decay", weight_decay, 0.0)
    check_range("learning_rate", learning_rate, 0.0)
    trust = _in_float32(optax.scale_by_trust_ratio())
    if adaptation_mask is not None:
        trust = optax.masked(trust, adaptation_mask)
    return optax.chain(
        direction,
        optax.add_decayed_weights(weight_decay, decay_mask(mask)),
        trust,
        optax.scale_by_learning_rate(learning_rate),
    )


def _in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``tx`` on float32 (or wider) copies and returns updates in their own dtype:
    norms of float16 updates underflow (‖1e-4‖² is 0 in float16)."""
    up = lambda t: jax.tree.map(lambda x: x.astype(work_dtype(x)), t)

    def update(updates, state, params=None):
        out, state = tx.update(up(updates), state, None if params is None else up(params))
        return jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates), state

    return optax.GradientTransformation(tx.init, update)

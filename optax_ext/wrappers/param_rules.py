"""Per-parameter rules by path: masked weight decay and parameter-wise learning rates.

Both are bert4keras "derived optimizer" pieces (``extend_with_weight_decay``,
``extend_with_piecewise_linear_lr``'s sibling ``extend_with_parameter_wise_lr``)
expressed as optax transforms that choose parameters by regular expressions on their
``/``-joined paths (see :mod:`optax_ext._common`).

References:
  Su Jianlin, "Deriving optimizers in bert4keras", https://kexue.fm/archives/7094
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    NORM_AND_BIAS,
    PathRules,
    check_range,
    is_concrete_number,
    path_mask,
    path_multipliers,
)

__all__ = ["decay_weights", "scale_by_path"]


def decay_weights(
    weight_decay: optax.ScalarOrSchedule,
    exclude: str | None = NORM_AND_BIAS,
    include: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds ``weight_decay · θ`` to the updates of the parameters chosen by path rules.

    .. math::

        u \leftarrow u + \lambda\,\theta \quad \text{where } \mathrm{mask}(\text{path}),
        \qquad u \text{ unchanged elsewhere}

    The mask is True where the path matches ``include`` (every leaf when None) and does
    not match ``exclude``; the default excludes biases and LayerNorm/RMSNorm ``scale``,
    i.e. "no decay on bias and norm parameters". Placed before
    ``optax.scale_by_learning_rate`` it is bert4keras's decay ``θ -= lr_t·λ·θ``
    (decoupled from the adaptive direction, coupled to the learning rate, like AdamW).

    Args:
      weight_decay: λ >= 0, a number or a schedule of the step count.
      exclude: regex searched in each leaf's path; matching leaves get no decay.
        ``None`` excludes nothing.
      include: regex; only matching leaves may be decayed. ``None`` means all leaves.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (``optax.add_decayed_weights`` with a
      path mask); it needs ``params`` in ``update``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.param_rules import decay_weights
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> tx = optax.chain(optax.scale_by_adam(), decay_weights(0.5),
      ...                  optax.scale_by_learning_rate(1.0))
      >>> grads = {"dense": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> print(u["dense"]["bias"], u["dense"]["kernel"][0])  # bias: no decay
      [-0. -0.] [-0.5 -0.5]

    References:
      Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
      https://arxiv.org/abs/1711.05101; https://kexue.fm/archives/7094
    """
    check_range("weight_decay", weight_decay, 0.0)
    mask = None if include is None and exclude is None else path_mask(include, exclude)
    return optax.with_extra_args_support(optax.add_decayed_weights(weight_decay, mask=mask))


def _checked_rules(rules: PathRules) -> PathRules:
    items = list(rules.items()) if hasattr(rules, "items") else list(rules)
    for item in items:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(
                f"path rules must be a mapping {{regex: multiplier}} or (regex, multiplier) "
                f"pairs, got the item {item!r}"
            )
        pattern, value = item
        try:
            if isinstance(value, str) or not is_concrete_number(value):
                raise TypeError
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"the multiplier for pattern {pattern!r} must be a concrete number (it is "
                f"fixed per parameter at trace time), got {value!r}"
            ) from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(
                f"the multiplier for pattern {pattern!r} must be finite and >= 0, got {value!r}"
            )
    path_multipliers({}, items)  # compiles every regex: a bad one raises ValueError now
    return items


def scale_by_path(rules: PathRules) -> optax.GradientTransformationExtraArgs:
    r"""Parameter-wise learning rates: scales each leaf's update by path multipliers.

    .. math::

        u_{\text{leaf}} \leftarrow u_{\text{leaf}} \prod_{(p, m) \in \text{rules}:\
        p \text{ found in path}} m

    The multipliers of ALL matching patterns multiply (``re.search`` on the
    ``/``-joined path); leaves matching no pattern are left unchanged (× 1).
    bert4keras matches substrings; a plain word is a valid regex, so its rules carry
    over unchanged unless they contain regex metacharacters.

    Args:
      rules: ``{regex: multiplier}`` or a sequence of ``(regex, multiplier)`` pairs.
        Multipliers are concrete numbers, finite and >= 0.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``. Place it anywhere after the
      direction (before or after ``scale_by_learning_rate``: the product commutes).

    Raises:
      ValueError: a multiplier is negative or not finite (the message names its
        pattern), or a pattern is not a valid regex.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optax_ext.wrappers.param_rules import scale_by_path
      >>> tx = optax.chain(optax.sgd(0.1), scale_by_path({"embed": 5.0, "bias$": 0.5}))
      >>> params = {"embed": {"embedding": jnp.ones(2)}, "head": {"bias": jnp.ones(2)}}
      >>> u, _ = tx.update(params, tx.init(params))
      >>> print(u["embed"]["embedding"], u["head"]["bias"])
      [-0.5 -0.5] [-0.05 -0.05]

    References:
      https://kexue.fm/archives/7094 (bert4keras ``extend_with_parameter_wise_lr``)
    """
    items = _checked_rules(rules)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        multipliers = path_multipliers(updates, items)

        def scale(u, m):
            # A multiplier of exactly 1 is skipped so unmatched leaves stay bit-identical.
            return u if m == 1.0 else u * jnp.asarray(m, jnp.result_type(u))

        return jax.tree.map(scale, updates, multipliers), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)

"""The tail that an optimizer alias chains after its direction, as optax's aliases do.

optax writes each alias as ``optax.chain`` of a direction and shared pieces
(``optax/_src/alias.py``: ``adamw`` is ``scale_by_adam``, ``add_decayed_weights``,
``scale_by_learning_rate``). :func:`alias_chain` is that tail, written once, with the
learning rate and the weight decay checked when the alias is built.
"""

from __future__ import annotations

from typing import Any

import optax

from optax_ext._common import check_range, decay_mask

__all__ = ["alias_chain"]


def alias_chain(
    *direction: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""``optax.chain`` of the ``direction`` transforms, the decoupled weight decay and the
    learning rate:

    .. math:: \theta \leftarrow \theta - \mathrm{lr}_t\,(u + \lambda\,\mathrm{mask}\odot\theta)

    with u the output of ``direction``. ``weight_decay=None`` leaves the decay out of the
    chain (an alias without one); ``mask`` is the aliases' weight-decay mask
    (:func:`optax_ext._common.decay_mask`: ``None`` spares biases and norm scales).

    Raises:
      ValueError: ``learning_rate`` or ``weight_decay`` is a number below 0 (or NaN).
    """
    check_range("learning_rate", learning_rate, 0)
    parts = list(direction)
    if weight_decay is not None:
        check_range("weight_decay", weight_decay, 0)
        parts.append(optax.add_decayed_weights(weight_decay, decay_mask(mask)))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)

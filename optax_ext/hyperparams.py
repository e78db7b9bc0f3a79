"""``inject_hyperparams`` whose schedules count parameter updates, not micro-steps.

``optax.inject_hyperparams`` evaluates every schedule at its own counter, which steps on
every call to ``update``. Tiger and SGDM accumulate ``accumulation_steps = k``
micro-batches inside their momentum, so they are called k times per parameter update,
and a schedule handed to optax's wrapper would advance k times too fast (silently: a
warm-up of 1000 updates would end after 250 with k = 4). Their own schedule arguments
already count updates; this wrapper makes injected ones do the same.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import optax

from optax_ext._common import check_int

__all__ = ["inject_hyperparams"]


def inject_hyperparams(
    inner_factory: Callable[..., optax.GradientTransformation],
    static_args: str | Sequence[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` that reads schedules by update for accumulating aliases.

    For a factory called with ``accumulation_steps = k`` (which must then be in
    ``static_args``: the number of micro-steps per update is structure, not a value),
    each schedule ``s`` is read as ``s(count // k)``, where ``count`` is optax's
    micro-step counter, so it advances once per parameter update like the alias's own
    schedules. Without ``accumulation_steps`` (or with k = 1) this is exactly
    ``optax.inject_hyperparams``; an optimizer wrapped in ``accumulate_gradients``
    already sees one call per update and needs nothing.

    Example:
      >>> import optax, optax_ext as ox
      >>> tx = ox.inject_hyperparams(ox.tiger, static_args=("accumulation_steps",))(
      ...     learning_rate=optax.linear_schedule(1e-3, 0.0, 1000), accumulation_steps=4)

    Raises:
      ValueError: ``accumulation_steps`` is a schedule, or k > 1 is not static.
    """
    static = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    injected = optax.inject_hyperparams(inner_factory, static, hyperparam_dtype)
    signature = inspect.signature(inner_factory)

    @functools.wraps(inner_factory)
    def factory(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        default = signature.parameters.get("accumulation_steps")
        k = arguments.get("accumulation_steps", 1 if default is None else default.default)
        if callable(k):
            raise ValueError(
                "accumulation_steps cannot be a schedule under inject_hyperparams: the "
                "micro-steps per update are structure (change it by building a new optimizer)"
            )
        check_int("accumulation_steps", k)
        if k != 1 and "accumulation_steps" not in static:
            raise ValueError(
                f"accumulation_steps={k} must be static: write "
                "ox.inject_hyperparams(factory, static_args=('accumulation_steps',))"
            )
        if k > 1:
            arguments = {
                name: _per_update(value, k) if callable(value) and name not in static else value
                for name, value in arguments.items()
            }
        return injected(**arguments)

    return factory


def _per_update(schedule: Callable[[Any], Any], k: int) -> Callable[[Any], Any]:
    return lambda count: schedule(count // k)

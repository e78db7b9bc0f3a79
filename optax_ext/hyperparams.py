"""``inject_hyperparams`` whose schedules count parameter updates, not micro-steps.

``optax.inject_hyperparams`` evaluates every schedule at its own counter, which steps on
every call to ``update``. Tiger and SGDM accumulate ``accumulation_steps = k``
micro-batches inside their momentum, so they are called k times per parameter update,
and a schedule handed to optax's wrapper would advance k times too fast (silently: a
warm-up of 1000 updates would end after 250 with k = 4); they refuse optax's wrapper
while accumulating. Their own schedule arguments count updates; this wrapper makes
injected ones do the same, by reading the very counter the optimizer's own schedules
read, so the two cannot drift apart even when ``set_accumulation_steps`` changes k.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_int
from optax_ext._cycles import SET_ACCUMULATION_STEPS, find_counters, per_update_injection

__all__ = ["inject_hyperparams"]

#: the update index the schedules of the running ``update`` read (None outside one)
_UPDATE_INDEX: contextvars.ContextVar[Any] = contextvars.ContextVar("update_index", default=None)


@contextlib.contextmanager
def _reading(index: Any) -> Iterator[None]:
    token = _UPDATE_INDEX.set(index)
    try:
        yield
    finally:
        _UPDATE_INDEX.reset(token)


class _ByUpdate(optax.schedules.WrappedSchedule):
    """A schedule read at the update index :func:`inject_hyperparams` hands it.

    Its state is optax's ``WrappedScheduleState`` (a call counter), so the wrapper's
    state has optax's structure; the counter is read only outside an update of the
    wrapper (where there is no other index).
    """

    def __call__(self, state: Any, **extra_args: Any) -> Any:
        del extra_args
        index = _UPDATE_INDEX.get()
        return self.schedule_fn(state.count if index is None else index)


def inject_hyperparams(
    inner_factory: Callable[..., optax.GradientTransformation],
    static_args: str | Sequence[str] = (),
    hyperparam_dtype: Any = None,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """``optax.inject_hyperparams`` whose schedules are read by update while accumulating.

    Each schedule ``s`` (a plain callable passed for a hyperparameter not in
    ``static_args``) is read as ``s(n)``, with ``n`` the number of parameter updates the
    wrapped optimizer has made: the ``updates`` counter of the first accumulating state
    inside it (Tiger's, SGDM's, ``accumulate_gradients``' ``gradient_step``, or
    ``optax.MultiSteps``'), the very index its own schedule arguments read. So an
    injected schedule advances once per parameter update, also when
    ``set_accumulation_steps`` changes the cycle length, and ``hyperparams`` in the state
    holds the value the update used. Where nothing inside accumulates, ``n`` is the call
    count (divided by a static ``accumulation_steps`` k if the factory takes one): then
    this is exactly ``optax.inject_hyperparams``. ``optax.StatefulSchedule`` objects are
    passed through as they are (they keep their own counting). An optimizer wrapped in
    ``accumulate_gradients`` already sees one call per update and needs nothing.

    A factory called with ``accumulation_steps = k`` must list it in ``static_args``:
    the number of micro-steps per update is structure, not a value (change it during
    training with ``set_accumulation_steps``).

    Example:
      >>> import optax, optax_ext as ox
      >>> tx = ox.inject_hyperparams(ox.tiger, static_args=("accumulation_steps",))(
      ...     learning_rate=optax.linear_schedule(1e-3, 0.0, 1000), accumulation_steps=4)

    Raises:
      ValueError: ``accumulation_steps`` is a schedule, or k > 1 is not static;
        ``set_accumulation_steps`` is passed to ``update`` but nothing inside keeps
        accumulation counters.
    """
    static = (static_args,) if isinstance(static_args, str) else tuple(static_args)
    signature = inspect.signature(inner_factory)

    @functools.wraps(inner_factory)
    def build(*args, **kwargs):
        # optimizers built here know their schedules are read by update (see
        # _cycles.check_not_injected, which refuses optax's wrapper while accumulating)
        with per_update_injection():
            return inner_factory(*args, **kwargs)

    injected = optax.inject_hyperparams(build, static, hyperparam_dtype)
    name = getattr(inner_factory, "__name__", "the factory")

    @functools.wraps(inner_factory)
    def factory(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        default = signature.parameters.get("accumulation_steps")
        k = arguments.get("accumulation_steps", 1 if default is None else default.default)
        if callable(k):
            raise ValueError(
                "accumulation_steps cannot be a schedule under inject_hyperparams: the "
                "micro-steps per update are structure (change it during training with "
                "set_accumulation_steps=k in update)"
            )
        check_int("accumulation_steps", k)
        if k != 1 and "accumulation_steps" not in static:
            raise ValueError(
                f"accumulation_steps={k} must be static: write "
                "ox.inject_hyperparams(factory, static_args=('accumulation_steps',))"
            )
        arguments = {
            arg: _by_update(value) if arg not in static else value
            for arg, value in arguments.items()
        }
        tx = injected(**arguments)

        def init_fn(params):
            with _reading(jnp.zeros([], jnp.int32)):
                return tx.init(params)

        def update_fn(updates, state, params=None, **extra_args):
            counters = find_counters(state.inner_state)
            if counters is not None:
                index = counters.updates
            elif extra_args.get(SET_ACCUMULATION_STEPS) is not None:
                raise ValueError(
                    f"{SET_ACCUMULATION_STEPS} was passed, but nothing in {name}'s state "
                    "keeps accumulation counters, so ox.inject_hyperparams cannot read "
                    "its schedules by update: accumulate with ox.tiger, ox.sgdm or "
                    "ox.accumulate_gradients"
                )
            else:
                index = state.count // k if k > 1 else state.count
            with _reading(index):
                return tx.update(updates, state, params, **extra_args)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    return factory


def _by_update(value: Any) -> Any:
    """A plain schedule as a :class:`_ByUpdate`; anything else unchanged."""
    if isinstance(value, bool | jax.Array) or not callable(value):
        return value
    if isinstance(value, optax.schedules.StatefulSchedule):
        return value
    return _ByUpdate(value)

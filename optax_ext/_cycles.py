"""Accumulation cycles whose length may change during training, without recompiling.

An optimizer that accumulates ``k`` micro-batches per parameter update (Tiger's and
SGDM's momentum, :func:`~optax_ext.wrappers.accumulation.accumulate_gradients`) walks
through cycles of ``k`` micro-steps. With a constant ``k`` the position in the cycle is
``count % k`` and the update index ``count // k``; a batch-size warm-up changes ``k``
between cycles, and then both must be counted. Three int32 scalars in the state do it:

- ``micro_step``: micro-steps already taken in the current cycle (0 at its start);
- ``cycle_length``: the cycle's ``k``, fixed at its first micro-step;
- ``updates``: cycles completed, the index by which schedules are read.

A new length is asked for through the update's extra arguments,
``tx.update(grads, state, params, set_accumulation_steps=k)`` (a Python int or an int32
array, so a jitted step compiles once), passed on every micro-step; a new value takes
effect at the next cycle's first micro-step (at once if a cycle is starting), and the
running cycle keeps the length it started with. Without the argument the constructor's
``accumulation_steps`` holds. All replicas must pass the same value.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_int, is_static_int

__all__ = [
    "SET_ACCUMULATION_STEPS",
    "Cycle",
    "counters_init",
    "cycle_length",
    "current_cycle",
    "next_counters",
]

#: the extra-args key that sets the length of the next accumulation cycle
SET_ACCUMULATION_STEPS = "set_accumulation_steps"


class Cycle(NamedTuple):
    """Where a micro-step sits in its accumulation cycle.

    ``first`` and ``last`` are Python ``True`` when every cycle is one micro-step long
    (so the single-step program has no selects); ``k`` is the cycle's length (a Python
    int, or an int32 array when it may change); ``update`` the index of the parameter
    update the cycle makes (int32).
    """

    first: Any
    last: Any
    k: Any
    update: jax.Array


def counters_init(k: int) -> dict[str, jax.Array]:
    """The three counters of a fresh state, for a state's ``__init__`` keywords."""
    # a fresh array per counter: a donated state must not hold one buffer twice
    return dict(
        micro_step=jnp.zeros([], jnp.int32),
        cycle_length=jnp.full([], k, jnp.int32),
        updates=jnp.zeros([], jnp.int32),
    )


def current_cycle(k: int, state: Any, extra_args: dict[str, Any]) -> Cycle:
    """The cycle of this micro-step, from the state's counters and the extra arguments.

    ``k`` is the constructor's ``accumulation_steps``, used while no length is passed:
    the program (and its arithmetic, ``1/k`` as a Python number) is then the one of a
    constant ``k``. Once a length is passed it must be passed on every micro-step.
    """
    asked = extra_args.get(SET_ACCUMULATION_STEPS)
    if asked is None:
        if is_static_int(k, 1):
            return Cycle(True, True, 1, state.updates)
        return Cycle(state.micro_step == 0, state.micro_step + 1 >= k, k, state.updates)
    length = cycle_length(asked, state.micro_step, state.cycle_length)
    return Cycle(state.micro_step == 0, state.micro_step + 1 >= length, length, state.updates)


def cycle_length(asked: Any, micro_step: jax.Array, running: jax.Array) -> jax.Array:
    """The asked length if a cycle starts at this micro-step, else the running cycle's."""
    if not isinstance(asked, jax.Array | jax.core.Tracer):
        check_int(SET_ACCUMULATION_STEPS, asked)
    asked = jnp.maximum(jnp.asarray(asked, jnp.int32), 1)
    return jnp.where(micro_step == 0, asked, running)


def next_counters(cycle: Cycle, state: Any) -> dict[str, jax.Array]:
    """The counters after this micro-step, as keywords of the new state."""
    updates = optax.safe_increment(state.updates)
    if cycle.last is True:
        return dict(micro_step=state.micro_step, cycle_length=state.cycle_length, updates=updates)
    length = state.cycle_length if isinstance(cycle.k, int) else cycle.k
    return dict(
        micro_step=jnp.where(cycle.last, 0, state.micro_step + 1).astype(jnp.int32),
        cycle_length=jnp.asarray(length, jnp.int32),
        updates=jnp.where(cycle.last, updates, state.updates),
    )

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

The counters in the optimizer's state are the one record of the cycle: wrappers that
must know where a micro-step sits (:func:`~optax_ext.hyperparams.inject_hyperparams`
reading schedules by update, :func:`~optax_ext.wrappers.qk_clip.qk_clip` clipping once
per update) read them with :func:`find_counters` instead of counting on their own.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import check_int, is_static_int, schedule_value

__all__ = [
    "SET_ACCUMULATION_STEPS",
    "MAX_CYCLE_LENGTH",
    "Cycle",
    "Counters",
    "counters_init",
    "check_accumulation_steps",
    "cycle_length",
    "current_cycle",
    "next_counters",
    "find_counters",
    "reject_cycle_length",
    "check_not_injected",
    "refuse_injected_cycles",
    "per_update_injection",
    "selected_by_accumulation",
    "inside_selecting_accumulation",
    "ACCUMULATION_CYCLE",
    "add_update_decayed_weights",
    "scale_by_update_learning_rate",
    "sharing_the_cycle",
]

#: the extra-args key that sets the length of the next accumulation cycle
SET_ACCUMULATION_STEPS = "set_accumulation_steps"
#: the longest cycle the int32 counters hold
MAX_CYCLE_LENGTH = int(np.iinfo(np.int32).max)


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


def check_accumulation_steps(value: Any, name: str = "accumulation_steps") -> Any:
    """A constructor's ``accumulation_steps``: an int in [1, 2**31 - 1] (the counters are
    int32), or a traced value (``optax.inject_hyperparams``), which passes unchecked."""
    check_int(name, value)
    if not isinstance(value, jax.core.Tracer) and int(value) > MAX_CYCLE_LENGTH:
        raise ValueError(
            f"{name} must be an int in [1, {MAX_CYCLE_LENGTH}] (the cycle counters are "
            f"int32), got {value!r}"
        )
    return value


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
    """The asked length if a cycle starts at this micro-step, else the running cycle's.

    A concrete ``asked`` (a Python or NumPy int, a concrete JAX array) must be an integer
    scalar in [1, 2**31 - 1]: anything else raises a ``ValueError`` (or ``TypeError`` for
    a non-integer type) naming ``set_accumulation_steps``, exactly as a Python int does.
    A traced one (the usual case inside a jitted step) must have an integer dtype and
    shape ``()``, checked when the step is traced; its value cannot be checked then, so
    it is clamped into [1, 2**31 - 1] before the int32 cast (0 or a negative length acts
    as 1, a length beyond the int32 range as 2**31 - 1, never a wrapped-around one).
    Validate it before it enters the jitted step.
    """
    if isinstance(asked, jax.core.Tracer):
        _check_length_type(asked, np.shape(asked), asked.dtype)
    else:
        asked = _concrete_length(asked)
    # clamp before the cast: an int64 length (x64) must not wrap around into int32
    asked = jnp.clip(asked, 1, MAX_CYCLE_LENGTH).astype(jnp.int32)
    return jnp.where(micro_step == 0, asked, running)


def _check_length_type(value: Any, shape: tuple[int, ...], dtype: Any) -> None:
    if shape != ():
        raise ValueError(
            f"{SET_ACCUMULATION_STEPS} must be one int (the micro-batches of the next "
            f"cycle), got an array of shape {shape}"
        )
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        raise TypeError(
            f"{SET_ACCUMULATION_STEPS} must be an int (the micro-batches of the next "
            f"cycle), got {value!r} of dtype {dtype}"
        )


def _concrete_length(asked: Any) -> int:
    """A concrete length checked like a Python int, as a Python int."""
    if isinstance(asked, bool | np.bool_) or isinstance(asked, str | bytes):
        raise TypeError(f"{SET_ACCUMULATION_STEPS} must be an int, got {asked!r}")
    if isinstance(asked, int):
        value = asked
    else:
        try:
            array = np.asarray(asked)
        except (TypeError, ValueError):
            raise TypeError(f"{SET_ACCUMULATION_STEPS} must be an int, got {asked!r}") from None
        _check_length_type(asked, array.shape, array.dtype)
        value = int(array)
    if not 1 <= value <= MAX_CYCLE_LENGTH:
        raise ValueError(
            f"{SET_ACCUMULATION_STEPS} must be an int in [1, {MAX_CYCLE_LENGTH}] (the "
            f"micro-batches of the next cycle), got {asked!r}"
        )
    return value


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


# ------------------------------------------------------------ reading the cycle


class Counters(NamedTuple):
    """An accumulating state's position: ``micro_step`` (micro-steps taken in the
    running cycle, 0 at a cycle's start) and ``updates`` (parameter updates made, the
    index schedules are read by)."""

    micro_step: jax.Array
    updates: jax.Array


#: (micro-step field, update field) of the states that accumulate: Tiger's and SGDM's
#: (this module's counters), ``accumulate_gradients``' and ``optax.MultiSteps``'
_COUNTER_FIELDS = (("micro_step", "updates"), ("mini_step", "gradient_step"))


def _counters_of(node: Any) -> Counters | None:
    fields = getattr(node, "_fields", None)
    if not isinstance(node, tuple) or fields is None:
        return None
    for micro, update in _COUNTER_FIELDS:
        if micro in fields and update in fields:
            return Counters(getattr(node, micro), getattr(node, update))
    return None


def find_counters(state: Any) -> Counters | None:
    """The counters of the outermost accumulating state in ``state`` (the first one in
    pre-order: an ``accumulate_gradients`` around Tiger is found before Tiger), or None
    when nothing in it accumulates."""
    is_holder = lambda node: _counters_of(node) is not None
    for node in jax.tree.leaves(state, is_leaf=is_holder):
        if is_holder(node):
            return _counters_of(node)
    return None


def reject_cycle_length(extra_args: dict[str, Any], name: str) -> None:
    """Raises if ``set_accumulation_steps`` reaches an optimizer that updates on every
    call: it would be ignored, and the parameters would move on every micro-step."""
    if extra_args.get(SET_ACCUMULATION_STEPS) is not None:
        raise ValueError(
            f"{SET_ACCUMULATION_STEPS} was passed to {name}, which does not accumulate "
            f"micro-batches (it updates on every call, so the argument would be ignored): "
            f"wrap it, ox.accumulate_gradients({name}(...), accumulation_steps=k), and "
            f"pass {SET_ACCUMULATION_STEPS} to that"
        )


# ------------------------------------------------- wrappers that read the cycle

_PER_UPDATE_INJECTION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "per_update_injection", default=False
)
_SELECTING_ACCUMULATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "selecting_accumulation", default=False
)


@contextlib.contextmanager
def per_update_injection() -> Iterator[None]:
    """Marks optimizers built inside as built by ``ox.inject_hyperparams``, which reads
    their schedules by update (see :func:`check_not_injected`)."""
    token = _PER_UPDATE_INJECTION.set(True)
    try:
        yield
    finally:
        _PER_UPDATE_INJECTION.reset(token)


@contextlib.contextmanager
def selected_by_accumulation() -> Iterator[None]:
    """Marks the transforms updated inside as run by ``accumulate_gradients`` on every
    micro-step, their new state kept only on a cycle's last one."""
    token = _SELECTING_ACCUMULATION.set(True)
    try:
        yield
    finally:
        _SELECTING_ACCUMULATION.reset(token)


def inside_selecting_accumulation() -> bool:
    """Whether this update runs inside :func:`selected_by_accumulation`."""
    return _SELECTING_ACCUMULATION.get()


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array | jax.core.Tracer)


def check_not_injected(name: str, k: Any, **hyperparams: Any) -> bool:
    """Raises if an accumulating optimizer gets injected hyperparameters from a wrapper
    that reads schedules per micro-step; returns whether any hyperparameter is an array.

    ``optax.inject_hyperparams`` evaluates its schedules at its own counter, one step per
    call, and hands the values in as arrays: with k micro-steps per update a schedule
    would run k times too fast, silently. The values alone cannot tell a schedule from a
    constant, so with ``accumulation_steps`` other than 1 any array hyperparameter is
    refused unless ``ox.inject_hyperparams`` (which reads schedules by update) built the
    optimizer. A traced ``accumulation_steps`` (optax's wrapper without ``static_args``,
    under ``jit``) cannot be compared with 1: it is refused too, since any k > 1 would
    run the injected schedules k times too fast. The returned flag lets ``update``
    refuse a later ``set_accumulation_steps``.
    """
    if _PER_UPDATE_INJECTION.get():
        return False
    injected = sorted(n for n, v in hyperparams.items() if _is_array(v))
    if _is_array(k):
        injected = ["accumulation_steps", *injected]
    if not injected:
        return False
    if isinstance(k, jax.core.Tracer):
        # optax's wrapper under jit: k's value is unknown here, and schedules would be
        # read per micro-step whatever it is
        raise ValueError(_injected_message(name, injected, "a traced accumulation_steps"))
    if int(np.asarray(k)) != 1:
        raise ValueError(
            _injected_message(name, injected, f"accumulation_steps={int(np.asarray(k))}")
        )
    return True


def refuse_injected_cycles(injected: bool, name: str, extra_args: dict[str, Any]) -> None:
    """``update``'s half of :func:`check_not_injected`: an optimizer built with
    injected hyperparameters by optax's wrapper cannot take ``set_accumulation_steps``."""
    if injected and extra_args.get(SET_ACCUMULATION_STEPS) is not None:
        raise ValueError(
            _injected_message(name, ["hyperparameters"], f"{SET_ACCUMULATION_STEPS}=...")
        )


def _injected_message(name: str, injected: list[str], accumulating: str) -> str:
    return (
        f"{name} got {', '.join(injected)} as arrays (as optax.inject_hyperparams injects "
        f"them) with {accumulating}: optax's wrapper reads schedules once per micro-step, "
        f"k times too fast while accumulating; use ox.inject_hyperparams({name}, "
        f"static_args=('accumulation_steps',)), which reads them by update (or pass "
        f"Python numbers and schedules to {name} directly)"
    )


# ------------------------------------------ the tail of an accumulating alias

#: the extra-args key through which :func:`sharing_the_cycle` hands the direction's
#: cycle (a :class:`Cycle`) to the pieces chained after it
ACCUMULATION_CYCLE = "accumulation_cycle"


def sharing_the_cycle(
    k: Any, direction: optax.GradientTransformation, *pieces: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(direction, *pieces)`` with the direction's current :class:`Cycle`
    handed to every member as the extra argument ``accumulation_cycle``.

    The direction's state (the chain's first) holds this module's counters and is the
    one record of the cycle; the pieces after it (:func:`scale_by_update_learning_rate`,
    :func:`add_update_decayed_weights`) read their schedules by update and hold still
    between updates without counting on their own. ``k`` is the direction's
    ``accumulation_steps``."""
    tx = optax.with_extra_args_support(optax.chain(direction, *pieces))

    def update_fn(updates, state, params=None, **extra_args):
        cycle = current_cycle(k, state[0], extra_args)
        return tx.update(updates, state, params, **extra_args, **{ACCUMULATION_CYCLE: cycle})

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _read_by_update(name: str, leaf_rule: Any) -> optax.GradientTransformationExtraArgs:
    """A stateless piece of an accumulating chain: ``leaf_rule(cycle)`` returns the
    function ``(u, p) -> output`` applied to each leaf on that micro-step, the cycle
    handed in by :func:`sharing_the_cycle`."""

    def update_fn(updates, state, params=None, **extra_args):
        cycle = extra_args.get(ACCUMULATION_CYCLE)
        if cycle is None:
            raise ValueError(
                f"{name} reads the accumulation cycle of the direction before it: chain "
                f"them in sharing_the_cycle(k, direction, ..., {name}(...))"
            )
        leaf = leaf_rule(cycle)
        if params is None:
            return jax.tree.map(lambda u: leaf(u, None), updates), state
        return jax.tree.map(leaf, updates, params), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def scale_by_update_learning_rate(
    learning_rate: Any, *, zero_held: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Multiplies by ``-learning_rate(update)``: ``optax.scale_by_learning_rate`` for an
    optimizer that accumulates micro-steps, its schedule read by update (the optax
    convention) at the cycle of the direction before it (:func:`sharing_the_cycle`,
    ``set_accumulation_steps`` included).

    ``zero_held=False``: the direction emits zeros on the micro-steps that do not end a
    cycle, and nothing between it and this piece adds to them (SGDM). ``zero_held=True``
    zeroes those micro-steps' updates here, for a chain that adds a term in between
    (Tiger's weight decay): the parameters then move only when a cycle ends, whatever
    the cycle length asked at run time."""
    if not callable(learning_rate) and not zero_held:
        return optax.with_extra_args_support(optax.scale(-learning_rate))

    def leaf_rule(cycle):
        lr = schedule_value(learning_rate, cycle.update)
        hold = zero_held and cycle.last is not True

        def leaf(u, p):
            del p
            out = -lr * u
            return (jnp.where(cycle.last, out, 0.0) if hold else out).astype(u.dtype)

        return leaf

    return _read_by_update("scale_by_update_learning_rate", leaf_rule)


def add_update_decayed_weights(
    weight_decay: Any, mask: Any
) -> optax.GradientTransformationExtraArgs:
    """``optax.add_decayed_weights(weight_decay, mask)`` with a schedule read by update:
    ``u + λ(update)·θ`` on the masked leaves, at the cycle of the direction before it
    (:func:`sharing_the_cycle`). A constant ``weight_decay`` is optax's transform itself."""
    if not callable(weight_decay):
        return optax.add_decayed_weights(weight_decay, mask)

    def leaf_rule(cycle):
        wd = schedule_value(weight_decay, cycle.update)
        return lambda u, p: (u + wd * p).astype(u.dtype)

    decay = _read_by_update("add_update_decayed_weights", leaf_rule)
    return decay if mask is None else optax.masked(decay, mask)

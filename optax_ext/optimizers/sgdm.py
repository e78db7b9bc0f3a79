"""SGD with momentum that accumulates micro-batches inside its momentum buffer.

Reference: Su Jianlin, "Gradient accumulation hidden in momentum",
https://kexue.fm/archives/8634.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    canonical_dtype,
    check_choice,
    check_float_params,
    check_range,
    check_updates_match,
    is_static_int,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import (
    check_accumulation_steps,
    check_not_injected,
    counters_init,
    current_cycle,
    next_counters,
    refuse_injected_cycles,
    scale_by_update_learning_rate,
    sharing_the_cycle,
)
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "ScaleBySgdmState",
    "scale_by_sgdm",
    "sgdm",
]


class ScaleBySgdmState(NamedTuple):
    """State of :func:`scale_by_sgdm`.

    Attributes:
      count: int32, micro-steps taken (calls to ``update``).
      mu: the momentum; between cycles it equals ``optax.trace``'s after the same updates.
      acc: ``()``, except for Nesterov with k > 1: the cycle's running mean gradient.
      micro_step: int32, micro-steps taken in the current accumulation cycle.
      cycle_length: int32, the current cycle's k (see ``set_accumulation_steps``).
      updates: int32, parameter updates made (completed cycles).
    """

    count: jax.Array
    mu: optax.Updates
    acc: Any
    micro_step: jax.Array
    cycle_length: jax.Array
    updates: jax.Array


def scale_by_sgdm(
    momentum: float = 0.9,
    *,
    accumulation_steps: int = 1,
    nesterov: bool = False,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Heavy-ball momentum whose buffer also accumulates k micro-batches.

    With micro-step t, k = ``accumulation_steps`` and β = ``momentum``:

    .. math::

        m \leftarrow b_1 m + g / k,\quad
        b_1 = \beta \text{ if } t \bmod k = 0 \text{ else } 1;\qquad
        u = m \text{ if } (t+1) \bmod k = 0 \text{ else } 0.

    After a cycle m = β·m_prev + mean(g): ``optax.trace(β)`` fed the mean gradient, with
    no buffer besides the momentum. k may change between cycles (a batch-size warm-up):
    pass ``set_accumulation_steps=k`` to every ``update``; it takes effect when the
    next cycle starts, and a jitted step compiles once.

    With ``nesterov=True`` the update on the last micro-step is mean(g) + β·m
    (``optax.trace(β, nesterov=True)`` on the mean); with k = 1 the gradient is the mean
    and one buffer suffices, but with k > 1 the mean and the previous momentum are both
    needed and no single buffer holds both, so Nesterov with k > 1 keeps the running
    mean in a second buffer (``acc``) and updates the momentum on the last micro-step
    only (build it with ``accumulation_steps > 1`` to change k later).

    Args:
      momentum: β in [0, 1).
      accumulation_steps: k ≥ 1 micro-batches per update.
      nesterov: use Nesterov's momentum.
      mu_dtype: dtype of the momentum (default: the params'); arithmetic is at least f32.
      state_rounding: how a bf16/f16 state is written: ``"nearest"`` (a cast) or
        ``"stochastic"`` (unbiased,
        :func:`~optax_ext.wrappers.rounding.stochastic_round_to`, keyed by
        ``rounding_seed``, the micro-step count and the leaf index). No effect on a
        float32 state.
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleBySgdmState`.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_sgdm(0.9, accumulation_steps=2)
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> u, state = tx.update(jnp.array([3.0, 4.0]), state)
      >>> u  # the mean gradient: the momentum started at zero
      Array([2., 3.], dtype=float32)

    References:
      Su, `accumulation inside the momentum <https://kexue.fm/archives/8634>`_, 2021.
    """
    check_range("momentum", momentum, 0, 1, high_open=True, schedule=False)
    k = check_accumulation_steps(accumulation_steps)
    injected = check_not_injected("ox.scale_by_sgdm", k, momentum=momentum)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)
    mu_dtype = canonical_dtype(mu_dtype)
    single_step = is_static_int(k, 1)
    needs_acc = nesterov and not single_step

    def init_fn(params):
        check_float_params(params, "sgdm")
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        acc = optax.tree.zeros_like(params, dtype=mu_dtype) if needs_acc else ()
        return ScaleBySgdmState(count=jnp.zeros([], jnp.int32), mu=mu, acc=acc, **counters_init(k))

    def update_fn(updates, state, params=None, **extra_args):
        check_updates_match(updates, params, "sgdm")
        refuse_injected_cycles(injected, "ox.scale_by_sgdm", extra_args)
        cycle = current_cycle(k, state, extra_args)
        first, last, k_now = cycle.first, cycle.last, cycle.k
        if nesterov and not needs_acc and not isinstance(k_now, int):
            raise ValueError(
                "sgdm(nesterov=True) built with accumulation_steps=1 keeps no buffer for the "
                "cycle's mean, so set_accumulation_steps cannot lengthen its cycles: build it "
                "with accumulation_steps > 1 (any value; set_accumulation_steps overrides it)"
            )
        count = optax.safe_increment(state.count)
        counters = next_counters(cycle, state)
        # the new state arrives in float32 and is written as mu_dtype (cast or SR)
        write = lambda new, old, stream: write_state(
            new, old, state_rounding, rounding_seed, state.count, stream
        )
        if needs_acc:
            out = jax.tree.map(
                lambda g, m, a: _nesterov_accumulating(g, m, a, momentum, k_now, first, last),
                updates,
                state.mu,
                state.acc,
            )
            u, mu, acc = unzip_leaves(updates, out, 3)
            mu, acc = write(mu, state.mu, 0), write(acc, state.acc, 1)
            return u, ScaleBySgdmState(count=count, mu=mu, acc=acc, **counters)
        out = jax.tree.map(
            lambda g, m: _heavy_ball(g, m, momentum, k_now, first, last, nesterov),
            updates,
            state.mu,
        )
        u, mu = unzip_leaves(updates, out)
        return u, ScaleBySgdmState(count=count, mu=write(mu, state.mu, 0), acc=(), **counters)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sgdm(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    mu_dtype: Any = None,
    *,
    accumulation_steps: int = 1,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with momentum and gradient accumulation at no extra memory.

    .. math::

        m \leftarrow b_1 m + g / k,\quad
        b_1 = \beta \text{ if } t \bmod k = 0 \text{ else } 1;\qquad
        \Delta\theta = -\mathrm{lr}(\lfloor t/k \rfloor)\, m
            \text{ if } (t+1) \bmod k = 0 \text{ else } 0.

    Equals ``optax.sgd(learning_rate, momentum, nesterov=nesterov)`` fed the mean of each
    k micro-batch gradients (and exactly it with k = 1), where ``optax.MultiSteps`` would
    keep an accumulator beside the momentum: the state is one buffer the size of the
    params whatever k is (two for Nesterov with k > 1, see :func:`scale_by_sgdm`).
    Parameters move only on the last micro-step of each cycle. A learning-rate schedule
    is indexed by the update (t // k), the optax convention, and so is one injected by
    ``ox.inject_hyperparams``. ``optax.inject_hyperparams`` would evaluate it at the
    micro-step instead (k times too fast), so with ``accumulation_steps`` other than 1
    (or injected under ``jit``, or ``set_accumulation_steps``) ``sgdm`` refuses the
    arrays that wrapper injects, naming ``ox.inject_hyperparams``.

    Args:
      learning_rate: a float ≥ 0 or an optax schedule of the update index.
      momentum: β in [0, 1).
      accumulation_steps: k ≥ 1 micro-batches per update.
      nesterov: Nesterov's momentum (``optax.sgd``'s form).
      mu_dtype: momentum dtype (default: the params').
      state_rounding: ``"nearest"`` or ``"stochastic"``: how a bf16 state is written,
        see :func:`scale_by_sgdm`.
      rounding_seed: seed of the stochastic rounding.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = sgdm(0.1, momentum=0.9, accumulation_steps=4)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> for _ in range(4):
      ...     updates, state = tx.update({"w": jnp.ones(3)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]
      Array([0.9, 0.9, 0.9], dtype=float32)

    References:
      Su, `accumulation inside the momentum <https://kexue.fm/archives/8634>`_, 2021.
    """
    check_range("learning_rate", learning_rate, 0)
    k = check_accumulation_steps(accumulation_steps)
    injected = check_not_injected("ox.sgdm", k, learning_rate=learning_rate, momentum=momentum)
    tx = sharing_the_cycle(
        k,
        scale_by_sgdm(
            momentum,
            accumulation_steps=accumulation_steps,
            nesterov=nesterov,
            mu_dtype=mu_dtype,
            state_rounding=state_rounding,
            rounding_seed=rounding_seed,
        ),
        scale_by_update_learning_rate(learning_rate),
    )
    if not injected:
        return tx

    def update_fn(updates, state, params=None, **extra_args):
        refuse_injected_cycles(injected, "ox.sgdm", extra_args)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


# ----------------------------------------------------------------------- helpers


def _heavy_ball(g, m, beta, k, first, last, nesterov):
    """One micro-step of the single-buffer momentum; returns (update, new momentum)."""
    work = work_dtype(m)
    b1 = beta if first is True else jnp.where(first, beta, 1.0)
    new_m = b1 * m.astype(work) + g.astype(work) / k
    # Nesterov only reaches here with k == 1, where g is the mean gradient
    u = g.astype(work) + beta * new_m if nesterov else new_m
    if last is not True:
        u = jnp.where(last, u, 0.0)
    return u.astype(g.dtype), new_m  # the state is written (cast or SR) by the caller


def _nesterov_accumulating(g, m, a, beta, k, first, last):
    """Nesterov with k > 1: mean in ``a``, momentum frozen until the cycle's last step."""
    work = work_dtype(m)
    mean = jnp.where(first, 0.0, a.astype(work)) + g.astype(work) / k
    m_work = m.astype(work)
    new_m = jnp.where(last, beta * m_work + mean, m_work)
    u = jnp.where(last, mean + beta * new_m, 0.0)
    return u.astype(g.dtype), new_m, mean

"""Gradient accumulation for any optax optimizer, safe under pmap, shard_map and bf16.

References: Su Jianlin's "derived optimizers" (bert4keras ``extend_with_*``, gradient
accumulation among them), https://kexue.fm/archives/7094; accumulating inside the
momentum instead, https://kexue.fm/archives/8634 (:mod:`optax_ext.optimizers.sgdm`, Tiger).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import canonical_dtype, check_transform, has_nonfinite, work_dtype
from optax_ext._cycles import (
    SET_ACCUMULATION_STEPS,
    check_accumulation_steps,
    cycle_length,
    selected_by_accumulation,
)
from optax_ext.wrappers.spike import any_flag, global_sq_norm

__all__ = [
    "AccumulationState",
    "accumulate_gradients",
]


class AccumulationState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      mini_step: int32 in [0, k), micro-steps already taken in the current cycle.
      gradient_step: int32, updates the inner optimizer has made (its schedules'
        index); a cycle whose micro-batches were all skipped does not count.
      n_accumulated: int32, micro-batches in the running mean of this cycle
        (skipped ones are not).
      skipped_micro_batches: int32, non-finite micro-batches skipped so far.
      skipped_updates: int32, cycles that ended with every micro-batch skipped.
      grad_sq_norm_sum: float32, sum over this cycle's accumulated micro-batches of
        each micro-batch gradient's squared global L2 norm.
      acc_grads: running mean of this cycle's micro-batch gradients (``acc_dtype``);
        after an update it still holds that cycle's mean, ignored by the next cycle
        (``n_accumulated == 0``).
      inner_state: the wrapped optimizer's state, unchanged between its updates.
      cycle_length: int32, the current cycle's k (``set_accumulation_steps`` may change
        it between cycles).
    """

    mini_step: jax.Array
    gradient_step: jax.Array
    n_accumulated: jax.Array
    skipped_micro_batches: jax.Array
    skipped_updates: jax.Array
    grad_sq_norm_sum: jax.Array
    acc_grads: Any
    inner_state: Any
    cycle_length: jax.Array


def accumulate_gradients(
    inner: optax.GradientTransformation,
    accumulation_steps: int,
    *,
    skip_nonfinite: bool = False,
    acc_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Feeds ``inner`` the mean gradient of every ``k`` micro-batches (``optax.MultiSteps``).

    With micro-step :math:`t` and the cycle's micro-batch gradients
    :math:`g_1, \dots, g_k`:

    .. math::

        \bar g &= \tfrac{1}{n}\textstyle\sum_{i \in A} g_i
            \quad (A: \text{accumulated micro-batches},\ n = |A|) \\
        u_t, s &= \begin{cases}
            \text{inner.update}(\bar g, s, \theta) & (t+1) \bmod k = 0 \text{ and } n > 0 \\
            (0, s) & \text{otherwise}
        \end{cases}

    The semantics of ``optax.MultiSteps(inner, k)``: zeros are emitted on the other
    micro-steps, the inner state is exactly unchanged between updates, and schedules
    inside ``inner`` count updates, not micro-steps. bert4keras's
    ``extend_with_gradient_accumulation`` differs: it updates on micro-steps 0, k, 2k, …
    with the sum of the k gradients *before* the current one (its first update, at step
    0, is on zeros, and each update is one micro-batch late); here the update comes on
    micro-step k-1 with the mean of the cycle's k gradients, the current one included.
    The running mean is Welford's (``acc += (g - acc) / n``), as in ``MultiSteps``.

    **Why no** ``lax.cond``. Choosing between "update" and "accumulate" with
    ``lax.cond`` has needed both branches to return identical dtypes (bf16 params with
    f32 gradients broke ``MultiSteps``: optax#377, #1038) and had no replication rule
    under ``shard_map`` (jax#23693); ``MultiSteps``'s ``should_skip_update_fn`` still
    goes through ``lax.cond``. Here the inner update runs on *every* micro-step, on the
    running mean, and ``jnp.where`` keeps its result only on the last one, where the
    running mean is the real mean of the cycle; elsewhere the inner state and the zero
    updates are selected exactly. The price is one inner update's elementwise work per
    micro-step instead of per cycle, and XLA copies a donated inner-state buffer that is
    both read by the update and selected (a few passes over the parameters, usually
    small beside a micro-batch's forward and backward pass;
    ``benchmarks/bench_accumulation.py`` measures it against ``MultiSteps``). The
    accumulator itself is updated in place: a cycle starts from zero when
    ``n_accumulated == 0`` instead of zeroing the buffer after an update. In exchange
    the step is one straight-line program, the same under ``jit``, ``pmap``,
    ``shard_map`` and ``vmap``, whose state dtypes never change (the inner state is cast
    back to its own dtypes, so ``jit`` compiles once). Side effects inside ``inner``
    (``jax.debug.print``, callbacks) run on every micro-step. Optimizers that can hold
    the sum in their own momentum (:func:`optax_ext.optimizers.sgdm.sgdm`, Tiger) need
    neither the accumulator nor the selection.

    **Extra arguments** are forwarded to ``inner``, together with
    ``micro_grad_sq_norm`` (float32 scalar: the mean over the accumulated micro-batches
    of each one's squared global L2 norm, as gradient-noise-scale estimators need) and
    ``accumulation_steps``: k (a Python int), or with ``skip_nonfinite`` the number n of
    micro-batches in the mean (an int32 array).

    **A changing k** (a batch-size warm-up): pass ``set_accumulation_steps=k`` (an int
    or an int32 array) to every ``update``; it sets the length of the cycle starting at
    this micro-step, the running cycle keeps its own, and a jitted step compiles once.
    It is not forwarded to ``inner``. A plain ``optax.GradientTransformation``
    inner ignores them; :func:`ox.measure_noise_scale` placed first in ``inner``
    uses them to measure the gradient noise scale from micro-batches. A concrete
    ``set_accumulation_steps`` is checked like a Python int (an integer scalar in
    [1, 2**31 - 1], else a ``ValueError`` or ``TypeError`` naming it); a traced one only
    for its dtype and shape, its value clamped into that range (see
    :func:`optax_ext._cycles.cycle_length`).

    **Wrappers that must see every micro-step** go outside: ``inner`` runs on every
    micro-step but keeps its new state only on a cycle's last one, so a
    :func:`~optax_ext.wrappers.qk_clip.qk_clip` inside would lose every micro-batch's
    max logits but the last; it raises, giving the order
    ``qk_clip(accumulate_gradients(inner, k))``.

    **Non-finite micro-batches** (``skip_nonfinite=True``): a micro-batch with any NaN or
    ±inf does not enter the mean nor the squared-norm sum; the cycle still lasts k
    micro-steps and the mean is over the n finite ones. If all k are skipped the cycle
    makes no update: zeros are emitted, the inner state is unchanged, ``gradient_step``
    does not advance and ``skipped_updates`` counts it. Gradients must be all-reduced
    across devices first (``lax.pmean``), so every replica makes the same choice.

    Args:
      inner: the optimizer to feed (any optax transform, with extra args or not).
      accumulation_steps: k, micro-batches per update, a Python int ≥ 1 (static); the
        name Tiger's and SGDM's own accumulation use.
      skip_nonfinite: leave non-finite micro-batches out of the mean.
      acc_dtype: dtype of the running mean; ``None`` gives each leaf at least float32
        (bf16 params → f32 accumulator, f64 stays f64).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`AccumulationState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = accumulate_gradients(optax.sgd(0.1), accumulation_steps=2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state, params)  # accumulate
      >>> u
      Array([0., 0.], dtype=float32)
      >>> u, state = tx.update(jnp.array([3.0, 4.0]), state, params)  # update on the mean
      >>> u
      Array([-0.2, -0.3], dtype=float32)

    References:
      Su, `derived optimizers <https://kexue.fm/archives/7094>`_, 2019;
      ``optax.MultiSteps``; jax#23693, optax#377, optax#1038.
    """
    check_transform("inner", inner)
    k = _check_static_k(accumulation_steps)
    acc_dtype = canonical_dtype(acc_dtype)
    inner = optax.with_extra_args_support(inner)

    def acc_like(x):
        dtype = acc_dtype or work_dtype(x)
        return jnp.zeros_like(x, dtype=dtype)

    def init_fn(params):
        # a fresh array per counter: a donated state must not hold one buffer twice
        zero = lambda: jnp.zeros([], jnp.int32)
        return AccumulationState(
            mini_step=zero(),
            gradient_step=zero(),
            n_accumulated=zero(),
            skipped_micro_batches=zero(),
            skipped_updates=zero(),
            grad_sq_norm_sum=jnp.zeros([], jnp.float32),
            acc_grads=jax.tree.map(acc_like, params),
            inner_state=inner.init(params),
            cycle_length=jnp.full([], k, jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        # the cycle length is this wrapper's: the inner optimizer must not see it
        asked = extra_args.pop(SET_ACCUMULATION_STEPS, None)
        k_now = k if asked is None else cycle_length(asked, state.mini_step, state.cycle_length)
        sq_norm = global_sq_norm(updates)
        ok = _all_finite(updates) if skip_nonfinite else jnp.asarray(True)
        n = state.n_accumulated + ok.astype(jnp.int32)
        denom = jnp.maximum(n, 1)
        fresh = state.n_accumulated == 0
        acc = jax.tree.map(lambda g, a: _welford(g, a, fresh, ok, denom), updates, state.acc_grads)
        sq_sum = state.grad_sq_norm_sum + jnp.where(ok, sq_norm, 0.0)
        last = state.mini_step + 1 >= k_now
        apply = jnp.logical_and(last, n > 0) if skip_nonfinite else last

        # the inner update runs on every micro-step and is kept on a cycle's last one;
        # a wrapper inside that must see every micro-step (qk_clip) refuses to run so
        selecting = contextlib.nullcontext() if asked is None and k == 1 else None
        with selecting or selected_by_accumulation():
            inner_updates, new_inner = inner.update(
                optax.tree.cast_like(acc, updates),
                state.inner_state,
                params,
                **{
                    **extra_args,
                    "micro_grad_sq_norm": sq_sum / denom.astype(jnp.float32),
                    "accumulation_steps": n if skip_nonfinite else k_now,
                },
            )
        out = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), inner_updates)
        new_state = AccumulationState(
            mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
            gradient_step=_increment_if(apply, state.gradient_step),
            n_accumulated=jnp.where(last, 0, n).astype(jnp.int32),
            skipped_micro_batches=_increment_if(~ok, state.skipped_micro_batches),
            skipped_updates=_increment_if(last & ~apply, state.skipped_updates),
            grad_sq_norm_sum=jnp.where(last, 0.0, sq_sum).astype(jnp.float32),
            acc_grads=acc,
            inner_state=_select(apply, new_inner, state.inner_state),
            cycle_length=jnp.asarray(k_now, jnp.int32),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------- helpers


def _check_static_k(k: Any) -> int:
    if isinstance(k, jax.core.Tracer):
        raise TypeError("accumulation_steps must be a Python int: the accumulation count is static")
    return int(check_accumulation_steps(k))


def _welford(g, a, fresh, ok, n):
    """The running mean after one more micro-batch (unchanged if it is skipped).

    A new cycle starts from zero here rather than by zeroing the buffer after an update:
    the buffer then has one writer reading it once, so XLA updates it in place in the
    same pass as the inner update instead of copying the donated buffer first.
    """
    base = jnp.where(fresh, jnp.zeros_like(a), a)
    return jnp.where(ok, base + (g - base) / n, base).astype(a.dtype)


def _all_finite(tree: Any) -> jax.Array:
    # one decision every leaf's running mean selects on, computed once (see any_flag:
    # an or-chain of the flags made compile time quadratic in the leaf count)
    return ~any_flag([has_nonfinite(x) for x in jax.tree.leaves(tree)])


def _increment_if(cond: jax.Array, counter: jax.Array) -> jax.Array:
    return jnp.where(cond, optax.safe_increment(counter), counter)


def _select(cond: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` else ``old``, leaf by leaf, in ``old``'s dtypes.

    Casting to the old dtype keeps the state's types fixed across steps even when the
    inner update promotes (bf16 state with f32 arithmetic), so ``jit`` compiles once.
    """
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o).astype(jnp.result_type(o)), new, old)

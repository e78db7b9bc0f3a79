"""Whole-step guards shared by ``nan_guard``, Tiger and ``accumulate_gradients``.

Two pieces live here so that every guard uses the same ones:

* :func:`any_flag`: one scalar "skip this step" decision from per-leaf flags, built so
  that XLA computes it once however many leaves select on it (see its docstring: the
  naive ``or`` of the flags made compile time grow with the square of the leaf count);
* the gradient-spike guard (:class:`SpikeGuard`, :func:`spike_guard`): a step whose
  global gradient norm exceeds ``factor`` times a running average of the norm is
  skipped or clipped, and counted. A finite spike (gradients ×1e30 on one step) passes
  every non-finite check, yet fills a sign optimizer's momentum for thousands of steps.

Reference for the momentum arithmetic: Su Jianlin, "Tiger",
https://kexue.fm/archives/9512 (a sign optimizer follows ``sign(m)``, so one huge
gradient in ``m`` decides the direction until β^t·1e30 falls below the normal scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_choice, check_int, check_range, has_nonfinite

__all__ = [
    "SPIKE_ACTIONS",
    "any_flag",
    "count_flags",
    "global_norm",
    "global_sq_norm",
    "leaf_squares",
    "masked_sq_norm",
    "masked_norm",
    "LeafChecks",
    "check_leaves",
    "SpikeGuard",
    "SpikeCheck",
    "spike_guard",
    "init_counters",
    "check",
    "update_counters",
    "scale_leaf",
    "scale_tree",
    "saturating_add",
    "increment_if",
]

SPIKE_ACTIONS = ("skip", "clip")

#: per-leaf bool flags: a sequence of scalars, or one bool vector
Flags = Sequence[jax.Array] | jax.Array


def any_flag(flags: Sequence[jax.Array]) -> jax.Array:
    """Whether any of the scalar bool ``flags`` is True, as one value computed once.

    Every leaf of a guarded step selects on this one decision (``where(skip, old,
    new)``). Written as ``f1 | f2 | ... | fN`` (or a sum of ints), it is a chain of
    cheap scalar ops, and XLA fuses a copy of the whole chain into each leaf's kernel:
    N leaves times N flags, so compile time grew with the square of the leaf count.
    A ``jnp.any`` over the stacked flags is rewritten back into
    the same chain, and an optimisation barrier is removed before fusion. XLA does not
    duplicate an expensive op (here a square root) into consumers that broadcast it, so
    the flags are counted in float32 and the decision is ``sqrt(count) > 0``. The count
    is one reduction over the stacked flags, not a chain of N additions, which XLA's
    fusion passes handled in superlinear time. The flags are
    stacked before they are converted: a sum over N scalars converted one by one is
    rewritten by XLA into that chain again, inside one kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(any_flag([jnp.array(False), jnp.array(True)])), bool(any_flag([]))
      (True, False)
    """
    if not flags:
        return jnp.zeros([], bool)
    count = jnp.sum(jnp.stack([jnp.asarray(f, bool) for f in flags]).astype(jnp.float32))
    return jnp.sqrt(count) > 0


def count_flags(flags: Flags) -> jax.Array:
    """How many of the scalar bool ``flags`` (or entries of a bool vector) are True
    (int32), one reduction over them stacked (as in :func:`any_flag`, never a chain of N
    additions)."""
    if not isinstance(flags, jax.Array):
        if not flags:
            return jnp.zeros([], jnp.int32)
        flags = jnp.stack([jnp.asarray(f, bool) for f in flags])
    return jnp.sum(flags.astype(jnp.int32))


def _sums_of_squares(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]


def leaf_squares(leaves: Sequence[jax.Array]) -> jax.Array:
    """Each leaf's sum of squares in float32, stacked: shape ``(len(leaves),)``."""
    if not leaves:
        return jnp.zeros([0], jnp.float32)
    return jnp.stack(_sums_of_squares(leaves))


def masked_sq_norm(squares: jax.Array, exclude: Flags | None = None) -> jax.Array:
    """The sum of :func:`leaf_squares`' entries, those whose ``exclude`` flag is True
    counting as zero (``exclude``: one scalar bool per entry, or a bool vector). One
    reduction over the stacked sums: a chain of N additions took XLA's fusion passes
    superlinear time (:func:`any_flag`)."""
    if isinstance(exclude, jax.Array):
        squares = jnp.where(exclude, 0.0, squares)
    elif exclude is not None and len(exclude):
        squares = jnp.where(jnp.stack(list(exclude)), 0.0, squares)
    else:
        # |s| = s for sums of squares (NaN stays NaN); an elementwise op between the
        # stack and the sum keeps XLA from rewriting the sum of N stacked scalars into
        # one kernel holding a chain of N additions (as in any_flag)
        squares = jnp.abs(squares)
    return jnp.sum(squares)


def global_sq_norm(tree: Any, exclude: Any = None) -> jax.Array:
    """The squared L2 norm over all leaves, summed in float32 whatever their dtype.

    ``exclude``: a tree of scalar bools shaped like ``tree``; those leaves count as zero
    (the non-finite leaves a guard discards).
    """
    flags = None if exclude is None else jax.tree.leaves(exclude)
    return masked_sq_norm(leaf_squares(jax.tree.leaves(tree)), flags)


class LeafChecks(NamedTuple):
    """What one read of each gradient leaf tells: see :func:`check_leaves`."""

    bad: list[jax.Array]  # one scalar bool per leaf: it holds a NaN (or ±inf)
    squares: jax.Array  # float32, each leaf's sum of squares (:func:`leaf_squares`)
    stacked: jax.Array  # the same flags as one bool vector, for counts and the norm

    def count(self) -> jax.Array:
        """How many leaves are flagged (int32): one reduction over :attr:`stacked`."""
        return count_flags(self.stacked)

    def norm(self) -> jax.Array:
        """The gradient norm over the leaves not flagged (:func:`masked_norm`)."""
        return masked_norm(self.squares, self.stacked)


def check_leaves(leaves: Sequence[jax.Array], catch_inf: bool = True) -> LeafChecks:
    """Non-finite flags and sums of squares of gradient leaves from one read of each.

    s = Σ g² (float32) is NaN exactly when the leaf holds a NaN: squares are ≥ 0, so a
    sum of them never meets inf - inf. It is +inf when the leaf holds ±inf, and also
    when finite entries overflow (|g| > 1.8e19). With ``catch_inf`` the flag is "NaN,
    or +inf and :func:`~optax_ext._common.has_nonfinite`", where the exact check runs,
    on every leaf, only when some sum is +inf (a ``lax.cond``): the guard's norm and its
    per-leaf check share the one read that the norm needs anyway. Without
    ``catch_inf`` the flag is NaN only, exactly.

    Written for XLA's compile time: each leaf's flag comes from its own sum and its
    own output of the ``lax.cond``. A slice of a stacked vector in a leaf's kernel
    (``exact[i]``, or a flag sliced out of an expression over the stacked sums) kept
    XLA:CPU from grouping that leaf's kernels into one compiled module, one LLVM
    module per leaf instead, or copied the whole expression into each of them. Counts
    and the norm reduce the stacked flags (:attr:`LeafChecks.stacked`), never the list:
    XLA rewrote a sum of N stacked scalars into one kernel holding a chain of N
    additions, which LLVM compiles in superlinear time.
    """
    leaves = list(leaves)
    if not leaves:
        return LeafChecks([], leaf_squares(leaves), jnp.zeros([0], bool))
    sums = _sums_of_squares(leaves)
    squares = jnp.stack(sums)
    if not catch_inf:
        flagged = lambda s, _: jnp.isnan(s)
        exact = [None] * len(leaves)
    else:
        # NaN, or +inf from a leaf that holds ±inf (not finite squares that overflow)
        flagged = lambda s, e: jnp.isnan(s) | (jnp.isinf(s) & e)
        exact = jax.lax.cond(
            jnp.any(jnp.isinf(squares)),
            lambda xs: [has_nonfinite(x) for x in xs],
            lambda xs: [jnp.zeros([], bool) for _ in xs],
            leaves,
        )
    flags = [flagged(s, e) for s, e in zip(sums, exact, strict=True)]
    stacked = flagged(squares, jnp.stack(exact) if catch_inf else None)
    return LeafChecks(flags, squares, stacked)


def masked_norm(squares: jax.Array, exclude: Flags | None = None) -> jax.Array:
    """:func:`masked_sq_norm`'s square root, the guards' gradient norm: beyond ~1.8e19
    (squares overflow) it is +inf, and any NaN gives NaN. The square root is also what
    keeps XLA from copying the sum into every consumer (:func:`any_flag`)."""
    return jnp.sqrt(masked_sq_norm(squares, exclude))


def global_norm(tree: Any, exclude: Any = None) -> jax.Array:
    """The L2 norm over all leaves, in float32, as one scalar computed once
    (:func:`masked_norm` of the leaves' sums of squares)."""
    flags = None if exclude is None else jax.tree.leaves(exclude)
    return masked_norm(leaf_squares(jax.tree.leaves(tree)), flags)


class SpikeGuard(NamedTuple):
    r"""A validated spike-guard setting (static): build it with :func:`spike_guard`.

    With :math:`\|g_t\|` the step's global gradient norm, :math:`a_n` the EMA over the
    :math:`n` steps admitted so far and :math:`\hat a_n = a_n / (1 - \rho^n)` its
    bias-corrected value, a step is a *spike* when

    .. math::

        n \ge \text{warmup} \quad\text{and}\quad \hat a_n > 0 \quad\text{and}\quad
        \|g_t\| > F\, \hat a_n ,

    or when the norm overflows float32 (:math:`\|g_t\| > 1.8\cdot 10^{19}`, whose square
    is +inf: every second moment would overflow too), even during the warm-up.

    A spike is skipped (``action="skip"``) or its gradients are scaled to the average
    norm :math:`\hat a_n` (``"clip"``: the step keeps its direction at a typical size; a
    norm that overflows float32 cannot be scaled and is skipped). Scaling only down to
    the threshold would not do: a gradient F times the usual size still rules a sign
    optimizer's momentum for :math:`\ln(F(1-\beta))/(1-\beta)` steps.

    The average then admits :math:`\min(\|g_t\|, F \hat a_n)`: one spike raises the
    threshold by at most a factor :math:`\rho + (1-\rho)F`, so a genuine, lasting change
    of scale is accepted after a few steps instead of freezing the run; a clean step
    admits its norm unchanged. Steps with a non-finite gradient leaf (and a
    non-finite norm) are not admitted.

    Attributes:
      factor: F > 1.
      warmup: admitted steps before a spike can be declared, ≥ 1.
      decay: ρ in [0, 1), the EMA's decay.
      action: ``"skip"`` or ``"clip"``.
    """

    factor: Any
    warmup: Any
    decay: Any
    action: str


class SpikeCheck(NamedTuple):
    """One step's spike decision (scalars): what the guard does with the gradients."""

    spike: jax.Array  # the norm exceeded the threshold
    skip: jax.Array  # skip the step because of the spike
    scale: jax.Array | None  # multiply the gradients by this (clip), None when never clipping
    threshold: jax.Array


def spike_guard(factor: float | None, warmup: int, decay: float, action: str) -> SpikeGuard | None:
    """Validates a spike-guard setting; ``factor=None`` switches the guard off (None).

    Raises ``ValueError`` naming the argument (``spike_factor``, ``spike_warmup``,
    ``spike_decay``, ``spike_action``) when a concrete value is out of range.

    Example:
      >>> spike_guard(1e3, 20, 0.99, "skip")
      SpikeGuard(factor=1000.0, warmup=20, decay=0.99, action='skip')
      >>> spike_guard(1.0, 20, 0.99, "skip")
      Traceback (most recent call last):
      ...
      ValueError: spike_factor must be in (1, inf), got 1.0
    """
    if factor is None:
        return None
    check_range("spike_factor", factor, 1, low_open=True, schedule=False)
    check_int("spike_warmup", warmup, minimum=1)
    check_range("spike_decay", decay, 0, 1, high_open=True, schedule=False)
    check_choice("spike_action", action, SPIKE_ACTIONS)
    return SpikeGuard(factor, warmup, decay, action)


def init_counters() -> dict[str, jax.Array]:
    """The spike guard's state fields at step 0 (fresh arrays: a donated state must not
    hold one buffer twice): ``spike_steps``, ``norm_ema`` and ``norm_steps``."""
    return {
        "spike_steps": jnp.zeros([], jnp.int32),
        "norm_ema": jnp.zeros([], jnp.float32),
        "norm_steps": jnp.zeros([], jnp.int32),
    }


def check(guard: SpikeGuard | None, norm: jax.Array, state: Any) -> SpikeCheck:
    """Whether this step's ``norm`` is a spike, given the guard's fields in ``state``."""
    never = jnp.zeros([], bool)
    if guard is None:
        return SpikeCheck(never, never, None, jnp.full([], jnp.inf, jnp.float32))
    average = jnp.asarray(_debiased(state.norm_ema, state.norm_steps, guard.decay), jnp.float32)
    threshold = guard.factor * average
    # a norm whose square overflows float32 is a spike even before the warm-up ends:
    # no optimizer's second moment survives it
    overflow = jnp.isinf(norm)
    spike = overflow | ((state.norm_steps >= guard.warmup) & (threshold > 0) & (norm > threshold))
    # every leaf reads the decision and the scale: each ends in an op XLA computes once
    if guard.action == "skip":
        return SpikeCheck(spike, any_flag([spike]), None, threshold)
    # scaled to the average norm, not to the threshold: F times a normal gradient would
    # still rule a sign optimizer's momentum for ~ln(F(1-β))/(1-β) steps
    clip = spike & ~overflow
    scale = jnp.where(clip, average, 1.0) / jnp.where(clip, norm, 1.0)
    return SpikeCheck(spike, any_flag([overflow]), scale, threshold)


def update_counters(
    guard: SpikeGuard | None, norm: jax.Array, result: SpikeCheck, admit: jax.Array, state: Any
) -> dict[str, jax.Array]:
    """The guard's state fields after this step (unchanged when the guard is off).

    ``admit``: whether the step may enter the average at all (no non-finite gradient
    leaf). A non-finite norm never enters it; a spike enters at the threshold.
    """
    if guard is None:
        return {
            "spike_steps": state.spike_steps,
            "norm_ema": state.norm_ema,
            "norm_steps": state.norm_steps,
        }
    admit = admit & jnp.isfinite(norm)
    value = jnp.where(result.spike, result.threshold, norm)
    ema = guard.decay * state.norm_ema + (1.0 - guard.decay) * value
    return {
        "spike_steps": increment_if(result.spike, state.spike_steps),
        "norm_ema": jnp.where(admit, ema, state.norm_ema).astype(jnp.float32),
        "norm_steps": increment_if(admit, state.norm_steps),
    }


def scale_leaf(g: jax.Array, scale: jax.Array | None) -> jax.Array:
    """``g`` times the clip ``scale`` in ``g``'s dtype (unchanged for None)."""
    if scale is None:
        return g
    return (g * scale.astype(jnp.result_type(g))).astype(g.dtype)


def scale_tree(tree: Any, scale: jax.Array | None) -> Any:
    """:func:`scale_leaf` over a tree."""
    return tree if scale is None else jax.tree.map(lambda g: scale_leaf(g, scale), tree)


def _debiased(ema: jax.Array, steps: jax.Array, decay: Any) -> jax.Array:
    correction = 1.0 - jnp.asarray(decay, jnp.float32) ** steps.astype(jnp.float32)
    return jnp.where(steps > 0, ema / jnp.where(steps > 0, correction, 1.0), 0.0)


def saturating_add(counter: jax.Array, n: jax.Array) -> jax.Array:
    """``counter + n`` in int32, held at the int32 maximum instead of wrapping around."""
    room = jnp.iinfo(jnp.int32).max - counter
    return jnp.where(n > room, jnp.iinfo(jnp.int32).max, counter + n).astype(jnp.int32)


def increment_if(cond: jax.Array, counter: jax.Array) -> jax.Array:
    """``counter + 1`` where ``cond``, held at the int32 maximum (``optax.safe_increment``)."""
    return jnp.where(cond, optax.safe_increment(counter), counter).astype(jnp.int32)

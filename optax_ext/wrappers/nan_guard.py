"""Tiger's NaN strategy for any optimizer: skip the step, shrink the offending leaves.

Reference: Su Jianlin, "Tiger: an extremely tight-fisted optimizer",
https://kexue.fm/archives/9512 (its NaN handling), and https://github.com/bojone/tiger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    NORM_SCALE,
    check_range,
    check_transform,
    either,
    has_nonfinite,
    is_concrete_number,
    path_labels,
    require_params,
    work_dtype,
)
from optax_ext.wrappers import spike

__all__ = [
    "DISCARDED_LEAVES",
    "NanGuardState",
    "leafwise_guard",
    "nan_guard",
]


class NanGuardState(NamedTuple):
    """State of :func:`nan_guard`.

    Attributes:
      count: int32, steps seen (calls to ``update``).
      skipped_steps: int32, steps on which the inner optimizer did not step (a
        non-finite gradient leaf, a non-finite result, or a skipped spike).
      shrunk_leaves: int32, leaf shrinks so far (a step with 3 bad leaves adds 3).
      spike_steps: int32, steps whose gradient norm exceeded the spike threshold
        (skipped, or clipped with ``spike_action="clip"``).
      norm_ema: float32, the spike guard's EMA of the global gradient norm (not
        bias-corrected; see :class:`~optax_ext.wrappers.spike.SpikeGuard`).
      norm_steps: int32, steps admitted into ``norm_ema``.
      inner_state: the wrapped optimizer's state, kept exactly on skipped steps.
    """

    count: jax.Array
    skipped_steps: jax.Array
    shrunk_leaves: jax.Array
    spike_steps: jax.Array
    norm_ema: jax.Array
    norm_steps: jax.Array
    inner_state: Any


#: Default shrink centres by path: norm gains (Flax ``scale``) shrink toward 1.
DEFAULT_CENTRES: tuple[tuple[str, float], ...] = ((NORM_SCALE, 1.0),)


def nan_guard(
    inner: optax.GradientTransformation,
    shrink_ratio: float = 0.99,
    *,
    catch_inf: bool = True,
    centre: float | Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    check_result: bool = False,
    spike_factor: float | None = 1e3,
    spike_warmup: int = 20,
    spike_decay: float = 0.99,
    spike_action: str = "skip",
) -> optax.GradientTransformationExtraArgs:
    r"""Guards any optimizer against non-finite gradients the way Tiger does.

    For each gradient leaf, bad = any NaN (any non-finite value with ``catch_inf``);
    :math:`\hat a` is the bias-corrected running average of the global gradient norm
    and F = ``spike_factor``:

    .. math::

        u, s' &= \begin{cases}
            \text{inner.update}(g, s, \theta) & \text{no leaf is bad and }
                \|g\| \le F \hat a \\
            (0, s) & \text{otherwise}
        \end{cases} \\
        \Delta\theta_\ell &= (r - 1)(\theta_\ell - c_\ell) \quad\text{for a bad leaf } \ell
            \qquad(\theta_\ell \leftarrow (\theta_\ell - c_\ell)\, r + c_\ell)

    Tiger decides per leaf because its state is per leaf. A general optimizer's state
    cannot be split by leaf (a global ``count``, Adam's bias correction, a global norm
    clip), so here one bad leaf means **the inner optimizer does not step at all**: its
    state is kept exactly, the bad leaves shrink toward their centre and the good leaves
    get a zero update. ``skipped_steps`` and ``shrunk_leaves`` in the state count what
    happened. Compare ``optax.apply_if_finite``, which only skips (and eventually gives up
    and applies a non-finite update after ``max_consecutive_errors``); the shrink pulls
    an exploding layer back toward its initial scale, as weight decay would.

    **Spikes.** Finite gradients of 1e30 on one step pass every non-finite check, yet a
    sign optimizer (Tiger, Lion) then follows that one gradient's sign for thousands of
    steps. The spike guard skips a step whose global gradient norm exceeds
    ``spike_factor`` times the running average of the norm (after ``spike_warmup``
    admitted steps), or with ``spike_action="clip"`` scales its gradients down to the
    average norm; ``spike_steps`` counts them. A norm that overflows float32 (gradients
    beyond ~1e19, whose squares would overflow Adam's second moment too) is a spike at
    once, during the warm-up as well. The average is a bias-corrected EMA with decay
    ``spike_decay``; a spike enters it at the threshold,
    so a real lasting change of scale is accepted within a few steps (each spike can
    raise the threshold at most ``ρ + (1-ρ)F``-fold, ~11x with the defaults; see
    :class:`~optax_ext.wrappers.spike.SpikeGuard`). A clean
    run's norm does not jump 1000-fold above its average over the last ~100 steps, so
    by default the guard never fires on one and its results are bit-identical with
    ``spike_factor=None`` (tested on a 200-step Flax run). The norm costs one extra read
    of the gradients; ``spike_factor=None`` removes it.

    The choice is made with ``jnp.where``, not ``lax.cond``: the inner update is always
    computed (on gradients whose bad leaves are zeroed) and its result discarded when
    needed, so the step is one straight-line program under ``jit``, ``pmap`` and
    ``shard_map``; the cost, on every step, is that XLA copies each donated inner-state
    buffer before the select (``benchmarks/bench_accumulation.py`` compares it with
    ``apply_if_finite``). Gradients must be all-reduced across devices **before** this
    transform (``lax.pmean``): a NaN on one device then reaches every replica, and all
    make the same choice.

    Args:
      inner: the optimizer to guard (any optax transform).
      shrink_ratio: r in (0, 1]; 1 only skips.
      catch_inf: treat ±inf like NaN (False: only NaN is caught).
      centre: the shrink centre c. ``None``: 1 for norm gains (path rule
        ``NORM_SCALE``, Flax ``scale``), 0 otherwise; a number for every leaf; or path
        rules ``{regex: centre}`` (first match wins, unmatched leaves 0).
      check_result: also skip the step (state kept, zero update, counted in
        ``skipped_steps``) when the inner step itself produces a non-finite update or
        state from finite gradients (an inner optimizer's own overflow or bug). The
        common case, gradients of 1e30 whose square overflows Adam's second moment, is
        already caught by default: a gradient norm that overflows float32 is a spike,
        skipped even with the spike guard still warming up. Off by default because it
        makes every leaf's result wait for every other leaf's, a program XLA's fusion
        compiles in time growing faster than the leaf count
        (``benchmarks/bench_guard_compile.py``); it also reads the new state and updates
        once more.
      spike_factor: F > 1, the spike threshold as a multiple of the average gradient
        norm; ``None`` switches the spike guard off (its overflow check included).
      spike_warmup: admitted steps before the spike guard can fire, ≥ 1.
      spike_decay: decay ρ in [0, 1) of the norm's EMA (0.99: about the last 100 steps).
      spike_action: ``"skip"`` the spike step (counted in ``skipped_steps`` too) or
        ``"clip"`` its gradients to the average norm and step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`NanGuardState`; its
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"kernel": jnp.ones(2), "scale": jnp.full(2, 3.0)}
      >>> tx = nan_guard(optax.adam(1e-3), shrink_ratio=0.5)
      >>> state = tx.init(params)
      >>> grads = {"kernel": jnp.ones(2), "scale": jnp.array([jnp.nan, 0.0])}
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["scale"]  # (3 - 1) * 0.5 + 1
      Array([2., 2.], dtype=float32)
      >>> int(state.skipped_steps), int(state.shrunk_leaves), int(state.spike_steps)
      (1, 1, 0)
      >>> huge = {"kernel": jnp.full(2, 1e30), "scale": jnp.ones(2)}  # finite, |g|² is not
      >>> updates, state = tx.update(huge, state, params)
      >>> int(state.skipped_steps), int(state.spike_steps)
      (2, 1)

    References:
      Su, `Tiger <https://kexue.fm/archives/9512>`_, 2023; ``optax.apply_if_finite``.
    """
    check_transform("inner", inner)
    check_range("shrink_ratio", shrink_ratio, 0, 1, low_open=True)
    guard = spike.spike_guard(spike_factor, spike_warmup, spike_decay, spike_action)
    return _guarded(
        inner, shrink_ratio, _centre_rules(centre), guard, catch_inf, check_result=check_result
    )


def leafwise_guard(
    inner: optax.GradientTransformation,
    shrink_ratio: float,
    *,
    guard_nan: bool,
    catch_inf: bool,
    spike_args: tuple[Any, ...],
) -> optax.GradientTransformationExtraArgs:
    r""":func:`nan_guard` for an inner optimizer that decides per leaf, as Tiger does.

    The inner optimizer always steps: it is passed the extra argument
    ``discarded_leaves`` (:data:`DISCARDED_LEAVES`), a tree of scalar bools, set for the
    leaves whose gradient is not finite and for every leaf of a skipped spike, and must
    keep those leaves' state itself (:func:`~optax_ext.optimizers.tiger.scale_by_tiger`
    holds their momentum). The other leaves step; a bad leaf's update is replaced by the
    shrink toward its centre, and a skipped spike's updates are zero. Without
    ``guard_nan`` no leaf is checked, and only the spike guard (``spike_args``, as
    :func:`nan_guard`'s) acts. The counters are :class:`NanGuardState`'s.
    """
    check_transform("inner", inner)
    check_range("shrink_ratio", shrink_ratio, 0, 1, low_open=True, schedule=False)
    guard = spike.spike_guard(*spike_args)
    return _guarded(inner, shrink_ratio, DEFAULT_CENTRES, guard, catch_inf, guard_nan=guard_nan)


#: The extra argument through which :func:`leafwise_guard` names the discarded leaves.
DISCARDED_LEAVES = "discarded_leaves"


def _guarded(
    inner: optax.GradientTransformation,
    shrink_ratio: Any,
    centres: Any,
    guard: spike.SpikeGuard | None,
    catch_inf: bool,
    *,
    check_result: bool = False,
    guard_nan: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The one guard: :func:`nan_guard` (``guard_nan=None``: the whole inner step is
    skipped on any bad leaf) or :func:`leafwise_guard` (``guard_nan`` a bool: the inner
    optimizer steps and holds the discarded leaves itself)."""
    leafwise = guard_nan is not None
    check_leaves = guard_nan is not False
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # a fresh array per counter: a donated state must not hold one buffer twice
        zero = lambda: jnp.zeros([], jnp.int32)
        return NanGuardState(
            count=zero(),
            skipped_steps=zero(),
            shrunk_leaves=zero(),
            **spike.init_counters(),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "nan_guard", "it shrinks a bad leaf toward its centre")
        leaves, treedef = jax.tree.flatten(updates)
        if check_leaves:
            # the per-leaf check and the spike guard's norm share one read of each leaf
            checked = spike.check_leaves(leaves, catch_inf)
            bad, n_bad = treedef.unflatten(checked.bad), checked.count()
            norm = None if guard is None else checked.norm()
            updates = jax.tree.map(lambda g, b: jnp.where(b, jnp.zeros_like(g), g), updates, bad)
        else:
            bad, n_bad = treedef.unflatten([False] * len(leaves)), jnp.zeros([], jnp.int32)
            norm = None if guard is None else spike.global_norm(leaves)
        spiked = spike.check(guard, norm, state)
        updates = spike.scale_tree(updates, spiked.scale)
        spike_skip = None if guard is None else spiked.skip
        if leafwise:
            discarded = jax.tree.map(lambda b: either(b, spike_skip), bad)
            extra_args = {**extra_args, DISCARDED_LEAVES: discarded}
        inner_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        flags = [n_bad > 0] + (_nonfinite_flags((inner_updates, new_inner)) if check_result else [])
        # one decision every leaf selects on, computed once (see spike.any_flag)
        nonfinite = spike.any_flag(flags)
        skipped = spike.any_flag([nonfinite, spiked.skip])
        # what zeroes every update: the whole step skipped, or (leafwise) a spike alone
        zero_all = spike_skip if leafwise else skipped
        centre_of = path_labels(params, centres, default=0.0)

        def leaf(u, b, p, c):
            dtype = u.dtype
            if zero_all is not None:
                u = jnp.where(zero_all, 0.0, u)
            if b is not False:
                u = shrink_bad(b, u, p, c, shrink_ratio)
            return u.astype(dtype)

        out = jax.tree.map(leaf, inner_updates, bad, params, centre_of)
        if leafwise:
            new_inner_state = new_inner  # the inner optimizer held the discarded leaves
        else:
            new_inner_state = jax.tree.map(
                lambda n, o: jnp.where(skipped, o, n).astype(jnp.result_type(o)),
                new_inner,
                state.inner_state,
            )
        new_state = NanGuardState(
            count=optax.safe_increment(state.count),
            skipped_steps=spike.increment_if(skipped, state.skipped_steps),
            shrunk_leaves=spike.saturating_add(state.shrunk_leaves, n_bad),
            **spike.update_counters(guard, norm, spiked, ~nonfinite, state),
            inner_state=new_inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------- helpers


def shrink_bad(bad: Any, update: jax.Array, param: jax.Array, centre: Any, ratio: Any) -> jax.Array:
    r"""``update``, or for a discarded leaf (``bad``) the shrink toward its centre:
    :math:`\Delta\theta = (r - 1)(\theta - c)`, i.e. :math:`\theta \leftarrow c + r(\theta - c)`.

    In at least float32 (the caller casts). The one shrink of the package: this wrapper's
    and :func:`~optax_ext.optimizers.tiger.tiger`'s, which decides per leaf.
    """
    shrink = (ratio - 1.0) * (param.astype(work_dtype(param)) - centre)
    return jnp.where(bad, shrink, update)


def _nonfinite_flags(tree: Any) -> list[jax.Array]:
    """One scalar flag per floating leaf of ``tree``: whether it holds a NaN or ±inf."""
    leaves = jax.tree.leaves(tree)
    return [has_nonfinite(x) for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _centre_rules(centre: Any) -> Any:
    if centre is None:
        return DEFAULT_CENTRES
    if isinstance(centre, str | bytes):
        pass
    elif is_concrete_number(centre):
        return (
            (
                r"",
                float(check_range("centre", centre)),
            ),
        )
    elif isinstance(centre, Mapping | Sequence):
        items = centre.items() if isinstance(centre, Mapping) else centre
        for pattern, value in items:
            check_range(f"centre for {pattern!r}", value)
        return centre
    raise TypeError(
        f"centre must be None, a number or path rules {{regex: centre}}, got {centre!r}"
    )

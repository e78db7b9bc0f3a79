"""Amos: Adam-style steps scaled to each leaf's expected size, with self-tuned weight decay.

References: Tian & Parikh, "Amos: An Adam-style Optimizer with Adaptive Weight Decay
towards Model-Oriented Scale", https://arxiv.org/abs/2210.11693 (reference code:
google-research/jestimator); Su Jianlin's reading, https://kexue.fm/archives/9344.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    EMBEDDING,
    canonical_dtype,
    check_choice,
    check_float_params,
    check_range,
    check_updates_match,
    first_match,
    path_to_str,
    require_params,
    schedule_value,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import reject_cycle_length
from optax_ext._reductions import sum_of_squares
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "ScaleByAmosState",
    "amos",
    "amos_default_eta",
    "amos_default_shape",
    "scale_by_amos",
]

#: ``(path, shape) -> value``: paths are ``/``-joined as by ``optax_ext.tree_paths``.
LeafFn = Callable[[str, tuple[int, ...]], Any]


class ScaleByAmosState(NamedTuple):
    """State of Amos: counter, running ``g²`` (``v``) and decay accumulator ``b`` (both of
    each leaf's reduced shape), and the momentum buffer ``mu`` (``None`` without momentum)."""

    count: jax.Array  # int32, number of updates done
    v: optax.Updates
    b: optax.Updates
    mu: optax.Updates | None


# ------------------------------------------------------------- per-path defaults


def _is_embedding(path: str, shape: Sequence[int]) -> bool:
    return len(shape) >= 2 and first_match(path, [(EMBEDDING, True)], False)


def amos_default_eta(path: str, shape: Sequence[int]) -> float:
    """Default expected entry scale η of a leaf (Amos's per-variable hyperparameter).

    * scalars and 1-D leaves (biases, norm scales): 0.5;
    * embedding tables (path ending in ``embedding``, Flax ``(vocab, features)``):
      ``sqrt(1/features)``, the scale of Flax's ``nn.Embed`` initialiser, under which a
      row has unit expected norm. The kernel rule would give ``sqrt(1/vocab)``, which
      ties the step size to the vocabulary;
    * every other leaf is a kernel ``(in..., out)``: ``sqrt(1/fan_in)`` with
      ``fan_in = prod(shape[:-1])`` (LeCun scale). A ``DenseGeneral`` kernel with
      several output axes, e.g. Flax attention ``query (features, heads, head_dim)``,
      counts ``heads`` into ``fan_in``; override it if that matters.

    Example:
      >>> amos_default_eta("params/Dense_0/kernel", (64, 16))
      0.125
    """
    if len(shape) <= 1:
        return 0.5
    if _is_embedding(path, shape):
        return math.sqrt(1.0 / max(shape[-1], 1))  # max: 0-size leaves have no entries
    return math.sqrt(1.0 / max(math.prod(shape[:-1]), 1))


def amos_default_shape(path: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Default reduced shape of a leaf's ``v`` and ``b`` (broadcastable to the leaf).

    * scalars and 1-D leaves: ``()``, one statistic for the whole vector;
    * embedding tables: ``(vocab, 1)``, one per row, since rows are updated at very
      different rates (one per token);
    * kernels: ``(1, ..., 1, out)``, one per output unit (the last axis is kept).

    Example:
      >>> amos_default_shape("params/Dense_0/kernel", (64, 16))
      (1, 16)
    """
    if len(shape) <= 1:
        return ()
    if _is_embedding(path, shape):
        return (shape[0],) + (1,) * (len(shape) - 1)
    return (1,) * (len(shape) - 1) + (shape[-1],)


class _Leaf(NamedTuple):
    eta: float
    shape: tuple[int, ...]
    axes: tuple[int, ...]  # axes of the leaf averaged to get g²


def _leaf_config(path: str, shape: tuple[int, ...], eta_fn: LeafFn, shape_fn: LeafFn) -> _Leaf:
    eta = eta_fn(path, shape)
    try:
        eta_value = float(eta)
    except (TypeError, ValueError):
        eta_value = float("nan")
    if not (math.isfinite(eta_value) and eta_value >= 0):
        raise ValueError(
            f"eta_fn returned {eta!r} for {path!r} (shape {shape}); η, the expected scale "
            f"of the leaf's entries, must be a finite number >= 0"
        )
    reduced = tuple(int(n) for n in shape_fn(path, shape))
    ok = reduced == () or (
        len(reduced) == len(shape) and all(r in (1, n) for r, n in zip(reduced, shape, strict=True))
    )
    if not ok:
        raise ValueError(
            f"shape_fn returned {reduced} for {path!r} (shape {shape}); the reduced shape "
            f"must be () or have the leaf's rank with each axis either 1 or kept"
        )
    axes = (
        tuple(range(len(shape)))
        if reduced == ()
        else tuple(
            i for i, (r, n) in enumerate(zip(reduced, shape, strict=True)) if r == 1 and n != 1
        )
    )
    return _Leaf(eta_value, reduced, axes)


def _state_dtype(dtype: Any) -> Any:
    # v and b are reduced, so f32 costs little; b sums increments of order ξ² that a
    # bf16 accumulator would round away
    return work_dtype(dtype)


# -------------------------------------------------------------------- transform


def amos(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.999,
    momentum: float | None = None,
    *,
    eta_fn: LeafFn | None = None,
    shape_fn: LeafFn | None = None,
    clip_value: float | None = None,
    c: float = 0.25,
    d: float = 0.25,
    extra_l2: float = 0.0,
    eps: float = 2.0**-125,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The Amos optimizer, whose direction holds its learning rate: its output is added
    to the params as it is.

    With t the 0-based step, τ = t + 1, ξ = ``learning_rate(t)`` and η the leaf's
    expected entry scale; ``mean`` averages over the axes the reduced shape drops::

        g2   = mean(g²)                        (g first clipped to ±clip_value)
        v    ← β v + (1-β) g2
        rv   = (1 - β^τ) / max(v, eps)
        γ    = ξ² · rv · g2 / sqrt(1 + c·sqrt(ξ)·b)
        lr0  = ξ · η
        Δθ   = -( lr0·sqrt(rv)·g + (γ/2 + extra_l2)·θ ) / (1 + d·sqrt(lr0)·b)
        b    ← b + γ (1 + b)
        u    = Δθ, or with momentum μ: m ← μ m + (1-μ) Δθ, u = m   (no debiasing)

    ξ is a *relative* learning rate: a leaf's entries move by about ``ξ·η`` per step,
    and the decay ``γ/2 ≈ ξ²/2`` pulls them toward the scale η. ``b`` accumulates the
    decay already applied and slows both terms down, so Amos anneals itself: no
    separate weight decay or decay schedule is needed, and none should be chained.
    Because ξ enters inside the update (as ξ·η, ξ² and sqrt(ξ)), no direction free of
    the learning rate followed by ``optax.scale_by_learning_rate`` gives these steps:
    unlike the other aliases, Amos is not a chain, and nothing should follow it (a
    learning rate or ``optax.add_decayed_weights`` would change the algorithm).
    ``scale_by_amos`` is this same function under the direction's name;
    ``optax_ext.schedules`` has Su's derived inverse-time learning-rate schedule.

    ``v`` and ``b`` are kept in at least float32. The learning-rate schedule is called
    with t, the optax convention (the reference code passes t + 1).

    Args:
      learning_rate: ξ, a float or an optax schedule of the step; the authors suggest
        about ``1/sqrt(number of batches in the training data)``.
      eta_fn: ``(path, shape) -> η ≥ 0``, the expected scale of the leaf's entries;
        default :func:`amos_default_eta`. Negative or non-finite values are rejected.
      shape_fn: ``(path, shape) -> reduced shape`` of ``v`` and ``b``: ``()`` or the
        leaf's rank with axes set to 1 where statistics are shared; default
        :func:`amos_default_shape`. Return ``shape`` itself for per-entry statistics.
      beta: β in [0, 1) for the running mean of ``g²``; 1-β of the order of ξ.
      momentum: μ in [0, 1) for an EMA of the update, or ``None`` (no buffer).
      clip_value: clip gradient entries to ``[-clip_value, clip_value]`` (> 0) first,
        or ``None``.
      c: coefficient of the decay damping of γ (≥ 0).
      d: coefficient of the decay damping of the step (≥ 0).
      extra_l2: extra L2 coefficient ≥ 0 added to γ/2.
      eps: floor > 0 of ``v``.
      mu_dtype: dtype of the momentum buffer (default: the params').
      state_rounding: ``"nearest"`` or ``"stochastic"``: how a bf16/f16 momentum is
        written (:func:`~optax_ext.wrappers.rounding.write_state`).
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``. With
      ``optax.inject_hyperparams``, user ``eta_fn``/``shape_fn`` go in ``static_args``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 2)) / 2, "bias": jnp.zeros(2)}}
      >>> tx = amos(0.01)
      >>> state = tx.init(params)
      >>> jax.tree.map(jnp.shape, state.v)  # kernels keep the output axis, vectors a scalar
      {'dense': {'bias': (), 'kernel': (1, 2)}}
      >>> grads = {"dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Tian & Parikh, `Amos <https://arxiv.org/abs/2210.11693>`_, 2022;
      Su, `Amos and how to set learning rates <https://kexue.fm/archives/9344>`_, 2022.
    """
    check_range("learning_rate", learning_rate, 0)
    check_range("beta", beta, 0, 1, high_open=True, schedule=False)
    if momentum is not None:
        check_range("momentum", momentum, 0, 1, high_open=True, schedule=False)
    if clip_value is not None:
        check_range("clip_value", clip_value, 0, low_open=True, schedule=False)
    check_range("c", c, 0, schedule=False)
    check_range("d", d, 0, schedule=False)
    check_range("extra_l2", extra_l2, 0, schedule=False)
    check_range("eps", eps, 0, low_open=True, schedule=False)
    for name, fn in (("eta_fn", eta_fn), ("shape_fn", shape_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a function (path, shape) -> value or None, got {fn!r}")
    eta_fn = amos_default_eta if eta_fn is None else eta_fn
    shape_fn = amos_default_shape if shape_fn is None else shape_fn
    mu_dtype = canonical_dtype(mu_dtype)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)

    def config(path, x) -> _Leaf:
        return _leaf_config(path_to_str(path), tuple(x.shape), eta_fn, shape_fn)

    def init_fn(params):
        check_float_params(params, "amos")

        def zeros(path, x):
            # reduced from the param as the step reduces g², so v and b start with the
            # shardings the step gives them (a mesh's step 2 reuses step 1's program)
            cfg = config(path, x)
            return jnp.zeros_like(x, _state_dtype(x.dtype)).sum(cfg.axes).reshape(cfg.shape)

        v = jax.tree_util.tree_map_with_path(zeros, params)
        b = jax.tree_util.tree_map_with_path(zeros, params)
        mu = None if momentum is None else optax.tree.zeros_like(params, dtype=mu_dtype)
        return ScaleByAmosState(count=jnp.zeros([], jnp.int32), v=v, b=b, mu=mu)

    def update_fn(updates, state, params=None, **extra_args):
        reject_cycle_length(extra_args, "ox.amos")
        del extra_args
        require_params(params, "amos", "its step and decay are relative to each parameter")
        check_updates_match(updates, params, "amos")
        xi = schedule_value(learning_rate, state.count)
        tau = optax.safe_increment(state.count)
        no_l2 = isinstance(extra_l2, int | float) and extra_l2 == 0
        scalars = {}

        def step_scalars(work):
            # Computed once per dtype, not per leaf: each leaf would otherwise repeat
            # these scalar ops, and compile time grows with the number of ops.
            if work not in scalars:
                xi_w = jnp.asarray(xi, work)
                sqrt_xi = jnp.sqrt(xi_w)
                # 1 - β^τ as -expm1(τ·log β): no cancellation for β near 1 (β = 0 gives 1)
                debias = -jnp.expm1(tau * jnp.log(jnp.asarray(beta, work)))
                scalars[work] = (xi_w, sqrt_xi, jnp.square(xi_w), c * sqrt_xi, debias)
            return scalars[work]

        def leaf(path, g, v, b, theta):
            cfg = config(path, theta)
            state_dtype = v.dtype
            work = jnp.promote_types(g.dtype, state_dtype)
            xi_w, sqrt_xi, xi2, c_sqrt_xi, debias = step_scalars(work)
            g = g.astype(work)
            if clip_value is not None:
                g = jnp.clip(g, -clip_value, clip_value)
            # a sum over the static count, floored at 1: a 0-size leaf gives 0, not NaN
            n = max(math.prod(g.shape[a] for a in cfg.axes), 1)
            g2 = (sum_of_squares(g, cfg.axes) / n).reshape(v.shape)
            v = beta * v + (1.0 - beta) * g2
            rv = debias / jnp.maximum(v, eps)
            gamma = jax.lax.rsqrt(1.0 + c_sqrt_xi * b) * xi2 * rv * g2
            # lr0 = ξ·η and sqrt(lr0) = sqrt(ξ)·sqrt(η), η a Python number
            damping = 1.0 + (d * math.sqrt(cfg.eta)) * sqrt_xi * b
            # Δθ = a·g + c·θ with the coefficients formed at the reduced shape: two
            # full-size products and a sum instead of five full-size ops
            coef_g = -(xi_w * cfg.eta) * jnp.sqrt(rv) / damping
            decay = 0.5 * gamma if no_l2 else 0.5 * gamma + extra_l2
            coef_theta = -decay / damping
            delta = coef_g * g + coef_theta * theta.astype(work)
            b = b + gamma * (1.0 + b)
            return delta, v.astype(state_dtype), b.astype(state_dtype)

        out = jax.tree_util.tree_map_with_path(leaf, updates, state.v, state.b, params)
        delta, v, b = unzip_leaves(updates, out, 3)
        mu = state.mu
        if momentum is not None:
            mu = jax.tree.map(lambda m, u: momentum * m + (1.0 - momentum) * u, mu, delta)
            delta = mu
            mu = write_state(mu, state.mu, state_rounding, rounding_seed, state.count)
        new_updates = optax.tree.cast_like(delta, updates)
        return new_updates, ScaleByAmosState(count=tau, v=v, b=b, mu=mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: The Amos optimizer under its direction's name (the same function): the learning rate is
#: part of Amos's direction, so the direction is the whole optimizer.
scale_by_amos = amos

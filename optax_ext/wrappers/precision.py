"""Pure half-precision training: params, optimizer state and update in bf16, no float32 copy.

References: Zamirai et al., "Revisiting BFloat16 Training",
https://arxiv.org/abs/2010.06192; Su Jianlin, Tiger, https://kexue.fm/archives/9512.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import (
    check_choice,
    check_transform,
    path_predicate,
    path_to_str,
    require_params,
    work_dtype,
)
from optax_ext.wrappers.rounding import (
    _kahan_leaf,
    _seed_key_data,
    _sr_update,
    check_seed,
    is_low_precision,
    leaf_key,
    stochastic_round_to,
)

__all__ = [
    "PureBf16State",
    "pure_bf16",
]

_PARAMS_STREAM, _STATE_STREAM = 0, 1

#: State fields holding squares of gradients (second moments and their factors):
#: optax's ``nu`` (Adam, AdamW, RMSProp, AdaX, ...), Adafactor's ``v_row``/``v_col``/``v``,
#: Adagrad's ``sum_of_squares``, and the usual spellings of other libraries.
SQUARES = (
    r"(^|/)(nu|nu_hat|nu_max|v|v_hat|vhat|v_row|v_col|exp_avg_sq|second_moment"
    r"|sum_of_squares)(/|$)"
)


class PureBf16State(NamedTuple):
    """State of :func:`pure_bf16`.

    Attributes:
      count: int32, steps taken (folded into the rounding keys).
      key: ``uint32[2]``, the raw PRNG key made from the seed.
      inner_state: the wrapped optimizer's state, its float arrays stored in ``dtype``
        (second moments in bf16).
      compensation: with ``summation="kahan"`` the Kahan buffers (one per
        low-precision param, params' dtype); ``()`` with stochastic rounding.
    """

    count: jax.Array
    key: jax.Array
    inner_state: Any
    compensation: Any = ()


def _stored(x: Any) -> bool:
    """A state leaf kept in low precision: a float array (scalars such as injected
    hyperparameters and counters stay as they are)."""
    return (
        hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and getattr(x, "ndim", 0) >= 1
    )


def pure_bf16(
    inner: optax.GradientTransformation,
    seed: int = 0,
    *,
    dtype: Any = jnp.bfloat16,
    summation: str = "stochastic",
    second_moments: str | Callable[[str], bool] = SQUARES,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs any optimizer with bf16 params and a bf16 state, rounding stochastically.

    The recipe: cast the params to bf16 once, wrap the optimizer, apply the updates with
    ``optax.apply_updates``::

        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        tx = pure_bf16(tiger(1e-3))

    Each step, with t the step and every SR draw keyed by (seed, t, use, leaf):

    .. math::

        s_{32} &= \mathrm{float32}(s),\qquad
        (u, s'_{32}) = \text{inner.update}(\mathrm{float32}(g), s_{32}, \theta) \\
        s &\leftarrow \mathrm{SR}_{\text{bf16}}(s'_{32}),\qquad
        u' = \mathrm{SR}_{\text{bf16}}(\theta + u) - \theta\quad\text{(float32)}

    so the inner optimizer computes in float32, every float array of its state (moments,
    any param-shaped buffer; scalars and integer counters are left alone) is stored in
    ``dtype`` with unbiased stochastic rounding, and ``optax.apply_updates`` lands the
    params exactly on the stochastically rounded sum (see
    :func:`~optax_ext.wrappers.rounding.stochastic_round`). With
    ``summation="kahan"`` the params are summed with compensation instead
    (:func:`~optax_ext.wrappers.rounding.kahan_summation`, 2 more bytes per
    parameter); the state is still written with SR. Params already in float32 stay
    float32 (their updates pass through unrounded): cast the ones you want in bf16.

    Second moments are always stored in bf16. A leaf whose values are squares of
    gradients (ν ≈ (1 − β₂) g², decaying to 0 where the gradient does) needs float32's
    exponent range, which bf16 has and float16 does not: f16's smallest subnormal is
    2⁻²⁴ ≈ 6e-8 and its largest value 65504, so with ``dtype=jnp.float16`` Adam's ν
    would round to 0 on most steps once |g| ≲ 1e-3 — SR keeps E[ν] right, but the step
    m/(√ν + ε) is convex in ν and grows, 13× Adam's after 200 steps at g = 1e-5 — and
    would overflow to inf once |g| ≳ 256, making the step 0. So ``dtype`` applies to
    every other float leaf (momenta, where f16's 11 bits help), and a leaf whose path in
    the state tree (e.g. ``"0/nu/params/dense/kernel"``) matches ``second_moments`` is
    written to bf16 with SR whatever ``dtype`` is. If your optimizer keeps squares
    under other names, extend the pattern (or use ``dtype=jnp.bfloat16``, which stores
    everything in bf16).

    Args:
      inner: any optax transformation (an alias such as ``tiger(1e-3)``); ``update``
        calls it with the params.
      seed: an int with 0 ≤ seed < 2**32 seeding every rounding draw.
      dtype: the storage dtype of the state, ``jnp.bfloat16`` or ``jnp.float16``
        (second moments excepted, see above).
      summation: ``"stochastic"`` or ``"kahan"``, how updates are added to the params.
      second_moments: a regex searched in each state leaf's path, or a function of
        that path returning True, selecting the leaves of squares kept in bf16; the
        default :data:`SQUARES` matches optax's ``nu``, Adafactor's factors, Adagrad's
        ``sum_of_squares`` and the common spellings of other libraries.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`PureBf16State`;
      ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from optax_ext.optimizers.lion import lion
      >>> params = {"w": jnp.ones((2, 3), jnp.bfloat16)}
      >>> tx = pure_bf16(lion(1e-3))
      >>> state = tx.init(params)
      >>> state.inner_state[0].mu["w"].dtype
      dtype(bfloat16)
      >>> updates, state = tx.update({"w": jnp.ones((2, 3), jnp.bfloat16)}, state, params)
      >>> optax.apply_updates(params, updates)["w"].dtype
      dtype(bfloat16)

    References:
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_,
      2020; Ozkara et al., `Stochastic Rounding for LLM Training
      <https://arxiv.org/abs/2502.20566>`_, 2025.
    """
    check_transform("inner", inner)
    check_seed("seed", seed)
    check_choice("summation", summation, ("stochastic", "kahan"))
    dtype = jnp.dtype(dtype)
    check_choice("dtype", dtype, (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)))
    is_square = path_predicate("second_moments", second_moments)
    kahan = summation == "kahan"

    def storage(path, x):
        if not _stored(x):
            return x
        # the leaf's dtype is its storage from now on: update_fn rounds to old.dtype
        return x.astype(jnp.bfloat16 if is_square(path_to_str(path)) else dtype)

    def init_fn(params):
        inner_state = jax.tree_util.tree_map_with_path(storage, inner.init(params))
        comp = ()
        if kahan:
            comp = jax.tree.map(
                lambda p: jnp.zeros_like(p) if is_low_precision(p.dtype) else optax.MaskedNode(),
                params,
            )
        return PureBf16State(
            count=jnp.zeros([], jnp.int32),
            key=_seed_key_data(seed),
            inner_state=inner_state,
            compensation=comp,
        )

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "pure_bf16", "it rounds θ + update")
        widen = lambda x: x.astype(jnp.float32) if _stored(x) else x
        grads = jax.tree.map(lambda g: g.astype(work_dtype(g)), updates)
        updates, new_inner = inner.update(
            grads, jax.tree.map(widen, state.inner_state), params, **extra_args
        )
        old_leaves, treedef = jax.tree.flatten(state.inner_state)
        new_leaves = treedef.flatten_up_to(new_inner)
        stored = []
        for j, (old, new) in enumerate(zip(old_leaves, new_leaves, strict=True)):
            if _stored(old):
                key = leaf_key(state.key, state.count, _STATE_STREAM, j)
                new = stochastic_round_to(new, old.dtype, key)
            stored.append(jnp.asarray(new).astype(old.dtype))
        new_inner = treedef.unflatten(stored)

        u_leaves, u_def = jax.tree.flatten(updates)
        p_leaves = u_def.flatten_up_to(params)
        comp = state.compensation
        if kahan:
            is_masked = lambda x: isinstance(x, optax.MaskedNode)
            c_leaves, c_def = jax.tree.flatten(comp, is_leaf=is_masked)
            pairs = [_kahan_leaf(*leaf) for leaf in zip(c_leaves, u_leaves, p_leaves, strict=True)]
            out = [u for u, _ in pairs]
            comp = c_def.unflatten([c for _, c in pairs])
        else:
            out = [
                _sr_update(u, p, leaf_key(state.key, state.count, _PARAMS_STREAM, i))
                for i, (u, p) in enumerate(zip(u_leaves, p_leaves, strict=True))
            ]
        new_state = PureBf16State(
            count=optax.safe_increment(state.count),
            key=state.key,
            inner_state=new_inner,
            compensation=comp,
        )
        return u_def.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

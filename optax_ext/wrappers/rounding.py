"""Stochastic rounding and Kahan summation for low-precision (bf16, f16) parameters and states.

bf16 keeps 8 significant bits: round-to-nearest discards any update smaller than half
an ulp of the weight (0.20-0.39% of |w|), which is where sign optimizers' relative steps
(Tiger's lr·RMS(θ), Lion's lr) and every decoupled weight decay live. An optax
transform cannot change how ``optax.apply_updates`` rounds, but it can choose the
update: placed last in a chain, :func:`stochastic_round` returns

.. math:: u' = \\mathrm{SR}(p + u) - p \\quad\\text{(in float32)},

and ``optax.apply_updates`` (which adds in the promoted dtype, here float32, and casts
back to the params' dtype) lands exactly on the stochastically rounded sum.
:func:`kahan_summation` is the deterministic alternative, with a compensation buffer.
:func:`stochastic_round_to` is the low-level rounding that optimizers use to write a
bf16 state.

References:
  Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_,
  2020; Ozkara et al., `Stochastic Rounding for LLM Training
  <https://arxiv.org/abs/2502.20566>`_, AISTATS 2025; Kahan, "Further remarks on
  reducing truncation errors", CACM 8(1), 1965.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_choice, check_int, require_params

__all__ = [
    "KahanState",
    "StochasticRoundState",
    "kahan_summation",
    "stochastic_round",
    "stochastic_round_to",
]

#: The rounding modes a state can be written with.
STATE_ROUNDINGS = ("nearest", "stochastic")
_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype narrower than float32 (bf16, f16, fp8...)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


# ------------------------------------------------------------ the rounding itself


def stochastic_round_to(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    r"""Rounds float32 ``x`` to ``dtype`` stochastically: unbiased, E[SR(x)] = x.

    With ``lo ≤ x ≤ hi`` the two neighbours of x in ``dtype``:

    .. math:: \mathrm{SR}(x) = \begin{cases} hi & \text{with probability }
        (x - lo)/(hi - lo) \\ lo & \text{otherwise.} \end{cases}

    For bf16 (float32's upper 16 bits) this is done on the bit pattern: 16 uniform
    random bits are added below the kept bits of |x| and the sum is truncated, which
    rounds the magnitude up with exactly that probability, for either sign; ±inf stay,
    NaN stays NaN. Other low-precision dtypes (f16) use the two neighbours explicitly
    and a uniform draw (its 2^-23 resolution is far below f16's 11 bits, except deep in
    f16's subnormal range). Values already representable come back unchanged; a value
    beyond the dtype's largest finite number rounds like a cast (to inf for f16; for
    bf16 it rounds up to inf with the probability above, inf being bf16's next value).
    Float32 and wider dtypes, and non-float dtypes, are a plain cast: no randomness.

    Float32 subnormals (0 < |x| < 2^-126 ≈ 1.18e-38): the bf16 rounding, being integer
    arithmetic on the bits, rounds them without bias too (1e-40 gives bf16 subnormals
    averaging 1e-40, read back bit-exactly). But XLA:CPU flushes subnormals to ±0 in
    floating-point arithmetic, operands and results alike: on CPU a subnormal computed
    by arithmetic is already 0 when it gets here, a subnormal result reads as 0 in any
    later arithmetic (a sum, a mean, ``p + u``, the comparison ``y != 0``), and the f16
    path, whose probabilities are float arithmetic, rounds a float32 subnormal to ±0.
    So below 2^-126 expect zeros, not unbiasedness, from a computation on CPU; only the
    stored bits are unbiased. Normal values (every bf16 step and state in practice) are
    unaffected.

    Args:
      x: an array, computed in float32 (other dtypes are cast to float32 first).
      dtype: the target dtype, e.g. ``jnp.bfloat16``.
      key: a JAX PRNG key (typed or raw ``uint32[2]``); one draw per element.

    Returns:
      ``x`` rounded to ``dtype``, same shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.full(100_000, 1.0 + 2.0**-10)  # 1/8 of the way from 1 to the next bf16
      >>> y = stochastic_round_to(x, jnp.bfloat16, jax.random.key(0))
      >>> sorted({float(v) for v in y})
      [1.0, 1.0078125]
      >>> abs(float(y.astype(jnp.float32).mean()) - (1 + 2.0**-10)) < 1e-4
      True

    References:
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_,
      2020.
    """
    dtype = jnp.dtype(dtype)
    if not is_low_precision(dtype):
        return jnp.asarray(x).astype(dtype)
    x = jnp.asarray(x).astype(jnp.float32)
    if dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
        # adding to the magnitude bits and truncating rounds |x| up with probability
        # (low 16 bits) / 2^16; inf's mantissa is zero, so inf + noise truncates to inf
        truncated = jax.lax.bitcast_convert_type(
            (bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32
        )
        return jnp.where(jnp.isnan(x), x, truncated).astype(dtype)
    near = x.astype(dtype)
    near_f = near.astype(jnp.float32)
    towards = jnp.where(near_f > x, -jnp.inf, jnp.inf).astype(dtype)
    other_f = jnp.nextafter(near, towards).astype(jnp.float32)
    lo, hi = jnp.minimum(near_f, other_f), jnp.maximum(near_f, other_f)
    # hi - lo is a power of two and x - lo is exact (Sterbenz): p is exact
    p_up = (x - lo) / (hi - lo)
    up = jax.random.uniform(key, x.shape, jnp.float32) < p_up
    keep = (near_f == x) | ~jnp.isfinite(near_f) | ~jnp.isfinite(other_f)
    return jnp.where(keep, near_f, jnp.where(up, hi, lo)).astype(dtype)


def leaf_key(key: jax.Array, count: jax.Array, stream: int, index: int) -> jax.Array:
    """The key of one leaf at one step: ``key`` folded with the count, a stream, the index.

    The stream separates independent uses at the same step (the params' rounding and a
    state's), so every draw is a deterministic function of (seed, step, use, leaf):
    reproducible, checkpointable, and the same whatever the device layout.
    """
    if not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    for data in (count, stream, index):
        key = jax.random.fold_in(key, data)
    return key


#: Rounding seeds are 32-bit: ``jax.random.key`` keeps only the low 32 bits of a seed
#: (with 64-bit mode off), so 2**32 + s would draw exactly the bits of s.
SEED_LIMIT = 2**32


def check_seed(name: str, value: Any) -> Any:
    """Checks a rounding seed: an int with 0 ≤ seed < 2**32 (traced values pass through).

    ``jax.random.key(seed)`` keeps only the seed's low 32 bits, so a larger seed would
    silently give the same "independent" stream as a small one (2**32 and 0 draw the same
    bits), and one ≥ 2**63 overflows deep inside JAX; both are refused here, by name.
    """
    check_int(name, value, minimum=0)
    if not isinstance(value, jax.core.Tracer) and int(value) >= SEED_LIMIT:
        raise ValueError(
            f"{name} must be an int with 0 <= {name} < 2**32, got {value!r}: JAX keys keep "
            f"only a seed's low 32 bits, so it would draw the same random bits as "
            f"{int(value) % SEED_LIMIT}; pass a seed below 2**32 (e.g. {name} % 2**32)"
        )
    return value


def _seed_key_data(seed: int) -> jax.Array:
    # raw uint32 key data rather than a typed key: a plain array any checkpointer saves
    return jax.random.key_data(jax.random.key(seed))


def write_state(
    values: Any, like: Any, rounding: str = "nearest", seed: int = 0, count: Any = 0, stream=0
) -> Any:
    """Casts a tree of float32 values to the dtypes of ``like`` (the old state).

    With ``rounding="stochastic"`` a low-precision leaf is written with
    :func:`stochastic_round_to`, its key derived from ``seed``, the step ``count``,
    ``stream`` and the leaf's index (:func:`leaf_key`); other leaves are cast.
    Optimizers use it to store their moments when ``mu_dtype``/``nu_dtype`` is bf16.
    With stochastic rounding ``seed`` is checked as the optimizers' ``rounding_seed``
    (:func:`check_seed`), which optimizers should also check at construction.
    """
    check_choice("state_rounding", rounding, STATE_ROUNDINGS)
    leaves, treedef = jax.tree.flatten(values)
    like_leaves = treedef.flatten_up_to(like)
    stochastic = rounding == "stochastic" and any(is_low_precision(x.dtype) for x in like_leaves)
    if stochastic:
        check_seed("rounding_seed", seed)
    base = _seed_key_data(seed) if stochastic else None
    out = []
    for i, (v, old) in enumerate(zip(leaves, like_leaves, strict=True)):
        if stochastic and is_low_precision(old.dtype):
            out.append(stochastic_round_to(v, old.dtype, leaf_key(base, count, stream, i)))
        else:
            out.append(v.astype(old.dtype))
    return treedef.unflatten(out)


# ---------------------------------------------------------------- the transforms


class StochasticRoundState(NamedTuple):
    """State of :func:`stochastic_round`.

    Attributes:
      count: int32, steps taken; folded into the key so each step draws afresh.
      key: ``uint32[2]``, the raw PRNG key made from the seed (constant).
    """

    count: jax.Array
    key: jax.Array


def _sr_update(u: jax.Array, p: jax.Array, key: jax.Array) -> jax.Array:
    """``SR(p + u) - p`` in float32 for a low-precision ``p`` (else ``u`` unchanged)."""
    if not is_low_precision(p.dtype):
        return u
    p32 = p.astype(jnp.float32)
    target = stochastic_round_to(p32 + u.astype(jnp.float32), p.dtype, key)
    # float32, not p's dtype: SR(p+u) - p can need more bits than bf16 has (a tiny p,
    # a large step), and p + u' in bf16 would then round again
    return target.astype(jnp.float32) - p32


def stochastic_round(seed: int = 0) -> optax.GradientTransformationExtraArgs:
    r"""Makes ``optax.apply_updates`` round low-precision params stochastically.

    Placed **last** in a chain. For each bf16 or f16 leaf p with update u:

    .. math:: u' = \mathrm{SR}(p + u) - p,

    computed and returned in float32. ``optax.apply_updates(p, u')`` computes
    ``(p + u').astype(p.dtype)`` in float32: SR(p + u) and p are both representable in
    p's dtype and the difference of two such nearby values is exact in float32, so the
    sum is exactly SR(p + u) and the final cast changes nothing (where the difference is
    not exact, a tiny p with a step many ulps larger, the float32 sum is within one
    float32 ulp of SR(p + u) and the cast to bf16 or f16 still lands on it). An update
    below half an ulp, which round-to-nearest would drop, now moves the weight one ulp
    with probability |u|/ulp: E[p'] = p + u. Apply the updates with
    ``optax.apply_updates`` (or add in float32 and cast): adding u' to a bf16 p in bf16
    arithmetic would round a second time.

    Float32 and wider leaves get their update unchanged (no randomness). The draws are
    a function of (seed, step count, leaf index) only, so a run is bit-reproducible,
    resumes bit-identically from a checkpoint of the state, and rounds identically
    under ``jit``, ``pmap`` (every replica draws the same bits) and sharding.

    Args:
      seed: an int with 0 ≤ seed < 2**32, the seed of the rounding's random bits.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`StochasticRoundState`;
      ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(10_000, jnp.bfloat16)}
      >>> tx = optax.chain(optax.sgd(1e-3), stochastic_round(seed=0))
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(10_000, jnp.bfloat16)}  # step 1e-3: under half an ulp
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> moved = float((new["w"] != 1).mean())  # about 1e-3 / 2^-8 = 0.256 of them
      >>> 0.23 < moved < 0.28
      True
      >>> sgd = optax.sgd(1e-3)  # round-to-nearest: nothing moves
      >>> rtn, _ = sgd.update(grads, sgd.init(params))
      >>> bool((optax.apply_updates(params, rtn)["w"] == 1).all())
      True

    References:
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_,
      2020; Ozkara et al., `Stochastic Rounding for LLM Training
      <https://arxiv.org/abs/2502.20566>`_, 2025.
    """
    check_seed("seed", seed)

    def init_fn(params):
        del params
        return StochasticRoundState(count=jnp.zeros([], jnp.int32), key=_seed_key_data(seed))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "stochastic_round", "it rounds θ + update")
        leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        out = [
            _sr_update(u, p, leaf_key(state.key, state.count, 0, i))
            for i, (u, p) in enumerate(zip(leaves, p_leaves, strict=True))
        ]
        count = optax.safe_increment(state.count)
        return treedef.unflatten(out), StochasticRoundState(count=count, key=state.key)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class KahanState(NamedTuple):
    """State of :func:`kahan_summation`.

    Attributes:
      compensation: per low-precision leaf, the part of past updates that rounding lost
        (params' dtype); ``optax.MaskedNode()`` for float32 and wider leaves.
    """

    compensation: Any


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _kahan_leaf(c, u, p):
    """One leaf of compensated summation: (float32 update, new compensation)."""
    if _is_masked(c):
        return u, c
    p32 = p.astype(jnp.float32)
    y = u.astype(jnp.float32) + c.astype(jnp.float32)
    t = (p32 + y).astype(p.dtype).astype(jnp.float32)  # the rounded new weight
    step = t - p32  # what the weight actually moved: exact in float32
    lost = y - step
    # a NaN/inf update (or weight) makes the residual NaN; kept, it would poison every
    # later step even after the weight is restored. The residual is under half an ulp,
    # so dropping it costs at most that: reset it to 0 and let the buffer recover.
    lost = jnp.where(jnp.isfinite(lost), lost, 0.0)
    return step, lost.astype(c.dtype)


def kahan_summation() -> optax.GradientTransformationExtraArgs:
    r"""Compensated (Kahan) summation of the updates into low-precision params.

    Placed **last** in a chain. For each bf16 or f16 leaf p with update u and
    compensation c (params' dtype, starts at 0):

    .. math::

        y = u + c,\qquad t = \mathrm{round}(p + y),\qquad
        c \leftarrow y - (t - p),\qquad u' = t - p,

    with y, t − p and u' in float32 and c rounded back to the params' dtype.
    ``optax.apply_updates(p, u')`` gives exactly t (see :func:`stochastic_round` for
    why the float32 difference is exact). An update too small to move the weight is
    not lost but kept in c until the accumulated amount crosses half an ulp.
    Deterministic; costs one buffer of the params' size and dtype (2 bytes per bf16
    parameter). Float32 and wider leaves are passed through and get no buffer.

    A non-finite update (or weight) passes through like plain summation (u' is NaN or
    inf there), but its compensation is reset to 0 rather than kept as NaN (inf − inf):
    once the weight is finite again (restored, or the step skipped by a guard) the
    following updates are summed as before, losing at most the half ulp the buffer held.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`KahanState`; ``update``
      needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones(4, jnp.bfloat16)}
      >>> tx = optax.chain(optax.sgd(1e-3), kahan_summation())
      >>> state = tx.init(params)
      >>> for _ in range(10):  # ten steps of 1e-3, each under half an ulp (2^-9)
      ...     updates, state = tx.update({"w": jnp.ones(4)}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["w"]  # 1 - 0.01, to bf16's resolution (round-to-nearest stays at 1)
      Array([0.988281, 0.988281, 0.988281, 0.988281], dtype=bfloat16)

    References:
      Kahan, "Further remarks on reducing truncation errors", CACM 8(1), 1965;
      Zamirai et al., `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_,
      2020.
    """

    def init_fn(params):
        comp = lambda p: jnp.zeros_like(p) if is_low_precision(p.dtype) else optax.MaskedNode()
        return KahanState(compensation=jax.tree.map(comp, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "kahan_summation", "it rounds θ + update")
        out = jax.tree.map(_kahan_leaf, state.compensation, updates, params, is_leaf=_is_masked)
        pick = lambda i: jax.tree.map(
            lambda _, o: o[i], state.compensation, out, is_leaf=_is_masked
        )
        return pick(0), KahanState(compensation=pick(1))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

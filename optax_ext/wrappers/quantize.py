"""8-bit optimizer states: block-wise absmax scaling with the dynamic (tree) quantisation map.

Reference: Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization", ICLR 2022, https://arxiv.org/abs/2110.02861.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import (
    check_choice,
    check_int,
    check_transform,
    explicitly_sharded,
    path_to_str,
)

__all__ = [
    "SECOND_MOMENTS",
    "QuantizedArray",
    "QuantizedState",
    "dequantize",
    "dynamic_map",
    "quantize",
    "quantize_state",
]

#: State fields holding second moments (non-negative, quantised with the unsigned map):
#: optax's ``nu`` (Adam, AdamW, AdaX, ...), and the usual spellings of other libraries.
SECOND_MOMENTS = r"(^|/)(nu|nu_hat|nu_max|v|v_hat|vhat|exp_avg_sq|second_moment)(/|$)"
CODES = ("dynamic", "linear")


class QuantizedArray(NamedTuple):
    """One state leaf in 8 bits.

    Attributes:
      codes: the leaf's shape; ``int8`` for the signed map (momenta), ``uint8`` for the
        unsigned map (second moments). The dtype says which map decodes it.
      absmax: float32, one per block of ``block`` consecutive elements of the
        flattened leaf (the last block may be shorter): the block's largest |value|.
    """

    codes: jax.Array
    absmax: jax.Array


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with its large moments quantised."""

    inner_state: Any


# ------------------------------------------------------------------- the 8-bit maps


def _magnitude_bits(signed: bool) -> int:
    return 7 if signed else 8


def dynamic_map(signed: bool) -> np.ndarray:
    r"""The values of the dynamic quantisation map, indexed by magnitude code.

    A magnitude code of M bits (7 after the sign bit of the signed map, 8 for the
    unsigned one) reads as: z leading zero bits (a decimal exponent), a 1 (the flag),
    then ``M - 1 - z`` linear fraction bits f:

    .. math:: v(z, f) = 10^{-z}\,\Big(a_z + (1 - a_z)\,\frac{f + 1}{2^{M-1-z}}\Big),

    with a_z = 0.1 (each decade (0.1, 1]·10^-z split into equal steps, the finest at the
    top) except for the last, single-value decade (a = 0, the value 10^-(M-1)); the
    all-zero code is 0. The code ``2^(M-1-z) + f`` grows with the value, the largest
    is exactly 1 and the smallest non-zero value is 10^-(M-1): 10^-6 (signed) or 10^-7
    (unsigned) of the block's absmax. The top decade has the finest steps, 1.4-14%
    (signed) or 0.7-7% (unsigned) of the value; each lower decade has one fraction bit
    fewer, so its steps are twice as coarse. A signed code is ±(magnitude code) in int8.

    Returns:
      A float64 array of ``2^M`` values, increasing, from 0 to 1.
    """
    m_bits = _magnitude_bits(signed)
    values = [0.0]
    for code in range(1, 2**m_bits):
        e = code.bit_length() - 1  # the flag's position: z = m_bits - 1 - e
        z, n = m_bits - 1 - e, 2**e
        a = 0.1 if z < m_bits - 1 else 0.0
        values.append(10.0**-z * (a + (1 - a) * (code - n + 1) / n))
    return np.asarray(values)


def _encode_dynamic(y: jax.Array, m_bits: int) -> jax.Array:
    """Nearest magnitude code of ``y`` in [0, 1] (int32), computed from the map's form.

    In decade z (10^-(z+1) < y ≤ 10^-z) the map's values, together with the top of the
    next decade down, form the grid 10^-z(a + (1-a)k/n), k = 0..n; the nearest grid
    point's code is n - 1 + k, so no search through the table is needed.
    """
    scale = jnp.ones_like(y)
    n = jnp.full_like(y, 2.0 ** (m_bits - 1))
    for j in range(1, m_bits):  # z = how many of the thresholds 10^-j lie at or above y
        below = y <= 10.0**-j
        scale = jnp.where(below, scale * 10.0, scale)
        n = jnp.where(below, n * 0.5, n)
    a = jnp.where(n == 1.0, 0.0, 0.1)
    k = jnp.clip(jnp.round((y * scale - a) * n * jnp.where(n == 1.0, 1.0, 1 / 0.9)), 0.0, n)
    return (n - 1.0 + k).astype(jnp.int32)


def _encode(y: jax.Array, signed: bool, code: str) -> jax.Array:
    """8-bit codes of ``y = x / absmax`` (in [-1, 1]): int8 signed or uint8 unsigned."""
    m_bits = _magnitude_bits(signed)
    mag = jnp.abs(y) if signed else jnp.maximum(y, 0.0)
    if code == "dynamic":
        m = _encode_dynamic(jnp.minimum(mag, 1.0), m_bits)
    else:
        m = jnp.round(jnp.minimum(mag, 1.0) * (2**m_bits - 1)).astype(jnp.int32)
    if signed:
        return jnp.where(y < 0, -m, m).astype(jnp.int8)
    return m.astype(jnp.uint8)


def _decode_dynamic(m: jax.Array, m_bits: int) -> jax.Array:
    """The map's value of magnitude codes ``m`` (int32), computed from the map's form.

    A table lookup would be a gather, which XLA:CPU runs element by element at a few
    GB/s; the flag's position ``e`` comes from comparisons, the rest is arithmetic.
    """
    inv_n = jnp.ones(m.shape, jnp.float32)
    scale = jnp.full(m.shape, 10.0 ** -(m_bits - 1), jnp.float32)
    for e in range(1, m_bits):  # 1/n = 2^-e with e the flag's position, scale = 10^-z
        above = m >= 2**e
        inv_n = jnp.where(above, 2.0**-e, inv_n)
        scale = jnp.where(above, np.float32(10.0 ** -(m_bits - 1 - e)), scale)
    # multiplications only: XLA then recomputes the decode inside each consumer
    # instead of writing the decoded float32 state to memory
    a = jnp.where(m < 2, 0.0, 0.1).astype(jnp.float32)
    frac = (m.astype(jnp.float32) + 1.0) * inv_n - 1.0
    return jnp.where(m == 0, 0.0, scale * (a + (1.0 - a) * frac))


def _decode(codes: jax.Array, code: str) -> jax.Array:
    """Values in [-1, 1] (float32) of 8-bit codes; the codes' dtype names the map."""
    signed = codes.dtype == jnp.int8
    m_bits = _magnitude_bits(signed)
    m = jnp.abs(codes.astype(jnp.int32)) if signed else codes.astype(jnp.int32)
    if code == "dynamic":
        mag = _decode_dynamic(m, m_bits)
    else:
        mag = m.astype(jnp.float32) / (2**m_bits - 1)
    return jnp.where(codes < 0, -mag, mag) if signed else mag


# ------------------------------------------------------------ blocks of a leaf


def _flatten(x: jax.Array) -> jax.Array:
    """``x.reshape(-1)``; a leaf sharded explicitly (``AxisType.Explicit``) is gathered
    first, since its flattened layout has no sharding JAX can infer."""
    if explicitly_sharded(x):
        x = jax.sharding.reshard(x, jax.sharding.PartitionSpec())
    return x.reshape(-1)


def _split(flat: jax.Array, block: int) -> list[jax.Array]:
    """The full blocks as a (n, block) matrix, and the shorter last block as (1, r)."""
    full = flat.size // block
    parts = []
    if full:
        parts.append(flat[: full * block].reshape(full, block))
    if flat.size % block:
        parts.append(flat[full * block :].reshape(1, -1))
    return parts


def _absmax_rows(part: jax.Array) -> jax.Array:
    """max |x| of each row, shape (rows, 1), computed on the bit patterns.

    For non-negative floats the uint32 pattern orders like the value (NaN above inf, so
    NaN propagates). An integer reduction stays an XLA reduction that fuses the
    elementwise update producing ``part``; a float32 max on XLA:CPU goes to a library
    kernel that needs ``part`` written to memory first (4 bytes per element more).
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(part), jnp.uint32)
    top = jnp.max(bits, axis=1, keepdims=True)
    return jax.lax.bitcast_convert_type(top, jnp.float32)


def quantize(x: jax.Array, *, signed: bool, block: int = 2048, code: str = "dynamic"):
    """A :class:`QuantizedArray` of ``x``: per block of the flattened leaf, the absmax
    (float32) and each value's nearest 8-bit code of ``value / absmax``."""
    codes, absmax = [], []
    for part in _split(_flatten(x.astype(jnp.float32)), block):
        amax = _absmax_rows(part)
        inv = jnp.where(amax > 0, 1.0 / amax, 0.0)  # an all-zero block codes as zeros
        codes.append(_encode(part * inv, signed, code).reshape(-1))
        absmax.append(amax.reshape(-1))
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs)
    return QuantizedArray(codes=cat(codes).reshape(x.shape), absmax=cat(absmax))


def dequantize(q: QuantizedArray, *, block: int = 2048, code: str = "dynamic") -> jax.Array:
    """The float32 values a :class:`QuantizedArray` stands for."""
    flat = _flatten(q.codes)
    out, start = [], 0
    for part in _split(flat, block):
        amax = q.absmax[start : start + part.shape[0]][:, None]
        out.append((_decode(part, code) * amax).reshape(-1))
        start += part.shape[0]
    return (out[0] if len(out) == 1 else jnp.concatenate(out)).reshape(q.codes.shape)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


# ----------------------------------------------------------------- the wrapper


def quantize_state(
    inner: optax.GradientTransformation,
    bits: int = 8,
    block: int = 2048,
    min_size: int = 4096,
    *,
    second_moments: str | Callable[[str], bool] = SECOND_MOMENTS,
    keep_float: str | None = None,
    code: str = "dynamic",
) -> optax.GradientTransformationExtraArgs:
    r"""Stores the inner optimizer's moments in 8 bits: int8 codes, one float32 scale per block.

    Which leaves: every floating leaf of the inner state that has the shape of some
    parameter and at least ``min_size`` elements (momenta, second moments, and any
    other param-shaped buffer, e.g. Muon's momentum); counters, scalars, factored
    statistics and small tensors (biases, norms) stay as they are. Each chosen leaf is
    flattened and cut into blocks of ``block`` elements (the last may be shorter); a
    block keeps its absmax A in float32 and each value x the 8-bit code nearest to x/A
    in the dynamic map (:func:`dynamic_map`: a decimal exponent and linear fraction
    bits, about 7 orders of magnitude below A, finest near A).
    Every step, inside the same jitted update:

    .. math::

        s_{32} = A \cdot \mathrm{map}[c],\qquad
        (u, s'_{32}) = \text{inner.update}(g, s_{32}, \theta),\qquad
        (c, A) \leftarrow \mathrm{quantise}(s'_{32}),

    so the inner optimizer computes in float32 and only storage is 8-bit.

    Signed or unsigned map: the state cannot be inspected for signs at ``init`` (it is
    zeros, or abstract), so a leaf is a **second moment** — unsigned map, uint8 codes,
    twice the resolution, negative values clamp to 0 — when its path in the state tree
    matches ``second_moments`` (a regex searched in paths like ``"0/nu/params/dense/
    kernel"``; the default matches optax's ``nu`` field and common spellings, see
    :data:`SECOND_MOMENTS`), or a function of that path returning True. Every other
    leaf gets the signed map (int8 codes). The codes' dtype records the choice, so
    nothing else is stored. Leaves whose path matches ``keep_float`` are not quantised.

    A linear int8 map (``code="linear"``) is offered only for comparison: a second
    moment stored linearly rounds its small entries to 0, and 1/√v then explodes.

    Args:
      inner: the optax transformation whose state to store in 8 bits.
      bits: code width; only 8 is implemented.
      block: elements per absmax block, an int ≥ 1 (Dettmers et al.: 2048).
      min_size: leaves with fewer elements stay in float, an int ≥ 0 (bitsandbytes: 4096).
      second_moments: regex (or predicate) on the state path selecting unsigned leaves.
      keep_float: regex on the state path of leaves never to quantise (``None``: none).
      code: ``"dynamic"`` (default) or ``"linear"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`QuantizedState`, whose
      quantised leaves are :class:`QuantizedArray` (a plain pytree of arrays:
      checkpoints like any other state).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"w": jnp.ones((64, 128))}
      >>> tx = quantize_state(optax.adamw(1e-3))
      >>> state = tx.init(params)
      >>> adam = state.inner_state[0]
      >>> adam.mu["w"].codes.dtype, adam.nu["w"].codes.dtype, adam.mu["w"].absmax.shape
      (dtype('int8'), dtype('uint8'), (4,))
      >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, ICLR 2022.
    """
    check_transform("inner", inner)
    check_choice("bits", bits, (8,))
    check_int("block", block, minimum=1)
    check_int("min_size", min_size, minimum=0)
    check_choice("code", code, CODES)
    if callable(second_moments):
        is_second = second_moments
    else:
        try:
            pattern = re.compile(second_moments)
        except (TypeError, re.error) as e:
            raise ValueError(
                f"second_moments must be a regular expression or a function of the state "
                f"path, got {second_moments!r}: {e}"
            ) from None
        is_second = lambda path: bool(pattern.search(path))
    try:
        keep = re.compile(keep_float) if keep_float is not None else None
    except (TypeError, re.error) as e:
        raise ValueError(
            f"keep_float must be a regular expression or None, got {keep_float!r}: {e}"
        ) from None

    def init_fn(params):
        shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}

        def store(path, x):
            s = path_to_str(path)
            chosen = (
                hasattr(x, "dtype")
                and jnp.issubdtype(x.dtype, jnp.floating)
                and tuple(x.shape) in shapes
                and math.prod(x.shape) >= max(min_size, 1)
                and not (keep is not None and keep.search(s))
            )
            if not chosen:
                return x
            return quantize(x, signed=not is_second(s), block=block, code=code)

        inner_state = jax.tree_util.tree_map_with_path(store, inner.init(params))
        return QuantizedState(inner_state=inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        old = state.inner_state
        widened = jax.tree.map(
            lambda x: dequantize(x, block=block, code=code) if _is_quantized(x) else x,
            old,
            is_leaf=_is_quantized,
        )
        updates, new = inner.update(updates, widened, params, **extra_args)
        requantise = lambda o, n: (
            quantize(n, signed=o.codes.dtype == jnp.int8, block=block, code=code)
            if _is_quantized(o)
            else n
        )
        new = jax.tree.map(requantise, old, new, is_leaf=_is_quantized)
        return updates, QuantizedState(inner_state=new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

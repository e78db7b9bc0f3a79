"""8-bit and 4-bit optimizer states: block-wise absmax scaling with the dynamic (tree)
quantisation map; in 4 bits, second moments on a linear map without zero, rank-1 scaled.

References: Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization", ICLR 2022, https://arxiv.org/abs/2110.02861; Li, Chen, Zhu, "Memory
Efficient Optimizers with 4-bit States", NeurIPS 2023, https://arxiv.org/abs/2309.01507
(section 4.1, the zero-point problem of a second moment's map).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
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
    path_predicate,
    path_to_str,
)
from optax_ext.wrappers.rounding import _seed_key_data, check_seed, leaf_key

__all__ = [
    "SECOND_MOMENTS",
    "LinearQuantizedArray",
    "NothingQuantizedWarning",
    "Quantized4Array",
    "Quantized4State",
    "QuantizedArray",
    "QuantizedState",
    "RankOne4Array",
    "Unsigned4Array",
    "code_of",
    "dequantize",
    "dynamic_map",
    "linear4_map",
    "quantize",
    "quantize4",
    "quantize_state",
]

#: State fields holding second moments (non-negative, quantised with the unsigned map):
#: optax's ``nu`` (Adam, AdamW, AdaX, ...), and the usual spellings of other libraries.
#: Searched in a leaf's *state part* (its state path without the parameter's path, e.g.
#: ``"0/nu"``) and anchored at its end: the field directly holding the parameter-shaped
#: tree decides, never a parameter name (a module ``v``) nor an enclosing label.
SECOND_MOMENTS = r"(^|/)(nu|nu_hat|nu_max|v|v_hat|vhat|exp_avg_sq|second_moment)$"
CODES = ("dynamic", "linear")
ROUNDINGS = ("auto", "stochastic", "nearest")

#: NamedTuple state fields whose name misleads :data:`SECOND_MOMENTS`, by state class:
#: ``{class name: {field: is a second moment}}``, applied with the default only. Adan's
#: ``v`` is an EMA of gradient differences (signed), its ``n`` the second moment
#: (Xie et al. 2022, https://arxiv.org/abs/2208.06677).
_FIELD_RULES = {"ScaleByAdanState": {"v": False, "n": True}}

_NONFINITE_CODE = -128  # the one int8 value a signed magnitude code (±0..127) never takes
_TINY = float(np.finfo(np.float32).tiny)  # 1/absmax overflows for a subnormal absmax


class QuantizedArray(NamedTuple):
    """One state leaf in 8 bits, on the dynamic map (:func:`dynamic_map`).

    Attributes:
      codes: the leaf's shape; ``int8`` for the signed map (momenta), ``uint8`` for the
        unsigned map (second moments). The dtype says which map decodes it; the signed
        code -128 stands for a non-finite value (decoded as NaN).
      absmax: float32, one per block of ``block`` consecutive elements of the
        flattened leaf (the last block may be shorter): the block's largest finite
        |value|; shaped ``(*shape[:k], n)`` when the blocks start at axis k
        (:func:`_encode_blocks`), ``(n,)`` otherwise.
    """

    codes: jax.Array
    absmax: jax.Array


class LinearQuantizedArray(QuantizedArray):
    """A :class:`QuantizedArray` on the linear map (``code="linear"``).

    Its own class, so that the map that wrote the codes is part of the state's type:
    :func:`optax_ext.checkpoint.restore_train_state` then refuses a checkpoint written
    under one map and restored under the other, which would misread every code.
    """

    __slots__ = ()


_CODE_CLASSES = {"dynamic": QuantizedArray, "linear": LinearQuantizedArray}


def code_of(q: QuantizedArray) -> str:
    """The map (``"dynamic"`` or ``"linear"``) that wrote a :class:`QuantizedArray`."""
    return "linear" if isinstance(q, LinearQuantizedArray) else "dynamic"


class QuantizedState(NamedTuple):
    """State of :func:`quantize_state`: the inner state with its large moments quantised."""

    inner_state: Any


class NothingQuantizedWarning(UserWarning):
    """:func:`quantize_state` found moments to store, but none with ``min_size`` elements:
    the state stays in float32 and the wrapper saves nothing."""


# ------------------------------------------------------------------- the 8-bit maps


def _magnitude_bits(signed: bool, bits: int = 8) -> int:
    return bits - 1 if signed else bits


def dynamic_map(signed: bool, bits: int = 8) -> np.ndarray:
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

    The table is what each code decodes to. Encoding is to the nearest value, except
    that on the unsigned map (second moments) a positive value never takes the code of
    0: below half the smallest value it takes that value, 10^-7 of the block's absmax
    (see :func:`quantize`).

    With ``bits=4`` (signed only: the momenta of :func:`quantize4`) M = 3 and the
    magnitudes are 0, 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1 (Li et al. 2023's signed
    dynamic-exponent map).

    Returns:
      A float64 array of ``2^M`` values, increasing, from 0 to 1.
    """
    m_bits = _magnitude_bits(signed, bits)
    values = [0.0]
    for code in range(1, 2**m_bits):
        e = code.bit_length() - 1  # the flag's position: z = m_bits - 1 - e
        z, n = m_bits - 1 - e, 2**e
        a = 0.1 if z < m_bits - 1 else 0.0
        values.append(10.0**-z * (a + (1 - a) * (code - n + 1) / n))
    return np.asarray(values)


def _encode_dynamic(y: jax.Array, m_bits: int, noise: jax.Array | None = None) -> jax.Array:
    """Nearest magnitude code of ``y`` in [0, 1] (int32), computed from the map's form.

    In decade z (10^-(z+1) < y ≤ 10^-z) the map's values, together with the top of the
    next decade down, form the grid 10^-z(a + (1-a)k/n), k = 0..n; the nearest grid
    point's code is n - 1 + k, so no search through the table is needed. With
    ``noise`` (uniform in [0, 1)) k = floor(t + noise) for the grid position t instead:
    stochastic rounding between the two neighbouring values, up with probability
    equal to the fraction of the gap, so E[decoded value] = y (the grid is linear in k).
    """
    scale = jnp.ones_like(y)
    n = jnp.full_like(y, 2.0 ** (m_bits - 1))
    for j in range(1, m_bits):  # z = how many of the thresholds 10^-j lie at or above y
        below = y <= 10.0**-j
        scale = jnp.where(below, scale * 10.0, scale)
        n = jnp.where(below, n * 0.5, n)
    a = jnp.where(n == 1.0, 0.0, 0.1)
    t = (y * scale - a) * n * jnp.where(n == 1.0, 1.0, 1 / 0.9)
    k = jnp.clip(jnp.round(t) if noise is None else jnp.floor(t + noise), 0.0, n)
    return (n - 1.0 + k).astype(jnp.int32)


def _encode(y: jax.Array, signed: bool, code: str) -> jax.Array:
    """8-bit codes of ``y = x / absmax`` (in [-1, 1]): int8 signed or uint8 unsigned.

    The nearest code, except that on the unsigned dynamic map a positive ``y`` below
    half the smallest non-zero value (5·10^-8) takes that value's code, not 0: see
    :func:`quantize`. The linear map stays plain nearest rounding (a comparison).

    A non-finite ``y`` (the value was NaN or ±inf) gets the signed map's spare code
    -128, decoded as NaN, as a float32 state would keep it non-finite. The unsigned map
    has no spare code: +inf and NaN take the top code (the block's absmax, the largest
    finite second moment of the block), -inf clamps to 0 like any negative value.
    """
    m_bits = _magnitude_bits(signed)
    mag = jnp.abs(y) if signed else jnp.maximum(y, 0.0)
    if code == "dynamic":
        m = _encode_dynamic(jnp.minimum(mag, 1.0), m_bits)
        if not signed:
            # a second moment is a divisor (m / (sqrt(v) + eps)): rounded to 0, the step
            # of an element whose momentum's code is not 0 becomes m / eps
            m = jnp.where(mag > 0.0, jnp.maximum(m, 1), m)
    else:
        m = jnp.round(jnp.minimum(mag, 1.0) * (2**m_bits - 1)).astype(jnp.int32)
    if signed:
        m = jnp.where(y < 0, -m, m)
        return jnp.where(jnp.isfinite(y), m, _NONFINITE_CODE).astype(jnp.int8)
    return jnp.where(jnp.isnan(y), 2**m_bits - 1, m).astype(jnp.uint8)


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
    """Values in [-1, 1] (float32) of 8-bit codes; the codes' dtype names the map
    (the signed code -128 decodes as NaN)."""
    signed = codes.dtype == jnp.int8
    m_bits = _magnitude_bits(signed)
    m = jnp.abs(codes.astype(jnp.int32)) if signed else codes.astype(jnp.int32)
    if code == "dynamic":
        mag = _decode_dynamic(m, m_bits)
    else:
        mag = m.astype(jnp.float32) / (2**m_bits - 1)
    if not signed:
        return mag
    value = jnp.where(codes < 0, -mag, mag)
    return jnp.where(codes == _NONFINITE_CODE, jnp.nan, value)


# ------------------------------------------------------------ blocks of a leaf


def _split(flat: jax.Array, block: int) -> list[jax.Array]:
    """The full blocks as a (n, block) matrix, and the shorter last block as (1, r)."""
    full = flat.size // block
    parts = []
    if full:
        parts.append(flat[: full * block].reshape(full, block))
    if flat.size % block:
        parts.append(flat[full * block :].reshape(1, -1))
    return parts


def _finite_absmax(x: jax.Array, axis: Any) -> jax.Array:
    """Largest finite |x| along ``axis`` (kept, size 1), float32; 0 where there is none.

    A NaN or inf entry is left out, so one bad gradient element does not make every
    other value of its block decode as NaN (x · A with A = NaN, or 0 · inf). One plain
    float reduction, the same program on every backend.
    """
    a = jnp.abs(x)
    return jnp.max(jnp.where(a < jnp.inf, a, 0.0), axis=axis, keepdims=True)


def _inverse(amax: jax.Array) -> jax.Array:
    """1/absmax; 0 for an all-zero block and for a subnormal absmax (whose 1/absmax
    would overflow to inf), which then code as zeros."""
    return jnp.where(amax >= _TINY, 1.0 / amax, 0.0)


def _cat(xs: list[jax.Array]) -> jax.Array:
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs)


def _block_axis(shape: tuple[int, ...], block: int) -> int | None:
    """Where a leaf's blocks start: the largest k < ndim with ``prod(shape[k:])`` a
    multiple of ``block`` (the blocks then never cross an index of the axes before k,
    and the absmax has shape ``shape[:k] + (prod(shape[k:]) // block,)``); ``None`` when
    there is none (the flattened leaf ends in a shorter block)."""
    for k in range(len(shape) - 1, -1, -1):
        if math.prod(shape[k:]) % block == 0:
            return k
    return None


def _absmax_shape(shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """The absmax's shape for a leaf of ``shape`` (:func:`_block_axis`)."""
    k = _block_axis(shape, block)
    if k is None:
        return (-(-math.prod(shape) // block),)
    return (*shape[:k], math.prod(shape[k:]) // block)


def _explicit_spec(x: jax.Array) -> tuple | None:
    """``x``'s PartitionSpec padded to its ndim, if its sharding is explicit; else None."""
    if not explicitly_sharded(x):
        return None
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _shards(x: jax.Array, entry: Any) -> int:
    """How many pieces a spec entry (None, a mesh axis name, or a tuple of them) cuts into."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    mesh = jax.typeof(x).sharding.mesh
    return math.prod(mesh.shape[n] for n in names)


def _shards_hold_whole_blocks(x: Any, block: int) -> bool:
    """Whether every shard of an explicitly sharded leaf holds whole blocks of ``block``
    elements (true for any leaf that is not explicitly sharded).

    Blocks run along the flattened leaf from axis k on (:func:`_block_axis`); a shard
    holds whole ones when no axis after k is sharded and the shard's run along axes
    k... (its piece of axis k times the rest) is a multiple of ``block``.
    """
    spec = _explicit_spec(x)
    if spec is None or all(e is None for e in spec):
        return True  # replicated: every device holds every block
    k = _block_axis(tuple(x.shape), block)
    if k is None or any(e is not None for e in spec[k + 1 :]):
        return False
    return (x.shape[k] // _shards(x, spec[k]) * math.prod(x.shape[k + 1 :])) % block == 0


def _reshape(x: jax.Array, shape: tuple[int, ...], spec: tuple | None) -> jax.Array:
    """``x.reshape(shape)``; under an explicit sharding, with the output's ``spec`` named
    (JAX cannot infer it when axes are merged and split in one reshape)."""
    if spec is None:
        return x.reshape(shape)
    mesh = jax.typeof(x).sharding.mesh
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return jax.lax.reshape(x, shape, out_sharding=out)


def _to_blocks(x: jax.Array, k: int, block: int, spec: tuple | None) -> jax.Array:
    """``x`` viewed as ``(*shape[:k], n, block)``: its blocks along the last axis (the
    spec's entry for axis k goes to the block index n)."""
    lead = x.shape[:k]
    shape = (*lead, math.prod(x.shape[k:]) // block, block)
    return _reshape(x, shape, None if spec is None else (*spec[:k], spec[k], None))


def _replicated(x: jax.Array) -> jax.Array:
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def _encode_blocks(
    x: jax.Array, block: int, encode: Callable, noise: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Block-wise absmax scaling, the layout of both widths: ``(codes, absmax)``, the
    codes ``encode(x / A, u)`` in ``x``'s shape (``u``: the matching ``noise``, or None),
    A the largest finite |x| of each block.

    Blocks are consecutive elements of the flattened leaf, from the axis k of
    :func:`_block_axis` on, so a block never crosses an index of the leading axes and
    the absmax has shape ``(*shape[:k], prod(shape[k:]) // block)``; with no such k, the
    flattened leaf in blocks with a shorter last one, absmax ``(ceil(size / block),)``.
    The blocks are the same either way (the flattened leaf's runs of ``block``), so the
    values do not depend on the layout. An explicitly sharded ``x`` whose shards hold
    whole blocks (:func:`_shards_hold_whole_blocks`) is encoded shard by shard, codes
    and absmax sharded like it; the caller gathers any other (:func:`_replicated`).
    """
    k, spec = _block_axis(x.shape, block), _explicit_spec(x)
    if k is not None:
        view = _to_blocks(x, k, block, spec)
        amax = _finite_absmax(view, -1)
        u = None if noise is None else _to_blocks(noise, k, block, spec)
        return _reshape(encode(view * _inverse(amax), u), x.shape, spec), amax[..., 0]
    flat, noise = x.reshape(-1), None if noise is None else noise.reshape(-1)
    codes, absmax, start = [], [], 0
    for part in _split(flat, block):
        amax = _finite_absmax(part, 1)
        u = None if noise is None else noise[start : start + part.size].reshape(part.shape)
        codes.append(encode(part * _inverse(amax), u).reshape(-1))
        absmax.append(amax.reshape(-1))
        start += part.size
    return _cat(codes).reshape(x.shape), _cat(absmax)


def _decode_blocks(codes: jax.Array, absmax: jax.Array, block: int, decode: Callable) -> jax.Array:
    """The float32 values of :func:`_encode_blocks`' ``(codes, absmax)``: ``decode(codes)``
    times each block's absmax, in the codes' layout (shard by shard where they hold
    whole blocks; the caller gathers any other)."""
    shape = codes.shape
    k = _block_axis(shape, block)
    if k is not None:
        spec = _explicit_spec(codes)
        view = decode(_to_blocks(codes, k, block, spec)) * absmax[..., None]
        return _reshape(view, shape, spec)
    out, start = [], 0
    for part in _split(codes.reshape(-1), block):
        amax = absmax[start : start + part.shape[0]][:, None]
        out.append((decode(part) * amax).reshape(-1))
        start += part.shape[0]
    return _cat(out).reshape(shape)


def _check_absmax(absmax: jax.Array, shape: tuple[int, ...], block: int) -> None:
    want = _absmax_shape(shape, block)
    if absmax.shape != want:
        raise ValueError(
            f"dequantize: absmax of shape {absmax.shape} for codes of shape {shape}, but "
            f"block={block} makes {want}; pass the block it was written with"
        )


def quantize(x: jax.Array, *, signed: bool, block: int = 2048, code: str = "dynamic"):
    """A :class:`QuantizedArray` of ``x`` (a :class:`LinearQuantizedArray` for
    ``code="linear"``): per block of the flattened leaf, the absmax of its finite values
    (float32) and each value's nearest 8-bit code of ``value / absmax``. The blocks
    and the absmax's shape are those of :func:`_encode_blocks` (shared with
    :func:`quantize4`): an explicitly sharded ``x`` whose shards hold whole blocks is
    quantised shard by shard, codes and absmax sharded like it; any other is gathered.

    No zero for a positive second moment: on the unsigned dynamic map (``signed=False``)
    a value ``0 < x < 5e-8 * absmax``, whose nearest code is 0, takes the smallest
    positive code instead, ``1e-7 * absmax`` (a positive x decodes as 0 only where
    ``x / absmax`` or ``1e-7 * absmax`` underflows float32). A second moment divides:
    Adam's step m / (sqrt(v) + eps) is m / eps where v decodes as 0, while the momentum,
    on its own block's map, keeps a non-zero code (gradients 10^-4 of the block's
    largest: momentum 10^-4 of its absmax, second moment 10^-8), so the step is
    thousands of learning rates. Li et al. 2023 (section 4.1) drop the zero point of
    the second moment's map for this reason. Here 0 stays for exact zeros (v is 0 only
    where every gradient was, and then so is m) and every code decodes as before: a
    state saved by a version that rounded to 0 restores to the same values (the first
    update after the restore reads its zeros as that version would, then re-encodes
    them). Rounded up, v is at most 10^-7·absmax too large (the map's own step there),
    which only shortens the step: the round trip of a positive value is within half the
    map's local gap, or below 10^-7·absmax, and never 0.

    A non-finite value changes nothing else in its block; it is stored as NaN by the
    signed map, as the block's absmax (NaN, +inf) or 0 (-inf) by the unsigned one.
    """
    check_choice("code", code, CODES)
    return _quantize8(x, signed, block, code)


# One compiled program per leaf shape and setting, also when called op by op (an eager
# ``init``): inside a traced update it is inlined like any other function.
@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize8(x: jax.Array, signed: bool, block: int, code: str) -> QuantizedArray:
    x = x.astype(jnp.float32)
    if _gathered(x, signed, block, bits=8):
        x = _replicated(x)
    codes, absmax = _encode_blocks(x, block, lambda y, _: _encode(y, signed, code))
    return _CODE_CLASSES[code](codes=codes, absmax=absmax)


def dequantize(q: QuantizedArray, *, block: int = 2048, code: str | None = None) -> jax.Array:
    """The float32 values a :class:`QuantizedArray` stands for.

    ``code`` defaults to the map ``q``'s class names (:func:`code_of`); naming another
    one is an error, since it would misread every code.
    """
    if isinstance(q, _FOUR_BIT):
        return _dequantize4(q, block)
    if code is None:
        code = code_of(q)
    elif code != code_of(q):
        raise ValueError(
            f"dequantize: code={code!r}, but q is a {type(q).__name__}, written by the "
            f"{code_of(q)!r} map; leave code out (or pass code={code_of(q)!r})"
        )
    codes, absmax = q.codes, q.absmax
    want = _absmax_shape(codes.shape, block)
    if absmax.ndim == 1 and absmax.shape != want and absmax.size == math.prod(want):
        # written before the absmax kept the leading axes: the same blocks, flattened
        absmax = absmax.reshape(want)
    _check_absmax(absmax, codes.shape, block)
    return _dequantize8(codes, absmax, block, code)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize8(codes: jax.Array, absmax: jax.Array, block: int, code: str) -> jax.Array:
    if _gathered(codes, codes.dtype == jnp.int8, block, bits=8):
        codes, absmax = _replicated(codes), _replicated(absmax)
    return _decode_blocks(codes, absmax, block, lambda c: _decode(c, code))


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (QuantizedArray, *_FOUR_BIT))


def _is_stored(x: Any) -> bool:
    """A node :func:`quantize_state` stops at: a quantised leaf, or the state of a nested
    ``quantize_state``, whose leaves are stored (and decoded) by that wrapper, under its
    own ``block`` and ``code``."""
    return isinstance(x, (QuantizedArray, *_FOUR_BIT, QuantizedState, Quantized4State))


# ------------------------------------------------------------------ the 4-bit maps

_NONFINITE_NIBBLE = 8  # the signed 4-bit code "-0": a non-finite value, decoded as NaN
_LINEAR4_LEVELS = 16


def linear4_map() -> np.ndarray:
    r"""The values of the unsigned 4-bit map of second moments, indexed by code:
    :math:`(i + 1) / 16`, i = 0..15 — the linear map *without a zero point* of Li et
    al. 2023 (section 4.1). Its smallest value is 1/16 of the entry's scale, so a
    second moment never decodes as 0 and Adam's 1/(√v + ε) stays bounded by
    4/√scale; a value below 1/16 of its scale is stored as 1/16 (rounded up)."""
    return (np.arange(_LINEAR4_LEVELS) + 1.0) / _LINEAR4_LEVELS


class Quantized4Array(NamedTuple):
    """A momentum-like (signed) state leaf in 4 bits: the signed dynamic map
    (:func:`dynamic_map` with ``bits=4``), one float32 absmax per block.

    Attributes:
      codes: uint8, two 4-bit codes per byte (element 2j in the low nibble, 2j + 1 in
        the high one) along the leaf's last axis: shape ``(*shape[:-1], ceil(n/2))``.
        A code is sign (bit 3) and magnitude (bits 0-2); the code 8 ("-0") stands for a
        non-finite value, decoded as NaN.
      absmax: float32, one per block of ``block`` consecutive elements of the
        flattened leaf: the block's largest finite |value| (shaped as in
        :class:`QuantizedArray`).
      odd: uint8 of shape (1,) when the last axis is even, (2,) when it is odd (its
        values are 0): the packed codes cannot tell n from n + 1, a shape can (Orbax
        refuses zero-size arrays).
    """

    codes: jax.Array
    absmax: jax.Array
    odd: jax.Array


class Unsigned4Array(NamedTuple):
    """A second moment in 4 bits on :func:`linear4_map`, block-wise (leaves that are
    not matrices): fields as in :class:`Quantized4Array`, codes 0..15 meaning
    (code + 1) / 16 of the block's absmax."""

    codes: jax.Array
    absmax: jax.Array
    odd: jax.Array


class RankOne4Array(NamedTuple):
    """A second moment of ndim ≥ 2 in 4 bits on :func:`linear4_map` with rank-1
    normalisation (Li et al. 2023, section 4.2): viewed as a matrix whose columns are
    the last axis (the leading axes its rows), entry (..., j) is stored relative to
    ``min(row_max[..., 0], col_max[..., j])``, the per-row and per-column largest
    finite values.

    Attributes:
      codes: uint8, two codes per byte along the last axis (as in
        :class:`Quantized4Array`); c = ``col_max.shape[-1]`` gives the unpacked length.
      row_max: float32, the leaf's shape with the last axis 1.
      col_max: float32, (1, ..., 1, c). (Both of the leaf's ndim, broadcasting against
        each other and against the leaf: sharded like its rows and its columns, never
        mistaken for a parameter-shaped vector.)
    """

    codes: jax.Array
    row_max: jax.Array
    col_max: jax.Array


_FOUR_BIT = (Quantized4Array, Unsigned4Array, RankOne4Array)


class Quantized4State(NamedTuple):
    """State of ``quantize_state(..., bits=4)``: the inner state with its large moments
    in 4 bits, the steps taken and the stochastic-rounding key (both fold into each
    leaf's rounding key, so a run and its resume draw the same bits)."""

    count: jax.Array
    key: jax.Array
    inner_state: Any


def _pack(nibbles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two 4-bit codes (int32 0..15, any shape, ndim ≥ 1) per uint8 along the last axis,
    and the ``odd`` marker of :class:`Quantized4Array`."""
    n = nibbles.shape[-1]
    if n % 2:
        nibbles = jnp.pad(nibbles, [(0, 0)] * (nibbles.ndim - 1) + [(0, 1)])
    pairs = nibbles.reshape(*nibbles.shape[:-1], -1, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(jnp.uint8)
    return packed, jnp.zeros((1 + n % 2,), jnp.uint8)


def _unpack(codes: jax.Array, n: int) -> jax.Array:
    """The int32 4-bit codes of :func:`_pack`, the last axis cut back to ``n``."""
    c = codes.astype(jnp.int32)
    both = jnp.stack([c & 15, c >> 4], axis=-1).reshape(*c.shape[:-1], -1)
    return both[..., :n]


def _encode4(y: jax.Array, signed: bool, noise: jax.Array | None) -> jax.Array:
    """4-bit codes (int32 0..15) of ``y = x / scale``: nearest, or stochastically
    rounded with ``noise`` (uniform [0, 1), one per element). Signed: the dynamic map,
    sign in bit 3, a non-finite ``y`` takes code 8 (NaN). Unsigned: :func:`linear4_map`,
    ``(code + 1)/16``; below 1/16 (negatives, -inf) the code 0, NaN and +inf the top."""
    if signed:
        m = _encode_dynamic(jnp.minimum(jnp.abs(y), 1.0), 3, noise)
        # a negative value rounded to magnitude 0 is +0: "-0" is the NaN code
        m = jnp.where((y < 0) & (m > 0), m | 8, m)
        return jnp.where(jnp.isfinite(y), m, _NONFINITE_NIBBLE)
    t = jnp.minimum(jnp.maximum(y, 0.0), 1.0) * _LINEAR4_LEVELS - 1.0
    k = jnp.round(t) if noise is None else jnp.floor(t + noise)
    k = jnp.clip(k, 0.0, _LINEAR4_LEVELS - 1).astype(jnp.int32)
    return jnp.where(jnp.isnan(y), _LINEAR4_LEVELS - 1, k)


def _decode4(m: jax.Array, signed: bool) -> jax.Array:
    """Values in [-1, 1] (float32) of 4-bit codes ``m`` (int32)."""
    if not signed:
        return (m.astype(jnp.float32) + 1.0) / _LINEAR4_LEVELS
    mag = _decode_dynamic(m & 7, 3)
    value = jnp.where(m >= 8, -mag, mag)
    return jnp.where(m == _NONFINITE_NIBBLE, jnp.nan, value)


def _packs_per_shard(x: Any) -> bool:
    """Whether each shard of ``x`` holds an even piece of its last axis (two codes per
    byte along it); true for a leaf that is not explicitly sharded."""
    spec = _explicit_spec(x)
    return spec is None or (x.shape[-1] // _shards(x, spec[-1])) % 2 == 0


def _gathered(x: Any, signed: bool, block: int, bits: int) -> bool:
    """Whether :func:`quantize` (8 bits) or :func:`quantize4` gathers the explicitly
    sharded ``x`` before quantising it: a block-wise leaf when its shards split a block;
    in 4 bits also when they cannot pack their codes (an odd piece of the last axis),
    the only condition for a rank-1 second moment. Every other leaf is quantised shard
    by shard."""
    if bits == 8:
        return not _shards_hold_whole_blocks(x, block)
    rank_one = not signed and x.ndim >= 2
    return not _packs_per_shard(x) or not (rank_one or _shards_hold_whole_blocks(x, block))


def _uniform(key: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """Uniform draws in (0, 1) shaped (and, if explicit, sharded) like ``x``, 16 random
    bits each: ``(h + 1/2) / 2^16``, h the low or high half of one uint32 draw per pair
    of elements along the last axis (the layout of the packed codes). Half the draws
    of one per element; the probability of rounding up is then a multiple of 2^-16, off
    by at most 2^-17 (a bias below 2^-17 of the map's gap). Each shard draws its own
    piece, the same bits as an unsharded draw (partitionable Threefry)."""
    if key is None:
        return None
    lead, n = x.shape[:-1], x.shape[-1]
    out = jax.typeof(x).sharding if explicitly_sharded(x) else None
    bits = jax.random.bits(key, (*lead, (n + 1) // 2), jnp.uint32, out_sharding=out)
    halves = jnp.stack([bits & 0xFFFF, bits >> 16], axis=-1).reshape(*lead, -1)[..., :n]
    return (halves.astype(jnp.float32) + 0.5) * np.float32(2.0**-16)


def quantize4(
    x: jax.Array, *, signed: bool, block: int = 256, key: jax.Array | None = None
) -> Quantized4Array | Unsigned4Array | RankOne4Array:
    r"""``x`` (ndim ≥ 1) in 4 bits (Li et al. 2023).

    Signed (momenta): :class:`Quantized4Array`, block-wise absmax A and the signed
    dynamic 4-bit map. Unsigned (second moments): :func:`linear4_map` (no zero
    point); with rank-1 normalisation (:class:`RankOne4Array`) when ``x.ndim >= 2``,
    each entry's scale :math:`\min(\max_j |x_{ij}|, \max_i |x_{ij}|)` over the leaf
    viewed as a matrix (the last axis its columns; both bound :math:`|x_{ij}|`, and the
    smaller one adapts to an outlier in either the row or the column), block-wise
    (:class:`Unsigned4Array`) otherwise.

    Blocks: as in 8 bits (:func:`_encode_blocks`), consecutive elements of the
    flattened leaf, from the axis k on where ``prod(shape[k:])`` is a multiple of
    ``block`` (the largest such k), so a block never crosses an index of the leading
    axes and the absmax has shape ``(*shape[:k], prod(shape[k:]) // block)``; if there
    is no such k, the flattened leaf in blocks with a shorter last one, absmax
    ``(ceil(size / block),)``.

    Explicit shardings (``AxisType.Explicit``): each shard is quantised on its own,
    with no gathering, when it holds whole blocks (:func:`_shards_hold_whole_blocks`:
    the sharded axes come before k, or the shard's piece of axis k times the axes
    after it is a multiple of ``block``), and the codes and scales keep the leaf's
    sharding; the rank-1 maxima are reductions (an all-reduce of r + c values). A
    leaf whose shards split a block, or hold an odd piece of the last axis (along
    which codes are packed two per byte), is gathered first. The values are the same
    whatever the layout.

    ``key`` (a PRNG key) rounds each code stochastically between its two neighbouring
    map values, so that E[dequantize(quantize4(x))] = x inside the map's range (an
    unsigned value below 1/16 of its scale always reads 1/16); without it, nearest.
    """
    if np.ndim(x) == 0:
        raise ValueError(f"quantize4: x must have ndim >= 1, got shape {np.shape(x)}")
    return _quantize4(x, signed, block, key)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize4(
    x: jax.Array, signed: bool, block: int, key: jax.Array | None
) -> Quantized4Array | Unsigned4Array | RankOne4Array:
    x = x.astype(jnp.float32)
    if _gathered(x, signed, block, bits=4):
        x = _replicated(x)
    if not signed and x.ndim >= 2:
        rows = _finite_absmax(x, -1)  # (*lead, 1)
        cols = _finite_absmax(x, tuple(range(x.ndim - 1)))  # (1, ..., 1, c)
        inv = _inverse(jnp.minimum(rows, cols))
        packed, _ = _pack(_encode4(x * inv, False, _uniform(key, x)))
        return RankOne4Array(codes=packed, row_max=rows, col_max=cols)
    cls = Quantized4Array if signed else Unsigned4Array
    encode = lambda y, u: _encode4(y, signed, u)
    codes, absmax = _encode_blocks(x, block, encode, _uniform(key, x))
    packed, odd = _pack(codes)
    return cls(codes=packed, absmax=absmax, odd=odd)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize4(q: Any, block: int) -> jax.Array:
    """The float32 values of a 4-bit array of :func:`quantize4` (same ``block``)."""
    if isinstance(q, RankOne4Array):
        codes = _unpack(q.codes, q.col_max.shape[-1])  # gathered if written gathered
        return _decode4(codes, False) * jnp.minimum(q.row_max, q.col_max)
    n = 2 * q.codes.shape[-1] - (q.odd.shape[0] - 1)
    codes = _unpack(q.codes, n)
    signed, absmax = isinstance(q, Quantized4Array), q.absmax
    _check_absmax(absmax, codes.shape, block)
    if _gathered(codes, signed, block, bits=4):
        codes, absmax = _replicated(codes), _replicated(absmax)
    return _decode_blocks(codes, absmax, block, lambda c: _decode4(c, signed))


# ------------------------------------------------- which leaves, and which map


def _param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter leaf (``""``: ``params`` is one array)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_to_str(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in leaves}


def _split_state_path(
    path: str, shape: tuple[int, ...], param_shapes: dict[str, tuple[int, ...]]
) -> tuple[str, bool | None]:
    """``(state part, shaped like its parameter)`` of a state leaf's path.

    Optimizers keep per-parameter buffers as trees shaped like the params, so a state
    leaf's path is the state's own keys around one parameter's path: ``0/nu`` +
    ``params/attn/v/kernel``, or ``0/moments`` + ``<param>`` + ``/v`` for per-leaf
    records. The parameter's path is the run of keys naming a parameter — of the leaf's
    shape if one does, then the longest, then the last — and the state part is what
    is left. The second bool says whether the leaf has that parameter's shape (a
    factored statistic has not); ``None`` if no parameter's path occurs in it.
    """
    keys = path.split("/") if path else []
    best = None  # ((same shape, length, start), start, stop)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys) + 1):
            found = param_shapes.get("/".join(keys[i:j]))
            if found is not None:
                rank = (found == shape, j - i, i)
                if best is None or rank > best[0]:
                    best = (rank, i, j)
    if best is None:
        return path, (param_shapes[""] == shape) if "" in param_shapes else None
    (same, _, _), i, j = best
    return "/".join(keys[:i] + keys[j:]), same


def _field_overrides(state: Any) -> dict[str, bool]:
    """``{state path: is a second moment}`` for the leaves of the fields in
    :data:`_FIELD_RULES` (NamedTuple states whose field names mislead the default)."""
    is_ruled = lambda n: hasattr(n, "_fields") and type(n).__name__ in _FIELD_RULES
    out = {}
    for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_ruled)[0]:
        if not is_ruled(node):
            continue
        for field, second in _FIELD_RULES[type(node).__name__].items():
            head = (*path, jax.tree_util.GetAttrKey(field))
            for sub, _ in jax.tree_util.tree_flatten_with_path(getattr(node, field))[0]:
                out[path_to_str((*head, *sub))] = second
    return out


# ----------------------------------------------------------------- the wrapper


def _momenta_nearest(momentum_rounding: str, inner_state: Any) -> list[bool]:
    """For each node of ``inner_state`` flattened down to the stored ones: whether it is
    a 4-bit momentum that rounds to nearest. ``"auto"`` says so for a momentum with a
    4-bit second moment of the same parameter beside it (an Adam-like step, which reads
    each momentum entry's size; see :func:`quantize_state`): a second moment whose
    state path differs from the momentum's in one key only (``0/mu/params/w`` and
    ``0/nu/params/w``). Paths and types are static: decided at trace time."""
    nodes = jax.tree_util.tree_flatten_with_path(inner_state, is_leaf=_is_stored)[0]
    keys = [path_to_str(p).split("/") for p, _ in nodes]
    is_momentum = [isinstance(x, Quantized4Array) for _, x in nodes]
    if momentum_rounding != "auto":
        return [m and momentum_rounding == "nearest" for m in is_momentum]
    second = (Unsigned4Array, RankOne4Array)
    seconds = [k for k, (_, x) in zip(keys, nodes, strict=True) if isinstance(x, second)]

    def beside(k):
        return any(
            len(o) == len(k) and sum(a != b for a, b in zip(o, k, strict=True)) == 1
            for o in seconds
        )

    return [m and beside(k) for m, k in zip(is_momentum, keys, strict=True)]


def quantize_state(
    inner: optax.GradientTransformation,
    bits: int = 8,
    block: int | None = None,
    min_size: int = 4096,
    *,
    second_moments: str | Callable[[str], bool] = SECOND_MOMENTS,
    keep_float: str | None = None,
    code: str = "dynamic",
    seed: int = 0,
    momentum_rounding: str = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Stores the inner optimizer's moments in 8 bits (int8 codes, one float32 scale per
    block) or, with ``bits=4``, in 4 bits (two codes per byte).

    Which leaves: every floating leaf of the inner state that has the shape of its
    parameter and at least ``min_size`` elements (momenta, second moments, and any
    other param-shaped buffer, e.g. Muon's momentum or an accumulated gradient);
    counters, scalars, factored statistics and small tensors (biases, norms) stay as
    they are. If there are such leaves but none reaches ``min_size``, nothing would be
    stored in 8 bits: ``init`` then warns (:class:`NothingQuantizedWarning`) with the
    largest leaf's size, the ``min_size`` to pass. Each chosen leaf is
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

    Non-finite values: A is the largest *finite* |x| of the block, so a NaN or inf
    entry (from one bad gradient element) leaves the other values of its block exactly
    as they would be without it. The entry itself stays NaN in a signed leaf (the
    spare int8 code -128), as it would in a float32 state: Adam's update of that
    element is then non-finite exactly when float32 Adam's is. The unsigned map has no
    spare code: there a NaN or +inf entry is stored as A, the block's largest finite
    second moment (a small step, where a float32 state would stay NaN or inf).

    Signed or unsigned map: the state cannot be inspected for signs at ``init`` (it is
    zeros, or abstract), so a leaf is a **second moment** — unsigned map, uint8 codes,
    twice the resolution, negative values clamp to 0, a positive value never rounds to
    0 (:func:`quantize`: m / (sqrt(v) + eps) would explode) — when its *state part*
    matches ``second_moments``: its path in the state tree with the parameter's own path taken
    out (``"0/nu"`` for the leaf at ``"0/nu/params/dense/kernel"``, ``"0/mu"`` for
    ``"0/mu/params/attn/v/kernel"``), so a module named ``v`` or ``nu`` keeps a signed
    map for its momentum. ``second_moments`` is a regex searched in the state part (the default
    :data:`SECOND_MOMENTS` matches optax's ``nu`` field and common spellings at its end,
    and knows that Adan's ``v`` is signed and its ``n`` a second moment), or a function
    of the state part returning True. Every other leaf gets the signed map (int8
    codes). The codes' dtype records the choice, and the class the map
    (:class:`QuantizedArray` for the dynamic one, :class:`LinearQuantizedArray`), so
    :func:`optax_ext.restore_train_state` refuses a checkpoint saved under another
    ``code`` or ``second_moments``. Leaves whose full state path matches ``keep_float``
    are not quantised.

    Nested wrappers: the state of a ``quantize_state`` inside ``inner`` (directly, as in
    ``quantize_state(quantize_state(adam, block=256))``, or anywhere in a chain) is left
    to that wrapper, which stores and decodes its leaves under its own ``block`` and
    ``code``: those leaves are exactly as without the outer wrapper, whose settings
    apply only to the float leaves outside it. A quantised leaf outside any nested
    ``quantize_state`` (a transform that quantises its own state) is refused at
    ``init``: its block and map are not known here, and decoding it with this wrapper's
    would misread it.

    A linear int8 map (``code="linear"``) is offered only for comparison: a second
    moment stored linearly rounds its small entries to 0, and 1/√v then explodes.

    4 bits (``bits=4``, Li et al. 2023): the same leaves, each in :func:`quantize4`'s
    form. Momenta (signed): block-wise absmax A (``block`` defaults to 256) and the
    signed dynamic map with 3 magnitude bits, ``dynamic_map(True, 4)``: ±{0, 0.01,
    0.055, 0.1, 0.325, 0.55, 0.775, 1}·A, the code "-0" for NaN. Second moments: the
    linear map *without a zero point*, :math:`v \approx s\,(i + 1)/16`, i = 0..15
    (:func:`linear4_map`), so no v decodes as 0 and m/(√v + ε) cannot become m/ε
    (with a zero point, every v below s/30 would); s is, for a leaf of ndim ≥ 2 viewed
    as a matrix (leading axes merged), the rank-1 scale
    :math:`s_{ij} = \min(\max_k v_{ik}, \max_k v_{kj})` (one outlier then coarsens
    only its row or its column), and the block's absmax otherwise. The codes are
    packed two per uint8 along the last axis. Re-quantisation after each update rounds
    stochastically between the two neighbouring map values,

    .. math:: P(\text{up}) = \frac{x/s - q_{lo}}{q_{hi} - q_{lo}},\qquad
              \mathbb{E}[\hat x] = x,

    so the rounding errors of the EMA do not accumulate a bias (a second moment below
    s/16 is rounded up to s/16): with β2 = 0.999 an update moves v by 0.1%, far less
    than half a gap, and nearest rounding would hold v where it is. Momenta
    (``momentum_rounding``) round the same way, except those with a 4-bit second
    moment of the same parameter beside them (``"auto"``, the default), which round
    to the nearest map value: an Adam-like step m/√v reads each
    momentum entry relative to its own scale √v, and most entries lie far below their
    block's absmax A, where the map's gaps (0.01, 0.045, 0.045, 0.225 A) are as large
    as the entries: a stochastic draw there is an error of the entry's own size, and
    the EMA (β1 = 0.9) carries it on, √(1/(1-β1²)) ≈ 2.3 draws' worth (measured:
    ``benchmarks/bench_quantize.py --part errors`` and ``--part quality``). A sign
    step (Tiger, Lion) reads only signs, which stochastic rounding keeps unbiased
    (there it measured better than nearest), and Muon's msign discards the momentum's
    singular values (``--part muon-sim``: its direction kept less of the float one
    with nearest rounding): without a second moment of their own the momenta stay
    stochastic. The uniform draws come from ``seed``, the step count and the leaf's
    index (:func:`optax_ext.wrappers.rounding.leaf_key`), kept in
    :class:`Quantized4State` (``count``, ``key``): runs repeat bit for bit, and a run
    resumed from a checkpoint continues exactly as the uninterrupted one. The 4-bit
    state has its own classes (:class:`Quantized4State`, :class:`Quantized4Array`,
    :class:`Unsigned4Array`, :class:`RankOne4Array`), so
    :func:`optax_ext.restore_train_state` refuses an 8-bit checkpoint into a 4-bit
    optimizer and the reverse, naming ``bits``. 0-d leaves stay in float32.
    In both widths blocks run along the leaf's trailing axes (:func:`_encode_blocks`),
    so a leaf sharded explicitly (``AxisType.Explicit``) is quantised shard by shard,
    with no gathering, when its shards hold whole blocks (e.g. sharded by rows, or by
    columns in pieces of a multiple of ``block``); ``init`` warns about a leaf whose
    shards split a block, which every update then gathers.

    Bytes per parameter of a quantised leaf: 8 bits: 1 + 4/block (1.002 at 2048);
    4 bits: 0.5 + 4/block for a momentum or a non-matrix second moment (0.516 at
    256; the paper's block of 128 would be 0.531), 0.5 + 4(r + c)/(rc) for an r×c
    second moment (0.512 at 1024×512). Adam: ≈ 1.03 bytes per parameter in 4 bits
    (8 in float32), Tiger or Lion (one moment): ≈ 0.52.

    ``optax.MultiSteps`` (an object with ``init`` and ``update``, not a transform) is
    taken through its ``gradient_transformation()``; its accumulated gradient is
    param-shaped and stored in 8 bits too (``keep_float="acc_grads"`` keeps it float).

    Args:
      inner: the optax transformation whose state to store in 8 bits (or an
        ``optax.MultiSteps``).
      bits: code width, 8 or 4.
      block: elements per absmax block, an int ≥ 1; ``None``: 2048 for 8 bits
        (Dettmers et al.), 256 for 4 bits (Li et al. use 128, at 0.016 bytes per
        parameter more).
      min_size: leaves with fewer elements stay in float, an int ≥ 0 (bitsandbytes:
        4096, below which the bytes saved are few and each leaf's encode and decode
        still cost; lower it for a small model, 0 quantises every moment).
      second_moments: regex (or predicate) on the state part selecting unsigned leaves.
      keep_float: regex on the state path of leaves never to quantise (``None``: none).
      code: ``"dynamic"`` (default) or ``"linear"``; 8 bits only (4 bits has its own maps).
      seed: the stochastic rounding's seed with ``bits=4``, an int with 0 ≤ seed < 2**32.
      momentum_rounding: how 4-bit momenta (the signed leaves) are re-quantised:
        ``"stochastic"``, ``"nearest"``, or ``"auto"`` (default): nearest for a
        momentum whose parameter has a 4-bit second moment too (Adam's ``mu`` beside
        ``nu``), stochastic otherwise. Second moments always round stochastically;
        8 bits always round to nearest.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`QuantizedState`, whose
      quantised leaves are :class:`QuantizedArray` (a plain pytree of arrays:
      checkpoints like any other state); with ``bits=4``, :class:`Quantized4State`
      and the 4-bit arrays.

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
      Li, Chen, Zhu, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023 (sections 4.1, the zero-point
      problem, and 4.2, rank-1 normalisation).
    """
    if isinstance(inner, optax.MultiSteps):
        # its init and update are the transform: MultiSteps.gradient_transformation()
        # wraps exactly these two methods
        inner = inner.gradient_transformation()
    check_transform("inner", inner)
    check_int("bits", bits)
    check_choice("bits", bits, (8, 4))
    if block is None:
        block = 2048 if bits == 8 else 256
    check_int("block", block, minimum=1)
    check_int("min_size", min_size, minimum=0)
    check_choice("code", code, CODES)
    check_seed("seed", seed)
    check_choice("momentum_rounding", momentum_rounding, ROUNDINGS)
    if bits == 8 and momentum_rounding == "stochastic":
        raise ValueError(
            "quantize_state: momentum_rounding='stochastic' needs bits=4; 8-bit states "
            "round to nearest (leave momentum_rounding out, or pass bits=4)"
        )
    if bits == 4 and code != "dynamic":
        raise ValueError(
            f"quantize_state: code={code!r} is an 8-bit map; bits=4 has its own maps (the "
            "signed dynamic map for momenta, the linear map without zero for second "
            "moments): leave code out with bits=4, or pass bits=8"
        )
    default_rule = isinstance(second_moments, str) and second_moments == SECOND_MOMENTS
    is_second = path_predicate("second_moments", second_moments)
    try:
        keep = re.compile(keep_float) if keep_float is not None else None
    except (TypeError, re.error) as e:
        raise ValueError(
            f"keep_float must be a regular expression or None, got {keep_float!r}: {e}"
        ) from None

    def init_fn(params):
        param_shapes = _param_shapes(params)
        all_shapes = set(param_shapes.values())
        inner_state = inner.init(params)
        overrides = _field_overrides(inner_state) if default_rule else {}
        sizes = []  # of the moments that would be stored in 8 bits but for min_size

        def store(path, x):
            if _is_quantized(x):
                # a quantised leaf outside any nested quantize_state: this wrapper would
                # decode it as its own, under its block and code, which need not be
                # the ones that wrote it
                raise ValueError(
                    f"quantize_state: the inner state already holds a {type(x).__name__} "
                    f"at {path_to_str(path)!r}, not inside a QuantizedState, so its block "
                    f"and map are unknown here; keep that leaf in float32 in the inner "
                    f"transform, or store it with quantize_state (a nested quantize_state "
                    f"keeps its own leaves)"
                )
            if isinstance(x, QuantizedState):
                return x  # a nested quantize_state stores its leaves under its own settings
            if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)):
                return x
            s, shape = path_to_str(path), tuple(x.shape)
            part, same = _split_state_path(s, shape, param_shapes)
            param_shaped = same if same is not None else shape in all_shapes
            size = math.prod(shape)
            if not param_shaped or size == 0 or (keep is not None and keep.search(s)):
                return x
            sizes.append(size)
            if size < min_size:
                return x
            second = overrides[s] if s in overrides else bool(is_second(part))
            if bits == 4 and x.ndim == 0:
                return x  # one element: nothing to pack
            if _gathered(x, not second, block, bits):
                odd = " or hold an odd piece of its last axis (two codes per byte)"
                warnings.warn(
                    f"quantize_state: the shards of {s!r} (shape {shape}, sharded as "
                    f"{jax.typeof(x).sharding.spec}) split its blocks of {block} "
                    f"elements{odd if bits == 4 else ''}, "
                    f"so every update gathers it whole before quantising; shard an "
                    f"earlier axis, or pick a block that divides each shard's run of "
                    f"elements",
                    stacklevel=2,
                )
            if bits == 4:
                return quantize4(x, signed=not second, block=block)
            return quantize(x, signed=not second, block=block, code=code)

        inner_state = jax.tree_util.tree_map_with_path(store, inner_state, is_leaf=_is_stored)
        if sizes and max(sizes) < min_size:
            warnings.warn(
                f"quantize_state: no optimizer-state leaf reaches min_size={min_size} "
                f"elements (the largest has {max(sizes)}), so every moment stays in float32 "
                f"and nothing is stored in {bits} bits; pass min_size={max(sizes)} or lower "
                f"(0 quantises every moment) to store them in {bits} bits",
                NothingQuantizedWarning,
                stacklevel=2,
            )
        if bits == 4:
            return Quantized4State(
                count=jnp.zeros([], jnp.int32), key=_seed_key_data(seed), inner_state=inner_state
            )
        return QuantizedState(inner_state=inner_state)

    def update4_fn(updates, state, params=None, **extra_args):
        # flattened down to the stored nodes: leaf i's rounding key folds in its index
        old, treedef = jax.tree.flatten(state.inner_state, is_leaf=_is_stored)
        widened = [_dequantize4(x, block) if _is_quantized(x) else x for x in old]
        updates, new = inner.update(updates, treedef.unflatten(widened), params, **extra_args)
        new = treedef.flatten_up_to(new)
        nearest = _momenta_nearest(momentum_rounding, state.inner_state)

        def store(i, o, n):
            signed = isinstance(o, Quantized4Array)
            key = None if nearest[i] else leaf_key(state.key, state.count, 0, i)
            return quantize4(n, signed=signed, block=block, key=key)

        out = [
            store(i, o, n) if _is_quantized(o) else n
            for i, (o, n) in enumerate(zip(old, new, strict=True))
        ]
        count = optax.safe_int32_increment(state.count)
        return updates, Quantized4State(
            count=count, key=state.key, inner_state=treedef.unflatten(out)
        )

    def update_fn(updates, state, params=None, **extra_args):
        # this wrapper's own leaves are the quantised ones outside any nested
        # QuantizedState; a nested wrapper decodes and re-encodes its own
        old = state.inner_state
        widened = jax.tree.map(
            lambda x: dequantize(x, block=block, code=code) if _is_quantized(x) else x,
            old,
            is_leaf=_is_stored,
        )
        updates, new = inner.update(updates, widened, params, **extra_args)
        requantise = lambda o, n: (
            quantize(n, signed=o.codes.dtype == jnp.int8, block=block, code=code)
            if _is_quantized(o)
            else n
        )
        new = jax.tree.map(requantise, old, new, is_leaf=_is_stored)
        return updates, QuantizedState(inner_state=new)

    return optax.GradientTransformationExtraArgs(init_fn, update4_fn if bits == 4 else update_fn)

"""XLA:CPU forms of three computations, and the one switch that runs them on CPU only.

Each form here computes what a plain form elsewhere computes, in an order that
XLA:CPU compiles to a faster program; :func:`on_cpu` picks it, through the package's one
``lax.platform_dependent``, when a program is lowered for CPU, and the plain form on
every other backend (GPU, TPU), whose compilers handle the plain form well. Both forms
of each are tested against float64 NumPy by calling them directly.

- :func:`sum_in_slabs`, for ``_reductions.axis_sum`` (AdaFactor's factored moments,
  Amos's per-unit statistics): a sum over leading axes that keeps wide trailing rows,
  Σ_i x_ij², runs on XLA:CPU as one library kernel that slows down sharply as the rows
  widen. Accumulating slabs of a few rows elementwise, ``acc += x[i:i+r]²``, and summing
  the small accumulator at the end reads the array once, at the speed of a row sum.
- :func:`row_mean_square_in_blocks`, for ``optimizers.tiger.row_mean_square`` (the
  row RMS of an embedding table): XLA:CPU merges a row reduction with the elementwise
  update that consumes it into one fusion that cannot write in place, so it
  materialises the squares and copies the donated parameter. A loop over blocks of
  rows keeps the reduction a separate read, and the update one in-place pass.
- :func:`lion_one_pass`, for ``optimizers.lion``'s leaf: the textbook Lion direction,
  sign(β1·m + (1-β1)·g), and the new momentum β2·m + (1-β2)·g both read the old
  momentum; XLA:CPU puts them in two fusions and copies the donated momentum for the
  second. Computing the direction from the new momentum,
  ``(β1/β2)·m' + ((1-β1) - β1(1-β2)/β2)·g``, leaves one reader and one in-place pass.

An array whose type carries an explicit sharding keeps the plain form (a loop over
blocks of a sharded axis would gather it). The measurements that justify each form
are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext._common import explicitly_sharded, is_concrete_number, work_dtype

__all__ = [
    "on_cpu",
    "slab_rows",
    "sum_in_slabs",
    "row_block",
    "row_mean_square_in_blocks",
    "lion_one_pass_applies",
    "lion_one_pass",
]


def on_cpu(*args: Any, plain: Callable, cpu: Callable | None) -> Any:
    """``cpu(*args)`` in a program lowered for CPU, ``plain(*args)`` on other backends.

    ``cpu=None`` (no CPU form for these shapes) and explicitly sharded arguments run
    ``plain`` everywhere. Both must return the same shapes and dtypes.
    """
    if cpu is None or any(explicitly_sharded(a) for a in jax.tree.leaves(args)):
        return plain(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=plain)


# ------------------------------------------------- sums over leading axes, in slabs

#: Kept trailing entries per reduced index from which XLA:CPU's direct form falls behind.
_MIN_TRAILING = 4096
#: Entries per slab (1 MB of float32): small enough to stay in cache with the accumulator.
_SLAB_ELEMENTS = 2**18


def slab_rows(shape: tuple[int, ...], axes: tuple[int, ...]) -> int | None:
    """Reduced indices per slab where slabs pay off, else None: the (sorted, non-negative)
    ``axes`` must be contiguous and followed by at least ``_MIN_TRAILING`` kept entries,
    and the array must hold at least two slabs."""
    if not axes or axes != tuple(range(axes[0], axes[-1] + 1)):
        return None
    trailing = math.prod(shape[axes[-1] + 1 :])
    if trailing < _MIN_TRAILING:
        return None
    lead, n = math.prod(shape[: axes[0]]), math.prod(shape[a] for a in axes)
    rows = max(1, _SLAB_ELEMENTS // (lead * trailing))
    return rows if n >= 2 * rows else None


def sum_in_slabs(x: jax.Array, axes: tuple[int, ...], rows: int, term: Callable) -> jax.Array:
    """Σ term(x) over the contiguous sorted ``axes`` (kept as size 1), ``rows`` reduced
    indices at a time: ``jnp.sum(term(x), axes, keepdims=True)`` up to the order of the
    float additions (the slabs are added in sequence)."""
    lead, n = math.prod(x.shape[: axes[0]]), math.prod(x.shape[a] for a in axes)
    view = x.reshape(lead, n, -1)  # row-major: a bitcast, no copy
    slab = lambda start: term(jax.lax.dynamic_slice_in_dim(view, start, rows, axis=1))
    steps, tail = divmod(n, rows)
    # the first slab starts the sum: no pass over a zero accumulator
    acc = jax.lax.fori_loop(1, steps, lambda i, acc: acc + slab(i * rows), slab(0))
    if tail:
        acc = acc.at[:, :tail].add(term(view[:, steps * rows :]))
    kept = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    return jnp.sum(acc, axis=1).reshape(kept)


# ------------------------------------------------- row mean squares, in row blocks

#: Rows per block of the row reduction: about 2**20 elements (4 MB of float32), a block
#: that stays in cache between its square and its sum.
_ROW_BLOCK_ELEMENTS = 2**20


def row_block(shape: tuple[int, ...]) -> int | None:
    """Rows per block for :func:`row_mean_square_in_blocks`, or None where one
    reduction is as good (a scalar or vector, or fewer than two blocks of rows)."""
    if len(shape) < 2:
        return None
    block = max(_ROW_BLOCK_ELEMENTS // max(shape[-1], 1), 1)
    return block if math.prod(shape[:-1]) >= 2 * block else None


def row_mean_square_in_blocks(param: jax.Array, block: int, work: Any) -> jax.Array:
    """Mean of squares along the last axis, shape ``(..., 1)``, in ``work``: a loop over
    blocks of ``block`` rows (the last one clamped to overlap its neighbour: the same
    values are written twice)."""
    flat = param.reshape(-1, param.shape[-1])
    rows = flat.shape[0]

    def body(i, acc):
        start = jnp.minimum(i * block, rows - block)
        rows_block = jax.lax.dynamic_slice_in_dim(flat, start, block)
        mean_square = jnp.mean(jnp.square(rows_block.astype(work)), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(acc, mean_square, start, 0)

    n_blocks = -(-rows // block)
    acc = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((rows,), work))
    return acc.reshape(param.shape[:-1] + (1,))


# ----------------------------------------------------- Lion's leaf in one pass


def lion_one_pass_applies(b1: Any, b2: Any) -> bool:
    """Whether :func:`lion_one_pass` is accurate for these betas: concrete β1 < 1 and
    β2 ≥ 0.5. It divides by β2 and cancels when β1/β2 is large; in this range the
    rounding error of the direction's argument grows at most 2x. Traced betas
    (``optax.inject_hyperparams``) keep the textbook form."""
    return is_concrete_number(b1) and is_concrete_number(b2) and float(b1) < 1 <= 2 * float(b2)


def lion_one_pass(g: jax.Array, m: jax.Array, b1: Any, b2: Any) -> tuple[jax.Array, jax.Array]:
    r"""Lion's (direction in g's dtype, new momentum in the work dtype), the direction
    from the new momentum:

    .. math::

        m' = \beta_2 m + (1-\beta_2) g,\qquad
        u = \operatorname{sign}\Big(\tfrac{\beta_1}{\beta_2} m'
            + \big(1-\beta_1 - \tfrac{\beta_1(1-\beta_2)}{\beta_2}\big) g\Big)
          = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),

    exactly equal in real arithmetic; in float32 the sign may differ where
    ``|β1·m + (1-β1)·g|`` is at rounding level.
    """
    work = work_dtype(m)
    gw = g.astype(work)
    new_m = b2 * m.astype(work) + (1.0 - b2) * gw
    c = (b1 / b2) * new_m + ((1.0 - b1) - b1 * (1.0 - b2) / b2) * gw
    return jnp.sign(c).astype(g.dtype), new_m


# ----------------------------------------------- fences, AdaFactor's mean square


def fence(x: Any) -> Any:
    """``lax.optimization_barrier(x)`` in a program lowered for CPU, ``x`` elsewhere.

    XLA:CPU merges computations that share an input into one fusion where two apart
    run faster: AdaFactor's row and column means of g² become one multi-output
    reduction, and a g² read by two users (a norm, then Adam's moment) is stored at
    full size for both. A fence between them keeps each a separate pass over its input.
    """
    return on_cpu(x, plain=lambda x: x, cpu=jax.lax.optimization_barrier)


def _eps1_vanishes(row, col, eps1):
    """True when c + ε1/r rounds to c for every pair (r, c): every ε1/r is below
    eps/4 · c, a lower bound of half an ulp of c. False on NaN or infinity."""
    return jnp.max(eps1 / row) < jnp.finfo(col.dtype).eps / 4 * jnp.min(col)


def adafactor_mean_square(g, row, col, eps1):
    """mean(u²) for u = g/√(r·c + ε1): XLA:CPU runs this reduction on one core, where a
    reciprocal square root per entry makes it the slowest pass of AdaFactor's step.
    Where every ε1/r is below half an ulp of every c, u = g·rsqrt(r)·rsqrt(c): two small
    vectors and a product per entry (a ``lax.cond`` picks that branch then; the
    per-entry form otherwise). The same numbers as the plain mean either way."""
    inv_row, inv_col = jax.lax.rsqrt(row), jax.lax.rsqrt(col)
    return jax.lax.cond(
        _eps1_vanishes(row, col, eps1),
        lambda g, a, b, row, col: jnp.mean(jnp.square(g * a * b)),
        lambda g, a, b, row, col: jnp.mean(
            jnp.square(g * jax.lax.rsqrt(row) * jax.lax.rsqrt(col + eps1 / row))
        ),
        g,
        inv_row,
        inv_col,
        row,
        col,
    )

"""Sums over leading axes (of squares, for the moments), at memory speed on XLA:CPU too.

AdaFactor's factored moments and Amos's per-unit statistics reduce a kernel over its
leading axes and keep the trailing one: Σ_i x_ij² for an (n, m) matrix. XLA:CPU runs
that reduction as one library kernel that is fast while the array's rows are narrow,
and slows down sharply as they widen: against the row sums of the same 2^26 entries it
took 1.4× at 2048 columns, 2.7× at 4096, 3.8× at 8192 and 23× at 17088 (a GPT-2-shaped
MLP kernel of width 4272), and 14× at 17088 columns with 8× fewer rows
(``benchmarks/bench_xla_cpu.py``). Accumulating slabs of a few rows elementwise,
``acc += x[i:i+r]²``, and summing the small accumulator at the end reads the array
once, at the speed of a row reduction: AdaFactor's step on a 256M-parameter leaf went
from 4.3× to 1.06× ``optax.adamw``'s (``benchmarks/RESULTS.md``). On GPU and TPU the
one reduction is already right and is kept (``lax.platform_dependent``); Tiger's row
RMS has the opposite problem and a loop of its own (``optimizers.tiger.row_mean_square``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from optax_ext._common import explicitly_sharded

__all__ = ["axis_sum", "sum_of_squares"]

#: Kept trailing entries per reduced index from which XLA:CPU's direct form falls
#: behind: at 2048 it matches the slabs, at 4096 it takes 2.4× their time.
_MIN_TRAILING = 4096
#: Entries per slab (1 MB of float32): small enough to stay in cache with the accumulator.
_SLAB_ELEMENTS = 2**18


def axis_sum(
    x: jax.Array, axes: int | Sequence[int], term: Callable[[jax.Array], jax.Array] | None = None
) -> jax.Array:
    """Σ term(x) over ``axes``, keeping them as size 1: ``jnp.sum(term(x), axes,
    keepdims=True)`` for an elementwise ``term`` (None: x itself).

    In x's dtype (pass it in the dtype to accumulate in). Over contiguous axes followed by
    wide trailing rows, on CPU, the sum is taken slab by slab (see the module docstring):
    the float32 result then differs from the direct one by rounding, the slabs being
    added in sequence (a relative error of ~1e-6 at 10^4 slabs). An array whose type
    carries an explicit sharding keeps the direct form (a loop over slabs of a sharded
    axis would gather it).
    """
    term = term or (lambda x: x)
    axes = tuple(sorted(a % x.ndim for a in ((axes,) if isinstance(axes, int) else axes)))
    direct = lambda x: jnp.sum(term(x), axis=axes, keepdims=True)
    rows = _slab_rows(x.shape, axes)
    if rows is None or explicitly_sharded(x):
        return direct(x)
    in_slabs = lambda x: _in_slabs(x, axes, rows, term)
    return jax.lax.platform_dependent(x, cpu=in_slabs, default=direct)


def sum_of_squares(x: jax.Array, axes: int | Sequence[int]) -> jax.Array:
    """Σ x² over ``axes``, keeping them as size 1 (:func:`axis_sum` of ``jnp.square``)."""
    return axis_sum(x, axes, jnp.square)


def _slab_rows(shape: tuple[int, ...], axes: tuple[int, ...]) -> int | None:
    """Reduced indices per slab where slabs pay off, else None: the axes must be
    contiguous and followed by at least ``_MIN_TRAILING`` kept entries, and the array
    must hold at least two slabs."""
    if not axes or axes != tuple(range(axes[0], axes[-1] + 1)):
        return None
    trailing = math.prod(shape[axes[-1] + 1 :])
    if trailing < _MIN_TRAILING:
        return None
    lead, n = math.prod(shape[: axes[0]]), math.prod(shape[a] for a in axes)
    rows = max(1, _SLAB_ELEMENTS // (lead * trailing))
    return rows if n >= 2 * rows else None


def _in_slabs(x: jax.Array, axes: tuple[int, ...], rows: int, term: Callable) -> jax.Array:
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

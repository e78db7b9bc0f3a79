"""What XLA:CPU charges for: the measurements behind the CPU goals left unmet.

Two costs decide how close an optimizer's step and compile time can come to optax's on
this CPU, and both are properties of the compiler, not of one optimizer:

* **Compile time follows distinct kernels.** A step over N leaves compiles one fused
  kernel per leaf and output, but XLA:CPU compiles identical kernels (same shapes, same
  arithmetic) once. A per-leaf flag computed from the leaf's own sum of squares keeps
  the kernels identical across same-shaped leaves; a flag sliced out of a batched vector
  puts the leaf's index into its kernel, and every kernel becomes distinct. So batching
  the per-leaf reductions of a guard (the natural way to cut their count) compiles
  slower, however the batch is split back: by slices, through a ``lax.cond`` that
  returns one scalar per leaf, or by running the update itself on the stacked group.
* **A second output of a reduction costs a second pass.** Two sums over one array (here
  the plain and a weighted sum of g² over the same axis, which would let AdaFactor read
  its gradient once less) run as one fast library reduction each; every single-pass
  form (a multi-output fusion, a stacked or complex operand, a variadic reduce, a dot)
  leaves the library path and runs several times slower than the two passes.

The script measures both, plus AdaFactor's row and column means of g² with the rows
taken in cache-sized blocks (one read from memory instead of two), and a third cost,
the one fixed since: a sum over the leading axis of wide rows, Σ_i g_ij², which XLA:CPU's
direct form runs many times slower than the row sums of the same array, against the
slabs of ``optax_ext._reductions.sum_of_squares`` (its XLA:CPU form, in
``optax_ext._xla_cpu``) that AdaFactor and Amos now use
(and the same for the mean of stacked gradients in ``split_value_and_grad``), with
AdaFactor's and Amos's whole steps both ways::

    python benchmarks/bench_xla_cpu.py                # every table (several minutes)
    python benchmarks/bench_xla_cpu.py --sections steps --out results/xla_cpu_steps.json
    python benchmarks/bench_xla_cpu.py --quick        # seconds

Prints tables and writes benchmarks/results/xla_cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from benchlib import (
    abstract_gpt2,
    hlo_summary,
    machine,
    many_leaf_params,
    markdown_table,
    on_device_like,
    random_like,
    time_functions,
    time_interleaved,
    versions,
    write_json,
)
from jax import lax

import optax_ext as ox
import optax_ext._xla_cpu as xla_cpu
from optax_ext._reductions import sum_of_squares
from optax_ext.training import _mean_over_parts

# ------------------------------------------------------------------ compile time


def _update(g, m, p, bad):
    """A Lion-like leaf update; a flagged leaf keeps its momentum and shrinks."""
    if bad is not None:
        g = jnp.where(bad, -0.0, g)
    m = 0.965 * m + 0.035 * g
    step = -1e-3 * jnp.sign(m)
    if bad is not None:
        step = jnp.where(bad, -0.01 * p, step)
    return p + step, m


def _sum_of_squares(x):
    return jnp.sum(jnp.square(x))


def _groups(leaves) -> dict[tuple[int, ...], list[int]]:
    groups = collections.defaultdict(list)
    for i, x in enumerate(leaves):
        groups[x.shape].append(i)
    return groups


def _grouped_nan_flags(gs) -> tuple[jax.Array, list[int]]:
    """One sum of squares per group of same-shaped leaves: (flags, leaf index of each)."""
    flags, order = [], []
    for idx in _groups(gs).values():
        stacked = jnp.stack([gs[i].reshape(-1) for i in idx])
        flags.append(jnp.isnan(jnp.sum(jnp.square(stacked), axis=1)))
        order += idx
    return jnp.concatenate(flags), order


def _flags_none(gs):
    return [None] * len(gs)


def _flags_per_leaf(gs):
    return [jnp.isnan(_sum_of_squares(g)) for g in gs]


def _flags_sliced(gs):
    flags, order = _grouped_nan_flags(gs)
    out = [None] * len(gs)
    for j, i in enumerate(order):
        out[i] = flags[j]
    return out


def _flags_through_cond(gs):
    flags, order = _grouped_nan_flags(gs)
    position = np.argsort(order)
    return lax.cond(
        jnp.any(flags),
        lambda f: [f[j] for j in position],
        lambda f: [jnp.zeros([], bool) for _ in position],
        flags,
    )


def _step_per_leaf_flags(flags_fn):
    def step(params, mom, grads):
        gs, treedef = jax.tree.flatten(grads)
        ps, ms = treedef.flatten_up_to(params), treedef.flatten_up_to(mom)
        out = [_update(*a) for a in zip(gs, ms, ps, flags_fn(gs), strict=True)]
        return treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out])

    return step


def _step_vmapped_groups(params, mom, grads):
    """The guarded update run on each stacked group of same-shaped leaves (vmap)."""
    gs, treedef = jax.tree.flatten(grads)
    ps, ms = treedef.flatten_up_to(params), treedef.flatten_up_to(mom)
    new_p, new_m = [None] * len(gs), [None] * len(gs)

    def guarded(g, m, p):
        return _update(g, m, p, jnp.isnan(_sum_of_squares(g)))

    for idx in _groups(gs).values():
        stack = lambda xs: jnp.stack([xs[i] for i in idx])  # noqa: B023
        p_group, m_group = jax.vmap(guarded)(stack(gs), stack(ms), stack(ps))
        for j, i in enumerate(idx):
            new_p[i], new_m[i] = p_group[j], m_group[j]
    return treedef.unflatten(new_p), treedef.unflatten(new_m)


COMPILE_VARIANTS: dict[str, Callable] = {
    "no flag (the floor)": _step_per_leaf_flags(_flags_none),
    "per leaf: each leaf's own sum": _step_per_leaf_flags(_flags_per_leaf),
    "grouped sums, flags sliced": _step_per_leaf_flags(_flags_sliced),
    "grouped sums, flags through a lax.cond": _step_per_leaf_flags(_flags_through_cond),
    "grouped and vmapped update": _step_vmapped_groups,
}


def compile_rows(n_leaves: int) -> list[dict]:
    params = many_leaf_params(n_blocks=max(n_leaves // 4, 1))
    grads, mom = random_like(params), jax.tree.map(jnp.zeros_like, params)
    reference = None
    rows = []
    for name, step in COMPILE_VARIANTS.items():
        fn = jax.jit(step)
        t0 = time.perf_counter()
        lowered = fn.lower(params, mom, grads)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        summary = hlo_summary(compiled.as_text())
        # every guarded variant computes the same numbers
        result = compiled(params, mom, grads)
        if name != "no flag (the floor)":
            if reference is None:
                reference = result
            for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        rows.append(
            {
                "variant": name,
                "leaves": len(jax.tree.leaves(params)),
                "lower_s": t1 - t0,
                "compile_s": t2 - t1,
                "fusions": summary["fusions"],
                "distinct": summary["distinct_kernels"],
            }
        )
        print(f"  {name}: {t2 - t0:.2f} s", flush=True)
    return rows


# ------------------------------------------------------------------ reductions


def _along(w, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return w.reshape(shape)


def _one_sum(g, w, axis):
    return jnp.sum(jnp.square(g), axis=axis)


def _two_passes(g, w, axis):
    plain = jnp.sum(jnp.square(g), axis=axis)
    plain, g = lax.optimization_barrier((plain, g))  # keeps XLA from fusing the two
    return plain, jnp.sum(jnp.square(g) * _along(w, axis, g.ndim), axis=axis)


def _multi_output(g, w, axis):
    sq = jnp.square(g)
    return jnp.sum(sq, axis=axis), jnp.sum(sq * _along(w, axis, g.ndim), axis=axis)


def _stacked(g, w, axis):
    sq = jnp.square(g)
    both = jnp.sum(jnp.stack([sq, sq * _along(w, axis, g.ndim)]), axis=axis + 1)
    return both[0], both[1]


def _complex(g, w, axis):
    sq = jnp.square(g)
    both = jnp.sum(lax.complex(sq, sq * _along(w, axis, g.ndim)), axis=axis)
    return jnp.real(both), jnp.imag(both)


def _variadic(g, w, axis):
    sq = jnp.square(g)
    zero = np.float32(0)
    add2 = lambda a, b: (a[0] + b[0], a[1] + b[1])
    return lax.reduce((sq, sq * _along(w, axis, g.ndim)), (zero, zero), add2, (axis,))


def _dot(g, w, axis):
    both = jnp.tensordot(jnp.square(g), jnp.stack([jnp.ones_like(w), w], 1), ([axis], [0]))
    return both[:, 0], both[:, 1]


REDUCTION_VARIANTS = {
    "one sum (reference)": _one_sum,
    "two passes": _two_passes,
    "one multi-output fusion": _multi_output,
    "stacked operand": _stacked,
    "complex operand": _complex,
    "variadic reduce": _variadic,
    "dot with [1, w]": _dot,
}


def reduction_rows(shape: tuple[int, int], repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    g = jnp.asarray(rng.standard_normal(shape, np.float32))
    rows = []
    for axis in (0, 1):
        w = jnp.asarray(rng.uniform(0.5, 2.0, shape[axis]).astype(np.float32))
        fns = {n: functools.partial(f, axis=axis) for n, f in REDUCTION_VARIANTS.items()}
        want = jax.jit(fns["two passes"])(g, w)
        for name, fn in fns.items():
            if name != "one sum (reference)":  # every form computes the same two sums
                for a, b in zip(jax.jit(fn)(g, w), want, strict=True):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4)
        shape_text = "x".join(map(str, shape))
        for name, seconds in time_functions(fns, g, w, repeats=repeats).items():
            rows.append({"shape": shape_text, "axis": axis, "form": name, "ms": seconds * 1e3})
    return rows


# ------------------------------------------------- AdaFactor's moments in blocks


def row_and_column_sums(g):
    """Σ g² over each row and over each column, in two reductions of the whole array."""
    sq = jnp.square(g)
    rows = jnp.sum(sq, axis=1)
    rows, g = lax.optimization_barrier((rows, g))
    return rows, jnp.sum(jnp.square(g), axis=0)


def blocked_row_and_column_sums(g, block_elements: int = 2**20):
    """The same sums from blocks of rows small enough to stay in cache between the two
    reductions, so the array is read from memory once (a tail block after the loop)."""
    n, m = g.shape
    block = min(max(block_elements // m, 1), n)
    n_blocks, tail = divmod(n, block)

    def body(i, carry):
        rows, cols = carry
        sq = jnp.square(lax.dynamic_slice_in_dim(g, i * block, block, 0))
        rows = lax.dynamic_update_slice_in_dim(rows, jnp.sum(sq, axis=1), i * block, 0)
        return rows, cols + jnp.sum(sq, axis=0)

    zeros = (jnp.zeros((n,), g.dtype), jnp.zeros((m,), g.dtype))
    rows, cols = lax.fori_loop(0, n_blocks, body, zeros)
    if tail:
        sq = jnp.square(g[n_blocks * block :])
        rows = rows.at[n_blocks * block :].set(jnp.sum(sq, axis=1))
        cols = cols + jnp.sum(sq, axis=0)
    return rows, cols


def moment_rows(shape: tuple[int, int], repeats: int, block_elements: int) -> list[dict]:
    g = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    fns = {
        "two reductions": row_and_column_sums,
        "blocks of rows": lambda x: blocked_row_and_column_sums(x, block_elements),
    }
    for a, b in zip(*(jax.jit(f)(g) for f in fns.values()), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
    shape_text = "x".join(map(str, shape))
    return [
        {"shape": shape_text, "form": name, "ms": seconds * 1e3}
        for name, seconds in time_functions(fns, g, repeats=repeats).items()
    ]


# ------------------------------------------- sums over a leading axis of wide rows


def column_rows(total: int, widths: list[int], repeats: int) -> list[dict]:
    """Σ g² over axis 0 of (total/width, width) arrays: XLA:CPU's direct reduction, the
    slabs of ``optax_ext._reductions.sum_of_squares``, and the row sums (over axis 1) of
    the same array as the speed to expect."""
    forms = {
        "row sums (axis 1)": lambda g: jnp.sum(jnp.square(g), axis=1),
        "column sums, direct": lambda g: jnp.sum(jnp.square(g), axis=0),
        "column sums, slabs": lambda g: sum_of_squares(g, 0),
    }
    rows = []
    for width in widths:
        g = jax.random.normal(jax.random.key(0), (max(total // width, 1), width), jnp.float32)
        want = np.sum(np.asarray(g, np.float64) ** 2, axis=0)
        got = np.asarray(jax.jit(forms["column sums, slabs"])(g))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for name, seconds in time_functions(forms, g, repeats=repeats).items():
            rows.append({"shape": "x".join(map(str, g.shape)), "form": name, "ms": seconds * 1e3})
        del g
    return rows


def parts_rows(entries: int, parts: list[int], repeats: int) -> list[dict]:
    """The mean of k stacked gradients, (k, n) over axis 0, as ``split_value_and_grad``
    takes it: ``jnp.mean`` against ``optax_ext.training._mean_over_parts`` (slabs)."""
    rows = []
    for k in parts:
        g = jax.random.normal(jax.random.key(0), (k, entries // k), jnp.float32)
        np.testing.assert_allclose(_mean_over_parts(g), jnp.mean(g, axis=0), rtol=1e-6)
        forms = {"jnp.mean": lambda g: jnp.mean(g, axis=0), "slabs": _mean_over_parts}
        for name, seconds in time_functions(forms, g, repeats=repeats).items():
            rows.append({"shape": "x".join(map(str, g.shape)), "form": name, "ms": seconds * 1e3})
        del g
    return rows


# ------------------------------------------------------------------ main


def with_slab_threshold(tx: optax.GradientTransformation, threshold: int):
    """``tx`` with ``optax_ext._xla_cpu``'s slab threshold set to ``threshold`` while its
    update traces (a threshold out of reach: the direct reductions everywhere)."""

    def update(updates, state, params=None, **extra_args):
        shipped = xla_cpu._MIN_TRAILING
        xla_cpu._MIN_TRAILING = threshold
        try:
            return tx.update(updates, state, params, **extra_args)
        finally:
            xla_cpu._MIN_TRAILING = shipped

    return optax.GradientTransformationExtraArgs(tx.init, update)


def step_rows(sizes: list[int], repeats: int) -> list[dict]:
    """AdaFactor's and Amos's donated steps on GPT-2-shaped trees, the slabs of
    ``optax_ext._reductions`` against the direct reductions, interleaved in one run."""
    optimizers = {"adafactor": lambda: ox.adafactor(1e-3), "amos": lambda: ox.amos(1e-3)}
    rows = []
    for size in sizes:
        params = on_device_like(abstract_gpt2(size), seed=0, scale=0.02)
        grads = on_device_like(params, seed=1)
        for name, make in optimizers.items():
            candidates = {"direct": with_slab_threshold(make(), 2**62), "slabs": make()}
            ms = {
                form: r["median_s"] * 1e3
                for form, r in time_interleaved(candidates, params, grads, repeats).items()
            }
            rows.append(
                {
                    "optimizer": name,
                    "params": sum(x.size for x in jax.tree.leaves(params)),
                    "direct_ms": ms["direct"],
                    "slabs_ms": ms["slabs"],
                    "ratio": ms["slabs"] / ms["direct"],
                }
            )
            print(f"  {name}, {size / 1e6:.0f}M: slabs/direct {rows[-1]['ratio']:.2f}", flush=True)
        del params, grads
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help="which tables to measure")
    ap.add_argument("--leaves", type=int, default=512)
    ap.add_argument("--shape", default="8192x4096", help="the reductions' array")
    ap.add_argument("--moment-shape", default="50257x768", help="AdaFactor's moments' array")
    ap.add_argument("--column-totals", default="67108864,8388608", help="entries per array")
    ap.add_argument("--widths", default="2048,4096,8192,16384,17088")
    ap.add_argument("--parts-entries", type=int, default=2**26, help="the stacked parts' size")
    ap.add_argument("--step-sizes", default="1.6e7,6.4e7,2.56e8", help="GPT-2-shaped trees")
    ap.add_argument("--block", type=int, default=2**20, help="elements per block of rows")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds")
    ap.add_argument("--out", default=None, help="JSON path (default results/xla_cpu.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.leaves, args.shape, args.moment_shape, args.repeats = 16, "256x128", "300x128", 3
        args.block, args.column_totals, args.widths = 4096, "65536", "256,512"
        args.parts_entries, args.step_sizes = 2**14, "1e5"
    results = {"machine": machine(), "versions": versions()}
    f2 = lambda x: f"{x:.2f}"
    for name in args.sections.split(","):
        measure, columns = SECTIONS[name]
        print(f"{name}", flush=True)
        results[name] = measure(args)
        print(
            markdown_table(results[name], [(k, h, f2 if f is None else f) for k, h, f in columns])
        )
        print()
    print("wrote", write_json("xla_cpu", results, args.out))
    return results


_shape = lambda text: tuple(int(s) for s in text.split("x"))
_ints = lambda text: [int(float(s)) for s in text.split(",")]

#: name: (measure(args) -> rows, table columns (key, header, formatter or None: 2 decimals))
SECTIONS = {
    "compile": (
        lambda a: compile_rows(a.leaves),
        [
            ("variant", "per-leaf NaN flag", str),
            ("leaves", "leaves", str),
            ("lower_s", "trace + lower s", None),
            ("compile_s", "compile s", None),
            ("fusions", "fusions", str),
            ("distinct", "distinct kernels", str),
        ],
    ),
    "reductions": (
        lambda a: reduction_rows(_shape(a.shape), a.repeats),
        [("shape", "array", str), ("axis", "summed axis", str), ("form", "form", str)]
        + [("ms", "ms", None)],
    ),
    "moments": (
        lambda a: moment_rows(_shape(a.moment_shape), a.repeats, a.block),
        [("shape", "array", str), ("form", "row and column sums of g²", str), ("ms", "ms", None)],
    ),
    "columns": (
        lambda a: [
            row
            for total in _ints(a.column_totals)
            for row in column_rows(total, _ints(a.widths), a.repeats)
        ],
        [("shape", "array", str), ("form", "Σ g²", str), ("ms", "ms", None)],
    ),
    "parts": (
        lambda a: parts_rows(a.parts_entries, [2, 4, 8], a.repeats),
        [("shape", "stacked parts", str), ("form", "mean over axis 0", str), ("ms", "ms", None)],
    ),
    "steps": (
        lambda a: step_rows(_ints(a.step_sizes), a.repeats),
        [
            ("optimizer", "optimizer", str),
            ("params", "GPT-2-shaped params", lambda x: f"{x / 1e6:.1f}M"),
            ("direct_ms", "direct ms", None),
            ("slabs_ms", "slabs ms", None),
            ("ratio", "slabs / direct", None),
        ],
    ),
}


if __name__ == "__main__":
    main()

"""Whole-matrix transforms on a device mesh: each matrix computed once, by one owner.

msign, mclip and the spectral norm need a whole matrix. Left to the compiler, a matrix
sharded by rows (FSDP) or columns (tensor parallel) has every Newton–Schulz product
partitioned: each step all-gathers or all-reduces pieces of the matrix, many times the
matrix's own bytes per step. :func:`owner_compute` instead gives each whole matrix to
one device along some mesh axes (its owner), which transforms it locally, batched with
the other matrices of the same shape it owns, and sends the result back:

1. the matrices are grouped by shape and dtype (with ``transposable``, an (n, m) matrix
   joins the (m, n) group; it moves as it lies and its owner transposes it);
2. each group's K matrices of one orientation are laid out in P·C slots, C = ⌈K/P⌉
   for the P devices along ``axes``; device p owns a contiguous run of ⌊K/P⌋ or
   ⌈K/P⌉ of them and the rest of its slots are zero padding. The devices that take
   the extra matrices are those with the least work so far, counting a matrix (m, n)
   as m·n·min(m, n) (Newton–Schulz's cost), groups taken from the most costly;
3. the slot array is constrained to the owner layout (slots over ``axes``, the
   matrix axes left to the other mesh axes) and the compiler moves it there: from
   rows or columns over ``axes``, one all-to-all per group. A constraint rather than a
   written ``lax.all_to_all``: under auto axes the matrices' shardings are not known
   while tracing, and the compiler moves them from whatever layout they have;
4. ``fn`` runs once per group inside :func:`jax.shard_map` (manual over ``axes`` only)
   on the device's matrices of both orientations, the padding beyond the most any
   device owns left out;
5. the results are laid out as the inputs were (one all-to-all per group back) and
   keep each input's sharding.

On P devices the compiled program then runs about ⌈K/P⌉ matrices of each group per
device (instead of every product partitioned), and each orientation's P·⌈K/P⌉ slots go
out and come back once: about 2·⌈K/P⌉·m·n values per device. Every device runs the same
shapes (one program), so padding costs as much as a real matrix; grouping transposes
together (``transposable``) leaves fewer groups to pad. A group that is one stack
split over ``axes`` along its batch axis (stacked layers, experts), its count a
multiple of P, is owned where it lies and moves nothing. A matrix whose rows and
columns are split over two different axes of ``axes`` cannot be moved by one
all-to-all: the compiler gathers it instead (correct, not efficient); give
``axes`` the axis that splits one of its dimensions.

The same idea elsewhere: Keller Jordan's reference Muon has each data-parallel rank
orthogonalise every world-size-th matrix and all-gathers the results
(https://kellerjordan.github.io/posts/muon/); Moonlight's Distributed Muon gathers each
ZeRO-1 shard's whole matrix on every rank (Liu et al., arXiv 2502.16982, Algorithm 1);
sharded Muon is optax issue 1660. This is the single-program (SPMD) form under
``jax.set_mesh``, with auto or explicit axis types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, PartitionSpec

__all__ = ["check_owner_axes", "owner_compute", "owner_mesh"]


def check_owner_axes(axes: Any, name: str = "owner_axes") -> tuple[str, ...] | None:
    """``axes`` as a tuple of mesh axis names (``None`` kept), or ``ValueError`` naming
    ``name``: a name or a non-empty sequence of distinct names."""
    if axes is None:
        return None
    given = (axes,) if isinstance(axes, str) else axes
    try:
        given = tuple(given)
    except TypeError:
        given = None
    if not given or not all(isinstance(a, str) and a for a in given):
        raise ValueError(
            f"{name} must be a mesh axis name or a non-empty tuple of names, e.g. 'data' "
            f"or ('data', 'model'), got {axes!r}"
        )
    if len(set(given)) != len(given):
        raise ValueError(f"{name}={axes!r} names an axis twice")
    return given


def _describe(mesh) -> str:
    sizes = ", ".join(f"{n!r}: {s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return f"the mesh {{{sizes}}}"


def owner_mesh(axes: Sequence[str], name: str = "owner_axes"):
    """The mesh set by ``jax.set_mesh`` (abstract, as seen while tracing), checked to
    hold every axis of ``axes``; ``ValueError`` naming the axis and the mesh otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(
            f"{name}={tuple(axes)!r} needs a device mesh, but no mesh is set: run the step "
            "under `with jax.set_mesh(mesh):` (a mesh from jax.make_mesh with these axes)"
        )
    for axis in axes:
        if axis not in mesh.axis_names:
            raise ValueError(
                f"{name}: the axis {axis!r} is not in {_describe(mesh)}; its axes are "
                f"{tuple(mesh.axis_names)!r}"
            )
    return mesh


def owner_compute(
    fn: Callable[[jax.Array], jax.Array],
    axes: str | Sequence[str],
    *,
    transposable: bool = False,
) -> Callable[[Any], Any]:
    """``fn`` over every matrix of a tree, each whole matrix computed by one owner along ``axes``.

    Args:
      fn: a batched function of matrices, (C, m, n) → (C, m, n), where each output
        matrix depends only on the same input matrix (padding slots hold zeros, and
        their results are dropped). It runs inside :func:`jax.shard_map`, manual over
        ``axes``: it sees whole matrices, still sharded along the mesh's other axes
        (those are left to the compiler), and must not use collectives over ``axes``.
      axes: a mesh axis name or a tuple of names, of the mesh set by
        ``jax.set_mesh`` (auto or explicit axis types).
      transposable: ``fn(xᵀ) = fn(x)ᵀ`` (msign, mclip, singular-value clipping): an
        (n, m) matrix is transposed into the (m, n) group (m ≤ n), so fewer groups
        need padding.

    Returns:
      ``apply(tree)``: every leaf an array of rank ≥ 2 whose last two axes are the
      matrix and the others a batch of them; returns the tree of ``fn``'s results,
      each with its input's shape and sharding. Raises ``ValueError`` naming the axis
      and the mesh when no mesh is set or an axis is not in it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((1,), ("data",))
      >>> double = owner_compute(lambda x: 2 * x, "data")
      >>> with jax.set_mesh(mesh):
      ...     out = jax.jit(double)({"w": jnp.ones((2, 3)), "v": jnp.ones((4, 2, 3))})
      >>> out["v"].shape, float(out["w"].sum())
      ((4, 2, 3), 12.0)
    """
    axes = check_owner_axes(axes, "axes")

    def apply(tree):
        leaves, treedef = jax.tree.flatten(tree)
        mesh = owner_mesh(axes, "axes")
        for x in leaves:
            if jnp.ndim(x) < 2:
                raise ValueError(
                    f"owner_compute: every leaf must be a (batch of) matrices, got shape "
                    f"{jnp.shape(x)}"
                )
        run = lambda leaves: _owner_apply(fn, axes, transposable, leaves, mesh.shape)
        if any(t == AxisType.Explicit for t in mesh.axis_types):
            # Typed (explicit) shardings would need every reshape and slice below to
            # name its output's sharding: let the partitioner place the inside, and
            # hand every result back with its input's sharding, as a spec of the mesh
            # set (a leaf not on the mesh comes back replicated on it).
            out_sharding = [jax.typeof(x).sharding.spec for x in leaves]
            out = jax.sharding.auto_axes(run, out_sharding=out_sharding)(leaves)
        else:
            out = run(leaves)
        return jax.tree.unflatten(treedef, out)

    return apply


def _owner_apply(fn, axes, transposable, leaves, sizes) -> list[jax.Array]:
    """Groups, moves, computes and moves back (auto axes here: see :func:`owner_compute`)."""
    n_owners = math.prod(sizes[a] for a in axes)
    # group key (m, n, dtype) → orientation (transposed?) → leaf indices
    groups: dict[tuple, dict[bool, list[int]]] = {}
    for i, x in enumerate(leaves):
        m, n = x.shape[-2:]
        flip = transposable and m > n
        key = (n, m, x.dtype) if flip else (m, n, x.dtype)
        groups.setdefault(key, {}).setdefault(flip, []).append(i)
    cost = lambda key: key[0] * key[1] * min(key[0], key[1])
    load = [0] * n_owners
    out: list[Any] = [None] * len(leaves)
    for key in sorted(groups, key=cost, reverse=True):  # most costly first: their
        # remainders go to the least loaded owners. Each orientation moves on its own,
        # as it lies (a concatenation of row- and column-split matrices would make
        # the compiler reshard one of them first), and is transposed by its owner.
        moves = []
        for flip, members in sorted(groups[key].items()):
            parts = [leaves[i].reshape((-1,) + leaves[i].shape[-2:]) for i in members]
            stack = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
            counts = _balanced_counts(stack.shape[0], n_owners, cost(key), load)
            moves.append((flip, members, parts, counts, _to_slots(stack, counts)))
        results = _compute(fn, axes, [(m[0], m[3], m[4]) for m in moves])
        for (_, members, parts, counts, _), slots in zip(moves, results, strict=True):
            done, start = _from_slots(slots, counts), 0
            for i, part in zip(members, parts, strict=True):
                y = done[start : start + part.shape[0]].reshape(leaves[i].shape)
                start += part.shape[0]
                # The result keeps its input's sharding (the compiler would otherwise
                # be free to leave it in the owners' layout).
                out[i] = shard_alike(leaves[i], y)[1]
    return out


def _balanced_counts(k: int, n_owners: int, cost: int, load: list[int]) -> list[int]:
    """How many of a group's k matrices each owner takes: ⌊k/P⌋ each, and one more for
    the k mod P owners with the least work so far (``load``, updated; lowest index
    first on ties)."""
    base, extra = divmod(k, n_owners)
    counts = [base] * n_owners
    for p in sorted(range(n_owners), key=lambda p: (load[p], p))[:extra]:
        counts[p] += 1
    for p, c in enumerate(counts):
        load[p] += c * cost
    return counts


def _to_slots(stack: jax.Array, counts: list[int]) -> jax.Array:
    """(P, C, m, n): owner p's run of ``counts[p]`` matrices, then zeros up to C."""
    slots = max(counts)
    if all(c == slots for c in counts):
        return stack.reshape((len(counts), slots) + stack.shape[1:])
    parts, start = [], 0
    for c in counts:
        parts.append(stack[start : start + c])
        if c < slots:
            parts.append(jnp.zeros((slots - c,) + stack.shape[1:], stack.dtype))
        start += c
    return jnp.concatenate(parts).reshape((len(counts), slots) + stack.shape[1:])


def _from_slots(slots: jax.Array, counts: list[int]) -> jax.Array:
    """The inverse of :func:`_to_slots`: the owners' runs back in order, padding dropped."""
    if all(c == slots.shape[1] for c in counts):
        return slots.reshape((-1,) + slots.shape[2:])
    runs = [slots[p, :c] for p, c in enumerate(counts) if c]
    return runs[0] if len(runs) == 1 else jnp.concatenate(runs)


def _compaction(counts: list[list[int]], slots: list[int]) -> np.ndarray | None:
    """(P, C) int32: for each owner, where its real matrices lie among its Σ_f C_f
    slots (orientation f's at offset Σ_{g<f} C_g), then as many of its padding slots as
    fill C = max_p Σ_f counts_f[p]; None when every slot is needed (C = Σ_f C_f)."""
    per_owner = [sum(c) for c in zip(*counts, strict=True)]
    width = max(per_owner)
    if width == sum(slots):
        return None
    offsets = np.cumsum([0, *slots[:-1]])
    table = []
    for p, n_real in enumerate(per_owner):
        real = [o + j for o, c in zip(offsets, counts, strict=True) for j in range(c[p])]
        pad = [
            o + j for o, c, n in zip(offsets, counts, slots, strict=True) for j in range(c[p], n)
        ]
        table.append(real + pad[: width - n_real])
    return np.asarray(table, np.int32)


def _compute(fn, axes, moves) -> list[jax.Array]:
    """``fn`` on each owner's matrices of one group. ``moves``: (transposed?, counts,
    slots (P, C_f, ·, ·)) per orientation; each slot array is constrained to the owner
    layout (slot axis over ``axes``, the matrix axes as they are on the mesh's other
    axes), the move. Each owner transposes its flipped matrices, drops the padding
    beyond its C = max_p Σ_f counts_f[p] real matrices, runs ``fn`` once on (C, m, n),
    and puts the results back in its slots."""
    free = PartitionSpec.UNCONSTRAINED
    owned = PartitionSpec(axes, None, free, free)
    flips = [flip for flip, _, _ in moves]
    slots = [jax.lax.with_sharding_constraint(s, owned) for _, _, s in moves]
    table = _compaction([counts for _, counts, _ in moves], [s.shape[1] for s in slots])

    def local(*blocks):  # (1, C_f, ·, ·) each: this owner's slots
        mats = [
            jnp.swapaxes(b[0], -1, -2) if f else b[0] for f, b in zip(flips, blocks, strict=True)
        ]
        x = mats[0] if len(mats) == 1 else jnp.concatenate(mats)
        if table is None:
            y = fn(x)
        else:  # this owner's real matrices (and enough padding to fill C slots)
            rows = jnp.asarray(table)[jax.lax.axis_index(axes)]
            real = fn(x[rows])
            y = jnp.zeros(x.shape[:1] + real.shape[1:], real.dtype).at[rows].set(real)
        outs, start = [], 0
        for f, b in zip(flips, blocks, strict=True):
            part = y[start : start + b.shape[1]]
            start += b.shape[1]
            outs.append((jnp.swapaxes(part, -1, -2) if f else part)[None])
        return tuple(outs)

    spec = PartitionSpec(axes)
    specs = (spec,) * len(slots)
    run = jax.shard_map(local, in_specs=specs, out_specs=specs, axis_names=set(axes))
    return list(run(*slots))

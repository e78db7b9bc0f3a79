"""Helpers for the test suite: Flax-shaped parameter trees and float64 comparisons.

Every optimizer is checked against a float64 NumPy re-implementation of its formulas written
in its test file. These helpers only make trees and compare them; they contain no
optimizer arithmetic.
"""

from __future__ import annotations

import contextlib
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import path_to_str


def one_device_env() -> dict[str, str]:
    """This process's environment for a subprocess on one CPU device: the suite's other
    XLA flags (its compile-time ones, tests/conftest.py) kept, the 8-device flag set to 1."""
    flag = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    return dict(os.environ) | {"XLA_FLAGS": " ".join([*flags, f"{flag}=1"]), "JAX_PLATFORMS": "cpu"}


def flax_like_params(seed: int = 0, *, vocab=37, width=16, heads=2, layers=1, dtype=jnp.float32):
    """A parameter tree shaped like a small Flax transformer, with Flax's names.

    One layer (18 leaves) already holds every kind of leaf the optimizers tell apart;
    each further layer repeats them and adds compile time to every test.

    Paths include ``embedding`` (vocab, width), ``kernel`` (2-D and 3-D attention
    kernels), ``bias`` and LayerNorm ``scale``; values are random (norm scales near 1,
    biases small, some leaves exactly zero as Flax initialises them).
    """
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(np.float32)
    head_dim = width // heads
    p = {"embed": {"embedding": n(vocab, width)}}
    for i in range(layers):
        p[f"layer_{i}"] = {
            "attention": {
                name: {
                    "kernel": n(width, heads, head_dim, s=width**-0.5),
                    "bias": n(heads, head_dim, s=0.1),
                }
                for name in ("query", "key", "value")
            }
            | {
                "out": {
                    "kernel": n(heads, head_dim, width, s=width**-0.5),
                    "bias": np.zeros(width, np.float32),
                }
            },
            "LayerNorm_0": {"scale": 1 + n(width, s=0.1), "bias": n(width, s=0.1)},
            "mlp": {
                "Dense_0": {
                    "kernel": n(width, 2 * width, s=width**-0.5),
                    "bias": n(2 * width, s=0.1),
                },
                "Dense_1": {
                    "kernel": n(2 * width, width, s=(2 * width) ** -0.5),
                    "bias": n(width, s=0.1),
                },
            },
        }
    p["final_norm"] = {"scale": 1 + n(width, s=0.1)}
    p["head"] = {"kernel": n(width, vocab, s=width**-0.5), "bias": np.zeros(vocab, np.float32)}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), {"params": p})


def tiny_params(seed: int = 0, dtype=jnp.float32):
    """Six small leaves with Flax's names, for tests that run many programs on one tree:
    an embedding, a 3-D attention kernel and its bias, a dense kernel and bias, a norm
    scale. Every leading axis but the attention bias's shards over 8 devices.
    """
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=1.0: (s * rng.standard_normal(shape)).astype(np.float32)
    p = {
        "embed": {"embedding": n(16, 8)},
        "attention": {"query": {"kernel": n(8, 2, 4, s=8**-0.5), "bias": n(2, 4, s=0.1)}},
        "mlp": {"Dense_0": {"kernel": n(8, 16, s=8**-0.5), "bias": n(16, s=0.1)}},
        "LayerNorm_0": {"scale": 1 + n(8, s=0.1)},
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), {"params": p})


def sparse_tree(seed: int = 1, dtype=jnp.float32):
    """Two embedding tables (2-D and 3-D), a kernel, a bias and a 0-d scale: the leaves
    a lazy optimizer treats row by row and those it does not."""
    rng = np.random.default_rng(seed)
    tree = {
        "embed": {"embedding": rng.standard_normal((7, 4))},
        "pos": {"sub": {"embedding": rng.standard_normal((5, 2, 3))}},
        "dense": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)},
        "gate": {"scale": rng.standard_normal(())},
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def sparse_grads(tree, seed: int):
    """Random gradients with some rows x[i, ...] (and some single entries) exactly zero."""
    rng = np.random.default_rng(seed)

    def one(x):
        g = np.array(rng.standard_normal(x.shape))
        if x.ndim == 0:
            return jnp.asarray(g if rng.random() < 0.5 else 0.0, x.dtype)
        g[rng.random(x.shape[0]) < 0.5] = 0.0
        g[(rng.random(x.shape) < 0.2)] = 0.0  # partly zero rows are still touched
        if x.ndim == 3:  # a row x[0] touched only in x[0, 1, :] still moves as a whole
            g[0] = 0.0
            g[0, 1, 0] = 1.0
        return jnp.asarray(g, x.dtype)

    return jax.tree.map(one, tree)


#: quantize_state settings for small trees: every leaf of >= 64 elements, blocks of 32
SMALL_QUANTIZED = dict(block=32, min_size=64)


def small_quantized_params(seed: int = 1):
    """A few leaves with Flax names: two quantised with ``SMALL_QUANTIZED`` (one with a
    short last block), two left float; the leading axes shard 16 rows over 8 devices.
    Each quantised leaf adds its own encode and decode to a compiled step, so few leaves
    keep compiles short."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {
        "params": {
            "embed": {"embedding": n(16, 9)},
            "dense": {"kernel": n(16, 8), "bias": n(8)},
            "norm": {"scale": 1 + n(8)},
        }
    }


def attention_params(seed: int = 0, heads: int = 2, width: int = 4):
    """Query and key kernels (width, heads, 3) of one attention block, Flax-named."""
    rng = np.random.default_rng(seed)
    n = lambda: jnp.asarray(rng.standard_normal((width, heads, 3)), jnp.float32)
    return {"attn": {"query": {"kernel": n()}, "key": {"kernel": n()}}}


def with_singular_values(s, rows: int, cols: int, seed: int, *, factors: bool = False):
    """U diag(s) Vᵀ with random orthonormal U (rows × k) and V (cols × k), k = len(s), in
    float64; with ``factors``, ``(matrix, U, V)``."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(s))))
    m = (u * s) @ v.T
    return (m, u, v) if factors else m


def poison(tree, which: dict[int, float]):
    """A copy of ``tree`` whose leaf number i (flatten order) gets its first element set
    to ``which[i]`` (a NaN, an inf, a huge value)."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [x.at[(0,) * x.ndim].set(which[i]) if i in which else x for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, leaves)


def random_tree(seed: int, *, max_leaves: int = 6, dtype=jnp.float32):
    """A random nested tree with Flax-like leaf names and random shapes (1-D to 3-D)."""
    rng = np.random.default_rng(seed)
    names = ["kernel", "bias", "scale", "embedding", "kernel"]
    tree = {}
    for i in range(int(rng.integers(2, max_leaves + 1))):
        name = names[int(rng.integers(len(names)))]
        ndim = {"bias": 1, "scale": 1, "embedding": 2}.get(name, int(rng.integers(2, 4)))
        shape = tuple(int(d) for d in rng.integers(1, 9, size=ndim))
        centre = 1.0 if name == "scale" else 0.0
        value = centre + rng.standard_normal(shape).astype(np.float32)
        tree[f"module_{i}"] = (
            {"sub": {name: jnp.asarray(value, dtype)}}
            if i % 2
            else {name: jnp.asarray(value, dtype)}
        )
    return tree


def random_grads_like(tree, seed: int, scale: float = 1.0):
    """Random normal gradients with the tree's structure, shapes and dtypes."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), tree)


def to_f64(tree):
    """A copy of the tree as float64 NumPy arrays (the reference's working precision)."""
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def leaf_paths(tree):
    """List of (path string, leaf) in flatten order."""
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_trees_close(actual, expected, *, rtol=1e-6, atol=1e-6, err=""):
    """Asserts two trees have the same structure and allclose leaves (with paths in errors)."""
    a_leaves = leaf_paths(actual)
    e_leaves = leaf_paths(expected)
    assert [p for p, _ in a_leaves] == [p for p, _ in e_leaves], "tree structures differ"
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(e, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=f"{err} at {path}",
        )


@contextlib.contextmanager
def x64():
    """Runs JAX in float64 inside the block, so a float64 reference can be matched to 1e-12
    without sign flips from float32 rounding."""
    with jax.enable_x64(True):
        yield


def run_steps(tx, params, grads_seq, *, jit=True, **extra_args):
    """Applies ``tx`` to ``params`` for each gradient of ``grads_seq``; (params, state)."""
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p, **extra_args)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


# ------------------------------------------------------------------ device paths

DEVICE_PATHS = ("eager", "jit", "pmap", "sharded", "explicit")


def _apply(tx, params, state, grads, extra):
    updates, state = tx.update(grads, state, params, **extra)
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates), state


def _per_device_grads(grads, seed, n, split="noise"):
    """n per-device gradients whose mean is ``grads``: ``"noise"`` adds noise with zero
    mean; ``"scale"`` multiplies by per-device factors with mean one, so entries that are
    exactly zero stay zero on every device (as the embedding rows of tokens a batch does
    not hold are)."""
    rng = np.random.default_rng(seed)

    def scale(g):
        c = 1 + rng.standard_normal((n,) + (1,) * g.ndim).astype(np.float32)
        c -= c.mean(axis=0) - 1
        return jnp.asarray(c * np.asarray(g)[None], g.dtype)

    if split == "scale":
        return jax.tree.map(scale, grads)

    def add_noise(g):
        noise = rng.standard_normal((n, *g.shape)).astype(np.float32)
        noise -= noise.mean(axis=0, keepdims=True)
        return jnp.asarray(np.asarray(g, np.float32)[None] + noise, g.dtype)

    return jax.tree.map(add_noise, grads)


def _data_sharding(mesh, x):
    """Shards a leaf along its first axis divisible by the mesh size, else replicates it.

    The spec ends at the sharded axis (``P("data")``, not ``P("data", None)``): the form
    ``jit`` gives its outputs, so the second step's arguments match the first's and the
    step compiles once, as in a training loop."""
    from jax.sharding import NamedSharding, PartitionSpec

    n = mesh.devices.size
    for axis, d in enumerate(x.shape):
        if d % n == 0 and d > 0:
            return NamedSharding(mesh, PartitionSpec(*[None] * axis, "data"))
    return NamedSharding(mesh, PartitionSpec())


def run_path(tx, params, grads_seq, path: str, extra_args=None, split="noise", compile_once=False):
    """Runs ``tx`` over a list of gradient trees along one device path.

    - ``eager``: op by op, no jit.
    - ``jit``: one jitted step.
    - ``pmap``: params and state replicated on all devices; each device gets a different
      gradient whose mean over devices is the step's gradient, averaged with
      ``lax.pmean`` before the optimizer (as a data-parallel step does); ``split`` picks
      how the step's gradient is spread over devices (see ``_per_device_grads``).
    - ``sharded``: ``jit`` with params and state sharded over an 8-device
      ``NamedSharding`` mesh; asserts that the state keeps the params' shardings.
    - ``explicit``: the same with the mesh's axis explicit (``AxisType.Explicit`` under
      ``jax.set_mesh``), where shardings are part of every array's type.

    With ``compile_once``, every path but eager traces its step once: later steps must
    reuse the first step's program (``traced_once``), as in a training loop.

    Returns ``(params, state)`` as host-side trees (first replica under pmap).
    """
    extra = dict(extra_args or {})
    jit = jit_once if compile_once else jax.jit
    if path == "eager":
        state = tx.init(params)
        with jax.disable_jit():
            for g in grads_seq:
                params, state = _apply(tx, params, state, g, extra)
        return params, state
    if path == "jit":
        state = tx.init(params)
        step = jit(lambda p, s, g: _apply(tx, p, s, g, extra))
        for g in grads_seq:
            params, state = step(params, state, g)
        return params, state
    if path == "pmap":
        from optax_ext.training import replicate

        # replicate lays the copies out as pmap lays out its outputs: every step reuses
        # the first step's program
        n = jax.device_count()
        p, s = (replicate(t, n, axis_name="devices") for t in (params, tx.init(params)))

        def step(p, s, g):
            g = jax.lax.pmean(g, "devices")
            return _apply(tx, p, s, g, extra)

        pstep = jax.pmap(traced_once(step) if compile_once else step, axis_name="devices")
        for i, g in enumerate(grads_seq):
            p, s = pstep(p, s, _per_device_grads(g, 1000 + i, n, split))
        first = lambda t: jax.tree.map(lambda x: np.asarray(x)[0], t)
        return first(p), first(s)
    if path in ("sharded", "explicit"):
        from jax.sharding import AxisType

        axis_type = AxisType.Explicit if path == "explicit" else AxisType.Auto
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
        # from host memory: slicing a device array into shards would compile a program
        on_mesh = lambda x: jax.device_put(np.asarray(x), _data_sharding(mesh, x))
        shard = lambda t: jax.tree.map(on_mesh, t)
        # under the mesh (jax.set_mesh) init's constants carry it too, as the step's
        # outputs do: the second step then reuses the first step's program
        with jax.set_mesh(mesh):
            params = shard(params)
            state = jax.jit(tx.init)(params)
            step = jit(lambda p, s, g: _apply(tx, p, s, g, extra))
            for g in grads_seq:
                params, state = step(params, state, shard(g))
        _assert_state_keeps_shardings(params, state)
        return params, state
    raise ValueError(f"unknown device path {path!r}, expected one of {DEVICE_PATHS}")


def _assert_state_keeps_shardings(params, state):
    """Every state leaf shaped like a param leaf carries that param's sharding."""
    by_shape = {}
    for x in jax.tree.leaves(params):
        by_shape.setdefault((x.shape, x.dtype.itemsize), x.sharding)
    for x in jax.tree.leaves(state):
        if getattr(x, "ndim", 0) and (x.shape, x.dtype.itemsize) in by_shape:
            want = by_shape[(x.shape, x.dtype.itemsize)]
            assert x.sharding.is_equivalent_to(want, x.ndim), (
                f"state leaf {x.shape} lost the params' sharding: {x.sharding} vs {want}"
            )


def assert_same_on_all_paths(
    tx, params, grads_seq, *, rtol=1e-5, atol=1e-6, extra_args=None, split="noise",
    compile_once=False,
):  # fmt: skip
    """Runs every device path and checks params and state agree with plain ``jit``
    (with ``compile_once``, each path's step must compile once)."""
    ref_p, ref_s = run_path(tx, params, grads_seq, "jit", extra_args, split, compile_once)
    for path in ("eager", "pmap", "sharded", "explicit"):
        p, s = run_path(tx, params, grads_seq, path, extra_args, split, compile_once)
        assert_trees_close(p, ref_p, rtol=rtol, atol=atol, err=f"params on {path}")
        assert_trees_close(
            jax.tree.map(np.asarray, s),
            jax.tree.map(np.asarray, ref_s),
            rtol=rtol,
            atol=atol,
            err=f"state on {path}",
        )


def traced_once(fn):
    """``fn`` that raises ``AssertionError`` when traced a second time
    (``chex.assert_max_traces``, counted afresh for this ``fn``)."""
    chex.clear_trace_counter()  # chex counts by call site: a fresh count for this ``fn``
    return chex.assert_max_traces(fn, n=1)


def jit_once(fn, **jit_kwargs):
    """``jax.jit(fn)`` that raises ``AssertionError`` when ``fn`` is traced a second time:
    a step that must not recompile on later calls."""
    return jax.jit(traced_once(fn), **jit_kwargs)


def assert_no_recompile(tx, params, grads_seq, extra_args=None):
    """The jitted update compiles once: the second and later steps reuse it."""
    extra = dict(extra_args or {})
    step = jit_once(lambda p, s, g: _apply(tx, p, s, g, extra))
    state = tx.init(params)
    for g in grads_seq:
        params, state = step(params, state, g)


def abstract_init_matches(tx, params):
    """``init`` on ``jax.ShapeDtypeStruct`` leaves gives the same shapes/dtypes as on arrays."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    a = jax.eval_shape(tx.init, abstract)
    c = tx.init(params)
    sd = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
    assert jax.tree.structure(a) == jax.tree.structure(c)
    assert sd(a) == sd(c)
    return a


# ------------------------------------------------- inner optimizers for wrappers


def wrapper_inners():
    """The optimizers every wrapper is tested with: AdamW, SGD with momentum and Tiger."""
    import pytest

    from optax_ext.optimizers.tiger import tiger

    return [
        pytest.param(lambda: optax.adamw(1e-2, weight_decay=1e-2), id="adamw"),
        pytest.param(lambda: optax.sgd(1e-1, momentum=0.9), id="sgdm"),
        pytest.param(lambda: tiger(1e-2), id="tiger"),
    ]

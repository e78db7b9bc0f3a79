"""Amos against a float64 NumPy implementation of the reference (jestimator) update."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    abstract_init_matches,
    assert_trees_close,
    flax_like_params,
    jit_once,
    random_grads_like,
    random_tree,
    to_f64,
    x64,
)

import optax_ext._xla_cpu as xla_cpu
from optax_ext._common import tree_paths
from optax_ext.optimizers.amos import (
    amos,
    amos_default_eta,
    amos_default_shape,
    scale_by_amos,
)

# ------------------------------------------------------------ float64 reference


def expected_eta(path, shape):
    """The documented defaults, written out by leaf name."""
    name = path.split("/")[-1]
    if len(shape) <= 1:
        return 0.5
    if name == "embedding":
        return 1 / math.sqrt(shape[-1])
    return 1 / math.sqrt(np.prod(shape[:-1]))


def expected_shape(path, shape):
    name = path.split("/")[-1]
    if len(shape) <= 1:
        return ()
    if name == "embedding":
        return (shape[0],) + (1,) * (len(shape) - 1)
    return (1,) * (len(shape) - 1) + (shape[-1],)


def reference_amos(
    params,
    grads_seq,
    *,
    lr,
    eta_fn,
    shape_fn,
    beta,
    c=0.25,
    d=0.25,
    extra_l2=0.0,
    eps=2.0**-125,
    momentum=None,
    clip=None,
):
    """jestimator's ``scale_by_amos`` (+ optional clip before and EMA after) in float64.

    ``lr`` is a function of the 0-based step t (Amos's ξ = lr(t), arXiv 2210.11693).
    """
    paths = jax.tree.leaves(tree_paths(params))
    theta, treedef = jax.tree.flatten(to_f64(params))
    red = [tuple(shape_fn(p, x.shape)) for p, x in zip(paths, theta, strict=True)]
    v = [np.zeros(s) for s in red]
    b = [np.zeros(s) for s in red]
    mu = [np.zeros_like(x) for x in theta]
    for t, grads in enumerate(grads_seq):
        xi = lr(t)
        for i, g in enumerate(jax.tree.leaves(to_f64(grads))):
            if clip is not None:
                g = np.clip(g, -clip, clip)
            if red[i]:
                axes = tuple(k for k, n in enumerate(g.shape) if red[i][k] < n)
                g2 = np.mean(g**2, axis=axes, keepdims=True)
            else:
                g2 = np.mean(g**2)
            v[i] = beta * v[i] + (1 - beta) * g2
            rv = (1 - beta ** (t + 1)) / np.maximum(v[i], eps)
            gamma = xi**2 * rv * g2 / np.sqrt(1 + c * np.sqrt(xi) * b[i])
            lr0 = xi * eta_fn(paths[i], theta[i].shape)
            delta = (-lr0 * np.sqrt(rv) * g - (0.5 * gamma + extra_l2) * theta[i]) / (
                1 + d * np.sqrt(lr0) * b[i]
            )
            b[i] = b[i] + gamma * (1 + b[i])
            if momentum is not None:
                mu[i] = momentum * mu[i] + (1 - momentum) * delta
                delta = mu[i]
            theta[i] = theta[i] + delta
    unflat = lambda leaves: jax.tree.unflatten(treedef, leaves)
    return unflat(theta), unflat(v), unflat(b)


def _step(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def _small_params(seed=0, dtype=jnp.float32):
    return flax_like_params(seed, vocab=7, width=8, heads=2, layers=1, dtype=dtype)


def _tiny_params(seed=0):
    """Four Flax-named leaves whose first axes split over 8 devices (cheap to compile)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "embed": {"embedding": n(8, 4)},
        "dense": {"kernel": 0.3 * n(16, 8), "bias": n(8)},
        "LayerNorm_0": {"scale": 1 + n(8)},
    }


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.9),
        dict(beta=0.95, momentum=0.8, clip=1.5, extra_l2=1e-3, c=0.5, d=0.1),
    ],
    ids=["plain", "momentum-clip-l2"],
)
def test_matches_reference_float64(kwargs):
    lr = lambda t: 0.2 / (1 + 0.05 * t)
    with x64():
        trees = [_small_params(0, jnp.float64), random_tree(3, dtype=jnp.float64)]
        for seed, params in enumerate(trees):
            grads = [random_grads_like(params, 10 * seed + s) for s in range(22)]
            ours = dict(kwargs)
            clip = ours.pop("clip", None)
            tx = scale_by_amos(
                lambda t: 0.2 / (1 + 0.05 * jnp.asarray(t, float)), clip_value=clip, **ours
            )
            got, state = _run(tx, params, grads)
            want, v, b = reference_amos(
                params, grads, lr=lr, eta_fn=expected_eta, shape_fn=expected_shape, **kwargs
            )
            assert_trees_close(got, want, rtol=1e-10, atol=1e-12, err=f"params, tree {seed}")
            assert_trees_close(state.v, v, rtol=1e-10, atol=1e-14, err=f"v, tree {seed}")
            assert_trees_close(state.b, b, rtol=1e-10, atol=1e-14, err=f"b, tree {seed}")
            # the decay accumulator really moved, so its damping was exercised
            assert max(float(np.max(x)) for x in jax.tree.leaves(b)) > 0.5


def test_matches_reference_float64_with_statistics_in_slabs(monkeypatch):
    """The per-unit statistics' CPU slab path (optax_ext._xla_cpu, taken at real sizes
    for kernels of >= 4096 outputs) forced on the small trees: the same float64 numbers."""
    monkeypatch.setattr(xla_cpu, "_MIN_TRAILING", 1)
    monkeypatch.setattr(xla_cpu, "_SLAB_ELEMENTS", 8)
    params = _small_params()
    tx = scale_by_amos(0.1)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert re.search(r"\b(scan|while)\[", jaxpr), "no slab loop traced: the case tests nothing"
    test_matches_reference_float64(dict(beta=0.9))


def test_user_eta_and_shape_functions_float64():
    eta = lambda path, shape: 0.1 if path.endswith("scale") else 0.02 * (1 + len(shape))
    full_or_scalar = lambda path, shape: shape if path.endswith("kernel") else ()
    with x64():
        params = _small_params(1, jnp.float64)
        grads = [random_grads_like(params, 70 + s) for s in range(20)]
        got, state = _run(amos(0.1, eta_fn=eta, shape_fn=full_or_scalar), params, grads)
        want, v, _ = reference_amos(
            params, grads, lr=lambda t: 0.1, eta_fn=eta, shape_fn=full_or_scalar, beta=0.999
        )
        assert_trees_close(got, want, rtol=1e-10, atol=1e-12)
        assert_trees_close(state.v, v, rtol=1e-10, atol=1e-14)


def test_default_eta_and_state_shapes():
    params = _small_params(0)
    state = amos(0.01, momentum=0.9).init(params)
    paths = tree_paths(params)
    shapes = jax.tree.map(jnp.shape, params)
    for name in ("v", "b"):
        got = jax.tree.map(jnp.shape, getattr(state, name))
        assert got == jax.tree.map(
            expected_shape, paths, shapes, is_leaf=lambda x: isinstance(x, tuple)
        )
    p = params["params"]
    assert state.v["params"]["embed"]["embedding"].shape == (7, 1)
    assert state.b["params"]["layer_0"]["attention"]["query"]["kernel"].shape == (1, 1, 4)
    assert state.v["params"]["layer_0"]["mlp"]["Dense_0"]["kernel"].shape == (1, 16)
    assert state.v["params"]["final_norm"]["scale"].shape == ()
    assert jax.tree.map(jnp.shape, state.mu) == shapes
    assert {x.dtype for x in jax.tree.leaves((state.v, state.b))} == {jnp.dtype(jnp.float32)}
    assert amos_default_eta("params/embed/embedding", p["embed"]["embedding"].shape) == 8**-0.5
    assert amos_default_eta("params/head/kernel", (8, 7)) == 8**-0.5
    assert amos_default_eta("a/b/kernel", (3, 3, 4, 16)) == 36**-0.5
    assert amos_default_eta("params/head/bias", (7,)) == 0.5
    assert amos_default_eta("temperature", ()) == 0.5
    assert amos_default_shape("params/head/bias", (7,)) == ()
    assert amos(0.01).init(params).mu is None


def test_first_step_and_schedule_at_t():
    # ξ = lr(t) with t the 0-based count: a schedule that is 0 at t = 0 gives a zero step
    with x64():
        params = {"w": jnp.ones((3, 2), float), "bias": jnp.ones(2, float)}
        grads = {"w": jnp.full((3, 2), 2.0, float), "bias": jnp.ones(2, float)}
        tx = scale_by_amos(lambda t: jnp.where(t == 0, 0.0, 0.1))
        state = tx.init(params)
        u, state = tx.update(grads, state, params)
        assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
        # constant g: v = (1-β^τ)·g² exactly, so rv = 1/g², γ = ξ² (b = 0) and
        # Δθ = -ξη·sign(g) - ξ²/2·θ, with η = 1/sqrt(fan_in = 3) for the kernel
        u, state = tx.update(grads, state, params)
        np.testing.assert_allclose(u["w"], -(0.1 / math.sqrt(3) + 0.5 * 0.01), rtol=1e-12)
        np.testing.assert_allclose(u["bias"], -(0.1 * 0.5 + 0.5 * 0.01), rtol=1e-12)
        np.testing.assert_allclose(state.b["w"], 0.01, rtol=1e-12)


def test_eta_fn_rejects_bad_values_naming_the_path():
    params = {"dense": {"kernel": jnp.ones((2, 3))}, "head": {"bias": jnp.ones(3)}}
    for bad in (-0.1, float("nan"), float("inf"), "big"):
        tx = amos(0.1, eta_fn=lambda p, s, bad=bad: bad if p == "head/bias" else 0.5)
        with pytest.raises(ValueError, match=r"eta_fn returned .* for 'head/bias'"):
            tx.init(params)
    tx = amos(0.1, shape_fn=lambda p, s: (2,))
    with pytest.raises(ValueError, match=r"shape_fn returned \(2,\) for 'dense/kernel'"):
        tx.init(params)
    with pytest.raises(ValueError, match="amos needs the params"):
        amos(0.1).update(params, amos(0.1).init(params))
    with pytest.raises(TypeError, match="eta_fn must be a function"):
        amos(0.1, eta_fn=0.5)


# --------------------------------------------------------------------- plumbing


def test_inject_hyperparams():
    params = _tiny_params(2)
    grads = [random_grads_like(params, 20 + s) for s in range(4)]
    hp = dict(learning_rate=0.1, beta=0.95, momentum=0.5, c=0.3, d=0.2, extra_l2=1e-3)
    injected = optax.inject_hyperparams(amos)(**hp)
    got, state = _run(injected, params, grads)
    want, _ = _run(amos(**hp), params, grads)
    assert_trees_close(got, want, rtol=2e-6, atol=1e-7)
    assert set(hp) <= set(state.hyperparams)
    step = jit_once(lambda p, s, g: _step(injected, p, s, g))
    outs = []
    for lr, beta in ((0.1, 0.95), (0.05, 0.95), (0.1, 0.5)):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        state.hyperparams["beta"] = jnp.asarray(beta)
        outs.append(step(got, state, grads[0])[0])
    leaf = lambda t: np.asarray(t["dense"]["kernel"])
    assert not np.allclose(leaf(outs[0]), leaf(outs[1]))
    assert not np.allclose(leaf(outs[0]), leaf(outs[2]))
    # with user functions: they are structure, not hyperparameters
    eta = lambda p, s: 0.3
    tx = optax.inject_hyperparams(amos, static_args=("eta_fn",))(0.1, eta_fn=eta)
    _run(tx, params, grads[:1])


def test_abstract_init_and_chain():
    params = _small_params(0)
    abstract_init_matches(amos(0.01, momentum=0.9, mu_dtype=jnp.bfloat16), params)
    # clipping in a chain before Amos equals the built-in clip
    grads = [random_grads_like(_tiny_params(0), s, scale=3.0) for s in range(3)]
    a, _ = _run(optax.chain(optax.clip(1.0), amos(0.1)), _tiny_params(0), grads)
    b, _ = _run(amos(0.1, clip_value=1.0), _tiny_params(0), grads)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    # under optax.masked the chosen leaves get exactly the unmasked Amos update
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
    masked = optax.masked(amos(0.1, momentum=0.9), {"dense": {"kernel": True, "bias": False}})
    u, _ = masked.update(params, masked.init(params), params)
    full, _ = amos(0.1, momentum=0.9).update(params, amos(0.1, momentum=0.9).init(params), params)
    np.testing.assert_array_equal(u["dense"]["kernel"], full["dense"]["kernel"])
    np.testing.assert_array_equal(u["dense"]["bias"], params["dense"]["bias"])


def test_bf16_params():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tiny_params(3))
    grads = [random_grads_like(params, 40 + s) for s in range(4)]
    tx = amos(0.1, momentum=0.9)
    p16, state = _run(tx, params, grads)
    p32, _ = _run(
        tx,
        jax.tree.map(lambda x: x.astype(jnp.float32), params),
        [jax.tree.map(lambda g: g.astype(jnp.float32), g) for g in grads],
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((p16, state.mu)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.v, state.b)))
    assert_trees_close(p16, p32, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-0.1), r"learning_rate must be in \[0, inf\)"),
        (dict(beta=1.0), r"beta must be in \[0, 1\)"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(clip_value=0.0), r"clip_value must be in \(0, inf\)"),
        (dict(c=-1.0), r"c must be in"),
        (dict(d=float("nan")), r"d must be in"),
        (dict(extra_l2=-1e-3), r"extra_l2 must be in"),
        (dict(eps=0.0), r"eps must be in \(0, inf\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    kwargs = {"learning_rate": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        amos(**kwargs)
    with pytest.raises(ValueError, match=match):
        scale_by_amos(**kwargs)

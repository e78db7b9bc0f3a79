"""sgdm: momentum that accumulates micro-batches, against float64 NumPy and optax.sgd."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_no_recompile,
    assert_trees_close,
    flax_like_params,
    random_grads_like,
    random_tree,
    to_f64,
    x64,
)

import optax_ext as ox
from optax_ext._common import tree_bytes
from optax_ext.optimizers.sgdm import scale_by_sgdm, sgdm

LR = lambda c: 0.1 / (1.0 + 0.5 * c)  # a schedule of the update index


def _apply(params, updates):
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


def _reference(params, micro_grads, k, beta, nesterov):
    """NumPy float64 SGD with momentum (optax's form) fed each cycle's mean gradient.

    Returns the params after every micro-step and the final momentum."""
    theta = to_f64(params)
    m = jax.tree.map(np.zeros_like, theta)
    history = []
    for t in range(len(micro_grads)):
        if (t + 1) % k == 0:
            cycle = [to_f64(g) for g in micro_grads[t + 1 - k : t + 1]]
            mean = jax.tree.map(lambda *xs: sum(xs) / k, *cycle)
            m = jax.tree.map(lambda m_, g: beta * m_ + g, m, mean)
            u = jax.tree.map(lambda m_, g: g + beta * m_, m, mean) if nesterov else m
            lr = LR(t // k)
            theta = jax.tree.map(lambda p, u_, lr=lr: p - lr * u_, theta, u)
        history.append(theta)
    return history, m


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_float64_reference(k, nesterov):
    beta = 0.8
    params = random_tree(k + 2 * nesterov)
    grads = [random_grads_like(params, 100 + s) for s in range(4 * k)]
    expected, m = _reference(params, grads, k, beta, nesterov)
    with x64():
        tx = sgdm(LR, beta, accumulation_steps=k, nesterov=nesterov)
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        state = tx.init(p)
        step = jax.jit(tx.update)
        for t, g in enumerate(grads):
            u, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), g), state, p)
            if (t + 1) % k:  # parameters do not move inside a cycle
                assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
            p = _apply(p, u)
            assert_trees_close(p, expected[t], rtol=1e-12, atol=1e-13, err=f"micro-step {t}")
        assert_trees_close(state[0].mu, m, rtol=1e-12, atol=1e-13, err="momentum")


@pytest.mark.parametrize("nesterov", [False, True])
def test_equals_optax_sgd_fed_mean_gradients_float32(nesterov):
    k, cycles = 4, 3
    params = flax_like_params(1, layers=1)
    grads = [random_grads_like(params, s) for s in range(k * cycles)]
    ours = sgdm(LR, 0.9, accumulation_steps=k, nesterov=nesterov)
    theirs = optax.sgd(LR, momentum=0.9, nesterov=nesterov)
    p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
    step1, step2 = jax.jit(ours.update), jax.jit(theirs.update)
    for c in range(cycles):
        for g in grads[c * k : (c + 1) * k]:
            u1, s1 = step1(g, s1, p1)
            p1 = _apply(p1, u1)
        mean = jax.tree.map(
            lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / k, *grads[c * k : (c + 1) * k]
        )
        u2, s2 = step2(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), mean), s2, p2)
        p2 = _apply(p2, u2)
        assert_trees_close(p1, p2, rtol=1e-5, atol=1e-6, err=f"cycle {c}")
        assert_trees_close(s1[0].mu, s2[0].trace, rtol=1e-5, atol=1e-6, err=f"cycle {c}")


@pytest.mark.parametrize("nesterov", [False, True])
def test_k1_is_exactly_optax_sgd(nesterov):
    params = random_tree(7)
    grads = [random_grads_like(params, s) for s in range(3)]
    ours, theirs = sgdm(0.05, 0.9, nesterov=nesterov), optax.sgd(0.05, 0.9, nesterov=nesterov)
    p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
    for g in grads:
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = _apply(p1, u1), _apply(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


@pytest.mark.parametrize("k", [1, 2, 8])
def test_state_is_one_buffer_whatever_k(k):
    params = flax_like_params(0)
    one = tree_bytes(params)
    assert tree_bytes(jax.eval_shape(sgdm(0.1, accumulation_steps=k).init, params)) == one
    nesterov = jax.eval_shape(sgdm(0.1, accumulation_steps=k, nesterov=True).init, params)
    assert tree_bytes(nesterov) == (one if k == 1 else 2 * one)
    multisteps = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), k).init(params)
    assert tree_bytes(multisteps) == 2 * one


def test_bf16_momentum_keeps_dtypes():
    params = random_tree(8)
    tx = sgdm(0.1, accumulation_steps=2, mu_dtype=jnp.bfloat16)
    state = tx.init(params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].mu))
    grads = [random_grads_like(params, s) for s in range(3)]
    assert_no_recompile(tx, params, grads)


def test_inject_hyperparams_matches_direct():
    k = 2
    params = random_tree(10)
    grads = [random_grads_like(params, s) for s in range(2 * k)]
    direct = sgdm(0.05, 0.7, accumulation_steps=k)
    # optax's wrapper would read schedules per micro-step: refused while accumulating,
    # with k static or injected; ox.inject_hyperparams reads them by update
    for static in (("accumulation_steps", "nesterov"), ("nesterov",)):
        with pytest.raises(ValueError, match=r"ox\.inject_hyperparams\(ox\.sgdm"):
            optax.inject_hyperparams(sgdm, static_args=static)(
                learning_rate=0.05, momentum=0.7, accumulation_steps=k
            ).init(params)
    static_k = ox.inject_hyperparams(sgdm, static_args=("accumulation_steps", "nesterov"))(
        learning_rate=0.05, momentum=0.7, accumulation_steps=k
    )
    # built with k = 1 (injected as an array), the cycle set through the update's argument
    traced_k = ox.inject_hyperparams(sgdm, static_args=("nesterov",))(
        learning_rate=0.05, momentum=0.7
    )
    results = []
    for tx in (direct, static_k, traced_k):
        p, s = params, tx.init(params)
        step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, set_accumulation_steps=k))
        for g in grads:
            u, s = step(g, s, p)
            p = _apply(p, u)
        results.append(p)
    assert_trees_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    assert_trees_close(results[2], results[0], rtol=1e-6, atol=1e-7)


def test_chain_and_masked():
    params = random_tree(12)
    mask = jax.tree.map(lambda x: x.ndim > 1, params)
    assert 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))
    tx = optax.chain(
        optax.masked(scale_by_sgdm(0.9, accumulation_steps=2), mask), optax.scale(-0.1)
    )
    state = tx.init(params)
    g = random_grads_like(params, 0)
    u1, state = tx.update(g, state, params)
    u2, _ = tx.update(g, state, params)
    for a, b, m, g_ in zip(*(jax.tree.leaves(t) for t in (u1, u2, mask, g)), strict=True):
        # masked-in leaves wait for the cycle's end; the others pass straight through
        np.testing.assert_allclose(np.asarray(a), 0 if m else -0.1 * np.asarray(g_), atol=1e-7)
        np.testing.assert_allclose(np.asarray(b), -0.1 * np.asarray(g_), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": -0.1}, "learning_rate must be"),
        ({"momentum": 1.0}, "momentum must be"),
        ({"momentum": -0.5}, "momentum must be"),
        ({"momentum": float("nan")}, "momentum must be"),
        ({"accumulation_steps": 0}, "accumulation_steps must be"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sgdm(**{"learning_rate": 0.1, **kwargs})


def test_non_integer_accumulation_steps():
    with pytest.raises(TypeError, match="accumulation_steps must be an int"):
        sgdm(0.1, accumulation_steps=2.5)


def test_state_rounding_is_validated():
    with pytest.raises(ValueError, match="state_rounding"):
        sgdm(0.1, state_rounding="down")

"""Lookahead with slow weights in the state (Zhang et al. 2019, kexue.fm/archives/6869)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState
from helpers import (
    assert_trees_close,
    leaf_paths,
    random_grads_like,
    random_tree,
    to_f64,
    wrapper_inners,
    x64,
)

from optax_ext.wrappers.lookahead import LookaheadState, lookahead

INNERS = wrapper_inners()


def run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def run_optax_lookahead(inner, params, grads_seq, k, alpha):
    tx = optax.lookahead(inner, sync_period=k, slow_step_size=alpha)
    lp = optax.LookaheadParams.init_synced(params)
    state = tx.init(lp)
    step = jax.jit(tx.update)
    for g in grads_seq:
        u, state = step(g, state, lp)
        lp = optax.apply_updates(lp, u)
    return lp


def ref_lookahead_sgdm(params, grads_seq, lr, beta, k, alpha):
    """Float64 Lookahead (Zhang et al. 2019, Alg. 1) around SGD with momentum m ← βm + g.
    Slow weights start as θ0; every k-th fast step φ ← φ + α(θ - φ), θ ← φ."""
    theta = dict(leaf_paths(to_f64(params)))
    slow = {p: x.copy() for p, x in theta.items()}
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    for t, grads in enumerate(grads_seq):
        for path, g in leaf_paths(to_f64(grads)):
            m[path] = beta * m[path] + g
            theta[path] = theta[path] - lr * m[path]
        if (t + 1) % k == 0:
            for path in theta:
                slow[path] = slow[path] + alpha * (theta[path] - slow[path])
                theta[path] = slow[path].copy()
    return theta, slow


def test_matches_float64_reference():
    with x64():
        params = random_tree(1, dtype=jnp.float64)
        grads = [random_grads_like(params, s) for s in range(11)]
        got, state = run(lookahead(optax.sgd(0.1, momentum=0.9), 3, 0.3), params, grads)
        ref_theta, ref_slow = ref_lookahead_sgdm(params, grads, 0.1, 0.9, 3, 0.3)
        for tree, ref in ((got, ref_theta), (state.slow, ref_slow)):
            for path, x in leaf_paths(tree):
                np.testing.assert_allclose(x, ref[path], rtol=1e-12, atol=1e-13, err_msg=path)


@pytest.mark.parametrize("inner", INNERS)
def test_equals_optax_lookahead_step_for_step(inner):
    params = random_tree(2)
    k, alpha = 3, 0.5
    ours_tx = lookahead(inner(), k, alpha)
    state = ours_tx.init(params)
    lp = optax.LookaheadParams.init_synced(params)
    theirs_tx = optax.lookahead(inner(), k, alpha)
    theirs_state = theirs_tx.init(lp)
    ours_step, theirs_step = jax.jit(ours_tx.update), jax.jit(theirs_tx.update)
    for t in range(3 * k + 1):  # three full sync periods and one more step
        g = random_grads_like(params, t)
        u, state = ours_step(g, state, params)
        params = optax.apply_updates(params, u)
        tu, theirs_state = theirs_step(g, theirs_state, lp)
        lp = optax.apply_updates(lp, tu)
        assert_trees_close(params, lp.fast, rtol=1e-6, atol=1e-7, err=f"fast, step {t}")
        assert_trees_close(state.slow, lp.slow, rtol=1e-6, atol=1e-7, err=f"slow, step {t}")
        assert_trees_close(state.inner_state, theirs_state.fast_state, rtol=1e-6, atol=1e-7)
    assert int(state.count) == 3 * k + 1


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def test_works_inside_flax_train_state():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (6, 4))
    y = jax.random.normal(jax.random.key(1), (6, 3))
    params = model.init(jax.random.key(2), x)
    loss = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=lookahead(optax.adamw(3e-2), 2, 0.5)
    )
    train_step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params)))
    k, alpha = 2, 0.5
    ref = optax.lookahead(optax.adamw(3e-2), k, alpha)
    lp = optax.LookaheadParams.init_synced(params)
    ref_state = ref.init(lp)

    @jax.jit
    def ref_step(lp, ref_state):
        u, ref_state = ref.update(jax.grad(loss)(lp.fast), ref_state, lp)
        return optax.apply_updates(lp, u), ref_state

    for _ in range(5):
        state = train_step(state)
        lp, ref_state = ref_step(lp, ref_state)
    assert int(state.step) == 5
    assert_trees_close(state.params, lp.fast, rtol=1e-5, atol=1e-6)
    assert_trees_close(state.opt_state.slow, lp.slow, rtol=1e-5, atol=1e-6)
    assert float(loss(state.params)) < float(loss(params))


def test_slow_weights_start_as_a_copy_of_the_params():
    """bert4keras zero-initialises them; the first sync would then halve the params."""
    params = {"w": jnp.array([2.0, -4.0])}
    tx = lookahead(optax.sgd(0.0), sync_period=1, slow_step_size=0.5)
    state = tx.init(params)
    np.testing.assert_array_equal(state.slow["w"], params["w"])
    assert state.slow["w"] is not params["w"]
    u, state = tx.update({"w": jnp.ones(2)}, state, params)
    np.testing.assert_array_equal(optax.apply_updates(params, u)["w"], params["w"])


def test_alpha_one_and_period_one_is_the_inner_optimizer():
    params = random_tree(3)
    grads = [random_grads_like(params, s) for s in range(3)]
    a, _ = run(lookahead(optax.adam(1e-2), 1, 1.0), params, grads)
    b, _ = run(optax.adam(1e-2), params, grads)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_is_a_lookahead_state():
    """(Device paths, abstract init and one compile: tests/test_device_paths.py.)"""
    state = jax.eval_shape(lookahead(optax.adamw(1e-2), 2).init, random_tree(4))
    assert isinstance(state, LookaheadState)


def test_inject_hyperparams_and_extra_args_forwarded():
    params = random_tree(5)
    grads = [random_grads_like(params, s) for s in range(4)]
    b, _ = run(lookahead(optax.sgd(0.1), 2, 0.25), params, grads)
    for static in ((), ("sync_period",)):
        inj = optax.inject_hyperparams(lookahead, static_args=static)(
            optax.sgd(0.1), sync_period=2, slow_step_size=0.25
        )
        a, state = run(inj, params, grads)
        assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
        assert float(state.hyperparams["slow_step_size"]) == 0.25

    def scale_by_factor():
        def update(u, s, params=None, *, factor):
            return jax.tree.map(lambda x: factor * x, u), s

        return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)

    tx = lookahead(scale_by_factor(), 3, 0.5)
    g = random_grads_like(params, 0)
    u, _ = tx.update(g, tx.init(params), params, factor=2.0)
    assert_trees_close(u, jax.tree.map(lambda x: 2.0 * x, g), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sync_period": 0}, ValueError, "sync_period must be an int >= 1, got 0"),
        ({"sync_period": 2.0}, TypeError, "sync_period must be an int, got 2.0"),
        ({"slow_step_size": 1.5}, ValueError, r"slow_step_size must be in \[0, 1\], got 1.5"),
        ({"slow_step_size": -0.1}, ValueError, r"slow_step_size must be in \[0, 1\]"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        lookahead(optax.sgd(0.1), **kwargs)


def test_needs_params():
    tx = lookahead(optax.sgd(0.1))
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))


def test_update_without_params_names_the_fix():
    tx = lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
    params = {"w": jnp.ones(3)}
    with pytest.raises(
        ValueError, match=r"lookahead needs the params .*tx.update\(grads, state, params\)"
    ):
        tx.update(params, tx.init(params))

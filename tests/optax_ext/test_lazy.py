"""Lazy row updates for embedding tables (bert4keras ``extend_with_lazy_optimization``,
kexue.fm/archives/7094)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    leaf_paths,
    sparse_grads,
    sparse_tree,
    to_f64,
    wrapper_inners,
    x64,
)

from optax_ext.wrappers.lazy import lazy, touched_rows

INNERS = wrapper_inners()

VOCAB = 12


class TokenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(num_embeddings=VOCAB, features=6)(tokens)
        return nn.Dense(1)(h.mean(axis=1))[:, 0]


# Each batch touches only some tokens; rows 0, 5, 8, 10, 11 are never touched.
BATCHES = [
    np.array([[1, 4, 7], [4, 4, 1]]),
    np.array([[2, 4, 2], [3, 3, 3]]),
    np.array([[9, 1, 6], [6, 9, 2]]),
    np.array([[7, 7, 7], [4, 3, 1]]),
]


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


@pytest.mark.parametrize("inner", INNERS)
def test_flax_embed_untouched_rows_frozen_touched_rows_and_state_match_inner(inner):
    model = TokenModel()
    params = model.init(jax.random.key(0), BATCHES[0])
    loss = lambda p, tokens: jnp.mean((model.apply(p, tokens) - 1.0) ** 2)
    plain, lazy_tx = inner(), lazy(inner())
    state = lazy_tx.init(params)
    plain_step, lazy_step = jax.jit(plain.update), jax.jit(lazy_tx.update)
    untouched_rows_would_move = False
    for t, tokens in enumerate(BATCHES):
        grads = jax.grad(loss)(params, tokens)
        u_plain, s_plain = plain_step(grads, state, params)
        u_lazy, state = lazy_step(grads, state, params)
        new = optax.apply_updates(params, u_lazy)
        # The inner state is exactly the non-lazy inner state.
        assert_trees_close(state, s_plain, rtol=0, atol=0, err=f"state, step {t}")
        touched = np.isin(np.arange(VOCAB), tokens)
        old_e = params["params"]["Embed_0"]["embedding"]
        new_e = new["params"]["Embed_0"]["embedding"]
        np.testing.assert_array_equal(bits(new_e[~touched]), bits(old_e[~touched]))
        np.testing.assert_array_equal(
            u_lazy["params"]["Embed_0"]["embedding"][touched],
            u_plain["params"]["Embed_0"]["embedding"][touched],
        )
        assert_trees_close(
            u_lazy["params"]["Dense_0"], u_plain["params"]["Dense_0"], rtol=0, atol=0
        )
        untouched_rows_would_move |= bool(
            np.any(u_plain["params"]["Embed_0"]["embedding"][~touched] != 0)
        )
        params = new
    assert untouched_rows_would_move  # the inner optimizer alone moves untouched rows


def ref_lazy_decayed_sgdm(params, grads_seq, lr, beta, wd, lazy_path):
    """Float64: m ← βm + (g + λθ); θ ← θ - lr·m, except that in lazy leaves the rows
    x[i, ...] whose gradient is all zero keep θ (m is still updated)."""
    theta = dict(leaf_paths(to_f64(params)))
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    for grads in grads_seq:
        for path, g in leaf_paths(to_f64(grads)):
            m[path] = beta * m[path] + g + wd * theta[path]
            step = np.array(lr * m[path])
            if lazy_path(path):
                for i in range(g.shape[0] if g.ndim else 1):
                    row = (i,) if g.ndim else ()
                    if not np.any(g[row] != 0):
                        step[row] = 0.0
            theta[path] = theta[path] - step
    return theta


@pytest.mark.parametrize("include", ["embedding", None], ids=["embedding", "all"])
def test_matches_float64_reference(include):
    with x64():
        params = sparse_tree(0, jnp.float64)
        grads = [sparse_grads(params, s) for s in range(6)]
        assert jax.tree.map(jnp.shape, grads[0]) == jax.tree.map(jnp.shape, params)
        tx = lazy(
            optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.05, momentum=0.9)),
            include=include,
        )
        state = tx.init(params)
        got = params
        for g in grads:
            u, state = tx.update(g, state, got)
            got = optax.apply_updates(got, u)
        lazy_path = (lambda p: "embedding" in p) if include else (lambda p: True)
        ref = ref_lazy_decayed_sgdm(params, grads, 0.05, 0.9, 0.1, lazy_path)
        for path, x in leaf_paths(got):
            np.testing.assert_allclose(x, ref[path], rtol=1e-12, atol=1e-13, err_msg=path)


def test_touched_rows_definition():
    g = jnp.zeros((3, 2, 2)).at[1, 1, 0].set(1.0)
    np.testing.assert_array_equal(touched_rows(g)[:, 0, 0], [False, True, False])
    assert touched_rows(g).shape == (3, 1, 1)
    assert bool(touched_rows(jnp.array(2.0))) and not bool(touched_rows(jnp.array(0.0)))


def test_untouched_negative_zero_rows_stay_bit_identical():
    params = {"embedding": jnp.array([[-0.0, 1.0], [2.0, 3.0]])}
    tx = lazy(optax.adamw(0.1, weight_decay=0.5))
    g = {"embedding": jnp.array([[0.0, 0.0], [1.0, 0.0]])}
    u, _ = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, u)
    np.testing.assert_array_equal(bits(new["embedding"][0]), bits(params["embedding"][0]))


def test_forwards_extra_args_and_composes_with_inject_hyperparams():
    def scale_by_factor():
        def update(u, s, params=None, *, factor):
            return jax.tree.map(lambda x: -factor * x, u), s

        return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)

    params = sparse_tree(2, jnp.float32)
    g = sparse_grads(params, 0)
    tx = lazy(scale_by_factor())
    u, _ = tx.update(g, tx.init(params), params, factor=3.0)
    assert_trees_close(u, jax.tree.map(lambda x: -3.0 * x, g), rtol=0, atol=0)

    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.1)
    u_plain, s_plain = inner.update(g, inner.init(params), params)
    u_lazy, s_lazy = lazy(inner).update(g, inner.init(params), params)
    assert_trees_close(s_lazy, s_plain, rtol=0, atol=0)
    assert_trees_close(u_lazy["dense"], u_plain["dense"], rtol=0, atol=0)
    rows = touched_rows(g["embed"]["embedding"])[:, 0]
    np.testing.assert_array_equal(
        u_lazy["embed"]["embedding"][rows], u_plain["embed"]["embedding"][rows]
    )
    assert np.all(u_lazy["embed"]["embedding"][~rows] == 0) and not np.all(rows)

"""AdaX / AdaXW against a float64 NumPy implementation of the paper's raw recursion."""

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

from optax_ext.optimizers.adax import adax, adax_nu_weight, adaxw, scale_by_adax

# ------------------------------------------------------------ float64 reference


def _no_decay(path):
    return path[-1] in ("bias", "scale")


def reference_adax(params, grads_seq, *, lr, b1, b2, eps, weight_decay=0.0):
    """The paper's raw form: v = (1+β2)v + β2 g², v̂ = v/((1+β2)^τ - 1); m not debiased.

    ``lr`` is a function of the 0-based step. Decay ``lr·λ·θ`` on every leaf whose
    last path key is not ``bias``/``scale``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(to_f64(params))
    paths = [tuple(getattr(k, "key", k) for k in p) for p, _ in flat]
    theta = [x for _, x in flat]
    m = [np.zeros_like(x) for x in theta]
    v = [np.zeros_like(x) for x in theta]
    for t, grads in enumerate(grads_seq):
        tau = t + 1
        g_leaves = jax.tree.leaves(to_f64(grads))
        for i, g in enumerate(g_leaves):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = (1 + b2) * v[i] + b2 * g**2
            v_hat = v[i] / ((1 + b2) ** tau - 1)
            u = m[i] / (np.sqrt(v_hat) + eps)
            wd = 0.0 if _no_decay(paths[i]) else weight_decay
            theta[i] = theta[i] - lr(t) * (u + wd * theta[i])
    return jax.tree.unflatten(treedef, theta)


def _run(tx, params, grads_seq):
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: _step(tx, p, s, g))
    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def _step(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s


def _small_params(seed=0, dtype=jnp.float32):
    return flax_like_params(seed, vocab=7, width=8, heads=2, layers=1, dtype=dtype)


def _tiny_params(seed=0):
    """Four Flax-named leaves whose first axes split over 8 devices (cheap to compile)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "embed": {"embedding": n(8, 4)},
        "dense": {"kernel": n(16, 8), "bias": n(8)},
        "LayerNorm_0": {"scale": 1 + n(8)},
    }


# ------------------------------------------------------------------ correctness


@pytest.mark.parametrize("b2", [1e-4, 0.05])
def test_matches_raw_paper_form_float64(b2):
    with x64():
        trees = [_small_params(0, jnp.float64), random_tree(5, dtype=jnp.float64)]
        for seed, params in enumerate(trees):
            grads = [random_grads_like(params, 100 * seed + s) for s in range(24)]
            lr = lambda t: 1e-2 * (1 + 0.1 * np.cos(t))
            neg_lr = lambda t: -1e-2 * (1 + 0.1 * jnp.cos(jnp.asarray(t, float)))
            tx = optax.chain(
                scale_by_adax(b1=0.8, b2=b2, eps=1e-6), optax.scale_by_schedule(neg_lr)
            )
            got, _ = _run(tx, params, grads)
            want = reference_adax(params, grads, lr=lr, b1=0.8, b2=b2, eps=1e-6)
            assert_trees_close(got, want, rtol=1e-10, atol=1e-12, err=f"tree {seed}")


def test_adaxw_matches_reference_with_default_mask_float64():
    with x64():
        params = _small_params(3, jnp.float64)
        grads = [random_grads_like(params, 50 + s) for s in range(20)]
        sched = lambda t: 3e-2 - 1e-3 * jnp.asarray(t, float)
        got, _ = _run(adaxw(sched, weight_decay=0.5), params, grads)
        want = reference_adax(
            params,
            grads,
            lr=lambda t: 3e-2 - 1e-3 * t,
            b1=0.9,
            b2=1e-4,
            eps=1e-6,
            weight_decay=0.5,
        )
        assert_trees_close(got, want, rtol=1e-10, atol=1e-12)


def test_first_step_weight_is_exactly_one():
    # τ = 1: β̂_1 = 0, so v̂ is exactly g² whatever the rounding of expm1(log1p(β2))
    for b2 in (1e-4, 3e-3, 0.1, 0.7, 1e-8):
        assert float(adax_nu_weight(jnp.zeros([], jnp.int32), b2)) == 1.0
    g = jnp.array([0.3, -1e-3, 7.0, 0.0])
    _, state = scale_by_adax(b2=1e-4).update(g, scale_by_adax(b2=1e-4).init(g))
    np.testing.assert_array_equal(np.asarray(state.nu), np.asarray(g) ** 2)


def _reference_normalised_step(m, v_hat, g, tau, *, b1, b2, eps):
    """One step of the normalised form in float64 (β̂ from expm1/log1p, as it should be)."""
    with np.errstate(over="ignore"):  # expm1 → inf, w → 0: the memory is saturated
        w = b2 / np.expm1(tau * np.log1p(b2))
    m = b1 * m + (1 - b1) * g
    v_hat = (1 - w) * v_hat + w * g**2
    return m / (np.sqrt(v_hat) + eps), m, v_hat


@pytest.mark.parametrize("b2", [1e-4, 1e-8])
def test_finite_and_correct_after_ten_million_steps(b2):
    rng = np.random.default_rng(0)
    shape = (4, 5)
    m0 = 0.1 * rng.standard_normal(shape)
    v0 = rng.uniform(0.5, 2.0, shape)
    start = 10_000_000 - 3  # τ runs 1e7-2 .. 1e7
    tx = scale_by_adax(b1=0.9, b2=b2, eps=1e-6)
    state = tx.init(jnp.zeros(shape))._replace(
        count=jnp.asarray(start, jnp.int32),
        mu=jnp.asarray(m0, jnp.float32),
        nu=jnp.asarray(v0, jnp.float32),
    )
    m, v = m0.copy(), v0.copy()
    update = jax.jit(tx.update)
    for i in range(3):
        g = rng.standard_normal(shape)
        u, state = update(jnp.asarray(g, jnp.float32), state)
        want_u, m, v = _reference_normalised_step(m, v, g, start + i + 1, b1=0.9, b2=b2, eps=1e-6)
        assert np.all(np.isfinite(np.asarray(u)))
        np.testing.assert_allclose(np.asarray(u), want_u, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(state.nu), v, rtol=2e-6)
    if b2 == 1e-8:  # the memory is still moving here: v̂ really changed
        assert np.max(np.abs(v - v0)) > 1e-8
    else:
        # the raw form cannot get here: (1+β2)^τ overflows float64, so v̂ = inf/inf
        with np.errstate(over="ignore", invalid="ignore"):
            norm = np.float64(1 + b2) ** (start + 1) - 1
            raw_v = (1 + b2) * (v0 * (np.float64(1 + b2) ** start - 1)) + b2 * g**2
            assert np.isinf(norm) and np.all(np.isnan(raw_v / norm))


def test_adaxw_decay_is_multiplied_by_lr():
    params = {
        "dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.ones(3)},
        "LayerNorm_0": {"scale": jnp.ones(3)},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    sched = lambda t: 0.1 * (t + 1.0)
    tx = adaxw(sched, weight_decay=0.25)
    state = tx.init(params)
    for t in range(3):
        u, state = tx.update(zeros, state, params)
        # zero gradients: the AdaX direction is 0, the step is -lr(t)·λ·θ on kernels only
        np.testing.assert_allclose(u["dense"]["kernel"], -sched(t) * 0.25 * 2.0, rtol=1e-6)
        assert not np.any(np.asarray(u["dense"]["bias"]))
        assert not np.any(np.asarray(u["LayerNorm_0"]["scale"]))
    all_leaves = adaxw(0.1, weight_decay=0.25, mask=lambda p: jax.tree.map(lambda _: True, p))
    u, _ = all_leaves.update(zeros, all_leaves.init(params), params)
    np.testing.assert_allclose(u["dense"]["bias"], -0.1 * 0.25, rtol=1e-6)


def test_adax_alias_is_direction_times_lr():
    params = random_tree(2)
    grads = [random_grads_like(params, s) for s in range(4)]
    got, _ = _run(adax(3e-3, b1=0.7), params, grads)
    want, _ = _run(optax.chain(scale_by_adax(b1=0.7), optax.scale(-3e-3)), params, grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------- plumbing


def test_inject_hyperparams_matches_constants():
    params = random_tree(4)
    grads = [random_grads_like(params, 20 + s) for s in range(4)]
    hp = dict(learning_rate=2e-2, b1=0.8, b2=3e-3, eps=1e-5, weight_decay=0.3)
    injected = optax.inject_hyperparams(adaxw)(**hp)
    got, state = _run(injected, params, grads)
    want, _ = _run(adaxw(**hp), params, grads)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert set(hp) <= set(state.hyperparams)
    # a changed injected value takes effect without recompiling
    state.hyperparams["b2"] = jnp.asarray(0.5)
    step = jit_once(lambda p, s, g: _step(injected, p, s, g))
    p1, _ = step(got, state, grads[0])
    state.hyperparams["b2"] = jnp.asarray(3e-3)
    p2, _ = step(got, state, grads[0])
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(p2)[0])


def test_chain_and_masked():
    params = _tiny_params(2)
    grads = [random_grads_like(params, 30 + s) for s in range(3)]
    only_kernels = jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(scale_by_adax(), only_kernels),
        optax.scale(-1e-2),
    )
    got, _ = _run(tx, params, grads)
    plain, _ = _run(
        optax.chain(optax.clip_by_global_norm(1.0), scale_by_adax(), optax.scale(-1e-2)),
        params,
        grads,
    )
    sgd, _ = _run(optax.chain(optax.clip_by_global_norm(1.0), optax.scale(-1e-2)), params, grads)
    pick = lambda t, keep: jax.tree.map(lambda x, k: x if k else jnp.zeros(()), t, keep)
    inverse = jax.tree.map(lambda k: not k, only_kernels)
    assert_trees_close(pick(got, only_kernels), pick(plain, only_kernels), rtol=1e-6)
    assert_trees_close(pick(got, inverse), pick(sgd, inverse), rtol=1e-6)


def test_abstract_init_and_state_dtypes():
    params = _small_params(0)
    state = abstract_init_matches(adaxw(1e-3, mu_dtype=jnp.bfloat16), params)
    mu, nu = state[0].mu, state[0].nu
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}


def test_bf16_params():
    params32 = random_tree(6)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    grads = [random_grads_like(params32, 40 + s) for s in range(5)]
    tx = adaxw(1e-2, weight_decay=0.1, mu_dtype=jnp.float32)
    p16, state = _run(
        tx, params16, [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in grads]
    )
    p32, _ = _run(tx, jax.tree.map(lambda x: x.astype(jnp.float32), params16), grads)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].mu))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[0].nu))
    assert_trees_close(p16, p32, rtol=2e-2, atol=2e-2)
    u, _ = tx.update(
        jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads[0]), tx.init(params16), params16
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(b1=-0.1), r"b1 must be in"),
        (dict(b2=0.0), r"b2 must be in \(0, inf\)"),
        (dict(b2=float("nan")), r"b2 must be in"),
        (dict(eps=-1e-8), r"eps must be in \[0, inf\)"),
        (dict(learning_rate=-1.0), r"learning_rate must be in"),
        (dict(weight_decay=-0.1), r"weight_decay must be in"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaxw(**kwargs)
    if "weight_decay" not in kwargs:
        with pytest.raises(ValueError, match=match):
            adax(**kwargs)


def test_bf16_moments_written_stochastically_are_unbiased():
    """mu_dtype = nu_dtype = bf16: each stored moment is one of the two bf16 neighbours of
    the float32 value, the cast's with "nearest", and unbiased with "stochastic"."""
    rng = np.random.default_rng(0)
    n = 50_000
    params = {"w": jnp.zeros(n)}
    g = {"w": jnp.asarray(rng.standard_normal(n), jnp.float32)}
    ref = scale_by_adax(b1=0.9, b2=1e-4)
    _, exact = jax.jit(ref.update)(g, ref.init(params))  # float32 moments
    for rounding in ("nearest", "stochastic"):
        tx = scale_by_adax(
            b1=0.9, b2=1e-4, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, state_rounding=rounding
        )
        _, state = jax.jit(tx.update)(g, tx.init(params))
        for field in ("mu", "nu"):
            stored = getattr(state, field)["w"]
            x = np.asarray(getattr(exact, field)["w"], np.float64)
            assert stored.dtype == jnp.bfloat16
            got = np.asarray(stored.astype(jnp.float32), np.float64)
            nearest = np.asarray(getattr(exact, field)["w"].astype(jnp.bfloat16), np.float64)
            if rounding == "nearest":
                np.testing.assert_array_equal(got, nearest)
                continue
            ulp = np.abs(x) * 2.0**-7  # at least the bf16 spacing around x
            assert np.all(np.abs(got - x) <= ulp + 1e-30), field
            assert np.mean(got != nearest) > 0.1, field  # some went the other way
            rel = (got - x) / np.abs(x)
            assert abs(rel.mean()) < 4 * rel.std() / np.sqrt(n), field  # unbiased
    with pytest.raises(ValueError, match="state_rounding"):
        adaxw(1e-3, state_rounding="up")

"""Lion against the google/automl rule in float64 NumPy, optax.lion, and every device path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    flax_like_params,
    leaf_paths,
    random_grads_like,
    random_tree,
    x64,
)

from optax_ext.optimizers.lion import lion, scale_by_lion, scale_by_param_scale
from optax_ext.wrappers.accumulation import accumulate_gradients

# ------------------------------------------------------------ float64 reference


def ref_scale(path, theta, min_rms):
    """Tiger's per-parameter scale (kexue.fm/archives/9512), written out here."""
    name = path.split("/")[-1]
    if name in ("bias", "scale"):
        return 0.5
    if name == "embedding":
        return np.maximum(np.sqrt(np.mean(theta**2, axis=-1, keepdims=True)), min_rms)
    return max(np.sqrt(np.mean(theta**2)), min_rms)


def ref_lion(params, grads_seq, *, lr, b1, b2, wd, decays, scaling=False, min_rms=1e-3):
    """google/automl Lion in float64 NumPy: c = b1·m + (1-b1)·g;
    θ -= lr(t)·s(θ)·(sign(c) + λθ); m = b2·m + (1-b2)·g. ``decays(path)`` → bool."""
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    for t, grads in enumerate(grads_seq):
        for p, g in leaf_paths(grads):
            g = np.asarray(g, np.float64)
            c = b1 * m[p] + (1 - b1) * g
            s = ref_scale(p, theta[p], min_rms) if scaling else 1.0
            lam = wd if decays(p) else 0.0
            theta[p] = theta[p] - lr(t) * s * (np.sign(c) + lam * theta[p])
            m[p] = b2 * m[p] + (1 - b2) * g
    return theta, m


def small_params(seed, dtype=jnp.float32):
    """One leaf per path rule: embedding, kernel, bias, norm scale (few leaves: fast tests)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return {
        "params": {
            "embed": {"embedding": n(16, 8)},
            "dense": {"kernel": n(8, 24), "bias": n(24)},
            "norm": {"scale": 1 + n(8)},
        }
    }


def not_norm_or_bias(path):
    return path.split("/")[-1] not in ("bias", "scale")


def run(tx, params, grads_seq):
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def schedule(t):
    return 1e-2 / (1.0 + 0.1 * t)


CASES = {
    # name: (lion kwargs, reference kwargs)
    "default_mask": (
        dict(b1=0.9, b2=0.99, weight_decay=0.3),
        dict(b1=0.9, b2=0.99, wd=0.3, decays=not_norm_or_bias),
    ),
    "tiger_scale_schedule": (
        dict(learning_rate=schedule, b1=0.95, b2=0.98, weight_decay=0.5, param_scaling="tiger"),
        dict(lr=schedule, b1=0.95, b2=0.98, wd=0.5, decays=not_norm_or_bias, scaling=True),
    ),
    "decay_all_no_floor": (
        dict(b1=0.8, b2=0.9, weight_decay=0.2, mask=True, param_scaling="tiger", min_rms=0.0),
        dict(b1=0.8, b2=0.9, wd=0.2, decays=lambda p: True, scaling=True, min_rms=0.0),
    ),
    "callable_mask": (
        dict(
            b1=0.9,
            b2=0.99,
            weight_decay=0.4,
            mask=lambda ps: jax.tree.map(lambda x: x.ndim == 2, ps),
        ),
        dict(b1=0.9, b2=0.99, wd=0.4, decays=None),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case):
    kwargs, ref_kwargs = CASES[case]
    with x64():
        i = sorted(CASES).index(case)
        # alternate Flax-shaped and random trees (one compilation per case)
        params = f64(flax_like_params(i, layers=1) if i % 2 else random_tree(i, max_leaves=6))
        grads = [f64(random_grads_like(params, 100 * i + t)) for t in range(22)]
        lr = kwargs.get("learning_rate", 1e-2)
        tx = lion(**{"learning_rate": lr, **kwargs})
        ref = dict(ref_kwargs)
        ref.setdefault("lr", lambda t: 1e-2)
        if ref["decays"] is None:  # the callable mask: decay exactly the 2-D leaves
            ndim = {p: np.ndim(x) for p, x in leaf_paths(params)}
            ref["decays"] = lambda p: ndim[p] == 2
        want_theta, want_m = ref_lion(params, grads, **ref)
        got, state = run(tx, params, grads)
        for p, x in leaf_paths(got):
            np.testing.assert_allclose(x, want_theta[p], rtol=1e-12, atol=1e-13, err_msg=p)
        for p, x in leaf_paths(state[0].mu):
            np.testing.assert_allclose(x, want_m[p], rtol=1e-12, atol=1e-14, err_msg=p)


def test_custom_scale_rules():
    params = {"enc": {"kernel": jnp.full((2, 3), 4.0), "bias": jnp.ones(3)}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = lion(1e-2, weight_decay=0.0, param_scaling={r"enc/kernel$": 2.0, r"bias$": "rms"})
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["enc"]["kernel"], -2e-2, rtol=1e-6)
    np.testing.assert_allclose(u["enc"]["bias"], -1e-2, rtol=1e-6)
    with pytest.raises(ValueError, match="param_scaling rule"):
        lion(param_scaling={"kernel": "max"})


def test_zero_kernel_moves_only_with_a_floor():
    params = {"dense": {"kernel": jnp.zeros((3, 4))}}
    grads = {"dense": {"kernel": jnp.ones((3, 4))}}
    for min_rms, moved in [(0.0, 0.0), (1e-3, 1e-2 * 1e-3)]:
        tx = lion(1e-2, param_scaling="tiger", min_rms=min_rms)
        u, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(u["dense"]["kernel"], -moved, rtol=1e-6)


# ----------------------------------------------------------------- vs optax


def test_scale_by_lion_equals_optax_exactly_in_float64():
    with x64():
        params = f64(flax_like_params(3, layers=1))
        ours, theirs = scale_by_lion(0.9, 0.99), optax.scale_by_lion(0.9, 0.99)
        s_ours, s_theirs = ours.init(params), theirs.init(params)
        step_ours, step_theirs = jax.jit(ours.update), jax.jit(theirs.update)
        for t in range(20):
            g = f64(random_grads_like(params, t))
            u_ours, s_ours = step_ours(g, s_ours)
            u_theirs, s_theirs = step_theirs(g, s_theirs)
            for (p, a), (_, b) in zip(leaf_paths(u_ours), leaf_paths(u_theirs), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"step {t} {p}")
        assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
        # the same EMA; only the compiler's use of fused multiply-adds may differ
        assert_trees_close(s_ours.mu, s_theirs.mu, rtol=1e-14, atol=1e-16)
        assert int(s_ours.count) == int(s_theirs.count) == 20


def test_equals_optax_lion_in_float32_up_to_rounding_level_signs():
    """With the extras off: same update as optax.lion, except where |c| is at rounding level."""
    b1, b2, wd, lr = 0.9, 0.99, 0.1, 1e-2
    params = flax_like_params(4, layers=1)
    ours, theirs = (
        lion(lr, b1, b2, weight_decay=wd, mask=True),
        optax.lion(lr, b1, b2, weight_decay=wd),
    )
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    step_ours, step_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    flips = total = 0
    for t in range(20):
        g = random_grads_like(params, 50 + t)
        m = s_theirs[0].mu
        u_ours, s_ours = step_ours(g, s_ours, params)
        u_theirs, s_theirs = step_theirs(g, s_theirs, params)
        for a, b, gg, mm in zip(*map(jax.tree.leaves, (u_ours, u_theirs, g, m)), strict=True):
            a, b, gg, mm = (np.asarray(x, np.float64) for x in (a, b, gg, mm))
            differ = a != b
            c = b1 * mm + (1 - b1) * gg
            size = np.abs(b1 * mm) + np.abs((1 - b1) * gg)
            assert np.all(np.abs(c[differ]) <= 1e-6 * size[differ]), "sign differs beyond rounding"
            flips += int(differ.sum())
            total += a.size
        params = optax.apply_updates(params, u_theirs)
    assert flips <= total * 1e-3
    assert_trees_close(s_ours[0].mu, s_theirs[0].mu, rtol=1e-6, atol=1e-7)


# ------------------------------------------- both forms of the leaf, directly


@pytest.mark.parametrize("b1, b2", [(0.9, 0.99), (0.95, 0.98), (0.0, 0.5), (0.99, 0.5)])
def test_both_leaf_forms_equal_float64(b1, b2):
    """The textbook leaf and the CPU one-pass form, each called directly, in float64."""
    from optax_ext import _xla_cpu
    from optax_ext.optimizers.lion import lion_leaf

    rng = np.random.default_rng(11)
    g, m = rng.standard_normal((2, 64, 8))
    want_u = np.sign(b1 * m + (1 - b1) * g)
    want_m = b2 * m + (1 - b2) * g
    assert _xla_cpu.lion_one_pass_applies(b1, b2)
    with x64():
        for form in (lion_leaf, _xla_cpu.lion_one_pass):
            u, new_m = jax.jit(form, static_argnums=(2, 3))(jnp.asarray(g), jnp.asarray(m), b1, b2)
            np.testing.assert_array_equal(u, want_u, err_msg=form.__name__)
            np.testing.assert_allclose(new_m, want_m, rtol=1e-14, err_msg=form.__name__)
    assert not _xla_cpu.lion_one_pass_applies(0.9, 0.4)
    assert not _xla_cpu.lion_one_pass_applies(1.0, 0.99)


# ------------------------------------------------------------- dtypes, state


def test_bf16_params_work_in_f32_and_store_bf16():
    b1, b2, lr, wd = 0.9, 0.99, 1e-2, 0.1
    params = small_params(5, dtype=jnp.bfloat16)
    tx = lion(lr, b1, b2, weight_decay=wd, mask=True)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(5):
        g = random_grads_like(params, 70 + t)
        m_old = state[0].mu
        u, state = step(g, state, params)
        for uu, mm, gg, pp, m_new in zip(
            *map(jax.tree.leaves, (u, m_old, g, params, state[0].mu)), strict=True
        ):
            assert uu.dtype == mm.dtype == m_new.dtype == jnp.bfloat16
            gg, mm, pp = (np.asarray(x, np.float64) for x in (gg, mm, pp))
            c = b1 * mm + (1 - b1) * gg
            want_u = -lr * (np.sign(c) + wd * pp)
            np.testing.assert_allclose(np.asarray(uu, np.float64), want_u, rtol=1e-2, atol=1e-6)
            want_m = np.asarray(jnp.asarray(b2 * mm + (1 - b2) * gg, jnp.bfloat16), np.float64)
            np.testing.assert_allclose(np.asarray(m_new, np.float64), want_m, rtol=1e-2, atol=0)
        params = optax.apply_updates(params, u)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "param_dtype,mu_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)]
)
def test_mu_dtype(param_dtype, mu_dtype):
    params = small_params(6, dtype=param_dtype)
    tx = lion(1e-2, mu_dtype=mu_dtype, param_scaling="tiger")
    state = tx.init(params)
    u, state = jax.jit(tx.update)(random_grads_like(params, 0), state, params)
    assert {x.dtype for x in jax.tree.leaves(state[0].mu)} == {jnp.dtype(mu_dtype)}
    assert {x.dtype for x in jax.tree.leaves(u)} == {jnp.dtype(param_dtype)}


def test_static_b2_zero_uses_the_textbook_form():
    """A concrete b2 = 0 keeps the last gradient as momentum (textbook form)."""
    params = {"w": jnp.zeros(4)}
    tx = scale_by_lion(b1=0.5, b2=0.0)
    s = tx.init(params)
    _, s = tx.update({"w": jnp.array([1.0, -1.0, 2.0, 0.0])}, s)
    u, s = tx.update({"w": jnp.array([-3.0, 3.0, -1.0, 1.0])}, s)
    np.testing.assert_array_equal(u["w"], [-1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(s.mu["w"], [-3.0, 3.0, -1.0, 1.0])


# --------------------------------------------------------------- optax glue


def test_inject_hyperparams():
    params = small_params(9)
    grads = [random_grads_like(params, 300 + t) for t in range(6)]
    hp = dict(learning_rate=1e-2, b1=0.9, b2=0.99, weight_decay=0.3, min_rms=1e-3)
    tx = optax.inject_hyperparams(lion)(**hp, param_scaling="tiger")
    state = tx.init(params)
    assert set(hp) <= set(state.hyperparams)
    want, _ = run(lion(**hp, param_scaling="tiger"), params, grads)
    step = jax.jit(tx.update)
    p = params
    for g in grads:
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
    assert_trees_close(p, want, rtol=1e-6, atol=1e-6)
    # the injected values drive the update: other b1, b2, decay give the reference of those
    state.hyperparams.update(
        learning_rate=jnp.asarray(2e-2),
        b1=jnp.asarray(0.5),
        b2=jnp.asarray(0.7),
        weight_decay=jnp.asarray(0.0),
    )
    u, _ = step(grads[0], state, p)
    m = state.inner_state[0].mu
    for path, uu in leaf_paths(u):
        gg = dict(leaf_paths(grads[0]))[path]
        mm = dict(leaf_paths(m))[path]
        s = ref_scale(path, np.asarray(dict(leaf_paths(p))[path], np.float64), 1e-3)
        want_u = -2e-2 * s * np.sign(0.5 * np.asarray(mm) + 0.5 * np.asarray(gg))
        np.testing.assert_allclose(uu, want_u, rtol=1e-5, err_msg=path)


def test_masked_and_chained():
    params = small_params(10)
    grads = [random_grads_like(params, 400 + t) for t in range(3)]
    only_dense = lambda ps: jax.tree_util.tree_map_with_path(
        lambda path, _: "dense" in jax.tree_util.keystr(path), ps
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(lion(1e-2, weight_decay=0.2, param_scaling="tiger"), only_dense),
    )
    sub = {"params": {"dense": params["params"]["dense"]}}
    ref_tx = lion(1e-2, weight_decay=0.2, param_scaling="tiger")
    s, s_ref = tx.init(params), ref_tx.init(sub)
    step, ref_step = jax.jit(tx.update), jax.jit(ref_tx.update)
    clip = jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])
    for g in grads:
        clipped = clip(g)
        u, s = step(g, s, params)
        u_ref, s_ref = ref_step({"params": {"dense": clipped["params"]["dense"]}}, s_ref, sub)
        assert_trees_close(u["params"]["dense"], u_ref["params"]["dense"], rtol=1e-6)
        assert_trees_close(u["params"]["embed"], clipped["params"]["embed"], rtol=1e-6)
        params = optax.apply_updates(params, u)
        sub = {"params": {"dense": params["params"]["dense"]}}


def test_scale_by_param_scale_needs_params():
    tx = scale_by_param_scale("tiger")
    with pytest.raises(ValueError, match="needs the params"):
        tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(b1=-0.1), r"b1 must be in \[0, 1\], got -0.1"),
        (dict(b1=1.1), r"b1 must be in \[0, 1\], got 1.1"),
        (dict(b2=1.5), r"b2 must be in \[0, 1\], got 1.5"),
        (dict(b2=-0.5), r"b2 must be in \[0, 1\], got -0.5"),
        (dict(learning_rate=-1e-3), r"learning_rate must be in \[0, inf\), got -0.001"),
        (dict(weight_decay=-0.1), r"weight_decay must be in \[0, inf\), got -0.1"),
        (dict(min_rms=-1.0), r"min_rms must be in \[0, inf\), got -1.0"),
        (dict(b1=float("nan")), r"b1 must be in"),
        (dict(param_scaling="adam"), r"param_scaling must be one of \['tiger'\], got 'adam'"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lion(**kwargs)


# ------------------------------------------------ bf16 momentum, stochastic rounding


def test_state_rounding_is_validated_and_reproducible():
    with pytest.raises(ValueError, match="state_rounding"):
        lion(1e-3, state_rounding="up")
    with pytest.raises(ValueError, match="rounding_seed"):
        scale_by_lion(rounding_seed=-1)
    params = {"w": jnp.zeros(1000)}
    g = {"w": jnp.linspace(-1.0, 1.0, 1000)}

    def mu(seed):
        tx = lion(1e-3, mu_dtype=jnp.bfloat16, state_rounding="stochastic", rounding_seed=seed)
        return jax.jit(tx.update)(g, tx.init(params), params)[1][0].mu["w"]

    np.testing.assert_array_equal(mu(3), mu(3))
    assert np.any(np.asarray(mu(3)) != np.asarray(mu(4)))


def test_a_cycle_length_is_refused_rather_than_ignored():
    """Lion updates on every call: set_accumulation_steps (which optax.chain hands to
    every member) raises naming the argument and the wrapper that takes it."""
    params = small_params(11)
    grads = random_grads_like(params, 400)
    tx = lion(1e-2)
    with pytest.raises(
        ValueError, match=r"set_accumulation_steps was passed to ox\.lion.*accumulate_gradients"
    ):
        tx.update(grads, tx.init(params), params, set_accumulation_steps=4)
    # the wrapper that accumulates takes it and does not hand it on
    wrapped = accumulate_gradients(lion(1e-2), 2)
    state = wrapped.init(params)
    moved = []
    for _ in range(4):
        u, state = wrapped.update(grads, state, params, set_accumulation_steps=4)
        moved.append(any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u)))
    assert moved == [False, False, False, True]

"""Layer adaptation = trust ratio between weight decay and the learning rate (bert4keras
``extend_with_layer_adaptation``, kexue.fm/archives/7094)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    leaf_paths,
    random_grads_like,
    random_tree,
    to_f64,
    x64,
)

from optax_ext._common import NORM_AND_BIAS, path_mask
from optax_ext.optimizers.tiger import scale_by_tiger
from optax_ext.wrappers.layer_adaptation import layer_adapted

# Directions of the three reference optimizers: AdamW's, SGD-momentum's and Tiger's.
DIRECTIONS = [
    pytest.param(lambda: optax.scale_by_adam(eps=1e-6), id="adam"),
    pytest.param(lambda: optax.trace(decay=0.9), id="sgdm"),
    pytest.param(lambda: scale_by_tiger(0.9), id="tiger"),
]

NO_DECAY = ("bias", "scale")  # the reference's own spelling of the default mask


def small_tree(seed, dtype=jnp.float32):
    """Flax-named leaves, one of them all zero (as Flax initialises biases)."""
    rng = np.random.default_rng(seed)
    tree = {
        "embed": {"embedding": rng.standard_normal((6, 4))},
        "dense": {"kernel": rng.standard_normal((4, 3)) / 2, "bias": np.zeros(3)},
        "norm": {"scale": 1 + 0.1 * rng.standard_normal(3), "bias": rng.standard_normal(3)},
    }
    return {"params": jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)}


def run_both(a, b, params, grads_seq):
    sa, sb = a.init(params), b.init(params)
    step_a, step_b = jax.jit(a.update), jax.jit(b.update)
    for t, g in enumerate(grads_seq):
        ua, sa = step_a(g, sa, params)
        ub, sb = step_b(g, sb, params)
        assert_trees_close(ua, ub, rtol=0, atol=0, err=f"updates, step {t}")
        params = optax.apply_updates(params, ua)
    return params


@pytest.mark.parametrize(
    "weight_decay, mask",
    [(0.0, True), (0.1, True), (0.1, path_mask(exclude=NORM_AND_BIAS))],
    ids=["no-decay", "decay", "decay+mask"],
)
def test_with_adam_direction_equals_optax_lamb(weight_decay, mask):
    params = small_tree(0)  # has an all-zero bias: ratio 1 there
    assert any(not np.any(x) for _, x in leaf_paths(params))
    grads = [random_grads_like(params, s) for s in range(4)]
    ours = layer_adapted(optax.scale_by_adam(eps=1e-6), 1e-2, weight_decay, mask)
    lamb = optax.lamb(1e-2, weight_decay=weight_decay, mask=None if mask is True else mask)
    run_both(ours, lamb, params, grads)


def ref_adam_direction(m, v, g, t, b1=0.9, b2=0.999, eps=1e-6):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    d = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    return d, m, v


def ref_bert4keras_lamb(params, grads_seq, lr, wd, decayed):
    """Float64 bert4keras: Δ = -lr·(d + λθ); ratio = ‖θ‖/‖Δ/lr‖ (1 if a norm is 0);
    θ ← θ + ratio·Δ, per parameter tensor."""
    theta = dict(leaf_paths(to_f64(params)))
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    v = {p: np.zeros_like(x) for p, x in theta.items()}
    for t, grads in enumerate(grads_seq):
        for path, g in leaf_paths(to_f64(grads)):
            d, m[path], v[path] = ref_adam_direction(m[path], v[path], g, t)
            delta = -lr * (d + (wd * theta[path] if decayed(path) else 0.0))
            x_norm, g_norm = np.linalg.norm(theta[path]), np.linalg.norm(delta / lr)
            ratio = x_norm / g_norm if x_norm > 0 and g_norm > 0 else 1.0
            theta[path] = theta[path] + delta * ratio
    return theta


@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_bert4keras_reference(masked):
    with x64():
        params = small_tree(1, jnp.float64)
        grads = [random_grads_like(params, s) for s in range(5)]
        for g in grads:  # a leaf with zero gradient: zero update norm, ratio 1
            g["params"]["norm"]["scale"] = jnp.zeros_like(g["params"]["norm"]["scale"])
        mask = None if masked else True  # None: the default rule, NORM_AND_BIAS undecayed
        tx = layer_adapted(optax.scale_by_adam(eps=1e-6), 0.05, 0.1, mask)
        state, got = tx.init(params), params
        for g in grads:
            u, state = tx.update(g, state, got)
            got = optax.apply_updates(got, u)
        decayed = (lambda p: p.split("/")[-1] not in NO_DECAY) if masked else (lambda p: True)
        ref = ref_bert4keras_lamb(params, grads, 0.05, 0.1, decayed)
        for path, x in leaf_paths(got):
            np.testing.assert_allclose(x, ref[path], rtol=1e-11, atol=1e-13, err_msg=path)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_any_direction_update_is_lr_times_ratio_times_decayed_direction(direction):
    """Lockstep with the bare direction: u = -lr·r·(d + λθ), r = ‖θ‖/‖d + λθ‖."""
    params = random_tree(2)
    lr, wd = 0.03, 0.2
    bare, ours = direction(), layer_adapted(direction(), lr, wd, mask=True)
    s_bare, s_ours = bare.init(params), ours.init(params)
    for seed in range(3):
        g = random_grads_like(params, seed)
        d, s_bare = bare.update(g, s_bare, params)
        u, s_ours = ours.update(g, s_ours, params)
        for (path, ui), (_, di), (_, p) in zip(
            leaf_paths(u), leaf_paths(d), leaf_paths(params), strict=True
        ):
            dd = np.asarray(di, np.float64) + wd * np.asarray(p, np.float64)
            ratio = np.linalg.norm(np.asarray(p, np.float64)) / np.linalg.norm(dd)
            np.testing.assert_allclose(ui, -lr * ratio * dd, rtol=2e-5, atol=1e-7, err_msg=path)
        params = optax.apply_updates(params, u)


def test_adaptation_mask_leaves_excluded_leaves_unscaled():
    params = random_tree(3)
    g = random_grads_like(params, 0)
    no_bias = path_mask(exclude=NORM_AND_BIAS)
    tx = layer_adapted(optax.scale_by_adam(eps=1e-6), 0.1, adaptation_mask=no_bias)
    plain = optax.adam(0.1, eps=1e-6)
    lamb = optax.lamb(0.1)
    u, _ = tx.update(g, tx.init(params), params)
    u_adam, _ = plain.update(g, plain.init(params), params)
    u_lamb, _ = lamb.update(g, lamb.init(params), params)
    flags = dict(leaf_paths(no_bias(params)))
    for (path, x), (_, a), (_, b) in zip(
        leaf_paths(u), leaf_paths(u_adam), leaf_paths(u_lamb), strict=True
    ):
        np.testing.assert_allclose(x, b if flags[path] else a, rtol=1e-6, err_msg=path)
    assert not all(flags.values()) and any(flags.values())


def test_inject_hyperparams():
    """(Device paths, abstract init and one compile: tests/test_device_paths.py.)"""
    params = random_tree(4)
    grads = [random_grads_like(params, s) for s in range(3)]
    tx = layer_adapted(optax.scale_by_adam(eps=1e-6), 1e-2, 0.01, path_mask(exclude=NORM_AND_BIAS))
    inj = optax.inject_hyperparams(layer_adapted, static_args=("direction", "mask"))(
        optax.scale_by_adam(eps=1e-6),
        learning_rate=1e-2,
        weight_decay=0.01,
        mask=path_mask(exclude=NORM_AND_BIAS),
    )
    s_inj, s = inj.init(params), tx.init(params)
    for g in grads:
        u_inj, s_inj = inj.update(g, s_inj, params)
        u, s = tx.update(g, s, params)
        assert_trees_close(u_inj, u, rtol=1e-6, atol=1e-8)
        params = optax.apply_updates(params, u)


def test_extra_args_forwarded_to_direction():
    def scale_by_factor():
        def update(u, s, params=None, *, factor):
            return jax.tree.map(lambda x: factor * x, u), s

        return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)

    params = {"w": jnp.array([3.0, 4.0])}
    tx = layer_adapted(scale_by_factor(), 1.0)
    u, _ = tx.update({"w": jnp.array([1.0, 0.0])}, tx.init(params), params, factor=2.0)
    np.testing.assert_allclose(u["w"], [-5.0, 0.0])  # ratio scales the step to ‖θ‖


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay": -1.0}, r"weight_decay must be in \[0, inf\), got -1.0"),
        ({"learning_rate": -0.1}, r"learning_rate must be in \[0, inf\), got -0.1"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    args = {"learning_rate": 0.1} | kwargs
    with pytest.raises(ValueError, match=message):
        layer_adapted(optax.scale_by_adam(), **args)

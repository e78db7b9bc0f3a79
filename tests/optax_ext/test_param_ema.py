"""Parameter EMA kept in the optimizer state, and its accessor (bert4keras
``extend_with_exponential_moving_average``, kexue.fm/archives/7094)."""

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

from optax_ext.wrappers.param_ema import ParamEMAState, ema_params, param_ema

INNERS = wrapper_inners()


def run(tx, params, grads_seq, *, jit=True, history=None):
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    for g in grads_seq:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        if history is not None:
            history.append(params)
    return params, state


def ref_ema(theta_seq, theta0, mu, debias):
    """Float64: e_n = μ e_{n-1} + (1-μ) θ_n; read e_n / (1 - μ^n) (zero start) or e_n
    (start θ0)."""
    theta0 = dict(leaf_paths(to_f64(theta0)))
    e = {p: (np.zeros_like(x) if debias else x.copy()) for p, x in theta0.items()}
    for theta in theta_seq:
        for path, x in leaf_paths(to_f64(theta)):
            e[path] = mu * e[path] + (1 - mu) * x
    n = len(theta_seq)
    return {p: x / (1 - mu**n) if debias else x for p, x in e.items()}


def assert_matches(tree, ref, rtol=1e-12, atol=1e-13):
    got = dict(leaf_paths(tree))
    assert got.keys() == ref.keys()
    for path in ref:
        np.testing.assert_allclose(got[path], ref[path], rtol=rtol, atol=atol, err_msg=path)


@pytest.mark.parametrize("debias", [True, False])
def test_matches_float64_reference(debias):
    with x64():
        params = random_tree(1, dtype=jnp.float64)
        grads = [random_grads_like(params, s) for s in range(7)]
        history = []
        tx = optax.chain(optax.sgd(0.1, momentum=0.9), param_ema(0.8, debias=debias))
        _, state = run(tx, params, grads, history=history)
        assert_matches(ema_params(state), ref_ema(history, params, 0.8, debias))
        assert int(state[1].count) == 7


@pytest.mark.parametrize("inner", INNERS)
def test_updates_pass_through_unchanged(inner):
    params = random_tree(2)
    plain, with_ema = inner(), optax.chain(inner(), param_ema(0.9))
    s_plain, s_ema = plain.init(params), with_ema.init(params)
    history = []
    for seed in range(3):
        g = random_grads_like(params, seed)
        u_plain, s_plain = plain.update(g, s_plain, params)
        u_ema, s_ema = with_ema.update(g, s_ema, params)
        assert_trees_close(u_ema, u_plain, rtol=0, atol=0)
        params = optax.apply_updates(params, u_ema)
        history.append(params)
    assert_matches(ema_params(s_ema), ref_ema(history, params, 0.9, True), rtol=2e-6, atol=1e-6)


def test_bf16_params_average_in_float32():
    params = random_tree(3, dtype=jnp.bfloat16)
    grads = [random_grads_like(params, s, scale=0.3) for s in range(5)]
    history = []
    _, state = run(optax.chain(optax.sgd(0.05), param_ema(0.9)), params, grads, history=history)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[1].ema))
    # Averages the bf16 params actually held, in float32 (no bf16 rounding of the average).
    assert_matches(ema_params(state), ref_ema(history, params, 0.9, True), rtol=1e-6, atol=1e-6)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ema_params(state, params)))
    _, state16 = run(
        optax.chain(optax.sgd(0.05), param_ema(0.9, ema_dtype=jnp.bfloat16)), params, grads
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state16[1].ema))


def test_before_the_first_step():
    params = {"w": jnp.array([1.5, -2.0])}
    state = optax.chain(optax.sgd(0.1), param_ema()).init(params)
    np.testing.assert_array_equal(ema_params(state, params)["w"], params["w"])
    np.testing.assert_array_equal(ema_params(state)["w"], 0.0)
    assert np.isfinite(ema_params(state)["w"]).all()


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x)


def test_accessor_through_nestings():
    params = random_tree(4)
    grads = [random_grads_like(params, s) for s in range(4)]
    history = []
    _, base_state = run(optax.chain(optax.sgd(0.1), param_ema(0.9)), params, grads, history=history)
    want = ema_params(base_state)
    assert_matches(want, ref_ema(history, params, 0.9, True), rtol=2e-6, atol=1e-6)

    nested = {
        "inject_outer": optax.inject_hyperparams(
            lambda learning_rate: optax.chain(optax.sgd(learning_rate), param_ema(0.9))
        )(learning_rate=0.1),
        "inject_inner": optax.chain(optax.sgd(0.1), optax.inject_hyperparams(param_ema)(0.9)),
        "multisteps_k1": optax.MultiSteps(
            optax.chain(optax.sgd(0.1), param_ema(0.9)), every_k_schedule=1
        ),
        "masked_all": optax.chain(
            optax.sgd(0.1), optax.masked(param_ema(0.9), lambda t: jax.tree.map(lambda _: True, t))
        ),
    }
    for name, tx in nested.items():
        _, state = run(tx, params, grads)
        assert_trees_close(ema_params(state), want, rtol=1e-6, atol=1e-7, err=name)
        assert_trees_close(ema_params(state, params), want, rtol=1e-6, atol=1e-7, err=name)


def test_accessor_multisteps_averages_updates_only():
    params = random_tree(5)
    micro = [random_grads_like(params, s) for s in range(6)]
    mean = [jax.tree.map(lambda a, b: (a + b) / 2, micro[i], micro[i + 1]) for i in (0, 2, 4)]
    tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), param_ema(0.7)), every_k_schedule=2)
    _, state = run(tx, params, micro)
    _, ref_state = run(optax.chain(optax.sgd(0.1), param_ema(0.7)), params, mean)
    assert_trees_close(ema_params(state), ema_params(ref_state), rtol=1e-6, atol=1e-7)


def test_accessor_masked_leaves_come_from_params():
    params = random_tree(6)
    grads = [random_grads_like(params, s) for s in range(3)]
    kernels = lambda t: jax.tree_util.tree_map_with_path(lambda p, _: str(p[-1].key) == "kernel", t)
    history = []
    tx = optax.chain(optax.sgd(0.1), optax.masked(param_ema(0.9), kernels))
    final, state = run(tx, params, grads, history=history)
    ref = ref_ema(history, params, 0.9, True)
    out = ema_params(state, final)
    for (path, x), (_, p) in zip(leaf_paths(out), leaf_paths(final), strict=True):
        want = ref[path] if path.endswith("kernel") else np.asarray(p)
        np.testing.assert_allclose(x, want, rtol=2e-6, atol=1e-6, err_msg=path)


def test_accessor_on_flax_train_state():
    model = Tiny()
    x = jnp.ones((3, 4))
    params = model.init(jax.random.key(0), x)
    loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.chain(optax.adamw(0.05), param_ema(0.5))
    )
    history = []
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params)))
    for _ in range(3):
        state = step(state)
        history.append(state.params)
    ref = ref_ema(history, params, 0.5, True)
    assert_matches(ema_params(state.opt_state), ref, rtol=2e-6, atol=1e-6)
    assert_matches(ema_params(state), ref, rtol=2e-6, atol=1e-6)
    assert_matches(ema_params(state.opt_state, state.params), ref, rtol=2e-6, atol=1e-6)


def test_accessor_errors():
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="exactly one ParamEMAState.*found 0.*add param_ema"):
        ema_params(optax.adam(0.1).init(params))
    two = optax.chain(param_ema(), param_ema())
    with pytest.raises(ValueError, match="found 2"):
        ema_params(two.init(params))


def test_needs_params():
    tx = optax.chain(optax.sgd(0.1), param_ema())
    p = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="param_ema needs the params.*last in a chain"):
        tx.update(p, tx.init(p))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"decay": 1.0}, ValueError, r"decay must be in \[0, 1\), got 1.0"),
        ({"decay": -0.5}, ValueError, r"decay must be in \[0, 1\)"),
        ({"debias": 1}, TypeError, "debias must be a Python bool"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        param_ema(**kwargs)


def test_state_type_and_inject_hyperparams():
    """(Device paths, abstract init and one compile: tests/test_device_paths.py.)"""
    params = random_tree(7)
    grads = [random_grads_like(params, s) for s in range(3)]
    tx = optax.chain(optax.adamw(1e-2), param_ema(0.9))
    assert isinstance(jax.eval_shape(tx.init, params)[1], ParamEMAState)
    inj = optax.chain(optax.adamw(1e-2), optax.inject_hyperparams(param_ema)(decay=0.9))
    assert_trees_close(
        ema_params(run(inj, params, grads)[1]),
        ema_params(run(tx, params, grads)[1]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_changing_decay_is_debiased_exactly():
    """With a scheduled μ_t the weights still sum to 1 - Π μ_t: a constant θ reads back
    exactly as itself."""
    params = {"w": jnp.array([3.0, -1.0])}
    tx = optax.inject_hyperparams(param_ema)(decay=lambda n: 0.5 + 0.1 * jnp.minimum(n, 4))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(6):
        _, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(ema_params(state)["w"], params["w"], rtol=1e-6)

"""Fault injection: NaN/Inf gradients, zero learning rate, 1e30 gradients, bf16 overflow.

These back every claim of safety in the fault table (``benchmarks/fault_table.py``):

* ``nan_guard`` around any optimizer loses nothing on a NaN or Inf gradient: the inner
  state is kept bit for bit, only the bad leaf moves (toward its centre), params and
  state stay finite, and the next clean step is exactly the step the inner optimizer
  would have made had the bad step never happened.
* Tiger's own guard does the same per leaf (NaN always; Inf with ``catch_inf=True``);
  with the default ``catch_inf=False`` an Inf gradient poisons that momentum entry.
* A zero learning rate leaves the params bit-identical for every optimizer (Amos: its
  decay is scaled by ξ², so ξ = 0 stops it, unless ``extra_l2 > 0``).
* Gradients of 1e30 (finite in float32 and bfloat16, their squares are not): the
  sign-based optimizers take exactly their normal step; Adam-like ones keep finite
  params but their second moment overflows to Inf and freezes them; SGD with momentum
  stays finite but steps by lr·1e30·|g|; Amos produces NaN unless it clips.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_ext._common import path_to_str
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adax, adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard

BAD_LEAF = "params/Dense_0/kernel"
HUGE = 1e30

# the optimizers of the fault table, by learning rate (Tiger with its own guard off, so
# that nan_guard is what is tested)
OPTIMIZERS = {
    "tiger": lambda lr: tiger(lr, guard_nan=False),
    "lion": lambda lr: lion(lr),
    "adafactor": lambda lr: adafactor(lr),
    "adax": lambda lr: adax(lr),
    "amos": lambda lr: amos(lr),
    "sgdm": lambda lr: sgdm(lr),
    "optax.adamw": lambda lr: optax.adamw(lr),
}


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)
    return {
        "params": {
            "embed": {"embedding": n(5, 4)},
            "Dense_0": {"kernel": n(4, 3), "bias": n(3)},
            "LayerNorm_0": {
                "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(3), dtype),
                "bias": n(3),
            },
        }
    }


def make_grads(params, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(
            scale * rng.uniform(0.5, 2, p.shape) * rng.choice([-1, 1], p.shape), p.dtype
        ),
        params,
    )


def with_bad_entry(grads, value):
    def leaf(path, g):
        return g.at[0, 0].set(value) if path_to_str(path) == BAD_LEAF else g

    return jax.tree_util.tree_map_with_path(leaf, grads)


def leaves(tree):
    return {
        path_to_str(p): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in leaves(tree).values())


def assert_trees_equal(a, b, what):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), what
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=f"{what} at {k}")


_STEPS: dict = {}


def stepper(tx):
    """A jitted (params, state, grads) -> (params, state, updates), one per transform."""
    if id(tx) not in _STEPS:

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        _STEPS[id(tx)] = (tx, jax.jit(step))  # keeps tx alive so its id is not reused
    return _STEPS[id(tx)][1]


def warm(tx, params, n=2):
    """n clean steps from init: a state with non-zero moments."""
    state = tx.init(params)
    step = stepper(tx)
    for i in range(n):
        params, state, _ = step(params, state, make_grads(params, 100 + i))
    return params, state


# ------------------------------------------------------------ NaN guard: nothing lost

# plus a factored AdaFactor with momentum: its state is not shaped like the params
GUARDED_INNER = {
    **OPTIMIZERS,
    "adafactor(factored, momentum)": lambda lr: adafactor(
        lr, momentum=0.9, min_dim_size_to_factor=2
    ),
}
_GUARDED = {name: nan_guard(make(1e-2), shrink_ratio=0.9) for name, make in GUARDED_INNER.items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(GUARDED_INNER))
def test_nan_guard_loses_nothing(name, bad):
    tx = _GUARDED[name]
    step = stepper(tx)
    params, state = warm(tx, make_params())

    # the bad step: inner state kept exactly, only the bad leaf moves, by the shrink
    p1, s1, _ = step(params, state, with_bad_entry(make_grads(params, 7), bad))
    assert all_finite(p1) and all_finite(s1)
    assert_trees_equal(s1.inner_state, state.inner_state, "inner state on the bad step")
    assert int(s1.skipped_steps) == int(state.skipped_steps) + 1
    assert int(s1.shrunk_leaves) == int(state.shrunk_leaves) + 1
    before, after = leaves(params), leaves(p1)
    for k in before:
        if k == BAD_LEAF:
            np.testing.assert_allclose(after[k], 0.9 * before[k], rtol=1e-6)
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)

    # the next clean step is the inner optimizer's step as if the bad one never happened
    clean = make_grads(params, 8)
    p2, s2, u2 = step(p1, s1, clean)
    inner = GUARDED_INNER[name](1e-2)
    u_ref, inner_ref = jax.jit(inner.update)(clean, state.inner_state, p1)
    assert all_finite(p2) and all_finite(s2)
    assert any(np.any(u != 0) for u in leaves(u2).values()), "the clean step did not move"
    for k, u in leaves(u2).items():
        np.testing.assert_allclose(u, leaves(u_ref)[k], rtol=1e-6, atol=1e-9, err_msg=k)
    for k, x in leaves(s2.inner_state).items():
        np.testing.assert_allclose(x, leaves(inner_ref)[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_nan_guard_centre_of_norm_scales_is_one():
    tx = _GUARDED["optax.adamw"]
    params = make_params()

    def bad_scale(path, g):
        return g.at[0].set(np.nan) if path_to_str(path).endswith("LayerNorm_0/scale") else g

    grads = jax.tree_util.tree_map_with_path(bad_scale, make_grads(params, 1))
    p1, s1, _ = stepper(tx)(params, tx.init(params), grads)
    scale = leaves(params)["params/LayerNorm_0/scale"]
    np.testing.assert_allclose(
        leaves(p1)["params/LayerNorm_0/scale"], 1 + 0.9 * (scale - 1), rtol=1e-6
    )


# ---------------------------------------------------------------- Tiger's own guard


@pytest.mark.parametrize("catch_inf", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_tiger_own_guard(catch_inf, bad):
    caught = catch_inf or np.isnan(bad)
    tx = tiger(1e-2, shrink_ratio=0.9, catch_inf=catch_inf)
    step = stepper(tx)
    params, state = warm(tx, make_params())
    grads = make_grads(params, 7)
    p1, s1, u1 = step(params, state, with_bad_entry(grads, bad))
    _, s_clean, u_clean = step(params, state, grads)  # the same step without the fault

    before, after = leaves(params), leaves(p1)
    for k, u in leaves(u1).items():
        if k != BAD_LEAF:  # other leaves step as usual: Tiger decides per leaf
            np.testing.assert_array_equal(u, leaves(u_clean)[k], err_msg=k)
    mu_before, mu_after = leaves(state.mu), leaves(s1.mu)
    assert all_finite(p1)
    if caught:
        np.testing.assert_allclose(after[BAD_LEAF], 0.9 * before[BAD_LEAF], rtol=1e-6)
        np.testing.assert_array_equal(mu_after[BAD_LEAF], mu_before[BAD_LEAF])
        assert all_finite(s1)
        p2, s2, u2 = step(p1, s1, make_grads(params, 8))
        assert all_finite(p2) and all_finite(s2)
        assert np.any(leaves(u2)[BAD_LEAF] != 0)
    else:
        # the documented hazard of the default catch_inf=False: +Inf enters the
        # momentum, whose entry stays +Inf and pushes that parameter one way forever
        assert np.isinf(mu_after[BAD_LEAF][0, 0])
        p, s = p1, s1
        for i in range(3):
            p, s, u = step(p, s, make_grads(params, 20 + i))
        assert np.isinf(leaves(s.mu)[BAD_LEAF][0, 0])
        assert all_finite(p)


# ------------------------------------------------------------------ zero learning rate

ZERO_LR = {
    **{name: make for name, make in OPTIMIZERS.items()},
    "tiger(guard)": lambda lr: tiger(lr, weight_decay=0.1),
    "lion(tiger scales)": lambda lr: lion(lr, weight_decay=0.1, param_scaling="tiger"),
    "adafactor(decay)": lambda lr: adafactor(lr, weight_decay=0.1),
    "adaxw": lambda lr: adaxw(lr, weight_decay=0.1),
    "amos(momentum, clip)": lambda lr: amos(lr, momentum=0.9, clip_value=1.0),
    "sgdm(nesterov, k=2)": lambda lr: sgdm(lr, nesterov=True, accumulation_steps=2),
    "nan_guard(adamw)": lambda lr: nan_guard(optax.adamw(lr, weight_decay=0.1)),
    "layer_adapted(adam)": lambda lr: layer_adapted(optax.scale_by_adam(), lr, 0.1),
    "lookahead(tiger)": lambda lr: lookahead(tiger(lr), sync_period=2),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(ZERO_LR))
def test_zero_learning_rate_leaves_params_unchanged(name, dtype):
    tx = ZERO_LR[name](0.0)
    check_zero_lr(tx, dtype, name)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_learning_rate_under_nan_guard(name):
    check_zero_lr(nan_guard(OPTIMIZERS[name](0.0)), jnp.float32, f"nan_guard({name})")


def check_zero_lr(tx, dtype, name):
    step = stepper(tx)
    params = make_params(dtype)
    state = tx.init(params)
    p = params
    for i in range(3):
        p, state, _ = step(p, state, make_grads(params, i))
    assert_trees_equal(p, params, f"{name} with learning rate 0")


def test_amos_extra_l2_decays_even_at_zero_learning_rate():
    # extra_l2 is not scaled by ξ (spec: Δθ = dfac·(-(γ/2 + extra_l2)·θ - ...))
    tx = amos(0.0, extra_l2=0.1)
    params = make_params()
    updates, _ = tx.update(make_grads(params, 0), tx.init(params), params)
    for k, u in leaves(updates).items():
        np.testing.assert_allclose(u, -0.1 * leaves(params)[k], rtol=1e-6, err_msg=k)


# --------------------------------------------------------- enormous gradients (1e30)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("guard", [False, True], ids=["plain", "nan_guard"])
@pytest.mark.parametrize("name", ["tiger", "lion"])
def test_sign_optimizers_take_their_normal_step_on_huge_gradients(name, guard, dtype):
    # from init, m = (1-β)·g: the sign of 1e30·g is the sign of g, so the step is
    # exactly the normal one; the momentum (~1e28) stays finite, as do later steps
    tx = nan_guard(OPTIMIZERS[name](1e-2)) if guard else OPTIMIZERS[name](1e-2)
    step = stepper(tx)
    params = make_params(dtype)
    grads = make_grads(params, 3)
    huge = make_grads(params, 3, scale=HUGE)
    assert all_finite(huge) and all(np.all(np.abs(g) >= 1e29) for g in leaves(huge).values())
    p_huge, s_huge, _ = step(params, tx.init(params), huge)
    p_norm, _, _ = step(params, tx.init(params), grads)
    assert_trees_equal(p_huge, p_norm, f"{name}: 1e30 gradients vs ordinary ones")
    assert all_finite(s_huge)
    p, s = p_huge, s_huge
    for i in range(3):
        p, s, u = step(p, s, make_grads(params, 30 + i))
        assert all_finite(p) and all_finite(s)
        assert jax.tree.leaves(p)[0].dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["optax.adamw", "adax", "adafactor"])
def test_adam_like_keep_finite_params_but_freeze_on_huge_gradients(name, dtype):
    # g² = 1e60 overflows (float32 and bfloat16): v = Inf, so m/√v = 0 and the params
    # stay finite, but the Inf second moment never decays back: later updates are 0
    # (adamw's default weight decay still moves them by lr·λ·θ)
    tx = OPTIMIZERS[name](1e-2)
    step = stepper(tx)
    params, state = warm(tx, make_params(dtype))
    p, s, _ = step(params, state, make_grads(params, 3, scale=HUGE))
    assert all_finite(p)
    assert not all_finite(s), "the second moment was expected to overflow"
    for i in range(2):
        prev = p
        p, s, u = step(p, s, make_grads(params, 40 + i))
        assert all_finite(p)
    for k, x in leaves(p).items():
        old = np.abs(leaves(prev)[k])
        decay = 1e-2 * 1e-4 * old if name == "optax.adamw" else 0.0
        rounding = 2 * float(jnp.finfo(dtype).eps) * old
        assert np.all(np.abs(x - leaves(prev)[k]) <= decay + rounding), f"{name} moved {k}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sgdm_on_huge_gradients_is_finite_but_huge(dtype):
    tx = OPTIMIZERS["sgdm"](1e-2)
    params, state = warm(tx, make_params(dtype))
    p, s, u = stepper(tx)(params, state, make_grads(params, 3, scale=HUGE))
    assert all_finite(p) and all_finite(s)
    assert max(np.max(np.abs(x)) for x in leaves(u).values()) > 1e27


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_amos_huge_gradients_nan_unless_clipped(dtype):
    # v = Inf, rv = 0 and γ = ξ²·rv·g2 = 0·Inf = NaN: unclipped Amos produces NaN params;
    # clip_value bounds g before it is squared
    params = make_params(dtype)
    huge = make_grads(params, 3, scale=HUGE)
    tx = amos(0.1)
    p, _, _ = stepper(tx)(params, tx.init(params), huge)
    assert not all_finite(p)
    tx = amos(0.1, clip_value=1.0)
    p, s, _ = stepper(tx)(params, tx.init(params), huge)
    assert all_finite(p) and all_finite(s)


def test_nan_guard_does_not_catch_finite_huge_gradients():
    # 1e30 gradients are finite and so is SGDM's huge step: neither check catches them
    tx = _GUARDED["sgdm"]
    params, state = warm(tx, make_params())
    p, s, u = stepper(tx)(params, state, make_grads(params, 3, scale=HUGE))
    assert int(s.skipped_steps) == 0
    assert max(np.max(np.abs(x)) for x in leaves(u).values()) > 1e27

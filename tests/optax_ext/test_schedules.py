"""Schedules: Su's piecewise-linear form and his derived lr / weight-decay schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_grads_like, random_tree, x64

from optax_ext.schedules import (
    amos_lr_schedule,
    amos_weight_decay_schedule,
    constant_decay_lr_schedule,
    coupled_decay_schedules,
    piecewise_linear,
)

STEPS = np.array([0, 1, 7, 500, 1000, 1500, 2000, 5000, 10_000, 123_456])


def values(schedule, steps=STEPS):
    return np.array([float(schedule(jnp.int32(s))) for s in steps])


# ------------------------------------------------------------- worked numbers


def test_worked_numbers_from_the_spec():
    assert float(constant_decay_lr_schedule(1e-3, 0.1)(10_000)) == pytest.approx(5e-4, rel=1e-6)
    s = coupled_decay_schedules(1e-3, 0.1)
    assert float(s.learning_rate(10_000)) == pytest.approx(5.7735e-4, rel=1e-5)
    assert float(s.weight_decay(10_000)) == pytest.approx(0.057735, rel=1e-5)
    assert float(s.learning_rate(0)) == pytest.approx(1e-3, rel=1e-7)
    assert float(s.weight_decay(0)) == pytest.approx(0.1, rel=1e-7)


def test_derived_schedules_match_float64_formulas():
    t = STEPS.astype(np.float64)
    with x64():
        np.testing.assert_allclose(
            values(constant_decay_lr_schedule(3e-4, 0.05)), 3e-4 / (0.05 * 3e-4 * t + 1), rtol=1e-14
        )
        s = coupled_decay_schedules(3e-4, 0.05)
        lr = 3e-4 / np.sqrt(2 * 0.05 * 3e-4 * t + 1)
        np.testing.assert_allclose(values(s.learning_rate), lr, rtol=1e-14)
        np.testing.assert_allclose(values(s.weight_decay), 0.05 / 3e-4 * lr, rtol=1e-14)
        alpha = 2e-2 / (2 * 2e-2 * 0.3 * t + 1)
        np.testing.assert_allclose(values(amos_lr_schedule(2e-2, 0.3)), alpha, rtol=1e-14)
        np.testing.assert_allclose(
            values(amos_weight_decay_schedule(2e-2, 0.3)), 0.3 * (alpha / 2e-2) ** 2, rtol=1e-14
        )


def test_amos_pair_keeps_equilibrium_scale():
    # q = α_t / sqrt(2 ρ_t) stays α0 / sqrt(2 ρ0) while both anneal
    a, r = values(amos_lr_schedule(1e-2, 0.2)), values(amos_weight_decay_schedule(1e-2, 0.2))
    np.testing.assert_allclose(a / np.sqrt(2 * r), 1e-2 / np.sqrt(0.4), rtol=1e-5)
    assert a[-1] < 0.01 * a[0]


# ----------------------------------------------------------- piecewise linear


def test_piecewise_linear_semantics():
    sched = piecewise_linear({1000: 1, 2000: 0.1})
    got = values(sched, [0, 500, 1000, 1500, 2000, 5000])
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6, atol=1e-7)
    # unsorted keys mean the same schedule; base multiplies
    np.testing.assert_array_equal(values(piecewise_linear({2000: 0.1, 1000: 1})), values(sched))
    np.testing.assert_allclose(
        values(piecewise_linear({1000: 1, 2000: 0.1}, base=3e-4)), 3e-4 * values(sched), rtol=1e-6
    )


def test_piecewise_linear_first_key_zero_or_not():
    starts_at_zero = piecewise_linear({0: 0.5, 100: 1.0})
    np.testing.assert_allclose(values(starts_at_zero, [0, 50, 100, 300]), [0.5, 0.75, 1.0, 1.0])
    warmup = piecewise_linear({50: 0.5, 100: 1.0})  # (0, 0.0) prepended
    np.testing.assert_allclose(
        values(warmup, [0, 25, 50, 75, 100, 300]), [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    )
    single = piecewise_linear({10: 2.0})
    np.testing.assert_allclose(values(single, [0, 5, 10, 11]), [0.0, 1.0, 2.0, 2.0])
    constant = piecewise_linear({0: 2.0})
    np.testing.assert_allclose(values(constant, [0, 10**6]), [2.0, 2.0])


def test_piecewise_linear_is_traceable():
    sched = piecewise_linear({1000: 1, 2000: 0.1}, base=1e-3)
    jitted = jax.jit(sched)
    assert float(jitted(jnp.int32(1500))) == pytest.approx(5.5e-4, rel=1e-6)
    vmapped = jax.vmap(sched)(jnp.arange(0, 3000, 500))
    np.testing.assert_allclose(
        vmapped, 1e-3 * np.array([0, 0.5, 1, 0.55, 0.1, 0.1]), rtol=1e-5, atol=1e-10
    )


def test_used_inside_adamw_under_jit():
    params = random_tree(1)
    grads = [random_grads_like(params, s) for s in range(12)]
    sched = piecewise_linear({4: 1.0, 8: 0.2}, base=1e-2)
    tx = optax.adamw(sched, weight_decay=0.0)
    direction = optax.scale_by_adam()
    step = jax.jit(lambda g, s: tx.update(g, s, params))
    dstep = jax.jit(lambda g, s: direction.update(g, s))
    state, dstate = tx.init(params), direction.init(params)
    for t, g in enumerate(grads):
        u, state = step(g, state)
        d, dstate = dstep(g, dstate)
        lr = 1e-2 * np.interp(t, [0, 4, 8], [0, 1.0, 0.2])
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(d), strict=True):
            np.testing.assert_allclose(a, -lr * np.asarray(b), rtol=1e-5, atol=1e-9)
    # and the coupled pair drives adamw's injected hyperparameters
    s = coupled_decay_schedules(1e-3, 0.1)
    injected = optax.inject_hyperparams(optax.adamw)(
        learning_rate=s.learning_rate, weight_decay=s.weight_decay
    )
    istate = injected.init(params)
    istep = jax.jit(lambda g, st: injected.update(g, st, params))
    for g in grads[:3]:
        _, istate = istep(g, istate)
    # the values used by the third update, at count t = 2
    assert float(istate.hyperparams["learning_rate"]) == pytest.approx(
        1e-3 / np.sqrt(2 * 0.1 * 1e-3 * 2 + 1), rel=1e-6
    )  # float32
    assert float(istate.hyperparams["weight_decay"]) == pytest.approx(
        100 * 1e-3 / np.sqrt(2 * 0.1 * 1e-3 * 2 + 1), rel=1e-6
    )  # float32


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "points, base, error, match",
    [
        ({}, 1.0, ValueError, "must not be empty"),
        ({-1: 1.0}, 1.0, ValueError, r"step -1 must be in \[0, inf\)"),
        ({10: float("nan")}, 1.0, ValueError, "multiplier at step 10"),
        ({10: float("inf")}, 1.0, ValueError, "multiplier at step 10 must be finite"),
        ({float("inf"): 1.0}, 1.0, ValueError, "must be finite"),
        ({"10": 1.0}, 1.0, ValueError, "steps must be numbers"),
        ({10: 1.0}, float("nan"), ValueError, "base must be"),
        ([(10, 1.0)], 1.0, TypeError, "must be a mapping"),
    ],
)
def test_piecewise_linear_bad_input(points, base, error, match):
    with pytest.raises(error, match=match):
        piecewise_linear(points, base)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: constant_decay_lr_schedule(0.0, 0.1), r"peak_lr must be in \(0, inf\)"),
        (lambda: constant_decay_lr_schedule(1e-3, -0.1), "weight_decay must be in"),
        (lambda: coupled_decay_schedules(float("inf"), 0.1), "peak_lr must be finite"),
        (lambda: coupled_decay_schedules(1e-3, float("nan")), "peak_weight_decay must be"),
        (lambda: amos_lr_schedule(-1e-3, 0.1), "alpha0 must be in"),
        (lambda: amos_weight_decay_schedule(1e-3, -0.1), "rho0 must be in"),
    ],
)
def test_derived_schedules_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()

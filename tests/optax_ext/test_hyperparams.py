"""ox.inject_hyperparams: schedules read by update for optimizers that accumulate inside."""

import jax.numpy as jnp
import optax
import pytest
from helpers import assert_trees_close, random_grads_like, random_tree, x64

import optax_ext as ox


def run(tx, params, n):
    state = tx.init(params)
    for seed in range(n):
        u, state = tx.update(random_grads_like(params, seed), state, params)
        params = optax.apply_updates(params, u)
    return params


def test_optax_wrapper_counts_micro_steps_ours_counts_updates():
    """With k = 4 optax's wrapper reaches the schedule's end after a quarter of the
    updates; ours follows Tiger's own schedule argument exactly."""
    with x64():
        params = random_tree(0, dtype=jnp.float64)
        sched = optax.linear_schedule(1e-2, 0.0, 3)
        make = lambda inject: inject(ox.tiger, static_args=("accumulation_steps",))(
            learning_rate=sched, accumulation_steps=4
        )
        direct = run(ox.tiger(sched, accumulation_steps=4), params, 12)
        assert_trees_close(run(make(ox.inject_hyperparams), params, 12), direct, rtol=1e-12)
        theirs = run(make(optax.inject_hyperparams), params, 12)
        with pytest.raises(AssertionError):
            assert_trees_close(theirs, direct, rtol=1e-6)


def test_accumulation_steps_must_be_static_and_constant():
    with pytest.raises(
        ValueError, match=r"accumulation_steps=3 must be static: write .*static_args"
    ):
        ox.inject_hyperparams(ox.sgdm)(learning_rate=0.1, accumulation_steps=3)
    with pytest.raises(ValueError, match="accumulation_steps cannot be a schedule"):
        ox.inject_hyperparams(ox.sgdm, static_args="accumulation_steps")(
            learning_rate=0.1, accumulation_steps=lambda c: 2
        )


def test_without_accumulation_it_is_optax_inject_hyperparams():
    params = random_tree(1)
    ours = ox.inject_hyperparams(ox.lion)(learning_rate=optax.linear_schedule(1e-2, 0.0, 3))
    theirs = optax.inject_hyperparams(ox.lion)(learning_rate=optax.linear_schedule(1e-2, 0.0, 3))
    assert_trees_close(run(ours, params, 3), run(theirs, params, 3), rtol=0, atol=0)
    state = ours.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)

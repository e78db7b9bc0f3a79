"""ox.inject_hyperparams: schedules read by update for optimizers that accumulate inside."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, jit_once, random_grads_like, random_tree, run_steps, x64

import optax_ext as ox


def run(tx, params, n):
    """The params after ``n`` jitted steps of ``tx`` on seeded random gradients."""
    return run_steps(tx, params, [random_grads_like(params, seed) for seed in range(n)])[0]


def test_optax_wrapper_is_refused_ours_counts_updates():
    """With k = 4 optax's wrapper would reach the schedule's end after a quarter of the
    updates, so Tiger refuses it naming ours; ours follows Tiger's own schedule
    argument exactly."""
    with x64():
        params = random_tree(0, dtype=jnp.float64)
        sched = optax.linear_schedule(1e-2, 0.0, 3)
        make = lambda inject: inject(ox.tiger, static_args=("accumulation_steps",))(
            learning_rate=sched, accumulation_steps=4
        )
        direct = run(ox.tiger(sched, accumulation_steps=4), params, 12)
        assert_trees_close(run(make(ox.inject_hyperparams), params, 12), direct, rtol=1e-12)
        with pytest.raises(
            ValueError, match=r"k times too fast.*ox\.inject_hyperparams\(ox\.tiger"
        ):
            run(make(optax.inject_hyperparams), params, 12)


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


# ------------------------------------------- a cycle length that changes in training

#: cycle lengths of a batch-size warm-up: k = 2, then 4, then 3
CYCLES = (2, 2, 4, 4, 3, 3)
INJECTED = {
    "tiger": ox.tiger,
    "sgdm": ox.sgdm,
    "sgdm_nesterov": lambda learning_rate, accumulation_steps: ox.sgdm(
        learning_rate, 0.9, True, accumulation_steps=accumulation_steps
    ),
}


def by_update(n):
    return 1e-2 / (1.0 + 0.5 * n)  # a micro-step index gives other values


def run_cycles(tx, params, *, jit):
    """Every micro-step passes its cycle's length; (params, state, [lr read per call])."""
    state = tx.init(params)

    def step(p, s, g, k):
        u, s = tx.update(g, s, p, set_accumulation_steps=k)
        return optax.apply_updates(p, u), s

    step = jax.jit(step) if jit else step
    read, t = [], 0
    for k in CYCLES:
        for _ in range(k):
            params, state = step(params, state, random_grads_like(params, t), jnp.int32(k))
            if hasattr(state, "hyperparams"):
                read.append(float(state.hyperparams["learning_rate"]))
            t += 1
    return params, state, read


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_injected_schedule_follows_updates_while_k_changes(name):
    """k = 2 -> 4 -> 3 through set_accumulation_steps: the injected schedule is read at
    the optimizer's own update counter, so it equals the optimizer's own schedule
    argument, and the value read on each micro-step is the schedule at the number of
    updates made before it (the static k = 2 of construction would give other ones)."""
    factory = INJECTED[name]
    with x64():
        params = random_tree(2, dtype=jnp.float64)
        injected = ox.inject_hyperparams(factory, static_args=("accumulation_steps",))(
            learning_rate=by_update, accumulation_steps=2
        )
        got, state, read = run_cycles(injected, params, jit=True)
        want, _, _ = run_cycles(factory(by_update, accumulation_steps=2), params, jit=True)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-14)
    updates_before = [n for n, k in enumerate(CYCLES) for _ in range(k)]
    np.testing.assert_allclose(read, [by_update(n) for n in updates_before], rtol=1e-12)
    assert int(ox_find_counters(state).updates) == len(CYCLES)


def ox_find_counters(state):
    from optax_ext._cycles import find_counters

    return find_counters(state.inner_state)


def test_a_factory_that_accumulates_inside_reads_by_update_too():
    """No accumulation_steps argument, an accumulating optimizer inside: still by update."""
    with x64():
        params = random_tree(3, dtype=jnp.float64)
        factory = lambda learning_rate: ox.tiger(learning_rate, accumulation_steps=3)
        got = run(ox.inject_hyperparams(factory)(learning_rate=by_update), params, 9)
        want = run(ox.tiger(by_update, accumulation_steps=3), params, 9)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factory", [ox.tiger, ox.sgdm], ids=["tiger", "sgdm"])
def test_optax_wrapper_never_runs_a_schedule_k_times_fast(factory):
    """optax.inject_hyperparams reads schedules per micro-step: refused while
    accumulating (k injected or static), and at a set_accumulation_steps with k = 1."""
    params = random_tree(4)
    name = factory.__name__
    message = rf"k times too fast.*ox\.inject_hyperparams\(ox\.{name}"
    with pytest.raises(ValueError, match=message):
        optax.inject_hyperparams(factory)(learning_rate=by_update, accumulation_steps=4).init(
            params
        )
    with pytest.raises(ValueError, match=message):
        optax.inject_hyperparams(factory, static_args="accumulation_steps")(
            learning_rate=by_update, accumulation_steps=4
        ).init(params)
    tx = optax.inject_hyperparams(factory)(learning_rate=by_update)  # k = 1: by call = by update
    state = tx.init(params)
    tx.update(random_grads_like(params, 0), state, params)
    with pytest.raises(ValueError, match=rf"set_accumulation_steps.*{message}"):
        tx.update(random_grads_like(params, 0), state, params, set_accumulation_steps=2)


@pytest.mark.parametrize("factory", [ox.tiger, ox.sgdm], ids=["tiger", "sgdm"])
def test_injected_constants_can_be_changed_between_steps(factory):
    """What optax's wrapper gave with constants, ours gives while accumulating."""
    params = random_tree(5)
    grads = [random_grads_like(params, s) for s in range(4)]
    tx = ox.inject_hyperparams(factory, static_args=("accumulation_steps",))(
        learning_rate=3e-2, accumulation_steps=2
    )
    p_inj = run(tx, params, 4)
    assert_trees_close(p_inj, run(factory(3e-2, accumulation_steps=2), params, 4), rtol=1e-6)
    state = tx.init(params)
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    step = jit_once(tx.update)
    for g in grads:
        u, state = step(g, state, params)
        assert all(not bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def test_set_accumulation_steps_without_counters_is_refused():
    params = random_tree(6)
    tx = ox.inject_hyperparams(optax.adam)(learning_rate=by_update)
    with pytest.raises(ValueError, match="keeps accumulation counters"):
        tx.update(random_grads_like(params, 0), tx.init(params), params, set_accumulation_steps=2)

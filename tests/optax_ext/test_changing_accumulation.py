"""Accumulation cycles whose length changes during training (a batch-size warm-up).

Tiger and SGDM accumulate inside their momentum, ``accumulate_gradients`` in a buffer;
all three take ``set_accumulation_steps=k`` in ``update`` and must then equal the same
optimizer with k = 1 fed each cycle's mean gradient, move the parameters only on a
cycle's last micro-step, read schedules by update, and compile once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    flax_like_params,
    jit_once,
    leaf_paths,
    random_grads_like,
    run_steps,
    tiny_params,
    x64,
)

import optax_ext as ox

#: the cycle lengths of a warm-up run (the last micro-step of each is an update)
CYCLES = (1, 2, 2, 3, 1, 4)


def schedule(n):
    return 2e-2 / (1.0 + 0.3 * n)  # by update: a micro-step index would differ


FACTORIES = {
    "tiger": lambda k: ox.tiger(schedule, accumulation_steps=k, weight_decay=0.05),
    "sgdm": lambda k: ox.sgdm(schedule, momentum=0.9, accumulation_steps=k),
    "sgdm_nesterov": lambda k: ox.sgdm(schedule, 0.9, True, accumulation_steps=k),
    "accumulate_gradients(adamw)": lambda k: ox.accumulate_gradients(
        optax.adamw(schedule, weight_decay=0.05), k
    ),
}


def micro_grads(params, seed, cycles=CYCLES):
    """Per cycle, its list of micro-batch gradients."""
    out, t = [], 0
    for k in cycles:
        out.append([random_grads_like(params, seed + t + i, scale=1.0 + i) for i in range(k)])
        t += k
    return out


def mean(grads):
    return jax.tree.map(lambda *g: sum(g) / len(g), *grads)


def run_changing(tx, params, cycles_of_grads, *, change_mid_cycle=False):
    """Every micro-step passes its cycle's length (or, with ``change_mid_cycle``, a
    wrong one after the first micro-step, which must be ignored)."""
    state = tx.init(params)

    @jit_once  # k changes, the program does not: a second trace fails
    def step(p, s, g, k):
        u, s = tx.update(g, s, p, set_accumulation_steps=k)
        return optax.apply_updates(p, u), s, u

    moved = []
    for grads in cycles_of_grads:
        for i, g in enumerate(grads):
            k = len(grads) if i == 0 or not change_mid_cycle else 7
            params, state, u = step(params, state, g, jnp.int32(k))
            moved.append(any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u)))
    return params, state, moved


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_changing_k_equals_k1_fed_each_cycles_mean(name):
    make = FACTORIES[name]
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), tiny_params(3))
        grads = micro_grads(params, 100)
        # built with k = 2 (Nesterov needs k > 1 to keep the cycle's mean): the lengths
        # passed override it from the first micro-step
        got, _, moved = run_changing(make(2), params, grads)
        want, _ = run_steps(make(1), params, [mean(g) for g in grads])
    assert_trees_close(got, want, rtol=1e-12, atol=1e-13)
    last_steps = np.cumsum(CYCLES) - 1
    assert moved == [t in last_steps for t in range(sum(CYCLES))]


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_length_passed_mid_cycle_waits_for_the_next_cycle(name):
    make = FACTORIES[name]
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), tiny_params(4))
        grads = micro_grads(params, 200)
        steady, *_ = run_changing(make(2), params, grads)
        changed, *_ = run_changing(make(2), params, grads, change_mid_cycle=True)
    assert_trees_close(changed, steady, rtol=0, atol=0)


def sgdm_reference(params, cycles_of_grads, beta, lr):
    """SGD with heavy-ball momentum on each cycle's mean gradient, float64 NumPy."""
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    mu = {p: np.zeros_like(x) for p, x in theta.items()}
    for n, grads in enumerate(cycles_of_grads):
        flat = [dict(leaf_paths(g)) for g in grads]
        for p in theta:
            g_mean = sum(np.asarray(f[p], np.float64) for f in flat) / len(flat)
            mu[p] = beta * mu[p] + g_mean
            theta[p] = theta[p] - lr(n) * mu[p]
    return theta


def test_sgdm_with_changing_k_matches_a_float64_reference():
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), flax_like_params(5))
        grads = micro_grads(params, 300)
        got, state, _ = run_changing(ox.sgdm(schedule, 0.9, accumulation_steps=3), params, grads)
    want = sgdm_reference(params, grads, 0.9, schedule)
    for p, x in leaf_paths(got):
        np.testing.assert_allclose(x, want[p], rtol=1e-12, atol=1e-14, err_msg=p)
    assert int(state[0].updates) == len(CYCLES)
    assert int(state[0].count) == sum(CYCLES)


def test_tiger_counts_updates_and_cycle_in_its_state():
    params = tiny_params(6)
    grads = micro_grads(params, 400, cycles=(2, 3))
    _, state, _ = run_changing(ox.tiger(1e-3), params, grads)
    # the direction's state, inside the guard's, is the one record of the cycle
    direction = state.inner_state[0]
    assert (int(direction.count), int(direction.updates), int(direction.micro_step)) == (5, 2, 0)
    assert int(direction.cycle_length) == 3
    assert int(optax.tree.get(state, "updates")) == 2


def test_without_the_argument_nothing_changes():
    """A constant k reads the constructor's value: the same program as before."""
    params = tiny_params(7)
    grads = [g for cycle in micro_grads(params, 500, cycles=(3, 3)) for g in cycle]
    tx = ox.tiger(1e-2, accumulation_steps=3)
    a, _ = run_steps(tx, params, grads)
    p, _ = run_steps(tx, params, grads, set_accumulation_steps=3)
    assert_trees_close(p, a, rtol=1e-6, atol=1e-7)


def test_nesterov_sgdm_built_with_k1_says_how_to_change_k():
    tx = ox.sgdm(0.1, 0.9, True)
    params = tiny_params(8)
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"nesterov=True.*build it with accumulation_steps > 1"):
        tx.update(random_grads_like(params, 0), state, params, set_accumulation_steps=2)


@pytest.mark.parametrize("value, error", [(0, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_a_bad_length_is_a_clear_error(value, error):
    tx = ox.tiger(1e-3)
    params = tiny_params(8)
    state = tx.init(params)
    with pytest.raises(error, match="set_accumulation_steps"):
        tx.update(random_grads_like(params, 0), state, params, set_accumulation_steps=value)


def test_a_noise_driven_warmup_grows_k_on_a_flax_model_and_compiles_once():
    """The loop a user writes: measure B_simple while training, let
    scaling.warmup_accumulation_steps pick k after each update, pass it on."""
    import flax.linen as nn

    import scaling

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.tanh(nn.Dense(32)(x)))

    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((8, 1))

    def micro_batch(size=8):
        x = rng.standard_normal((size, 8)).astype(np.float32)
        y = (x @ teacher + 2.0 * rng.standard_normal((size, 1))).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(y)

    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))
    window = 8
    tx = ox.accumulate_gradients(
        optax.chain(ox.measure_noise_scale(batch_size=8, window=window), ox.tiger(3e-3)), 1
    )
    state = tx.init(params)

    @jit_once  # k grows, the program does not: a second trace fails
    def step(params, state, x, y, k):
        loss = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
        u, state = tx.update(jax.grad(loss)(params), state, params, set_accumulation_steps=k)
        return optax.apply_updates(params, u), state

    k, history = 2, []  # two micro-batches at least: the measurement compares 1 and k
    for _ in range(40):
        for _ in range(k):
            params, state = step(params, state, *micro_batch(), jnp.int32(k))
        now = ox.current_noise_scale(state, window=window)
        # windows of 8 updates are never precise enough to count as settled: grow on the
        # estimate's lower one-s.e. bound instead
        low = now.b_simple - now.stderr if now.measurable else float("nan")
        k = scaling.warmup_accumulation_steps(max(low, 0.0), 8, 8, previous=k)
        history.append(k)
    assert history == sorted(history), history  # a warm-up never shrinks the batch
    assert history[0] == 2 and history[-1] > 2, history
    assert int(state.gradient_step) == 40


BAD_LENGTHS = {
    "array 0": (jnp.array(0), ValueError, r"an int in \[1, 2147483647\]"),
    "array -5": (jnp.array(-5), ValueError, r"an int in \[1, 2147483647\]"),
    "array 2.7": (jnp.array(2.7), TypeError, "an int"),
    "int64 2**32+3": (np.int64(2**32 + 3), ValueError, r"an int in \[1, 2147483647\]"),
    "int 2**40": (2**40, ValueError, r"an int in \[1, 2147483647\]"),
    "shape (2,)": (jnp.array([2, 3]), ValueError, r"one int .* shape \(2,\)"),
    "bool array": (jnp.array(True), TypeError, "an int"),
}
BUILDERS = {
    "tiger": lambda: ox.tiger(1e-3, accumulation_steps=2),
    "sgdm": lambda: ox.sgdm(1e-3, accumulation_steps=2),
    "accumulate_gradients": lambda: ox.accumulate_gradients(optax.sgd(1e-3), 2),
}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("bad", sorted(BAD_LENGTHS))
def test_a_concrete_array_length_is_checked_like_an_int(builder, bad):
    """A concrete array must not be clamped, truncated or wrapped into a length."""
    value, error, match = BAD_LENGTHS[bad]
    tx = BUILDERS[builder]()
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    with pytest.raises(error, match="set_accumulation_steps must be " + match):
        tx.update({"w": jnp.ones(3)}, state, params, set_accumulation_steps=value)


def moved_per_call(tx, k_values, calls=6):
    """Which of ``calls`` jitted micro-steps moved the params, each passed ``k_values``."""
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    step = jax.jit(lambda s, k: tx.update({"w": jnp.ones(3)}, s, params, set_accumulation_steps=k))
    moved = []
    for _ in range(calls):
        u, state = step(state, k_values)
        moved.append(int(bool(jnp.any(u["w"] != 0))))
    return "".join(map(str, moved))


def test_a_traced_length_is_type_checked_and_its_value_clamped_not_wrapped():
    """Inside jit only the dtype and shape can be checked; values are clamped into
    [1, 2**31 - 1] (documented): 0 acts as 1, and an int64 length beyond int32 does not
    wrap around into a short cycle."""
    tx = ox.tiger(1e-3, accumulation_steps=2)
    with pytest.raises(TypeError, match="set_accumulation_steps must be an int"):
        moved_per_call(tx, jnp.float32(2.0))
    with pytest.raises(ValueError, match=r"set_accumulation_steps must be one int .*\(2,\)"):
        moved_per_call(tx, jnp.array([2, 3], jnp.int32))
    assert moved_per_call(tx, jnp.int32(0)) == "111111"
    assert moved_per_call(tx, jnp.int32(3)) == "001001"
    with x64():
        tx = ox.tiger(1e-3, accumulation_steps=2)
        # 2**32 + 3 wrapped to int32 would be 3 ("001001"); clamped it never ends here
        assert moved_per_call(tx, jnp.int64(2**32 + 3)) == "000000"


def test_a_constructor_length_beyond_int32_names_the_argument():
    for make in (
        lambda: ox.tiger(1e-3, accumulation_steps=2**40),
        lambda: ox.sgdm(1e-3, accumulation_steps=2**40),
        lambda: ox.accumulate_gradients(optax.sgd(1e-3), 2**40),
    ):
        with pytest.raises(
            ValueError, match=r"accumulation_steps must be an int in \[1, 2147483647\]"
        ):
            make()


@pytest.mark.parametrize("name", ["tiger", "sgdm"])
def test_optax_inject_hyperparams_with_a_traced_k_is_refused(name):
    """optax's wrapper reads schedules per micro-step; with accumulation_steps injected
    and traced (a jitted init) its value is unknown, so the optimizer refuses rather
    than run the schedule k times too fast, naming ox.inject_hyperparams."""
    factory = {"tiger": ox.tiger, "sgdm": ox.sgdm}[name]
    tx = optax.inject_hyperparams(factory)(learning_rate=schedule, accumulation_steps=4)
    params = {"w": jnp.ones(3)}
    with pytest.raises(
        ValueError, match=rf"traced accumulation_steps.*ox\.inject_hyperparams\(ox\.{name}"
    ):
        jax.jit(tx.init)(params)

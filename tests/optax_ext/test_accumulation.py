"""accumulate_gradients: MultiSteps semantics, float64 reference, devices, dtypes, extra args."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    abstract_init_matches,
    assert_no_recompile,
    assert_trees_close,
    jit_once,
    random_grads_like,
    random_tree,
    to_f64,
    x64,
)

from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients


def _apply(params, updates):
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


# ------------------------------------------------------------- versus optax.MultiSteps

INNERS = {
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3),
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw_schedule": lambda: optax.adamw(optax.linear_schedule(1e-2, 1e-3, 4)),
    "tiger": lambda: tiger(1e-2, accumulation_steps=1),
}


@pytest.mark.parametrize("name", sorted(INNERS))
@pytest.mark.usefixtures("float64")
def test_equals_multisteps_step_for_step(name):
    """In float64: the two are different programs, and in float32 whether they round alike
    depends on how XLA fuses each into multiply-adds (they differed by an ulp of the
    gradients, 1.2e-8, where momentum entries cancel to ~3e-4, under XLA:CPU's classic
    emitter); in float64 they must agree to 1e-12. MultiSteps accumulates in float32
    unless told otherwise."""
    k, cycles = 3, 4
    params = jax.tree.map(jnp.asarray, to_f64(random_tree(1)))
    grads = [random_grads_like(params, s) for s in range(k * cycles)]
    ours = accumulate_gradients(INNERS[name](), k)
    theirs = optax.MultiSteps(INNERS[name](), k, accumulator_dtype=jnp.float64)
    step = lambda tx: jax.jit(
        lambda p, s, g: (lambda u, s: (_apply(p, u), u, s))(*tx.update(g, s, p))
    )
    ours_step, theirs_step = step(ours), step(theirs)
    p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
    close = dict(rtol=1e-12, atol=1e-14)
    for t, g in enumerate(grads):
        p1, u1, s1 = ours_step(p1, s1, g)
        p2, u2, s2 = theirs_step(p2, s2, g)
        assert_trees_close(u1, u2, **close, err=f"updates at micro-step {t}")
        assert_trees_close(p1, p2, **close, err=f"params at micro-step {t}")
        assert_trees_close(
            s1.inner_state, s2.inner_opt_state, **close, err=f"inner state at micro-step {t}"
        )
        assert jax.tree.leaves(p1)[0].dtype == jnp.float64
        assert int(s1.gradient_step) == int(s2.gradient_step) == (t + 1) // k
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, params)
    assert min(jax.tree.leaves(moved)) > 0


# -------------------------------------------------------------- float64 reference

LR0, BETA = 0.1, 0.9


def _reference(params, micro_grads, k):
    """NumPy float64: SGD with momentum and lr 0.1/(1+update) fed the mean of each cycle's
    finite micro-batch gradients; an all-skipped cycle makes no update."""
    theta, m = to_f64(params), jax.tree.map(np.zeros_like, to_f64(params))
    history, cycle, update = [], [], 0
    for t, g in enumerate(micro_grads):
        g = to_f64(g)
        if all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g)):
            cycle.append(g)
        if (t + 1) % k == 0:
            if cycle:
                mean = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *cycle)
                m = jax.tree.map(lambda m_, g_: BETA * m_ + g_, m, mean)
                lr = LR0 / (1.0 + update)
                theta = jax.tree.map(lambda p, m_, lr=lr: p - lr * m_, theta, m)
                update += 1
            cycle = []
        history.append(theta)
    return history


def test_float64_reference_with_skipped_micro_batches():
    k = 3
    params = random_tree(2)
    grads = [random_grads_like(params, 10 + s) for s in range(4 * k)]
    first = lambda t: next(iter(jax.tree.leaves(t)))
    poison = lambda g, v: jax.tree.map(
        lambda x: x.at[(0,) * x.ndim].set(v) if x is first(g) else x, g
    )
    grads[4] = poison(grads[4], np.nan)  # cycle 1: one of three skipped
    for t in (6, 7, 8):  # cycle 2: all skipped, no update
        grads[t] = poison(grads[t], np.inf if t == 7 else np.nan)
    expected = _reference(params, grads, k)
    with x64():
        sched = lambda c: LR0 / (1.0 + c)
        tx = accumulate_gradients(optax.sgd(sched, momentum=BETA), k, skip_nonfinite=True)
        p = to_f64(params)
        p = jax.tree.map(jnp.asarray, p)
        state = tx.init(p)
        step = jax.jit(tx.update)
        for t, g in enumerate(grads):
            before = state.inner_state
            u, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), g), state, p)
            p = _apply(p, u)
            assert_trees_close(p, expected[t], rtol=1e-12, atol=1e-13, err=f"micro-step {t}")
            if (t + 1) % k or t in (6, 7, 8):
                assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(u))
                jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
        assert jax.tree.leaves(state.acc_grads)[0].dtype == jnp.float64
    assert int(state.gradient_step) == 3
    assert int(state.skipped_micro_batches) == 4
    assert int(state.skipped_updates) == 1
    assert int(state.mini_step) == 0 and int(state.n_accumulated) == 0


def test_nonfinite_propagates_without_skipping():
    tx = accumulate_gradients(optax.sgd(0.1), 2)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([np.nan, 0.0, 0.0])}, state, params)
    u, state = tx.update({"w": jnp.ones(3)}, state, params)
    assert np.isnan(np.asarray(u["w"][0])) and int(state.skipped_micro_batches) == 0


# ------------------------------------------------------------------- device paths


def test_shard_map_data_parallel_step_matches_jit():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
        "b": jnp.zeros(3, jnp.float32),
    }
    batches = [
        (
            jnp.asarray(rng.standard_normal((16, 5)), jnp.float32),
            jnp.asarray(rng.standard_normal((16, 3)), jnp.float32),
        )
        for _ in range(6)
    ]
    loss = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
    tx = accumulate_gradients(optax.adamw(1e-2), 3, skip_nonfinite=True)

    def local_step(p, s, x, y):
        # the gradient of the global mean loss: invariant across devices (all-reduced)
        g = jax.grad(lambda p: jax.lax.pmean(loss(p, x, y), "data"))(p)
        u, s = tx.update(g, s, p)
        return _apply(p, u), s

    sharded = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())
        )
    )
    plain = jax.jit(
        lambda p, s, x, y: (lambda u, s: (_apply(p, u), s))(
            *tx.update(jax.grad(loss)(p, x, y), s, p)
        )
    )
    p1, s1, p2, s2 = params, tx.init(params), params, tx.init(params)
    for x, y in batches:
        p1, s1 = sharded(p1, s1, x, y)
        p2, s2 = plain(p2, s2, x, y)
    assert int(s1.gradient_step) == 2
    assert_trees_close(p1, p2, rtol=1e-5, atol=1e-6)
    assert_trees_close(s1.inner_state, s2.inner_state, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(p1["w"] - params["w"]))) > 0


# ------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("inner", ["adamw_bf16_mu", "adafactor"])
def test_bf16_params_keep_every_dtype(inner):
    params = random_tree(4, dtype=jnp.bfloat16)
    grads = [random_grads_like(params, s) for s in range(4)]
    make = {
        "adamw_bf16_mu": lambda: optax.adamw(1e-2, mu_dtype=jnp.bfloat16),
        "adafactor": lambda: optax.adafactor(1e-2),
    }[inner]
    tx = accumulate_gradients(make(), 2)
    state0 = tx.init(params)
    dtypes = lambda t: jax.tree.map(lambda x: jnp.result_type(x), t)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state0.acc_grads))
    # params and state donated, as a training loop does: no buffer may appear twice
    step = jit_once(
        lambda p, s, g: (lambda u, s: (_apply(p, u), u, s))(*tx.update(g, s, p)),
        donate_argnums=(0, 1),
    )
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for g in grads:
        p, u, s = step(p, s, g)
        assert dtypes(s) == dtypes(state0) and dtypes(p) == dtypes(params)
        assert dtypes(u) == dtypes(params)
    assert_no_recompile(tx, params, grads)


def test_explicit_accumulator_dtype():
    params = {"w": jnp.ones((2, 2), jnp.float32)}
    tx = accumulate_gradients(optax.sgd(0.1), 2, acc_dtype=jnp.bfloat16)
    state = jax.jit(tx.update)({"w": jnp.ones((2, 2))}, tx.init(params), params)[1]
    assert state.acc_grads["w"].dtype == jnp.bfloat16


# -------------------------------------------------------------------- extra args


class _RecordState(NamedTuple):
    sq_norm: jax.Array
    steps: jax.Array
    tag: jax.Array


def _recorder():
    """Scale by 1, recording the extra args it receives in its state."""

    def init(params):
        del params
        return _RecordState(
            jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32)
        )

    def update(updates, state, params=None, *, micro_grad_sq_norm, accumulation_steps, tag):
        del params, state
        return updates, _RecordState(
            micro_grad_sq_norm,
            jnp.asarray(accumulation_steps, jnp.int32),
            jnp.asarray(tag, jnp.float32),
        )

    return optax.GradientTransformationExtraArgs(init, update)


def test_extra_args_reach_the_inner_transform():
    k = 3
    params = random_tree(5)
    grads = [random_grads_like(params, 20 + s, scale=0.5 + s) for s in range(2 * k)]
    tx = accumulate_gradients(optax.chain(_recorder(), optax.sgd(0.1)), k)
    state = tx.init(params)
    step = jax.jit(lambda g, s, p, tag: tx.update(g, s, p, tag=tag))
    for t, g in enumerate(grads):
        state_before = state
        _, state = step(g, state, params, float(t))
        rec = state.inner_state[0]
        if (t + 1) % k:
            jax.tree.map(np.testing.assert_array_equal, rec, state_before.inner_state[0])
            continue
        cycle = grads[t + 1 - k : t + 1]
        sq = [
            sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(g_)) for g_ in cycle
        ]
        assert rec.sq_norm.dtype == jnp.float32
        np.testing.assert_allclose(float(rec.sq_norm), np.mean(sq), rtol=1e-6)
        assert int(rec.steps) == k and float(rec.tag) == t


def test_skipping_passes_the_number_of_accumulated_micro_batches():
    params = {"w": jnp.zeros(2)}
    tx = accumulate_gradients(optax.chain(_recorder(), optax.sgd(0.1)), 3, skip_nonfinite=True)
    state = tx.init(params)
    for g in ([3.0, 4.0], [np.nan, 0.0], [0.0, 0.0]):
        _, state = tx.update({"w": jnp.array(g)}, state, params, tag=0.0)
    rec = state.inner_state[0]
    assert int(rec.steps) == 2
    np.testing.assert_allclose(float(rec.sq_norm), 25.0 / 2)


def test_noise_scale_measured_from_micro_batches():
    from optax_ext.noise_measurement import measure_noise_scale

    k, b = 4, 16
    params = random_tree(7)
    signal = random_grads_like(params, 39, scale=2.0)  # |G|² well above the noise
    grads = [jax.tree.map(jnp.add, signal, random_grads_like(params, 40 + s)) for s in range(2 * k)]
    tx = accumulate_gradients(optax.chain(measure_noise_scale(batch_size=b), optax.sgd(0.1)), k)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        _, state = step(g, state, params)
    noise = state.inner_state[0]
    assert int(noise.count) == 2
    cycle = [to_f64(g) for g in grads[k:]]
    sq = lambda t: sum(float(np.sum(x**2)) for x in jax.tree.leaves(t))
    g2_small = np.mean([sq(g) for g in cycle])
    g2_big = sq(jax.tree.map(lambda *xs: np.mean(xs, axis=0), *cycle))
    expected = (k * b * g2_big - b * g2_small) / (k * b - b)
    np.testing.assert_allclose(float(noise.last_g2), expected, rtol=1e-5)


def test_plain_gradient_transformation_inner():
    plain = optax.GradientTransformation(
        lambda p: optax.EmptyState(), lambda u, s, p=None: (jax.tree.map(lambda x: -x, u), s)
    )
    assert not isinstance(plain, optax.GradientTransformationExtraArgs)
    tx = accumulate_gradients(plain, 2)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([1.0, 2.0])}, state, params, unused=1)
    u, state = tx.update({"w": jnp.array([3.0, 6.0])}, state, params, unused=1)
    np.testing.assert_allclose(np.asarray(u["w"]), [-2.0, -4.0])


# ------------------------------------------------------------- init, validation


def test_abstract_init():
    params = random_tree(6, dtype=jnp.bfloat16)
    abstract = abstract_init_matches(accumulate_gradients(optax.adamw(1e-3), 4), params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract.acc_grads))


@pytest.mark.parametrize(
    "k, error",
    [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError), ("2", TypeError)],
)
def test_bad_k(k, error):
    with pytest.raises(error, match="accumulation_steps must be"):
        accumulate_gradients(optax.sgd(0.1), k)

"""Noise-scale estimators and the measuring transform (McCandlish et al. 2018, arXiv
1812.06162, app. A.2).

The synthetic problem has a known answer: per-sample gradients are drawn from
N(G, Sigma) with Sigma = L L^T, batch means are taken in the test, and the transform must
recover B_simple = tr(Sigma) / |G|^2 within 10% (a) under jax.pmap over 8 devices with an
axis name and (b) through the gradient-accumulation extra arguments.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    jit_once,
)

from optax_ext import noise_measurement as transform
from scaling import noise

D_W, D_B = (8, 6), (16,)
D = 8 * 6 + 16
B_SMALL = 16
N_DEV = 8
STEPS = 300


def _problem(seed=0, b_simple=50.0):
    rng = np.random.default_rng(seed)
    g = 0.25 * rng.standard_normal(D)
    lo = rng.standard_normal((D, D)) / np.sqrt(D)
    lo *= np.sqrt(b_simple * (g @ g) / np.trace(lo @ lo.T))
    true = np.trace(lo @ lo.T) / (g @ g)
    return jnp.asarray(g, jnp.float32), jnp.asarray(lo, jnp.float32), true


def _as_tree(flat):
    return {"w": flat[:48].reshape(D_W), "b": flat[48:]}


def _batch_mean(key, g, lo, n):
    """Mean of n per-sample gradients drawn from N(g, lo lo^T)."""
    samples = g + jax.random.normal(key, (n, D)) @ lo.T
    return samples.mean(axis=0)


def _params():
    return {"w": jnp.zeros(D_W), "b": jnp.zeros(D_B)}


# ---------------------------------------------------------------------- estimators


def test_two_batch_estimates_worked():
    est = noise.two_batch_estimates(7.125, 4.390625, 32, 256)
    np.testing.assert_allclose(est, (4.0, 100.0), rtol=1e-12)
    np.testing.assert_allclose(est.trace_sigma / est.g2, 25.0, rtol=1e-12)
    # the forward model of the worked numbers: E|G_B|^2 = |G|^2 + tr(Sigma)/B
    np.testing.assert_allclose([4 + 100 / 32, 4 + 100 / 256], [7.125, 4.390625], rtol=1e-12)


def test_ema_tracker_matches_float64_reference_and_debiases():
    rng = np.random.default_rng(1)
    g2s, traces = rng.uniform(1, 2, 7), rng.uniform(10, 30, 7)
    decay = 0.9
    ema = jax.jit(lambda e, a, b: noise.noise_ema_update(e, a, b, decay))
    state = transform.noise_ema_init()
    for a, b in zip(g2s, traces, strict=True):
        state = ema(state, a, b)
    w = (1 - decay) * decay ** np.arange(6, -1, -1)
    want_g2, want_tr = (w @ g2s) / w.sum(), (w @ traces) / w.sum()
    got = noise.noise_ema_read(state)
    np.testing.assert_allclose(got.g2, want_g2, rtol=1e-5)
    np.testing.assert_allclose(got.trace_sigma, want_tr, rtol=1e-5)
    np.testing.assert_allclose(got.b_simple, (w @ traces) / (w @ g2s), rtol=1e-5)
    # Python floats take the same arithmetic
    py = noise.NoiseEMA(0.0, 0.0, 0.0)
    for a, b in zip(g2s, traces, strict=True):
        py = noise.noise_ema_update(py, float(a), float(b), decay)
    np.testing.assert_allclose(
        noise.noise_ema_read(py), (want_tr / want_g2, want_g2, want_tr), rtol=1e-12
    )


def test_ema_read_before_any_update_and_with_nonpositive_signal():
    assert np.isnan(noise.noise_ema_read(transform.noise_ema_init()).b_simple)
    assert noise.noise_ema_read(noise.NoiseEMA(1.0, -0.5, 1.0)).b_simple == float("inf")


# ----------------------------------------------------------------- the transform


def test_accumulation_args_match_float64_reference():
    """Update by update against the formulas in float64."""
    rng = np.random.default_rng(2)
    k, decay = 4, 0.8
    tx = transform.measure_noise_scale(batch_size=B_SMALL, ema=decay)
    state = tx.init(_params())
    update = jax.jit(tx.update)
    num = den = wsum = 0.0
    for _ in range(5):
        mean = rng.standard_normal(D).astype(np.float32)
        micro_sq = float(mean @ mean) + rng.uniform(1, 5)
        out, state = update(
            _as_tree(jnp.asarray(mean)),
            state,
            None,
            micro_grad_sq_norm=jnp.float32(micro_sq),
            accumulation_steps=k,
        )
        np.testing.assert_array_equal(np.concatenate([out["w"].ravel(), out["b"]]), mean)
        big = float(mean.astype(np.float64) @ mean)
        bb = k * B_SMALL
        g2 = (bb * big - B_SMALL * micro_sq) / (bb - B_SMALL)
        tr = (micro_sq - big) / (1 / B_SMALL - 1 / bb)
        num, den, wsum = (
            decay * num + (1 - decay) * tr,
            decay * den + (1 - decay) * g2,
            decay * wsum + (1 - decay),
        )
        np.testing.assert_allclose([state.last_g2, state.last_trace_sigma], [g2, tr], rtol=1e-5)
    got = transform.noise_scale(state)
    np.testing.assert_allclose(got, (num / den, den / wsum, num / wsum), rtol=1e-5)
    assert int(state.count) == 5


def test_recovers_b_simple_under_pmap_with_axis_name():
    g, lo, true = _problem()
    tx = optax.chain(transform.measure_noise_scale(B_SMALL, axis_name="i"), optax.scale(1.0))
    state0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (N_DEV, *x.shape)), tx.init(_params()))

    def run(state, keys):
        def step(carry, key):
            s, maxdiff = carry
            local = _batch_mean(key, g, lo, B_SMALL)
            updates, s = tx.update(_as_tree(local), s, _params())
            want = jax.lax.pmean(local, "i")
            got = jnp.concatenate([updates["w"].ravel(), updates["b"]])
            return (s, jnp.maximum(maxdiff, jnp.max(jnp.abs(got - want)))), None

        (state, maxdiff), _ = jax.lax.scan(step, (state, jnp.float32(0)), keys)
        return state, maxdiff

    keys = jax.random.split(jax.random.key(0), N_DEV * STEPS).reshape(N_DEV, STEPS)
    state, maxdiff = jax.pmap(run, axis_name="i")(state0, keys)
    # the updates are the gradients averaged over the axis (no pmean by the caller)
    assert float(maxdiff.max()) < 1e-6
    est = transform.noise_scale(state)  # replicated state: read from the first replica
    assert abs(float(est.b_simple) / true - 1) < 0.10, (float(est.b_simple), true)
    np.testing.assert_allclose(float(est.g2), float(g @ g), rtol=0.10)
    counts = np.asarray(
        jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, transform.NoiseScaleState))[0].count
    )
    assert (counts == STEPS).all()


def test_recovers_b_simple_with_accumulation_extra_args():
    """Simulates accumulate_gradients(inner, k): micro-batch norms and the mean gradient."""
    g, lo, true = _problem(seed=3, b_simple=200.0)
    k = 8
    tx = optax.chain(transform.measure_noise_scale(B_SMALL), optax.adamw(1e-3))

    @jax.jit
    def run(state, keys):
        def step(s, key):
            micro = jax.vmap(lambda kk: _batch_mean(kk, g, lo, B_SMALL))(jax.random.split(key, k))
            micro_sq = jnp.mean(jnp.sum(micro**2, axis=1))
            mean = micro.mean(axis=0)
            _, s = tx.update(
                _as_tree(mean), s, _params(), micro_grad_sq_norm=micro_sq, accumulation_steps=k
            )
            return s, None

        return jax.lax.scan(step, state, keys)[0]

    state = run(tx.init(_params()), jax.random.split(jax.random.key(1), STEPS))
    est = transform.noise_scale(state)
    assert abs(float(est.b_simple) / true - 1) < 0.10, (float(est.b_simple), true)


def test_axis_name_and_accumulation_together():
    """Under pmap with accumulation: small = one micro-batch (its norm averaged over the
    devices), big = k micro-batches on every device."""
    k = 4
    rng = np.random.default_rng(5)
    local = rng.standard_normal((N_DEV, D)).astype(np.float32)
    micro_sq = np.sum(local.astype(np.float64) ** 2, 1) + rng.uniform(1, 3, N_DEV)
    tx = transform.measure_noise_scale(B_SMALL, axis_name="i", ema=0.5)

    def step(grads, m):
        return tx.update(
            _as_tree(grads), tx.init(_params()), micro_grad_sq_norm=m, accumulation_steps=k
        )

    out, state = jax.pmap(step, axis_name="i")(
        jnp.asarray(local), jnp.asarray(micro_sq, jnp.float32)
    )
    mean = local.astype(np.float64).mean(0)
    np.testing.assert_allclose(
        np.concatenate([out["w"][3].ravel(), out["b"][3]]), mean, rtol=1e-5, atol=1e-6
    )
    small, big, bb = micro_sq.mean(), mean @ mean, k * B_SMALL * N_DEV
    np.testing.assert_allclose(
        state.last_g2[0], (bb * big - B_SMALL * small) / (bb - B_SMALL), rtol=1e-5
    )
    np.testing.assert_allclose(
        state.last_trace_sigma[0], (small - big) / (1 / B_SMALL - 1 / bb), rtol=1e-5
    )


def test_needs_two_batch_sizes():
    tx = transform.measure_noise_scale(8)
    with pytest.raises(ValueError, match="needs two batch sizes"):
        tx.update(_params(), tx.init(_params()))
    with pytest.raises(ValueError, match="without accumulation_steps"):
        tx.update(_params(), tx.init(_params()), micro_grad_sq_norm=1.0)


def test_one_micro_batch_leaves_the_estimate_unchanged():
    tx = transform.measure_noise_scale(8)
    state = tx.init(_params())
    grads = jax.tree.map(jnp.ones_like, _params())
    _, state = tx.update(grads, state, micro_grad_sq_norm=jnp.float32(90.0), accumulation_steps=2)
    before = transform.noise_scale(state)
    _, state = tx.update(grads, state, micro_grad_sq_norm=jnp.float32(1.0), accumulation_steps=1)
    assert int(state.count) == 2
    np.testing.assert_array_equal(transform.noise_scale(state), before)
    # the ring of raw estimates holds the measured update only
    assert int(state.measured) == 1
    g2, trace = transform.recent_estimates(state)
    np.testing.assert_array_equal([g2, trace], [[state.last_g2], [state.last_trace_sigma]])
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(state))


def test_noise_scale_finds_state_in_nested_optax_states():
    injected = optax.inject_hyperparams(transform.measure_noise_scale, static_args=("batch_size",))(
        batch_size=8, ema=0.5
    )
    tx = optax.chain(injected, optax.masked(optax.adam(1e-3), {"w": True, "b": False}))
    state = tx.init(_params())
    grads = jax.tree.map(jnp.ones_like, _params())
    _, state = jax.jit(
        lambda s: tx.update(grads, s, _params(), micro_grad_sq_norm=D + 8.0, accumulation_steps=3)
    )(state)
    # |G_small|^2 = D + 8, |G_big|^2 = D, B 8 vs 24
    want_tr = 8.0 / (1 / 8 - 1 / 24)
    want_g2 = (24 * D - 8 * (D + 8.0)) / 16
    np.testing.assert_allclose(
        transform.noise_scale(state), (want_tr / want_g2, want_g2, want_tr), rtol=1e-5
    )
    with pytest.raises(ValueError, match="found 0"):
        transform.noise_scale(optax.adam(1e-3).init(_params()))
    with pytest.raises(ValueError, match="found 2"):
        transform.noise_scale((state, state))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"batch_size must be in \(0, inf\), got 0"):
        transform.measure_noise_scale(0)
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\), got 1.0"):
        transform.measure_noise_scale(8, ema=1.0)


def test_state_can_be_donated_and_does_not_recompile():
    tx = optax.chain(transform.measure_noise_scale(8), optax.adamw(1e-3))

    def step(params, state, grads, m):
        updates, state = tx.update(grads, state, params, micro_grad_sq_norm=m, accumulation_steps=2)
        return optax.apply_updates(params, updates), state

    step = jit_once(step, donate_argnums=(0, 1))  # a second trace raises
    params, state = _params(), tx.init(_params())
    grads = jax.tree.map(jnp.ones_like, params)
    for m in (70.0, 80.0, 90.0):  # init's buffers are distinct, so donation works
        params, state = step(params, state, grads, jnp.float32(m))
    assert int(state[0].count) == 3


def test_numeric_hyperparameters_can_be_injected():
    tx = optax.inject_hyperparams(transform.measure_noise_scale)(batch_size=8.0, ema=0.5)
    state = tx.init(_params())
    grads = jax.tree.map(jnp.ones_like, _params())
    step = jax.jit(
        lambda s, b: tx.update(grads, s, micro_grad_sq_norm=D + 8.0, accumulation_steps=3)[1]
    )
    state = step(state, 0)
    np.testing.assert_allclose(
        transform.noise_scale(state).trace_sigma, 8.0 / (1 / 8 - 1 / 24), rtol=1e-5
    )


def test_abstract_init():
    tx = transform.measure_noise_scale(8, axis_name="i")
    abstract = jax.eval_shape(
        tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
    )
    assert abstract.count.dtype == jnp.int32 and abstract.ema.g2.shape == ()


# ---------------------------------------------------------------------- log file


def test_log_records_reproduce_the_transform_estimate():
    """The log of noise_log_record gives the transform's current value exactly (one
    estimator, one window) and its EMA to float32 rounding."""
    rng = np.random.default_rng(4)
    tx = transform.measure_noise_scale(B_SMALL, ema=0.95)  # a window of 20 updates
    state = tx.init(_params())
    update = jax.jit(tx.update)
    lines = []
    for step in range(50):  # past two windows: the ring has wrapped
        mean = jnp.asarray(rng.standard_normal(D), jnp.float32)
        micro_sq = jnp.float32(float(mean @ mean) + rng.uniform(0.5, 3.0))
        _, state = update(_as_tree(mean), state, micro_grad_sq_norm=micro_sq, accumulation_steps=4)
        lines.append(json.dumps(transform.noise_log_record(step, state)))
    entries = noise.read_noise_log(lines, ema=0.95)
    assert len(entries) == 50 and entries[-1].step == 49
    np.testing.assert_allclose(
        entries[-1].b_simple_ema, float(transform.noise_scale(state).b_simple), rtol=1e-4
    )
    from_log = noise.settled_noise_scale(entries, window=20)
    assert transform.current_noise_scale(state) == from_log
    assert from_log.window == 20 and from_log.previous is not None


def test_log_of_ratios_is_averaged():
    entries = noise.read_noise_log(
        ['{"step": 1, "b_simple": 10}', "", '{"step": 2, "b_simple": 20}'], ema=0.5
    )
    # debiased EMA: (0.5*0.5*10 + 0.5*20) / (0.5*0.5 + 0.5)
    np.testing.assert_allclose(entries[-1].b_simple_ema, (2.5 + 10) / 0.75, rtol=1e-12)
    assert entries[-1].line == 3


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"step": 1, "b_simple": 3}', "{not json"], "line 2: not valid JSON"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (['{"b_simple": 3}'], "line 1: 'step' must be an integer"),
        (['{"step": 1}'], "line 1: needs 'b_simple' or both"),
        (['{"step": 1, "g2": 1.0}'], "line 1: 'g2' and 'trace_sigma' must come together"),
        (['{"step": 1, "g2": "x", "trace_sigma": 1}'], "line 1: 'g2' must be a finite number"),
        (['{"step": 1, "b_simple": NaN}'], "line 1: 'b_simple' must be a finite number"),
        (['{"step": 1, "b_simple": 3}', '{"step": 2, "g2": 1, "trace_sigma": 2}'], "line 2: mixes"),
        ([], "no entries"),
    ],
)
def test_corrupt_logs_name_the_line(lines, match):
    with pytest.raises(ValueError, match=match):
        noise.read_noise_log(lines)

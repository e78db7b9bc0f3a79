"""The transform's current estimate: standard error and settled flag (optax_ext.noise_measurement).

Reference: float64 NumPy of the EMA-weighted formulas, written here: weights
w_i = (1-b) b^(t-i), B = sum w t / sum w g, spread = sum w (t - B g)^2 / sum w,
n_eff = (sum w)^2 / sum w^2, s.e. = sqrt(spread n_eff/(n_eff-1) / n_eff) / (sum w g / sum w).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.noise_measurement import current_noise_scale, measure_noise_scale, noise_scale

B_MICRO, K = 32, 4


def _run(trace_sigma, g2_true=1.0, window=50, seed=0, rel=0.2):
    """Feeds noisy squared norms with known |G|^2 and tr(Sigma) per step (one scan);
    returns the transform's state and the per-step estimates it saw (float64)."""
    rng = np.random.default_rng(seed)
    tr = np.asarray(trace_sigma, np.float64)
    small = (g2_true + tr / B_MICRO) * (1 + rel * rng.standard_normal(tr.size))
    big = np.maximum(
        (g2_true + tr / (B_MICRO * K)) * (1 + rel * rng.standard_normal(tr.size)), 1e-6
    )
    root = np.sqrt(big).astype(np.float32)
    tx = measure_noise_scale(B_MICRO, window=window)

    def body(state, xs):
        r, m = xs
        u = {"w": jnp.stack([r, jnp.float32(0)])}
        return tx.update(u, state, micro_grad_sq_norm=m, accumulation_steps=K)[1], None

    state0 = tx.init({"w": jnp.zeros(2)})
    xs = (jnp.asarray(root), jnp.asarray(small, jnp.float32))
    state = jax.jit(lambda s, x: jax.lax.scan(body, s, x)[0])(state0, xs)
    bs, bb = B_MICRO, B_MICRO * K
    big32 = root.astype(np.float64) ** 2
    small32 = small.astype(np.float32).astype(np.float64)
    seen = np.stack(
        [(bb * big32 - bs * small32) / (bb - bs), (small32 - big32) / (1 / bs - 1 / bb)], axis=1
    )
    return state, seen


def _reference(seen, decay):
    g, t = seen[:, 0], seen[:, 1]
    w = (1 - decay) * decay ** np.arange(len(g) - 1, -1, -1)
    b = (w @ t) / (w @ g)
    spread = (w @ (t - b * g) ** 2) / w.sum()
    n_eff = w.sum() ** 2 / (w @ w)
    return b, np.sqrt(spread * n_eff / (n_eff - 1) / n_eff) / ((w @ g) / w.sum())


def test_stderr_matches_float64_reference():
    state, seen = _run(np.full(300, 50.0))
    c = current_noise_scale(state, window=50)
    b, se = _reference(seen, 1 - 1 / 50)
    np.testing.assert_allclose(float(c.b_simple), b, rtol=1e-4)
    np.testing.assert_allclose(float(c.stderr), se, rtol=1e-3)
    np.testing.assert_allclose(float(noise_scale(state).b_simple), b, rtol=1e-4)
    assert int(c.window) == 50


def test_stationary_settles_and_covers_the_truth():
    hits = settled = 0
    for seed in range(12):
        state, _ = _run(np.full(300, 50.0), seed=seed)
        c = current_noise_scale(state, window=50)
        hits += abs(float(c.b_simple) - 50.0) <= 3 * float(c.stderr)
        settled += bool(c.settled)
    assert hits >= 11 and settled >= 10, (hits, settled)


def test_early_and_climbing_are_not_settled():
    state, _ = _run(np.full(60, 50.0))  # fewer than two windows
    c = current_noise_scale(state, window=50)
    assert not bool(c.settled) and np.isnan(float(c.previous))
    state, _ = _run(np.linspace(1, 400, 300), rel=0.05)  # B_simple still climbing
    c = current_noise_scale(state, window=50)
    assert not bool(c.settled)
    assert float(c.b_simple) > float(c.previous) + 2 * float(c.stderr)


def test_window_and_ema_are_one_setting():
    with pytest.raises(ValueError, match="window must be in"):
        measure_noise_scale(8, window=0.5)
    a = measure_noise_scale(8, window=100)
    b = measure_noise_scale(8, ema=0.99)
    g = {"w": jnp.ones(3)}
    sa, sb = a.init(g), b.init(g)
    for _ in range(3):
        _, sa = a.update(g, sa, micro_grad_sq_norm=jnp.float32(4.0), accumulation_steps=4)
        _, sb = b.update(g, sb, micro_grad_sq_norm=jnp.float32(4.0), accumulation_steps=4)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.allclose(x, y, equal_nan=True)), sa, sb))


def test_reads_inside_jit():
    state, _ = _run(np.full(120, 50.0))
    eager = current_noise_scale(state, window=50)
    jitted = jax.jit(lambda s: current_noise_scale(s, window=50))(state)
    np.testing.assert_allclose(jitted.b_simple, eager.b_simple)
    assert bool(jitted.settled) == bool(eager.settled)

"""The transform's current value: the ring of raw estimates read by scaling's one estimator.

Reference: float64 NumPy written here: the two-batch estimates of each update from the
float32 squared norms the transform saw, the ratio of means over the last window and the
delta-method standard error sqrt(var(t - B g) / n) / mean(g).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_ext.noise_measurement import (
    current_noise_scale,
    measure_noise_scale,
    recent_estimates,
)
from scaling import noise

B_MICRO, K = 32, 4
_SCANS = {}


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
    key = (tr.size, window)  # one compiled scan per length and window: seeds reuse it
    if key not in _SCANS:
        _SCANS[key] = jax.jit(lambda s, x: jax.lax.scan(body, s, x)[0])
    state = _SCANS[key](state0, xs)
    bs, bb = B_MICRO, B_MICRO * K
    big32 = root.astype(np.float64) ** 2
    small32 = small.astype(np.float32).astype(np.float64)
    seen = np.stack(
        [(bb * big32 - bs * small32) / (bb - bs), (small32 - big32) / (1 / bs - 1 / bb)], axis=1
    )
    return state, seen


def _reference(seen, window):
    g, t = seen[-window:, 0], seen[-window:, 1]
    b = t.mean() / g.mean()
    return b, np.sqrt(np.var(t - b * g, ddof=1) / g.size) / g.mean()


def test_current_value_matches_float64_reference_after_the_ring_wraps():
    state, seen = _run(np.full(230, 50.0))  # 230 updates through a ring of 100
    c = current_noise_scale(state)
    b, se = _reference(seen, 50)
    assert c.window == 50
    np.testing.assert_allclose(c.b_simple, b, rtol=1e-4)
    np.testing.assert_allclose(c.stderr, se, rtol=1e-3)
    pb = seen[-100:-50, 1].mean() / seen[-100:-50, 0].mean()
    np.testing.assert_allclose(c.previous, pb, rtol=1e-4)
    g2, trace = recent_estimates(state)
    assert g2.shape == (100,)
    np.testing.assert_allclose(np.stack([g2, trace], 1), seen[-100:], rtol=1e-4, atol=1e-3)


def test_the_transform_and_a_log_of_its_estimates_give_the_same_answer():
    state, _ = _run(np.linspace(20, 60, 180))
    g2, trace = recent_estimates(state)
    lines = [
        f'{{"step": {i}, "g2": {float(a)!r}, "trace_sigma": {float(b)!r}}}'
        for i, (a, b) in enumerate(zip(g2, trace, strict=True))
    ]
    from_log = noise.settled_noise_scale(noise.read_noise_log(lines), window=50)
    assert current_noise_scale(state) == from_log
    assert current_noise_scale(state).summary() == from_log.summary()


def test_stationary_settles_and_covers_the_truth():
    hits = settled = 0
    for seed in range(12):
        state, _ = _run(np.full(120, 50.0), seed=seed)
        c = current_noise_scale(state)
        hits += abs(c.b_simple - 50.0) <= 3 * c.stderr
        settled += c.settled
    assert hits >= 11 and settled >= 10, (hits, settled)


def test_early_and_climbing_are_not_settled():
    state, _ = _run(np.full(60, 50.0))  # fewer than two windows
    c = current_noise_scale(state)
    assert not c.settled and c.previous is None and c.reason.startswith("only 60 updates")
    state, _ = _run(np.linspace(1, 400, 120), rel=0.05)  # B_simple still climbing
    c = current_noise_scale(state)
    assert not c.settled and c.precise and not c.stable
    assert c.reason.startswith("still moving")


def test_window_arguments():
    state, _ = _run(np.full(120, 50.0))
    assert current_noise_scale(state, window=20).window == 20
    assert current_noise_scale(state, ema=0.95).window == 20  # the old name of a window
    with pytest.raises(ValueError, match=r"window must be in \[2, 50\], got 51"):
        current_noise_scale(state, window=51)
    with pytest.raises(ValueError, match="window must be in"):
        measure_noise_scale(8, window=0.5)
    tx = measure_noise_scale(8)
    empty = current_noise_scale(tx.init({"w": jnp.ones(3)}))
    assert empty.window == 100 and not empty.settled and empty.reason == "no update measured yet"


def test_window_and_ema_are_one_setting():
    a = measure_noise_scale(8, window=100)
    b = measure_noise_scale(8, ema=0.99)
    g = {"w": jnp.ones(3)}
    sa, sb = a.init(g), b.init(g)
    for _ in range(3):
        _, sa = a.update(g, sa, micro_grad_sq_norm=jnp.float32(4.0), accumulation_steps=4)
        _, sb = b.update(g, sb, micro_grad_sq_norm=jnp.float32(4.0), accumulation_steps=4)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), sa, sb))


def test_read_on_the_host_only():
    state, _ = _run(np.full(60, 50.0))
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(current_noise_scale)(state)

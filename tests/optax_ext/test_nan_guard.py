"""nan_guard: skip the inner step and shrink non-finite leaves, for any optimizer."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    abstract_init_matches,
    assert_trees_close,
    leaf_paths,
    poison,
    random_grads_like,
    random_tree,
    to_f64,
    x64,
)

from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.nan_guard import nan_guard


def _apply(params, updates):
    return jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)


# -------------------------------------------------------------- float64 reference


def _adam_reference(params, grads_seq, *, lr, r, catch_inf, b1=0.9, b2=0.999, eps=1e-8):
    """NumPy float64 Adam wrapped in the guard: a bad leaf (NaN, or any non-finite value
    with catch_inf) skips Adam for the whole tree and shrinks that leaf toward c (1 for
    norm scales, else 0); returns params after each step and the counters."""
    paths = [p for p, _ in leaf_paths(params)]
    theta = [np.asarray(x, np.float64) for x in jax.tree.leaves(to_f64(params))]
    m = [np.zeros_like(x) for x in theta]
    v = [np.zeros_like(x) for x in theta]
    n, skipped, shrunk, history = 0, 0, 0, []
    for grads in grads_seq:
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        bad = [bool(np.any(~np.isfinite(x)) if catch_inf else np.any(np.isnan(x))) for x in g]
        if any(bad):
            skipped += 1
            shrunk += sum(bad)
            for i, b in enumerate(bad):
                if b:
                    c = 1.0 if re.search(r"(^|/)scale$", paths[i]) else 0.0
                    theta[i] = (theta[i] - c) * r + c
        else:
            n += 1
            for i in range(len(theta)):
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
                mhat, vhat = m[i] / (1 - b1**n), v[i] / (1 - b2**n)
                theta[i] = theta[i] - lr * mhat / (np.sqrt(vhat) + eps)
        history.append([x.copy() for x in theta])
    return history, skipped, shrunk, n


def test_float64_reference_with_nan_and_inf_leaves():
    params = random_tree(3)  # has kernels, embeddings, a bias and a norm scale
    n_leaves = len(jax.tree.leaves(params))
    grads = [random_grads_like(params, s) for s in range(8)]
    grads[1] = poison(grads[1], {0: np.nan})
    grads[3] = poison(grads[3], {n_leaves - 1: np.inf, 2: -np.inf})  # the last is a scale
    grads[4] = poison(grads[4], {1: np.nan, n_leaves - 1: np.nan})
    expected, skipped, shrunk, n = _adam_reference(params, grads, lr=1e-2, r=0.9, catch_inf=True)
    with x64():
        tx = nan_guard(optax.adam(1e-2), 0.9)
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        state = tx.init(p)
        step = jax.jit(tx.update)
        for t, g in enumerate(grads):
            inner_before = state.inner_state
            u, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), g), state, p)
            p = _apply(p, u)
            for (path, a), e in zip(leaf_paths(p), expected[t], strict=True):
                np.testing.assert_allclose(
                    np.asarray(a), e, rtol=1e-12, atol=1e-13, err_msg=f"step {t} at {path}"
                )
            if t in (1, 3, 4):
                jax.tree.map(np.testing.assert_array_equal, state.inner_state, inner_before)
    assert (int(state.skipped_steps), int(state.shrunk_leaves)) == (skipped, shrunk) == (3, 5)
    assert int(state.inner_state[0].count) == n == 5 and int(state.count) == 8


def test_catch_inf_false_lets_inf_through():
    params = {"w": jnp.ones(2)}
    tx = nan_guard(optax.sgd(1.0), catch_inf=False, spike_factor=None)
    u, state = tx.update({"w": jnp.array([np.inf, 1.0])}, tx.init(params), params)
    assert np.isneginf(np.asarray(u["w"][0])) and int(state.skipped_steps) == 0
    # with the result check the infinite update is caught after the step
    checked = nan_guard(optax.sgd(1.0), catch_inf=False, check_result=True, spike_factor=None)
    u2, s2 = checked.update({"w": jnp.array([np.inf, 1.0])}, checked.init(params), params)
    np.testing.assert_array_equal(np.asarray(u2["w"]), 0.0)
    assert int(s2.skipped_steps) == 1 and int(s2.shrunk_leaves) == 0
    u, state = tx.update({"w": jnp.array([np.nan, 1.0])}, state, params)
    np.testing.assert_allclose(np.asarray(u["w"]), (0.99 - 1) * np.ones(2))
    assert int(state.skipped_steps) == 1
    # with the spike guard on (the default) an infinite gradient norm is a spike: the
    # step is skipped whole, without a shrink, even on the first step
    spiky = nan_guard(optax.sgd(1.0), catch_inf=False)
    u3, s3 = spiky.update({"w": jnp.array([np.inf, 1.0])}, spiky.init(params), params)
    np.testing.assert_array_equal(np.asarray(u3["w"]), 0.0)
    assert (int(s3.skipped_steps), int(s3.spike_steps), int(s3.shrunk_leaves)) == (1, 1, 0)


def test_centre_override():
    params = {"norm": {"scale": jnp.full(2, 3.0)}, "dense": {"kernel": jnp.full(2, 3.0)}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    for centre, want in [(None, (1.5, 2.0)), (0.5, (1.75, 1.75)), ({"kernel": 2.0}, (2.5, 1.5))]:
        tx = nan_guard(optax.sgd(0.1), 0.5, centre=centre)
        u, _ = tx.update(grads, tx.init(params), params)
        new = _apply(params, u)
        np.testing.assert_allclose(np.asarray(new["dense"]["kernel"]), want[0])
        np.testing.assert_allclose(np.asarray(new["norm"]["scale"]), want[1])


# ------------------------------------------- other inner optimizers, black-box checks


INNERS = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2),
    "tiger": lambda: tiger(1e-2, accumulation_steps=2),
}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_bad_step_keeps_inner_state_good_steps_are_the_inner_update(name):
    params = random_tree(4)
    grads = [random_grads_like(params, 30 + s) for s in range(6)]
    grads[2] = poison(grads[2], {0: np.nan})
    inner, guarded = INNERS[name](), nan_guard(INNERS[name](), 0.95, centre=0.0)
    p, s = params, guarded.init(params)
    p_ref, s_ref = params, inner.init(params)
    for t, g in enumerate(grads):
        u, s = guarded.update(g, s, p)
        p = _apply(p, u)
        if t == 2:  # the reference skips it by hand: shrink leaf 0, keep the state
            leaves, treedef = jax.tree.flatten(p_ref)
            p_ref = jax.tree.unflatten(treedef, [leaves[0] * 0.95, *leaves[1:]])
            others = jax.tree.leaves(u)[1:]
            assert all(float(jnp.max(jnp.abs(x))) == 0 for x in others)
        else:
            u_ref, s_ref = inner.update(g, s_ref, p_ref)
            p_ref = _apply(p_ref, u_ref)
        assert_trees_close(p, p_ref, rtol=1e-6, atol=1e-7, err=f"params at step {t}")
        jax.tree.map(np.testing.assert_array_equal, s.inner_state, s_ref)


# ------------------------------------------------------------------ device paths


# ------------------------------------------------- a Flax model with injected NaN/Inf


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(4)(x)


def _train(tx, poison, x, y, batches):
    """Trains the MLP for len(batches) steps in one jitted scan; the poison (steps,
    leaves) of 0/NaN/inf is added to the gradient leaves. Returns the final full-data
    loss, whether every parameter stayed finite at every step, and the last state."""
    model = _MLP()
    params = model.init(jax.random.key(0), x[:1])
    loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, xb), yb
    ).mean()

    def step(carry, inp):
        p, s, finite = carry
        idx, bad = inp
        g = jax.grad(loss)(p, x[idx], y[idx])
        leaves, treedef = jax.tree.flatten(g)
        g = jax.tree.unflatten(treedef, [leaf + bad[i] for i, leaf in enumerate(leaves)])
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(p)]))
        return (p, s, finite & ok), None

    @jax.jit
    def run(params):
        (p, s, finite), _ = jax.lax.scan(
            step, (params, tx.init(params), jnp.array(True)), (batches, poison)
        )
        return loss(p, x, y), finite, s

    final, finite, state = run(params)
    return float(final), bool(finite), state


def test_flax_training_with_injected_nan_and_inf():
    steps, n_leaves = 500, 6
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8)).astype(np.float32)
    teacher = rng.standard_normal((8, 4)).astype(np.float32)
    y = np.argmax(np.tanh(x @ teacher) + 0.1 * rng.standard_normal((512, 4)), -1)
    batches = rng.integers(0, 512, size=(steps, 64))
    poison = np.zeros((steps, n_leaves), np.float32)
    bad_steps = rng.choice(steps, size=steps // 20, replace=False)  # 5%
    poison[bad_steps, rng.integers(0, n_leaves, size=bad_steps.size)] = np.where(
        rng.random(bad_steps.size) < 0.5, np.nan, np.inf
    )
    data = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(batches))
    make = lambda: optax.adamw(3e-3, weight_decay=1e-4)

    clean, clean_finite, _ = _train(make(), jnp.zeros_like(poison), *data)
    guarded, finite, state = _train(nan_guard(make()), jnp.asarray(poison), *data)
    skip_only, skip_finite, skip_state = _train(
        optax.apply_if_finite(make(), max_consecutive_errors=steps), jnp.asarray(poison), *data
    )
    print(
        f"final loss: clean {clean:.4f}, nan_guard {guarded:.4f}, apply_if_finite {skip_only:.4f}"
    )

    assert clean_finite and finite and skip_finite
    assert clean < 0.5 * float(np.log(4))  # the model learned something
    assert abs(guarded - clean) <= 0.1 * clean
    assert int(state.skipped_steps) == int(state.shrunk_leaves) == bad_steps.size
    # apply_if_finite keeps the params finite too, but only by skipping
    assert int(skip_state.total_notfinite) == bad_steps.size
    assert abs(skip_only - clean) <= 0.1 * clean
    # without a guard the first poisoned step ruins the model
    unguarded, unguarded_finite, _ = _train(make(), jnp.asarray(poison), *data)
    assert not unguarded_finite and not np.isfinite(unguarded)


# ------------------------------------------------------------- init, validation


def test_abstract_init_on_bf16_params_and_params_required():
    params = random_tree(6, dtype=jnp.bfloat16)
    abstract_init_matches(nan_guard(optax.adamw(1e-3)), params)
    tx = nan_guard(optax.sgd(0.1))
    step = jax.jit(
        lambda p, s, g: (lambda u, s: (_apply(p, u), s))(*tx.update(g, s, p)), donate_argnums=(0, 1)
    )
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(2):  # a donated state must not hold one buffer twice
        p, s = step(p, s, params)
    assert int(s.count) == 2
    with pytest.raises(ValueError, match="nan_guard needs the params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_bad_shrink_ratio(ratio):
    with pytest.raises(ValueError, match=r"shrink_ratio must be in \(0, 1\]"):
        nan_guard(optax.sgd(0.1), ratio)


def test_bad_centre():
    with pytest.raises(TypeError, match="centre must be"):
        nan_guard(optax.sgd(0.1), centre="one")


def test_check_result_skips_steps_whose_state_would_overflow():
    """Finite gradients of 1e30 overflow Adam's g² to inf: the guard keeps the old state."""
    params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    huge = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
    clean = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for check, finite_after in ((True, True), (False, False)):
        # the spike guard's overflow check would catch these before the inner step
        tx = nan_guard(optax.adam(1e-2), check_result=check, spike_factor=None)
        state = tx.init(params)
        u, state = tx.update(huge, state, params)
        p1 = optax.apply_updates(params, u)
        state_finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state))
        assert state_finite == finite_after
        assert int(state.skipped_steps) == (1 if check else 0)
        if check:
            assert all(
                bool(jnp.all(a == b))
                for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params), strict=True)
            )
            u, state = tx.update(clean, state, p1)  # the next clean step trains normally
            moved = optax.apply_updates(p1, u)
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(moved))
            assert bool(jnp.any(moved["dense"]["kernel"] != p1["dense"]["kernel"]))


# ------------------------------------------------------------------ the spike guard


def _spike_reference(grads_seq, *, factor, warmup, decay, action, r=0.99):
    """The spike rule in float64 NumPy around SGD(lr=1): per step the update, and the
    counters (skipped, spikes, norm EMA, admitted steps) after it."""
    ema, n, spikes, skipped, out = 0.0, 0, 0, 0, []
    for grads in grads_seq:
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        bad = [not np.all(np.isfinite(x)) for x in g]
        square = sum(np.sum(x**2) for x, b in zip(g, bad, strict=True) if not b)
        # the guard sums squares in float32: beyond its range the norm is +inf
        norm = np.inf if square > np.finfo(np.float32).max else np.sqrt(square)
        threshold = factor * ema / (1 - decay**n) if n else 0.0
        spike = np.isinf(norm) or (n >= warmup and threshold > 0 and norm > threshold)
        clip = spike and action == "clip" and np.isfinite(norm)
        skip = any(bad) or (spike and not clip)
        scale = threshold / factor / norm if clip else 1.0  # to the average norm
        updates = [np.zeros_like(x) if skip else -scale * x for x in g]
        updates = [(r - 1) * 1.0 if b else u for u, b in zip(updates, bad, strict=True)]
        if not any(bad) and np.isfinite(norm):
            ema = decay * ema + (1 - decay) * (threshold if spike else norm)
            n += 1
        spikes, skipped = spikes + spike, skipped + skip
        out.append((updates, skipped, spikes, ema, n))
    return out


def _spiky_grads(params, steps, spikes: dict[int, float], nan_at=()):
    """Random gradients whose norm drifts by 10x over the run, times ``spikes[t]`` at
    step t, with a NaN leaf at the steps ``nan_at``."""
    out = []
    for t in range(steps):
        g = random_grads_like(params, 500 + t, scale=float(10 ** (t / steps)) * spikes.get(t, 1.0))
        out.append(poison(g, {0: np.nan}) if t in nan_at else g)
    return out


@pytest.mark.parametrize("action", ["skip", "clip"])
def test_spike_guard_matches_float64_reference(action):
    params = jax.tree.map(jnp.ones_like, random_tree(7))  # centre 0 or 1: shrink known
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x if "scale" in str(p[-1]) else jnp.ones_like(x), params
    )
    # x1e30 during the warm-up (its norm overflows: caught), x1e4 after it (caught),
    # x1e3 right after (the threshold the spike raised lets it through), x50 (below the
    # threshold), x1e6 later (caught)
    steps = 40
    spikes = {2: 1e30, 12: 1e4, 13: 1e3, 20: 50.0, 30: 1e6}
    grads = _spiky_grads(params, steps, spikes, nan_at=(5, 25))
    want = _spike_reference(grads, factor=1e3, warmup=8, decay=0.9, action=action)
    tx = nan_guard(optax.sgd(1.0), spike_warmup=8, spike_decay=0.9, spike_action=action)
    state = tx.init(params)
    step = jax.jit(tx.update)
    fired = []
    for t, (g, (updates, skipped, n_spikes, ema, n)) in enumerate(zip(grads, want, strict=True)):
        # the shrink of a bad leaf (centre 1 for norm scales, 0 otherwise) is known: the
        # leaf is reset to ones before the step, so its update is (r - 1) * (1 - c)
        u, state = step(g, state, params)
        for (path, got), w, bad in zip(
            leaf_paths(u), updates, jax.tree.leaves(_poison_mask(g)), strict=True
        ):
            if bad:
                w = (0.99 - 1) * (0.0 if path.endswith("scale") else 1.0) * np.ones_like(w)
            np.testing.assert_allclose(got, w, rtol=2e-6, atol=1e-30, err_msg=f"{t} {path}")
        assert (int(state.skipped_steps), int(state.spike_steps), int(state.norm_steps)) == (
            skipped,
            n_spikes,
            n,
        ), f"counters at step {t}"
        np.testing.assert_allclose(float(state.norm_ema), ema, rtol=1e-5)
        fired.append(n_spikes)
    assert fired[-1] == 3 and int(state.skipped_steps) == (5 if action == "skip" else 3)


def _poison_mask(tree):
    return jax.tree.map(lambda x: not bool(jnp.all(jnp.isfinite(x))), tree)


def test_spike_guard_counts_the_spike_once():
    """(The same on every device path, compiled once: the row nan_guard-spike of
    tests/test_device_paths.py.)"""
    params = random_tree(8, max_leaves=3)
    grads = [random_grads_like(params, s, scale=1e5 if s == 3 else 1.0) for s in range(5)]
    tx = nan_guard(optax.adam(1e-2), spike_warmup=2)
    _, state = jax.jit(lambda s: _run_all(tx, params, grads))(None)
    assert int(state.spike_steps) == 1 and int(state.skipped_steps) == 1


def _run_all(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = _apply(params, u)
    return params, state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike_factor": 1.0}, r"spike_factor must be in \(1, inf\)"),
        ({"spike_factor": float("nan")}, "spike_factor"),
        ({"spike_warmup": 0}, "spike_warmup must be an int >= 1"),
        ({"spike_warmup": 2.5}, "spike_warmup must be an int"),
        ({"spike_decay": 1.0}, r"spike_decay must be in \[0, 1\)"),
        ({"spike_action": "drop"}, r"spike_action must be one of \['skip', 'clip'\]"),
    ],
)
def test_bad_spike_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nan_guard(optax.sgd(0.1), **kwargs)


# ----------------------------------------------------- the shared per-leaf check


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_check_leaves_flags_and_squares_from_one_read(jit):
    """spike.check_leaves: NaN and ±inf flagged, finite entries whose squares overflow
    (the exact check inside its lax.cond) are not, and the sums of squares are each
    leaf's, in float32 whatever the leaf's dtype."""
    from optax_ext.wrappers import spike

    leaves = [
        jnp.array([1.0, 2.0, 3.0]),
        jnp.array([1.0, np.nan]),
        jnp.array([np.inf, 1.0]),
        jnp.array([-np.inf, np.inf]),
        jnp.array([1e20, -1e20]),  # finite: its squares overflow float32
        jnp.array([0.5, 0.25], jnp.bfloat16),
        jnp.zeros((0,)),
    ]
    check = jax.jit(spike.check_leaves, static_argnums=1) if jit else spike.check_leaves
    got = check(leaves, True)
    assert [bool(b) for b in got.bad] == [False, True, True, True, False, False, False]
    # the stacked flags, and the count and norm reduced from them, say the same
    assert np.asarray(got.stacked).tolist() == [bool(b) for b in got.bad]
    assert int(got.count()) == 3
    assert np.isinf(got.norm())  # the finite 1e20 leaf is not flagged, and its squares overflow
    assert got.squares.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got.squares)[[0, 5, 6]], [14.0, 0.3125, 0.0])
    assert np.isnan(got.squares[1]) and np.isinf(got.squares[2:5]).all()
    # NaN only: exactly the leaves holding a NaN (+inf beside -inf is no NaN)
    nan_only = check(leaves, False)
    assert [bool(b) for b in nan_only.bad] == [False, True, False, False, False, False, False]
    assert np.asarray(nan_only.stacked).tolist() == [bool(b) for b in nan_only.bad]
    assert int(nan_only.count()) == 1
    # with every sum finite the exact check is not needed, and the flags stay False
    assert not any(bool(b) for b in check([leaves[0], leaves[5]], True).bad)
    # the guard's norm over the leaves it keeps
    keep = [leaves[0], leaves[5]]
    flags = [got.bad[0], got.bad[5], True]
    checked = check(keep + [leaves[1]], True)
    np.testing.assert_allclose(float(spike.masked_sq_norm(checked.squares, flags)), 14.3125)
    np.testing.assert_allclose(float(checked.norm()) ** 2, 14.3125, rtol=1e-6)

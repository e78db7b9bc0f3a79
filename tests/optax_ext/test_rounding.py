"""Stochastic rounding, Kahan summation and pure bf16: unbiased, exact through
``optax.apply_updates``, reproducible, and the steady states round-to-nearest misses."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import (
    flax_like_params,
    random_grads_like,
)

from optax_ext.optimizers.lion import lion, scale_by_lion
from optax_ext.optimizers.sgdm import scale_by_sgdm
from optax_ext.optimizers.tiger import scale_by_tiger, tiger
from optax_ext.wrappers.precision import pure_bf16
from optax_ext.wrappers.rounding import (
    kahan_summation,
    leaf_key,
    stochastic_round,
    stochastic_round_to,
)

BF16, F16 = jnp.bfloat16, jnp.float16

# ------------------------------------------------------------ NumPy neighbours


def neighbours(x, dtype):
    """(lo, hi): the representable values of ``dtype`` just below and above float64 ``x``,
    from NumPy/ml_dtypes' own casts and nextafter (lo == hi when x is representable)."""
    np_dtype = ml_dtypes.bfloat16 if dtype == BF16 else np.float16
    near = np.asarray(x, np.float32).astype(np_dtype)
    near64 = near.astype(np.float64)
    up = np.nextafter(near, np.asarray(np.inf, np_dtype)).astype(np.float64)
    down = np.nextafter(near, np.asarray(-np.inf, np_dtype)).astype(np.float64)
    lo = np.where(near64 > x, down, near64)
    hi = np.where(near64 < x, up, near64)
    return lo, hi


# one value in each of several binades, each between two representable values
BINADE_VALUES = {
    BF16: [1.0 + 2.0**-10, -3.7e-3, 417.3, 6.1e-30, -1.0009e5],
    F16: [1.0 + 2.0**-13, -3.7e-3, 417.3, -1.0009e4, 2.0**-17 * 1.3],  # last: subnormal
}


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_sr_is_unbiased_across_binades(dtype):
    n = 40_000
    rounding = jax.jit(stochastic_round_to, static_argnums=1)
    for i, v in enumerate(BINADE_VALUES[dtype]):
        x32 = np.float32(v)
        draws = rounding(jnp.full(n, x32), dtype, jax.random.key(i))
        assert draws.dtype == dtype
        d = np.asarray(draws.astype(jnp.float32), np.float64)
        lo, hi = map(float, neighbours(np.float64(x32), dtype))
        assert lo < x32 < hi, f"{v} should lie between two {dtype.__name__} values"
        assert set(np.unique(d)) <= {lo, hi}, f"{v}: draws off the two neighbours"
        p = (np.float64(x32) - lo) / (hi - lo)
        standard_error = (hi - lo) * np.sqrt(p * (1 - p) / n)
        assert abs(d.mean() - x32) < 4 * standard_error, (v, d.mean(), x32, standard_error)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_sr_keeps_representable_values_and_specials(dtype):
    rng = np.random.default_rng(0)
    exact = rng.standard_normal(1000).astype(np.float32)
    exact = np.asarray(jnp.asarray(exact).astype(dtype).astype(jnp.float32))
    rounding = jax.jit(stochastic_round_to, static_argnums=1)
    out = rounding(jnp.asarray(exact), dtype, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), exact)
    special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0, -0.0], jnp.float32)
    out = np.asarray(rounding(special, dtype, jax.random.key(2)).astype(jnp.float32))
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])
    assert out[3] == 0 and out[4] == 0 and np.signbit(out[4])


def test_sr_to_float32_is_a_cast():
    x = jnp.linspace(-1, 1, 7)
    np.testing.assert_array_equal(stochastic_round_to(x, jnp.float32, jax.random.key(0)), x)


# ---------------------------------------------------- exactness through apply_updates


def _sr_chain_once(params, updates, seed=0):
    tx = stochastic_round(seed)
    state = tx.init(params)
    new_updates, state = tx.update(updates, state, params)
    return new_updates, state


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_apply_updates_lands_exactly_on_the_stochastic_rounding(dtype):
    rng = np.random.default_rng(3)
    n = 4000
    p = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 2, n)
    p[:50] = 1e-6 * rng.standard_normal(50)  # tiny weights with large steps
    rel = 10.0 ** rng.uniform(-5, 0, n)
    u = p * rel * rng.choice([-1, 1], n)
    u[:50] = rng.standard_normal(50)
    params = {"w": jnp.asarray(p, jnp.float32).astype(dtype)}
    updates = {"w": jnp.asarray(u, jnp.float32)}
    new_updates, _ = _sr_chain_once(params, updates, seed=7)
    assert new_updates["w"].dtype == jnp.float32
    got = optax.apply_updates(params, new_updates)["w"]
    assert got.dtype == dtype
    p32 = params["w"].astype(jnp.float32)
    key = leaf_key(jax.random.key_data(jax.random.key(7)), jnp.int32(0), 0, 0)
    want = stochastic_round_to(p32 + updates["w"], dtype, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and it is one of the two neighbours of the exact float64 sum
    exact = np.asarray(p32, np.float64) + np.asarray(updates["w"], np.float64)
    lo, hi = neighbours(exact, dtype)
    g = np.asarray(got.astype(jnp.float32), np.float64)
    close = np.abs(exact) > 1e-30
    assert np.all((g == lo) | (g == hi) | ~close)


def test_float32_params_are_untouched_and_mixed_trees_work():
    params = {"a": jnp.ones(5, jnp.float32), "b": jnp.ones(5, BF16)}
    updates = {"a": jnp.full(5, 1e-4), "b": jnp.full(5, 1e-4)}
    new, _ = _sr_chain_once(params, updates)
    np.testing.assert_array_equal(new["a"], updates["a"])
    assert new["b"].dtype == jnp.float32


def test_bit_reproducible_for_a_seed_and_different_across_seeds():
    params = {"w": jnp.ones(2000, BF16), "v": -jnp.ones((40, 50), BF16)}
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, jnp.float32), params)

    def run(seed):
        tx = optax.chain(optax.sgd(1.0), stochastic_round(seed))
        state, p = tx.init(params), params
        step = jax.jit(lambda p, s: _step(tx, p, s, grads))
        for _ in range(3):
            p, state = step(p, state)
        return p

    a, b, c = run(1), run(1), run(2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(np.any(x != z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c), strict=True))


def _step(tx, p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s


# ------------------------------------------------------------------------ Kahan


def test_kahan_recovers_updates_that_round_to_nearest_drops():
    n_steps, lr = 200, 1e-4  # each step is 1/20 of an ulp of 1 in bf16 (2^-8 below 1)
    params = {"w": jnp.ones(8, BF16), "f32": jnp.ones(3)}
    grads = {"w": jnp.ones(8, BF16), "f32": jnp.ones(3)}
    results = {}
    for name, last in [("nearest", optax.identity()), ("kahan", kahan_summation())]:
        tx = optax.chain(optax.sgd(lr), last)
        state, p = tx.init(params), params
        step = jax.jit(lambda p, s, tx=tx: _step(tx, p, s, grads))
        for _ in range(n_steps):
            p, state = step(p, state)
        results[name] = p
    want = 1.0 - n_steps * lr  # 0.98 in float64
    assert np.all(np.asarray(results["nearest"]["w"], np.float64) == 1.0)
    w = np.asarray(results["kahan"]["w"].astype(jnp.float32), np.float64)
    assert np.all(np.abs(w - want) <= 2.0**-9), (w, want)  # half an ulp below 1
    assert state[1].compensation["f32"] == optax.MaskedNode()
    np.testing.assert_allclose(results["kahan"]["f32"], results["nearest"]["f32"])


# ------------------------------------------------- the weight-decay steady state


def _decay_walk(last, steps, eta, lam, n=2048, dtype=BF16):
    """θ ← θ - η(s + λθ), s = ±1 noise, with ``last`` choosing how it is added."""
    theta0 = jnp.asarray(
        np.random.default_rng(0).standard_normal(n) * np.sqrt(eta / (2 * lam)), jnp.float32
    ).astype(dtype)
    tx = last if last is not None else optax.identity()
    state = tx.init(theta0)

    def body(carry, key):
        theta, state = carry
        s = jax.random.rademacher(key, (n,), jnp.float32)
        u = -eta * (s + lam * theta.astype(jnp.float32))
        u, state = tx.update(u, state, theta)
        return (optax.apply_updates(theta, u), state), None

    keys = jax.random.split(jax.random.key(1), steps)
    (theta, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, keys))((theta0, state))
    return float(jnp.sqrt(jnp.mean(jnp.square(theta.astype(jnp.float32)))))


def test_weight_decay_steady_state_sr_and_kahan_reach_round_to_nearest_misses():
    # ηλ = 1e-3 relative decay per step is under half a bf16 ulp (>= 2^-9 ~ 1.95e-3).
    # The walk starts at the steady state; 3000 steps are ~3 decay times 1/(ηλ) = 1024,
    # where a decay lost to rounding has already grown the RMS ~sqrt(1 + 3000/512)-fold
    eta, lam, steps = 2.0**-8, 0.25, 3000
    target = np.sqrt(eta / (2 * lam))  # RMS(θ) = sqrt(η / 2λ)
    f32 = _decay_walk(None, steps, eta, lam, dtype=jnp.float32)
    nearest = _decay_walk(None, steps, eta, lam)
    sr = _decay_walk(stochastic_round(0), steps, eta, lam)
    kahan = _decay_walk(kahan_summation(), steps, eta, lam)
    assert abs(f32 / target - 1) < 0.1, (f32, target)
    assert abs(sr / target - 1) < 0.1, (sr, target)
    assert abs(kahan / target - 1) < 0.1, (kahan, target)
    assert nearest / target > 1.8, (nearest, target)  # decay lost: a random walk


# ---------------------------------------------------------------- pure bf16


def test_pure_bf16_stores_state_in_bf16_and_leaves_scalars():
    params = jax.tree.map(lambda x: x.astype(BF16), flax_like_params(0))
    inner = optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, weight_decay=0.1
    )
    tx = pure_bf16(inner)
    state = tx.init(params)
    adam = state.inner_state.inner_state[0]
    assert all(x.dtype == BF16 for x in jax.tree.leaves(adam.mu) + jax.tree.leaves(adam.nu))
    assert state.inner_state.hyperparams["learning_rate"].dtype == jnp.float32
    assert adam.count.dtype == jnp.int32
    grads = random_grads_like(params, 1)
    step = jax.jit(lambda p, s: _step(tx, p, s, grads))
    p, s = step(params, state)
    s.inner_state.hyperparams["learning_rate"] = jnp.float32(0.0)
    p2, _ = step(p, s)  # a traced hyperparameter still works: lr 0 moves nothing
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(x.dtype == BF16 for x in jax.tree.leaves(p))


def test_pure_bf16_state_is_unbiased_where_nearest_stalls():
    """An EMA m ← 0.99 m + 0.01 g with g = 1: in bf16 with round-to-nearest the increment
    0.01 (1 - m) drops below half an ulp once m > ~0.8 and m stalls; stochastically
    rounded it keeps approaching 1 (in the mean)."""
    params = {"w": jnp.zeros(4096, BF16)}
    grads = {"w": jnp.ones(4096, BF16)}
    mu = {}
    for name, tx in [
        ("nearest", lion(0.0, b1=0.9, b2=0.99, weight_decay=0.0)),
        ("sr", pure_bf16(lion(0.0, b1=0.9, b2=0.99, weight_decay=0.0))),
    ]:
        state = tx.init(params)
        step = jax.jit(lambda p, s, tx=tx: _step(tx, p, s, grads))
        p = params
        for _ in range(500):
            p, state = step(p, state)
        inner = state.inner_state if name == "sr" else state
        mu[name] = float(inner[0].mu["w"].astype(jnp.float32).mean())
    want = 1 - 0.99**500  # 0.9934
    assert mu["nearest"] < 0.9, mu
    assert abs(mu["sr"] - want) < 2e-3, (mu, want)


# ----------------------------------------------------------------------- input

# (device paths, abstract init and one compile of tiger+stochastic_round, lion+kahan,
# pure_bf16(tiger) and pure_bf16(lion, kahan): tests/test_device_paths.py)


def test_bad_arguments_and_missing_params():
    with pytest.raises(ValueError, match="seed"):
        stochastic_round(seed=-1)
    with pytest.raises(ValueError, match="summation"):
        pure_bf16(tiger(), summation="pairwise")
    with pytest.raises(ValueError, match="dtype"):
        pure_bf16(tiger(), dtype=jnp.float32)
    with pytest.raises(ValueError, match="seed"):
        pure_bf16(tiger(), seed=-2)
    params = {"w": jnp.ones(3, BF16)}
    for tx in (stochastic_round(), kahan_summation(), pure_bf16(optax.sgd(0.1))):
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


# ------------------------------------------------ a bf16 momentum that does not stall

#: name: (direction with a bf16 momentum, steps, the float32 momentum's value after
#: them with g = 1, a bound round-to-nearest stays under, SR's tolerance)
STALLING = {
    # m ← 0.99 m + 0.01 g: the increment 0.01 (1 - m) is under half an ulp once m > ~0.8
    "lion": (lambda r: scale_by_lion(0.9, 0.99, mu_dtype=BF16, state_rounding=r), 500,
             1 - 0.99**500, 0.9, 2e-3),
    "tiger": (lambda r: scale_by_tiger(0.99, mu_dtype=BF16, state_rounding=r), 500,
              1 - 0.99**500, 0.9, 2e-3),
    # m ← 0.999 m + g heads for 1000; half an ulp is 1 in [256, 512): m stalls near 256
    "sgdm": (lambda r: scale_by_sgdm(0.999, mu_dtype=BF16, state_rounding=r), 1000,
             1000 * (1 - 0.999**1000), 400, 0.01 * 1000 * (1 - 0.999**1000)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(STALLING))
def test_bf16_momentum_written_stochastically_does_not_stall(name):
    """With g = 1 and round-to-nearest a bf16 momentum stops moving once its increment
    falls under half an ulp; written with stochastic rounding it follows the float32
    value in the mean. Float32 params: only the state is bf16."""
    make, steps, want, nearest_below, tolerance = STALLING[name]
    params = {"w": jnp.zeros(4096)}
    grads = {"w": jnp.ones(4096)}
    means = {}
    for rounding in ("nearest", "stochastic"):
        tx = make(rounding)
        state = tx.init(params)
        step = jax.jit(lambda s, tx=tx: tx.update(grads, s, params)[1])
        for _ in range(steps):
            state = step(state)
        assert state.mu["w"].dtype == BF16
        means[rounding] = float(state.mu["w"].astype(jnp.float32).mean())
    assert means["nearest"] < nearest_below, means
    assert abs(means["stochastic"] - want) < tolerance, (means, want)


# ------------------------------------------------ float16 states and second moments


def _adam_reference(g, steps, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """optax.adam's updates for a constant gradient ``g``, in float64 NumPy."""
    m = v = np.zeros_like(g, np.float64)
    out = []
    for t in range(1, steps + 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("g", [1e-5, 1e-3, 1e3], ids=["g=1e-5", "g=1e-3", "g=1e3"])
def test_pure_bf16_float16_state_keeps_adams_second_moment_in_range(g):
    """With ``dtype=float16`` Adam's ν ≈ 1e-3 g² is under f16's smallest subnormal (6e-8)
    for small gradients: stored in f16 it rounds to 0 on most steps and the step
    m/(√ν + ε) grew to 13× Adam's by step 200 (g = 1e-5); for g = 1e3 ν passes f16's
    65504 and the step is 0. Second moments are stored in bf16, so every step follows
    float64 Adam while the momentum keeps f16."""
    steps = 200
    params = {"w": jnp.ones(128)}
    grads = {"w": jnp.full(128, g, jnp.float32)}
    tx = pure_bf16(optax.adam(1e-3), dtype=F16)
    state = tx.init(params)
    step = jax.jit(lambda s: tx.update(grads, s, params))
    want = _adam_reference(np.full(128, np.float32(g), np.float64), steps)
    for t in range(steps):
        updates, state = step(state)
        if t + 1 in (1, 10, 100, 200):
            u = np.asarray(updates["w"], np.float64)
            np.testing.assert_allclose(u, want[t], rtol=0.03, err_msg=f"step {t + 1}")
            assert abs(u.mean() / want[t].mean() - 1) < 0.01, (t + 1, u.mean(), want[t].mean())
    adam = state.inner_state[0]
    assert adam.mu["w"].dtype == F16 and adam.nu["w"].dtype == BF16


def test_pure_bf16_second_moments_pattern():
    params = {"w": jnp.ones(4)}
    inner = optax.adafactor(1e-3, min_dim_size_to_factor=2)
    state = pure_bf16(inner, dtype=F16).init({"w": jnp.ones((4, 4))})
    factored = [x for x in jax.tree.leaves(state.inner_state) if getattr(x, "ndim", 0) >= 1]
    assert factored and all(x.dtype == BF16 for x in factored)  # v_row, v_col, v
    state = pure_bf16(optax.adam(1e-3), dtype=F16, second_moments=lambda path: False).init(params)
    assert state.inner_state[0].nu["w"].dtype == F16  # told otherwise
    state = pure_bf16(optax.adam(1e-3), dtype=F16, second_moments=r"(^|/)mu(/|$)").init(params)
    assert state.inner_state[0].mu["w"].dtype == BF16 and state.inner_state[0].nu["w"].dtype == F16
    with pytest.raises(ValueError, match="second_moments"):
        pure_bf16(optax.adam(1e-3), dtype=F16, second_moments="(")
    with pytest.raises(ValueError, match="second_moments"):
        pure_bf16(optax.adam(1e-3), second_moments=3)


# ------------------------------------------------------------------- seed range


@pytest.mark.parametrize("seed", [2**32, 2**32 + 5, 2**40, 2**63, 2**70])
def test_seeds_past_32_bits_are_refused_by_name(seed):
    """``jax.random.key`` keeps a seed's low 32 bits: 2**32 drew the same bits as 0, and
    2**63 overflowed inside JAX without naming the argument."""
    with pytest.raises(ValueError, match=r"seed must be an int with 0 <= seed < 2\*\*32"):
        stochastic_round(seed)
    with pytest.raises(ValueError, match=r"seed must be an int with 0 <= seed < 2\*\*32"):
        pure_bf16(tiger(), seed)
    params = {"w": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"rounding_seed must be an int with 0 <= rounding_seed"):
        tx = lion(1e-3, mu_dtype=BF16, state_rounding="stochastic", rounding_seed=seed)
        tx.update(params, tx.init(params), params)


def test_the_largest_seed_is_accepted_and_distinct():
    key = lambda seed: tuple(np.asarray(stochastic_round(seed).init(None).key).tolist())
    assert len({key(0), key(1), key(2**32 - 1)}) == 3
    top = pure_bf16(tiger(), np.uint32(2**32 - 1)).init({}).key
    assert np.asarray(top).tolist() == [0, 2**32 - 1]


# ------------------------------------------------- Kahan after a non-finite update


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda lr: optax.chain(optax.sgd(lr), kahan_summation()), id="kahan"),
        pytest.param(lambda lr: pure_bf16(optax.sgd(lr), summation="kahan"), id="pure_bf16"),
    ],
)
def test_kahan_recovers_after_a_non_finite_update(make):
    """A NaN in one element's update and +inf in another's at step 5; the caller keeps the
    old weight where the new one is not finite (a guard). The compensation used to stay
    NaN for good and those weights never moved again; now it restarts from 0 and the
    sum matches float64 to the Kahan bound plus the half ulp lost at the reset."""
    n_steps, lr, bad = 200, 1e-4, 5
    params = {"w": jnp.ones(8, BF16)}
    clean = {"w": jnp.ones(8, jnp.float32)}
    poisoned = {"w": clean["w"].at[0].set(jnp.nan).at[1].set(jnp.inf)}
    tx = make(lr)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        new = optax.apply_updates(p, u)
        return jax.tree.map(lambda n, o: jnp.where(jnp.isfinite(n), n, o), new, p), s

    step = jax.jit(step)
    p, state = params, tx.init(params)
    for t in range(n_steps):
        p, state = step(p, state, poisoned if t == bad else clean)
    w = np.asarray(p["w"].astype(jnp.float32), np.float64)
    want = 1.0 - lr * np.array([n_steps - 1] * 2 + [n_steps] * 6)  # the bad step skipped
    assert np.all(np.abs(w[2:] - want[2:]) <= 2.0**-9), (w, want)  # as without the fault
    assert np.all(np.abs(w[:2] - want[:2]) <= 2.0**-8), (w, want)  # + half an ulp at 1
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(state))


# ------------------------------------------------- float32 subnormals


def test_sr_of_float32_subnormals_unbiased_bits_flushed_arithmetic():
    """The bf16 rounding is integer arithmetic on the bits, so a float32 subnormal is
    rounded without bias; read back bit-exactly (NumPy) the draws average x. XLA:CPU
    flushes subnormals in float arithmetic: there a mean of the same draws is 0, the f16
    path gives ±0, and p + u in stochastic_round loses the step."""
    n = 40_000
    for i, v in enumerate([1e-40, -3.3e-39]):
        x32 = np.float32(v)
        assert 0 < abs(x32) < np.finfo(np.float32).smallest_normal
        draws = stochastic_round_to(jnp.asarray(np.full(n, x32)), BF16, jax.random.key(i))
        d = np.asarray(draws).astype(np.float64)  # ml_dtypes' conversion: no flushing
        lo, hi = map(float, neighbours(np.float64(x32), BF16))
        assert lo < x32 < hi and set(np.unique(d)) <= {lo, hi}, (v, np.unique(d))
        p = (np.float64(x32) - lo) / (hi - lo)
        standard_error = (hi - lo) * np.sqrt(p * (1 - p) / n)
        assert abs(d.mean() - x32) < 4 * standard_error, (v, d.mean(), standard_error)
        if jax.default_backend() == "cpu":  # the documented flush-to-zero
            assert float(jnp.mean(draws.astype(jnp.float32))) == 0.0
            f16 = stochastic_round_to(jnp.asarray(np.full(n, x32)), F16, jax.random.key(i))
            assert not np.asarray(f16).astype(np.float64).any()
            params = {"w": jnp.zeros(n, BF16)}
            u, _ = _sr_chain_once(params, {"w": jnp.asarray(np.full(n, x32))})
            assert not np.asarray(optax.apply_updates(params, u)["w"]).astype(np.float64).any()

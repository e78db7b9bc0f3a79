"""Spectral pieces (mclip, spectral norm, spectral decay, Post-Clip, the monitor) against a
float64 NumPy SVD."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    _data_sharding,
    assert_trees_close,
    jit_once,
    with_singular_values,
    x64,
)
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_ext.optimizers.muon import muon, muon_labels
from optax_ext.wrappers.spectral import (
    ClipSingularValuesState,
    SpectralDecayState,
    add_spectral_decay,
    clip_singular_values,
    mclip,
    random_matrix_entropy,
    spectral_norm,
    spectral_stats,
)

# ------------------------------------------------------------- float64 references


def ref_mclip(m, c):
    """U min(Σ, c) Vᵀ by a float64 SVD, over the last two axes."""
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    return np.einsum("...ik,...k,...kj->...ij", u, np.minimum(s, c), vt)


def svals(m):
    """Singular values in float64, descending, over the last two axes."""
    return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)


def ref_top_term(w):
    """σ₁ u₁ v₁ᵀ of a float64 matrix."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return s[0] * np.outer(u[:, 0], vt[0])


def ref_entropy(w):
    """-Σ p log p / log k with p = σ²/Σσ² (float64 SVD)."""
    s2 = svals(w) ** 2
    p = s2 / s2.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(s2)))


def wide_spectrum(k, c):
    """k singular values spread geometrically over [1e-3, 10]·c."""
    return np.geomspace(1e-3, 10.0, k) * c


# ------------------------------------------------------------------------- mclip


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 24)], ids=str)
@pytest.mark.parametrize("c", [0.5, 2.0])
def test_mclip_against_the_svd_over_a_wide_spectrum(shape, c):
    k = min(shape[-2:])
    batch = int(np.prod(shape[:-2]))
    m = np.stack(
        [with_singular_values(wide_spectrum(k, c), *shape[-2:], seed=b) for b in range(batch)]
    ).reshape(shape)
    got = np.asarray(mclip(jnp.asarray(m, jnp.float32), c), np.float64)
    assert got.shape == shape
    want = ref_mclip(m, c)
    s_in = svals(m).reshape(-1, k)
    s_out = svals(got).reshape(-1, k)
    assert s_out.max() <= 1.05 * c
    small = s_in < c / 2
    # singular values below c/2 move by <= 5% of themselves (measured: ~1e-3 at 1e-3·c)
    assert np.all(np.abs(s_out[small] - s_in[small]) <= 0.05 * s_in[small])
    # the whole matrix: float32 rounding of the two msigns
    err = np.linalg.norm(got - want, ord=2, axis=(-2, -1)).max()
    assert err <= 1e-4 * c, err


def test_mclip_bf16_compute_stays_within_bf16_rounding():
    c = 1.0
    m = with_singular_values(wide_spectrum(32, c), 32, 48, seed=3)
    got = mclip(jnp.asarray(m, jnp.float32), c, compute_dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    s_out, s_in = svals(got), svals(m)
    assert s_out.max() <= 1.05 * c
    # bf16's rounding (2^-9 relative) moves every value by about 1e-2·c at most: the values
    # in [0.1c, c/2] stay within 5% of themselves, all below c within 0.02c
    mid = (s_in >= 0.1 * c) & (s_in < c / 2)
    assert np.all(np.abs(s_out[mid] - s_in[mid]) <= 0.05 * s_in[mid])
    below = s_in < c
    assert np.all(np.abs(s_out[below] - s_in[below]) <= 0.02 * c)
    # a bf16 matrix comes back in bf16
    assert mclip(jnp.asarray(m, jnp.bfloat16), c).dtype == jnp.bfloat16


def test_mclip_keeps_a_matrix_inside_the_ball_and_zero():
    m = with_singular_values(np.linspace(0.05, 0.9, 12), 12, 20, seed=4)
    got = np.asarray(mclip(jnp.asarray(m, jnp.float32), 1.0), np.float64)
    np.testing.assert_allclose(got, m, atol=1e-5)
    assert float(jnp.abs(mclip(jnp.zeros((4, 6)), 1.0)).max()) == 0.0
    assert bool(jnp.all(jnp.isnan(mclip(jnp.ones((4, 6)).at[1, 2].set(jnp.nan), 1.0))))
    # entries near float32's maximum: the Gram matrix is formed after scaling, no overflow
    big = mclip(jnp.asarray(m * 1e30, jnp.float32), 1e30)
    np.testing.assert_allclose(np.asarray(big, np.float64) / 1e30, m, atol=1e-5)


def test_mclip_under_jit_and_sharded():
    m = jnp.asarray(with_singular_values(wide_spectrum(16, 1.0), 16, 32, seed=5), jnp.float32)
    want = mclip(m, 1.0)
    np.testing.assert_allclose(jax.jit(mclip)(m, 1.0), want, atol=1e-6)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        x = jax.device_put(m, NamedSharding(mesh, PartitionSpec(None, "x")))
        got = jax.jit(mclip)(x, 1.0)
        assert got.sharding.is_equivalent_to(x.sharding, 2)
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"m": jnp.ones(3)}, ValueError, r"mclip: m must have rank >= 2"),
        ({"max_sv": 0.0}, ValueError, r"max_sv must be in \(0, inf\), got 0.0"),
        ({"max_sv": -1.0}, ValueError, r"max_sv must be in \(0, inf\), got -1.0"),
        ({"max_sv": float("nan")}, ValueError, r"max_sv must be in \(0, inf\), got nan"),
        ({"m": jnp.ones((2, 2), jnp.int32)}, TypeError, r"m must be a floating-point array"),
        ({"compute_dtype": jnp.int8}, TypeError, r"compute_dtype must be a floating dtype"),
        ({"coeffs": "newton"}, ValueError, r"coeffs must be one of"),
    ],
)
def test_mclip_bad_input(kwargs, error, match):
    args = {"m": jnp.ones((3, 4)), "max_sv": 1.0} | kwargs
    m, c = args.pop("m"), args.pop("max_sv")
    with pytest.raises(error, match=match):
        mclip(m, c, **args)


# ------------------------------------------------------------------ spectral norm


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)], ids=str)
def test_spectral_norm_cold_on_gaussian_matrices(shape):
    # Gaussian matrices have crowded top singular values: power iteration's slow case
    for seed in range(5):
        a = np.random.default_rng(seed).standard_normal(shape)
        sigma, v = spectral_norm(jnp.asarray(a, jnp.float32))
        s1 = svals(a)[0]
        assert sigma.shape == () and v.shape == (shape[1],)
        assert 0.98 * s1 <= float(sigma) <= s1 * (1 + 1e-5)  # a lower bound, within 2%
        np.testing.assert_allclose(float(jnp.linalg.norm(v)), 1.0, rtol=1e-5)


def test_spectral_norm_batched_vector_and_warm_start():
    # a stack of 3 matrices with a gap σ₂/σ₁ = 0.8: v converges to v₁ too
    s = np.concatenate([[5.0, 4.0], np.linspace(3.0, 0.1, 14)])
    ms = np.stack([with_singular_values(s * (1 + b), 24, 16, seed=b) for b in range(3)])
    sigma, v = spectral_norm(jnp.asarray(ms, jnp.float32))
    assert sigma.shape == (3,) and v.shape == (3, 16)
    np.testing.assert_allclose(np.asarray(sigma), svals(ms)[:, 0], rtol=2e-3)
    v1 = np.linalg.svd(ms)[2][:, 0]
    assert np.all(np.abs(np.sum(np.asarray(v) * v1, axis=-1)) > 0.99)
    # warm start: one iteration per call on a drifting matrix keeps σ within 0.1%
    rng = np.random.default_rng(9)
    m, errors = ms[0], []
    step = jax.jit(lambda m, v: spectral_norm(m, iters=1, v0=v))
    v0 = v[0]
    for _ in range(10):
        m = m + 0.02 * rng.standard_normal(m.shape)
        sigma0, v0 = step(jnp.asarray(m, jnp.float32), v0)
        errors.append(abs(float(sigma0) / svals(m)[0] - 1))
    assert max(errors) < 1e-3, errors
    # cold, one iteration is far off: the carried vector is what keeps it accurate
    cold = float(spectral_norm(jnp.asarray(m, jnp.float32), iters=1)[0])
    assert abs(cold / svals(m)[0] - 1) > 1e-2


def test_spectral_norm_of_a_bf16_matrix():
    a = np.random.default_rng(4).standard_normal((3, 40, 24))
    x = jnp.asarray(a, jnp.bfloat16)
    sigma, v = spectral_norm(x)
    # computed in float32 from the bf16 entries: within 2% of the float64 SVD of those entries
    assert sigma.dtype == jnp.float32 and v.dtype == jnp.float32
    s1 = svals(np.asarray(x, np.float64))[:, 0]
    assert np.all(np.asarray(sigma) <= s1 * (1 + 1e-5)) and np.all(np.asarray(sigma) >= 0.98 * s1)


def test_spectral_norm_zero_nan_sharded_and_bad_input():
    sigma, v = spectral_norm(jnp.zeros((5, 7)))
    assert float(sigma) == 0.0 and bool(jnp.all(jnp.isfinite(v)))
    assert bool(jnp.isnan(spectral_norm(jnp.ones((5, 7)).at[0, 0].set(jnp.inf))[0]))
    # huge entries: MᵀM is formed after scaling by the largest entry
    a = np.random.default_rng(1).standard_normal((12, 8))
    sigma, _ = spectral_norm(jnp.asarray(a * 1e30, jnp.float32), iters=20)
    np.testing.assert_allclose(float(sigma) / 1e30, svals(a)[0], rtol=1e-3)
    m = jnp.asarray(np.random.default_rng(2).standard_normal((16, 24)), jnp.float32)
    want = spectral_norm(m)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        got = jax.jit(spectral_norm)(jax.device_put(m, NamedSharding(mesh, PartitionSpec("x"))))
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-4)
    with pytest.raises(ValueError, match=r"spectral_norm: m must have rank >= 2"):
        spectral_norm(jnp.ones(4))
    with pytest.raises(ValueError, match=r"v0 must have shape .* \(7,\)"):
        spectral_norm(jnp.ones((5, 7)), v0=jnp.ones(5))
    with pytest.raises(ValueError, match=r"iters must be an int >= 1, got 0"):
        spectral_norm(jnp.ones((5, 7)), iters=0)


# ----------------------------------------------------------------- spectral decay


def test_spectral_decay_tracks_the_top_term_on_a_drifting_matrix():
    lam = 0.1
    s = np.concatenate([[4.0, 3.2], np.linspace(2.5, 0.1, 22)])
    w = with_singular_values(s, 32, 24, seed=0)
    rng = np.random.default_rng(1)
    tx = add_spectral_decay(lam, init_iters=0)  # from the fixed start: only warm steps
    params = {"mlp": {"kernel": jnp.asarray(w, jnp.float32)}}
    state = tx.init(params)
    step = jax.jit(tx.update)
    errors = []
    for _ in range(10):
        w = w + 0.01 * rng.standard_normal(w.shape)  # weights drift slowly
        params = {"mlp": {"kernel": jnp.asarray(w, jnp.float32)}}
        zero = jax.tree.map(jnp.zeros_like, params)
        u, state = step(zero, state, params)
        want = lam * ref_top_term(w)
        got = np.asarray(u["mlp"]["kernel"], np.float64)
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors[0] > 0.1  # one iteration from a random vector is far off
    assert errors[-1] < 0.02, errors
    assert state.count.dtype == jnp.int32 and int(state.count) == 10


def paths(tree):
    return ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def small_params(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)
    return {
        "embed": {"embedding": n(11, 16)},
        "attn": {"query": {"kernel": n(16, 2, 8)}},
        "mlp": {"kernel": n(16, 40), "bias": jnp.zeros(40)},
        "scan": {"kernel": n(2, 16, 16)},
        "head": {"kernel": n(16, 11)},
    }


def test_spectral_decay_and_post_clip_on_bf16_params():
    s = np.concatenate([[3.0], np.linspace(1.0, 0.1, 15)])
    w = jnp.asarray(with_singular_values(s, 24, 16, seed=6), jnp.bfloat16)
    params = {"mlp": {"kernel": w}}
    zero = {"mlp": {"kernel": jnp.zeros_like(w)}}
    tx = add_spectral_decay(0.1)
    u, state = jax.jit(tx.update)(zero, tx.init(params), params)
    assert u["mlp"]["kernel"].dtype == jnp.bfloat16
    assert state.v["mlp"]["kernel"].dtype == jnp.float32
    want = 0.1 * ref_top_term(np.asarray(w, np.float64))
    got = np.asarray(u["mlp"]["kernel"], np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # bf16 rounding of the term
    # Post-Clip: the new bf16 weights within 1.05·c (the bf16 rounding of W + u included)
    c = 1.5
    step = {"mlp": {"kernel": jnp.asarray(with_singular_values(s, 24, 16, seed=7), jnp.bfloat16)}}
    tx = clip_singular_values(c)
    u, _ = jax.jit(tx.update)(step, tx.init(params), params)
    new = optax.apply_updates(params, u)["mlp"]["kernel"]
    assert new.dtype == jnp.bfloat16
    pushed = np.asarray(w, np.float64) + np.asarray(step["mlp"]["kernel"], np.float64)
    assert svals(pushed)[0] > 2 * c
    assert svals(np.asarray(new, np.float64))[0] <= 1.05 * c


def test_spectral_decay_routes_muon_leaves_only():
    params = small_params()
    tx = add_spectral_decay(0.5, init_iters=30)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert isinstance(state, SpectralDecayState)
    assert state.v["embed"]["embedding"] == optax.MaskedNode()
    assert state.v["scan"]["kernel"].shape == (2, 16)  # stacked: one vector per layer
    assert state.v["attn"]["query"]["kernel"].shape == (16,)  # fused heads: (16, 2·8)
    views = {
        "attn/query/kernel": lambda x: x.reshape(1, 16, 16),
        "mlp/kernel": lambda x: x[None],
        "scan/kernel": lambda x: x,
    }
    for (path, p), (_, g), (_, d) in zip(
        jax.tree_util.tree_leaves_with_path(params),
        jax.tree_util.tree_leaves_with_path(grads),
        jax.tree_util.tree_leaves_with_path(u),
        strict=True,
    ):
        key = "/".join(k.key for k in path)
        term = np.asarray(d, np.float64) - np.asarray(g, np.float64)
        if key not in views:
            assert np.all(term == 0), key
            continue
        for t, w in zip(views[key](term), views[key](np.asarray(p, np.float64)), strict=True):
            # the term is rank one, λ·σ with σ within 2% of the SVD's, along the top direction
            st = svals(t)
            assert st[1] <= 1e-5 * st[0], key
            assert abs(st[0] / (0.5 * svals(w)[0]) - 1) < 0.02, key


def test_spectral_decay_schedule_needs_params_mask_and_nan():
    params = {"mlp": {"kernel": jnp.asarray(np.diag([2.0, 1.0, 0.5]), jnp.float32)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = add_spectral_decay(optax.linear_schedule(0.0, 1.0, 4))
    state = tx.init(params)
    for t in range(3):
        u, state = tx.update(zero, state, params)
        want = 0.25 * t * 2.0  # λ_t·σ₁ at the top entry: the schedule reads the count
        np.testing.assert_allclose(float(u["mlp"]["kernel"][0, 0]), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"add_spectral_decay needs the params"):
        tx.update(zero, state)
    # a mask picking a vector is refused at init; a mask picking the embedding decays it
    bad = {"w": {"kernel": jnp.ones((3, 3))}, "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"rank-1 leaf 'b'"):
        add_spectral_decay(0.1, mask=lambda p: {"w": {"kernel": True}, "b": True}).init(bad)
    emb = {"embed": {"embedding": jnp.eye(3) * 2.0}}
    tx = add_spectral_decay(0.1, mask={"embed": {"embedding": True}})
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, emb), tx.init(emb), emb)
    np.testing.assert_allclose(float(jnp.linalg.norm(u["embed"]["embedding"])), 0.2, rtol=1e-4)
    # a NaN weight gives a non-finite term and keeps its previous vector
    tx = add_spectral_decay(0.1)
    state = tx.init(params)
    nan = {"mlp": {"kernel": params["mlp"]["kernel"].at[0, 0].set(jnp.nan)}}
    u, new = tx.update(zero, state, nan)
    assert bool(jnp.any(jnp.isnan(u["mlp"]["kernel"])))
    np.testing.assert_array_equal(new.v["mlp"]["kernel"], state.v["mlp"]["kernel"])


@pytest.mark.parametrize(
    "factory, arg, value, match",
    [
        (add_spectral_decay, "weight_decay", -0.1, r"weight_decay must be in \[0, inf\)"),
        (add_spectral_decay, "iters", 0, r"iters must be an int >= 1"),
        (add_spectral_decay, "attention", "heads", r"attention must be one of"),
        (clip_singular_values, "max_sv", 0.0, r"max_sv must be in \(0, inf\), got 0.0"),
        (clip_singular_values, "max_sv", float("inf"), r"max_sv must be finite"),
        (clip_singular_values, "steps", -1, r"steps must be an int >= 0"),
        (add_spectral_decay, "owner_axes", ("data", "data"), r"owner_axes=.* names an axis twice"),
        (clip_singular_values, "owner_axes", 1, r"owner_axes must be a mesh axis name"),
    ],
)
def test_bad_construction_names_the_argument(factory, arg, value, match):
    first = {"weight_decay": 0.1} if factory is add_spectral_decay else {"max_sv": 1.0}
    kwargs = first | {arg: value}
    positional = kwargs.pop(next(iter(first)))
    with pytest.raises(ValueError, match=match):
        factory(positional, **kwargs)


def test_inject_hyperparams_needs_the_iteration_counts_static():
    import optax_ext as ox

    params = {"d": {"kernel": jnp.diag(jnp.array([2.0, 1.0]))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    # the Krylov basis's size is the program's shape: a traced count is refused, with the fix
    tx = ox.inject_hyperparams(add_spectral_decay)(0.1)
    with pytest.raises(TypeError, match=r"iters must be a static int .*static_args"):
        jax.jit(tx.update)(zero, tx.init(params), params)
    decay = optax.linear_schedule(0.1, 0.2, 10)
    tx = ox.inject_hyperparams(add_spectral_decay, static_args=("iters", "init_iters"))(decay)
    u, state = jax.jit(tx.update)(zero, tx.init(params), params)
    np.testing.assert_allclose(u["d"]["kernel"], [[0.2, 0.0], [0.0, 0.0]], atol=1e-6)
    # Post-Clip's msign steps may be traced (msign loops over them), and max_sv scheduled
    tx = ox.inject_hyperparams(clip_singular_values)(optax.linear_schedule(1.5, 1.0, 2))
    u, state = jax.jit(tx.update)(zero, tx.init(params), params)
    np.testing.assert_allclose(
        jnp.diag(params["d"]["kernel"] + u["d"]["kernel"]), [1.5, 1.0], atol=1e-5
    )


# ---------------------------------------------------------------------- Post-Clip


def test_post_clip_bounds_the_new_weights_per_matrix():
    c = 1.5
    rng = np.random.default_rng(0)
    w = np.stack(
        [with_singular_values(np.linspace(0.1, 1.4, 12), 12, 20, seed=b) for b in range(2)]
    )
    step = np.stack(
        [with_singular_values(np.geomspace(0.01, 3.0, 12), 12, 20, seed=5 + b) for b in range(2)]
    )
    params = {
        "scan": {"kernel": jnp.asarray(w, jnp.float32)},  # stacked: each layer its own matrix
        "scan_bias": {"bias": jnp.asarray(rng.standard_normal(20), jnp.float32)},
    }
    updates = {
        "scan": {"kernel": jnp.asarray(step, jnp.float32)},
        "scan_bias": {"bias": jnp.ones(20, jnp.float32)},
    }
    tx = clip_singular_values(c)
    state = tx.init(params)
    assert isinstance(state, ClipSingularValuesState) and state.count.dtype == jnp.int32
    u, state = jax.jit(tx.update)(updates, state, params)
    new = np.asarray(params["scan"]["kernel"] + u["scan"]["kernel"], np.float64)
    assert svals(new).max() <= 1.05 * c
    assert svals(w + step).max() > 2 * c  # the step did push it out
    np.testing.assert_allclose(new, ref_mclip(w + step, c), atol=1e-4)
    np.testing.assert_array_equal(u["scan_bias"]["bias"], updates["scan_bias"]["bias"])
    # bf16 compute: the same bound
    tx = clip_singular_values(c, compute_dtype=jnp.bfloat16)
    u, _ = tx.update(updates, tx.init(params), params)
    assert svals(params["scan"]["kernel"] + u["scan"]["kernel"]).max() <= 1.05 * c
    with pytest.raises(ValueError, match=r"clip_singular_values needs the params"):
        tx.update(updates, state)


def test_post_clip_bound_scaled_by_the_matrix_shape():
    # Su's spectral condition: c·√(d_out/d_in) per matrix, here 1.5·√(3/2) and 1.5·√(2/3)
    c, factor = 1.5, lambda d_in, d_out: (d_out / d_in) ** 0.5
    sv = np.geomspace(0.05, 4.0, 16)
    w = {"a": with_singular_values(sv, 16, 24, seed=1), "b": with_singular_values(sv, 24, 16, 2)}
    params = {k: {"kernel": jnp.zeros(v.shape)} for k, v in w.items()}
    updates = {k: {"kernel": jnp.asarray(v, jnp.float32)} for k, v in w.items()}
    tx = clip_singular_values(c, shape_factor=factor)
    u, _ = jax.jit(tx.update)(updates, tx.init(params), params)
    for k, v in w.items():
        bound = c * factor(*v.shape)
        np.testing.assert_allclose(u[k]["kernel"], ref_mclip(v, bound), atol=1e-4)
    assert svals(u["a"]["kernel"])[0] > 1.8 > 1.25 > svals(u["b"]["kernel"])[0]
    with pytest.raises(ValueError, match=r"shape_factor must be None or a function"):
        clip_singular_values(1.0, shape_factor=2.0)
    with pytest.raises(ValueError, match=r"shape_factor\(16, 24\) must be in \(0, inf\), got 0"):
        clip_singular_values(1.0, shape_factor=lambda d_in, d_out: 0).init(params)


def test_post_clip_after_muon_keeps_every_hidden_matrix_bounded():
    c = 0.8
    params = small_params(1)
    tx = optax.chain(muon(0.05, other="adamw"), clip_singular_values(c))
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    labels = muon_labels(params)
    for t in range(4):
        grads = jax.tree.map(
            lambda p, t=t: jnp.asarray(np.random.default_rng(t).standard_normal(p.shape), p.dtype),
            params,
        )
        u, state = step(params, state, grads)
        params = optax.apply_updates(params, u)
    stats = spectral_stats(params)
    for path in ("attn/query/kernel", "mlp/kernel", "scan/kernel"):
        assert float(jnp.max(stats[path].sigma_max)) <= 1.05 * c, path
    # the head, not routed, grew past c
    assert svals(params["head"]["kernel"])[0] > c
    routed = {
        k for k, lab in zip(paths(params), jax.tree.leaves(labels), strict=True) if lab == "muon"
    }
    assert set(stats) == routed


# ------------------------------------------------------------------------ monitor


def test_spectral_stats_against_the_svd():
    params = small_params(2)
    stats = jax.jit(spectral_stats)(params)
    assert set(stats) == {"attn/query/kernel", "mlp/kernel", "scan/kernel"}
    mats = {
        "attn/query/kernel": np.asarray(params["attn"]["query"]["kernel"]).reshape(1, 16, 16),
        "mlp/kernel": np.asarray(params["mlp"]["kernel"])[None],
        "scan/kernel": np.asarray(params["scan"]["kernel"]),
    }
    for path, ms in mats.items():
        s = stats[path]
        np.testing.assert_allclose(np.reshape(s.sigma_max, -1), svals(ms)[:, 0], rtol=1e-4)
        np.testing.assert_allclose(
            np.reshape(s.entropy, -1), [ref_entropy(m) for m in ms], atol=1e-4
        )
        assert s.random_entropy == random_matrix_entropy(*ms.shape[-2:])
    assert stats["scan/kernel"].sigma_max.shape == (2,)
    # all σ equal: 1; rank one: 0; zero: 0
    one = spectral_stats(
        {
            "a": {"kernel": 3.0 * jnp.eye(6)},
            "b": {"kernel": jnp.ones((6, 4))},
            "z": {"kernel": jnp.zeros((4, 4))},
        }
    )
    np.testing.assert_allclose(
        [float(one[k].entropy) for k in ("a/kernel", "b/kernel", "z/kernel")],
        [1.0, 0.0, 0.0],
        atol=1e-5,
    )
    np.testing.assert_allclose(float(one["a/kernel"].sigma_max), 3.0, rtol=1e-6)


def test_spectral_stats_logged_every_n_steps_inside_a_train_step_compiles_once():
    params = small_params(3)
    tx = muon(0.02, other="adamw")
    every = 3

    def log(p):
        return {k: (s.sigma_max, s.entropy) for k, s in spectral_stats(p).items()}

    blank = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), jax.eval_shape(log, params))

    def train_step(params, state, grads, t):
        u, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, u)
        # the monitor runs on logging steps only (lax.cond runs one branch)
        stats = jax.lax.cond(t % every == 0, log, lambda p: blank, params)
        return params, state, stats

    step = jit_once(train_step)  # a second trace fails
    state = tx.init(params)
    for t in range(2 * every + 1):
        rng = np.random.default_rng(t)
        noise = lambda p, rng=rng: jnp.asarray(rng.standard_normal(p.shape), p.dtype)
        grads = jax.tree.map(noise, params)
        params, state, stats = step(params, state, grads, t)
        sigma, entropy = stats["mlp/kernel"]
        if t % every:
            assert np.isnan(float(sigma))
            continue
        w = np.asarray(params["mlp"]["kernel"], np.float64)
        np.testing.assert_allclose(float(sigma), svals(w)[0], rtol=1e-4)
        np.testing.assert_allclose(float(entropy), ref_entropy(w), atol=1e-4)


def test_random_matrix_entropy_matches_gaussian_draws():
    rng = np.random.default_rng(0)
    for shape in [(64, 64), (48, 96)]:
        draws = [ref_entropy(rng.standard_normal(shape)) for _ in range(8)]
        # Marchenko–Pastur is the large-matrix limit: within 0.005 at these sizes
        assert abs(np.mean(draws) - random_matrix_entropy(*shape)) < 0.005, shape
    assert random_matrix_entropy(1, 7) == 1.0
    with pytest.raises(ValueError, match=r"d_in must be an int >= 1"):
        random_matrix_entropy(0, 3)


def test_spectral_stats_sharded_matches_single_device():
    params = {
        "mlp": {
            "kernel": jnp.asarray(np.random.default_rng(3).standard_normal((16, 24)), jnp.float32)
        }
    }
    want = spectral_stats(params)["mlp/kernel"]
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        p = jax.device_put(params, NamedSharding(mesh, PartitionSpec("x")))
        got = jax.jit(spectral_stats)(p)["mlp/kernel"]
        np.testing.assert_allclose(got.sigma_max, want.sigma_max, rtol=1e-5)
        np.testing.assert_allclose(got.entropy, want.entropy, atol=1e-5)


# (device paths, abstract init without a warning and one compile of add_spectral_decay and
# clip_singular_values: tests/test_device_paths.py)


def test_an_unsettled_layout_warns_at_init():
    params = {"block": {"kernel": jnp.ones((3, 4, 5))}}
    with pytest.warns(UserWarning, match=r"no layout rule settles \['block/kernel'\]"):
        add_spectral_decay(0.1).init(params)


# ------------------------------------------------------------------ owner_axes


def owner_tree():
    """float64 params and two gradients: a wide (16 x 40) and a tall (40 x 16) kernel,
    which share a group in Post-Clip (mclip(Wᵀ) = mclip(W)ᵀ) with different bounds
    (``owner_bound``), a stack of two matrices, and a bias that passes through."""
    rng = np.random.default_rng(4)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]))
    params = {
        "mlp": {"kernel": n(16, 40), "bias": jnp.zeros(40, jnp.float64)},
        "down": {"kernel": n(40, 16)},
        "scan": {"kernel": n(2, 16, 16)},
    }
    grads = [jax.tree.map(lambda p, i=i: jnp.cos(3 * p + i), params) for i in range(2)]
    return params, grads


def owner_bound(d_in, d_out):
    return 0.5 * (1 + (d_out / d_in) ** 0.5)


def owner_run(params, grads, mesh=None):
    """Spectral decay's and Post-Clip's (updates, states) after one jitted update per
    gradient at fixed params, both in one program compiled once: on one device, or FSDP
    on ``mesh`` (each leaf split along its first axis that 8 divides) with owners along
    "data"."""
    axes = None if mesh is None else "data"
    txs = (
        add_spectral_decay(0.3, init_iters=3, owner_axes=axes),
        clip_singular_values(1.0, shape_factor=owner_bound, owner_axes=axes),
    )
    both = lambda p, s, g: tuple(tx.update(g, s_, p) for tx, s_ in zip(txs, s, strict=True))
    step = jit_once(both)  # a second trace fails
    init = lambda p: tuple(tx.init(p) for tx in txs)
    if mesh is None:
        states = init(params)
        for g in grads:
            out = step(params, states, g)
            states = tuple(s for _, s in out)
        return out
    shard = lambda t: jax.tree.map(lambda x: jax.device_put(x, _data_sharding(mesh, x)), t)
    with jax.set_mesh(mesh):
        params = shard(params)
        states = jax.jit(init)(params)
        for g in grads:
            g = shard(g)
            out = step(params, states, g)
            states = tuple(s for _, s in out)
    for u, _ in out:
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g), strict=True):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim)  # the grads' own sharding
    return out


@functools.cache
def owner_single_device():
    with x64():
        out = owner_run(*owner_tree())
        return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_owner_axes_equals_the_single_device_result(axis_type, float64):
    # In float64 the owners' batched programs and the per-leaf ones agree to 1e-12, so a
    # matrix (or vector) handed to the wrong place shows.
    params, grads = owner_tree()
    pushed = np.asarray(params["down"]["kernel"] + grads[1]["down"]["kernel"])
    assert svals(pushed)[0] > 2 * owner_bound(40, 16)  # the clip acts
    want = owner_single_device()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    got = owner_run(params, grads, mesh)
    for name, (u, s), (want_u, want_s) in zip(("decay", "clip"), got, want, strict=True):
        assert_trees_close(u, want_u, rtol=1e-12, atol=1e-12, err=f"{name} updates")
        assert_trees_close(s, want_s, rtol=1e-12, atol=1e-12, err=f"{name} state")


def test_owner_axes_needs_a_mesh_with_the_axis():
    params = {"mlp": {"kernel": jnp.ones((8, 8))}}
    for make in (add_spectral_decay, clip_singular_values):
        with jax.set_mesh(jax.make_mesh((8,), ("data",))):
            with pytest.raises(ValueError, match=r"owner_axes: the axis 'model' is not in"):
                make(0.5, owner_axes="model").init(params)
        tx = make(0.5, owner_axes="data")
        with pytest.raises(ValueError, match=r"owner_axes=\('data',\) needs a device mesh"):
            tx.update(params, tx.init(params), params)

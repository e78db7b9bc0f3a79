"""msign by Newton–Schulz against float64 NumPy: the matrix polynomial, the SVD, the ranges."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jit_once, with_singular_values, x64

from optax_ext.optimizers.msign import (
    NS_COEFFICIENTS,
    msign,
    msign_svd,
    newton_schulz_coefficients,
    singular_value_range,
)

NAMES = list(NS_COEFFICIENTS)

# --------------------------------------------------------------- float64 reference

SPEC_ROWS = {
    "keller": [(3.4445, -4.7750, 2.0315)],
    "su_single": [(3.3748, -4.6969, 2.1433)],
    "su": [
        (4.6182, -12.9582, 9.3299),
        (3.8496, -7.9585, 4.3052),
        (3.5204, -7.2918, 4.0606),
        (3.2067, -6.8243, 4.2802),
        (3.2978, -5.7848, 3.8917),
        (1.875, -1.25, 0.375),
    ],
    "polar_express": [
        (a / 1.01, b / 1.01**3, c / 1.01**5)
        for a, b, c in [
            (8.287212018145622, -23.59588651909882, 17.300387312530923),
            (4.107059111542197, -2.9478499167379084, 0.54484310829266),
            (3.9486908534822938, -2.908902115962947, 0.5518191394370131),
            (3.3184196573706055, -2.488488024314878, 0.5100489401237208),
            (2.3006520199548186, -1.6689039845747518, 0.4188073119525678),
            (1.8913014077874002, -1.2679958271945908, 0.37680408948524996),
            (1.875, -1.25, 0.375),
        ]
    ],
}


def ref_polynomial(s, rows, steps):
    """The scalar map x -> a x + b x^3 + c x^5, row min(i, len-1) at step i, in float64."""
    x = np.asarray(s, np.float64)
    for i in range(steps):
        a, b, c = rows[min(i, len(rows) - 1)]
        x = a * x + b * x**3 + c * x**5
    return x


def ref_ns(m, rows, steps, eps=1e-7):
    """Newton–Schulz in float64 written from its definition: U p(Σ/(‖M‖_F + ε·max|M_ij|)) Vᵀ via
    the SVD (X_0 = Y/(‖Y‖_F + ε) for Y = M/max|M_ij|)."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    x0 = s / (np.sqrt(np.sum(s**2)) + eps * np.abs(m).max())
    return (u * ref_polynomial(x0, rows, steps)) @ vt


# ------------------------------------------------------------------------ tables


def test_tables_are_the_spec_rows():
    for name, rows in SPEC_ROWS.items():
        np.testing.assert_allclose(np.array(NS_COEFFICIENTS[name]), np.array(rows), rtol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 16)], ids=str)
def test_equals_the_float64_matrix_polynomial(name, shape):
    # singular values of X0 spread over [1e-3, 1]-ish: the iteration is U p(Σ) Vᵀ exactly
    rng = np.random.default_rng(len(shape))
    k = min(shape[-2:])
    mats = []
    for b in range(int(np.prod(shape[:-2]))):
        s = np.geomspace(1e-3, 1.0, k) * rng.uniform(0.5, 2.0)
        mats.append(with_singular_values(s, *shape[-2:], seed=b))
    m = np.stack(mats).reshape(shape)
    for steps in (5, 9):
        with x64():
            got = np.asarray(msign(jnp.asarray(m), coeffs=name, steps=steps))
        want = np.stack([ref_ns(x, SPEC_ROWS[name], steps) for x in m.reshape(-1, *shape[-2:])])
        np.testing.assert_allclose(got, want.reshape(shape), rtol=0, atol=1e-10)
        # float32: the same to float32 rounding of the polynomial's large coefficients
        got32 = msign(jnp.asarray(m, jnp.float32), coeffs=name, steps=steps)
        assert got32.dtype == jnp.float32 and got32.shape == shape
        np.testing.assert_allclose(np.asarray(got32, np.float64), want.reshape(shape), atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_against_the_svd_within_the_spec_ranges(name):
    # X0's singular values span about [1e-3, 1]: one value 1, the others small enough
    # that the Frobenius norm (the normalisation) stays within 3e-3 of 1
    s = np.concatenate([[1.0], np.geomspace(1e-3, 0.04, 31)])
    m = with_singular_values(s, 32, 48, seed=1)
    low = 1e-3 / np.linalg.norm(s)  # X0's smallest singular value
    exact = msign_svd(m)
    for steps in (5, 6):
        got = np.asarray(msign(jnp.asarray(m, jnp.float32), coeffs=name, steps=steps), np.float64)
        sv = np.linalg.svd(got, compute_uv=False)
        lo, hi = singular_value_range(name, steps, low=low)
        assert lo - 2e-3 <= sv.min() and sv.max() <= hi + 2e-3, (name, steps, sv.min(), sv.max())
        # the distance to the exact U Vᵀ in the spectral norm is the worst |σ - 1|
        dist = np.linalg.norm(got - exact, 2)
        assert dist <= max(1 - lo, hi - 1) + 2e-3


def test_spec_ranges_on_the_design_interval():
    """Keller's 5 steps about [0.47, 1.20]; Polar Express [0.85, 1.12] in 5 steps
    and [0.99, 1.00] in 6."""
    r = {(n, k): singular_value_range(n, k) for n in NAMES for k in (5, 6)}
    np.testing.assert_allclose(r["keller", 5], (0.47, 1.20), atol=6e-3)
    np.testing.assert_allclose(r["polar_express", 5], (0.85, 1.12), atol=6e-3)
    np.testing.assert_allclose(r["polar_express", 6], (0.99, 1.00), atol=6e-3)
    # Su's per-step set improves on the single sets at 5 steps; extra steps only refine
    assert r["su", 5][0] > r["keller", 5][0] and r["su", 5][1] < r["keller", 5][1]
    assert r["su", 6][0] > r["su", 5][0] and abs(r["su", 6][1] - 1) < 1e-3
    lo, hi = singular_value_range("su", 12)
    assert abs(lo - 1) < 1e-6 and abs(hi - 1) < 1e-6


def test_svd_reference_is_an_isometry_and_handles_rank_deficiency():
    m, u, v = with_singular_values(np.array([3.0, 1e-2, 0.0]), 6, 4, seed=2, factors=True)
    o = msign_svd(m)
    np.testing.assert_allclose(o, u[:, :2] @ v[:, :2].T, atol=1e-12)


# ------------------------------------------------------------ dtypes, traced steps


def test_bf16_compute_dtype_stays_close():
    s = np.geomspace(1e-2, 1.0, 16)
    m = with_singular_values(s, 16, 32, seed=3)
    exact = msign_svd(m)
    bf = msign(jnp.asarray(m, jnp.float32), steps=6, compute_dtype=jnp.bfloat16)
    assert bf.dtype == jnp.float32
    bf = np.asarray(bf, np.float64)
    sv = np.linalg.svd(bf, compute_uv=False)
    assert 0.9 < sv.min() and sv.max() < 1.1  # bf16 rounding keeps the σ near 1
    # Six steps reach bf16's own floor (more steps do not get closer: about 0.10 here),
    # while float32 gets within 0.01 in the same steps: the gap is rounding, not iteration.
    error = lambda steps, dtype: np.linalg.norm(
        np.asarray(msign(jnp.asarray(m, jnp.float32), steps=steps, compute_dtype=dtype),
                   np.float64) - exact, 2)  # fmt: skip
    floor = error(10, jnp.bfloat16)
    assert np.linalg.norm(bf - exact, 2) < 1.1 * floor
    assert error(6, None) < 0.01 < floor < 0.2
    assert msign(jnp.asarray(m, jnp.bfloat16), steps=6).dtype == jnp.bfloat16


def test_traced_steps_equal_static_steps():
    m = jnp.asarray(np.random.default_rng(4).standard_normal((12, 20)), jnp.float32)
    f = jit_once(lambda x, k: msign(x, coeffs="su", steps=k))
    for k in (0, 3, 7):
        np.testing.assert_allclose(f(m, jnp.int32(k)), msign(m, coeffs="su", steps=k), atol=2e-6)


def test_zero_matrix_stays_zero_and_explicit_rows():
    assert float(jnp.abs(msign(jnp.zeros((3, 5)))).max()) == 0.0
    m = jnp.asarray(np.random.default_rng(5).standard_normal((6, 4)), jnp.float32)
    np.testing.assert_array_equal(
        msign(m, coeffs=[(3.4445, -4.7750, 2.0315)]), msign(m, coeffs="keller")
    )
    np.testing.assert_array_equal(
        msign(m, coeffs=(3.4445, -4.7750, 2.0315)), msign(m, coeffs="keller")
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_scale_invariant_at_extreme_scales(dtype):
    # The norm is taken of M / max|M_ij|: entries of 1e20 no longer overflow float32's
    # sum of squares (the result was all zeros), and 1e-12 is no longer swamped by an
    # absolute eps (its singular values came out [0.05, 0.01] instead of about 1).
    m = np.random.default_rng(7).standard_normal((8, 16))
    m = np.asarray(jnp.asarray(m, dtype), np.float64)  # the matrix as `dtype` holds it
    exact = msign_svd(m)
    tol = 1e-4 if dtype == jnp.float32 else 1e-2  # a bf16 result rounds to 2^-9 relative
    for scale in (1e-20, 1e-12, 1.0, 1e20, 1e30):
        x = jnp.asarray(m, jnp.float32) * jnp.float32(scale)
        got = msign(x.astype(dtype), steps=8)
        assert got.dtype == dtype
        got = np.asarray(got.astype(jnp.float32), np.float64)
        sv = np.linalg.svd(got, compute_uv=False)
        assert np.all(np.abs(sv - 1) < 2 * tol), (scale, sv.min(), sv.max())
        np.testing.assert_allclose(got, exact, rtol=0, atol=tol, err_msg=str(scale))


def test_zero_nan_and_inf_matrices():
    # the zero matrix maps to zero also with eps = 0 (0/0 gave NaN); batched, a zero
    # matrix beside a normal one leaves the other alone
    assert float(jnp.abs(msign(jnp.zeros((3, 5)), eps=0.0)).max()) == 0.0
    m = jnp.asarray(np.random.default_rng(8).standard_normal((2, 4, 6)), jnp.float32)
    both = msign(m.at[0].set(0.0), eps=0.0)
    assert float(jnp.abs(both[0]).max()) == 0.0
    np.testing.assert_array_equal(both[1], msign(m[1], eps=0.0))
    # a NaN or ±inf entry gives NaN everywhere in its matrix, as documented
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert bool(jnp.all(jnp.isnan(msign(m[0].at[1, 2].set(bad)))))


def test_sharded_matrix_under_jit():
    from jax.sharding import NamedSharding, PartitionSpec

    m = jnp.asarray(np.random.default_rng(6).standard_normal((64, 48)), jnp.float32)
    want = msign(m)
    for axis_type in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        for spec in (PartitionSpec("x", None), PartitionSpec(None, "x")):
            x = jax.device_put(m, NamedSharding(mesh, spec))
            got = jax.jit(msign)(x)
            assert got.sharding.is_equivalent_to(x.sharding, 2)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "coeffs, match",
    [
        ("newton", r"coeffs must be one of \['keller', 'su_single', 'su', 'polar_express'\]"),
        ((1.0, 2.0), r"coeffs must be an \(a, b, c\) triple"),
        ([], r"non-empty"),
        ([(3.0, -4.0, 2.0), (float("nan"), 0.0, 0.0)], r"finite"),
        ([(3.0, -4.0, 2.0), (-1.0, 0.0, 0.0)], r"coeffs\[1\]: a must be in \(0, inf\)"),
        ("abc", r"coeffs must be one of"),
        (object(), r"coeffs must be a name"),
    ],
)
def test_bad_coefficients(coeffs, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz_coefficients(coeffs)


def test_bad_calls():
    with pytest.raises(ValueError, match=r"steps must be an int >= 0, got -1"):
        msign(jnp.ones((2, 2)), steps=-1)
    with pytest.raises(TypeError, match="steps must be an int"):
        msign(jnp.ones((2, 2)), steps=2.5)
    with pytest.raises(ValueError, match="rank >= 2"):
        msign(jnp.ones(3))


@pytest.mark.parametrize(
    "m",
    [jnp.arange(16).reshape(4, 4), jnp.ones((3, 3), bool), jnp.ones((2, 2), jnp.complex64)],
    ids=["int", "bool", "complex"],
)
def test_non_float_input_is_rejected(m):
    # an int matrix came back as zeros of its own dtype
    with pytest.raises(TypeError, match=r"m must be a floating-point array, got (int32|bool|comp)"):
        msign(m)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"compute_dtype": jnp.int32}, TypeError, r"compute_dtype must be a floating dtype"),
        ({"compute_dtype": "fp32"}, TypeError, r"compute_dtype must be a floating dtype"),
        ({"eps": float("nan")}, ValueError, r"eps must be in \[0, inf\), got nan"),
        ({"eps": -1e-7}, ValueError, r"eps must be in \[0, inf\), got -1e-07"),
        ({"eps": float("inf")}, ValueError, r"eps must be finite and in \[0, inf\)"),
    ],
)
def test_bad_compute_dtype_and_eps(kwargs, error, match):
    # an int compute dtype gave zeros, eps = nan all-NaN: both now fail when called
    with pytest.raises(error, match=match):
        msign(jnp.ones((2, 2)), **kwargs)


def test_traced_steps_negative_clamped_and_non_integer_rejected():
    m = jnp.asarray(np.random.default_rng(9).standard_normal((4, 6)), jnp.float32)
    f = jax.jit(lambda x, k: msign(x, steps=k))
    # a traced count cannot be checked: a negative one runs no step, i.e. returns X_0
    np.testing.assert_array_equal(f(m, jnp.int32(-3)), msign(m, steps=0))
    with pytest.raises(TypeError, match=r"steps must be an int, got a traced float32"):
        f(m, jnp.float32(2.0))

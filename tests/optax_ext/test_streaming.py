"""Su's streaming power iteration (msign and the spectrum from one QR step per training step)
against a float64 NumPy SVD."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import jit_once
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from optax_ext.optimizers.msign import msign
from optax_ext.optimizers.muon import scale_by_muon
from optax_ext.optimizers.streaming import (
    StreamingBasis,
    init_streaming_basis,
    streaming_msign,
)

# ------------------------------------------------------------- float64 references


def ref_msign(m):
    """U Vᵀ by a float64 SVD over the last two axes (singular values at rounding level: 0)."""
    u, s, vt = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
    keep = s > 1e-12 * s.max(axis=-1, keepdims=True)
    return np.einsum("...ik,...k,...kj->...ij", u, keep.astype(np.float64), vt)


def svals(m):
    return np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)


def rel_err(got, want):
    """Relative Frobenius error per matrix."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want, axis=(-2, -1)) / np.linalg.norm(want, axis=(-2, -1))


def drifting_momenta(shape, steps, seed, beta=0.95, noise=0.3, drift=0.02):
    """Muon's momentum E ← βE + (1-β)G of gradients G = A_t + noise around a slowly drifting
    A_t (singular values spread over [1e-2, 1], entries moving by ``drift`` of their RMS per
    step); yields E after each step."""
    rng = np.random.default_rng(seed)
    *batch, rows, cols = shape
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((*batch, rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((*batch, cols, k)))
    a = (u * np.geomspace(1.0, 1e-2, k)) @ np.swapaxes(v, -1, -2)
    rms = np.sqrt(np.mean(a**2))
    e = np.zeros(shape)
    for _ in range(steps):
        a = a + drift * rms * rng.standard_normal(shape)
        e = beta * e + (1 - beta) * (a + noise * rms * rng.standard_normal(shape))
        yield e


_step = jax.jit(streaming_msign)
_step3 = jax.jit(functools.partial(streaming_msign, iters=3))


# ----------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape", [(48, 32), (2, 32, 48)], ids=str)
def test_tracks_a_drifting_momentum_better_than_polar_express(shape):
    basis = init_streaming_basis(shape)
    first = None
    for e in drifting_momenta(shape, 30, seed=sum(shape)):
        o, basis = _step(jnp.asarray(e, jnp.float32), basis)
        if first is None:
            first = rel_err(o, ref_msign(e))
    want = ref_msign(e)
    stream = rel_err(o, want)
    pe5 = rel_err(msign(jnp.asarray(e, jnp.float32), steps=5, coeffs="polar_express"), want)
    # after 30 steps at least as close to the exact msign as 5-step Polar Express
    # (measured: 0.04-0.05 against 0.09)
    assert np.all(stream <= pe5), (stream, pe5)
    # the carried basis is what makes it accurate: the first step, from V₀ = I, is far off
    assert np.all(first > 0.25), first
    # the tracked spectrum: the top singular values within 1% (within 2% is spectral_norm's
    # target; measured: 0.13% where σ₂/σ₁ = 0.94 and the two directions still mix)
    s = svals(e)
    top = np.sort(np.asarray(basis.sigma), axis=-1)[..., ::-1][..., :3]
    np.testing.assert_allclose(top, s[..., :3], rtol=1e-2)
    assert basis.v.dtype == jnp.float32 and basis.sigma.shape == (*shape[:-2], min(shape[-2:]))


def test_converges_to_the_svd_on_a_fixed_matrix():
    # separated singular values (ratio 0.85; all above the floor): 40 steps reach float32
    # accuracy
    rng = np.random.default_rng(0)
    k = 32
    u, _ = np.linalg.qr(rng.standard_normal((48, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    s = 3.0 * 0.85 ** np.arange(k)
    m = (u * s) @ v.T
    basis = init_streaming_basis(m.shape)
    x = jnp.asarray(m, jnp.float32)
    for _ in range(40):
        o, basis = _step(x, basis)
    # float32's floor: the basis comes from MᵀM (condition 150² here); measured 3e-5 from
    # step 40 on (1.8e-2 at step 10, 2e-4 at step 30)
    np.testing.assert_allclose(np.asarray(o, np.float64), ref_msign(m), atol=1e-4)
    np.testing.assert_allclose(np.asarray(basis.sigma, np.float64), s, rtol=1e-5)
    vv = np.asarray(basis.v, np.float64)
    np.testing.assert_allclose(vv.T @ vv, np.eye(k), atol=1e-5)
    # iters=3 reuses MᵀM: a third of the steps gets as far
    b3 = init_streaming_basis(m.shape)
    for _ in range(14):
        o3, b3 = _step3(x, b3)
    np.testing.assert_allclose(np.asarray(o3, np.float64), ref_msign(m), atol=1e-4)


def test_zero_rank_deficient_and_non_finite_matrices():
    # zero: zero out, the basis stays as it was
    b0 = init_streaming_basis((6, 4))
    o, b = streaming_msign(jnp.zeros((6, 4)), b0)
    assert float(jnp.abs(o).max()) == 0.0 and float(jnp.abs(b.sigma).max()) == 0.0
    np.testing.assert_allclose(b.v, b0.v, atol=1e-6)
    # rank 4 of 32: the partial isometry U₄V₄ᵀ; with shift=0 the Cholesky factor of the
    # singular Gram matrix fails and Householder QR takes over: the same result
    rng = np.random.default_rng(1)
    m = rng.standard_normal((48, 4)) @ rng.standard_normal((4, 32))
    for shift in (1e-6, 0.0):
        basis = init_streaming_basis(m.shape)
        for _ in range(20):
            o, basis = _step(jnp.asarray(m, jnp.float32), basis, shift=shift)
        assert rel_err(o, ref_msign(m)) < 1e-3, shift
        assert bool(jnp.all(jnp.isfinite(basis.v))), shift
        vv = np.asarray(basis.v, np.float64)
        np.testing.assert_allclose(vv.T @ vv, np.eye(32), atol=1e-5)
    # a NaN entry: NaN out (as msign), and the previous basis kept for the next step
    bad = jnp.asarray(m, jnp.float32).at[0, 0].set(jnp.nan)
    o, kept = _step(bad, basis)
    assert bool(jnp.all(jnp.isnan(o)))
    np.testing.assert_array_equal(kept.v, basis.v)
    # entries near float32's maximum: scaled before any product
    big = init_streaming_basis(m.shape)
    for _ in range(20):
        o, big = _step(jnp.asarray(m * 1e30, jnp.float32), big)
    assert rel_err(o, ref_msign(m)) < 1e-3
    np.testing.assert_allclose(np.asarray(big.sigma[:4]) / 1e30, svals(m)[:4], rtol=1e-3)


def test_bf16_input_and_one_compile():
    shape = (48, 32)
    basis = init_streaming_basis(shape)
    step = jit_once(lambda m, b: streaming_msign(m, b))  # a second trace fails
    for e in drifting_momenta(shape, 20, seed=3):
        o, basis = step(jnp.asarray(e, jnp.bfloat16), basis)
    assert o.dtype == jnp.bfloat16 and basis.v.dtype == jnp.float32
    # bf16 rounding of the input (2^-9) is all that separates it from a float32 input
    exact = rel_err(o, ref_msign(np.asarray(jnp.asarray(e, jnp.bfloat16), np.float64)))
    assert exact < 0.06, exact
    assert np.all(np.isfinite(np.asarray(basis.v)))


def test_sharded_matches_single_device():
    shape = (2, 32, 48)
    es = list(drifting_momenta(shape, 2, seed=4))
    want_basis = init_streaming_basis(shape)
    for e in es:
        want, want_basis = _step(jnp.asarray(e, jnp.float32), want_basis)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
        mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
        sharding = NamedSharding(mesh, PartitionSpec(None, None, "x"))
        # the state placed on the mesh (replicated) as a train state is: one trace
        basis = jax.device_put(init_streaming_basis(shape), NamedSharding(mesh, PartitionSpec()))
        step = jax.jit(lambda m, b: streaming_msign(m, b))
        for e in es:
            o, basis = step(jax.device_put(jnp.asarray(e, jnp.float32), sharding), basis)
        assert o.sharding.is_equivalent_to(sharding, 3)
        assert basis.v.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec()), 3)
        np.testing.assert_allclose(o, want, atol=2e-5)
        np.testing.assert_allclose(basis.sigma, want_basis.sigma, rtol=2e-5)


# -------------------------------------------------------------------------- cost

#: Textbook flop counts of the LAPACK calls XLA:CPU leaves as custom calls (which
#: cost_analysis does not count), for an (..., a, b) result: Cholesky a³/3, a triangular
#: solve with a b-column right side a²b, Householder QR and forming its Q 4/3·b³ each
#: (square). Charged for every call in the program, the never-taken fallback included.
_LAPACK = {
    "potrf": lambda a, b: a**3 / 3,
    "trsm": lambda a, b: a * a * b,
    "geqrf": lambda a, b: 2 * a * b * b - 2 * b**3 / 3,
    "orgqr": lambda a, b: 2 * a * b * b - 2 * b**3 / 3,
}


def program_flops(fn, *args):
    """cost_analysis's flops plus the LAPACK custom calls at their textbook counts."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    calls = 0
    for line in compiled.as_text().splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target is None:
            continue
        kind = next((k for k in _LAPACK if k in target.group(1)), None)
        assert kind is not None, f"uncounted custom call {target.group(1)}"
        dims = [int(d) for d in re.search(r"= \(?\w+\[([\d,]*)\]", line).group(1).split(",")]
        flops += int(np.prod(dims[:-2])) * _LAPACK[kind](*dims[-2:])
        calls += 1
    return flops, calls


def test_step_costs_fewer_flops_than_newton_schulz():
    # square is the least favourable shape: the O(k³) work is largest next to the O(nk²)
    shape = (64, 64)
    m = jnp.ones(shape, jnp.float32)
    streaming, calls = program_flops(streaming_msign, m, init_streaming_basis(shape))
    newton_schulz, _ = program_flops(lambda m: msign(m, steps=5), m)
    assert calls >= 4  # two Cholesky factors and two solves, at least
    # measured: 0.65x of 5-step Newton-Schulz (0.42x for 256 x 64)
    assert streaming <= newton_schulz, (streaming, newton_schulz)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"m": jnp.ones(4)}, ValueError, r"streaming_msign: m must have rank >= 2"),
        ({"m": jnp.ones((4, 3), jnp.int32)}, TypeError, r"m must be a floating-point array"),
        ({"basis": init_streaming_basis((5, 4))}, ValueError, r"basis must hold v of shape"),
        ({"basis": (jnp.eye(3), jnp.ones(3))}, ValueError, r"basis must be a StreamingBasis"),
        ({"iters": 0}, ValueError, r"iters must be an int >= 1, got 0"),
        ({"shift": -1e-3}, ValueError, r"shift must be in \[0, 1\), got -0.001"),
        ({"shift": float("nan")}, ValueError, r"shift must be in \[0, 1\), got nan"),
        ({"floor": 1.0}, ValueError, r"floor must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    args = {"m": jnp.ones((4, 3)), "basis": init_streaming_basis((4, 3))} | kwargs
    with pytest.raises(error, match=match):
        streaming_msign(args.pop("m"), args.pop("basis"), **args)


def test_init_checks_the_shape_and_works_abstractly():
    with pytest.raises(ValueError, match=r"init_streaming_basis: shape must have rank >= 2"):
        init_streaming_basis((5,))
    b = jax.eval_shape(lambda: init_streaming_basis((3, 8, 5)))
    assert isinstance(b, StreamingBasis)
    assert b.v.shape == (3, 5, 5) and b.sigma.shape == (3, 5)
    np.testing.assert_array_equal(init_streaming_basis((2, 3))[0], np.eye(2))


# ------------------------------------------------------ a float64 reference iteration


def ref_streaming(m, v, shift=1e-6, floor=1e-3):
    """One step in float64 NumPy with Householder QR: V ← QR((XᵀX + μI)V) (the double
    QR of 11673 equals it up to column signs, which U Vᵀ and σ do not see)."""
    m = np.asarray(m, np.float64)
    tall = m.shape[-2] >= m.shape[-1]
    x = m if tall else np.swapaxes(m, -1, -2)
    norm = np.linalg.norm(x, axis=(-2, -1), keepdims=True)
    x = x / norm
    p = np.swapaxes(x, -1, -2) @ x
    v, _ = np.linalg.qr(p @ v + shift * v)
    u = x @ v
    sig = np.linalg.norm(u, axis=-2)
    den = np.maximum(sig, floor * sig.max(axis=-1, keepdims=True))
    o = (u / den[..., None, :]) @ np.swapaxes(v, -1, -2)
    return (o if tall else np.swapaxes(o, -1, -2)), v, sig * norm[..., 0]


@pytest.mark.parametrize("shape", [(48, 32), (2, 32, 48)], ids=str)
def test_each_step_matches_a_float64_householder_reference(shape):
    basis = init_streaming_basis(shape)
    v = np.asarray(basis.v, np.float64)
    for e in drifting_momenta(shape, 6, seed=7):
        o, basis = _step(jnp.asarray(e, jnp.float32), basis)
        want, v, sig = ref_streaming(e, v)
        np.testing.assert_allclose(np.asarray(o, np.float64), want, atol=1e-4)
        np.testing.assert_allclose(np.asarray(basis.sigma, np.float64), sig, rtol=1e-4)


# ---------------------------------------------- Muon's streaming orthogonalizer


def muon_params():
    # no leaf shaped like a basis's v or sigma ((16, 16), (16,), (2, 8, 8), (2, 8)): the
    # device-path helper matches state leaves to params by shape, and the basis is
    # replicated where params are sharded
    s = np.concatenate([[2.0], np.linspace(1.0, 0.1, 7)])
    w = lambda rows, cols, seed: (
        (np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, 8)))[0] * s)
        @ np.linalg.qr(np.random.default_rng(seed + 9).standard_normal((cols, 8)))[0].T
    ).astype(np.float32)
    return {
        "mlp": {"kernel": jnp.asarray(w(16, 24, 0))},
        "scan": {"kernel": jnp.asarray(np.stack([w(8, 16, 1), w(8, 16, 2)]))},
    }


def test_muon_streaming_against_a_float64_reference():
    beta, steps = 0.95, 4
    params = {"mlp": {"kernel": jnp.zeros((24, 16))}, "scan": {"kernel": jnp.zeros((2, 16, 24))}}
    tx = scale_by_muon(beta=beta, orthogonalizer="streaming", scale="none")
    state = tx.init(params)
    step = jax.jit(tx.update)
    rng = np.random.default_rng(0)
    ref = {k: (np.zeros(p["kernel"].shape), None) for k, p in params.items()}
    for _ in range(steps):
        grads = {k: {"kernel": rng.standard_normal(p["kernel"].shape)} for k, p in params.items()}
        u, state = step(jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads), state)
        for k, (e, v) in ref.items():
            g = grads[k]["kernel"]
            e = beta * e + (1 - beta) * g
            n = beta * e + (1 - beta) * g  # Nesterov
            k_dim = min(n.shape[-2:])
            v = np.broadcast_to(np.eye(k_dim), (*n.shape[:-2], k_dim, k_dim)) if v is None else v
            o, v, sig = ref_streaming(n, v)
            ref[k] = (e, v)
            np.testing.assert_allclose(np.asarray(u[k]["kernel"], np.float64), o, atol=1e-4)
            np.testing.assert_allclose(state.basis[k]["kernel"].sigma, sig, rtol=1e-4)
    assert state.count == steps and state.basis["scan"]["kernel"].v.shape == (2, 16, 16)


def test_muon_streaming_guard_and_bad_arguments():
    params = muon_params()
    tx = scale_by_muon(orthogonalizer="streaming")
    grads = jax.tree.map(jnp.ones_like, {"mlp": {"kernel": params["mlp"]["kernel"]}})
    p = {"mlp": {"kernel": params["mlp"]["kernel"]}}
    state = tx.init(p)
    _, state = tx.update(grads, state, p)
    # a NaN gradient leaf: zero direction, momentum and basis kept
    bad = {"mlp": {"kernel": grads["mlp"]["kernel"].at[0, 0].set(jnp.nan)}}
    u, new = tx.update(bad, state, p)
    assert float(jnp.abs(u["mlp"]["kernel"]).max()) == 0.0 and int(new.skipped_steps) == 1
    np.testing.assert_array_equal(new.basis["mlp"]["kernel"].v, state.basis["mlp"]["kernel"].v)
    np.testing.assert_array_equal(new.mu["mlp"]["kernel"], state.mu["mlp"]["kernel"])
    with pytest.raises(ValueError, match=r"orthogonalizer must be one of .*got 'qr'"):
        scale_by_muon(orthogonalizer="qr")
    with pytest.raises(ValueError, match=r"streaming_iters must be an int >= 1, got 0"):
        scale_by_muon(orthogonalizer="streaming", streaming_iters=0)
    with pytest.raises(ValueError, match=r"orthogonalizer='streaming' with owner_axes"):
        scale_by_muon(orthogonalizer="streaming", owner_axes="data")
    # Newton-Schulz keeps no basis
    assert scale_by_muon().init(p).basis is None


# (device paths, abstract init and one compile of muon(orthogonalizer="streaming"):
# tests/test_device_paths.py)

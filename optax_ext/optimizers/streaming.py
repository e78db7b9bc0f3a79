"""Su's streaming power iteration: msign and the spectrum of a slowly changing matrix, one
power-iteration + QR step per training step, the singular basis kept in the optimizer state.

For M (n x k after transposing so that n ≥ k) with SVD M = U Σ Vᵀ, msign(M) = U Vᵀ. Power
iteration with re-orthonormalisation, V ← QR(MᵀM V), converges to V (up to column signs);
then U = ColNorm(M V) and Σ = the column norms of M V. Muon's momentum changes little
from one step to the next, so one iteration per step, started from the previous step's
V, tracks the basis: the cost of the iteration is spread over training.

References:
  Su Jianlin, https://kexue.fm/archives/11654 (the streaming scheme), .../11673 (the double
  QR and the shift of MᵀM by a multiple of I), .../11697 (one O(nk²) product per step,
  Cholesky QR), .../11710 (why Cholesky QR's shifts do not accumulate: each is a right
  factor that leaves QR's result unchanged), .../11719 (other streaming updates);
  Ahn et al., "Dion: Distributed Orthonormalized Updates", https://arxiv.org/abs/2504.05295
  (a streaming low-rank orthonormaliser); Fukaya et al., "Shifted CholeskyQR for computing
  the QR factorization of ill-conditioned matrices", https://arxiv.org/abs/1809.11085.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from optax_ext._common import check_int, check_range, explicitly_sharded
from optax_ext.optimizers.msign import check_matrix

__all__ = [
    "StreamingBasis",
    "init_streaming_basis",
    "streaming_msign",
]

#: Su (11673) found TF32 matmuls make Cholesky fail far more often; the small products
#: here are a few percent of the step, so they run at full float32 precision.
_HIGHEST = jax.lax.Precision.HIGHEST


class StreamingBasis(NamedTuple):
    """The streaming orthogonaliser's state for one leaf's batch of matrices.

    Attributes:
      v: (*batch, k, k), k = min(d_in, d_out): the orthonormal basis that converges to
        the singular vectors of the smaller side (the right ones of a tall matrix, the
        left ones of a wide matrix), column i to the i-th largest; float32 or wider.
      sigma: (*batch, k): the tracked singular values of the last matrix given, in the
        basis's column order (descending once the basis has converged), in the matrix's
        units. Zeros before the first step.
    """

    v: jax.Array
    sigma: jax.Array


def _basis_shape(who: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(f"{who}: shape must have rank >= 2 (*batch, d_in, d_out), got {shape}")
    k = min(shape[-2:])
    return (*shape[:-2], k, k)


def init_streaming_basis(shape: Sequence[int], dtype: Any = jnp.float32) -> StreamingBasis:
    """The starting state for matrices of ``shape`` (*batch, d_in, d_out): V₀ = I (Su, 11654).

    Works on abstract shapes (``jax.eval_shape``). ``ValueError`` for a shape of rank < 2.
    """
    vshape = _basis_shape("init_streaming_basis", shape)
    k = vshape[-1]
    v = jnp.broadcast_to(jnp.eye(k, dtype=dtype), vshape)
    return StreamingBasis(v=v, sigma=jnp.zeros(vshape[:-1], dtype))


def streaming_msign(
    m: jax.Array,
    basis: StreamingBasis,
    *,
    iters: int = 1,
    shift: float = 1e-6,
    floor: float = 1e-3,
) -> tuple[jax.Array, StreamingBasis]:
    r"""msign(M) ≈ U Vᵀ from one streaming power-iteration step; returns ``(o, new_basis)``.

    With M transposed to be tall (n x k, n ≥ k), X = M/‖M‖_F, P = XᵀX and μ = ``shift``,
    each of ``iters`` iterations (Su's double QR in the order of 11697, with 11673's shift):

    .. math::

        A_1 = (P + \mu I)V,\quad R_1^\top R_1 = V^\top A_1,\quad A_2 = A_1 R_1^{-1},\quad
        R_2^\top R_2 = A_2^\top A_2,\quad V \leftarrow A_2 R_2^{-1}

    i.e. V ← QR(Xᵀ QR(X V)) computed from the k x k matrix P by two Cholesky QRs (P is
    the step's one O(nk²) product before the output; the iterations are O(k³)). Then

    .. math::

        \sigma_i = \lVert X v_i\rVert,\qquad
        o = X V \operatorname{diag}(1/\max(\sigma_i,\ \text{floor}\cdot\max_j\sigma_j)) V^\top

    (two more O(nk²) products; 5-step Newton–Schulz takes ten), so ColNorm(XV)Vᵀ
    (11654), with directions below ``floor`` times the largest scaled
    down rather than blown up (a zero or rank-deficient M gives zero there, as the exact
    msign does; Polar Express also starts at 1e-3). The shift μI leaves P's eigenvectors
    as they are and keeps the Cholesky factors' condition number at most 1 + 1/μ
    (trace P = 1), so the directions of a rank-deficient M stay orthonormal; it slows
    only the directions with σᵢ² < μ‖M‖_F². If a Cholesky factor fails anyway (not
    finite), this step's basis comes from Householder QR instead; a non-finite M keeps
    the previous basis (and gives NaN, as msign does).

    Accuracy: the error comes from the basis lagging the matrix. From V₀ = I the first
    steps are far off; on a momentum whose matrix drifts slowly the basis converges at
    (σ_{i+1}/σ_i)² per step for each pair of directions, and the directions that
    converge slowest, those with nearly equal σ, matter least to U Vᵀ. A matrix that
    changes faster than that keeps the error up. ``iters`` > 1 reuses P: each extra
    iteration costs O(k³).

    Args:
      m: a floating-point array of rank ≥ 2, (*batch, rows, cols): the matrices (Muon's
        momentum, seen as matrices).
      basis: the :class:`StreamingBasis` carried from the last step (or
        :func:`init_streaming_basis` of ``m.shape``); its ``v`` has shape
        (*batch, k, k), k = min(rows, cols).
      iters: power iterations this step (static int ≥ 1).
      shift: μ ≥ 0 relative to ‖M‖_F², in [0, 1).
      floor: relative singular-value floor in [0, 1).

    Returns:
      ``(o, new_basis)``: o of ``m``'s shape and dtype; ``new_basis.sigma`` the singular
      values of ``m`` along the new basis (in ``m``'s units).

    Raises:
      ValueError: ``m`` of rank < 2, a basis of the wrong shape, bad ``iters``,
      ``shift`` or ``floor``. TypeError: a non-float ``m``.

    Example:
      >>> import jax.numpy as jnp
      >>> m = jnp.array([[3.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
      >>> o, basis = streaming_msign(m, init_streaming_basis(m.shape))
      >>> [round(float(x), 3) for x in jnp.diag(o)], [round(float(s), 3) for s in basis.sigma]
      ([1.0, 1.0], [3.0, 0.5])

    References:
      Su, `streaming power iteration <https://kexue.fm/archives/11654>`_,
      `<https://kexue.fm/archives/11673>`_, `<https://kexue.fm/archives/11697>`_,
      `<https://kexue.fm/archives/11710>`_.
    """
    check_matrix("streaming_msign", m)
    if isinstance(iters, jax.core.Tracer):
        raise TypeError("iters must be a static int (it unrolls the iterations), got a tracer")
    check_int("iters", iters, minimum=1)
    check_range("shift", shift, 0, 1, high_open=True, schedule=False)
    check_range("floor", floor, 0, 1, high_open=True, schedule=False)
    if not isinstance(basis, StreamingBasis):
        raise ValueError(
            f"streaming_msign: basis must be a StreamingBasis (init_streaming_basis(m.shape)), "
            f"got {type(basis).__name__}"
        )
    want = _basis_shape("streaming_msign", m.shape)
    if tuple(basis.v.shape) != want or tuple(basis.sigma.shape) != want[:-1]:
        raise ValueError(
            f"streaming_msign: basis must hold v of shape {want} and sigma of shape "
            f"{want[:-1]} for m of shape {tuple(m.shape)}, got {tuple(basis.v.shape)} and "
            f"{tuple(basis.sigma.shape)}"
        )
    run = lambda m, b: _streaming(m, b, int(iters), shift, floor)
    if explicitly_sharded(m):
        # Products of explicitly sharded operands must name their output sharding: let the
        # partitioner choose inside; the basis comes back with the sharding it came with
        # (so a jitted step's state keeps its type and the step compiles once), replicated
        # if it was not on the mesh.
        mesh = jax.typeof(m).sharding.mesh
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def like(x):
            sharding = jax.typeof(x).sharding
            return sharding if getattr(sharding, "mesh", None) == mesh else rep

        out = (jax.typeof(m).sharding, StreamingBasis(like(basis.v), like(basis.sigma)))
        return jax.sharding.auto_axes(run, out_sharding=out)(m, basis)
    return run(m, basis)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _sym(g: jax.Array) -> jax.Array:
    return 0.5 * (g + _t(g))


def _cholesky_qr(a: jax.Array, gram: jax.Array) -> jax.Array:
    """A R⁻¹ with RᵀR = ``gram`` (= AᵀA, or a form of it with the same R): Q of A = QR."""
    r = jnp.linalg.cholesky(_sym(gram), upper=True)
    return _t(solve_triangular(_t(r), _t(a), lower=True))


def _power_step(p: jax.Array, v: jax.Array, mu: float) -> jax.Array:
    """One iteration V ← QR((P + μI)V), as QR(Xᵀ QR(XV)) by two Cholesky QRs (11697)."""
    a1 = _mm(p, v) + mu * v
    a2 = _cholesky_qr(a1, _mm(_t(v), a1))
    return _cholesky_qr(a2, _mm(_t(a2), a2))


def _householder_step(p: jax.Array, v: jax.Array, mu: float) -> jax.Array:
    return jnp.linalg.qr(_mm(p, v) + mu * v)[0]


def _streaming(m, basis, iters, shift, floor):
    v_old = basis.v
    work = jnp.promote_types(jnp.promote_types(m.dtype, v_old.dtype), jnp.float32)
    tall = m.shape[-2] >= m.shape[-1]
    x = m.astype(work) if tall else _t(m.astype(work))
    # X = M/‖M‖_F, divided by the largest entry first: no overflow in the norm (msign's way)
    s = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    y = x / jnp.where(s == 0, 1.0, s)
    fro = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
    x = y / jnp.where(fro == 0, 1.0, fro)
    p = _sym(_mm(_t(x), x))  # trace 1: μ is relative to ‖M‖_F²
    mu = jnp.asarray(shift, work)

    v = v_old.astype(work)
    chol = v
    for _ in range(iters):
        chol = _power_step(p, chol, mu)

    def householder(_):
        h = v
        for _ in range(iters):
            h = _householder_step(p, h, mu)
        return h

    # a failed Cholesky factor is NaN: redo this step with Householder QR (Su's fallback)
    v_new = jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda c: c, householder, chol)
    # a non-finite M: keep the last good basis for the next step
    finite = jnp.all(jnp.isfinite(v_new), axis=(-2, -1), keepdims=True)
    v_new = jnp.where(finite, v_new, v)

    u = _mm(x, v_new)
    sig = jnp.linalg.norm(u, axis=-2)  # (*batch, k)
    low = floor * jnp.max(sig, axis=-1, keepdims=True)
    den = jnp.maximum(sig, low)
    o = _mm(u / jnp.where(den == 0, 1.0, den)[..., None, :], _t(v_new))
    o = o if tall else _t(o)
    scale = (s * fro)[..., 0]  # ‖M‖_F: σ back in M's units
    new = StreamingBasis(v=v_new.astype(v_old.dtype), sigma=(sig * scale).astype(basis.sigma.dtype))
    return o.astype(m.dtype), new

"""msign, the matrix sign U Vᵀ, by a quintic Newton–Schulz iteration with named coefficients.

msign(M) = U Vᵀ for the thin SVD M = U Σ Vᵀ, i.e. M (MᵀM)^{-1/2}: every nonzero
singular value replaced by 1. Muon's update is msign of its momentum.

References:
  Su Jianlin, https://kexue.fm/archives/10592 (Muon as steepest descent under the
  spectral norm), https://kexue.fm/archives/10922 and https://kexue.fm/archives/10996
  (coefficients), https://kexue.fm/archives/11059 (mclip via msign); Amsel et al.,
  "The Polar Express", https://arxiv.org/abs/2505.16932; Jordan et al., Muon,
  https://kellerjordan.github.io/posts/muon/.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext._common import check_int, check_range, explicitly_sharded

__all__ = [
    "NS_COEFFICIENTS",
    "check_compute_dtype",
    "msign",
    "msign_svd",
    "newton_schulz_coefficients",
    "singular_value_range",
]

_KELLER = ((3.4445, -4.7750, 2.0315),)
_SU_SINGLE = ((3.3748, -4.6969, 2.1433),)
#: The classical quintic with a fixed point at 1 and zero slope there: it only refines.
_FINISH = (1.875, -1.25, 0.375)
_SU = (
    (4.6182, -12.9582, 9.3299),
    (3.8496, -7.9585, 4.3052),
    (3.5204, -7.2918, 4.0606),
    (3.2067, -6.8243, 4.2802),
    (3.2978, -5.7848, 3.8917),
    # Su fits the five rows jointly for exactly five steps; repeating the fifth diverges
    # (singular values reach ~36 by step 7), so further steps use the refining quintic.
    _FINISH,
)
_POLAR_EXPRESS_RAW = (
    (8.287212018145622, -23.59588651909882, 17.300387312530923),
    (4.107059111542197, -2.9478499167379084, 0.54484310829266),
    (3.9486908534822938, -2.908902115962947, 0.5518191394370131),
    (3.3184196573706055, -2.488488024314878, 0.5100489401237208),
    (2.3006520199548186, -1.6689039845747518, 0.4188073119525678),
    (1.8913014077874002, -1.2679958271945908, 0.37680408948524996),
    _FINISH,
)
#: The safety factor 1.01 evaluates each polynomial at x/1.01, so singular values a
#: little above 1 after rounding (bf16) are still pulled back instead of amplified.
_POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_RAW)

#: Named Newton–Schulz coefficient tables: step i uses row min(i, len - 1), so the last
#: row repeats for any further step.
#:
#: - ``"keller"``: Keller Jordan's (3.4445, -4.7750, 2.0315) every step.
#: - ``"su_single"``: Su's single fitted set (kexue.fm/archives/10922).
#: - ``"su"``: Su's five per-step fits (10922), then (1.875, -1.25, 0.375).
#: - ``"polar_express"``: the greedy min-max rows on [1e-3, 1] (10996, 11059; Polar
#:   Express) with the 1.01 safety factor, the last row (1.875, -1.25, 0.375) repeated.
NS_COEFFICIENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "keller": _KELLER,
    "su_single": _SU_SINGLE,
    "su": _SU,
    "polar_express": _POLAR_EXPRESS,
}


def newton_schulz_coefficients(coeffs: Any, name: str = "coeffs") -> tuple[tuple[float, ...], ...]:
    """The validated coefficient table for ``coeffs``: a name of :data:`NS_COEFFICIENTS`,
    one ``(a, b, c)`` or a sequence of them (step i uses row min(i, len - 1)).

    Raises ``ValueError`` (naming ``name``) for an unknown name, a row that is not three
    finite numbers, an empty table, or a row whose polynomial does not grow small
    singular values (a ≤ 0: the iteration would send them to zero or flip their sign).
    """
    if isinstance(coeffs, str):
        if coeffs not in NS_COEFFICIENTS:
            raise ValueError(f"{name} must be one of {list(NS_COEFFICIENTS)!r}, got {coeffs!r}")
        return NS_COEFFICIENTS[coeffs]
    try:
        rows = np.asarray(coeffs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a name, an (a, b, c) triple or a sequence of them, got {coeffs!r}"
        ) from None
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != 3:
        raise ValueError(
            f"{name} must be an (a, b, c) triple or a non-empty sequence of them, "
            f"got shape {rows.shape}"
        )
    if not np.all(np.isfinite(rows)):
        raise ValueError(f"{name} must hold finite numbers, got {coeffs!r}")
    if np.any(rows[:, 0] <= 0):
        i = int(np.argmax(rows[:, 0] <= 0))
        raise ValueError(f"{name}[{i}]: a must be in (0, inf), got {rows[i, 0]!r}")
    return tuple(tuple(float(v) for v in row) for row in rows)


def _static_steps(steps: Any) -> int | None:
    """``steps`` as a Python int when it is concrete, None when it is traced (an integer
    scalar; its sign cannot be checked, see :func:`msign`)."""
    if isinstance(steps, jax.core.Tracer):
        if steps.ndim or not jnp.issubdtype(steps.dtype, jnp.integer):
            raise TypeError(
                f"steps must be an int, got a traced {steps.dtype} of shape {steps.shape}"
            )
        return None
    return int(check_int("steps", steps, minimum=0))


def check_compute_dtype(compute_dtype: Any, name: str = "compute_dtype") -> Any:
    """``compute_dtype`` as a floating ``jnp.dtype`` (``None`` kept: at least float32).

    Newton–Schulz in an integer dtype rounds X_0, whose entries are at most 1, to 0 and
    returns zeros; so only real floating dtypes are accepted (``TypeError`` naming
    ``name`` otherwise).
    """
    if compute_dtype is None:
        return None
    try:
        dt = jnp.dtype(compute_dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{name} must be a floating dtype such as jnp.float32 or jnp.bfloat16 (or None), "
            f"got {compute_dtype!r}: Newton-Schulz in an integer dtype rounds every entry "
            "of the normalised matrix to 0"
        )
    return dt


def check_matrix(who: str, m: Any) -> None:
    """``m`` must be a floating-point array of rank >= 2 (a batch of matrices)."""
    dtype = getattr(m, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{who}: m must be a floating-point array, got {dtype or type(m).__name__}; "
            "cast it first, e.g. m.astype(jnp.float32)"
        )
    if m.ndim < 2:
        raise ValueError(
            f"{who}: m must have rank >= 2 (the last two axes are the matrix, the others a "
            f"batch), got shape {m.shape}; a vector is m[None, :] as a 1 x n matrix"
        )


def msign(
    m: jax.Array,
    *,
    coeffs: Any = "polar_express",
    steps: Any = 5,
    compute_dtype: Any = None,
    eps: float = 1e-7,
) -> jax.Array:
    r"""msign(M) ≈ U Vᵀ by Newton–Schulz, over the last two axes (leading axes are batch).

    With M transposed so that it is wide (rows ≤ columns), s = max |M_ij| its largest
    entry, and each step's (a, b, c):

    .. math::

        Y = M / s,\qquad
        X_0 = \frac{Y}{\lVert Y\rVert_F + \varepsilon}
            = \frac{M}{\lVert M\rVert_F + \varepsilon s},\qquad
        A = X X^\top,\quad X \leftarrow a X + (b A + c A^2) X

    Each singular value of X follows x ↦ a x + b x³ + c x⁵, and X_0's lie in (0, 1].
    Dividing by s first makes msign scale-invariant at every scale, msign(cM) = msign(M)
    for c > 0: Y's entries are at most 1 and ‖Y‖_F ≥ 1, so the norm neither overflows
    (float32's sum of squares does for entries near 1e19: M/‖M‖_F came back zero) nor
    lets an absolute ε swamp a tiny matrix (at ‖M‖_F = 1e-9 it would shrink every
    singular value toward 0); ε acts relative to the largest entry. A zero matrix
    maps to zero (also with ε = 0); a NaN or ±inf entry gives NaN everywhere.
    Starting from [1e-3, 1] (Su's design interval) the singular values after 5 / 6
    steps lie in about: ``"polar_express"`` [0.85, 1.12] / [0.994, 1.001],
    ``"su"`` [0.61, 1.05] / [0.89, 1.00], ``"keller"`` [0.47, 1.20] / [0.68, 1.20],
    ``"su_single"`` [0.43, 1.18] / [0.82, 1.18] (benchmarks/bench_muon.py computes
    these). Singular values below 1e-3·‖M‖_F converge more slowly; zero ones stay 0.

    Args:
      m: a floating-point array of rank ≥ 2; the last two axes are the matrix, the
        others batch (stacked layers, experts, heads). Integer, boolean and complex
        arrays raise ``TypeError``.
      coeffs: a name in :data:`NS_COEFFICIENTS` or an explicit ``(a, b, c)`` / sequence
        of them; step i uses row min(i, len - 1). Validated when called.
      steps: number of Newton–Schulz steps (≥ 0; 0 returns X_0). May be a traced
        integer (``optax.inject_hyperparams``): the steps then run in a loop. A traced
        value cannot be checked: a negative one is clamped to 0 steps (X_0 is
        returned); ``ox.inject_hyperparams`` validates injected values.
      compute_dtype: a floating dtype for the iteration (e.g. ``jnp.bfloat16`` on
        accelerators). Default: at least float32. The normalisation is always done in
        float32 or wider.
      eps: ε ≥ 0 (finite), added to ‖Y‖_F ≥ 1: a margin relative to the largest entry
        that keeps X_0's singular values below 1 after rounding.

    Returns:
      An array of ``m``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> o = msign(jnp.array([[3.0, 0.0], [0.0, 0.5]]), steps=8)
      >>> [round(float(v), 3) for v in jnp.diag(o)]
      [1.0, 1.0]

    References:
      Su, `msign coefficients <https://kexue.fm/archives/10922>`_,
      `<https://kexue.fm/archives/10996>`_; Amsel et al., `The Polar Express
      <https://arxiv.org/abs/2505.16932>`_, 2025.
    """
    rows = newton_schulz_coefficients(coeffs)
    n_steps = _static_steps(steps)
    compute_dtype = check_compute_dtype(compute_dtype)
    check_range("eps", eps, 0, schedule=False)
    check_matrix("msign", m)
    run = lambda m, steps: _newton_schulz(m, rows, n_steps, steps, compute_dtype, eps)
    if explicitly_sharded(m):
        # Products of explicitly sharded operands must name their output sharding: let
        # the partitioner choose inside, and return the input's sharding.
        return jax.sharding.auto_axes(run, out_sharding=jax.typeof(m).sharding)(m, steps)
    return run(m, steps)


def _newton_schulz(m, rows, n_steps, steps, compute_dtype, eps):
    wide = m.shape[-2] <= m.shape[-1]
    x = m if wide else jnp.swapaxes(m, -1, -2)
    norm_dtype = jnp.promote_types(m.dtype, jnp.float32)
    work = norm_dtype if compute_dtype is None else compute_dtype
    x = _normalise(x.astype(norm_dtype), eps).astype(work)

    def step(x, a, b, c):
        a_ = x @ jnp.swapaxes(x, -1, -2)
        return a * x + (b * a_ + c * (a_ @ a_)) @ x

    if n_steps is not None:
        for i in range(n_steps):
            a, b, c = rows[min(i, len(rows) - 1)]
            x = step(x, a, b, c)
    else:
        table = jnp.asarray(rows, work)

        def body(i, x):
            a, b, c = table[jnp.minimum(i, len(rows) - 1)]
            return step(x, a, b, c)

        # a traced count cannot be checked: a negative one runs no step (as range() would)
        x = jax.lax.fori_loop(0, jnp.maximum(steps, 0), body, x)
    x = x if wide else jnp.swapaxes(x, -1, -2)
    return x.astype(m.dtype)


def _normalise(x: jax.Array, eps: Any) -> jax.Array:
    """X_0 = Y / (‖Y‖_F + ε) with Y = x / max|x_ij| per matrix (see :func:`msign`).

    Divided, not multiplied by 1/s: for s near float32's maximum 1/s is subnormal, which
    XLA:CPU flushes to 0. A zero matrix (s = 0) stays zero whatever ε; NaN and ±inf
    entries make s or ‖Y‖_F NaN, so the whole matrix comes back NaN.
    """
    s = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    zero = s == 0  # False for a NaN s, which then spreads through the division
    y = x / jnp.where(zero, 1.0, s)
    norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
    return y / jnp.where(zero, 1.0, norm + eps)


def msign_svd(m: Any) -> np.ndarray:
    """The exact msign U Vᵀ in float64 NumPy by SVD, over the last two axes (a reference).

    Singular values below ``max(shape) * eps64 * σ_max`` are treated as zero, so a
    rank-deficient matrix gets a partial isometry.
    """
    m = np.asarray(m, np.float64)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    cutoff = max(m.shape[-2:]) * np.finfo(np.float64).eps * s.max(axis=-1, keepdims=True)
    keep = (s > cutoff).astype(np.float64)
    return np.einsum("...ik,...k,...kj->...ij", u, keep, vt)


def singular_value_range(coeffs: Any, steps: int, low: float = 1e-3, n: int = 20001) -> tuple:
    """(min, max) of the scalar map x ↦ a x + b x³ + c x⁵ composed ``steps`` times over
    a log grid of [low, 1]: the singular-value range msign reaches from that interval."""
    rows = newton_schulz_coefficients(coeffs)
    x = np.geomspace(low, 1.0, n)
    for i in range(steps):
        a, b, c = rows[min(i, len(rows) - 1)]
        x = a * x + b * x**3 + c * x**5
    return float(x.min()), float(x.max())

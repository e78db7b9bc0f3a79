r"""Learning-rate rules when the batch size changes.

Notation: per-sample gradient mean :math:`g` (= G), covariance :math:`\Sigma`, Hessian
:math:`H`; a batch of :math:`B` samples has gradient covariance :math:`\Sigma/B`.

- Simple rules: square root (variance view) and linear (SDE view, Goyal et al.).
- SGD (second-order view, McCandlish et al. 2018; Su, kexue.fm/archives/10542):
  :math:`\eta^*(B) = \eta_{max}/(1 + B_{noise}/B)`, with momentum the noise term shrinks by
  :math:`(1-\beta_1)/(1+\beta_1)` (kexue.fm/archives/11301).
- Sign updates (SignSGD, Lion, Tiger): the optimal learning rate rises, peaks and *falls*
  as the batch grows (the "surge"), in Su's form (archives/10542), the mean-field form
  from g and H (archives/11280) and Li et al.'s peak form (arXiv 2405.14578).
- Muon (archives/11285): the sign form without a surge term,
  :math:`\eta^*(B) \approx \eta_{max}/\sqrt{1 + B_{simple}/B}`.
- Adam, mean field with momentum (archives/11301), its peak, and Malladi et al.'s SDE
  rule (arXiv 2205.10287); beta2 by token half-life (Marek et al. 2025).
- Adam's ε as a SoftSign (archives/10563): the whole optimal-lr curve of
  :math:`\mathrm{softsign}(x, \epsilon) = x/\sqrt{x^2+\epsilon^2}` updates, between
  SignSGD (ε = 0) and SGD (ε → ∞), and the surge condition it weakens.

Every function computing an optimal learning rate from a curve returns an
:class:`OptimalLR` ``(lr, peak_batch, has_peak)``: ``peak_batch`` is ``None`` and
``has_peak`` is ``False`` where the theory says the curve has no interior maximum
(it then rises monotonically towards its large-batch limit).

Inputs may be Python floats or NumPy arrays (a grid of batch sizes); scalar inputs give
Python floats. Arguments are checked: a ``ValueError`` names the argument, the value and
the valid range.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = [
    "OptimalLR",
    "SGDNoiseStats",
    "AdamPeak",
    "AdamSDE",
    "sqrt_rule",
    "linear_rule",
    "sgd_noise_stats",
    "momentum_factor",
    "sgd_optimal_lr",
    "sgd_loss_decrease",
    "sgd_transfer",
    "sign_beta",
    "sign_beta_noise",
    "sign_peak_batch",
    "sign_optimal_lr",
    "sign_optimal_lr_mean_field",
    "sign_transfer",
    "li_optimal_lr",
    "muon_optimal_lr",
    "muon_transfer",
    "adam_peak",
    "adam_optimal_lr",
    "adam_transfer",
    "adam_eps_b_simple",
    "SoftSignCurve",
    "softsign_curve",
    "softsign_optimal_lr",
    "adam_sde_rule",
    "beta2_by_half_life",
    "half_life_tokens",
    "SU_C",
    "MEAN_FIELD_C",
]

#: Su's erf approximation constant in :math:`\beta(B) = (1 + c\,\kappa^2/B)^{-1/2}`.
SU_C = math.pi / 2
#: The mean-field constant (archives/11280).
MEAN_FIELD_C = 1.0


class OptimalLR(NamedTuple):
    """An optimal learning rate at a batch size, and where its curve peaks.

    Attributes:
      lr: the learning rate (float, or an array for an array of batch sizes).
      peak_batch: batch size of the curve's maximum; ``None`` when there is none.
      has_peak: ``True`` when the lr rises then falls with the batch size (beyond
        ``peak_batch`` a larger batch needs a *smaller* lr).
    """

    lr: Any
    peak_batch: float | None
    has_peak: bool


class SGDNoiseStats(NamedTuple):
    """SGD's second-order quantities from g, H and Sigma (McCandlish et al. 2018)."""

    lr_max: float
    b_noise: float
    b_simple: float
    loss_decrease_max: float


class AdamPeak(NamedTuple):
    """Where Adam's mean-field lr curve peaks (archives/11301).

    Attributes:
      beta: the peak's :math:`\\beta^* = \\sqrt{(1-\\beta_1)/(2\\beta_1)}` (``None`` if no peak).
      batch_ratio: peak batch / B_simple, :math:`(1-\\beta_1)/(3\\beta_1-1)` (``None`` if none).
      peak_batch: ``batch_ratio * b_simple`` when ``b_simple`` is given, else ``None``.
      has_peak: ``beta1 > 1/3``.
    """

    beta: float | None
    batch_ratio: float | None
    peak_batch: float | None
    has_peak: bool


class SoftSignCurve(NamedTuple):
    r"""The batch-independent sums of the SoftSign lr curve (archives/10563).

    With :math:`\nu = \mathrm{softsign}(g, \epsilon)` the curve is
    :math:`\eta^*(B) = \beta\,\mathrm{along} / (\beta^2\,\mathrm{coherent}
    + (1-\beta^2)\,\mathrm{trace})`.

    Attributes:
      along: :math:`\sum_i \nu_i g_i`, the update's mean progress along g.
      coherent: :math:`\nu^\top H \nu`, the curvature of the mean update.
      trace: :math:`\sum_i H_{ii}`, the curvature of the update's noise.
      kappa2: :math:`\kappa^2 = \mathrm{tr}\Sigma/(g^\top g + N\epsilon^2)`, the noise scale
        that softsign sees.
      beta_noise: :math:`\sqrt{\mathrm{trace}/(\mathrm{coherent}-\mathrm{trace})}`
        (``inf`` when coherent ≤ trace); the curve peaks at :math:`\beta = \beta_{noise}`,
        inside the reachable :math:`\beta < 1` only when coherent > 2·trace.
    """

    along: float
    coherent: float
    trace: float
    kappa2: float
    beta_noise: float


class AdamSDE(NamedTuple):
    """Adam's hyperparameters after Malladi et al.'s SDE scaling rule."""

    lr: float
    beta1: float
    beta2: float
    eps: float


# ------------------------------------------------------------------ simple rules


def sqrt_rule(lr, batch, new_batch):
    r"""Square-root rule: :math:`\eta' = \eta\sqrt{B'/B}` (keeps the update variance).

    Args:
      lr: learning rate at ``batch``.
      batch: current batch size.
      new_batch: target batch size.

    Returns:
      The learning rate at ``new_batch``.

    Example:
      >>> round(sqrt_rule(5e-4, 128, 1024), 8)
      0.00141421

    References:
      Su, "How should the learning rate change with the batch size?",
      https://kexue.fm/archives/10542 (variance view); Krizhevsky 2014, arXiv 1404.5997.
    """
    v.positive("lr", lr)
    v.positive("batch", batch)
    v.positive("new_batch", new_batch)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch)
    with v.arithmetic("the new lr", inputs):
        # Square roots first: the ratio new_batch/batch itself may leave float64.
        out = lr * new_batch**0.5 / batch**0.5
    return v.result("the new lr", v.scalar(out), inputs)


def linear_rule(lr, batch, new_batch):
    r"""Linear rule: :math:`\eta' = \eta B'/B` (SDE view; Goyal et al.'s 0.1·B/256).

    Example:
      >>> round(linear_rule(0.1, 256, 8192), 12)
      3.2

    References:
      Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv 1706.02677;
      https://kexue.fm/archives/10542.
    """
    v.positive("lr", lr)
    v.positive("batch", batch)
    v.positive("new_batch", new_batch)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch)
    with v.arithmetic("the new lr", inputs):
        out = lr * (new_batch / batch)
    return v.result("the new lr", v.scalar(out), inputs)


# ------------------------------------------------------------------------- SGD


def _as_vector(name, x):
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


def _as_matrix(name, x, n):
    a = np.asarray(x, dtype=np.float64)
    if a.shape != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite")
    return a


#: Relative tolerance of the Hessian checks: the asymmetry and the negative eigenvalues
#: that float32 round-off leaves in a Hessian from autodiff or finite differences pass.
HESSIAN_RTOL = 1e-6


def _as_hessian(name, x, n):
    """An (n, n) finite, symmetric, positive semi-definite matrix, symmetrised.

    The quadratic model behind the lr curves assumes curvature ≥ 0 in every direction
    the noisy update can take: with an indefinite H the sums stay finite and look
    plausible (an lr of 0.17 at one batch) but mean nothing.
    """
    h = _as_matrix(name, x, n)
    scale = float(np.max(np.abs(h)))
    gap = np.abs(h - h.T)
    if float(np.max(gap)) > HESSIAN_RTOL * scale:
        i, j = np.unravel_index(int(np.argmax(gap)), h.shape)
        raise ValueError(
            f"{name} must be symmetric (to {HESSIAN_RTOL:g} of its largest entry), got "
            f"{name}[{i}, {j}] = {float(h[i, j])!r} but {name}[{j}, {i}] = "
            f"{float(h[j, i])!r}; pass (H + H.T) / 2 if the asymmetry is round-off"
        )
    h = (h + h.T) / 2
    eigenvalues = np.linalg.eigvalsh(h)
    lowest = float(eigenvalues[0])
    if lowest < -HESSIAN_RTOL * float(np.max(np.abs(eigenvalues))):
        raise ValueError(
            f"{name} must be positive semi-definite (eigenvalues >= 0), got eigenvalues from "
            f"{lowest:.6g} to {float(eigenvalues[-1]):.6g}: the lr curve is a quadratic model's "
            f"optimum, meaningless where the curvature is negative; pass a PSD "
            f"approximation (Gauss-Newton, or the eigenvalues clipped at 0)"
        )
    return h


def sgd_noise_stats(g, hessian, sigma) -> SGDNoiseStats:
    r"""SGD's :math:`\eta_{max}`, :math:`B_{noise}`, :math:`B_{simple}`, :math:`\Delta L_{max}`.

    .. math::
      \eta_{max} = \frac{g^\top g}{g^\top H g},\quad
      B_{noise} = \frac{\mathrm{tr}(\Sigma H)}{g^\top H g},\quad
      B_{simple} = \frac{\mathrm{tr}\,\Sigma}{g^\top g},\quad
      \Delta L_{max} = \frac{(g^\top g)^2}{2\,g^\top H g}

    Args:
      g: mean gradient, shape (n,).
      hessian: Hessian H, shape (n, n); needs :math:`g^\top H g > 0`.
      sigma: per-sample gradient covariance, shape (n, n).

    Example:
      >>> s = sgd_noise_stats([1, 2], [[1, 0], [0, 4]], [[4, 0], [0, 1]])
      >>> round(s.lr_max, 6), round(s.b_noise, 6), s.b_simple
      (0.294118, 0.470588, 1.0)

    References:
      McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
      arXiv 1812.06162; https://kexue.fm/archives/10542 (second-order approximation).
    """
    g = _as_vector("g", g)
    h = _as_matrix("hessian", hessian, g.size)
    s = _as_matrix("sigma", sigma, g.size)
    gg = float(g @ g)
    ghg = float(g @ h @ g)
    if not ghg > 0:
        raise ValueError(f"g^T H g must be > 0 (curvature along g), got {ghg!r}")
    if not gg > 0:
        raise ValueError("g must be non-zero")
    return SGDNoiseStats(
        lr_max=gg / ghg,
        b_noise=float(np.trace(s @ h)) / ghg,
        b_simple=float(np.trace(s)) / gg,
        loss_decrease_max=gg**2 / (2 * ghg),
    )


def momentum_factor(beta1):
    r"""The factor :math:`r = (1-\beta_1)/(1+\beta_1)` by which momentum shrinks the noise.

    Momentum acts like a batch :math:`\times (1+\beta_1)/(1-\beta_1)`.

    Example:
      >>> round(momentum_factor(0.9), 6)
      0.052632

    References:
      https://kexue.fm/archives/11301.
    """
    v.beta("beta1", beta1)
    return v.scalar((1 - beta1) / (1 + beta1))


def sgd_optimal_lr(batch, lr_max, b_noise, beta1=0.0) -> OptimalLR:
    r"""SGD(M)'s optimal learning rate at a batch size.

    .. math:: \eta^*(B) = \frac{\eta_{max}}{1 + r\,B_{noise}/B},\qquad
              r = \frac{1-\beta_1}{1+\beta_1}\ (r = 1\text{ without momentum})

    The curve rises monotonically to :math:`\eta_{max}`: no peak.

    Args:
      batch: batch size (or an array of them).
      lr_max: the large-batch limit :math:`\eta_{max} = g^\top g / g^\top H g`.
      b_noise: :math:`B_{noise} = \mathrm{tr}(\Sigma H)/g^\top H g`.
      beta1: heavy-ball momentum in [0, 1) (0: plain SGD).

    Example:
      >>> round(sgd_optimal_lr(100, 0.1, 1000).lr, 7)
      0.0090909

    References:
      McCandlish et al. 2018, arXiv 1812.06162; https://kexue.fm/archives/10542 and
      https://kexue.fm/archives/11301 (momentum).
    """
    v.positive("batch", batch)
    v.positive("lr_max", lr_max)
    v.nonnegative("b_noise", b_noise)
    r = momentum_factor(beta1)
    inputs = dict(batch=batch, lr_max=lr_max, b_noise=b_noise)
    with v.arithmetic("the optimal lr", inputs):
        out = lr_max / (1 + r * b_noise / batch)
    return OptimalLR(v.result("the optimal lr", v.scalar(out), inputs), None, False)


def sgd_loss_decrease(batch, loss_decrease_max, b_noise):
    r"""Best one-step loss decrease :math:`\Delta L(B) = \Delta L_{max}/(1 + B_{noise}/B)`.

    Example:
      >>> round(sgd_loss_decrease(1000, 0.5, 1000), 12)
      0.25

    References:
      McCandlish et al. 2018, arXiv 1812.06162, eq. 2.9; https://kexue.fm/archives/10542.
    """
    v.positive("batch", batch)
    v.nonnegative("loss_decrease_max", loss_decrease_max)
    v.nonnegative("b_noise", b_noise)
    return v.scalar(loss_decrease_max / (1 + b_noise / batch))


def sgd_transfer(lr, batch, new_batch, b_noise, beta1=0.0) -> OptimalLR:
    r"""Moves a tuned SGD(M) learning rate to a new batch size through :math:`B_{noise}`.

    .. math:: \eta(B_2) = \eta(B_1)\,\frac{1 + r B_{noise}/B_1}{1 + r B_{noise}/B_2},
              \qquad r = \frac{1-\beta_1}{1+\beta_1}

    Example:
      >>> round(sgd_transfer(0.05, 1000, 10000, 1000).lr, 6)
      0.090909

    References:
      McCandlish et al. 2018, arXiv 1812.06162; https://kexue.fm/archives/10542,
      https://kexue.fm/archives/11301.
    """
    v.positive("lr", lr)
    v.positive("batch", batch)
    v.positive("new_batch", new_batch)
    v.nonnegative("b_noise", b_noise)
    r = momentum_factor(beta1)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch, b_noise=b_noise)
    with v.arithmetic("the new lr", inputs):
        # (1 + rBn/B1)/(1 + rBn/B2) as (B2/B1)(B1 + rBn)/(B2 + rBn): finite for any Bn.
        out = lr * (new_batch / batch) * ((batch + r * b_noise) / (new_batch + r * b_noise))
    return OptimalLR(v.result("the new lr", v.scalar(out), inputs), None, False)


# ----------------------------------------------------------------- sign updates


def sign_beta(batch, b_simple, c=SU_C):
    r""":math:`\beta(B) = (1 + c\,\kappa^2/B)^{-1/2}`, the mean of sign(batch gradient)
    along the true gradient, with :math:`\kappa^2 \approx B_{simple}`.

    ``c`` is :math:`\pi/2` (Su's erf approximation, archives/10542) or 1 (mean field,
    archives/11280).

    Example:
      >>> round(sign_beta(300, 100, c=1.0), 6)
      0.866025

    References:
      https://kexue.fm/archives/10542, https://kexue.fm/archives/11280.
    """
    v.positive("batch", batch)
    v.nonnegative("b_simple", b_simple)
    v.positive("c", c)
    inputs = dict(batch=batch, b_simple=b_simple, c=c)
    with v.arithmetic("beta", inputs):
        # sqrt(B)/sqrt(B + c k2) equals (1 + c k2/B)^(-1/2) and stays > 0 for B = 1e-300,
        # k2 = 1e300, where c k2/B overflows.
        out = batch**0.5 / (batch + c * b_simple) ** 0.5
    return v.result("beta", v.scalar(out), inputs)


def sign_beta_noise(g, hessian) -> float:
    r""":math:`\beta_{noise} = \sqrt{\sum_i H_{ii} / \sum_{i\neq j}\mathrm{sign}(g_ig_j)H_{ij}}`.

    Returns ``inf`` when the signed off-diagonal sum is not positive (no surge at all).
    ``hessian`` must be symmetric and positive semi-definite (ValueError otherwise).

    Example:
      >>> import numpy as np
      >>> round(sign_beta_noise([1, 1, 1], 0.25 * np.eye(3) + 0.75), 6)
      0.816497

    References:
      https://kexue.fm/archives/10542, https://kexue.fm/archives/11280.
    """
    g = _as_vector("g", g)
    h = _as_hessian("hessian", hessian, g.size)
    diag, off = _sign_sums(g, h)
    if not diag > 0:
        raise ValueError(f"the Hessian's trace must be > 0, got {diag!r}")
    return math.sqrt(diag / off) if off > 0 else math.inf


def _sign_sums(g, h):
    s = np.sign(g)
    diag = float(np.trace(h))
    off = float(s @ h @ s) - float(np.sum(np.diag(h) * s * s))
    return diag, off


def sign_peak_batch(b_simple, beta_noise, c=SU_C):
    r"""Batch size of the surge peak, :math:`B_{peak} = c\kappa^2\beta_n^2/(1-\beta_n^2)`.

    ``None`` when :math:`\beta_{noise} \ge 1` (no surge: the lr rises monotonically).

    Example:
      >>> round(sign_peak_batch(1000, 0.5), 3)
      523.599

    References:
      https://kexue.fm/archives/10542.
    """
    v.nonnegative("b_simple", b_simple)
    v.positive("beta_noise", beta_noise)
    v.positive("c", c)
    bn = float(beta_noise)
    if bn >= 1:
        return None
    inputs = dict(b_simple=b_simple, beta_noise=beta_noise, c=c)
    with v.arithmetic("the peak batch", inputs):
        out = float(c * b_simple * bn**2 / (1 - bn**2))
    return v.result("the peak batch", out, inputs, positive=False)


def sign_optimal_lr(batch, b_simple, beta_noise=1.0, c=SU_C, lr_max=1.0) -> OptimalLR:
    r"""Optimal learning rate of a sign update (SignSGD, Lion, Tiger), Su's form.

    .. math::
      \beta = (1 + c\kappa^2/B)^{-1/2},\qquad
      \eta^*(B) = \frac{\eta_{max}}{\tfrac12(\beta_{noise}/\beta + \beta/\beta_{noise})}

    The curve peaks at :math:`\beta = \beta_{noise}` (where :math:`\eta^* = \eta_{max}`),
    i.e. at :math:`B_{peak} = c\kappa^2\beta_n^2/(1-\beta_n^2)`; beyond it the optimal lr
    *falls* as the batch grows. With :math:`\beta_{noise} \ge 1` there is no surge.

    Args:
      batch: batch size (or array).
      b_simple: :math:`\kappa^2 \approx B_{simple}`.
      beta_noise: :math:`\beta_{noise} > 0` (1: no peak).
      c: :math:`\pi/2` (Su 2024, default) or 1 (mean field).
      lr_max: the learning rate at the peak (1.0 gives :math:`\eta^*/\eta_{max}`).

    Example:
      >>> r = sign_optimal_lr(1000, 1000, beta_noise=0.5)
      >>> round(r.lr, 5), round(r.peak_batch, 3), r.has_peak
      (0.97606, 523.599, True)

    References:
      Su, https://kexue.fm/archives/10542; https://kexue.fm/archives/11280 (c = 1).
    """
    v.positive("lr_max", lr_max)
    v.finite_positive("beta_noise", beta_noise)
    b = sign_beta(batch, b_simple, c)
    inputs = dict(batch=batch, b_simple=b_simple, beta_noise=beta_noise, c=c, lr_max=lr_max)
    with v.arithmetic("the optimal lr", inputs):
        lr = lr_max / (0.5 * (beta_noise / b + b / beta_noise))
        peak = sign_peak_batch(b_simple, beta_noise, c)
    return OptimalLR(v.result("the optimal lr", v.scalar(lr), inputs), peak, peak is not None)


def sign_optimal_lr_mean_field(batch, g, hessian, b_simple) -> OptimalLR:
    r"""Sign update's optimal lr from g and H (mean-field general form, c = 1).

    .. math::
      \eta^*(B) \approx \frac{\sum_i|g_i|}{\beta^{-1}\sum_i H_{ii}
        + \beta\sum_{i\neq j}H_{ij}\,\mathrm{sign}(g_ig_j)},\qquad
      \beta = (1 + B_{simple}/B)^{-1/2}

    ``hessian`` must be symmetric and positive semi-definite (ValueError otherwise).

    Example:
      >>> import numpy as np
      >>> r = sign_optimal_lr_mean_field(200, [1, 1, 1], 0.25 * np.eye(3) + 0.75, 100)
      >>> round(r.lr, 6), round(r.peak_batch, 6)
      (0.408248, 200.0)

    References:
      Su, https://kexue.fm/archives/11280.
    """
    g = _as_vector("g", g)
    h = _as_hessian("hessian", hessian, g.size)
    b = sign_beta(batch, b_simple, MEAN_FIELD_C)
    diag, off = _sign_sums(g, h)
    if not diag > 0:
        raise ValueError(f"the Hessian's trace must be > 0, got {diag!r}")
    den = diag / b + b * off
    if np.any(np.asarray(den) <= 0):
        raise ValueError(
            "hessian gives a non-positive curvature along the sign update "
            "(is it positive semi-definite?)"
        )
    lr = float(np.sum(np.abs(g))) / den
    peak = sign_peak_batch(b_simple, math.sqrt(diag / off), MEAN_FIELD_C) if off > 0 else None
    return OptimalLR(v.scalar(lr), peak, peak is not None)


def sign_transfer(lr, batch, new_batch, b_simple, beta_noise=1.0, c=SU_C) -> OptimalLR:
    r"""Moves a sign optimizer's tuned lr to a new batch size along Su's curve.

    .. math:: \eta(B_2) = \eta(B_1)\,
      \frac{\beta_n/\beta_1 + \beta_1/\beta_n}{\beta_n/\beta_2 + \beta_2/\beta_n},
      \qquad \beta_k = (1 + c\kappa^2/B_k)^{-1/2}

    With the default ``beta_noise=1`` there is no peak: the lr rises with the batch and
    saturates (:math:`\eta \propto 2\beta/(1+\beta^2)`).

    Example:
      >>> r = sign_transfer(1e-4, 128, 2048, b_simple=1000)
      >>> round(r.lr, 8), r.has_peak
      (0.0001882, False)

    References:
      https://kexue.fm/archives/10542.
    """
    v.positive("lr", lr)
    v.positive("new_batch", new_batch)
    old = sign_optimal_lr(batch, b_simple, beta_noise, c)
    new = sign_optimal_lr(new_batch, b_simple, beta_noise, c)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch, b_simple=b_simple)
    with v.arithmetic("the new lr", inputs):
        out = lr * (new.lr / old.lr)
    return OptimalLR(v.result("the new lr", v.scalar(out), inputs), new.peak_batch, new.has_peak)


def li_optimal_lr(batch, lr_peak, peak_batch) -> OptimalLR:
    r"""Li et al.'s peak-parameterised surge curve for Adam-style/sign optimizers.

    .. math:: \eta^*(B) = \frac{\eta_{peak}}{\tfrac12\left(\sqrt{B_{peak}/B}
              + \sqrt{B/B_{peak}}\right)}

    Example:
      >>> round(li_optimal_lr(250, 1e-3, 1000).lr, 12)
      0.0008

    References:
      Li et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling",
      arXiv 2405.14578.
    """
    v.positive("batch", batch)
    v.positive("lr_peak", lr_peak)
    v.finite_positive("peak_batch", peak_batch)
    inputs = dict(batch=batch, lr_peak=lr_peak, peak_batch=peak_batch)
    with v.arithmetic("the optimal lr", inputs):
        x = batch**0.5 / peak_batch**0.5
        lr = lr_peak / (0.5 * (1 / x + x))
    return OptimalLR(v.result("the optimal lr", v.scalar(lr), inputs), float(peak_batch), True)


# ------------------------------------------------------------------------- Muon


#: Muon's surge β_noise fitted to the transfer check (``benchmarks/bench_transfer.py``):
#: the best lr's ratios at 4B and 16B of an anchor at B = 8, on the demo's language model
#: and the digits MLP of the quality suite, each with its measured B_simple; both gave 0.8
#: (a peak at 1.78 B_simple), where Su's rule overshot the measured ratios by up to 1.8x.
MUON_BETA_NOISE = 0.8


def muon_optimal_lr(batch, b_simple, lr_max=1.0, beta_noise=None) -> OptimalLR:
    r"""Muon's optimal learning rate at a batch size (Su, archives/11285), with a surge term.

    The mean of msign of the batch momentum along the true direction shrinks like
    :math:`\beta = (1 + B_{simple}/B)^{-1/2}`, the same form as the sign update's β (mean
    field, c = 1). With a diagonal-like curvature along the update that gives Su's rule

    .. math:: \eta^*(B) \approx \frac{\eta_{max}}{\sqrt{1 + B_{simple}/B}} = \eta_{max}\,\beta

    rising monotonically to :math:`\eta_{max}`. Curvature that couples the directions the
    update lines up (off-diagonal terms, as for sign updates, archives/11280) adds a term
    :math:`\beta^2/\beta_{noise}^2` to the curvature along the update:

    .. math:: \eta^*(B) = \eta_{max}\,\frac{(1 + \beta_{noise}^{-2})\,\beta}
              {1 + \beta^2/\beta_{noise}^2}

    (normalised so that :math:`\eta_{max}` stays the large-batch limit). For
    :math:`\beta_{noise} < 1` it peaks at :math:`\beta = \beta_{noise}`, i.e. at
    :math:`B_{peak} = B_{simple}\,\beta_{noise}^2/(1 - \beta_{noise}^2)`, and falls
    beyond: the surge, which the transfer check measured for Muon
    (``benchmarks/bench_transfer.py``); ``beta_noise=None`` (or ``inf``) is Su's rule.

    Args:
      batch: batch size (or array).
      b_simple: the simple noise scale, in the batch's units.
      lr_max: the large-batch limit (1.0 gives :math:`\eta^*/\eta_{max}`).
      beta_noise: the surge's :math:`\beta_{noise} > 0`, or None for none.

    Example:
      >>> round(muon_optimal_lr(1000, 1000).lr, 6)  # B = B_simple: 1/sqrt(2)
      0.707107
      >>> r = muon_optimal_lr(1000, 1000, beta_noise=0.5)
      >>> round(r.peak_batch, 4), r.has_peak
      (333.3333, True)

    References:
      Su, https://kexue.fm/archives/11285 (Muon), https://kexue.fm/archives/11280 (the
      off-diagonal term); Li et al. 2024, arXiv 2405.14578 (the surge).
    """
    v.positive("lr_max", lr_max)
    b = sign_beta(batch, b_simple, MEAN_FIELD_C)
    inputs = dict(batch=batch, b_simple=b_simple, lr_max=lr_max)
    if beta_noise is None or beta_noise == math.inf:
        return OptimalLR(v.result("the optimal lr", v.scalar(lr_max * b), inputs), None, False)
    v.finite_positive("beta_noise", beta_noise)
    bn2 = float(beta_noise) ** 2
    inputs["beta_noise"] = beta_noise
    with v.arithmetic("the optimal lr", inputs):
        out = lr_max * b * (1 + 1 / bn2) / (1 + b * b / bn2)
    peak = float(b_simple) * bn2 / (1 - bn2) if bn2 < 1 else None
    return OptimalLR(v.result("the optimal lr", v.scalar(out), inputs), peak, peak is not None)


def muon_transfer(lr, batch, new_batch, b_simple, beta_noise=None) -> OptimalLR:
    r"""Moves a tuned Muon lr to a new batch size along :func:`muon_optimal_lr`'s curve.

    .. math:: \eta(B_2) = \eta(B_1)\,\frac{\eta^*(B_2)}{\eta^*(B_1)}
       \qquad\Big(= \eta(B_1)\sqrt{\tfrac{1 + B_{simple}/B_1}{1 + B_{simple}/B_2}}
       \text{ without a surge}\Big)

    Example:
      >>> round(muon_transfer(0.02, 128, 2048, b_simple=1000).lr, 7)
      0.0486673
      >>> round(muon_transfer(0.02, 128, 2048, b_simple=1000, beta_noise=0.5).lr, 7)
      0.0191876

    References:
      Su, https://kexue.fm/archives/11285.
    """
    v.positive("lr", lr)
    v.positive("new_batch", new_batch)
    old = muon_optimal_lr(batch, b_simple, beta_noise=beta_noise)
    new = muon_optimal_lr(new_batch, b_simple, beta_noise=beta_noise)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch, b_simple=b_simple)
    with v.arithmetic("the new lr", inputs):
        out = lr * (new.lr / old.lr)
    return OptimalLR(v.result("the new lr", v.scalar(out), inputs), new.peak_batch, new.has_peak)


# ------------------------------------------------------------------------- Adam


def adam_peak(beta1, b_simple=None) -> AdamPeak:
    r"""Peak of Adam's mean-field lr curve with momentum.

    With :math:`r = (1-\beta_1)/(1+\beta_1)` the curve
    :math:`\eta^* \propto 1/(r/\beta + \beta(1-r))` peaks at
    :math:`\beta^{*2} = r/(1-r) = (1-\beta_1)/(2\beta_1)`, an interior point iff
    :math:`\beta_1 > 1/3`; the lr must fall for
    :math:`B > (1-\beta_1)/(3\beta_1-1)\cdot B_{simple}`.

    Example:
      >>> p = adam_peak(0.9)
      >>> round(p.batch_ratio, 7), round(p.beta, 6), p.has_peak
      (0.0588235, 0.235702, True)

    References:
      Su, https://kexue.fm/archives/11301.
    """
    v.beta("beta1", beta1)
    if b_simple is not None:
        v.nonnegative("b_simple", b_simple)
    beta1 = float(beta1)
    if not beta1 > 1 / 3:
        return AdamPeak(None, None, None, False)
    ratio = (1 - beta1) / (3 * beta1 - 1)
    peak = None if b_simple is None else float(ratio * b_simple)
    return AdamPeak(math.sqrt((1 - beta1) / (2 * beta1)), ratio, peak, True)


def adam_optimal_lr(batch, b_simple, beta1=0.9, scale=1.0) -> OptimalLR:
    r"""Adam's optimal lr at a batch size (mean field, diagonal H, momentum β1).

    .. math::
      \eta^*(B) = \frac{s}{r/\beta + \beta(1-r)},\quad
      r = \frac{1-\beta_1}{1+\beta_1},\quad \beta = (1 + B_{simple}/B)^{-1/2},\quad
      s = \frac{\sum_i|g_i|}{\sum_i H_{ii}}

    Args:
      batch: batch size (or array).
      b_simple: the simple noise scale (use :func:`adam_eps_b_simple` to include ε).
      beta1: Adam's first-moment decay in [0, 1).
      scale: :math:`s` (1.0 gives the curve's shape; only ratios matter for transfer).

    Example:
      >>> r = adam_optimal_lr(1000, 1000, beta1=0.5)  # at the peak: beta = 1/sqrt(2)
      >>> round(r.lr, 6), r.peak_batch, r.has_peak
      (1.06066, 1000.0, True)

    References:
      Su, https://kexue.fm/archives/11301.
    """
    v.positive("scale", scale)
    r = momentum_factor(beta1)
    b = sign_beta(batch, b_simple, MEAN_FIELD_C)
    peak = adam_peak(beta1, b_simple)
    inputs = dict(batch=batch, b_simple=b_simple, beta1=beta1, scale=scale)
    with v.arithmetic("the optimal lr", inputs):
        out = scale / (r / b + b * (1 - r))
    return OptimalLR(
        v.result("the optimal lr", v.scalar(out), inputs), peak.peak_batch, peak.has_peak
    )


def adam_transfer(lr, batch, new_batch, b_simple, beta1=0.9) -> OptimalLR:
    r"""Moves a tuned Adam lr to a new batch size along the mean-field curve.

    :math:`\eta(B_2) = \eta(B_1)\,\eta^*(B_2)/\eta^*(B_1)` with :func:`adam_optimal_lr`.
    Beyond ``peak_batch`` the result is *smaller* than ``lr``.

    Example:
      >>> r = adam_transfer(3e-4, 256, 4096, b_simple=1000, beta1=0.9)
      >>> r.has_peak, round(r.peak_batch, 4)
      (True, 58.8235)

    References:
      Su, https://kexue.fm/archives/11301.
    """
    v.positive("lr", lr)
    v.positive("new_batch", new_batch)
    old = adam_optimal_lr(batch, b_simple, beta1)
    new = adam_optimal_lr(new_batch, b_simple, beta1)
    inputs = dict(lr=lr, batch=batch, new_batch=new_batch, b_simple=b_simple)
    with v.arithmetic("the new lr", inputs):
        out = lr * (new.lr / old.lr)
    return OptimalLR(v.result("the new lr", v.scalar(out), inputs), new.peak_batch, new.has_peak)


def adam_eps_b_simple(trace_sigma, g2, n_params, eps):
    r"""Adam's effective noise scale with ε: :math:`\mathrm{tr}\Sigma/(g^\top g + N\epsilon^2)`.

    Replacing sign by softsign(x, ε) = x/√(x²+ε²) shrinks the effective B_simple and
    weakens the surge.

    Example:
      >>> adam_eps_b_simple(100.0, 4.0, n_params=1000, eps=0.0)
      25.0

    References:
      Su, https://kexue.fm/archives/10563.
    """
    v.nonnegative("trace_sigma", trace_sigma)
    v.nonnegative("g2", g2)
    v.positive("n_params", n_params)
    v.nonnegative("eps", eps)
    inputs = dict(trace_sigma=trace_sigma, g2=g2, n_params=n_params, eps=eps)
    with v.arithmetic("B_simple", inputs):
        den = g2 + n_params * eps**2
        if np.ndim(den) == 0 and not den > 0:
            raise ValueError("g2 + n_params * eps**2 must be > 0")
        out = trace_sigma / den
    return v.result("B_simple", v.scalar(out), inputs, positive=False)


def softsign_curve(g, hessian, sigma, eps) -> SoftSignCurve:
    r"""The sums that fix the SoftSign optimizer's lr curve (Su, archives/10563).

    Adam's update with its ε is modelled as :math:`\mathrm{softsign}(\tilde g_B, \epsilon)`
    of the batch gradient. Su's clip and mean-field approximations give
    :math:`E[\tilde\varphi_B]_i \approx \nu_i\beta` and
    :math:`E[\tilde\varphi_B\tilde\varphi_B^\top]_{ij} \approx \nu_i\nu_j\beta^2
    + \delta_{ij}(1-\beta^2)`, with :math:`\nu = \mathrm{softsign}(g, \epsilon)`,
    :math:`\beta = (1 + c\kappa^2/B)^{-1/2}` and
    :math:`\kappa^2 = \mathrm{tr}\Sigma/(g^\top g + N\epsilon^2)` (the mean-field average
    of :math:`\sigma_i^2/(g_i^2+\epsilon^2)`). This function computes everything in the
    curve that does not depend on the batch; :func:`softsign_optimal_lr` evaluates it.

    A surge (the lr falling as the batch grows) needs :math:`\nu^\top H\nu > 2\sum_iH_{ii}`.
    ν shrinks as ε grows, so a larger ε moves the peak to larger batches and past some ε
    removes it: Su's "ε weakens the surge".

    Args:
      g: mean gradient, shape (n,).
      hessian: Hessian H, shape (n, n), symmetric and positive semi-definite (to a
        relative :data:`HESSIAN_RTOL`) with a positive trace.
      sigma: per-sample gradient covariance, shape (n, n), or its diagonal, shape (n,);
        the diagonal (variances) must be ≥ 0.
      eps: ε ≥ 0 (0 gives sign descent's curve).

    Raises:
      ValueError: naming the argument, for an asymmetric or indefinite ``hessian``, a
        negative variance in ``sigma``, or a ``g`` (or ``eps``) whose squares overflow
        float64 (|g_i| ≳ 1e154), where ν = g/√(g²) would silently be 0.

    Example:
      >>> import numpy as np
      >>> h = 0.25 * np.eye(3) + 0.75
      >>> c = softsign_curve([1, 1, 1], h, np.full(3, 100.0), eps=0.0)
      >>> round(c.beta_noise, 6), c.kappa2   # sign descent: sign_beta_noise's value
      (0.816497, 100.0)
      >>> [round(softsign_curve([1, 1, 1], h, np.full(3, 100.0), e).beta_noise, 3)
      ...  for e in (0.3, 1.0)]  # >= 1: the surge is gone
      [0.879, 2.0]

    References:
      Su, https://kexue.fm/archives/10563 (SoftSign), https://kexue.fm/archives/10542.
    """
    g = _as_vector("g", g)
    h = _as_hessian("hessian", hessian, g.size)
    s = np.asarray(sigma, dtype=np.float64)
    if s.shape == (g.size,):
        variances = _as_vector("sigma", s)
    else:
        variances = np.diag(_as_matrix("sigma", s, g.size))
    if np.any(variances < 0):
        i = int(np.argmax(variances < 0))
        raise ValueError(
            f"sigma's diagonal (the per-coordinate gradient variances) must be >= 0, got "
            f"{float(variances[i])!r} at index {i}; pass a covariance matrix or its diagonal"
        )
    trace_sigma = float(np.sum(variances))
    if not math.isfinite(trace_sigma):
        raise ValueError(f"sigma's trace must be finite, got {trace_sigma!r}")
    v.nonnegative("eps", eps)
    eps = float(eps)
    if not math.isfinite(eps):
        raise ValueError("eps must be finite (eps -> inf is SGD: use sgd_optimal_lr)")
    with np.errstate(over="ignore"):
        gg = float(g @ g)
    if not math.isfinite(gg):
        raise ValueError(
            f"g is too large for float64: g @ g overflows (largest |g_i| = "
            f"{float(np.max(np.abs(g)))!r}, the limit is about 1e154); rescale g, and with "
            "it hessian and sigma, to a smaller unit"
        )
    if not math.isfinite(gg + g.size * eps * eps):
        raise ValueError(
            f"eps = {eps!r} is too large for float64: N * eps**2 overflows; use "
            "sgd_optimal_lr (eps -> inf is SGD) or rescale g and eps"
        )
    # hypot: g / sqrt(g*g + eps*eps) would give 1e-200 / 0 = inf for g = 1e-200, eps = 0
    nu = np.where(g == 0, 0.0, g / np.where(g == 0, 1.0, np.hypot(g, eps)))
    trace = float(np.trace(h))
    if not trace > 0:
        raise ValueError(f"the Hessian's trace must be > 0, got {trace!r}")
    coherent = float(nu @ h @ nu)
    kappa2 = adam_eps_b_simple(trace_sigma, gg, g.size, eps)
    excess = coherent - trace
    beta_noise = math.sqrt(trace / excess) if excess > 0 else math.inf
    return SoftSignCurve(float(nu @ g), coherent, trace, float(kappa2), beta_noise)


def softsign_optimal_lr(batch, curve: SoftSignCurve, c=SU_C) -> OptimalLR:
    r"""Optimal lr of a SoftSign (Adam-with-ε) update at a batch size (archives/10563).

    .. math::
      \eta^*(B) \approx \frac{\beta\sum_i\nu_ig_i}
        {\beta^2\,\nu^\top H\nu + (1-\beta^2)\sum_i H_{ii}},\qquad
      \beta = (1 + c\,\kappa^2/B)^{-1/2}

    As a function of β the curve peaks at :math:`\beta = \beta_{noise}`, so the peak batch
    is :func:`sign_peak_batch` of :math:`(\kappa^2, \beta_{noise})`; with
    :math:`\beta_{noise} \ge 1` the lr rises monotonically. At ε = 0 and c = 1 this is
    :func:`sign_optimal_lr_mean_field`; as ε → ∞, :math:`\eta^*/\epsilon` tends to SGD's
    optimal lr with gradient noise :math:`c\,\bar\sigma^2 I/B`.

    Args:
      batch: batch size (or array).
      curve: :func:`softsign_curve` of the problem.
      c: :math:`\pi/2` (Su's erf approximation, the default in 10563) or 1 (mean field).

    Example:
      >>> import numpy as np
      >>> h = 0.25 * np.eye(3) + 0.75
      >>> curve = softsign_curve([1, 1, 1], h, np.full(3, 100.0), eps=0.0)
      >>> r = softsign_optimal_lr(200, curve, c=1.0)  # sign_optimal_lr_mean_field's numbers
      >>> round(r.lr, 6), round(r.peak_batch, 6), r.has_peak
      (0.408248, 200.0, True)

    References:
      Su, https://kexue.fm/archives/10563.
    """
    if not isinstance(curve, SoftSignCurve):
        raise ValueError(
            f"curve must be a SoftSignCurve (from softsign_curve(g, hessian, sigma, eps)), "
            f"got {type(curve).__name__}"
        )
    b = sign_beta(batch, curve.kappa2, c)
    inputs = dict(batch=batch, c=c)
    with v.arithmetic("the optimal lr", inputs):
        # beta^2 and 1 - beta^2 each from B/(B + c k2), never as 1 - b*b: at large eps,
        # beta is 1 - 1e-10 and the difference would keep only six digits.
        noise = c * curve.kappa2
        b2, one_minus_b2 = batch / (batch + noise), noise / (batch + noise)
        lr = b * curve.along / (b2 * curve.coherent + one_minus_b2 * curve.trace)
    peak = None
    if curve.beta_noise < 1:
        peak = sign_peak_batch(curve.kappa2, curve.beta_noise, c)
    return OptimalLR(v.result("the optimal lr", v.scalar(lr), inputs), peak, peak is not None)


def adam_sde_rule(lr, beta1, beta2, eps, kappa) -> AdamSDE:
    r"""Malladi et al.'s SDE scaling rule for Adam when the batch grows by ``kappa``.

    .. math:: \eta' = \eta\sqrt\kappa,\quad 1-\beta_1' = \kappa(1-\beta_1),\quad
              1-\beta_2' = \kappa(1-\beta_2),\quad \epsilon' = \epsilon/\sqrt\kappa

    Valid only while :math:`\kappa(1-\beta) < 1` for both betas.

    Example:
      >>> r = adam_sde_rule(3e-4, 0.9, 0.999, 1e-8, kappa=4)
      >>> [round(x, 12) for x in r]
      [0.0006, 0.6, 0.996, 5e-09]

    Raises:
      ValueError: if ``kappa * (1 - beta) >= 1`` (the rule would give beta <= 0).

    References:
      Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
      Algorithms", arXiv 2205.10287.
    """
    v.positive("lr", lr)
    v.beta("beta1", beta1)
    v.beta("beta2", beta2)
    v.nonnegative("eps", eps)
    v.finite_positive("kappa", kappa)
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        # The tolerance rejects the boundary kappa*(1-beta) = 1 also when 1-beta rounds low.
        if kappa * (1 - b) >= 1 - 1e-12:
            raise ValueError(
                f"the SDE rule needs kappa*(1-{name}) < 1, got kappa={kappa!r}, {name}={b!r} "
                f"(kappa must be < {1 / (1 - b):g})"
            )
    root = math.sqrt(kappa)
    inputs = dict(lr=lr, kappa=kappa)
    return AdamSDE(
        v.result("the new lr", float(lr * root), inputs),
        float(1 - kappa * (1 - beta1)),
        float(1 - kappa * (1 - beta2)),
        float(eps / root),
    )


def beta2_by_half_life(beta2, batch, new_batch):
    r"""β2 keeping the second moment's half-life constant in tokens (examples).

    .. math:: \beta_2' = \beta_2^{B'/B}

    Example:
      >>> round(beta2_by_half_life(0.999, 512, 64), 7)
      0.9998749

    References:
      Marek et al. 2025, "Small Batch Size Training for Language Models" (β2 by token
      half-life), arXiv 2507.07101.
    """
    v.beta("beta2", beta2)
    v.positive("batch", batch)
    v.positive("new_batch", new_batch)
    return v.scalar(beta2 ** (new_batch / batch))


def half_life_tokens(beta, batch):
    r"""Half-life of an EMA with decay β, in examples (tokens): :math:`B\ln\tfrac12/\ln\beta`.

    β = 0 forgets at once (half-life 0).

    Example:
      >>> round(half_life_tokens(0.999, 512))
      354714

    References:
      Marek et al. 2025, arXiv 2507.07101.
    """
    v.beta("beta", beta)
    v.positive("batch", batch)
    if np.ndim(beta) == 0 and float(beta) == 0:
        return 0.0
    return v.scalar(batch * math.log(0.5) / np.log(beta))

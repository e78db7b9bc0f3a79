r"""Published fitted laws for the learning rate and batch size of AdamW recipes.

- DeepSeek LLM (arXiv 2401.02954): :math:`\eta = 0.3118\,C^{-0.1250}`,
  :math:`B = 0.2920\,C^{0.3271}` (C in FLOPs, B in tokens).
- Step Law (arXiv 2503.04715): :math:`\eta = 1.79\,N^{-0.713}D^{0.307}`,
  :math:`B = 0.58\,D^{0.571}` (N non-vocabulary parameters, D tokens, B in tokens).
- Kaplan et al. 2020 (arXiv 2001.08361): :math:`B_{crit}(L) = 2\times10^8/L^{1/0.21}` tokens.

And :func:`fit_power_law`, to fit your own (B_opt or B_crit against tokens seen).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = [
    "LawPrediction",
    "PowerLawFit",
    "deepseek_law",
    "step_law",
    "kaplan_critical_batch",
    "fit_power_law",
    "power_law",
]


class LawPrediction(NamedTuple):
    """A fitted law's learning rate and batch size (in tokens)."""

    lr: float
    batch_tokens: float


def deepseek_law(compute) -> LawPrediction:
    r"""DeepSeek LLM's fit: :math:`\eta = 0.3118\,C^{-0.125}`, :math:`B = 0.2920\,C^{0.3271}`.

    Args:
      compute: training compute C in FLOPs.

    Example:
      >>> r = deepseek_law(1e17)
      >>> round(r.lr, 8), round(r.batch_tokens, -1)
      (0.00233817, 106190.0)

    References:
      DeepSeek-AI 2024, "DeepSeek LLM: Scaling Open-Source Language Models with
      Longtermism", arXiv 2401.02954, section 3.1.
    """
    v.finite_positive("compute", compute)
    inputs = dict(compute=compute)
    return LawPrediction(
        v.result("the lr", v.scalar(0.3118 * compute**-0.1250), inputs),
        v.result("the batch", v.scalar(0.2920 * compute**0.3271), inputs),
    )


def step_law(n_params, n_tokens) -> LawPrediction:
    r"""Step Law: :math:`\eta = 1.79\,N^{-0.713}D^{0.307}`, :math:`B = 0.58\,D^{0.571}`.

    Args:
      n_params: non-vocabulary parameters N.
      n_tokens: training tokens D.

    Example:
      >>> r = step_law(1e9, 1e11)
      >>> round(r.lr, 8), round(r.batch_tokens, -2)
      (0.0016325, 1107700.0)

    References:
      Li et al. 2025, "Predictable Scale: Part I — Optimal Hyperparameter Scaling Law in
      Large Language Model Pretraining" (Step Law), arXiv 2503.04715.
    """
    v.finite_positive("n_params", n_params)
    v.finite_positive("n_tokens", n_tokens)
    inputs = dict(n_params=n_params, n_tokens=n_tokens)
    with v.arithmetic("the lr", inputs):
        lr = v.scalar(1.79 * n_params**-0.713 * n_tokens**0.307)
    return LawPrediction(
        v.result("the lr", lr, inputs),
        v.result("the batch", v.scalar(0.58 * n_tokens**0.571), inputs),
    )


def kaplan_critical_batch(loss):
    r"""Kaplan et al.'s critical batch in tokens, :math:`B_{crit}(L) = 2\times10^8/L^{1/0.21}`.

    Args:
      loss: the target cross-entropy loss in nats (> 0).

    Example:
      >>> round(kaplan_critical_batch(3.0), -2)
      1069100.0

    References:
      Kaplan et al. 2020, "Scaling Laws for Neural Language Models", arXiv 2001.08361,
      eq. 5.3.
    """
    v.finite_positive("loss", loss)
    inputs = dict(loss=loss)
    with v.arithmetic("B_crit", inputs):
        # A power of the ratio, not a ratio of powers: loss**(1/0.21) overflows for
        # loss > ~1e64 and underflows to 0 for loss < ~1e-65.
        out = 2e8 * loss ** (-1 / 0.21)
    return v.result("B_crit", v.scalar(out), inputs)


class PowerLawFit(NamedTuple):
    """``y ≈ coefficient · x**exponent``, fitted in log-log space.

    ``rms_log_residual`` is the root-mean-square residual of ``log y`` (0.1 ≈ 10%
    scatter); ``exponent_stderr`` the slope's standard error (``inf`` with 2 points).
    """

    coefficient: float
    exponent: float
    rms_log_residual: float
    exponent_stderr: float
    count: int


def fit_power_law(x, y) -> PowerLawFit:
    r"""Fits :math:`y = a\,x^b` by least squares on :math:`\log y = \log a + b\log x`.

    For B_opt and B_crit against the data size D (tokens seen): both grow with D, not
    with the model size (Zhang et al. 2025; Bergsma et al. 2025), so measure them at
    several D and fit this; :func:`power_law` evaluates the fit.

    Args:
      x: the sizes (> 0, finite, at least two distinct values).
      y: the measured quantity at each size (> 0, finite), same length.

    Example:
      >>> d = [1e9, 1e10, 1e11]
      >>> f = fit_power_law(d, [0.58 * x**0.571 for x in d])  # the Step Law's batch
      >>> round(f.coefficient, 6), round(f.exponent, 6)
      (0.58, 0.571)

    References:
      Zhang et al. 2025, "How Does Critical Batch Size Scale in Pre-training?", ICLR 2025,
      arXiv 2410.21676; Bergsma et al. 2025, arXiv 2505.13738.
    """
    lx = _logs("x", x)
    ly = _logs("y", y)
    if lx.size != ly.size:
        raise ValueError(f"x and y must have the same length, got {lx.size} and {ly.size}")
    if lx.size < 2:
        raise ValueError(f"fit_power_law needs at least 2 points, got {lx.size}")
    if np.ptp(lx) <= 1e-12 * max(1.0, float(np.max(np.abs(lx)))):
        raise ValueError("x needs at least two distinct values to fit an exponent")
    b, log_a = np.polyfit(lx, ly, 1)
    resid = ly - (log_a + b * lx)
    n = lx.size
    stderr = (
        math.sqrt(float(resid @ resid) / (n - 2) / float(np.sum((lx - lx.mean()) ** 2)))
        if n > 2
        else math.inf
    )
    coefficient = v.result("the coefficient", math.exp(log_a), {"log_a": float(log_a)})
    return PowerLawFit(
        float(coefficient), float(b), float(np.sqrt(np.mean(resid**2))), stderr, int(n)
    )


def power_law(x, coefficient, exponent):
    """``coefficient * x**exponent`` (a :class:`PowerLawFit`'s prediction)."""
    v.positive("x", x)
    v.finite_positive("coefficient", coefficient)
    inputs = dict(x=x, coefficient=coefficient, exponent=exponent)
    with v.arithmetic("the power law", inputs), np.errstate(over="ignore", under="ignore"):
        out = coefficient * np.asarray(x, dtype=np.float64) ** exponent
    return v.result("the power law", v.scalar(out), inputs)


def _logs(name, values):
    a = np.asarray(values, dtype=np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ValueError(f"{name} must be finite and > 0, got {a.tolist()!r}")
    return np.log(a)

r"""Published fitted laws for the learning rate and batch size of AdamW recipes.

- DeepSeek LLM (arXiv 2401.02954): :math:`\eta = 0.3118\,C^{-0.1250}`,
  :math:`B = 0.2920\,C^{0.3271}` (C in FLOPs, B in tokens).
- Step Law (arXiv 2503.04715): :math:`\eta = 1.79\,N^{-0.713}D^{0.307}`,
  :math:`B = 0.58\,D^{0.571}` (N non-vocabulary parameters, D tokens, B in tokens).
- Kaplan et al. 2020 (arXiv 2001.08361): :math:`B_{crit}(L) = 2\times10^8/L^{1/0.21}` tokens.
"""

from __future__ import annotations

from typing import NamedTuple

from scaling import _validate as v

__all__ = ["LawPrediction", "deepseek_law", "step_law", "kaplan_critical_batch"]


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

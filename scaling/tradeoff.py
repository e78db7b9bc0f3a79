r"""Steps versus examples: McCandlish et al.'s tradeoff law and fitting B_crit.

.. math::
  \left(\frac{S}{S_{min}} - 1\right)\left(\frac{E}{E_{min}} - 1\right) = 1,\qquad
  B_{crit} = E_{min}/S_{min} \approx B_{noise}

so at batch size B: :math:`S = S_{min}(1 + B_{crit}/B)` steps and
:math:`E = E_{min}(1 + B/B_{crit})` examples are needed to reach a given loss.

References:
  McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv 1812.06162;
  Su, https://kexue.fm/archives/10542.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = [
    "StepsAndExamples",
    "TradeoffFit",
    "steps_needed",
    "examples_needed",
    "steps_and_examples",
    "fit_tradeoff",
    "adaptive_batch_size",
    "warmup_accumulation_steps",
]


class StepsAndExamples(NamedTuple):
    """Optimizer steps and training examples needed at a batch size."""

    steps: Any
    examples: Any


class TradeoffFit(NamedTuple):
    """Fitted tradeoff law: ``s_min``, ``e_min``, ``b_crit = e_min / s_min``, and the
    root-mean-square residual of the fit in 1/S."""

    s_min: float
    e_min: float
    b_crit: float
    rms_residual: float


def steps_needed(batch, s_min, b_crit):
    r""":math:`S(B) = S_{min}(1 + B_{crit}/B)`.

    Example:
      >>> steps_needed(100, 1000, 100)
      2000.0
    """
    v.positive("batch", batch)
    v.positive("s_min", s_min)
    v.positive("b_crit", b_crit)
    return v.scalar(s_min * (1 + b_crit / batch))


def examples_needed(batch, e_min, b_crit):
    r""":math:`E(B) = E_{min}(1 + B/B_{crit})`.

    Example:
      >>> examples_needed(100, 1e5, 100)
      200000.0
    """
    v.positive("batch", batch)
    v.positive("e_min", e_min)
    v.positive("b_crit", b_crit)
    return v.scalar(e_min * (1 + batch / b_crit))


def steps_and_examples(batch, s_min, e_min) -> StepsAndExamples:
    r"""Steps and examples at a batch size from :math:`(S_{min}, E_{min})`,
    with :math:`B_{crit} = E_{min}/S_{min}`.

    Example:
      >>> r = steps_and_examples(10, 1000, 1e5)
      >>> round(r.steps, 6), round(r.examples, 6)
      (11000.0, 110000.0)

    References:
      McCandlish et al. 2018, arXiv 1812.06162, eq. 2.11.
    """
    v.positive("s_min", s_min)
    v.positive("e_min", e_min)
    b_crit = e_min / s_min
    return StepsAndExamples(
        steps_needed(batch, s_min, b_crit), examples_needed(batch, e_min, b_crit)
    )


def fit_tradeoff(steps, examples) -> TradeoffFit:
    r"""Fits :math:`(S_{min}, E_{min}, B_{crit})` to measured (steps, examples) pairs.

    Each pair is the number of steps and of examples one run needed to reach the same
    target loss (at its own batch size). The law is a line in :math:`1/E`:

    .. math:: \frac{1}{S} = \frac{1}{S_{min}} - B_{crit}\,\frac{1}{E}

    fitted by ordinary least squares in (1/E, 1/S).

    Args:
      steps: sequence of step counts (> 0).
      examples: sequence of example counts (> 0), same length.

    Raises:
      ValueError: fewer than 2 pairs, non-positive or non-finite values, all 1/E equal
        (no spread to fit a slope), or a fit that contradicts the law (slope ≥ 0 or
        intercept ≤ 0: steps do not fall as the batch grows).

    Example:
      >>> f = fit_tradeoff([11000, 2000, 1100], [1.1e5, 2e5, 1.1e6])
      >>> round(f.s_min, 6), round(f.e_min, 3), round(f.b_crit, 6)
      (1000.0, 100000.0, 100.0)

    References:
      McCandlish et al. 2018, arXiv 1812.06162, section 2.3 and appendix.
    """
    s = np.asarray(steps, dtype=np.float64).ravel()
    e = np.asarray(examples, dtype=np.float64).ravel()
    if s.size != e.size:
        raise ValueError(f"steps and examples must have the same length, got {s.size} and {e.size}")
    if s.size < 2:
        raise ValueError(f"fit_tradeoff needs at least 2 (steps, examples) pairs, got {s.size}")
    for name, a in (("steps", s), ("examples", e)):
        if not np.all(np.isfinite(a)) or not np.all(a > 0):
            raise ValueError(f"{name} must be finite and > 0, got {a.tolist()!r}")
    x, y = 1 / e, 1 / s
    if np.ptp(x) <= 1e-12 * np.max(np.abs(x)):
        raise ValueError("degenerate data: all runs used the same number of examples")
    slope, intercept = np.polyfit(x, y, 1)
    if not (slope < 0 and intercept > 0):
        raise ValueError(
            "the data do not follow the tradeoff law (need steps to fall and examples to rise "
            f"with the batch size): fitted 1/S = {intercept:.6g} + {slope:.6g}/E"
        )
    s_min = 1 / intercept
    b_crit = -slope
    rms = float(np.sqrt(np.mean((y - (intercept + slope * x)) ** 2)))
    return TradeoffFit(float(s_min), float(b_crit * s_min), float(b_crit), rms)


def adaptive_batch_size(b_noise, exchange_rate):
    r"""Batch size minimising a cost of steps and examples, :math:`B = \sqrt{r\,B_{noise}}`.

    ``exchange_rate`` r is the price of one optimizer step in examples.

    Example:
      >>> adaptive_batch_size(1000, 10)
      100.0

    References:
      McCandlish et al. 2018, arXiv 1812.06162, appendix D.
    """
    v.positive("b_noise", b_noise)
    v.positive("exchange_rate", exchange_rate)
    return v.scalar((exchange_rate * b_noise) ** 0.5)


def warmup_accumulation_steps(
    b_simple,
    micro_batch_size,
    max_accumulation_steps,
    *,
    previous=1,
    fraction=1.0,
    settled=True,
) -> int:
    r"""Micro-batches per update for a batch-size warm-up that follows the noise scale.

    The noise scale grows as a model trains (it starts near zero), and the batch worth
    using grows with it: below :math:`B_{crit} \approx B_{noise}` (of which
    :math:`B_{simple}` is the measurable proxy) a larger batch still cuts the steps
    nearly in proportion, beyond it mostly adds examples. The rule targets an effective
    batch of ``fraction`` · B_simple:

    .. math:: k = \mathrm{clip}\big(\lceil f\,B_{simple} / b \rceil,\
              k_{prev},\ k_{max}\big)

    A warm-up only grows: a lower estimate (noise, or a late dip) keeps ``previous``,
    and so does an estimate that has not ``settled``. Feed the result to Tiger's,
    SGDM's or ``accumulate_gradients``' ``set_accumulation_steps``, and when the
    effective batch changes move the learning rate with :func:`scaling.recommend`
    (or the optimizer's transfer rule).

    Args:
      b_simple: the current simple noise scale, in examples, one number (``nan`` keeps
        ``previous``).
      micro_batch_size: b, examples per micro-batch (per update call, all devices).
      max_accumulation_steps: :math:`k_{max} \ge 1`, the most micro-batches per update.
      previous: the k in use, ≥ 1.
      fraction: f > 0, the target effective batch as a multiple of B_simple.
      settled: whether the estimate has settled, a bool or a 0-d boolean array
        (``ox.current_noise_scale(...).settled``).

    Example:
      >>> warmup_accumulation_steps(300.0, 64, 16)   # ceil(300/64)
      5
      >>> warmup_accumulation_steps(100.0, 64, 16, previous=5)   # never shrinks
      5
      >>> warmup_accumulation_steps(1e6, 64, 16, previous=5)     # capped
      16

    References:
      McCandlish et al. 2018, arXiv 1812.06162 (B_crit ≈ B_noise, and B_simple); Zhang
      et al., ICLR 2025 and Merrill et al. 2025 (the critical batch grows during training).
    """
    micro = v.single("micro_batch_size", micro_batch_size)
    v.positive("micro_batch_size", micro_batch_size)
    v.finite_positive("fraction", fraction)
    fraction = v.single("fraction", fraction)
    k_max = _whole("max_accumulation_steps", max_accumulation_steps)
    k_prev = _whole("previous", previous)
    if k_prev > k_max:
        raise ValueError(
            f"previous must be at most max_accumulation_steps={k_max}, got {previous!r}"
        )
    # one number: a string ("300") or None must not fall through to `previous` silently
    b = v.single("b_simple", b_simple)
    if b < 0:
        raise ValueError(f"b_simple must be >= 0 or nan, got {b_simple!r}")
    # a bool: any non-empty string ("no") would be truthy
    if not v.flag("settled", settled) or not b > 0:
        return k_prev
    target = fraction * b / micro
    if not target < k_max:  # also inf
        return k_max
    return max(k_prev, min(k_max, math.ceil(target)))


def _whole(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)

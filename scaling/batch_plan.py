r"""A noise-driven batch plan: the batch follows the measured noise scale, capped.

The critical batch grows while a model trains (McCandlish et al. 2018: below
:math:`B_{crit} \approx B_{noise}`, of which :math:`B_{simple}` is the measurable proxy, a
larger batch cuts the optimizer steps nearly in proportion; Merrill et al. 2025 and Zhang
et al. 2025: it grows during training). A plan that starts small and grows the batch with
the measured :math:`B_{simple}` takes fewer optimizer updates for the same examples.

At the start of each update, with the current estimate :math:`\hat B \pm s` (the ratio of
means over the last window, :func:`scaling.current_b_simple`; ``ox.current_noise_scale``
reads it from the optimizer state), the base schedule :math:`\eta(n)` at the base step
:math:`n = \lfloor e/b\rfloor` (``e`` examples seen, ``b`` the micro-batch) and the number
of micro-batches :math:`k` in use:

.. math::
  \hat B_{low} &= \hat B - z\,s \qquad\text{(a lower confidence bound)}\\
  k' &= \mathrm{clip}\big(\lceil f\,\hat B_{low}/b\rceil,\ k,\ k_{max}\big)
     \quad(k' = k \text{ when } \hat B_{low} \le 0 \text{ or not measurable})\\
  B &= k' b, \qquad \eta_{plan} = \eta(n)\,\sqrt{B/b}

(:func:`scaling.warmup_accumulation_steps` is the rule for :math:`k'`). The batch never
shrinks and stops at :math:`k_{max} b`. The learning rate keeps :math:`\eta/\sqrt B` on the
base schedule, the rule under which Adam (and normalized SGD, its proxy where the noise
dominates) sees the same loss per example at a larger batch: the Seesaw invariant
(:mod:`scaling.batch_ramp`), valid where the noise dominates the gradient, well below the
noise scale. ``lr_scaling="linear"`` keeps :math:`\eta/B` instead (SGD); ``"none"`` keeps
the base lr.

The default ``fraction`` is 0.1. :math:`B_{simple}` equals the critical batch only when the
Hessian is a multiple of the identity; in ``benchmarks/bench_transfer.py`` the tradeoff
law's fitted :math:`B_{crit}` was about a tenth of the measured :math:`B_{simple}` or less,
and in ``benchmarks/bench_batch_plan.py`` (equal examples, AdamW, 3 seeds) the plan at
f = 0.1 matched a tuned constant batch's held-out loss within one seed-sd with 4-15%
fewer updates, while f = 1 took 60-78% fewer updates at a clearly worse loss. Larger f
trade loss for steps.

Drive it with ``set_accumulation_steps=k`` (``ox.accumulate_gradients``, Tiger, SGDM): the
new k starts with the next cycle and a jitted step compiles once.

References:
  McCandlish et al. 2018, arXiv 1812.06162; Merrill et al. 2025, "Critical batch size
  revisited", arXiv 2505.23971; Zhang et al., ICLR 2025, arXiv 2410.21676; Meterez et al.
  2025, arXiv 2510.14717 (the sqrt(B) invariant for Adam).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from scaling import _validate as v
from scaling.tradeoff import warmup_accumulation_steps

__all__ = ["LR_SCALINGS", "NoisePlan", "PlanPoint", "noise_plan"]

#: How the learning rate follows the batch: keep lr/sqrt(B) (Adam), lr/B (SGD) or lr.
LR_SCALINGS = ("sqrt", "linear", "none")


class PlanPoint(NamedTuple):
    """One update of a plan: its learning rate, batch (examples) and micro-batches."""

    lr: float
    batch: int
    accumulation_steps: int


class NoisePlan:
    """A noise-driven batch plan (module docstring); built by :func:`noise_plan`.

    Call it at the start of each update with the base step ``t`` (examples seen divided
    by the micro-batch) and the current noise estimate; it returns a :class:`PlanPoint`
    and remembers the micro-batches chosen (the batch only grows).

    Attributes:
      micro_batch_size, max_accumulation_steps, fraction, confidence, lr_scaling: as
        given.
      accumulation_steps: the k in use (1 before the first call).
      history: ``(t, k)`` at each update where k grew.
    """

    def __init__(self, lr_schedule, micro_batch_size, max_accumulation_steps, fraction,
                 confidence, lr_scaling):  # fmt: skip
        self.lr_schedule = lr_schedule
        self.micro_batch_size = micro_batch_size
        self.max_accumulation_steps = max_accumulation_steps
        self.fraction = fraction
        self.confidence = confidence
        self.lr_scaling = lr_scaling
        self.accumulation_steps = 1
        self.history: list[tuple[float, int]] = []

    def __repr__(self):
        return (
            f"NoisePlan(micro_batch_size={self.micro_batch_size}, "
            f"max_accumulation_steps={self.max_accumulation_steps}, fraction={self.fraction!r}, "
            f"confidence={self.confidence!r}, lr_scaling={self.lr_scaling!r}, "
            f"accumulation_steps={self.accumulation_steps})"
        )

    def base_lr(self, n: int) -> float:
        """The base schedule at base step ``n``, checked finite and >= 0."""
        try:
            raw = self.lr_schedule(n)
        except Exception as e:
            raise ValueError(f"lr_schedule({n}) raised {type(e).__name__}: {e}") from e
        lr = v.single(f"lr_schedule({n})", raw)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr_schedule must return finite values >= 0, got {lr!r} at step {n}")
        return lr

    def lower_bound(self, noise: Any) -> float:
        """:math:`\\hat B - z s` of an estimate (``nan`` when it is none or not measurable).

        ``noise`` is a ``scaling.SettledNoiseScale`` (or anything with ``b_simple`` and
        ``stderr``), a ``(b_simple, stderr)`` pair, or None.
        """
        if noise is None:
            return math.nan
        b, se = (noise.b_simple, noise.stderr) if hasattr(noise, "b_simple") else noise
        b, se = float(b), float(se)
        if not (math.isfinite(b) and b > 0 and se >= 0):
            return math.nan
        low = b - self.confidence * se if self.confidence else b
        return low if math.isfinite(low) else math.nan

    def __call__(self, t, noise: Any = None) -> PlanPoint:
        """The plan's update at base step ``t`` given the current estimate ``noise``."""
        if v.is_traced(t):
            raise ValueError("t must be a concrete number: the plan is host-side Python")
        x = v.single("t", t)
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"t must be in [0, inf) (examples seen / micro_batch_size), got {t!r}")
        low = self.lower_bound(noise)
        k = warmup_accumulation_steps(
            low if low > 0 else math.nan,
            self.micro_batch_size,
            self.max_accumulation_steps,
            previous=self.accumulation_steps,
            fraction=self.fraction,
        )
        if k != self.accumulation_steps:
            self.history.append((x, k))
        self.accumulation_steps = k
        scale = {"sqrt": math.sqrt(k), "linear": float(k), "none": 1.0}[self.lr_scaling]
        return PlanPoint(self.base_lr(math.floor(x)) * scale, k * self.micro_batch_size, k)


def noise_plan(
    lr_schedule: Callable[[int], Any],
    micro_batch_size,
    *,
    max_accumulation_steps,
    fraction=0.1,
    confidence=1.0,
    lr_scaling: str = "sqrt",
) -> NoisePlan:
    r"""A batch plan in which the batch follows the measured :math:`B_{simple}`, capped.

    Args:
      lr_schedule: the base schedule, a function of the base step (examples seen / the
        micro-batch; an optax schedule works), tuned at the micro-batch.
      micro_batch_size: b, examples per micro-batch (an int >= 1): the starting batch.
      max_accumulation_steps: :math:`k_{max} \ge 1`, an int: the batch stops at
        :math:`k_{max} b`.
      fraction: f > 0, the target batch as a multiple of :math:`B_{simple}` (default 0.1:
        the critical batch measured against it, module docstring).
      confidence: z >= 0, the standard errors below the estimate the plan trusts (1: grow
        only to what :math:`\hat B - s` supports; 0: the estimate itself).
      lr_scaling: ``"sqrt"`` (Adam, Lion, Muon), ``"linear"`` (SGD) or ``"none"``.

    Returns:
      A :class:`NoisePlan`: ``plan(t, noise)`` gives :class:`PlanPoint` ``(lr, batch,
      accumulation_steps)`` at the start of each update.

    Example:
      >>> plan = noise_plan(lambda n: 1e-3, 32, max_accumulation_steps=8)
      >>> plan(0, None)                         # nothing measured yet: the micro-batch
      PlanPoint(lr=0.001, batch=32, accumulation_steps=1)
      >>> plan(100, (900.0, 200.0))             # ceil(0.1 * (900 - 200) / 32) = 3
      PlanPoint(lr=0.0017320508075688772, batch=96, accumulation_steps=3)
      >>> plan(130, (500.0, 300.0)).batch       # a lower estimate never shrinks the batch
      96
      >>> plan(200, (1e5, 10.0)).batch          # capped at 8 x 32
      256
    """
    if not callable(lr_schedule):
        raise ValueError(
            f"lr_schedule must be callable (a function of the base step), got {lr_schedule!r}"
        )
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("max_accumulation_steps", max_accumulation_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    v.finite_positive("fraction", fraction)
    v.nonnegative("confidence", confidence)
    v.check("confidence", confidence, 0.0, 1e308)
    v.check_choice("lr_scaling", lr_scaling, LR_SCALINGS)
    plan = NoisePlan(
        lr_schedule,
        micro_batch_size,
        max_accumulation_steps,
        float(v.single("fraction", fraction)),
        float(v.single("confidence", confidence)),
        lr_scaling,
    )
    plan.base_lr(0)  # a broken schedule fails here, not mid-training
    return plan

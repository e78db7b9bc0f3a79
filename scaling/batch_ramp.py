r"""Seesaw: a batch-size ramp that stands in for a learning-rate decay.

Meterez et al. 2025 ("Seesaw: Accelerating Training by Balancing Learning Rate and Batch
Size Scheduling", arXiv 2510.14717): whenever a base schedule would cut the learning rate
by a factor :math:`f`, cut it by :math:`\sqrt f` only and grow the batch by :math:`f`.
For Adam, and for normalized SGD (its proxy in the variance-dominated regime, where the
update is about :math:`\eta\,g\sqrt B/\sigma`), the step that matters is
:math:`\eta/\sqrt{B}`; the two runs then see the same loss curve per example while the
ramp takes fewer optimizer updates. (For plain SGD the matching rule is different: keep
the lr and grow the batch, :math:`\eta/B` fixed; that is not what this module builds.)

The rule, on the base schedule's integer steps :math:`n = \lfloor e/B_0\rfloor` (``e``
examples seen, :math:`B_0` the initial batch size, :math:`\eta(n)` the base schedule):

.. math::
  M(n) &= \max_{0\le s\le n} \eta(s) \qquad\text{(the peak so far: warm-up is no decay)}\\
  \ell(s) &= \max\{k \ge 0 : f^k\,\eta(s) \le M(s)\}
     \quad(\ell = 0 \text{ if } M(s) = 0,\ \ell = \infty \text{ if } \eta(s) = 0 < M(s))\\
  k(n) &= \min\big(K,\ \max_{0\le s\le n} \ell(s)\big) \qquad\text{(the batch never shrinks)}\\
  B_k &= \min\big(B_{max},\ \mathrm{round}(B_0 f^k)\big),\quad
     K = \min\{k : B_k = B_{max}\}\\
  B(n) &= B_{k(n)},\qquad
  \eta_{seesaw}(n) = \begin{cases}
     M(n)\, f^{-k(n)/2} & k(n) < K\\
     \eta(n)\,\sqrt{B_{max}/B_0} & k(n) = K
  \end{cases}

So level k starts at the first step where the base lr is at or below :math:`M/f^k`
(inclusive): each time the base lr has fallen by another factor f the batch grows by f
and the lr falls by :math:`\sqrt f` instead, and between those cuts it holds (the warm-up,
where :math:`M = \eta`, is followed as it is). The step that matters for Adam,
:math:`\eta_{seesaw}/\sqrt{B/B_0} = M f^{-k}`, is the base schedule cut into steps of f,
exactly the base schedule for a step schedule that halves (f = 2). Once the batch
reaches :math:`B_{max}` the base schedule goes on, scaled by :math:`\sqrt{B_{max}/B_0}`
(further decay is a true lr decay again; at the step where the cap is reached the lr
falls by at least :math:`\sqrt f` when :math:`B_{max} = B_0 f^K`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = ["Seesaw", "SeesawPoint", "SeesawUpdates", "seesaw", "seesaw_updates"]

# Batches are exact integers and the level test multiplies by f^k in float64: past
# 2**53 neither holds, so the cap is refused there rather than rounded silently.
_MAX_BATCH = 2**53


class SeesawPoint(NamedTuple):
    """The learning rate and the batch size (examples per update) at one base step."""

    lr: float
    batch: int


class SeesawUpdates(NamedTuple):
    """Optimizer updates a Seesaw plan needs for the base schedule's examples.

    ``updates`` counts the last update even when it is partial; ``last_batch`` is the
    number of examples it takes (at most its planned batch), so the plan consumes exactly
    ``examples = base_updates * batch_size``, the base schedule's examples.
    """

    updates: int
    base_updates: int
    examples: int
    last_batch: int


def _int_arg(name: str, value: Any, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}; {fix}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}; {fix}")
    return int(value)


class Seesaw:
    """A Seesaw plan: call it with the base step t to get :class:`SeesawPoint` (lr, batch).

    Built by :func:`seesaw`. ``t`` is the examples seen divided by ``batch_size`` (a
    non-negative number, floored to the base step that holds it). The base schedule is
    read once per step, in order, up to the step where the batch reaches the cap (the
    running peak needs every step before ``t``); the steps where the batch grows and
    where the peak rose are kept.

    Attributes:
      batch_size, max_batch_size, factor: as given.
      batches: :math:`B_0, B_1, \\dots, B_K` (the last is ``max_batch_size``).
    """

    def __init__(self, lr_schedule, batch_size, max_batch_size, factor):
        self.lr_schedule = lr_schedule
        self.batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.factor = factor
        batches = [batch_size]
        whole = float(factor).is_integer()
        k = 0
        while batches[-1] < max_batch_size:
            k += 1
            # integer factors stay exact integers; others round half up
            grown = (
                batch_size * int(factor) ** k if whole else math.floor(batch_size * factor**k + 0.5)
            )
            b = min(max_batch_size, grown)
            if b <= batches[-1]:
                raise ValueError(
                    f"factor={factor!r} does not grow batch_size={batch_size} by one "
                    f"example at level {k} ({batches[-1]} * factor rounds to {b}): pass "
                    "a factor > 1 large enough to grow the batch, or a larger batch_size"
                )
            batches.append(b)
        self.batches = tuple(batches)
        self._top = len(batches) - 1  # K
        self._next = 0  # first base step not yet read
        self._peak = 0.0
        self._level = 0
        self._switch: list[int] = []  # _switch[k - 1]: first base step at level k
        # the running peak M(n): its value from each step where it rose (to the cap)
        self._rise_steps: list[int] = []
        self._rise_values: list[float] = []

    def __repr__(self):
        return (
            f"Seesaw(batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, "
            f"factor={self.factor!r}, batches={list(self.batches)})"
        )

    def base_lr(self, n: int) -> float:
        """The base schedule at step ``n``, checked finite and >= 0."""
        try:
            raw = self.lr_schedule(n)
        except Exception as e:
            raise ValueError(f"lr_schedule({n}) raised {type(e).__name__}: {e}") from e
        try:
            lr = v.single(f"lr_schedule({n})", raw)
        except ValueError:
            raise ValueError(
                f"lr_schedule must return one real number, got {raw!r} at step {n}"
            ) from None
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(
                f"lr_schedule must return finite values in [0, inf), got {raw!r} at step "
                f"{n}; fix the base schedule (a learning rate is finite and non-negative)"
            )
        return lr

    def _scan(self, n: int) -> None:
        """Reads the base schedule up to step n (or until the cap is reached)."""
        f = self.factor
        while self._next <= n and self._level < self._top:
            s = self._next
            lr = self.base_lr(s)
            if lr > self._peak or not self._rise_steps:
                self._peak = max(self._peak, lr)
                self._rise_steps.append(s)
                self._rise_values.append(self._peak)
            # level k once the lr has fallen to the peak / f^k (inclusive); lr = 0 < peak
            # passes every level, up to the cap
            while (
                self._level < self._top
                and self._peak > 0
                and lr * f ** (self._level + 1) <= self._peak
            ):
                self._level += 1
                self._switch.append(s)
            self._next += 1

    def level(self, t) -> int:
        """k(n): how many times the batch has grown by base step ``t``."""
        n = self._step(t)
        self._scan(n)
        return bisect.bisect_right(self._switch, n)

    def batch(self, t) -> int:
        """B(n): the batch size at base step ``t``."""
        return self.batches[self.level(t)]

    @property
    def switch_steps(self) -> tuple[int, ...]:
        """Base steps where the batch has grown so far (level k starts at entry k - 1)."""
        return tuple(self._switch)

    def peak(self, t) -> float:
        """M(n): the largest base lr up to base step ``t`` (read before the cap only)."""
        n = self._step(t)
        self._scan(n)
        return self._rise_values[bisect.bisect_right(self._rise_steps, n) - 1]

    def __call__(self, t) -> SeesawPoint:
        n = self._step(t)
        k = self.level(n)
        b = self.batches[k]
        if k == self._top:  # at the cap: the base schedule, scaled
            return SeesawPoint(self.base_lr(n) * math.sqrt(b / self.batch_size), b)
        return SeesawPoint(self.peak(n) * self.factor ** (-k / 2), b)

    @staticmethod
    def _step(t) -> int:
        if v.is_traced(t):
            raise ValueError(
                "t must be a concrete number, got a traced value; the Seesaw plan is "
                "host-side Python: call it outside jit and feed lr and batch in"
            )
        x = v.single("t", t)
        if not (math.isfinite(x) and x >= 0):
            raise ValueError(f"t must be in [0, inf) (examples seen / batch_size), got {t!r}")
        return math.floor(x)


def seesaw(lr_schedule: Callable[[int], Any], batch_size, *, max_batch_size, factor=2.0):
    r"""Turns a decaying lr schedule into a Seesaw plan of (lr, batch) per base step.

    Each time the base lr has fallen by another ``factor`` below its running peak M, the
    batch grows by ``factor`` and the lr falls by :math:`\sqrt{f}` instead of ``f``;
    at ``max_batch_size`` the base schedule continues, scaled:

    .. math::
      B(n) = \min\big(B_{max},\ B_0 f^{k(n)}\big),\qquad
      \eta_{seesaw}(n) = M(n)\,f^{-k(n)/2}\ \ (\text{below the cap}),\quad
      \eta(n)\sqrt{B_{max}/B_0}\ \ (\text{at it}),\qquad
      k(n) = \max_{s\le n}\Big\lfloor \log_f \frac{M(s)}{\eta(s)}\Big\rfloor

    (k capped where the batch reaches :math:`B_{max}`; the module docstring has the
    exact rule, with rounding and zero learning rates). The peak is the running maximum,
    so a warm-up is followed as it is, at the initial batch; the batch never shrinks.

    Args:
      lr_schedule: the base schedule, a function of the integer base step n (an optax
        schedule works) returning a finite lr >= 0. The base step is the examples seen
        divided by ``batch_size``.
      batch_size: :math:`B_0`, the base schedule's batch size, an int >= 1.
      max_batch_size: :math:`B_{max}`, an int in [batch_size, 2**53]; the batch stops
        growing there (the last growth is clipped to it).
      factor: f > 1, finite: the lr decay that one batch growth replaces.

    Returns:
      A :class:`Seesaw`; ``plan(t)`` gives :class:`SeesawPoint` ``(lr, batch)`` at the
      base step ``floor(t)``. An update that starts at ``e`` examples uses
      ``plan(e // batch_size)`` and consumes ``batch`` examples;
      :func:`seesaw_updates` counts the updates.

    Raises:
      ValueError: an argument outside its range (named, with the value), or
        ``lr_schedule`` returning a non-finite, negative or non-number value (at
        construction for step 0, later at the step that returns it).

    Example:
      >>> step = lambda n: 1.0 / 2 ** (n // 100)      # halve every 100 steps
      >>> plan = seesaw(step, 32, max_batch_size=128)
      >>> plan(99)
      SeesawPoint(lr=1.0, batch=32)
      >>> plan(100)                                   # lr / sqrt(2), batch * 2
      SeesawPoint(lr=0.7071067811865476, batch=64)
      >>> plan(200)
      SeesawPoint(lr=0.5, batch=128)
      >>> plan(300)                                   # capped: the base decay goes on
      SeesawPoint(lr=0.25, batch=128)
      >>> seesaw_updates(plan, 400).updates           # 100 + 50 + 50, not 400
      200

    References:
      Meterez, Morwani, Wu, Oncescu, Pehlevan, Kakade 2025, "Seesaw: Accelerating Training
      by Balancing Learning Rate and Batch Size Scheduling", arXiv 2510.14717.
    """
    if not callable(lr_schedule):
        raise ValueError(
            f"lr_schedule must be callable (a function of the base step), got "
            f"{lr_schedule!r}; pass e.g. optax.cosine_decay_schedule(...) or a lambda"
        )
    batch_size = _int_arg(
        "batch_size", batch_size, 1, _MAX_BATCH, "pass the base schedule's batch size"
    )
    max_batch_size = _int_arg(
        "max_batch_size",
        max_batch_size,
        batch_size,
        _MAX_BATCH,
        "the cap must be at least batch_size (equal: no ramp)",
    )
    if isinstance(factor, bool | np.bool_):
        raise ValueError(f"factor must be a real number in (1, inf), got {factor!r}")
    f = v.single("factor", factor)
    if not (math.isfinite(f) and f > 1):
        raise ValueError(
            f"factor must be in (1, inf), got {factor!r}; it is the lr decay one batch "
            "growth replaces (2 doubles the batch where the base lr halves)"
        )
    plan = Seesaw(lr_schedule, batch_size, max_batch_size, f)
    plan.base_lr(0)  # a broken schedule fails here, not mid-training
    return plan


def seesaw_updates(plan: Seesaw, base_updates) -> SeesawUpdates:
    r"""Optimizer updates the plan needs for the examples of ``base_updates`` base steps.

    The base schedule takes ``base_updates`` updates of :math:`B_0` examples. The plan's
    update starting at ``e`` examples takes :math:`B(\lfloor e/B_0\rfloor)` examples (the
    last one only what is left), so

    .. math:: U = \#\{\text{updates until } e \ge N B_0\} \le N

    with equality only when the batch never grows.

    Example:
      >>> plan = seesaw(lambda n: 1.0 / 2 ** (n // 100), 32, max_batch_size=128)
      >>> seesaw_updates(plan, 400)
      SeesawUpdates(updates=200, base_updates=400, examples=12800, last_batch=128)
    """
    if not isinstance(plan, Seesaw):
        raise ValueError(f"plan must be a Seesaw from scaling.seesaw(...), got {plan!r}")
    n_base = _int_arg(
        "base_updates", base_updates, 1, 2**62, "pass the base schedule's number of updates"
    )
    b0 = plan.batch_size
    total = n_base * b0
    examples = updates = last = 0
    while examples < total:
        b = plan.batch(examples // b0)
        last = min(b, total - examples)
        examples += last
        updates += 1
    return SeesawUpdates(updates, n_base, total, last)

r"""The gradient noise scale: estimators, logs, the current value and whether it settled.

McCandlish et al. 2018, app. A.2. Pure Python and NumPy: the optax transform that
measures it during training is ``optax_ext.noise_measurement.measure_noise_scale``
(``ox.measure_noise_scale``); it calls the arithmetic here, never the reverse.

The simple noise scale :math:`B_{simple} = \mathrm{tr}\,\Sigma/|G|^2` (per-sample gradient
covariance Σ, true gradient G) is estimated from squared gradient norms at two batch
sizes :math:`B_{small} < B_{big}`. Since :math:`E|G_B|^2 = |G|^2 + \mathrm{tr}\Sigma/B`:

.. math::
  |G|^2 \approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big} - B_{small}},
  \qquad
  \mathrm{tr}\,\Sigma \approx \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small} - 1/B_{big}}

Both are unbiased but very noisy per step, so they are averaged with exponential moving
averages, **numerator and denominator separately**, and
:math:`B_{simple} = \mathrm{EMA}(\mathrm{tr}\Sigma)/\mathrm{EMA}(|G|^2)`: the mean of per-step
ratios is biased (a ratio of noisy quantities).

Debiasing: the EMAs start at zero, so after t updates each carries the factor
:math:`1-\beta^t`. Numerator and denominator use the same decay, so the factor cancels in
:math:`B_{simple}`; the individual :math:`|G|^2` and :math:`\mathrm{tr}\Sigma` are divided by
it. The factor itself is tracked as the EMA of the constant 1 (``NoiseEMA.weight``), which
stays right even when the decay changes over time (a schedule or
``optax.inject_hyperparams``).

Where the two batch sizes come from
-----------------------------------
- **Data parallel** (``axis_name`` given, under ``jax.pmap`` / ``shard_map``):
  :math:`B_{small}` = the per-device batch (``batch_size``), read from the local gradient;
  the transform then averages the gradients over the axis itself with ``lax.pmean``
  (do *not* pmean them before) and reads :math:`B_{big}` = ``batch_size`` × axis size.
- **Gradient accumulation**: ``optax_ext.wrappers.accumulation.accumulate_gradients`` calls
  ``update(mean_grads, state, params, micro_grad_sq_norm=m, accumulation_steps=k)``
  where ``m`` is the mean over the k micro-batches of each micro-batch gradient's squared
  norm: :math:`B_{small}` = ``batch_size`` (one micro-batch), :math:`B_{big}` = k·``batch_size``.
  With an ``axis_name`` as well, ``m`` is averaged over devices and
  :math:`B_{big}` = k·``batch_size``·axis size.

The extra-argument names are defined once, in :mod:`scaling.protocol`. The transform must
come FIRST in the chain (it needs raw gradients) and passes the gradients through
unchanged (averaged over ``axis_name`` when one is given)::

    tx = optax.chain(ox.measure_noise_scale(batch_size=32, axis_name="batch"),
                     optax.adamw(1e-3))
    ...  # inside the pmapped step: updates, state = tx.update(local_grads, state, params)
    ox.current_noise_scale(state)        # B_simple ± s.e. over the last window, settled?

The current value (one estimator)
---------------------------------
The noise scale changes during training (it starts small and grows), so an average over
the whole run answers a question nobody asked. **The current B_simple** is the ratio of
means over the last ``window`` per-update estimates,

.. math:: \hat B = \frac{\sum_{t\in W} \mathrm{tr}\Sigma_t}{\sum_{t\in W} |G|^2_t},
   \qquad
   \mathrm{s.e.}(\hat B) = \frac{1}{\overline{|G|^2}}
   \sqrt{\frac{\mathrm{var}(\mathrm{tr}\Sigma_t - \hat B\,|G|^2_t)}{|W|}}

(delta method), computed by :func:`current_b_simple` from the raw estimates, by
:func:`settled_noise_scale` from a log, by ``python -m scaling noise`` and by
``ox.current_noise_scale(opt_state)`` (which keeps the last two windows of raw estimates
in its state): one function, the same window, the same number. The window defaults to
:func:`default_window` of the number of updates. :func:`window_estimates` gives the same
ratio over consecutive windows (the trajectory). The transform's EMA (``b_simple_ema`` in
a log, :func:`noise_ema_read`) is secondary: a weighted average over the run's history.

**Settled** means *stable and precise*:

- *precise*: the standard error of the last window, and of the window before, is at most
  :data:`SETTLED_REL_STDERR` (20%) of its value;
- *stable*: the last two windows agree within :data:`SETTLED_SIGMAS` (2) combined
  standard errors, :math:`|\hat B_{last} - \hat B_{prev}| \le
  2\sqrt{s_{last}^2 + s_{prev}^2}`.

Precision makes the agreement test mean something: two windows with 50% errors agree
with almost anything. Two 20% windows that agree differ by at most about 57%, and by
much less typically. An EMA with decay β averages over about ``1/(1-β)`` updates
(:func:`ema_window`).

The free estimate from the optimizer's momentum
-----------------------------------------------
With momentum :math:`m_t = \beta m_{t-1} + (1-\beta)g_t` of batch gradients
:math:`g_t = G + \epsilon_t` (:math:`E|\epsilon|^2 = \mathrm{tr}\Sigma/B`), the ratio
:math:`\rho^2 = E|m|^2/E|g|^2` gives the signal-to-noise ratio at no extra compute
(Su, kexue.fm/archives/11267): :func:`momentum_noise_scale`.

Log format (read by ``python -m scaling noise``)
------------------------------------------------
JSON lines, one object per line, one line per measuring step::

    {"step": 100, "g2": 0.0123, "trace_sigma": 4.56}
    {"step": 101, "b_simple": 371.2}

``step`` (int, increasing; gaps are allowed) is required; then either ``g2`` and
``trace_sigma`` (the raw per-step estimates of :math:`|G|^2` and
:math:`\mathrm{tr}\Sigma`; preferred: they are averaged separately) or ``b_simple`` (a
raw per-step ratio; then the ratios are averaged, which is biased). An optional
``batch_size`` must stay the same on every line. Other keys are ignored (e.g.
``b_simple_ema``, written by ``ox.noise_log_record``). Blank lines are skipped.

References:
  McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv 1812.06162,
  appendix A.2; Su, https://kexue.fm/archives/10542, https://kexue.fm/archives/11267.
  Compare EleutherAI gpt-neox ``megatron/gradient_noise_scale`` and k-diffusion
  ``k_diffusion/gns.py``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = [
    "NoiseEstimate",
    "NoiseScale",
    "NoiseEMA",
    "NoiseLogEntry",
    "SettledNoiseScale",
    "WindowEstimate",
    "MomentumNoiseScale",
    "SETTLED_REL_STDERR",
    "SETTLED_SIGMAS",
    "two_batch_estimates",
    "noise_ema_update",
    "noise_ema_read",
    "ema_window",
    "ema_decay",
    "read_noise_log",
    "window_estimates",
    "settled_noise_scale",
    "current_b_simple",
    "default_window",
    "format_b_simple",
    "momentum_noise_scale",
]


class NoiseEstimate(NamedTuple):
    """Unbiased one-step estimates of :math:`|G|^2` and :math:`\\mathrm{tr}\\,\\Sigma`."""

    g2: Any
    trace_sigma: Any


class NoiseScale(NamedTuple):
    """The averaged noise scale: ``b_simple = trace_sigma / g2`` (debiased EMAs)."""

    b_simple: Any
    g2: Any
    trace_sigma: Any


class NoiseEMA(NamedTuple):
    """EMAs (started at zero) of the trΣ estimates, of the |G|² estimates and of 1."""

    trace_sigma: Any
    g2: Any
    weight: Any


# ------------------------------------------------------------------- estimators


def two_batch_estimates(g2_small, g2_big, b_small, b_big) -> NoiseEstimate:
    r"""Estimates :math:`|G|^2` and :math:`\mathrm{tr}\Sigma` from two batch sizes.

    .. math::
      |G|^2 \approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big}-B_{small}},
      \qquad
      \mathrm{tr}\Sigma \approx \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small}-1/B_{big}}

    Arithmetic only: works on Python floats, NumPy and JAX arrays (inside ``jit``).
    Python and NumPy inputs are checked: batch sizes > 0, finite and
    ``b_small != b_big``, results finite (otherwise ``ValueError``); JAX arrays pass
    unchecked, as inside a training step, where the caller keeps the sizes apart.

    Example:
      >>> two_batch_estimates(7.125, 4.390625, 32, 256)
      NoiseEstimate(g2=4.0, trace_sigma=100.0)

    References:
      McCandlish et al. 2018, arXiv 1812.06162, appendix A.2.
    """
    if any(_is_jax(x) for x in (g2_small, g2_big, b_small, b_big)):
        return NoiseEstimate(*_two_batch(g2_small, g2_big, b_small, b_big))
    v.finite_positive("b_small", b_small)
    v.finite_positive("b_big", b_big)
    if np.any(np.asarray(b_small, dtype=np.float64) == np.asarray(b_big, dtype=np.float64)):
        raise ValueError(
            f"b_small and b_big must differ (two batch sizes), got b_small={b_small!r}, "
            f"b_big={b_big!r}"
        )
    inputs = dict(g2_small=g2_small, g2_big=g2_big, b_small=b_small, b_big=b_big)
    with v.arithmetic("the two-batch estimates", inputs):
        g2, trace = _two_batch(g2_small, g2_big, b_small, b_big)
    return NoiseEstimate(
        v.result("|G|^2", g2, inputs, positive=False),
        v.result("tr(Sigma)", trace, inputs, positive=False),
    )


def _two_batch(g2_small, g2_big, b_small, b_big):
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return g2, trace


def _is_jax(x) -> bool:
    return type(x).__module__.startswith(("jax", "jaxlib"))


def noise_ema_update(ema: NoiseEMA, g2, trace_sigma, decay) -> NoiseEMA:
    r"""One EMA step of numerator and denominator separately (pure, jit-friendly).

    .. math:: m_t = \beta m_{t-1} + (1-\beta)x_t \quad\text{for } x \in
              \{\mathrm{tr}\Sigma, |G|^2, 1\}
    """

    def step(old, new):
        return decay * old + (1 - decay) * new

    return NoiseEMA(step(ema.trace_sigma, trace_sigma), step(ema.g2, g2), step(ema.weight, 1.0))


def _ratio(num, den, *, nonpositive):
    if all(isinstance(x, int | float) for x in (num, den)):
        if den > 0:
            return num / den
        return math.nan if num == 0 and den == 0 else nonpositive
    # Arrays: JAX's numpy for JAX arrays (loaded already, since the caller has them), else
    # NumPy; the same where-selects, so a jitted step stays branch-free.
    xp = sys.modules["jax.numpy"] if _is_jax(num) or _is_jax(den) else np
    den = xp.asarray(den)
    safe = xp.where(den > 0, den, 1)
    fallback = xp.where((den == 0) & (num == 0), xp.nan, nonpositive)
    return xp.where(den > 0, num / safe, fallback)


def noise_ema_read(ema: NoiseEMA) -> NoiseScale:
    r"""Debiased :math:`|G|^2`, :math:`\mathrm{tr}\Sigma` and their ratio :math:`B_{simple}`.

    ``b_simple`` is ``inf`` while the averaged :math:`|G|^2` is not positive (the noise
    swamps the signal) and ``nan`` before the first update.
    """
    return NoiseScale(
        b_simple=_ratio(ema.trace_sigma, ema.g2, nonpositive=math.inf),
        g2=_ratio(ema.g2, ema.weight, nonpositive=math.nan),
        trace_sigma=_ratio(ema.trace_sigma, ema.weight, nonpositive=math.nan),
    )


# ------------------------------------------------------------------------ log


class NoiseLogEntry(NamedTuple):
    """One parsed log line and the running average after it.

    ``g2_raw`` / ``trace_sigma_raw`` are the line's own estimates (``None`` in a log of
    ratios, where ``b_simple_raw`` is the line's ratio).
    """

    line: int
    step: int
    b_simple_raw: float
    b_simple_ema: float
    g2_ema: float | None
    trace_sigma_ema: float | None
    g2_raw: float | None = None
    trace_sigma_raw: float | None = None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def _number(obj: dict, key: str, lineno: int) -> float:
    value = obj[key]
    try:
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        x = float(value) if ok else math.nan
    except OverflowError:  # a JSON integer too large for a float
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"line {lineno}: {key!r} must be a finite number, got {_short(value)}")
    return x


def read_noise_log(lines: Iterable[str], ema: float = 0.99) -> list[NoiseLogEntry]:
    """Parses a JSON-lines noise log (format in the module docstring) and averages it.

    With ``g2`` and ``trace_sigma`` the numerator and denominator are averaged
    separately (debiased EMAs); lines with only ``b_simple`` average the ratios. A log
    mixing the two kinds is rejected.

    Raises:
      ValueError: ``"line N: ..."`` for the first corrupt line (bad JSON, JSON nested too
        deeply, not an object, missing ``step`` or statistics, a non-finite number or one
        too large for a float, mixed kinds, a step that does not increase, a changed
        ``batch_size``), or an empty log.
    """
    v.beta("ema", ema)
    ratio_ema = NoiseEMA(0.0, 0.0, 0.0)  # trace_sigma slot holds the ratio's EMA
    split_ema = NoiseEMA(0.0, 0.0, 0.0)
    kind = None
    batch = None
    out: list[NoiseLogEntry] = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"line {lineno}: JSON nested too deeply") from None
        except ValueError as e:  # e.g. an integer beyond Python's digit limit
            raise ValueError(f"line {lineno}: not valid JSON ({_short(str(e))})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
        step = obj.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"line {lineno}: 'step' must be an integer, got {_short(step)}")
        if out and step <= out[-1].step:
            raise ValueError(
                f"line {lineno}: step {_short(step)} does not come after step {out[-1].step} "
                "(steps must increase: two runs appended to one file?)"
            )
        if "batch_size" in obj:
            size = _number(obj, "batch_size", lineno)
            if batch is not None and size != batch:
                raise ValueError(
                    f"line {lineno}: batch_size changed from {batch:g} to {size:g} at step "
                    f"{step}: averages across a batch-size change mix two runs; split the log "
                    "there and read each part"
                )
            batch = size
        if "g2" in obj or "trace_sigma" in obj:
            if "g2" not in obj or "trace_sigma" not in obj:
                raise ValueError(f"line {lineno}: 'g2' and 'trace_sigma' must come together")
            line_kind = "split"
        elif "b_simple" in obj:
            line_kind = "ratio"
        else:
            raise ValueError(f"line {lineno}: needs 'b_simple' or both 'g2' and 'trace_sigma'")
        if kind is not None and line_kind != kind:
            raise ValueError(f"line {lineno}: mixes 'b_simple' lines with 'g2'/'trace_sigma' lines")
        kind = line_kind
        if kind == "split":
            g2, trace = _number(obj, "g2", lineno), _number(obj, "trace_sigma", lineno)
            split_ema = noise_ema_update(split_ema, g2, trace, ema)
            est = noise_ema_read(split_ema)
            raw = _ratio(trace, g2, nonpositive=math.inf)
            out.append(
                NoiseLogEntry(lineno, step, raw, est.b_simple, est.g2, est.trace_sigma, g2, trace)
            )
        else:
            raw = _number(obj, "b_simple", lineno)
            ratio_ema = noise_ema_update(ratio_ema, 0.0, raw, ema)
            mean = ratio_ema.trace_sigma / ratio_ema.weight
            out.append(NoiseLogEntry(lineno, step, raw, mean, None, None))
    if not out:
        raise ValueError("the noise log has no entries")
    return out


# ------------------------------------------------------------- current estimate

#: Precise: a window's standard error is at most this fraction of its B_simple.
SETTLED_REL_STDERR = 0.2
#: Stable: the last two windows agree within this many combined standard errors.
SETTLED_SIGMAS = 2.0


def ema_window(decay: float) -> float:
    """Updates an EMA with this decay averages over, ``1/(1-decay)`` (0.99: 100).

    Example:
      >>> round(ema_window(0.99), 6)
      100.0
    """
    v.beta("decay", decay)
    return 1.0 / (1.0 - float(decay))


def ema_decay(window: float) -> float:
    """The EMA decay for a window of ``window`` updates, ``1 - 1/window`` (>= 1).

    Example:
      >>> ema_decay(100)
      0.99
    """
    v.check("window", window, 1.0, 1e308)
    return 1.0 - 1.0 / float(window)


def default_window(updates: int) -> int:
    """The window of the current value for a run of ``updates`` updates: a sixth, 10 to 100.

    Late enough to be the current value of a quantity that grows during training, long
    enough for a standard error worth reading; two windows fit in the last third of the
    run. The demo, the command line and ``ox.current_noise_scale`` use it by default.

    Example:
      >>> default_window(300), default_window(30), default_window(10_000)
      (50, 10, 100)
    """
    n = v.single("updates", updates)
    if not (math.isfinite(n) and n >= 0):
        raise ValueError(f"updates must be a number >= 0, got {updates!r}")
    return min(100, max(10, int(n) // 6))


class WindowEstimate(NamedTuple):
    """B_simple over one window of consecutive updates.

    Attributes:
      first_step, last_step: the window's first and last logged step.
      count: per-step estimates in the window.
      b_simple: ratio of the window's means, ``mean(trace_sigma) / mean(g2)``; ``inf``
        when ``mean(g2) <= 0`` (the noise swamps the signal); negative when
        ``mean(trace_sigma) < 0`` (or, in a log of ratios, the mean ratio is): not
        measurable either.
      stderr: its standard error (delta method), ``inf`` with ``b_simple``.
    """

    first_step: int
    last_step: int
    count: int
    b_simple: float
    stderr: float


class SettledNoiseScale(NamedTuple):
    """The current B_simple, its standard error, and whether it has settled.

    Attributes:
      b_simple: B_simple over the last ``window`` updates (ratio of means); ``inf`` or
        negative when not measurable (``reason`` says so).
      stderr: its standard error; ``b_simple ± stderr`` is the range recommendations
        carry, ``± 2 stderr`` a ~95% interval.
      settled: ``precise and stable`` (the module docstring defines both).
      window: updates per window.
      previous: the window before's B_simple (``None`` with fewer than two windows).
      reason: one line saying why (not) settled.
      precise: both windows' relative standard errors are at most
        :data:`SETTLED_REL_STDERR` (the last one's alone while there is one window).
      stable: the two windows agree within :data:`SETTLED_SIGMAS` combined standard
        errors (False with fewer than two windows).
      previous_stderr: the window before's standard error (``None`` without one).
    """

    b_simple: float
    stderr: float
    settled: bool
    window: int
    previous: float | None
    reason: str
    precise: bool = False
    stable: bool = False
    previous_stderr: float | None = None

    @property
    def measurable(self) -> bool:
        """Whether ``b_simple`` is an estimate (finite and >= 0)."""
        return _measurable(self.b_simple)

    def text(self) -> str:
        """``b_simple ± stderr`` as printed everywhere (:func:`format_b_simple`)."""
        return format_b_simple(self.b_simple, self.stderr)

    def summary(self, unit: str = "") -> str:
        """The one line the demo and ``python -m scaling noise`` print.

        Example:
          >>> lines = [f'{{"step": {i}, "g2": 1.0, "trace_sigma": {10 + i % 2}}}' for i in range(8)]
          >>> settled_noise_scale(read_noise_log(lines), window=4).summary()[:41]
          'current B_simple = 10.50 ± 0.29 (last 4 u'
        """
        unit = f" {unit}" if unit else ""
        state = "settled" if self.settled else "NOT settled"
        return (
            f"current B_simple = {self.text()}{unit} (last {self.window} updates): "
            f"{state}: {self.reason}"
        )


def _measurable(x) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


def format_b_simple(b_simple, stderr) -> str:
    """``"83 ± 12"``: B_simple to the digits its standard error supports.

    The standard error keeps two significant digits and B_simple is rounded to the same
    decimal place, so every printout of one estimate shows the same digits. A value
    that is not measurable (``inf``, ``nan``, negative) prints ``-``; an infinite
    standard error ``± -`` beside three significant digits.

    Example:
      >>> format_b_simple(82.7351, 12.13), format_b_simple(2034.0, 312.0)
      ('83 ± 12', '2030 ± 310')
      >>> format_b_simple(3.4567, 0.1234), format_b_simple(float("inf"), 1.0)
      ('3.46 ± 0.12', '- ± -')
    """
    b, se = float(b_simple), float(stderr)
    if not _measurable(b):
        return "- ± -"
    if not (math.isfinite(se) and se > 0):
        return f"{b:.3g} ± " + ("0" if se == 0 else "-")
    decimals = 1 - math.floor(math.log10(se))
    if decimals <= 0:
        return f"{round(b, decimals):.0f} ± {round(se, decimals):.0f}"
    return f"{b:.{decimals}f} ± {se:.{decimals}f}"


def _ratio_of_means(trace, g2) -> tuple[float, float]:
    t, g = np.asarray(trace, np.float64), np.asarray(g2, np.float64)
    with np.errstate(all="ignore"):  # huge logged values: inf here means "not measurable"
        mean_g, mean_t = float(np.mean(g)), float(np.mean(t))
        if not (mean_g > 0 and math.isfinite(mean_g) and math.isfinite(mean_t)):
            return math.inf, math.inf
        ratio = mean_t / mean_g
        if t.size < 2:
            return ratio, math.inf
        # Delta method for a ratio of means: var(R) ~ var(t - R g) / (n mean(g)^2).
        spread = float(np.var(t - ratio * g, ddof=1))
        stderr = math.sqrt(spread / t.size) / mean_g
    return ratio, stderr if math.isfinite(stderr) else math.inf


def _series(entries: Sequence[NoiseLogEntry]):
    steps = [e.step for e in entries]
    if entries and entries[0].g2_raw is None:  # a log of ratios: means of the ratios
        return steps, [e.b_simple_raw for e in entries], [1.0] * len(entries)
    return steps, [e.trace_sigma_raw for e in entries], [e.g2_raw for e in entries]


def _window_arg(window, updates: int) -> int:
    if window is None:
        return default_window(updates)
    v.check("window", window, 2, None)
    if isinstance(window, bool) or float(window) != int(window):
        raise ValueError(f"window must be an int >= 2, got {window!r}")
    return int(window)


def window_estimates(
    entries: Sequence[NoiseLogEntry], window: int | None = None
) -> list[WindowEstimate]:
    """B_simple over consecutive windows of ``window`` log entries: the trajectory.

    Windows are counted from the end, so the last one is always full; the first holds
    the remainder. Each is a ratio of means with a delta-method standard error (a log of
    ratios gives the windows' mean ratio and its standard error, which is biased).

    Args:
      entries: from :func:`read_noise_log`.
      window: entries (updates) per window, an int >= 2; default
        :func:`default_window` of the number of entries.

    Example:
      >>> lines = [f'{{"step": {i}, "g2": 1.0, "trace_sigma": {10 + i % 2}}}' for i in range(6)]
      >>> [(w.first_step, round(w.b_simple, 3)) for w in window_estimates(read_noise_log(lines), 2)]
      [(0, 10.5), (2, 10.5), (4, 10.5)]
    """
    if not entries:
        raise ValueError("window_estimates needs at least one log entry")
    window = _window_arg(window, len(entries))
    steps, num, den = _series(entries)
    out = []
    end = len(entries)
    while end > 0:
        start = max(0, end - window)
        ratio, stderr = _ratio_of_means(num[start:end], den[start:end])
        out.append(WindowEstimate(steps[start], steps[end - 1], end - start, ratio, stderr))
        end = start
    return out[::-1]


def _negative(window: str, ratios: bool) -> str:
    if ratios:
        return (
            f"the mean of {window}'s per-step B_simple values is < 0 (their |G|^2 or "
            "tr(Sigma) estimates are mostly negative)"
        )
    return (
        f"the mean tr(Sigma) of {window} is < 0 (the noise is below what the two batch "
        "sizes resolve)"
    )


def _rel(b: float, se: float) -> float:
    return se / b if b > 0 else math.inf


def _settle(num, den, window: int, ratios: bool) -> SettledNoiseScale:
    """The current estimate from per-update numerators and denominators (oldest first)."""
    n = len(num)
    last = max(0, n - window)
    b, se = _ratio_of_means(num[last:], den[last:])
    two = n >= 2 * window
    pb, pse = (
        _ratio_of_means(num[n - 2 * window : last], den[n - 2 * window : last])
        if two
        else (None, None)
    )
    precise = _measurable(b) and _rel(b, se) <= SETTLED_REL_STDERR
    prev_ok = two and _measurable(pb)
    if prev_ok:
        precise = precise and _rel(pb, pse) <= SETTLED_REL_STDERR
    allowed = SETTLED_SIGMAS * math.hypot(se, pse) if prev_ok else math.nan
    stable = bool(prev_ok and _measurable(b) and abs(b - pb) <= allowed)

    def result(reason):
        return SettledNoiseScale(
            b, se, bool(precise and stable), window, pb, reason, bool(precise), stable, pse
        )

    if not math.isfinite(b):
        return result(
            "not measurable: the mean |G|^2 of the last window is <= 0 "
            "(the noise swamps the signal)"
        )
    if b < 0:  # a negative B_simple is no estimate: say so, never report it
        return result("not measurable: " + _negative("the last window", ratios))
    if not _rel(b, se) <= SETTLED_REL_STDERR:
        rel = _rel(b, se)
        share = f"{rel:.0%} of the value" if math.isfinite(rel) else "unbounded"
        return result(
            f"too uncertain: the standard error is {share} (settled needs <= "
            f"{SETTLED_REL_STDERR:.0%}): average over more updates"
        )
    if not two:
        return result(f"only {n} updates: settling needs two windows of {window}")
    if not math.isfinite(pb):
        return result("the window before was not measurable (mean |G|^2 <= 0)")
    if pb < 0:
        return result("the window before was not measurable: " + _negative("it", ratios))
    if not _rel(pb, pse) <= SETTLED_REL_STDERR:
        rel = _rel(pb, pse)
        share = f"{rel:.0%}" if math.isfinite(rel) else "an unbounded"
        return result(
            f"the window before is too uncertain ({share} standard error) to tell "
            "whether the value still moves"
        )
    if not stable:
        return result(
            f"still moving: {format_b_simple(pb, pse)} -> {format_b_simple(b, se)} "
            f"between the last two windows (more than {SETTLED_SIGMAS:g} combined "
            f"standard errors, {allowed:.3g})"
        )
    return result(
        f"stable and precise: the last two windows agree within {SETTLED_SIGMAS:g} "
        f"standard errors ({allowed:.3g}) and each is known to {SETTLED_REL_STDERR:.0%}"
    )


def current_b_simple(g2, trace_sigma, window: int | None = None) -> SettledNoiseScale:
    r"""The current B_simple from per-update raw estimates, and whether it has settled.

    The one estimator of this package (module docstring): the ratio of means of the
    last ``window`` estimates with its delta-method standard error; *settled* when it is
    precise and stable against the window before.

    Args:
      g2: per-update :math:`|G|^2` estimates, oldest first (a sequence or 1-d array).
      trace_sigma: the same updates' :math:`\mathrm{tr}\Sigma` estimates.
      window: updates per window, an int >= 2; default :func:`default_window` of the
        number of estimates.

    Returns:
      A :class:`SettledNoiseScale`.

    Example:
      >>> s = current_b_simple([1.0] * 8, [10.0, 11.0] * 4, window=4)
      >>> s.text(), s.settled
      ('10.50 ± 0.29', True)
    """
    g = np.asarray(g2, np.float64).ravel()
    t = np.asarray(trace_sigma, np.float64).ravel()
    if g.size != t.size:
        raise ValueError(f"g2 and trace_sigma must have the same length, got {g.size} and {t.size}")
    if g.size == 0:
        raise ValueError("current_b_simple needs at least one estimate")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(t))):
        raise ValueError("g2 and trace_sigma must be finite (unmeasured updates left out)")
    return _settle(t, g, _window_arg(window, g.size), ratios=False)


def settled_noise_scale(
    entries: Sequence[NoiseLogEntry], window: int | None = None
) -> SettledNoiseScale:
    """The current B_simple of a log (:func:`read_noise_log`), and whether it has settled.

    :func:`current_b_simple` on the log's per-step estimates (a log of ratios averages
    the ratios instead, which is biased). A B_simple that still climbs (as early in
    training) fails the stability test and ``reason`` says by how much it moved; one
    known to worse than 20% fails the precision test whatever the windows say.

    Args:
      entries: from :func:`read_noise_log`.
      window: updates per window (>= 2); default :func:`default_window` of the number
        of entries.

    Returns:
      A :class:`SettledNoiseScale`.

    Example:
      >>> lines = [f'{{"step": {i}, "g2": 1.0, "trace_sigma": {10 + i % 2}}}' for i in range(8)]
      >>> s = settled_noise_scale(read_noise_log(lines), window=4)
      >>> round(s.b_simple, 3), s.settled
      (10.5, True)

    References:
      McCandlish et al. 2018, arXiv 1812.06162, app. A.2; Merrill et al. 2025 and Zhang
      et al. 2025 (the noise scale grows during training).
    """
    if not entries:
        raise ValueError("settled_noise_scale needs at least one log entry")
    _, num, den = _series(entries)
    return _settle(num, den, _window_arg(window, len(entries)), ratios=entries[0].g2_raw is None)


# ------------------------------------------------------------ from the momentum


class MomentumNoiseScale(NamedTuple):
    """The noise scale read from the momentum: ``snr`` = |G|²/(trΣ/B), ``b_simple`` = B/SNR."""

    snr: float
    b_simple: float


def momentum_noise_scale(momentum_sq_norm, grad_sq_norm, beta, batch_size) -> MomentumNoiseScale:
    r"""B_simple from the ratio of the momentum's and the gradients' squared norms.

    With :math:`m_t = \beta m_{t-1} + (1-\beta) g_t` in steady state and
    :math:`r = (1-\beta)/(1+\beta)`:
    :math:`E|m|^2 = |G|^2 + r\,\mathrm{tr}\Sigma/B` and
    :math:`E|g|^2 = |G|^2 + \mathrm{tr}\Sigma/B`, so with :math:`\rho^2 = E|m|^2/E|g|^2`

    .. math:: \mathrm{SNR} = \frac{\rho^2 - r}{1 - \rho^2},\qquad
              B_{simple} = \frac{B}{\mathrm{SNR}} = B\,\frac{1-\rho^2}{\rho^2 - r}

    Pass averages (EMAs over many steps) of both squared norms: one step's ratio is
    noisy. The momentum must be the EMA form; for a heavy-ball ``m = βm + g`` multiply its
    squared norm by :math:`(1-\beta)^2`. Assumes the gradient mean changes slowly over
    the momentum's window (about :math:`1/(1-\beta)` steps).

    Args:
      momentum_sq_norm: :math:`E|m|^2` (>= 0).
      grad_sq_norm: :math:`E|g|^2` (> 0) of the same steps' batch gradients.
      beta: the momentum's decay in [0, 1).
      batch_size: the batch B of each gradient.

    Returns:
      :class:`MomentumNoiseScale`. ``b_simple`` is ``inf`` (SNR 0) when
      :math:`\rho^2 \le r` (pure noise) and 0 when :math:`\rho \ge 1` (no measurable
      noise).

    Example:
      >>> # |G|^2 = 1, trSigma/B = 4 (B = 32: B_simple = 128), beta = 0.9 (r = 1/19)
      >>> r = momentum_noise_scale(1 + 4 / 19, 1 + 4, 0.9, 32)
      >>> round(r.snr, 6), round(r.b_simple, 6)
      (0.25, 128.0)

    References:
      Su, https://kexue.fm/archives/11267.
    """
    v.nonnegative("momentum_sq_norm", momentum_sq_norm)
    v.finite_positive("grad_sq_norm", grad_sq_norm)
    v.beta("beta", beta)
    v.finite_positive("batch_size", batch_size)
    inputs = dict(momentum_sq_norm=momentum_sq_norm, grad_sq_norm=grad_sq_norm)
    rho2 = v.result("rho^2", float(momentum_sq_norm) / float(grad_sq_norm), inputs, positive=False)
    r = (1 - float(beta)) / (1 + float(beta))
    if rho2 <= r:
        return MomentumNoiseScale(0.0, math.inf)
    if rho2 >= 1:
        return MomentumNoiseScale(math.inf, 0.0)
    return MomentumNoiseScale((rho2 - r) / (1 - rho2), float(batch_size) * (1 - rho2) / (rho2 - r))

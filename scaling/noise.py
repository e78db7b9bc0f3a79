r"""Measuring the gradient noise scale during training (McCandlish et al. 2018, app. A.2).

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

The transform must come FIRST in the chain (it needs raw gradients) and passes the
gradients through unchanged (averaged over ``axis_name`` when one is given)::

    tx = optax.chain(scaling.measure_noise_scale(batch_size=32, axis_name="batch"),
                     optax.adamw(1e-3))
    ...  # inside the pmapped step: updates, state = tx.update(local_grads, state, params)
    scaling.noise_scale(state).b_simple

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
``b_simple_ema``, written by :func:`noise_log_record`). Blank lines are skipped.

References:
  McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", arXiv 1812.06162,
  appendix A.2; Su, https://kexue.fm/archives/10542. Compare EleutherAI gpt-neox
  ``megatron/gradient_noise_scale`` and k-diffusion ``k_diffusion/gns.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_ext._common import check_range
from scaling import _validate as v

__all__ = [
    "NoiseEstimate",
    "NoiseScale",
    "NoiseEMA",
    "NoiseScaleState",
    "NoiseLogEntry",
    "two_batch_estimates",
    "noise_ema_init",
    "noise_ema_update",
    "noise_ema_read",
    "measure_noise_scale",
    "noise_scale",
    "noise_log_record",
    "read_noise_log",
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


class NoiseScaleState(NamedTuple):
    """State of :func:`measure_noise_scale`.

    Attributes:
      count: int32 number of updates.
      ema: :class:`NoiseEMA` (numerator ``trace_sigma``, denominator ``g2``, ``weight``).
      last_g2: the last step's raw :math:`|G|^2` estimate.
      last_trace_sigma: the last step's raw :math:`\\mathrm{tr}\\,\\Sigma` estimate.
    """

    count: jax.Array
    ema: NoiseEMA
    last_g2: jax.Array
    last_trace_sigma: jax.Array


# ------------------------------------------------------------------- estimators


def two_batch_estimates(g2_small, g2_big, b_small, b_big) -> NoiseEstimate:
    r"""Estimates :math:`|G|^2` and :math:`\mathrm{tr}\Sigma` from two batch sizes.

    .. math::
      |G|^2 \approx \frac{B_{big}|G_{big}|^2 - B_{small}|G_{small}|^2}{B_{big}-B_{small}},
      \qquad
      \mathrm{tr}\Sigma \approx \frac{|G_{small}|^2 - |G_{big}|^2}{1/B_{small}-1/B_{big}}

    Arithmetic only: works on Python floats, NumPy and JAX arrays (inside ``jit``).
    Concrete batch sizes are checked: both > 0 and finite, and ``b_small != b_big``
    (otherwise ``ValueError``); traced ones are the caller's to keep apart.

    Example:
      >>> two_batch_estimates(7.125, 4.390625, 32, 256)
      NoiseEstimate(g2=4.0, trace_sigma=100.0)

    References:
      McCandlish et al. 2018, arXiv 1812.06162, appendix A.2.
    """
    v.finite_positive("b_small", b_small)
    v.finite_positive("b_big", b_big)
    if not (v.is_traced(b_small) or v.is_traced(b_big)) and np.any(
        np.asarray(b_small, dtype=np.float64) == np.asarray(b_big, dtype=np.float64)
    ):
        raise ValueError(
            f"b_small and b_big must differ (two batch sizes), got b_small={b_small!r}, "
            f"b_big={b_big!r}"
        )
    inputs = dict(g2_small=g2_small, g2_big=g2_big, b_small=b_small, b_big=b_big)
    with v.arithmetic("the two-batch estimates", inputs):
        g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
        trace = (g2_small - g2_big) / (1 / b_small - 1 / b_big)
    return NoiseEstimate(
        v.result("|G|^2", g2, inputs, positive=False),
        v.result("tr(Sigma)", trace, inputs, positive=False),
    )


def noise_ema_init(dtype=jnp.float32) -> NoiseEMA:
    """A zero :class:`NoiseEMA` (JAX scalars). ``NoiseEMA(0.0, 0.0, 0.0)`` works too."""
    # Separate buffers: a shared one could not be donated (jit donate_argnums).
    return NoiseEMA(*(jnp.zeros([], dtype) for _ in range(3)))


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
    den = jnp.asarray(den)
    safe = jnp.where(den > 0, den, 1)
    fallback = jnp.where((den == 0) & (num == 0), jnp.nan, nonpositive)
    return jnp.where(den > 0, num / safe, fallback)


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


# -------------------------------------------------------------------- transform


def _sq_norm(tree) -> jax.Array:
    # The barrier keeps XLA from merging this g * g with the g² of a following Adam, which
    # would materialise g² for both users (an extra write and read of the gradients' size).
    leaves = lax.optimization_barrier(jax.tree_util.tree_leaves(tree))
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def measure_noise_scale(
    batch_size: float, axis_name: str | None = None, ema: float = 0.99
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform that measures :math:`B_{simple}` during training.

    Place it FIRST in ``optax.chain``. It passes the gradients through unchanged; with an
    ``axis_name`` it emits them averaged over the axis (``lax.pmean``), so the step
    function must not average them again. Each update computes the two-batch estimates
    (:func:`two_batch_estimates`) and updates debiased EMAs of numerator and denominator
    (:func:`noise_ema_update`); read them with :func:`noise_scale`.

    Two batch sizes are needed, from one of:

    - ``axis_name`` (pmap / shard_map): local gradient (B_small = ``batch_size``, the
      per-device batch) versus the average over the axis (B_big = ``batch_size`` × axis
      size).
    - gradient accumulation: extra args ``micro_grad_sq_norm`` (mean over the k micro-
      batches of each micro-batch gradient's squared norm) and ``accumulation_steps`` (k)
      passed by ``accumulate_gradients``: B_small = ``batch_size`` (one micro-batch),
      B_big = k × ``batch_size`` (× axis size with an ``axis_name``).

    With neither, :meth:`update` raises ``ValueError``. When B_big equals B_small (an
    axis of size 1, k = 1) the step cannot be measured and the EMAs are left unchanged.

    Args:
      batch_size: examples in one gradient the transform sees locally: the per-device
        batch, or the micro-batch under accumulation (> 0).
      axis_name: the pmap / shard_map axis over which to average the gradients, or None.
      ema: decay of the EMAs in [0, 1) (0.99: about the last 100 steps).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`NoiseScaleState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> tx = measure_noise_scale(batch_size=8)
      >>> g = {"w": jnp.ones(3)}
      >>> s = tx.init(g)
      >>> u, s = tx.update(g, s, micro_grad_sq_norm=jnp.float32(4.0), accumulation_steps=4)
      >>> round(float(noise_scale(s).b_simple), 4)  # trΣ = 1/(1/8-1/32), |G|² = 64/24
      4.0

    References:
      McCandlish et al. 2018, arXiv 1812.06162, appendix A.2; Su,
      https://kexue.fm/archives/10542.
    """
    check_range("batch_size", batch_size, 0.0, None, low_open=True)
    check_range("ema", ema, 0.0, 1.0, high_open=True)

    def init_fn(params):
        del params
        return NoiseScaleState(
            jnp.zeros([], jnp.int32),
            noise_ema_init(),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        micro_grad_sq_norm=None,
        accumulation_steps=None,
        **extra_args,
    ):
        del params, extra_args
        if micro_grad_sq_norm is not None:
            if accumulation_steps is None:
                raise ValueError("micro_grad_sq_norm was given without accumulation_steps")
            g2_small = jnp.asarray(micro_grad_sq_norm, jnp.float32)
            b_big = jnp.asarray(accumulation_steps, jnp.float32) * batch_size
        elif axis_name is not None:
            g2_small = _sq_norm(updates)
            b_big = jnp.float32(batch_size)
        else:
            raise ValueError(
                "measure_noise_scale needs two batch sizes: give axis_name (under pmap or "
                "shard_map) or wrap the optimizer in accumulate_gradients"
            )
        if axis_name is not None:
            # One collective for the gradients and the small-batch statistic.
            updates, g2_small = lax.pmean((updates, g2_small), axis_name)
            b_big = b_big * lax.axis_size(axis_name)
        g2_big = _sq_norm(updates)
        b_small = jnp.float32(batch_size)
        valid = b_big > b_small
        # A dummy big batch keeps the arithmetic finite on the unmeasurable path.
        est = two_batch_estimates(g2_small, g2_big, b_small, jnp.where(valid, b_big, 2 * b_small))
        new = noise_ema_update(state.ema, est.g2, est.trace_sigma, ema)
        keep = lambda n, o: jnp.where(valid, n, o).astype(jnp.float32)
        new_state = NoiseScaleState(
            count=optax.safe_increment(state.count),
            ema=jax.tree.map(keep, new, state.ema),
            last_g2=keep(est.g2, state.last_g2),
            last_trace_sigma=keep(est.trace_sigma, state.last_trace_sigma),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_states(opt_state) -> list[NoiseScaleState]:
    is_ours = lambda x: isinstance(x, NoiseScaleState)
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=is_ours)
    return [x for x in leaves if is_ours(x)]


def noise_scale(opt_state) -> NoiseScale:
    """Reads the measured :class:`NoiseScale` from an optimizer state.

    Finds the :class:`NoiseScaleState` anywhere inside a nested optax state (chain,
    ``inject_hyperparams``, ``multi_transform``, a Flax ``TrainState.opt_state``...).
    A state replicated by ``jax.pmap`` (leading device axis) is read from its first
    replica (all replicas are equal: they are computed from averaged values). Works
    inside ``jit`` (returns arrays).

    Returns:
      ``NoiseScale(b_simple, g2, trace_sigma)`` as JAX scalars; ``float(...)`` them to log.

    Raises:
      ValueError: if the state holds no :class:`NoiseScaleState`, or more than one.
    """
    found = _find_states(opt_state)
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one NoiseScaleState (from measure_noise_scale) in the "
            f"optimizer state, found {len(found)}"
        )
    state = found[0]
    if jnp.ndim(state.count) > 0:
        index = (0,) * jnp.ndim(state.count)
        state = jax.tree.map(lambda x: x[index], state)
    return noise_ema_read(state.ema)


def noise_log_record(step: int, opt_state) -> dict:
    """One line of the noise log (see the module docstring) from an optimizer state.

    Holds the last raw estimates ``g2`` and ``trace_sigma`` (what ``python -m scaling
    noise`` averages) and, for reading by eye, the transform's own ``b_simple_ema``.
    Call ``json.dumps`` on it and write one per line.
    """
    state = _find_states(opt_state)
    if len(state) != 1:
        raise ValueError(f"expected exactly one NoiseScaleState, found {len(state)}")
    s = state[0]
    if jnp.ndim(s.count) > 0:
        s = jax.tree.map(lambda x: x[(0,) * jnp.ndim(s.count)], s)
    return {
        "step": int(step),
        "g2": float(s.last_g2),
        "trace_sigma": float(s.last_trace_sigma),
        "b_simple_ema": float(noise_ema_read(s.ema).b_simple),
    }


# ------------------------------------------------------------------------ log


class NoiseLogEntry(NamedTuple):
    """One parsed log line and the running average after it."""

    line: int
    step: int
    b_simple_raw: float
    b_simple_ema: float
    g2_ema: float | None
    trace_sigma_ema: float | None


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
    check_range("ema", ema, 0.0, 1.0, high_open=True)
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
            out.append(NoiseLogEntry(lineno, step, raw, est.b_simple, est.g2, est.trace_sigma))
        else:
            raw = _number(obj, "b_simple", lineno)
            ratio_ema = noise_ema_update(ratio_ema, 0.0, raw, ema)
            mean = ratio_ema.trace_sigma / ratio_ema.weight
            out.append(NoiseLogEntry(lineno, step, raw, mean, None, None))
    if not out:
        raise ValueError("the noise log has no entries")
    return out

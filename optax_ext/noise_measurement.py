r"""The optax transform that measures the gradient noise scale during training.

The estimators, the EMA arithmetic, the log format and the current value with its
standard error are plain arithmetic in :mod:`scaling.noise` (no JAX); this module is the
transform around them: it reads the squared gradient norms at two batch sizes inside the
training step (before and after the cross-device average, or per micro-batch and
accumulated), keeps the last two windows of raw estimates of :math:`|G|^2` and
:math:`\mathrm{tr}\Sigma` in its state, and debiased EMAs of both. The extra arguments it
reads are named once, in :mod:`scaling.protocol`.

:func:`current_noise_scale` reads the window on the host and hands it to
``scaling.current_b_simple``: the number ``python -m scaling noise`` prints for the
same updates' log (:func:`noise_log_record`), to the last digit.

References:
  McCandlish et al. 2018, arXiv 1812.06162, appendix A.2; Su,
  https://kexue.fm/archives/10542.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optax_ext import _xla_cpu
from optax_ext._common import check_range
from scaling import (
    NoiseEMA,
    NoiseScale,
    SettledNoiseScale,
    current_b_simple,
    ema_decay,
    noise_ema_read,
    noise_ema_update,
    two_batch_estimates,
)
from scaling.protocol import ACCUMULATION_STEPS, GRADS_AVERAGED_OVER, MICRO_GRAD_SQ_NORM

__all__ = [
    "NoiseScaleState",
    "CurrentNoiseScale",
    "measure_noise_scale",
    "noise_scale",
    "current_noise_scale",
    "has_noise_scale_state",
    "noise_ema_init",
    "noise_log_record",
    "recent_estimates",
]

#: The window, in updates, when neither ``window`` nor a concrete ``ema`` sets it.
DEFAULT_WINDOW = 100


class NoiseScaleState(NamedTuple):
    r"""State of :func:`measure_noise_scale`.

    Attributes:
      count: int32 number of updates.
      ema: :class:`scaling.NoiseEMA` (numerator ``trace_sigma``, denominator ``g2``,
        ``weight``): the secondary, history-weighted estimate.
      last_g2: the last measured update's raw :math:`|G|^2` estimate.
      last_trace_sigma: the last measured update's raw :math:`\mathrm{tr}\,\Sigma` estimate.
      recent: float32 ``(2 W, 2)``, a ring of the last ``2 W`` measured updates'
        ``(|G|^2, trΣ)`` estimates (W the window); row ``measured % (2 W)`` is next.
      measured: int32, the updates that could be measured (the ring's write count).
    """

    count: jax.Array
    ema: NoiseEMA
    last_g2: jax.Array
    last_trace_sigma: jax.Array
    recent: jax.Array
    measured: jax.Array


#: What :func:`current_noise_scale` returns: ``scaling.SettledNoiseScale`` (one type for
#: the current value, whether read from a log or from the state).
CurrentNoiseScale = SettledNoiseScale


def noise_ema_init(dtype=None) -> NoiseEMA:
    """A zero :class:`scaling.NoiseEMA` of JAX scalars (float32 unless ``dtype``).

    For Python arithmetic (a log) use ``NoiseEMA(0.0, 0.0, 0.0)``.
    """
    dtype = jnp.float32 if dtype is None else dtype
    # Separate buffers: a shared one could not be donated (jit donate_argnums).
    return NoiseEMA(*(jnp.zeros([], dtype) for _ in range(3)))


def _window_rows(window, ema) -> int:
    """Rows of the ring: two windows (at least two updates each) of the static window."""
    if window is not None:
        w = round(float(window))
    elif isinstance(ema, int | float | np.floating | np.integer) and not isinstance(ema, bool):
        w = round(1.0 / (1.0 - float(ema)))
    else:  # an injected (array) ema sets no structure
        w = DEFAULT_WINDOW
    return 2 * max(2, int(w))


def _sq_norm(tree) -> jax.Array:
    """|g|², summed in float32."""
    leaves = _xla_cpu.fence(jax.tree_util.tree_leaves(tree))
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0))


def measure_noise_scale(
    batch_size: float,
    axis_name: str | None = None,
    ema: float = 0.99,
    *,
    window: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform that measures :math:`B_{simple}` during training.

    Place it FIRST in ``optax.chain``. It passes the gradients through unchanged; with an
    ``axis_name`` it emits them averaged over the axis (``lax.pmean``). A step that
    averages them itself says so in the extra args (``make_train_step(mode="pmap")``
    passes ``grads_averaged_over`` with the per-device statistic, :mod:`scaling.protocol`),
    and then the transform uses that statistic instead of averaging twice: the defaults
    of the two compose. Each update computes the two-batch estimates
    (:func:`two_batch_estimates`) and updates debiased EMAs of numerator and denominator
    (:func:`noise_ema_update`), and keeps the raw estimates of the last two windows.
    Read the current value with :func:`current_noise_scale` (B_simple over the last
    window with its standard error, and whether it has settled: the noise scale grows
    during training, and a value still moving or not yet precise is not one to recommend
    from); :func:`noise_scale` reads the EMAs (secondary).

    Two batch sizes are needed, from one of:

    - ``axis_name`` (pmap / shard_map): local gradient (B_small = ``batch_size``, the
      per-device batch) versus the average over the axis (B_big = ``batch_size`` × axis
      size).
    - gradient accumulation: extra args ``micro_grad_sq_norm`` (mean over the k micro-
      batches of each micro-batch gradient's squared norm) and ``accumulation_steps`` (k)
      passed by ``accumulate_gradients`` (names: :mod:`scaling.protocol`): B_small =
      ``batch_size`` (one micro-batch), B_big = k × ``batch_size`` (× axis size with an
      ``axis_name``).

    With neither, :meth:`update` raises ``ValueError``. When B_big equals B_small (an
    axis of size 1, k = 1) the step cannot be measured and the EMAs are left unchanged.

    Args:
      batch_size: examples in one gradient the transform sees locally: the per-device
        batch, or the micro-batch under accumulation (> 0).
      axis_name: the pmap / shard_map axis over which to average the gradients, or None.
      ema: decay of the EMAs in [0, 1) (0.99: about the last 100 updates); a concrete
        number also sets the window, ``round(1/(1-ema))`` updates (an injected array
        leaves it at 100).
      window: the window of the current value in updates (>= 1, static: the state keeps
        two windows of estimates); the EMAs then use ``ema = 1 - 1/window``.

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
    if window is not None:
        check_range("window", window, 1.0, 1e308)
        ema = ema_decay(window)
    check_range("ema", ema, 0.0, 1.0, high_open=True)

    rows = _window_rows(window, ema)

    def init_fn(params):
        del params
        return NoiseScaleState(
            jnp.zeros([], jnp.int32),
            noise_ema_init(),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            jnp.zeros((rows, 2), jnp.float32),
            jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        micro_grad_sq_norm = extra_args.get(MICRO_GRAD_SQ_NORM)
        accumulation_steps = extra_args.get(ACCUMULATION_STEPS)
        averaged = axis_name is not None and extra_args.get(GRADS_AVERAGED_OVER) == axis_name
        if averaged:
            # The step (make_train_step's pmap default) averaged over our axis already and
            # passed the per-device statistic: use it, and do not average a second time.
            g2_small = jnp.asarray(micro_grad_sq_norm, jnp.float32)
            b_big = jnp.float32(batch_size) * lax.axis_size(axis_name)
        elif micro_grad_sq_norm is not None:
            if accumulation_steps is None:
                raise ValueError(f"{MICRO_GRAD_SQ_NORM} was given without {ACCUMULATION_STEPS}")
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
        if axis_name is not None and not averaged:
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
        row = jnp.stack([est.g2, est.trace_sigma]).astype(jnp.float32)
        # An unmeasurable update writes nothing: the ring holds measured updates only.
        written = state.recent.at[state.measured % rows].set(row)
        new_state = NoiseScaleState(
            count=optax.safe_increment(state.count),
            ema=jax.tree.map(keep, new, state.ema),
            last_g2=keep(est.g2, state.last_g2),
            last_trace_sigma=keep(est.trace_sigma, state.last_trace_sigma),
            recent=jnp.where(valid, written, state.recent),
            measured=jnp.where(valid, state.measured + 1, state.measured).astype(jnp.int32),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_states(opt_state) -> list[NoiseScaleState]:
    is_ours = lambda x: isinstance(x, NoiseScaleState)
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=is_ours)
    return [x for x in leaves if is_ours(x)]


def has_noise_scale_state(opt_state) -> bool:
    """Whether an optimizer state holds a :class:`NoiseScaleState` (a structural test)."""
    return bool(_find_states(opt_state))


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
    return noise_ema_read(_one_state(opt_state).ema)


def _one_state(opt_state) -> NoiseScaleState:
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
    return state


def recent_estimates(opt_state) -> tuple[np.ndarray, np.ndarray]:
    """The raw ``(g2, trace_sigma)`` estimates the state keeps, oldest first (host arrays).

    The last ``2 W`` measured updates at most (W the transform's window), as float64
    copies of the float32 values the transform computed (and :func:`noise_log_record`
    logs). Reads the state on the host: call it outside ``jit``.
    """
    state = _one_state(opt_state)
    if any(isinstance(x, jax.core.Tracer) for x in (state.recent, state.measured)):
        raise ValueError(
            "current_noise_scale reads the noise state on the host: call it outside jit "
            "(between steps), not inside the training step"
        )
    recent = np.asarray(jax.device_get(state.recent), np.float64)
    measured = int(state.measured)
    n = min(measured, recent.shape[0])
    order = (measured - n + np.arange(n)) % recent.shape[0]
    return recent[order, 0], recent[order, 1]


def current_noise_scale(
    opt_state, ema: float | None = None, *, window: int | None = None
) -> SettledNoiseScale:
    r"""The current B_simple, its standard error and whether it has settled.

    ``scaling.current_b_simple`` on the raw estimates the state keeps
    (:func:`recent_estimates`): the ratio of means over the last ``window`` measured
    updates with its delta-method standard error, settled when precise and stable
    against the window before (``scaling.noise`` defines both). The same function on the
    same float32 numbers as ``python -m scaling noise`` on the log of
    :func:`noise_log_record`, so both print the same digits.

    Args:
      opt_state: an optimizer state holding one :class:`NoiseScaleState` (found as
        :func:`noise_scale` finds it; a pmap-replicated one is read from its first copy).
      ema: the old way to name the window, ``round(1/(1-ema))`` updates.
      window: updates per window, an int in [2, W] (W the transform's window, the
        default).

    Returns:
      ``scaling.SettledNoiseScale`` (also named :data:`CurrentNoiseScale`): Python
      floats and bools, read on the host (outside ``jit``).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = measure_noise_scale(batch_size=8, window=4)
      >>> g = {"w": jnp.ones(3)}
      >>> s = tx.init(g)
      >>> for m in [4.0, 4.2, 3.8, 4.1, 3.9, 4.0, 4.1, 3.9, 4.0]:
      ...     _, s = tx.update(g, s, micro_grad_sq_norm=jnp.float32(m), accumulation_steps=4)
      >>> c = current_noise_scale(s)
      >>> c.text(), c.settled, c.window
      ('4.00 ± 0.18', True, 4)
    """
    g2, trace = recent_estimates(opt_state)
    rows = _one_state(opt_state).recent.shape[-2]
    if window is None and ema is not None:
        check_range("ema", ema, 0.0, 1.0, high_open=True)
        window = max(2, round(1.0 / (1.0 - float(ema))))
    if window is None:
        window = rows // 2
    check_range("window", window, 2, rows // 2)
    window = int(window)
    if g2.size == 0:
        return SettledNoiseScale(math.nan, math.inf, False, window, None, "no update measured yet")
    return current_b_simple(g2, trace, window)


def noise_log_record(step: int, opt_state) -> dict:
    """One line of the noise log (see the module docstring) from an optimizer state.

    Holds the last raw estimates ``g2`` and ``trace_sigma`` (what ``python -m scaling
    noise`` and :func:`current_noise_scale` average) and, for reading by eye, the
    transform's EMA ``b_simple_ema`` (secondary: a history-weighted average).
    Call ``json.dumps`` on it and write one per line.
    """
    s = _one_state(opt_state)
    return {
        "step": int(step),
        "g2": float(s.last_g2),
        "trace_sigma": float(s.last_trace_sigma),
        "b_simple_ema": float(noise_ema_read(s.ema).b_simple),
    }

r"""The optax transform that measures the gradient noise scale during training.

The estimators, the EMA arithmetic, the log format and the settled-value analysis are
plain arithmetic in :mod:`scaling.noise` (no JAX); this module is the transform around
them: it reads the squared gradient norms at two batch sizes inside the training step
(before and after the cross-device average, or per micro-batch and accumulated) and keeps
debiased EMAs of :math:`|G|^2` and :math:`\mathrm{tr}\Sigma` in its state. The extra
arguments it reads are named once, in :mod:`scaling.protocol`.

``scaling.measure_noise_scale`` and ``scaling.noise.measure_noise_scale`` are this
function (imported from here on first use).

References:
  McCandlish et al. 2018, arXiv 1812.06162, appendix A.2; Su,
  https://kexue.fm/archives/10542.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optax_ext._common import check_range
from scaling import (
    NoiseEMA,
    NoiseScale,
    ema_decay,
    noise_ema_init,
    noise_ema_read,
    noise_ema_update,
    two_batch_estimates,
)
from scaling.protocol import ACCUMULATION_STEPS, GRADS_AVERAGED_OVER, MICRO_GRAD_SQ_NORM

__all__ = [
    "NoiseMoments",
    "NoiseScaleState",
    "CurrentNoiseScale",
    "measure_noise_scale",
    "noise_scale",
    "current_noise_scale",
    "has_noise_scale_state",
    "noise_log_record",
]


class NoiseMoments(NamedTuple):
    """EMAs (same decay as :class:`scaling.NoiseEMA`) of the estimates' second moments.

    ``tt``, ``tg``, ``gg``: of trΣ², trΣ·|G|², |G|⁴; ``weight_sq``: the sum of the squared
    EMA weights, so that ``weight**2 / weight_sq`` is the effective number of updates.
    """

    tt: jax.Array
    tg: jax.Array
    gg: jax.Array
    weight_sq: jax.Array


class NoiseScaleState(NamedTuple):
    r"""State of :func:`measure_noise_scale`.

    Attributes:
      count: int32 number of updates.
      ema: :class:`scaling.NoiseEMA` (numerator ``trace_sigma``, denominator ``g2``,
        ``weight``).
      last_g2: the last step's raw :math:`|G|^2` estimate.
      last_trace_sigma: the last step's raw :math:`\mathrm{tr}\,\Sigma` estimate.
      moments: :class:`NoiseMoments`, for the standard error.
      snapshots: float32 ``(2, 2)``: ``(b_simple, stderr)`` taken at the last two window
        boundaries (NaN before), older first; the settled test compares with the older.
    """

    count: jax.Array
    ema: NoiseEMA
    last_g2: jax.Array
    last_trace_sigma: jax.Array
    moments: NoiseMoments
    snapshots: jax.Array


class CurrentNoiseScale(NamedTuple):
    """The current B_simple, its standard error, and whether it has settled (JAX scalars).

    Attributes:
      b_simple: the debiased EMA ratio (as :func:`noise_scale`).
      stderr: its standard error: delta method on the EMA-weighted spread of
        trΣ_t − B_simple·|G|²_t, over the EMA's effective number of updates.
      settled: True once two windows have passed, the relative standard error is below
        50% and the value one to two windows ago agrees within two combined standard
        errors.
      window: the EMA's window in updates, ``round(1/(1-ema))``.
      previous: B_simple at the window boundary the test compares with (NaN before).
    """

    b_simple: jax.Array
    stderr: jax.Array
    settled: jax.Array
    window: jax.Array
    previous: jax.Array


def _moments_init() -> NoiseMoments:
    return NoiseMoments(*(jnp.zeros([], jnp.float32) for _ in range(4)))


def _moments_update(m: NoiseMoments, g2, trace, decay) -> NoiseMoments:
    step = lambda old, new: decay * old + (1 - decay) * new
    return NoiseMoments(
        step(m.tt, trace * trace),
        step(m.tg, trace * g2),
        step(m.gg, g2 * g2),
        decay * decay * m.weight_sq + (1 - decay) ** 2,
    )


def _b_and_stderr(ema: NoiseEMA, m: NoiseMoments):
    b = noise_ema_read(ema).b_simple
    w = ema.weight
    safe_w = jnp.where(w > 0, w, 1)
    mean_g = ema.g2 / safe_w
    # E_w[(t - b g)^2] = E[t^2] - 2b E[tg] + b^2 E[g^2]; its mean is 0 by the choice of b.
    spread = (m.tt - 2 * b * m.tg + b * b * m.gg) / safe_w
    n_eff = w * w / jnp.where(m.weight_sq > 0, m.weight_sq, 1)
    var = jnp.maximum(spread, 0) * n_eff / jnp.maximum(n_eff - 1, 1e-6)  # unbiased weights
    stderr = jnp.sqrt(var / jnp.maximum(n_eff, 1e-6)) / jnp.where(mean_g > 0, mean_g, jnp.nan)
    ok = jnp.isfinite(b) & (mean_g > 0) & (n_eff > 1)
    return b, jnp.where(ok, stderr, jnp.inf)


def _sq_norm(tree) -> jax.Array:
    # The barrier keeps XLA from merging this g * g with the g² of a following Adam, which
    # would materialise g² for both users (an extra write and read of the gradients' size).
    leaves = lax.optimization_barrier(jax.tree_util.tree_leaves(tree))
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
    (:func:`noise_ema_update`); read them with :func:`noise_scale`, or with
    :func:`current_noise_scale` for the standard error and whether the value has settled
    (the noise scale grows during training: a value still moving is not one to recommend
    from).

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
      ema: decay of the EMAs in [0, 1) (0.99: about the last 100 updates).
      window: instead of ``ema``, the EMAs' window in updates (>= 1):
        ``ema = 1 - 1/window``.

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

    def init_fn(params):
        del params
        return NoiseScaleState(
            jnp.zeros([], jnp.int32),
            noise_ema_init(),
            jnp.zeros([], jnp.float32),
            jnp.zeros([], jnp.float32),
            _moments_init(),
            jnp.full((2, 2), jnp.nan, jnp.float32),
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
        moments = _moments_update(state.moments, est.g2, est.trace_sigma, ema)
        keep = lambda n, o: jnp.where(valid, n, o).astype(jnp.float32)
        new_ema = jax.tree.map(keep, new, state.ema)
        new_moments = jax.tree.map(keep, moments, state.moments)
        count = optax.safe_increment(state.count)
        # At each window boundary the older snapshot takes the newer one's place and the
        # newer one takes the current value: comparing with the older one looks back
        # between one and two windows, never at a value just copied.
        snap = jnp.stack(_b_and_stderr(new_ema, new_moments)).astype(jnp.float32)
        boundary = valid & (count % _window(ema) == 0)
        snapshots = jnp.where(boundary, jnp.stack([state.snapshots[1], snap]), state.snapshots)
        new_state = NoiseScaleState(
            count=count,
            ema=new_ema,
            last_g2=keep(est.g2, state.last_g2),
            last_trace_sigma=keep(est.trace_sigma, state.last_trace_sigma),
            moments=new_moments,
            snapshots=snapshots,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _window(ema):
    return jnp.maximum(jnp.round(1 / (1 - jnp.asarray(ema, jnp.float32))), 1).astype(jnp.int32)


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


def current_noise_scale(
    opt_state, ema: float = 0.99, *, window: float | None = None
) -> CurrentNoiseScale:
    r"""The current B_simple with its standard error and whether it has settled.

    Reads the :class:`NoiseScaleState` as :func:`noise_scale` does. ``ema`` / ``window``
    must be what the transform was built with (they set the window boundaries).

    .. math:: \mathrm{s.e.} = \frac{1}{\overline{|G|^2}}
              \sqrt{\frac{\overline{(\mathrm{tr}\Sigma_t - B|G|^2_t)^2}}{n_{eff}}},
              \qquad n_{eff} = \frac{(\sum w)^2}{\sum w^2}

    (EMA-weighted means; :math:`n_{eff} \approx (1+\beta)/(1-\beta)` once warm.) Settled:
    at least two windows, s.e. below 50%, and the snapshot one to two windows back within
    two combined standard errors. The EMAs overlap that snapshot, so the test is mild:
    it catches a value still climbing by several standard errors per window.

    Returns:
      :class:`CurrentNoiseScale` of JAX scalars (works inside ``jit``).

    Example:
      >>> import jax.numpy as jnp
      >>> tx = measure_noise_scale(batch_size=8, window=4)
      >>> g = {"w": jnp.ones(3)}
      >>> s = tx.init(g)
      >>> for m in [4.0, 4.2, 3.8, 4.1, 3.9, 4.0, 4.1, 3.9, 4.0]:
      ...     _, s = tx.update(g, s, micro_grad_sq_norm=jnp.float32(m), accumulation_steps=4)
      >>> c = current_noise_scale(s, window=4)
      >>> bool(c.settled), int(c.window)
      (True, 4)
    """
    if window is not None:
        check_range("window", window, 1.0, 1e308)
        ema = ema_decay(window)
    state = _one_state(opt_state)
    b, stderr = _b_and_stderr(state.ema, state.moments)
    older_b, older_se = state.snapshots[0, 0], state.snapshots[0, 1]
    agree = jnp.abs(b - older_b) <= 2 * jnp.sqrt(stderr**2 + older_se**2)
    ok = jnp.isfinite(older_b) & (stderr < 0.5 * b) & agree
    settled = (state.count >= 2 * _window(ema)) & ok
    return CurrentNoiseScale(b, stderr, settled, _window(ema), older_b)


def noise_log_record(step: int, opt_state) -> dict:
    """One line of the noise log (see the module docstring) from an optimizer state.

    Holds the last raw estimates ``g2`` and ``trace_sigma`` (what ``python -m scaling
    noise`` averages) and, for reading by eye, the transform's own ``b_simple_ema``.
    Call ``json.dumps`` on it and write one per line.
    """
    s = _one_state(opt_state)
    return {
        "step": int(step),
        "g2": float(s.last_g2),
        "trace_sigma": float(s.last_trace_sigma),
        "b_simple_ema": float(noise_ema_read(s.ema).b_simple),
    }

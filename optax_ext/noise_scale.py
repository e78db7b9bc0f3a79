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
    noise_ema_init,
    noise_ema_read,
    noise_ema_update,
    two_batch_estimates,
)
from scaling.protocol import ACCUMULATION_STEPS, MICRO_GRAD_SQ_NORM

__all__ = ["NoiseScaleState", "measure_noise_scale", "noise_scale", "noise_log_record"]


class NoiseScaleState(NamedTuple):
    r"""State of :func:`measure_noise_scale`.

    Attributes:
      count: int32 number of updates.
      ema: :class:`scaling.NoiseEMA` (numerator ``trace_sigma``, denominator ``g2``,
        ``weight``).
      last_g2: the last step's raw :math:`|G|^2` estimate.
      last_trace_sigma: the last step's raw :math:`\mathrm{tr}\,\Sigma` estimate.
    """

    count: jax.Array
    ema: NoiseEMA
    last_g2: jax.Array
    last_trace_sigma: jax.Array


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
      passed by ``accumulate_gradients`` (names: :mod:`scaling.protocol`): B_small =
      ``batch_size`` (one micro-batch), B_big = k × ``batch_size`` (× axis size with an
      ``axis_name``).

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

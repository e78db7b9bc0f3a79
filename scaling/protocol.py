"""Names shared by the optimizers' wrappers and the noise-scale transform.

Gradient accumulation (``optax_ext.wrappers.accumulation.accumulate_gradients``, the
``make_train_step`` splits) passes these extra arguments to the inner transform's
``update``; :func:`optax_ext.noise_measurement.measure_noise_scale` reads them. They are
defined once here, in the package both sides may import (``scaling`` imports nothing of
``optax_ext``).

Example:
  >>> {MICRO_GRAD_SQ_NORM: 4.0, ACCUMULATION_STEPS: 4}
  {'micro_grad_sq_norm': 4.0, 'accumulation_steps': 4}
"""

__all__ = ["MICRO_GRAD_SQ_NORM", "ACCUMULATION_STEPS", "GRADS_AVERAGED_OVER", "EXTRA_ARGS"]

#: Mean over the k accumulated micro-batches of each micro-batch gradient's squared
#: norm (a float32 scalar), the small-batch statistic of the two-batch estimate.
MICRO_GRAD_SQ_NORM = "micro_grad_sq_norm"
#: k, the number of micro-batches in the accumulated gradient (an int or int32 scalar).
ACCUMULATION_STEPS = "accumulation_steps"
#: The axis name over which the step function already averaged the gradients
#: (``make_train_step(mode="pmap")``); then ``MICRO_GRAD_SQ_NORM`` is the mean over that
#: axis of the per-device squared norms and ``ACCUMULATION_STEPS`` the axis size.
GRADS_AVERAGED_OVER = "grads_averaged_over"
#: All of them, in the order they are documented.
EXTRA_ARGS = (MICRO_GRAD_SQ_NORM, ACCUMULATION_STEPS, GRADS_AVERAGED_OVER)

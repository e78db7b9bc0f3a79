"""Lion: the sign of an interpolated momentum, with path-rule weight decay and Tiger's scales.

Reference: Chen et al., "Symbolic Discovery of Optimization Algorithms",
https://arxiv.org/abs/2302.06675 (google/automl ``lion/``); Su Jianlin,
https://kexue.fm/archives/9473.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext import _xla_cpu
from optax_ext._common import (
    PathRules,
    canonical_dtype,
    check_choice,
    check_float_params,
    check_range,
    check_updates_match,
    decay_mask,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import reject_cycle_length
from optax_ext.optimizers.tiger import scale_by_param_scale
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "lion",
    "scale_by_lion",
]

#: The state of :func:`scale_by_lion` is optax's: a step counter and the momentum.
ScaleByLionState = optax.ScaleByLionState


def lion_leaf(g, m, b1, b2):
    """One leaf of Lion, the textbook form: (direction in g's dtype, new momentum in at
    least float32, for ``write_state`` to store).

    The direction comes from the unrounded m': a bf16 momentum must not add its
    rounding to it.
    """
    work = work_dtype(m)
    gw, mw = g.astype(work), m.astype(work)
    c = b1 * mw + (1.0 - b1) * gw
    return jnp.sign(c).astype(g.dtype), b2 * mw + (1.0 - b2) * gw


def scale_by_lion(
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    *,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Lion's direction and momentum, ``optax.scale_by_lion``'s.

    .. math::

        u = \operatorname{sign}(\beta_1 m + (1-\beta_1) g),\qquad
        m \leftarrow \beta_2 m + (1-\beta_2) g.

    The same direction and state as ``optax.scale_by_lion``. On CPU, for concrete
    β1 < 1 and β2 ≥ 0.5, the program computes the direction from the new momentum
    (:func:`optax_ext._xla_cpu.lion_one_pass`, equal in real arithmetic; in float32
    the sign may differ where ``|β1·m + (1-β1)·g|`` is at rounding level), which lets
    XLA:CPU update a donated momentum in place.

    Args:
      b1: interpolation between momentum and gradient for the sign, in [0, 1].
      b2: momentum decay, in [0, 1].
      mu_dtype: dtype of the momentum (default: the params'). Arithmetic runs in at
        least float32 whatever the storage dtype.
      state_rounding: how a bf16/f16 momentum is written: ``"nearest"`` (a cast) or
        ``"stochastic"`` (unbiased stochastic rounding,
        :func:`~optax_ext.wrappers.rounding.stochastic_round_to`, keyed by
        ``rounding_seed``, the step count and the leaf index). No effect on a float32
        momentum.
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      ``optax.ScaleByLionState(count, mu)``.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = scale_by_lion(b1=0.9, b2=0.99)
      >>> state = tx.init(jnp.zeros(3))
      >>> updates, state = tx.update(jnp.array([0.5, -2.0, 0.0]), state)
      >>> updates
      Array([ 1., -1.,  0.], dtype=float32)

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023; Su, `kexue.fm/archives/9473
      <https://kexue.fm/archives/9473>`_.
    """
    check_range("b1", b1, 0, 1, schedule=False)
    check_range("b2", b2, 0, 1, schedule=False)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)
    mu_dtype = canonical_dtype(mu_dtype)
    plain = lambda g, m: lion_leaf(g, m, b1, b2)
    one_pass = lambda g, m: _xla_cpu.lion_one_pass(g, m, b1, b2)
    cpu = one_pass if _xla_cpu.lion_one_pass_applies(b1, b2) else None
    leaf = lambda g, m: _xla_cpu.on_cpu(g, m, plain=plain, cpu=cpu)

    def init_fn(params):
        check_float_params(params, "lion")
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        return ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(updates, state, params=None, **extra_args):
        # Lion cannot accumulate inside its momentum: a cycle length would be ignored
        reject_cycle_length(extra_args, "ox.lion")
        check_updates_match(updates, params, "lion")
        out = jax.tree.map(leaf, updates, state.mu)
        direction, mu = unzip_leaves(updates, out)
        mu = write_state(mu, state.mu, state_rounding, rounding_seed, state.count)
        return direction, ScaleByLionState(count=optax.safe_increment(state.count), mu=mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lion(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any = None,
    *,
    param_scaling: str | PathRules | None = None,
    min_rms: float = 1e-3,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The Lion optimizer with path-rule weight decay and optional Tiger per-parameter scales.

    With η = lr·s(θ) (s ≡ 1 unless ``param_scaling``) and λ_leaf = λ where ``mask``:

    .. math::

        c &= \beta_1 m + (1-\beta_1) g \\
        \Delta\theta &= -\eta\,(\operatorname{sign}(c) + \lambda_{\text{leaf}}\,\theta) \\
        m &\leftarrow \beta_2 m + (1-\beta_2) g

    - ``mask=None`` (default) decays everything but biases and norm scales (the path
      rule ``optax_ext.NORM_AND_BIAS``); ``mask=True`` decays every leaf, exactly like
      ``optax.lion``; any optax mask (tree of bools, function of params) also works.
      Under ``optax.inject_hyperparams`` pass a mask function in ``static_args``.
    - ``param_scaling="tiger"``: Tiger's per-parameter scale, see
      :func:`scale_by_param_scale`; it multiplies the weight decay too.
    - With ``mask=True`` and ``param_scaling=None`` this is ``optax.lion`` (same
      defaults, same state).

    Lion needs both m and the current g, so it cannot accumulate inside its momentum as
    Tiger does: wrap it in a gradient-accumulation transform instead
    (``ox.accumulate_gradients(ox.lion(...), accumulation_steps=k)``, which also takes
    ``set_accumulation_steps``). Passed to Lion itself (``optax.chain`` hands every
    extra argument to every member), ``set_accumulation_steps`` raises a ``ValueError``
    rather than being ignored while the parameters move on every call.

    Args:
      learning_rate: a float or an optax schedule, ≥ 0. Typical: 3-10x smaller than AdamW's.
      b1: in [0, 1]; 0.9 (0.95 for language models).
      b2: in [0, 1]; 0.99 (0.98 for language models).
      weight_decay: decoupled decay λ ≥ 0, multiplied by the learning rate.
      mask: which leaves get weight decay, see above.
      param_scaling: ``None``, ``"tiger"`` or path rules ``{regex: "rms" | "row_rms" | number}``.
      min_rms: floor of the RMS scales, ≥ 0.
      mu_dtype: momentum dtype (default: the params').
      state_rounding: ``"nearest"`` or ``"stochastic"``: how a bf16 momentum is
        written, see :func:`scale_by_lion`.
      rounding_seed: seed of the stochastic rounding.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
      >>> tx = lion(learning_rate=1e-3, weight_decay=0.1, param_scaling="tiger")
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Chen et al., `Symbolic Discovery of Optimization Algorithms
      <https://arxiv.org/abs/2302.06675>`_, 2023; Su, `kexue.fm/archives/9473
      <https://kexue.fm/archives/9473>`_; Tiger's scales: `kexue.fm/archives/9512
      <https://kexue.fm/archives/9512>`_.
    """
    check_range("learning_rate", learning_rate, 0)
    check_range("weight_decay", weight_decay, 0)
    check_range("min_rms", min_rms, 0, schedule=False)
    parts = [
        scale_by_lion(
            b1=b1,
            b2=b2,
            mu_dtype=mu_dtype,
            state_rounding=state_rounding,
            rounding_seed=rounding_seed,
        ),
        optax.add_decayed_weights(weight_decay, mask=decay_mask(mask)),
    ]
    if param_scaling is not None:
        parts.append(scale_by_param_scale(param_scaling, min_rms))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)

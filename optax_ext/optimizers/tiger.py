"""Tiger, the "tight-fisted optimizer": Lion with one β and one buffer, even when accumulating.

Reference: Su Jianlin, "Tiger: an extremely tight-fisted optimizer",
https://kexue.fm/archives/9512, and https://github.com/bojone/tiger.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ext import _xla_cpu
from optax_ext._common import (
    EMBEDDING,
    NORM_AND_BIAS,
    PathRules,
    canonical_dtype,
    check_choice,
    check_float_params,
    check_range,
    check_updates_match,
    checked,
    decay_mask,
    either,
    hold_momentum,
    path_labels,
    require_params,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import (
    add_update_decayed_weights,
    check_accumulation_steps,
    check_not_injected,
    counters_init,
    current_cycle,
    next_counters,
    refuse_injected_cycles,
    scale_by_update_learning_rate,
    sharing_the_cycle,
)
from optax_ext.wrappers.nan_guard import DISCARDED_LEAVES, leafwise_guard
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "TIGER_SCALE_RULES",
    "ScaleByTigerState",
    "scale_by_param_scale",
    "scale_by_tiger",
    "tiger",
]

#: Tiger's per-parameter learning-rate scales, by Flax path (first match wins):
#: biases and norm scales get 0.5, embedding tables the RMS of each row, every other
#: tensor (kernels) its own RMS.
TIGER_SCALE_RULES: tuple[tuple[str, Any], ...] = (
    (NORM_AND_BIAS, 0.5),
    (EMBEDDING, "row_rms"),
    (r"", "rms"),
)
_SCALE_RULE_NAMES = ("rms", "row_rms")


class ScaleByTigerState(NamedTuple):
    """State of :func:`scale_by_tiger`: the micro-step counter, the single momentum
    buffer and the accumulation cycle.

    Attributes:
      count: int32, micro-steps seen (calls to ``update``).
      mu: the momentum, shaped like the params.
      micro_step: int32, micro-steps taken in the current accumulation cycle.
      cycle_length: int32, the current cycle's k (it may change between cycles: see
        ``set_accumulation_steps`` in :func:`tiger`).
      updates: int32, parameter updates made (completed cycles); schedules read it.
    """

    count: jax.Array
    mu: optax.Updates
    micro_step: jax.Array
    cycle_length: jax.Array
    updates: jax.Array


# ---------------------------------------------------------------- per-leaf pieces


def tiger_momentum(g, m, *, beta, first, k, bad=None):
    """One micro-step of the momentum with accumulation inside it.

    ``m = b1*m + (1-β)/k * g`` with ``b1 = β`` on the first micro-step of a cycle and 1
    on the others: after k micro-batches m is an EMA of their mean gradient, with no
    extra buffer. A discarded leaf (``bad``) keeps m as it is, as if its gradient were
    zero on a later micro-step. Returned in at least float32, for the caller to write in
    the state's dtype.
    """
    b1 = jnp.where(first, beta, 1.0) if first is not True else beta
    if bad is not None:
        g, b1 = hold_momentum(bad, g, b1)
    work = work_dtype(m)
    # in the work dtype: the caller writes the state (a cast, or stochastic rounding)
    return b1 * m.astype(work) + ((1.0 - beta) / k) * g.astype(work)


def param_scale(param: jax.Array, rule: Any, min_rms: Any) -> jax.Array:
    """Tiger's per-parameter scale s(θ): a constant, the tensor's RMS, or each row's RMS.

    RMS values are floored at ``min_rms`` so a zero-initialised kernel still moves
    (the sources use no floor; ``min_rms=0`` reproduces them exactly).
    """
    work = work_dtype(param)
    if rule == "rms":
        rms = jnp.sqrt(jnp.mean(jnp.square(param.astype(work))))
    elif rule == "row_rms":
        rms = jnp.sqrt(row_mean_square(param, work))
    else:
        return jnp.asarray(rule, work)
    return jnp.maximum(rms, min_rms)


def row_mean_square(param: jax.Array, work: Any) -> jax.Array:
    """Mean of squares along the last axis, keeping it: shape ``(..., 1)``, in ``work``.

    A scalar or vector "row" is the whole leaf. One reduction; on CPU a large table
    takes :func:`optax_ext._xla_cpu.row_mean_square_in_blocks` (the same numbers),
    which keeps Tiger's update of the table one in-place pass there.
    """
    axis = -1 if param.ndim else None
    plain = lambda x: jnp.mean(jnp.square(x.astype(work)), axis=axis, keepdims=True)
    block = _xla_cpu.row_block(param.shape)
    cpu = None if block is None else (lambda x: _xla_cpu.row_mean_square_in_blocks(x, block, work))
    return _xla_cpu.on_cpu(param, plain=plain, cpu=cpu)


def scale_rules(param_scaling: Any) -> PathRules | None:
    """Validated per-parameter scale rules from ``param_scaling`` ("tiger", None or rules)."""
    if param_scaling is None:
        return None
    if isinstance(param_scaling, str):
        check_choice("param_scaling", param_scaling, ("tiger",))
        return TIGER_SCALE_RULES
    rules = list(param_scaling.items() if isinstance(param_scaling, dict) else param_scaling)
    for pattern, rule in rules:
        if isinstance(rule, str):
            check_choice(f"param_scaling rule for {pattern!r}", rule, _SCALE_RULE_NAMES)
        else:
            check_range(f"param_scaling multiplier for {pattern!r}", rule, 0, low_open=True)
    return rules


def scale_by_param_scale(
    param_scaling: str | PathRules = "tiger", min_rms: float = 1e-3
) -> optax.GradientTransformationExtraArgs:
    r"""Multiplies each leaf's update by a per-parameter scale s(θ) chosen by path rules.

    .. math:: u \leftarrow s(\theta)\, u

    With ``"tiger"`` (Tiger's rule, Flax names): ``bias`` and norm ``scale`` → 0.5,
    ``embedding`` → RMS of each row (axis -1), every other tensor → its RMS; RMS values
    are floored at ``min_rms``. Custom rules ``{regex: "rms" | "row_rms" | number}``
    (first match wins, unmatched leaves get 1). Stateless; ``update`` needs ``params``.

    Args:
      param_scaling: ``"tiger"`` or path rules, as in :func:`tiger`.
      min_rms: floor of the RMS scales, ≥ 0 (0 reproduces the unfloored sources).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"bias": jnp.ones(2), "kernel": jnp.full((2, 2), 3.0)}
      >>> tx = scale_by_param_scale("tiger")
      >>> ones = {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2))}
      >>> u, _ = tx.update(ones, tx.init(params), params)
      >>> u["bias"], u["kernel"][0]
      (Array([0.5, 0.5], dtype=float32), Array([3., 3.], dtype=float32))

    References:
      Su, `Tiger <https://kexue.fm/archives/9512>`_, 2023.
    """
    rules = scale_rules(param_scaling)
    check_range("min_rms", min_rms, 0, schedule=False)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, "scale_by_param_scale", "its scale is each parameter's RMS")
        labels = path_labels(params, rules, default=1.0)

        def leaf(u, p, rule):
            s = param_scale(p, rule, min_rms)
            return (u.astype(work_dtype(u)) * s).astype(u.dtype)

        return jax.tree.map(leaf, updates, params, labels), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


# -------------------------------------------------------------------- transforms


def scale_by_tiger(
    beta: float = 0.9,
    *,
    accumulation_steps: int = 1,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Tiger's direction: the sign of a momentum that also accumulates micro-batches.

    .. math::

        m \leftarrow b_1 m + \tfrac{1-\beta}{k} g,\quad
        b_1 = \beta \text{ on the first of } k \text{ micro-steps, else } 1;\qquad
        u = \operatorname{sign}(m) \text{ on the last micro-step, else } 0.

    A leaf named in the extra argument ``discarded_leaves`` (a tree of scalar bools
    shaped like the gradients; :func:`tiger`'s guard passes it for non-finite gradient
    leaves and skipped spikes) keeps its momentum bit for bit and gets a zero update;
    the other leaves step. :func:`tiger` chains this direction with the decay, the
    per-parameter scale and the learning rate, inside the guard.

    Args:
      beta: momentum coefficient β in [0, 1).
      accumulation_steps: k ≥ 1 micro-batches per parameter update; the cycle length
        may change at run time through ``set_accumulation_steps``, as in :func:`tiger`.
      mu_dtype: dtype of the momentum (default: the gradients').
      state_rounding: how a bf16/f16 momentum is written: ``"nearest"`` (a cast) or
        ``"stochastic"`` (unbiased,
        :func:`~optax_ext.wrappers.rounding.stochastic_round_to`, keyed by
        ``rounding_seed``, the micro-step count and the leaf index). The step's sign is
        taken before the rounding. No effect on a float32 momentum.
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleByTigerState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_tiger(0.9), optax.scale(-1e-2))
      >>> state = tx.init(jnp.zeros(3))
      >>> updates, state = tx.update(jnp.array([1.0, -2.0, 3.0]), state)
      >>> updates
      Array([-0.01,  0.01, -0.01], dtype=float32)

    References:
      Su, `Tiger <https://kexue.fm/archives/9512>`_, 2023; accumulation inside the
      momentum: `kexue.fm/archives/8634 <https://kexue.fm/archives/8634>`_.
    """
    check_range("beta", beta, 0, 1, high_open=True, schedule=False)
    k = check_accumulation_steps(accumulation_steps)
    mu_dtype = canonical_dtype(mu_dtype)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)
    injected = check_not_injected("ox.scale_by_tiger", k, beta=beta)

    def init_fn(params):
        check_float_params(params, "tiger")
        return ScaleByTigerState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            **counters_init(k),
        )

    def update_fn(updates, state, params=None, **extra_args):
        check_updates_match(updates, params, "tiger")
        refuse_injected_cycles(injected, "ox.scale_by_tiger", extra_args)
        cycle = current_cycle(k, state, extra_args)
        discarded = extra_args.get(DISCARDED_LEAVES)
        if discarded is None:
            discarded = jax.tree.map(lambda _: False, updates)
        held = False if cycle.last is True else ~cycle.last

        def leaf(g, m, bad):
            m = tiger_momentum(
                g, m, beta=beta, first=cycle.first, k=cycle.k, bad=None if bad is False else bad
            )
            u = jnp.sign(m)
            zero = either(bad, held)
            if zero is not False:
                u = jnp.where(zero, 0, u)
            return u.astype(g.dtype), m

        u, mu = unzip_leaves(updates, jax.tree.map(leaf, updates, state.mu, discarded))
        mu = write_state(mu, state.mu, state_rounding, rounding_seed, state.count)
        return u, ScaleByTigerState(
            count=optax.safe_increment(state.count), mu=mu, **next_counters(cycle, state)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def tiger(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    beta: float = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    *,
    accumulation_steps: int = 1,
    param_scaling: str | PathRules | None = "tiger",
    min_rms: float = 1e-3,
    guard_nan: bool = True,
    shrink_ratio: float = 0.99,
    catch_inf: bool = True,
    mu_dtype: Any = None,
    mask: Any = None,
    spike_factor: float | None = 1e3,
    spike_warmup: int = 20,
    spike_decay: float = 0.99,
    spike_action: str = "skip",
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""The Tiger optimizer: sign of an accumulating momentum, per-parameter scales, NaN shrink.

    With t the micro-step, k = ``accumulation_steps``, s(θ) the per-parameter scale and
    λ_leaf the leaf's weight decay (0 where ``mask`` is False):

    .. math::

        m &\leftarrow b_1 m + \tfrac{1-\beta}{k} g, \qquad
            b_1 = \beta \text{ if } t \bmod k = 0 \text{ else } 1 \\
        \Delta\theta &= -\,\mathrm{lr}(\lfloor t/k \rfloor)\, s(\theta)
            \left(\operatorname{sign}(m) + \lambda_{\text{leaf}}\,\theta\right)
            \quad\text{if } (t+1) \bmod k = 0,\ \text{else } 0 \\
        \Delta\theta &= (r - 1)(\theta - c) \quad\text{for a leaf whose gradient is not finite}

    Tiger is the ``optax.chain`` of its pieces, as optax's aliases are, inside its guard:

    .. code-block:: python

        leafwise_guard(sharing_the_cycle(
            k,
            scale_by_tiger(beta, accumulation_steps=k),      # sign(m), 0 when held
            add_update_decayed_weights(weight_decay, mask),  # + λ θ
            scale_by_param_scale(param_scaling, min_rms),    # × s(θ)
            scale_by_update_learning_rate(learning_rate, zero_held=True),  # × -lr, 0 when held
        ))

    The direction's state (:class:`ScaleByTigerState`) is the one record of the
    accumulation cycle: ``sharing_the_cycle`` hands its cycle to the pieces after it,
    which read their schedules by update and count nothing themselves.

    - **Accumulation inside the momentum**: after k micro-batches m equals
      β·m + (1-β)·mean(g), exactly Tiger fed the mean gradient; the state is one buffer
      the size of the params whatever k is. Parameters move only on the last micro-step
      (zeros are emitted on the others, decay included).
    - **Learning-rate and weight-decay schedules are indexed by update** (t // k), the
      optax convention. Tiger's own ``lr_schedule`` counts micro-steps and is read on the
      cycle's last one: with k=4 update n uses its value at micro-step 4n+3, so its
      ``{40000: 1}`` is a warm-up reaching 1 at update (40000-3)/4 = 9999.25 here, not
      exactly ``{10000: 1}`` (the two differ by under 1e-4 of the lr on the ramp).
      Injected schedules follow the same index under ``ox.inject_hyperparams``;
      ``optax.inject_hyperparams`` reads them per micro-step, so with
      ``accumulation_steps`` other than 1, injected under ``jit``, or
      ``set_accumulation_steps``, Tiger refuses the arrays it injects, naming
      ``ox.inject_hyperparams``.
    - **The cycle length may change during training** (a batch-size warm-up): pass
      ``set_accumulation_steps=k`` (an int or an int32 array) to every ``update``; a new
      value takes effect when the next cycle starts, and a jitted step compiles once.
      The momentum is then the mean of each cycle's micro-batches, whatever their number.
      Schedules keep counting updates (``ScaleByTigerState.updates``).
    - **Per-parameter scales** (``param_scaling="tiger"``, Flax names): ``bias`` and norm
      ``scale`` get s = 0.5; ``embedding`` tables the RMS of each row; every other
      tensor its RMS, floored at ``min_rms`` (the sources use no floor, so a
      zero-initialised kernel never moves; ``min_rms=0`` reproduces them). Pass your own
      ``{regex: "rms" | "row_rms" | number}`` rules (first match wins, unmatched → 1),
      or ``None`` for s ≡ 1.
    - **Weight decay** is decoupled and multiplied by the same scaled learning rate.
      ``mask=None`` decays everything but biases and norm scales; pass ``mask=True`` to
      decay every leaf, or any optax mask (tree of bools or function of params).
    - **NaN guard** (``guard_nan``): a leaf whose gradient has a NaN or ±inf keeps its
      momentum and shrinks toward its centre c (1 for norm scales, 0 otherwise) by
      ``shrink_ratio`` r, on any micro-step; other leaves proceed. ``catch_inf=False``
      checks NaN only, as Su's original Tiger and bert4keras do: there one +inf entry
      enters the momentum, never decays, and its weight then steps the same way on
      every update, walking to -1/λ (uncounted). ``guard_nan=False`` removes the
      per-leaf check. The guard is
      :func:`~optax_ext.wrappers.nan_guard.leafwise_guard`, the same code as
      :func:`~optax_ext.wrappers.nan_guard.nan_guard` deciding per leaf, and its
      :class:`~optax_ext.wrappers.nan_guard.NanGuardState` counts what it did
      (``skipped_steps``, ``shrunk_leaves``, ``spike_steps``; read them with
      ``optax.tree.get(state, "skipped_steps")``).
    - **Spike guard**: a finite spike (every gradient ×1e30 on one step) passes the
      NaN check, but its sign then rules the momentum for ~ln(1e28)/(1-β) ≈ 1800
      steps. A micro-step whose global gradient norm exceeds ``spike_factor`` times the
      bias-corrected running average of the norm (EMA with ``spike_decay``, after
      ``spike_warmup`` admitted micro-steps) is skipped like a micro-step whose every
      leaf is discarded, without the shrink: momentum kept, no parameter moves on it
      (on the last micro-step of a cycle, that update is lost); or, with
      ``spike_action="clip"``, its gradients are scaled to the average norm. The rule is
      :class:`~optax_ext.wrappers.spike.SpikeGuard`'s, shared with ``nan_guard``. The
      defaults never fire on a clean run (bit-identical to ``spike_factor=None`` on a
      200-step Flax run, tested); the norm costs one read of the gradients, which
      ``spike_factor=None`` saves. With ``guard_nan=False`` and ``spike_factor=None``
      Tiger is the bare chain.

    With k = 1, s ≡ 1, ``mask=True`` and finite gradients, Tiger equals
    ``optax.lion(learning_rate, b1=beta, b2=beta, weight_decay=weight_decay)``.

    Args:
      learning_rate: a float or an optax schedule of the update index.
      beta: momentum coefficient in [0, 1). 0.9, Lion's b1 (the weight of the momentum
        inside Lion's sign), is the default: across the quality suite's language models
        and classifiers (a few hundred updates) it beats Su's 0.965 (his default for
        long NLP runs; 0.945 for vision) by 0.15–0.18 nats and 1.4 points and puts Tiger
        ahead of ``optax.lion`` (``benchmarks/RESULTS.md``). A longer run averages more
        gradients per step: 0.965 remains a good choice there.
      weight_decay: decoupled decay λ ≥ 0 (or a schedule of the update index),
        multiplied by the scaled learning rate.
      accumulation_steps: micro-batches per update, k ≥ 1.
      param_scaling: ``"tiger"``, ``None`` or path rules, see above.
      min_rms: floor of the RMS scales, ≥ 0.
      guard_nan: check each gradient leaf and shrink a non-finite one instead of
        stepping it.
      shrink_ratio: r in (0, 1].
      catch_inf: treat ±inf like NaN (the default); False checks NaN only, Su's
        original (bojone/tiger, bert4keras) behaviour, with the hazard above.
      mu_dtype: momentum dtype (default: the params').
      mask: which leaves get weight decay, see above.
      spike_factor: the spike threshold as a multiple of the average gradient norm,
        > 1; ``None`` switches the spike guard off.
      spike_warmup: admitted micro-steps before the spike guard can fire, ≥ 1.
      spike_decay: decay in [0, 1) of the norm's running average.
      spike_action: ``"skip"`` or ``"clip"`` a spike.
      state_rounding, rounding_seed: how a bf16/f16 momentum is written, as in
        :func:`scale_by_tiger`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
      >>> tx = tiger(learning_rate=1e-2, accumulation_steps=2)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)  # micro-step 1: no move
      >>> float(jnp.abs(updates["dense"]["kernel"]).max())
      0.0
      >>> updates, state = tx.update(grads, state, params)  # micro-step 2: update
      >>> params = optax.apply_updates(params, updates)
      >>> int(optax.tree.get(state, "updates")), int(optax.tree.get(state, "skipped_steps"))
      (1, 0)

    References:
      Su, `Tiger: an extremely tight-fisted optimizer <https://kexue.fm/archives/9512>`_,
      2023; `bojone/tiger <https://github.com/bojone/tiger>`_; accumulation inside the
      momentum: `kexue.fm/archives/8634 <https://kexue.fm/archives/8634>`_.
    """
    check_range("learning_rate", learning_rate, 0)
    check_range("weight_decay", weight_decay, 0)
    k = check_accumulation_steps(accumulation_steps)
    # optax.inject_hyperparams would read schedules per micro-step: refused while accumulating
    injected = check_not_injected(
        "ox.tiger", k, learning_rate=learning_rate, weight_decay=weight_decay, beta=beta
    )
    check_range("min_rms", min_rms, 0, schedule=False)
    check_range("shrink_ratio", shrink_ratio, 0, 1, low_open=True, schedule=False)
    direction = scale_by_tiger(
        beta,
        accumulation_steps=k,
        mu_dtype=mu_dtype,
        state_rounding=state_rounding,
        rounding_seed=rounding_seed,
    )
    scale = [] if param_scaling is None else [scale_by_param_scale(param_scaling, min_rms)]
    tx = sharing_the_cycle(
        k,
        direction,
        add_update_decayed_weights(weight_decay, decay_mask(mask)),
        *scale,
        scale_by_update_learning_rate(learning_rate, zero_held=True),
    )
    if guard_nan or spike_factor is not None:
        spike_args = (spike_factor, spike_warmup, spike_decay, spike_action)
        tx = leafwise_guard(
            tx, shrink_ratio, guard_nan=guard_nan, catch_inf=catch_inf, spike_args=spike_args
        )
    tx = checked(tx, "tiger")

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "tiger", "it scales and decays them, and shrinks a bad leaf")
        refuse_injected_cycles(injected, "ox.tiger", extra_args)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)

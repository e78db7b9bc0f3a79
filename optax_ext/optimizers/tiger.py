"""Tiger, the "tight-fisted optimizer": Lion with one β and one buffer, even when accumulating.

Reference: Su Jianlin, "Tiger: an extremely tight-fisted optimizer",
https://kexue.fm/archives/9512, and https://github.com/bojone/tiger.
"""

from __future__ import annotations

import functools
import operator
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
    decay_mask,
    hold_momentum,
    path_labels,
    require_params,
    schedule_value,
    unzip_leaves,
    work_dtype,
)
from optax_ext._cycles import (
    check_accumulation_steps,
    check_not_injected,
    counters_init,
    current_cycle,
    next_counters,
    refuse_injected_cycles,
)
from optax_ext.wrappers import nan_guard, spike
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
    """State of Tiger: the micro-step counter, the single momentum buffer, guard counters.

    The counters mirror :class:`~optax_ext.wrappers.nan_guard.NanGuardState`'s.

    Attributes:
      count: int32, micro-steps seen (calls to ``update``).
      mu: the momentum, shaped like the params.
      skipped_steps: int32, micro-steps on which the guard discarded anything: a
        non-finite gradient leaf (Tiger decides per leaf: the others still step) or the
        whole gradient (a skipped spike).
      shrunk_leaves: int32, non-finite gradient leaves discarded so far (a micro-step
        with 3 bad leaves adds 3); :func:`tiger` shrinks each of them, ``scale_by_tiger``
        gives it a zero update.
      spike_steps: int32, micro-steps whose gradient norm exceeded the spike threshold
        (skipped, or clipped with ``spike_action="clip"``).
      norm_ema: float32, the spike guard's EMA of the global gradient norm.
      norm_steps: int32, micro-steps admitted into ``norm_ema``.
      micro_step: int32, micro-steps taken in the current accumulation cycle.
      cycle_length: int32, the current cycle's k (it may change between cycles: see
        ``set_accumulation_steps`` in :func:`tiger`).
      updates: int32, parameter updates made (completed cycles); schedules read it.
    """

    count: jax.Array
    mu: optax.Updates
    skipped_steps: jax.Array
    shrunk_leaves: jax.Array
    spike_steps: jax.Array
    norm_ema: jax.Array
    norm_steps: jax.Array
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
    guard_nan: bool = True,
    catch_inf: bool = True,
    mu_dtype: Any = None,
    spike_factor: float | None = 1e3,
    spike_warmup: int = 20,
    spike_decay: float = 0.99,
    spike_action: str = "skip",
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Tiger's direction: the sign of a momentum that also accumulates micro-batches.

    .. math::

        m \leftarrow b_1 m + \tfrac{1-\beta}{k} g,\quad
        b_1 = \beta \text{ on the first of } k \text{ micro-steps, else } 1;\qquad
        u = \operatorname{sign}(m) \text{ on the last micro-step, else } 0.

    A gradient leaf containing a NaN or ±inf (only NaN with ``catch_inf=False``) is
    treated as zero and leaves that leaf's momentum unchanged; its update is 0. The
    full :func:`tiger` also shrinks such leaves toward their centre, which needs the
    parameters and is not a direction, so it lives there. The spike guard is
    :func:`tiger`'s (see there); the counters in :class:`ScaleByTigerState` record both.

    Args:
      beta: momentum coefficient β in [0, 1).
      accumulation_steps: k ≥ 1 micro-batches per parameter update.
      guard_nan: discard non-finite gradient leaves (False: no per-leaf check).
      catch_inf: with ``guard_nan``, discard leaves with ±inf too (False: NaN only,
        Su's original behaviour, see :func:`tiger`).
      mu_dtype: dtype of the momentum (default: the gradients').
      spike_factor: the spike threshold as a multiple of the average gradient norm,
        > 1; ``None`` switches the spike guard off.
      spike_warmup: admitted micro-steps before the spike guard can fire, ≥ 1.
      spike_decay: decay in [0, 1) of the norm's running average.
      spike_action: ``"skip"`` or ``"clip"`` a spike.
      state_rounding: how a bf16/f16 momentum is written: ``"nearest"`` (a cast) or
        ``"stochastic"`` (unbiased,
        :func:`~optax_ext.wrappers.rounding.stochastic_round_to`, keyed by
        ``rounding_seed``, the micro-step count and the leaf index). The step's sign is
        taken before the rounding. No effect on a float32 momentum.
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_tiger(0.9), optax.scale(-1e-2))
      >>> state = tx.init(jnp.zeros(3))
      >>> updates, state = tx.update(jnp.array([1.0, -2.0, 3.0]), state)
      >>> updates
      Array([-0.01,  0.01, -0.01], dtype=float32)

    References:
      Su, `Tiger <https://kexue.fm/archives/9512>`_, 2023.
    """
    direction = _Direction.checked(
        beta,
        accumulation_steps,
        guard_nan,
        catch_inf,
        mu_dtype,
        (spike_factor, spike_warmup, spike_decay, spike_action),
        state_rounding,
        rounding_seed,
    )
    injected = check_not_injected("ox.scale_by_tiger", direction.k, beta=beta)

    def update_fn(updates, state, params=None, **extra_args):
        check_updates_match(updates, params, "tiger")
        refuse_injected_cycles(injected, "ox.scale_by_tiger", extra_args)
        step = direction(updates, state, extra_args)
        return step.direction, step.state

    return optax.GradientTransformationExtraArgs(direction.init, update_fn)


def tiger(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    beta: float = 0.9,
    weight_decay: float = 0.01,
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

    - **Accumulation inside the momentum**: after k micro-batches m equals
      β·m + (1-β)·mean(g), exactly Tiger fed the mean gradient; the state is one buffer
      the size of the params whatever k is. Parameters move only on the last micro-step
      (zeros are emitted on the others).
    - **Learning-rate schedules are indexed by update** (t // k), the optax convention.
      Tiger's own ``lr_schedule`` counts micro-steps and is read on the cycle's last
      one: with k=4 update n uses its value at micro-step 4n+3, so its ``{40000: 1}``
      is a warm-up reaching 1 at update (40000-3)/4 = 9999.25 here, not exactly
      ``{10000: 1}`` (the two differ by under 1e-4 of the lr on the ramp). Injected
      schedules follow the same index under ``ox.inject_hyperparams``;
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
      per-leaf check. ``shrunk_leaves`` and ``skipped_steps`` in the state count what
      the guard did, as :func:`~optax_ext.wrappers.nan_guard.nan_guard`'s do.
    - **Spike guard**: a finite spike (every gradient ×1e30 on one step) passes the
      NaN check, but its sign then rules the momentum for ~ln(1e28)/(1-β) ≈ 1800
      steps. A micro-step whose global gradient norm exceeds ``spike_factor`` times the
      bias-corrected running average of the norm (EMA with ``spike_decay``, after
      ``spike_warmup`` admitted micro-steps) is skipped like a micro-step whose every
      leaf is discarded, without the shrink: momentum kept, no parameter moves on it
      (on the last micro-step of a cycle, that update is lost); or, with
      ``spike_action="clip"``, its gradients are scaled to the average norm. It is counted
      in ``spike_steps`` (and ``skipped_steps`` when skipped); the rule is
      :class:`~optax_ext.wrappers.spike.SpikeGuard`'s, shared with ``nan_guard``. The
      defaults never fire on a clean run (bit-identical to ``spike_factor=None`` on a
      200-step Flax run, tested); the norm costs one read of the gradients, which
      ``spike_factor=None`` saves.

    Where nothing depends on the cycle or the guards (k = 1, ``guard_nan=False``,
    ``spike_factor=None``) Tiger is the chain of its pieces,
    ``optax.chain(scale_by_tiger(β), optax.add_decayed_weights(λ, mask),
    scale_by_param_scale(), optax.scale_by_learning_rate(lr))``, to float32 rounding
    and at the same speed (``benchmarks/bench_speed.py``). It stays one transform because
    in general the pieces after the direction need what only the direction knows: the
    learning rate and decay are indexed by update and vanish on held micro-steps, and a
    bad leaf's shrink replaces its whole update, unscaled by the learning rate.
    :func:`scale_by_tiger` is its direction alone.

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
      weight_decay: decoupled decay λ ≥ 0, multiplied by the scaled learning rate.
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
      spike_factor, spike_warmup, spike_decay, spike_action: the spike guard, as in
        :func:`scale_by_tiger`; ``spike_factor=None`` switches it off.
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

    References:
      Su, `Tiger: an extremely tight-fisted optimizer <https://kexue.fm/archives/9512>`_,
      2023; `bojone/tiger <https://github.com/bojone/tiger>`_; accumulation inside the
      momentum: `kexue.fm/archives/8634 <https://kexue.fm/archives/8634>`_.
    """
    check_range("learning_rate", learning_rate, 0)
    check_range("weight_decay", weight_decay, 0)
    direction = _Direction.checked(
        beta,
        accumulation_steps,
        guard_nan,
        catch_inf,
        mu_dtype,
        (spike_factor, spike_warmup, spike_decay, spike_action),
        state_rounding,
        rounding_seed,
    )
    # optax.inject_hyperparams would read schedules per micro-step: refused while accumulating
    injected = check_not_injected(
        "ox.tiger", direction.k, learning_rate=learning_rate, weight_decay=weight_decay, beta=beta
    )
    check_range("min_rms", min_rms, 0, schedule=False)
    check_range("shrink_ratio", shrink_ratio, 0, 1, low_open=True, schedule=False)
    rules = scale_rules(param_scaling)

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "tiger", "it scales and decays them, and shrinks a bad leaf")
        check_updates_match(updates, params, "tiger")
        refuse_injected_cycles(injected, "ox.tiger", extra_args)
        step = direction(updates, state, extra_args, zero_held=False)
        lr = schedule_value(learning_rate, step.cycle.update)
        wd = schedule_value(weight_decay, step.cycle.update)  # both indexed by update
        scales = path_labels(params, rules, default=1.0)
        decays = decay_mask(mask)(params)
        centres = path_labels(params, nan_guard.DEFAULT_CENTRES, default=0.0)

        def leaf(u, bad, p, rule, decay, centre):
            # u = sign(m); the selects below hold or shrink the leaf where needed
            work = work_dtype(p)
            direction = u.astype(work)
            if decay:
                direction = direction + wd * p.astype(work)
            delta = -(lr * param_scale(p, rule, min_rms)) * direction
            if step.no_step is not None:  # decay moves no parameter on those either
                delta = jnp.where(step.no_step, 0.0, delta)
            if bad is not False:
                delta = nan_guard.shrink_bad(bad, delta, p, centre, shrink_ratio)
            return delta.astype(u.dtype)

        updates = jax.tree.map(leaf, step.direction, step.bad, params, scales, decays, centres)
        return updates, step.state

    return optax.GradientTransformationExtraArgs(direction.init, update_fn)


# -------------------------------------------------------------- the direction


class _Step(NamedTuple):
    """One micro-step of Tiger's direction, with what :func:`tiger` builds on it."""

    direction: Any  # sign(m); 0 where the step is skipped or the leaf discarded (zero_held)
    state: ScaleByTigerState
    bad: Any  # tree of scalar bools: the discarded (non-finite) leaves
    no_step: jax.Array | None  # every leaf holds still: not the last micro-step, or a spike
    cycle: Any


class _Direction(NamedTuple):
    """:func:`scale_by_tiger`'s update, shared with :func:`tiger`."""

    beta: float
    k: Any
    guard: Any
    guard_nan: bool
    catch_inf: bool
    mu_dtype: Any
    state_rounding: str
    rounding_seed: int

    @classmethod
    def checked(
        cls, beta, k, guard_nan, catch_inf, mu_dtype, spike_args, state_rounding, rounding_seed
    ) -> _Direction:
        """Checks :func:`scale_by_tiger`'s arguments (``spike_args``: the spike guard's)."""
        check_range("beta", beta, 0, 1, high_open=True, schedule=False)
        k = check_accumulation_steps(k)
        mu_dtype = canonical_dtype(mu_dtype)
        check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
        check_seed("rounding_seed", rounding_seed)
        guard = spike.spike_guard(*spike_args)
        return cls(beta, k, guard, guard_nan, catch_inf, mu_dtype, state_rounding, rounding_seed)

    def init(self, params) -> ScaleByTigerState:
        check_float_params(params, "tiger")
        # a fresh array per counter: a donated state must not hold one buffer twice
        zero = lambda: jnp.zeros([], jnp.int32)
        return ScaleByTigerState(
            count=zero(),
            mu=optax.tree.zeros_like(params, dtype=self.mu_dtype),
            skipped_steps=zero(),
            shrunk_leaves=zero(),
            **spike.init_counters(),
            **counters_init(self.k),
        )

    def __call__(self, updates, state, extra_args, zero_held: bool = True) -> _Step:
        """``zero_held=False`` leaves sign(m) where the step is skipped or the leaf
        discarded, for a caller that replaces those itself (one select, not two)."""
        cycle = current_cycle(self.k, state, extra_args)
        checks = _guard_checks(updates, state, self.guard, self.guard_nan, self.catch_inf)
        # one scalar for every leaf: a micro-step that does not end the cycle, or a spike
        no_step = _either(None if cycle.last is True else ~cycle.last, checks.skip)

        def leaf(g, m, bad):
            discard = _either(bad, checks.skip)
            gs = checks.scaled(g)
            m = tiger_momentum(gs, m, beta=self.beta, first=cycle.first, k=cycle.k, bad=discard)
            u = jnp.sign(m)
            zero = _either(bad, no_step) if zero_held else None
            if zero is not None:
                u = jnp.where(zero, 0, u)
            return u.astype(g.dtype), m

        out = jax.tree.map(leaf, updates, state.mu, checks.bad)
        u, mu = unzip_leaves(updates, out)
        mu = write_state(mu, state.mu, self.state_rounding, self.rounding_seed, state.count)
        new_state = _next_state(state, mu, checks, self.guard, cycle)
        return _Step(u, new_state, checks.bad, no_step, cycle)


# ----------------------------------------------------------------------- guards


class _Checks(NamedTuple):
    """One micro-step's guard decisions, shared by every leaf."""

    bad: Any  # tree of scalar bools (non-finite leaves); of Python False without the check
    n_bad: jax.Array
    norm: jax.Array | None
    spike: spike.SpikeCheck
    skip: jax.Array | None  # skip the whole micro-step (a spike); None when it never can

    def scaled(self, g):
        """``g`` clipped by the spike guard (unchanged unless ``spike_action="clip"``)."""
        return spike.scale_leaf(g, self.spike.scale)


def _guard_checks(updates, state, guard, guard_nan, catch_inf) -> _Checks:
    leaves, treedef = jax.tree.flatten(updates)
    if guard_nan:
        # the per-leaf check and the spike guard's norm share one read of each leaf
        checked = spike.check_leaves(leaves, catch_inf)
        bad, n_bad = treedef.unflatten(checked.bad), checked.count()
        norm = None if guard is None else checked.norm()
    else:
        bad, n_bad = treedef.unflatten([False] * len(leaves)), jnp.zeros([], jnp.int32)
        norm = None if guard is None else spike.global_norm(leaves)
    spiked = spike.check(guard, norm, state)
    skip = None if guard is None else spiked.skip
    return _Checks(bad, n_bad, norm, spiked, skip)


def _either(*flags):
    """The ``|`` of scalar bool flags, leaving out those that are never set (None or
    Python False); None when none is left."""
    flags = [f for f in flags if f is not None and f is not False]
    return functools.reduce(operator.or_, flags) if flags else None


def _next_state(
    state: ScaleByTigerState, mu: Any, checks: _Checks, guard, cycle
) -> ScaleByTigerState:
    any_bad = spike.any_flag([checks.n_bad > 0])
    acted = any_bad if checks.skip is None else any_bad | checks.skip
    return ScaleByTigerState(
        count=optax.safe_increment(state.count),
        mu=mu,
        skipped_steps=spike.increment_if(acted, state.skipped_steps),
        shrunk_leaves=spike.saturating_add(state.shrunk_leaves, checks.n_bad),
        **spike.update_counters(guard, checks.norm, checks.spike, ~any_bad, state),
        **next_counters(cycle, state),
    )

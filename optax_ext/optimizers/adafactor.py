"""AdaFactor as Su Jianlin reads it (bert4keras AdaFactorV1): factored second moment,
update clipping, momentum before the parameter scale, and a 1/√τ default learning rate.

Reference: Su Jianlin, "AdaFactor optimizer analysis", https://kexue.fm/archives/7302;
Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
https://arxiv.org/abs/1804.04235.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext import _xla_cpu
from optax_ext._common import (
    canonical_dtype,
    check_choice,
    check_float_params,
    check_int,
    check_range,
    check_updates_match,
    compile_path_regex,
    work_dtype,
)
from optax_ext._cycles import reject_cycle_length
from optax_ext._reductions import sum_of_squares
from optax_ext.optimizers._alias import alias_chain
from optax_ext.optimizers.tiger import scale_by_param_scale
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "FactoredMoment",
    "ScaleByAdafactorState",
    "adafactor",
    "relative_step_size",
    "scale_by_adafactor",
    "scale_by_parameter_rms",
]

#: The threshold of ``min_dim_size_to_factor=None``.
DEFAULT_MIN_DIM_SIZE_TO_FACTOR = 128


class FactoredMoment(NamedTuple):
    """The factored second moment of one tensor, each kept with its reduced axis as size 1.

    ``row`` is the mean of g² over the largest axis, ``col`` over the second-largest.
    """

    row: jax.Array
    col: jax.Array


class ScaleByAdafactorState(NamedTuple):
    """State of :func:`scale_by_adafactor`.

    ``nu`` has the params' structure; each leaf is either the full second moment or a
    :class:`FactoredMoment` (m + n numbers for an m×n matrix). ``mu`` is the momentum
    (the params' structure) or ``None`` without momentum.
    """

    count: jax.Array  # int32: the 0-based step t; τ = t + 1
    nu: Any
    mu: Any


# ----------------------------------------------------------------------- factoring


def factored_axes(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(largest axis, second-largest axis) if the tensor's second moment is factored, else None.

    Factored when the tensor has ≥ 2 axes and its second-largest axis has at least
    ``min_dim_size_to_factor`` entries. Ties: the later axis counts as the larger (as in
    ``optax.adafactor``), so a square matrix reduces its columns (axis 1) for ``row``.
    """
    axes = _two_largest(shape)
    if axes is None or shape[axes[1]] < min_dim_size_to_factor:
        return None
    return axes


def _two_largest(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    return int(order[-1]), int(order[-2])


def _zeros_reduced(param: Any, axis: int, dtype: Any) -> jax.Array:
    # eval_shape keeps the param's sharding in the reduced shape (abstract leaves too)
    target = jax.eval_shape(lambda x: jnp.mean(x, axis=axis, keepdims=True), param)
    return jnp.zeros_like(target, dtype=dtype)


def _init_nu(param: Any, min_dim: int) -> Any:
    dtype = work_dtype(param.dtype)
    axes = factored_axes(param.shape, min_dim)
    if axes is None:
        return jnp.zeros_like(param, dtype=dtype)
    largest, second = axes
    return FactoredMoment(
        row=_zeros_reduced(param, largest, dtype), col=_zeros_reduced(param, second, dtype)
    )


# ----------------------------------------------------------------------- per leaf


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _second_moment(g, nu, beta2, eps1):
    """(factors of v, new state leaf): v, the EMA of g² + ε1, is the product of the
    (broadcast) factors; a factored v is never materialised at full size."""
    if not isinstance(nu, FactoredMoment):
        new = beta2 * nu + (1.0 - beta2) * (jnp.square(g) + eps1)
        return (new,), new.astype(nu.dtype)
    largest, second = _two_largest(g.shape)
    # mean(g²) + ε1 = mean(g² + ε1): ε1 is added to the small mean, not to every entry
    row_mean = sum_of_squares(g, largest) / g.shape[largest] + eps1
    row_mean, g = _xla_cpu.fence((row_mean, g))
    col_mean = sum_of_squares(g, second) / g.shape[second] + eps1
    row = beta2 * nu.row + (1.0 - beta2) * row_mean
    col = beta2 * nu.col + (1.0 - beta2) * col_mean
    new = FactoredMoment(row.astype(nu.row.dtype), col.astype(nu.col.dtype))
    return (row, col / jnp.mean(row, axis=second, keepdims=True)), new


def _normalised(g, factors, eps1):
    """u = g / sqrt(v + ε1) with v the product of ``factors`` (broadcast, never stored)."""
    v = factors[0] if len(factors) == 1 else factors[0] * factors[1]
    return g * jax.lax.rsqrt(v + eps1)


def _direction(g, nu, *, beta2, eps1, clip):
    """(u, new second-moment leaf): u = g/√(v + ε1), shrunk to RMS ≤ d when clipping.

    ``g`` is in the work dtype. The plain form on every backend: u is formed once and
    its RMS read from it.
    """
    factors, new_nu = _second_moment(g, nu, beta2, eps1)
    if clip is None:
        return _normalised(g, factors, eps1), new_nu
    g, factors = _xla_cpu.fence((g, factors))
    plain_ms = lambda g, *f: jnp.mean(jnp.square(_normalised(g, f, eps1)))
    cpu_ms = (
        None
        if len(factors) == 1
        else (lambda g, row, col: _xla_cpu.adafactor_mean_square(g, row, col, eps1))
    )
    rms_u = jnp.sqrt(_xla_cpu.on_cpu(g, *factors, plain=plain_ms, cpu=cpu_ms))
    g, factors = _xla_cpu.fence((g, factors))
    return _normalised(g, factors, eps1) / jnp.maximum(1.0, rms_u / clip), new_nu


def _adafactor_leaf(g, nu, m, *, beta2, eps1, clip, momentum):
    """One leaf: (direction in g's dtype, new second-moment leaf, new momentum or None)."""
    work = work_dtype(g.dtype)
    u, new_nu = _direction(g.astype(work), nu, beta2=beta2, eps1=eps1, clip=clip)
    new_m = None
    if m is not None:
        u = momentum * m.astype(work) + (1.0 - momentum) * u
        new_m = u  # written in the state's dtype by the caller (cast or SR)
    return u.astype(g.dtype), new_nu, new_m


def _float_dtype() -> Any:
    # float32, or float64 when JAX runs in x64: counters become floats at full precision
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _beta2(decay_rate: Any, count: jax.Array) -> jax.Array:
    """β2_τ: 1 - τ^(-0.8) with τ = t + 1 when ``decay_rate`` is None, else the constant."""
    if decay_rate is None:
        return 1.0 - (count.astype(_float_dtype()) + 1.0) ** -0.8
    return decay_rate


def _static_min_dim(value: Any) -> int:
    if value is None:
        return DEFAULT_MIN_DIM_SIZE_TO_FACTOR
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            "min_dim_size_to_factor decides the state's shapes and must be static: under "
            "optax.inject_hyperparams name it in static_args=('min_dim_size_to_factor',) "
            "(or leave it None, which means 128)"
        )
    return int(value)


# -------------------------------------------------------------------- transforms


def scale_by_adafactor(
    decay_rate: float | None = None,
    *,
    min_dim_size_to_factor: int | None = None,
    factored: bool = True,
    eps1: float = 1e-30,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaFactor's direction (Su's reading): factored RMS scaling, clipping, momentum.

    With τ = t + 1 and β2_τ = 1 - τ^(-0.8) (or the constant ``decay_rate``):

    .. math::

        G &= g^2 + \epsilon_1 \\
        v_r &\leftarrow \beta_{2,\tau} v_r + (1-\beta_{2,\tau})\,\mathrm{mean}_{\text{largest}}(G),
        \quad v_c \leftarrow \beta_{2,\tau} v_c
            + (1-\beta_{2,\tau})\,\mathrm{mean}_{\text{second}}(G) \\
        v &= v_r v_c / \mathrm{mean}_{\text{second}}(v_r)
            \quad(\text{unfactored: } v \leftarrow \beta_{2,\tau} v + (1-\beta_{2,\tau}) G) \\
        u &= g/\sqrt{v + \epsilon_1}, \qquad u \leftarrow u / \max(1, \mathrm{RMS}(u)/d) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) u,\quad u = m
            \qquad(\text{only with momentum})

    A tensor is factored over its two largest axes (other axes kept) when its
    second-largest axis has ≥ ``min_dim_size_to_factor`` entries; vectors are never
    factored. The momentum averages the clipped direction; :func:`adafactor` chains the
    parameter scale max(RMS(θ), ε2) after it, as Su's reading orders them.

    Args:
      decay_rate: ``None`` for β2_τ = 1 - τ^(-0.8); a float in [0, 1] for a constant β2.
        (Not ``optax.adafactor``'s ``decay_rate``, which is the exponent 0.8.)
      min_dim_size_to_factor: static int ≥ 1; ``None`` means 128. Kept ``None`` by default
        so that ``optax.inject_hyperparams`` leaves it static.
      factored: ``False`` keeps the full second moment for every tensor.
      eps1: ε1 ≥ 0, added to g² and inside the square root.
      clipping_threshold: d > 0 of the update clipping; ``None`` disables it.
      momentum: β1 in [0, 1]; ``None`` keeps no momentum buffer.
      mu_dtype: momentum dtype (default: the params'). The second moment is kept in at
        least float32.
      state_rounding: ``"nearest"`` or ``"stochastic"``: how a bf16/f16 momentum is
        written (:func:`~optax_ext.wrappers.rounding.write_state`).
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with a :class:`ScaleByAdafactorState`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros(128)}
      >>> tx = scale_by_adafactor()
      >>> state = tx.init(params)
      >>> state.nu["w"].row.shape, state.nu["w"].col.shape, state.nu["b"].shape
      ((1, 128), (256, 1), (128,))
      >>> u, state = tx.update(params, state)

    References:
      Su, `AdaFactor optimizer analysis <https://kexue.fm/archives/7302>`_, 2020;
      Shazeer & Stern, `Adafactor <https://arxiv.org/abs/1804.04235>`_, 2018.
    """
    if decay_rate is not None:
        check_range("decay_rate", decay_rate, 0, 1, schedule=False)
    if min_dim_size_to_factor is not None:
        check_int("min_dim_size_to_factor", min_dim_size_to_factor)
    check_range("eps1", eps1, 0, schedule=False)
    if clipping_threshold is not None:
        check_range("clipping_threshold", clipping_threshold, 0, low_open=True, schedule=False)
    if momentum is not None:
        check_range("momentum", momentum, 0, 1, schedule=False)
    mu_dtype = canonical_dtype(mu_dtype)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)

    def init_fn(params):
        check_float_params(params, "adafactor")
        min_dim = _static_min_dim(min_dim_size_to_factor) if factored else np.inf
        nu = jax.tree.map(lambda p: _init_nu(p, min_dim), params)
        mu = None if momentum is None else optax.tree.zeros_like(params, dtype=mu_dtype)
        return ScaleByAdafactorState(count=jnp.zeros([], jnp.int32), nu=nu, mu=mu)

    def update_fn(updates, state, params=None, **extra_args):
        reject_cycle_length(extra_args, "ox.adafactor")
        del extra_args
        check_updates_match(updates, params, "adafactor")
        beta2 = _beta2(decay_rate, state.count)
        leaves, treedef = jax.tree.flatten(updates)
        nus = treedef.flatten_up_to(state.nu)
        mus = [None] * len(leaves) if state.mu is None else treedef.flatten_up_to(state.mu)
        leaf = functools.partial(
            _adafactor_leaf, beta2=beta2, eps1=eps1, clip=clipping_threshold, momentum=momentum
        )
        out = [leaf(g, nu, m) for g, nu, m in zip(leaves, nus, mus, strict=True)]
        direction = treedef.unflatten([o[0] for o in out])
        nu = treedef.unflatten([o[1] for o in out])
        mu = None
        if state.mu is not None:
            mu = treedef.unflatten([o[2] for o in out])
            mu = write_state(mu, state.mu, state_rounding, rounding_seed, state.count)
        count = optax.safe_increment(state.count)
        return direction, ScaleByAdafactorState(count=count, nu=nu, mu=mu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_parameter_rms(
    eps2: float = 1e-3, exclude_from_parameter_scale: str | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""AdaFactor's parameter scale, which makes its step relative to each tensor's size:

    .. math:: u \leftarrow u \cdot \max(\mathrm{RMS}(\theta), \epsilon_2)

    on every leaf except those whose Flax path the regular expression
    ``exclude_from_parameter_scale`` is found in (``None``: none is excluded). It is
    :func:`~optax_ext.optimizers.tiger.scale_by_param_scale`, the package's per-parameter
    scale, with the rules ``{exclude_from_parameter_scale: 1, every other leaf: "rms"}``
    and ``min_rms=ε2``. Stateless; ``update`` needs ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.zeros(2)}
      >>> tx = scale_by_parameter_rms(1e-3, exclude_from_parameter_scale="bias")
      >>> u, _ = tx.update({"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, (), params)
      >>> u["kernel"][0], u["bias"]
      (Array([3., 3.], dtype=float32), Array([1., 1.], dtype=float32))
    """
    check_range("eps2", eps2, 0, schedule=False)
    rules = [("", "rms")]
    if exclude_from_parameter_scale is not None:
        name = "exclude_from_parameter_scale"
        rules.insert(0, (compile_path_regex(exclude_from_parameter_scale, name), 1.0))
    return scale_by_param_scale(rules, min_rms=eps2)


def relative_step_size(multiply_by_parameter_scale: bool = True) -> optax.Schedule:
    """AdaFactor's default learning rate: min(1e-2, 1/√τ) with τ = t + 1, ×0.05 without
    the parameter scale (an absolute step must be smaller than a relative one)."""
    factor = 1.0 if multiply_by_parameter_scale else 0.05

    def schedule(count):
        tau = jnp.asarray(count, _float_dtype()) + 1.0
        return factor * jnp.minimum(1e-2, jax.lax.rsqrt(tau))

    return schedule


def adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int | None = None,
    decay_rate: float | None = None,
    *,
    momentum: float | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any = None,
    factored: bool = True,
    eps1: float = 1e-30,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    exclude_from_parameter_scale: str | None = None,
    eps2: float = 1e-3,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaFactor as in Su's reading (bert4keras ``AdaFactorV1``), with decoupled weight decay.

    .. math::

        \theta \leftarrow \theta - \mathrm{lr}_\tau\,(u \cdot s_\theta
            + \lambda_{\text{leaf}}\,\theta),
        \qquad \mathrm{lr}_\tau = \texttt{learning\_rate}
            \ \text{or}\ \min(10^{-2}, 1/\sqrt{\tau})\,(\times 0.05
            \text{ without the parameter scale})

    where u is :func:`scale_by_adafactor`'s direction and s_θ = max(RMS(θ), ε2)
    (:func:`scale_by_parameter_rms`; 1 without it): the chain of the direction, the
    parameter scale, ``optax.add_decayed_weights`` and the learning rate. Differences
    from ``optax.adafactor``:

    - ``learning_rate=None`` means the relative step min(1e-2, 1/√τ) (optax: no learning
      rate at all, i.e. 1).
    - The momentum averages the clipped direction *before* the parameter scale and the
      learning rate (optax averages lr·scale·u).
    - ε1 also sits inside the square root: u = g/√(v + ε1) (optax: g/√v).
    - Weight decay is multiplied by the learning rate (optax: added after it, unscaled);
      ``mask=None`` decays all but biases and norm scales, ``mask=True`` every leaf.
    - ε2 (floor of the parameter scale) is an argument (optax: fixed 1e-3).
    - ``exclude_from_parameter_scale``, bert4keras's option, is a regular expression
      searched in Flax paths (bert4keras: a list of patterns matched against variable
      names); optax has no such option.
    - ``decay_rate`` is the constant β2, ``None`` for 1 - τ^(-0.8) (optax: the exponent).
    - The state holds m + n numbers per factored m×n matrix (+ m·n with momentum) and no
      placeholders; the second moment is kept in at least float32.
    - Works under ``optax.inject_hyperparams`` as it is: no Python branch on a numeric
      argument, and ``min_dim_size_to_factor`` defaults to ``None`` (128) so it stays
      static (optax injects its int 128 and fails unless it is named in ``static_args``).
      The factoring is read from the state's structure, never from a traced number.

    With a constant ``learning_rate``, no momentum, no weight decay and gradients far
    above ε1, the update equals ``optax.adafactor(learning_rate)``'s.

    Args:
      learning_rate: a float, an optax schedule, or ``None`` for the relative step.
      min_dim_size_to_factor, decay_rate, momentum, factored, eps1, clipping_threshold,
        mu_dtype, state_rounding, rounding_seed: the direction's, see
        :func:`scale_by_adafactor`.
      weight_decay: λ ≥ 0 (float or schedule), multiplied by the learning rate.
      mask: which leaves get weight decay: ``None`` (not biases and norm scales), ``True``
        (all), or an optax mask.
      multiply_by_parameter_scale: scale the step by max(RMS(θ), ε2); needs ``params``.
      exclude_from_parameter_scale: regular expression of Flax paths whose leaves skip
        the parameter scale (bert4keras's option of the same name), ``None``: none.
      eps2: ε2 ≥ 0 (1e-3), the floor of the parameter scale.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((256, 128)), "bias": jnp.zeros(128)}}
      >>> tx = adafactor()  # lr = min(1e-2, 1/sqrt(t+1)) × max(RMS(θ), 1e-3)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Su, `AdaFactor optimizer analysis <https://kexue.fm/archives/7302>`_, 2020;
      bojone/bert4keras ``optimizers.py``; Shazeer & Stern, `Adafactor
      <https://arxiv.org/abs/1804.04235>`_, 2018.
    """
    direction = scale_by_adafactor(
        decay_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        factored=factored,
        eps1=eps1,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        mu_dtype=mu_dtype,
        state_rounding=state_rounding,
        rounding_seed=rounding_seed,
    )
    if multiply_by_parameter_scale:
        direction = (direction, scale_by_parameter_rms(eps2, exclude_from_parameter_scale))
    else:
        check_range("eps2", eps2, 0, schedule=False)
        direction = (direction,)
    lr = relative_step_size(multiply_by_parameter_scale) if learning_rate is None else learning_rate
    return alias_chain(*direction, learning_rate=lr, weight_decay=weight_decay, mask=mask)

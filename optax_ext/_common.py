"""Small helpers shared by every transform: leaf paths, path rules, validation, bytes.

Path rules
----------
Parameters are chosen by regular expressions searched (``re.search``) in each leaf's
``/``-joined path, e.g. ``"params/encoder/layer_0/attention/kernel"``. One mechanism
serves weight-decay masks, Tiger's per-parameter scales, lazy rows and parameter-wise
learning rates::

    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}
    >>> path_labels(params, {r"bias$": "no_decay"}, default="decay")
    {'dense': {'bias': 'no_decay', 'kernel': 'decay'}}
    >>> path_mask(exclude=NORM_AND_BIAS)(params)
    {'dense': {'bias': False, 'kernel': True}}

Validation
----------
Hyperparameters that are concrete Python (or NumPy) numbers are checked when a
transform is built and raise ``ValueError`` naming the argument, its value and the
valid range. Traced values (``optax.inject_hyperparams``) and schedules pass through:
they cannot be checked without a Python ``if`` on a tracer.
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "V",
    "PathRules",
    "NORM_AND_BIAS",
    "EMBEDDING",
    "NORM_SCALE",
    "path_to_str",
    "tree_paths",
    "compile_path_regex",
    "first_match",
    "path_labels",
    "path_multipliers",
    "path_mask",
    "decay_mask",
    "is_concrete_number",
    "check_range",
    "check_int",
    "is_static_int",
    "resolve_mask",
    "check_choice",
    "has_nonfinite",
    "hold_momentum",
    "explicitly_sharded",
    "unzip_leaves",
    "work_dtype",
    "schedule_value",
    "canonical_dtype",
    "tree_bytes",
    "check_transform",
    "require_params",
    "check_float_params",
    "check_updates_match",
]

V = TypeVar("V")
PathRules = Mapping[str, Any] | Sequence[tuple[str, Any]]

#: Flax names of parameters that get no weight decay by default: biases and the
#: ``scale`` of LayerNorm / RMSNorm (Keras: ``bias|beta|gamma``).
NORM_AND_BIAS = r"(^|/)(bias|scale)$"
#: Flax name of embedding tables (``nn.Embed``), shape ``(vocab, features)``.
EMBEDDING = r"(^|/)embedding$"
#: Flax name of the norm gain, whose natural centre is 1 rather than 0.
NORM_SCALE = r"(^|/)scale$"


# ------------------------------------------------------------------------- paths


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_nnx_value(key: Any) -> bool:
    # NNX Variables flatten to their ``.value`` attribute; dropping it gives NNX params
    # the same paths as Linen's ("dense/bias", not "dense/bias/value").
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def path_to_str(path: Sequence[Any]) -> str:
    """Joins a JAX key path (``DictKey``, ``GetAttrKey``, ``SequenceKey``...) with ``/``.

    The ``.value`` attribute of Flax NNX variables is left out, so ``nnx.Param`` leaves
    get the same paths as Linen parameters.
    """
    return "/".join(_key_str(k) for k in path if not _is_nnx_value(k))


def tree_paths(tree: Any) -> Any:
    """A tree of the same structure whose leaves are their ``/``-joined paths."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_to_str(p), tree)


def _rule_items(rules: PathRules | None) -> list[tuple[re.Pattern, Any]]:
    if rules is None:
        return []
    items = rules.items() if isinstance(rules, Mapping) else rules
    compiled = []
    for item in items:
        try:
            pattern, value = item
        except (TypeError, ValueError):
            raise TypeError(
                f"path rules must be a mapping {{regex: value}} or (regex, value) pairs, "
                f"got the item {item!r}"
            ) from None
        compiled.append((compile_path_regex(pattern, "path rules"), value))
    return compiled


def compile_path_regex(pattern: Any, name: str) -> re.Pattern:
    """``re.compile(pattern)`` with a ``ValueError`` naming the argument on a bad regex."""
    if not isinstance(pattern, str | re.Pattern):
        raise TypeError(f"{name}: a path rule is a regular expression string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r} in {name}: {e}") from None


def path_predicate(name: str, rule: str | Callable[[str], bool]) -> Callable[[str], bool]:
    """A test of a path: ``rule`` itself if callable, else whether the regular expression
    ``rule`` is found in the path; a bad pattern is a ``ValueError`` naming ``name``."""
    if callable(rule):
        return rule
    try:
        pattern = re.compile(rule)
    except (TypeError, re.error) as e:
        raise ValueError(
            f"{name} must be a regular expression or a function of the state path, "
            f"got {rule!r}: {e}"
        ) from None
    return lambda path: bool(pattern.search(path))


def first_match(path: str, rules: PathRules | None, default: Any = None) -> Any:
    """The value of the first rule whose regex is found in ``path``, else ``default``."""
    for pattern, value in _rule_items(rules):
        if pattern.search(path):
            return value
    return default


def path_labels(tree: Any, rules: PathRules | None, default: Any = None) -> Any:
    """Maps every leaf to the value of the first rule matching its path (else ``default``).

    The result can serve as ``optax.multi_transform``/``optax.partition`` labels.
    """
    items = _rule_items(rules)

    def label(path, _):
        s = path_to_str(path)
        return next((v for p, v in items if p.search(s)), default)

    return jax.tree_util.tree_map_with_path(label, tree)


def path_multipliers(tree: Any, rules: PathRules) -> Any:
    """Maps every leaf to the product of the multipliers of ALL rules matching its path.

    Leaves that match no rule get 1.0 (bert4keras's parameter-wise learning rate, with
    regex search instead of substrings).
    """
    items = _rule_items(rules)

    def product(path, _):
        s = path_to_str(path)
        return math.prod(float(v) for p, v in items if p.search(s))

    return jax.tree_util.tree_map_with_path(product, tree)


def path_mask(include: str | None = None, exclude: str | None = None) -> Callable[[Any], Any]:
    """An optax-style mask function: True where the path matches ``include`` (default:
    every leaf) and does not match ``exclude``.

    Example: ``optax.add_decayed_weights(1e-2, mask=path_mask(exclude=NORM_AND_BIAS))``
    decays everything but biases and norm scales.
    """
    inc = compile_path_regex(include, "include") if include is not None else None
    exc = compile_path_regex(exclude, "exclude") if exclude is not None else None

    def mask(tree):
        def keep(path, _):
            s = path_to_str(path)
            return (inc is None or bool(inc.search(s))) and not (exc and exc.search(s))

        return jax.tree_util.tree_map_with_path(keep, tree)

    return mask


def decay_mask(mask: Any = None) -> Callable[[Any], Any]:
    """The weight-decay mask of our optimizer aliases, as an optax mask function.

    ``None`` decays every leaf but biases and norm scales (``NORM_AND_BIAS``), ``True``
    every leaf; anything else is an optax mask (a tree of bools or a function of params).
    """
    return lambda params: resolve_mask(mask, params, path_mask(exclude=NORM_AND_BIAS))


# -------------------------------------------------------------------- validation


def is_concrete_number(value: Any) -> bool:
    """True for a Python/NumPy number or a concrete (non-traced) scalar array."""
    if isinstance(value, jax.core.Tracer | str | bytes) or callable(value):
        return False
    try:
        return np.ndim(value) == 0 and np.isscalar(np.asarray(value).item())
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return False


def _interval(low, high, low_open, high_open) -> str:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{lo}, {hi}{right}"


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    schedule: bool = True,
) -> Any:
    """Raises ``ValueError`` unless ``value`` is a real scalar in the interval (or may vary).

    Concrete scalars are checked; traced values (``optax.inject_hyperparams``) pass, and
    so do schedules (callables) where ``schedule`` is true; elsewhere a callable is
    rejected with the way to vary such a number. NaN is always rejected, and so is ±inf
    at an end given as ``None`` (the interval shown is then open there). Strings,
    complex numbers, lists, dicts and other non-scalars are rejected here rather than
    failing later inside the update. Returns ``value`` so checks can be written inline.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    if callable(value):
        if schedule:
            return value
        raise ValueError(
            f"{name} cannot be a schedule (learning_rate and weight_decay can); to vary it "
            f"during training, inject it: ox.inject_hyperparams(factory)({name}=schedule)"
        )
    v = _as_real_array(name, value)
    if v.ndim:
        raise ValueError(f"{name} must be a real scalar, got {value!r} of shape {v.shape}")
    infinite = ((v == -np.inf) & (low is None)) | ((v == np.inf) & (high is None))
    bad = np.isnan(v) | infinite
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if np.any(bad):
        shown = repr(value)
        interval = _interval(low, high, low_open, high_open)
        finite = "finite and " if np.any(infinite) else ""
        raise ValueError(f"{name} must be {finite}in {interval}, got {shown}")
    return value


def _as_real_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float64 array, or a ``ValueError`` saying what a number is here."""
    kind = type(value).__name__
    if isinstance(value, str | bytes):
        raise ValueError(
            f"{name} must be a number or a schedule, got the {kind} {value!r}; "
            f"write {name}={_number_hint(value)} instead"
        )
    try:
        dtype = np.asarray(value).dtype
        if np.issubdtype(dtype, np.complexfloating):
            raise TypeError
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name} must be a real number or a schedule, got {value!r}") from None


def _number_hint(text: Any) -> str:
    try:
        return repr(float(text))
    except (TypeError, ValueError):
        return "a float"


def check_int(name: str, value: Any, minimum: int = 1) -> Any:
    """Checks an integer argument such as an accumulation count.

    Python ints and concrete integer arrays are checked; traced values pass through
    (``optax.inject_hyperparams`` injects ints as arrays unless named in ``static_args``).
    """
    if isinstance(value, jax.core.Tracer):
        return value
    is_int_array = (
        hasattr(value, "dtype") and np.ndim(value) == 0 and jnp.issubdtype(value.dtype, jnp.integer)
    )
    if isinstance(value, bool) or not (isinstance(value, int | np.integer) or is_int_array):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def is_static_int(value: Any, expected: int) -> bool:
    """True if ``value`` is a Python int equal to ``expected`` (enables a static fast path)."""
    return isinstance(value, int) and not isinstance(value, bool) and value == expected


def resolve_mask(mask: Any, params: Any, default: Callable[[Any], Any] | None) -> Any:
    """A tree of bools shaped like ``params`` from an optax-style mask.

    ``None`` takes ``default`` (a mask function; ``None`` default means every leaf), a
    callable is called on ``params``, a bool or a prefix tree of bools is broadcast.
    """
    if mask is None:
        mask = default if default is not None else True
    if callable(mask):
        mask = mask(params)
    try:
        return jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), mask, params)
    except ValueError as e:
        raise ValueError(
            "mask must be a bool, a tree of bools with the params' structure (or a prefix "
            f"of it), or a function of the params returning one: {e}"
        ) from None


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)!r}, got {value!r}")
    return value


# ---------------------------------------------------------------- numbers, bytes


def has_nonfinite(x: jax.Array, catch_inf: bool = True) -> jax.Array:
    """Whether a leaf holds a NaN (with ``catch_inf``: any NaN or ±inf), as a scalar bool.

    Computed as ``isnan(sum(x))`` (``isnan(sum(x * 0))`` with ``catch_inf``): a NaN
    propagates through a float sum, and ``x * 0`` is NaN exactly where ``x`` is not
    finite: one float reduction, with no boolean array in between. Without ``catch_inf``
    a leaf holding both +inf and -inf (or finite values whose partial sums overflow both
    ways, beyond 1e38) also counts.
    """
    if x.size == 0:
        return jnp.zeros([], bool)
    return jnp.isnan(jnp.sum(x * 0 if catch_inf else x))


def hold_momentum(bad: jax.Array, g: jax.Array, decay: Any) -> tuple[jax.Array, Any]:
    """``(g, decay)`` for a momentum ``decay·m + c·g`` (c > 0) that keeps ``m`` bit for
    bit where the scalar bool ``bad`` is set: g becomes -0 and the decay 1.

    1·m + (-0) is m for every float m, ±0, ±inf and NaN included, whatever g held; a +0
    would turn a -0 entry into +0. Shapes, dtypes and shardings stay g's and the decay's
    (a select between m and the new momentum would need m and g sharded alike).
    """
    return jnp.where(bad, -0.0, g), jnp.where(bad, 1.0, decay)


def either(*flags: Any) -> Any:
    """The ``|`` of scalar bool flags, leaving out those never set (None or Python
    False); Python False when none is left, so that no select is built on it."""
    flags = [f for f in flags if f is not None and f is not False]
    return functools.reduce(operator.or_, flags) if flags else False


def explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x``'s type carries an explicit sharding over some mesh axis.

    Under ``AxisType.Explicit`` meshes the sharding is part of the type, and some
    operations (matmuls, loops over blocks) must then name their output's sharding.
    """
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    return any(axis is not None for axis in spec)


def work_dtype(x: Any) -> Any:
    """The dtype to compute in for an array or dtype ``x``: at least float32 (a bf16
    state is updated in float32 and written back; float64 stays float64)."""
    return jnp.promote_types(getattr(x, "dtype", x), jnp.float32)


def unzip_leaves(like: Any, out: Any, n: int = 2) -> tuple[Any, ...]:
    """Splits ``out``, a tree shaped like ``like`` whose leaves are n-tuples (a per-leaf
    function's results), into n trees shaped like ``like``."""
    return tuple(jax.tree.map(lambda _, o, i=i: o[i], like, out) for i in range(n))


def schedule_value(value_or_schedule: Any, index: jax.Array) -> jax.Array:
    """Evaluates a schedule at ``index``, or returns a constant unchanged."""
    return value_or_schedule(index) if callable(value_or_schedule) else value_or_schedule


def canonical_dtype(dtype: Any, name: str = "mu_dtype") -> Any:
    """``jnp.dtype(dtype)`` for a state dtype argument, ``None`` kept (the params' dtype).

    An integer, boolean or complex state would silently truncate the moments (an int32
    momentum rounds to 0 and the optimizer stops moving), so only real floating dtypes
    are accepted.
    """
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"{name} must be a floating dtype such as jnp.float32, got {dtype!r}"
        ) from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"{name} must be a floating dtype (float32, bfloat16, float16), got {dt}: an "
            "integer or complex state truncates the moments"
        )
    return dt


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a tree, scalars (counters) excluded.

    Works on real arrays and on ``jax.ShapeDtypeStruct`` leaves from abstract init
    (``jax.eval_shape(tx.init, params)``), so memory can be counted without allocating.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0:
            continue
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


# --------------------------------------------------------------- tree contract


def check_transform(name: str, value: Any) -> Any:
    """``value`` must be an optax transform; a factory (``optax.adam``) gets the fix."""
    import optax

    if isinstance(value, optax.GradientTransformation):
        return value
    if callable(value):
        shown = getattr(value, "__qualname__", repr(value))
        raise TypeError(
            f"{name} must be an optax transform, got the function {shown}: call it first, "
            f"e.g. {name}={shown}(1e-3) rather than {name}={shown}"
        )
    raise TypeError(f"{name} must be an optax transform (init, update), got {value!r}")


def require_params(params: Any, who: str, why: str) -> Any:
    """The one "needs params" error: ``who`` cannot update without ``params`` (``why``)."""
    if params is None:
        raise ValueError(
            f"{who} needs the params ({why}): call tx.update(grads, state, params), or in a "
            "chain give params to the chain's update"
        )
    return params


def check_float_params(params: Any, who: str) -> None:
    """Rejects integer, boolean and complex parameter leaves with the path named.

    An optimizer step on an int leaf truncates every update to 0 (the parameter never
    moves) and the formulas here are for real numbers; abstract leaves
    (``jax.ShapeDtypeStruct``) are checked by their dtype like arrays.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or jnp.issubdtype(dtype, jnp.floating):
            continue
        raise ValueError(
            f"{who}: the parameter {path_to_str(path) or '(root)'!r} has dtype {dtype}; "
            "optimizers update floating-point parameters only (cast it with "
            ".astype(jnp.float32), or leave it out with optax.masked / optax.partition)"
        )


def check_updates_match(updates: Any, params: Any, who: str) -> None:
    """Gradients must have the params' tree structure and each leaf the param's shape.

    ``optax.apply_updates`` broadcasts, so a (4, 3) gradient for a (3,) bias would
    silently change the parameter's shape; the check is static (shapes only), so free.
    """
    if params is None:
        return
    leaves_u, tree_u = jax.tree_util.tree_flatten(updates)
    leaves_p, tree_p = jax.tree_util.tree_flatten(params)
    if tree_u != tree_p:
        raise ValueError(
            f"{who}: the gradients' tree does not match the params' tree: gradients "
            f"{tree_u}, params {tree_p}"
        )
    paths = [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for path, g, p in zip(paths, leaves_u, leaves_p, strict=True):
        if g is not None and p is not None and jnp.shape(g) != jnp.shape(p):
            raise ValueError(
                f"{who}: the gradient of {path or '(root)'!r} has shape {jnp.shape(g)}, "
                f"its parameter {jnp.shape(p)}; each gradient must have its parameter's shape"
            )


def checked(tx: optax.GradientTransformation, who: str) -> optax.GradientTransformationExtraArgs:
    """``tx`` with the whole tree checked first: float params at ``init``, gradients of
    the params' structure and shapes at ``update`` (static checks, free under jit).

    For an alias whose parts include optax transforms, which broadcast a mis-shaped
    gradient or step an integer parameter silently.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        check_float_params(params, who)
        return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        check_updates_match(updates, params, who)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

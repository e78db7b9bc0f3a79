"""Property tests: every optimizer and wrapper on random Flax-like trees and hyperparameters.

For random nested trees (Flax leaf names, shapes with 0-size axes and scalars, float32 /
bfloat16 / float16 leaves), random valid hyperparameters and random finite gradients,
``init`` and three updates must give:

* a state whose tree structure, leaf shapes and dtypes never change (the jitted step
  compiles once) and match ``init`` on ``jax.ShapeDtypeStruct`` leaves;
* finite updates and a finite state;
* updates in the gradients' dtypes, and params that keep theirs after
  ``optax.apply_updates``;
* the same numbers under ``jax.jit`` as op by op (``jax.disable_jit``).

jit and eager differ only by rounding (XLA fuses, reorders reductions and may keep
bf16/f16 intermediates in float32), so they are compared to about two units in the last
place of each leaf's dtype, relative to the leaf's largest entry (``p + u`` can cancel).
A sign-based optimizer (Tiger, Lion) would amplify a rounding difference into a full
step wherever its momentum is at rounding level: each gradient entry here therefore
keeps one sign (or is exactly zero) over all steps and has a magnitude bounded away
from zero, so every momentum term adds with the same sign and ``sign(m)`` is the same
on both paths. That is a restriction of the input, not of the tolerance.

Examples are derandomized so CI runs the same ones every time; set
``HYPOTHESIS_PROFILE=thorough`` for many more (60, or ``HYPOTHESIS_MAX_EXAMPLES``).
Bugs these properties found are fixed and
reproduced, minimally, by the regression tests at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optax_ext._common import EMBEDDING, path_to_str
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adax, adaxw, scale_by_adax
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion, scale_by_lion
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import scale_by_tiger, tiger
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lazy import lazy
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.param_ema import param_ema
from optax_ext.wrappers.param_rules import scale_by_path

settings.register_profile(
    "ci",
    max_examples=4,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile(
    "thorough",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
STEPS = 3

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
# about two units in the last place, relative to the leaf's largest entry
RTOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 1e-2}


# ------------------------------------------------------------------ random trees


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    zero_init: bool  # Flax initialises biases (and some kernels) to exactly zero
    sparse_rows: bool  # some rows (axis 0) get an all-zero gradient on every step


MODULES = ("layer_0", "layer_1", "mlp", "Dense_0", "LayerNorm_0", "embed", "head")
# allowed ranks per leaf name (scalars everywhere: a () leaf is legal in any tree)
RANKS = {"kernel": (0, 1, 2, 3), "bias": (0, 1), "scale": (0, 1), "embedding": (0, 2)}
DIMS = st.sampled_from((0, 1, 2, 3, 5))


@st.composite
def leaves(draw, dtype=None):
    name = draw(st.sampled_from(sorted(RANKS)))
    rank = draw(st.sampled_from(RANKS[name]))
    shape = tuple(draw(st.lists(DIMS, min_size=rank, max_size=rank)))
    modules = tuple(draw(st.lists(st.sampled_from(MODULES), min_size=0, max_size=2)))
    return Leaf(
        path=("params", *modules, name),
        shape=shape,
        dtype=dtype or draw(st.sampled_from(sorted(DTYPES))),
        zero_init=draw(st.booleans()) if name in ("kernel", "bias") else False,
        sparse_rows=draw(st.booleans()),
    )


@st.composite
def tree_specs(draw):
    """1-4 leaves; one dtype for the tree or a mixed-precision tree."""
    dtype = draw(st.sampled_from([*sorted(DTYPES), None]))
    specs = draw(st.lists(leaves(dtype), min_size=1, max_size=4, unique_by=lambda s: s.path))
    # a path may not be both a leaf and a module: leaf names are never module names
    return tuple(specs)


def _insert(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def make_params(specs, seed: int):
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for s in specs:
        if s.zero_init:
            value = np.zeros(s.shape)
        elif s.path[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(s.shape)
        else:
            value = 0.5 * rng.standard_normal(s.shape)
        _insert(tree, s.path, jnp.asarray(value, DTYPES[s.dtype]))
    return tree


def make_grads(specs, seed: int, scale: float, steps: int = STEPS):
    """Finite gradients: per entry one sign (or exactly 0) kept over all steps and a
    magnitude in [0.5, 2]·scale (see the module docstring for why)."""
    rng = np.random.default_rng(seed)
    signs = []
    for s in specs:
        sign = rng.choice([-1.0, 1.0], size=s.shape) * (rng.random(s.shape) > 0.1)
        if s.sparse_rows and len(s.shape) >= 1:
            rows = rng.random(s.shape[0]) < 0.5
            sign[rows] = 0.0
        signs.append(sign)
    seq = []
    for _ in range(steps):
        tree: dict = {}
        for s, sign in zip(specs, signs, strict=True):
            mag = rng.uniform(0.5, 2.0, size=s.shape) * scale
            _insert(tree, s.path, jnp.asarray(sign * mag, DTYPES[s.dtype]))
        seq.append(tree)
    return seq


# ------------------------------------------------------------ hyperparameters


def floats(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


LR = st.one_of(st.just(0.0), floats(1e-4, 1e-1))
UNIT = floats(0.0, 1.0)
BETA = floats(0.0, 0.999)
WD = st.one_of(st.just(0.0), floats(1e-4, 0.1))
MU_DTYPE = st.sampled_from([None, jnp.float32, jnp.bfloat16])

# inner optimizers for the wrappers: one of each family (Adam-like from optax and ours,
# sign, factored, SGD). optax.adamw computes and keeps its moments in the params' dtype:
# in float16 its eps=1e-8 rounds to 0 (a zero gradient entry gives 0/0) and the second
# moment of gradients below ~1e-2 underflows, so its step is decided by rounding (jit
# keeps float32 intermediates, eager rounds to float16). Pure float16 is outside what it
# supports, so it is not given float16 leaves (see ``excluded``); AdaXW computes in
# float32 and is.
INNER = {
    "optax.adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "adaxw": lambda: adaxw(1e-2, weight_decay=1e-2),
    "tiger": lambda: tiger(1e-2),
    "lion": lambda: lion(1e-3),
    "adafactor": lambda: adafactor(min_dim_size_to_factor=2, momentum=0.9),
    "sgdm": lambda: sgdm(1e-2, momentum=0.9),
}
INNERS = st.sampled_from(sorted(INNER))
DIRECTIONS = {
    "scale_by_adam": lambda: optax.scale_by_adam(eps=1e-6),
    "scale_by_tiger": lambda: scale_by_tiger(0.9),
    "scale_by_adax": lambda: scale_by_adax(),
    "optax.scale_by_lion": lambda: optax.scale_by_lion(),
}


def kw(**strategies):
    return st.fixed_dictionaries(strategies)


def _layer_adapted(direction, **kwargs):
    return layer_adapted(DIRECTIONS[direction](), **kwargs)


def _with_inner(wrapper):
    return lambda inner, **kwargs: wrapper(INNER[inner](), **kwargs)


# name -> (strategy of keyword arguments, builder(**kwargs) -> GradientTransformation)
FACTORIES: dict[str, tuple[st.SearchStrategy, Any]] = {
    "tiger": (
        kw(
            learning_rate=LR,
            beta=BETA,
            weight_decay=WD,
            accumulation_steps=st.integers(1, 3),
            param_scaling=st.sampled_from(["tiger", None]),
            min_rms=st.sampled_from([0.0, 1e-3]),
            guard_nan=st.booleans(),
            shrink_ratio=floats(0.5, 1.0),
            catch_inf=st.booleans(),
            mu_dtype=MU_DTYPE,
        ),
        tiger,
    ),
    "lion": (
        kw(
            learning_rate=LR,
            b1=UNIT,
            b2=UNIT,
            weight_decay=WD,
            param_scaling=st.sampled_from([None, "tiger"]),
            mu_dtype=MU_DTYPE,
        ),
        lion,
    ),
    "adafactor": (
        kw(
            learning_rate=st.one_of(st.none(), LR),
            decay_rate=st.one_of(st.none(), floats(0.5, 0.999)),
            momentum=st.one_of(st.none(), BETA),
            weight_decay=WD,
            min_dim_size_to_factor=st.sampled_from([None, 1, 2]),
            factored=st.booleans(),
            clipping_threshold=st.one_of(st.none(), floats(0.1, 2.0)),
            multiply_by_parameter_scale=st.booleans(),
            eps2=st.sampled_from([0.0, 1e-3]),
            mu_dtype=MU_DTYPE,
        ),
        adafactor,
    ),
    "adax": (
        kw(
            learning_rate=LR,
            b1=BETA,
            b2=floats(1e-5, 0.1),
            eps=floats(1e-8, 1e-3),
            mu_dtype=MU_DTYPE,
        ),
        adax,
    ),
    "adaxw": (
        kw(
            learning_rate=LR,
            b1=BETA,
            b2=floats(1e-5, 0.1),
            eps=floats(1e-8, 1e-3),
            weight_decay=WD,
        ),
        adaxw,
    ),
    "amos": (
        kw(
            learning_rate=st.one_of(st.just(0.0), floats(1e-3, 0.3)),
            beta=floats(0.5, 0.9999),
            momentum=st.one_of(st.none(), BETA),
            clip_value=st.one_of(st.none(), floats(0.1, 10)),
            c=floats(0.0, 1.0),
            d=floats(0.0, 1.0),
            extra_l2=st.sampled_from([0.0, 1e-3]),
        ),
        amos,
    ),
    "sgdm": (
        kw(
            learning_rate=LR,
            momentum=BETA,
            accumulation_steps=st.integers(1, 3),
            nesterov=st.booleans(),
            mu_dtype=MU_DTYPE,
        ),
        sgdm,
    ),
    "accumulate_gradients": (
        kw(
            inner=INNERS,
            accumulation_steps=st.integers(1, 3),
            skip_nonfinite=st.booleans(),
            acc_dtype=st.sampled_from([None, jnp.float32]),
        ),
        _with_inner(accumulate_gradients),
    ),
    "nan_guard": (
        kw(
            inner=INNERS,
            shrink_ratio=floats(0.5, 1.0),
            catch_inf=st.booleans(),
            centre=st.sampled_from([None, 0.0, {"scale": 1.0}]),
        ),
        _with_inner(nan_guard),
    ),
    "param_ema": (
        kw(
            inner=INNERS,
            decay=floats(0.0, 0.999),
            debias=st.booleans(),
            ema_dtype=st.sampled_from([None, jnp.float32]),
        ),
        lambda inner, **k: optax.chain(INNER[inner](), param_ema(**k)),
    ),
    "scale_by_path": (
        kw(
            inner=INNERS,
            rules=st.dictionaries(
                st.sampled_from(["kernel", "bias", "embedding", "layer_0", "^params"]),
                floats(0.0, 4.0),
                max_size=3,
            ),
        ),
        lambda inner, rules: optax.chain(INNER[inner](), scale_by_path(rules)),
    ),
    "lookahead": (
        kw(
            inner=INNERS,
            sync_period=st.integers(1, 3),
            slow_step_size=UNIT,
        ),
        _with_inner(lookahead),
    ),
    "lazy": (
        kw(
            inner=INNERS,
            include=st.sampled_from([EMBEDDING, None, "kernel"]),
        ),
        _with_inner(lazy),
    ),
    "layer_adapted": (
        kw(
            direction=st.sampled_from(sorted(DIRECTIONS)),
            learning_rate=LR,
            weight_decay=WD,
        ),
        _layer_adapted,
    ),
}


# ------------------------------------------------------------------- running


_JITTED: dict[str, Any] = {}


def _step(tx, traces=None):
    def step(params, state, grads):
        if traces is not None:
            traces.append(1)  # runs once per trace, never per call
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def _jitted_step(key: str, tx):
    """One jitted step per (factory, hyperparameters) and the list its traces append to:
    re-running an example (hypothesis shrinking, the eager/jit pair) reuses its
    compilation."""
    if key not in _JITTED:
        traces: list[int] = []
        _JITTED[key] = jax.jit(_step(tx, traces)), traces
    return _JITTED[key]


def run(tx, params, grads_seq, step):
    state = tx.init(params)
    states, updates = [state], []
    for g in grads_seq:
        params, state, u = step(params, state, g)
        states.append(state)
        updates.append(u)
    return params, states, updates


def signature(tree):
    return jax.tree.structure(tree), [
        (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)
    ]


def _leaves_with_paths(tree):
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_finite(tree, what):
    for path, x in _leaves_with_paths(tree):
        x = np.asarray(x, np.float64)
        assert np.all(np.isfinite(x)), f"{what}: non-finite values at {path!r}: {x}"


def assert_close(actual, expected, what):
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, a), (_, e) in zip(
        _leaves_with_paths(actual), _leaves_with_paths(expected), strict=True
    ):
        dtype = jnp.result_type(e)
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if not jnp.issubdtype(dtype, jnp.floating):
            np.testing.assert_array_equal(a64, e64, err_msg=f"{what} at {path!r}")
            continue
        rtol = RTOL[jnp.dtype(dtype)]
        scale = float(np.max(np.abs(e64))) if e64.size else 0.0
        np.testing.assert_allclose(
            a64, e64, rtol=rtol, atol=rtol * scale, err_msg=f"{what} at {path!r} ({dtype})"
        )


def check_properties(name, kwargs, specs, seed, scale):
    strategy, build = FACTORIES[name]
    tx = build(**kwargs)
    params = make_params(specs, seed)
    grads_seq = make_grads(specs, seed + 1, scale)

    jitted, traces = _jitted_step(f"{name}:{kwargs!r}", tx)
    traced_before = len(traces)
    p_jit, states, updates = run(tx, params, grads_seq, jitted)

    # state: same structure, shapes and dtypes at every step, and as abstract init
    abstract = jax.eval_shape(
        tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    )
    for i, s in enumerate(states):
        assert signature(s) == signature(abstract), f"state signature changed at step {i}"
    assert len(traces) - traced_before <= 1, "the jitted step recompiled"

    # finite updates and state; dtypes preserved
    for i, (u, s, g) in enumerate(zip(updates, states[1:], grads_seq, strict=True)):
        assert_finite(u, f"updates of step {i}")
        assert_finite(s, f"state after step {i}")
        assert signature(u) == signature(g), f"updates of step {i} changed dtype or shape"
    assert signature(p_jit) == signature(params), "params changed dtype or shape"

    # jit equals eager
    with jax.disable_jit():
        p_eager, e_states, e_updates = run(tx, params, grads_seq, _step(tx))
    for i in range(STEPS):
        assert_close(updates[i], e_updates[i], f"updates of step {i}, jit vs eager")
        assert_close(states[i + 1], e_states[i + 1], f"state after step {i}, jit vs eager")
    assert_close(p_jit, p_eager, "params, jit vs eager")


# ------------------------------------------------------------ left-out inputs

# Left out of the random cases: optax.adamw on float16 leaves (outside what optax
# supports, see INNER). Bugs these properties found are reproduced minimally at the end.


def excluded(name, kwargs, specs) -> str | None:
    if kwargs.get("inner") == "optax.adamw" and any(s.dtype == "f16" for s in specs):
        return "optax.adamw on float16"
    return None


# --------------------------------------------------------------------- tests


def _given_cases(name):
    strategy, _ = FACTORIES[name]
    return given(
        kwargs=strategy,
        specs=tree_specs(),
        seed=st.integers(0, 2**16),
        scale=st.sampled_from([1.0, 0.01, 10.0]),
    )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_properties(name):
    @settings(settings.get_profile(PROFILE))
    @_given_cases(name)
    def prop(kwargs, specs, seed, scale):
        assume(excluded(name, kwargs, specs) is None)
        check_properties(name, kwargs, specs, seed, scale)

    prop()


@settings(settings.get_profile(PROFILE))
@given(
    b1=UNIT,
    b2=st.one_of(st.just(0.0), floats(1e-3, 1.0)),
    mu_dtype=MU_DTYPE,
    specs=tree_specs(),
    seed=st.integers(0, 2**16),
)
def test_lion_direction_is_the_sign_of_sign_consistent_gradients(b1, b2, mu_dtype, specs, seed):
    # every momentum term has the sign of g, so sign(b1·m + (1-b1)·g) = sign(g) exactly:
    # an oracle independent of how the direction is computed
    # (c = 0 where b1 = 1 and m = 0: on the first step, or for ever when b2 = 1)
    tx = scale_by_lion(b1, b2, mu_dtype=mu_dtype)
    params = make_params(specs, seed)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for i, g in enumerate(make_grads(specs, seed + 1, 1.0)):
        u, state = update(g, state)
        for (path, x), (_, gx) in zip(_leaves_with_paths(u), _leaves_with_paths(g), strict=True):
            np.testing.assert_array_equal(
                np.asarray(x, np.float64),
                np.sign(np.asarray(gx, np.float64)) * (b1 < 1 or (i > 0 and b2 < 1)),
                err_msg=f"step {i} at {path}",
            )


# ------------------- minimal reproductions of bugs these properties found (now fixed)


@pytest.mark.parametrize(
    "make", [lambda: tiger(1e-2), lambda: lion(1e-3, param_scaling="tiger")], ids=["tiger", "lion"]
)
def test_regression_tiger_scales_on_scalar_embedding(make):
    tx = make()
    params = {"embed": {"embedding": jnp.ones(())}}
    updates, _ = tx.update(params, tx.init(params), params)
    assert np.isfinite(float(updates["embed"]["embedding"]))


@pytest.mark.parametrize(
    "leaf",
    [{"kernel": jnp.zeros((0, 3))}, {"embedding": jnp.zeros((3, 0))}],
    ids=["kernel", "embedding"],
)
def test_regression_amos_zero_size_matrix(leaf):
    tx = amos(0.1)
    params = {"Dense_0": leaf}
    _, state = tx.update(params, tx.init(params), params)
    assert_finite(state, "amos state")


def test_regression_amos_zero_size_vector_state():
    tx = amos(0.1)
    params = {"Dense_0": {"bias": jnp.zeros((0,))}}
    _, state = tx.update(params, tx.init(params), params)
    assert_finite(state, "amos state")


@pytest.mark.parametrize("b1, b2", [(0.9, 1e-8), (1.0, 1e-3)])
def test_regression_lion_small_b2(b1, b2):
    # b1 = 1: c = m = 0 on the first step, but the two terms of size 1/b2 leave a
    # rounding residual whose sign becomes the update (random signs under jit)
    tx = scale_by_lion(b1=b1, b2=b2)
    g = jnp.linspace(-3.0, 3.0, 13)
    state = tx.init(g)
    update = jax.jit(tx.update)  # under jit the residual of the b1 = 1 case is non-zero
    for i in range(2):
        u, state = update(g, state)
        expected = np.sign(np.asarray(g)) * (b1 < 1 or i > 0)
        np.testing.assert_array_equal(np.asarray(u), expected)


def test_regression_layer_adapted_float16_norm_underflow():
    tx = layer_adapted(optax.identity(), learning_rate=0.1, weight_decay=1e-4)
    params = {"w": jnp.ones(1, jnp.float16)}
    grads = {"w": jnp.zeros(1, jnp.float16)}  # u = λθ: ratio ‖θ‖/‖λθ‖ = 1e4
    with jax.disable_jit():
        updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float64), [-0.1], rtol=1e-2)


def test_regression_amos_debias_cancellation():
    kwargs = dict(learning_rate=0.25, beta=0.9999, momentum=None, clip_value=None)
    kwargs.update(c=0.0, d=0.0, extra_l2=0.0)
    specs = (Leaf(("params", "embedding"), (), "bf16", False, False),)
    check_properties("amos", kwargs, specs, 0, 1.0)

"""The one contract every optimizer alias of optax-ext keeps (see optax_ext/__init__.py).

Held once here for all of them, in the spirit of optax's ``contrib/_common_test.py``;
the float64 references stay in each optimizer's own test file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, flax_like_params, random_grads_like, tiny_params

import optax_ext as ox
from optax_ext._common import NORM_AND_BIAS

#: name -> factory(learning_rate, **kwargs); every alias of the package.
ALIASES = {
    "tiger": ox.tiger,
    "lion": ox.lion,
    "adafactor": ox.adafactor,
    "adax": ox.adax,
    "adaxw": ox.adaxw,
    "amos": ox.amos,
    "sgdm": ox.sgdm,
    "muon": ox.muon,
}

#: aliases that accumulate micro-batches themselves (``accumulation_steps=k``)
ACCUMULATING = {"tiger", "sgdm"}
#: aliases with a weight decay that may follow a schedule
DECAYING = {"tiger", "lion", "adafactor", "adaxw", "muon"}

#: (alias, optax sibling, positional arguments valid for the sibling)
OPTAX_ORDER = [
    ("lion", optax.lion, (1e-3, 0.9, 0.99, None, 0.1)),
    ("sgdm", optax.sgd, (1e-2, 0.9, False, None)),
    ("adafactor", optax.adafactor, (1e-3, 128, 0.8)),
    ("adaxw", optax.adamw, (1e-3, 0.9, 1e-4, 1e-6)),
    ("muon", optax.contrib.muon, (1e-3, (3.4445, -4.775, 2.0315), 5, 0.9, 1e-8, 0.1)),
]

#: every alias with an optax sibling: its positional parameters are a prefix of the
#: sibling's (one name per concept: optax's, except where optax itself has two)
SIBLINGS = {
    "lion": optax.lion,
    "sgdm": optax.sgd,
    "adafactor": optax.adafactor,
    "adaxw": optax.adamw,
    "adax": optax.adam,
    "muon": optax.contrib.muon,
}
SYNONYMS = {"accumulator_dtype": "mu_dtype"}  # optax.sgd's name for what adam calls mu_dtype

NAMES = sorted(ALIASES)


def params(dtype=jnp.float32):
    return tiny_params(0, dtype=dtype)["params"]


def params64():
    return params(jnp.float64)


def run(tx, steps=3, extra=None):
    """``steps`` updates in float64 from the same params and gradients."""
    p = params64()
    state = tx.init(p)
    for seed in range(steps):
        u, state = tx.update(random_grads_like(p, seed), state, p, **(extra or {}))
        p = optax.apply_updates(p, u)
    return p, state


# ----------------------------------------------------------------- the basics


@pytest.mark.parametrize("name", NAMES)
def test_returns_extra_args_transform_with_an_int32_count(name):
    tx = ALIASES[name](1e-2)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    has_count = lambda x: hasattr(x, "_fields") and "count" in x._fields  # a NamedTuple
    states = jax.tree.leaves(tx.init(params()), is_leaf=has_count)
    counts = [x.count for x in states if has_count(x)]
    assert counts and all(jnp.asarray(c).dtype == jnp.int32 for c in counts)


# ------------------------------------------------------------ positional order


@pytest.mark.parametrize("name, sibling, args", OPTAX_ORDER, ids=[o[0] for o in OPTAX_ORDER])
def test_optax_siblings_positional_order_is_accepted(name, sibling, args):
    ours, theirs = ALIASES[name](*args), sibling(*args)
    p = params()
    s_ours, s_theirs = ours.init(p), theirs.init(p)
    assert jax.tree.structure(p) == jax.tree.structure(ours.update(p, s_ours, p)[0])
    del s_theirs


def _positional(fn):
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


@pytest.mark.parametrize("name", sorted(SIBLINGS))
def test_positional_parameters_are_the_optax_siblings_at_the_same_positions(name):
    ours = _positional(ALIASES[name])
    theirs = [SYNONYMS.get(n, n) for n in _positional(SIBLINGS[name])]
    assert ours == theirs[: len(ours)], (ours, theirs)


DIRECTION_SIBLINGS = [
    (ox.scale_by_lion, optax.scale_by_lion),
    (ox.scale_by_muon, optax.contrib.scale_by_muon),
]


@pytest.mark.parametrize(
    "ours, theirs", DIRECTION_SIBLINGS, ids=[o.__name__ for o, _ in DIRECTION_SIBLINGS]
)
def test_directions_take_their_optax_siblings_positions(ours, theirs):
    mine = _positional(ours)
    assert mine == _positional(theirs)[: len(mine)]


@pytest.mark.parametrize("name", NAMES)
def test_everything_after_the_moment_coefficients_is_keyword_only(name):
    import inspect

    sig = inspect.signature(ALIASES[name])
    positional = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional[0] == "learning_rate"
    allowed = {
        "learning_rate",
        "min_dim_size_to_factor",
        "b1",
        "b2",
        "beta",
        "momentum",
        "decay_rate",
        "eps",
        "mu_dtype",
        "nu_dtype",
        "weight_decay",
        "mask",
        "nesterov",
        "ns_coeffs",
        "ns_steps",
    }  # optax siblings' positional names
    assert set(positional) <= allowed, positional


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", sorted(DECAYING))
@pytest.mark.usefixtures("float64")
def test_weight_decay_accepts_a_schedule_indexed_by_update(name):
    sched = lambda count: 0.1 * (count < 2)  # 0.1 for the first two updates, then 0
    # the alias reads the schedule by update exactly as inject_hyperparams does
    got, _ = run(ALIASES[name](1e-2, weight_decay=sched), steps=3)
    ref_tx = optax.inject_hyperparams(ALIASES[name], static_args=())(
        learning_rate=1e-2, weight_decay=sched
    )
    want, _ = run(ref_tx, steps=3)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.usefixtures("float64")
def test_learning_rate_schedule_counts_updates(name):
    sched = optax.linear_schedule(1e-2, 0.0, 4)
    got, _ = run(ALIASES[name](sched), steps=3)
    want, _ = run(optax.inject_hyperparams(ALIASES[name])(learning_rate=sched), steps=3)
    assert_trees_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.usefixtures("float64")
def test_inject_hyperparams_schedule_counts_updates_not_micro_steps(name, k):
    sched = optax.linear_schedule(1e-2, 1e-3, 6)
    p = params64()
    if name in ACCUMULATING:
        injected = ox.inject_hyperparams(ALIASES[name], static_args=("accumulation_steps",))(
            learning_rate=sched, accumulation_steps=k
        )
        direct = ALIASES[name](sched, accumulation_steps=k)
    else:
        injected = ox.accumulate_gradients(
            ox.inject_hyperparams(ALIASES[name])(learning_rate=sched), k
        )
        direct = ox.accumulate_gradients(ALIASES[name](sched), k)
    s_inj, s_dir, p_inj, p_dir = injected.init(p), direct.init(p), p, p
    for seed in range(3 * k):
        g = random_grads_like(p, seed)
        u, s_inj = injected.update(g, s_inj, p_inj)
        p_inj = optax.apply_updates(p_inj, u)
        u, s_dir = direct.update(g, s_dir, p_dir)
        p_dir = optax.apply_updates(p_dir, u)
    assert_trees_close(p_inj, p_dir, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_a_schedule_where_none_can_go_is_rejected_at_construction(name):
    import inspect

    sig = inspect.signature(ALIASES[name])
    numeric = [
        p.name
        for p in sig.parameters.values()
        if isinstance(p.default, float) and p.name not in ("learning_rate", "weight_decay")
    ]
    assert numeric, sig
    for arg in numeric:
        with pytest.raises(ValueError, match=f"{arg} cannot be a schedule"):
            ALIASES[name](1e-2, **{arg: lambda count: 0.5})


# -------------------------------------------------------------------- masks


@pytest.mark.parametrize("name", sorted(DECAYING - {"muon"}))  # muon decays by its routing
def test_mask_none_is_the_one_default_rule(name):
    """With zero gradients the step is the decay alone: None spares biases and norm scales
    (``NORM_AND_BIAS``, the rule of every alias), True decays every leaf."""
    p = params()
    rule = ox.path_mask(exclude=NORM_AND_BIAS)(p)
    for mask, expected in ((None, rule), (True, jax.tree.map(lambda _: True, rule))):
        tx = ALIASES[name](1e-2, weight_decay=0.5, mask=mask)
        u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
        moved = jax.tree.map(lambda x: bool(jnp.any(x != 0)), u)
        nonzero = jax.tree.map(lambda q: bool(jnp.any(q != 0)), p)  # zero leaves cannot move
        want = jax.tree.map(lambda e, nz: e and nz, expected, nonzero)
        assert moved == want, (name, mask)


# --------------------------------------------------------------- bad input


BAD_VALUES = [
    ("learning_rate", float("inf"), "learning_rate must be finite"),
    ("learning_rate", "1e-3", "learning_rate must be a number or a schedule"),
    ("learning_rate", 1e-3 + 0j, "learning_rate must be a real number"),
    ("learning_rate", [1e-3], None),
    ("mu_dtype", jnp.int32, "mu_dtype must be a floating dtype"),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg, value, message", BAD_VALUES, ids=lambda v: repr(v)[:20])
def test_bad_values_fail_at_construction_naming_the_argument(name, arg, value, message):
    with pytest.raises(ValueError, match=message or arg):
        ALIASES[name](**({"learning_rate": 1e-2} | {arg: value}))


@pytest.mark.parametrize("name", sorted(DECAYING))
def test_infinite_weight_decay_fails_at_construction(name):
    with pytest.raises(ValueError, match="weight_decay must be finite"):
        ALIASES[name](1e-2, weight_decay=float("inf"))


@pytest.mark.parametrize("name", NAMES)
def test_a_gradient_of_another_shape_is_a_clear_error(name):
    tx, p = ALIASES[name](1e-2), params()
    g = jax.tree.map(jnp.zeros_like, p)
    g["LayerNorm_0"]["scale"] = jnp.zeros((4, *p["LayerNorm_0"]["scale"].shape))
    with pytest.raises(ValueError, match=r"gradient of 'LayerNorm_0/scale' has shape \(4, 8\)"):
        tx.update(g, tx.init(p), p)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_integer_or_complex_params_are_a_clear_error(name, dtype):
    p = params()
    p["LayerNorm_0"]["scale"] = p["LayerNorm_0"]["scale"].astype(dtype)
    with pytest.raises(ValueError, match=f"'LayerNorm_0/scale' has dtype {jnp.dtype(dtype)}"):
        ALIASES[name](1e-2).init(p)


# ------------------------------------------------------------------- wrappers

WRAPPERS = {
    "nan_guard": lambda inner: ox.nan_guard(inner),
    "accumulate_gradients": lambda inner: ox.accumulate_gradients(inner, 2),
    "lookahead": lambda inner: ox.lookahead(inner),
    "lazy": lambda inner: ox.lazy(inner),
    "layer_adapted": lambda inner: ox.layer_adapted(inner, 1e-3),
    "pure_bf16": lambda inner: ox.pure_bf16(inner),
    "quantize_state": lambda inner: ox.quantize_state(inner),
    "qk_clip": lambda inner: ox.qk_clip(inner),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_wrapper_given_an_optimizer_factory_says_to_call_it(wrapper):
    with pytest.raises(
        TypeError,
        match=r"must be an optax transform, got the function adam: "
        r"call it first",
    ):
        WRAPPERS[wrapper](optax.adam)
    assert isinstance(WRAPPERS[wrapper](optax.adam(1e-3)), optax.GradientTransformation)


def _state_classes(state):
    out = []
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        out.append(type(state))
    if isinstance(state, tuple | list):
        for s in state:
            out += _state_classes(s)
    elif isinstance(state, dict):
        for s in state.values():
            out += _state_classes(s)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_the_direction_state_is_named_scale_by_name_state(name):
    state = jax.eval_shape(ALIASES[name](1e-3).init, params())
    classes = _state_classes(state)
    want = "ScaleBy" + name.rstrip("w").capitalize() + "State"  # adaxw: AdaX's state
    assert want.lower() in {c.__name__.lower() for c in classes}, (name, classes)
    ours = [c.__name__ for c in classes if c.__module__.startswith("optax_ext.optimizers")]
    assert all(n.startswith("ScaleBy") and n.endswith("State") for n in ours), ours


@pytest.mark.parametrize("centre", [float("nan"), {r"scale$": float("inf")}])
def test_a_non_finite_shrink_centre_is_rejected(centre):
    with pytest.raises(ValueError, match="centre"):
        ox.nan_guard(optax.adam(1e-3), centre=centre)


# ------------------------------------------- a bf16 momentum, written stochastically

#: what each alias needs to keep a momentum buffer at all
WITH_MOMENTUM = {"adafactor": {"momentum": 0.9}, "amos": {"momentum": 0.9}}


def _momenta(state):
    """The bf16 leaves of a state (the momentum buffers asked for with mu_dtype)."""
    return [x for x in jax.tree.leaves(state) if x.dtype == jnp.bfloat16]


def six_leaves():
    """An embedding, a hidden kernel and its bias, a norm (scale, bias), the head kernel:
    every route of every optimizer's momentum in few leaves (stochastic rounding draws
    per leaf, and each draw adds compile time)."""
    full = flax_like_params(0)["params"]
    layer = full["layer_0"]
    return {
        "embed": full["embed"],
        "layer_0": {
            "mlp": {"Dense_0": layer["mlp"]["Dense_0"]},
            "LayerNorm_0": layer["LayerNorm_0"],
        },
        "head": {"kernel": full["head"]["kernel"]},
    }


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_writes_a_bf16_momentum_by_cast_or_stochastic_rounding(name):
    kwargs = dict(WITH_MOMENTUM.get(name, {}), mu_dtype=jnp.bfloat16)
    p = six_leaves()

    def momenta(**extra):
        tx = ALIASES[name](1e-3, **kwargs, **extra)
        _, state = jax.jit(tx.update)(random_grads_like(p, 0), tx.init(p), p)
        return _momenta(state)

    nearest, sr3, sr3_again, sr4 = (
        momenta(),
        momenta(state_rounding="stochastic", rounding_seed=3),
        momenta(state_rounding="stochastic", rounding_seed=3),
        momenta(state_rounding="stochastic", rounding_seed=4),
    )
    assert nearest and len(nearest) == len(sr3), "no bf16 momentum in the state"
    for a, b in zip(sr3, sr3_again, strict=True):
        np.testing.assert_array_equal(a, b)  # reproducible for a seed
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(sr3, sr4, strict=True))
    # after one step, stochastic rounding picks one of the two bf16 neighbours of the
    # float32 momentum, so it is within one bf16 ulp of round-to-nearest everywhere
    for a, b in zip(nearest, sr3, strict=True):
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        ulp = np.abs(a32) * 2.0**-7 + 1e-30
        assert np.all(np.abs(a32 - b32) <= ulp * 1.0001)
    with pytest.raises(ValueError, match="state_rounding"):
        ALIASES[name](1e-3, state_rounding="up")


@pytest.mark.parametrize("name", sorted(set(NAMES) - ACCUMULATING))
def test_a_cycle_length_given_to_an_alias_that_does_not_accumulate_raises(name):
    """``set_accumulation_steps`` reaching an optimizer that updates on every call would
    be ignored (params moving on every micro-step): it raises, naming the wrapper to use."""
    p = params()
    tx = ALIASES[name](1e-3)
    with pytest.raises(ValueError, match=rf"set_accumulation_steps was passed to ox\.{name}"):
        tx.update(random_grads_like(p, 0), tx.init(p), p, set_accumulation_steps=4)
    wrapped = ox.accumulate_gradients(ALIASES[name](1e-3), 2)
    u, _ = wrapped.update(random_grads_like(p, 0), wrapped.init(p), p, set_accumulation_steps=2)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))  # first micro-step

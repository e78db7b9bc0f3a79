"""The harness itself: helpers behave (device paths agree for a plain optax optimizer: the
row optax.adamw of tests/test_device_paths.py)."""

import jax.numpy as jnp
import optax
import pytest
from helpers import (
    flax_like_params,
    random_tree,
    run_path,
)

from optax_ext import _common as c


def test_run_path_rejects_unknown_path():
    with pytest.raises(ValueError, match="unknown device path"):
        run_path(optax.sgd(1.0), {"a": jnp.ones(2)}, [], "gpu")


def test_random_tree_is_reproducible_and_flax_named():
    a, b = random_tree(3), random_tree(3)
    assert c.tree_paths(a) == c.tree_paths(b)
    assert all(
        p.split("/")[-1] in {"kernel", "bias", "scale", "embedding"}
        for p in jax_leaves(c.tree_paths(a))
    )


def jax_leaves(t):
    import jax

    return jax.tree.leaves(t)


def test_path_rules():
    params = flax_like_params(0, layers=2)
    labels = c.path_labels(params, [(c.NORM_AND_BIAS, "nd"), (c.EMBEDDING, "emb")], "k")
    assert labels["params"]["embed"]["embedding"] == "emb"
    assert labels["params"]["final_norm"]["scale"] == "nd"
    assert labels["params"]["layer_0"]["attention"]["query"]["bias"] == "nd"
    assert labels["params"]["head"]["kernel"] == "k"
    mult = c.path_multipliers(params, {"layer_0": 0.5, "kernel": 3.0})
    assert mult["params"]["layer_0"]["mlp"]["Dense_0"]["kernel"] == 1.5
    assert mult["params"]["layer_1"]["mlp"]["Dense_0"]["kernel"] == 3.0
    assert mult["params"]["final_norm"]["scale"] == 1.0
    mask = c.path_mask(include="layer_", exclude=c.NORM_AND_BIAS)(params)
    assert mask["params"]["layer_1"]["mlp"]["Dense_0"]["kernel"] is True
    assert mask["params"]["layer_1"]["mlp"]["Dense_0"]["bias"] is False
    assert mask["params"]["head"]["kernel"] is False


def test_path_rules_bad_input():
    with pytest.raises(ValueError, match="invalid regular expression"):
        c.path_labels({"a": 1.0}, {"(": 1})
    with pytest.raises(TypeError, match="path rules"):
        c.path_labels({"a": 1.0}, ["kernel"])
    with pytest.raises(ValueError, match=r"invalid regular expression '\(' in include"):
        c.path_mask(include="(")
    with pytest.raises(ValueError, match=r"invalid regular expression '\[' in exclude"):
        c.path_mask(exclude="[")


def test_wrappers_name_a_bad_regular_expression_at_construction():
    import optax

    from optax_ext.wrappers.lazy import lazy
    from optax_ext.wrappers.param_rules import decay_weights

    with pytest.raises(ValueError, match=r"invalid regular expression '\(' in include"):
        lazy(optax.sgd(0.1), include="(")
    with pytest.raises(ValueError, match=r"invalid regular expression '\)' in exclude"):
        decay_weights(1e-2, exclude=")")


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan")])
def test_check_range_rejects(value):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\), got"):
        c.check_range("beta", value, 0, 1, high_open=True)


def test_check_range_passes_traced_and_schedules():
    import jax

    c.check_range("lr", lambda t: -1.0, 0)
    jax.jit(lambda x: c.check_range("lr", x, 0))(-1.0)
    assert c.check_range("lr", 0.5, 0) == 0.5


@pytest.mark.parametrize(
    "value, message",
    [
        (float("inf"), r"learning_rate must be finite and in \[0, inf\), got inf"),
        (
            "1e-3",
            r"learning_rate must be a number or a schedule, got the str '1e-3'; "
            r"write learning_rate=0.001 instead",
        ),
        (1e-3 + 1j, r"learning_rate must be a real number or a schedule, got \(0.001\+1j\)"),
        ({"lr": 1e-3}, r"learning_rate must be a real number or a schedule, got \{'lr'"),
        ([1e-3, float("nan")], r"learning_rate must be a real scalar, got \[0.001, nan\] of shape"),
    ],
)
def test_check_range_rejects_non_numbers_and_infinity(value, message):
    with pytest.raises(ValueError, match=message):
        c.check_range("learning_rate", value, 0)


def test_check_range_rejects_a_schedule_where_none_can_go():
    with pytest.raises(ValueError, match=r"beta cannot be a schedule .*inject_hyperparams"):
        c.check_range("beta", lambda count: 0.9, 0, 1, schedule=False)


def test_check_range_keeps_a_closed_infinite_end():
    assert c.check_range("clip", float("inf"), 0, float("inf")) == float("inf")


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", bool, jnp.complex64])
def test_canonical_dtype_rejects_non_floating_state(dtype):
    with pytest.raises(ValueError, match="acc_dtype must be a floating dtype"):
        c.canonical_dtype(dtype, "acc_dtype")


def test_canonical_dtype_accepts_floats():
    assert c.canonical_dtype(None) is None
    assert c.canonical_dtype("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="mu_dtype must be a floating dtype such as"):
        c.canonical_dtype("float33")


def test_check_int():
    with pytest.raises(ValueError, match="accumulation_steps must be an int >= 1, got 0"):
        c.check_int("accumulation_steps", 0)
    with pytest.raises(TypeError, match="must be an int"):
        c.check_int("accumulation_steps", 2.0)


def test_tree_bytes_counts_arrays_not_scalars():
    import jax

    tree = {
        "w": jnp.zeros((3, 4)),
        "count": jnp.zeros([], jnp.int32),
        "h": jnp.zeros(5, jnp.bfloat16),
    }
    assert c.tree_bytes(tree) == 48 + 10
    abstract = jax.eval_shape(lambda: tree)
    assert c.tree_bytes(abstract) == 58


def test_require_params_names_the_transform_and_the_fix():
    with pytest.raises(
        ValueError,
        match=r"lookahead needs the params \(it moves them\): call "
        r"tx.update\(grads, state, params\)",
    ):
        c.require_params(None, "lookahead", "it moves them")
    assert c.require_params({"a": 1}, "x", "y") == {"a": 1}


def test_check_float_params_names_the_leaf():
    import jax

    c.check_float_params({"w": jnp.zeros(3), "b": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}, "t")
    with pytest.raises(ValueError, match=r"tiger: the parameter 'layer/steps' has dtype int32"):
        c.check_float_params({"layer": {"steps": jnp.zeros(3, jnp.int32)}}, "tiger")
    with pytest.raises(ValueError, match="has dtype complex64"):
        c.check_float_params({"z": jnp.zeros(3, jnp.complex64)}, "lion")


def test_check_updates_match_catches_broadcasting_shapes_and_trees():
    params = {"dense": {"bias": jnp.zeros(3), "kernel": jnp.zeros((2, 3))}}
    c.check_updates_match(params, params, "t")
    c.check_updates_match(params, None, "t")
    bad = {"dense": {"bias": jnp.zeros((4, 3)), "kernel": jnp.zeros((2, 3))}}
    with pytest.raises(
        ValueError,
        match=r"gradient of 'dense/bias' has shape \(4, 3\), its "
        r"parameter \(3,\)",
    ):
        c.check_updates_match(bad, params, "sgdm")
    with pytest.raises(ValueError, match="gradients' tree does not match the params' tree"):
        c.check_updates_match({"dense": {"bias": jnp.zeros(3)}}, params, "sgdm")

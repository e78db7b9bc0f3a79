"""Path-masked weight decay and parameter-wise learning rates (bert4keras's derived optimizers,
kexue.fm/archives/7094)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    flax_like_params,
    leaf_paths,
    random_grads_like,
    random_tree,
    to_f64,
    wrapper_inners,
    x64,
)

from optax_ext._common import path_to_str
from optax_ext.wrappers.param_rules import decay_weights, scale_by_path

INNERS = wrapper_inners()


# ----------------------------------------------------------------- float64 references


def ref_no_decay(path):
    """Reference rule written out by hand: Flax biases and norm scales are not decayed."""
    return path.split("/")[-1] in ("bias", "scale")


def ref_decay_sgd(params, grads_seq, lr, wd, decayed):
    """θ ← θ - lr·(g + λ·θ·[decayed(path)]) in float64, leaf by leaf."""
    theta = dict(leaf_paths(to_f64(params)))
    for grads in grads_seq:
        for path, g in leaf_paths(to_f64(grads)):
            lam = wd if decayed(path) else 0.0
            theta[path] = theta[path] - lr * (g + lam * theta[path])
    return theta


def ref_multiplier(path, rules):
    """Product of the multipliers of every rule whose regex occurs in the path."""
    return math.prod(m for pattern, m in rules.items() if re.search(pattern, path))


def ref_sgdm_scaled(params, grads_seq, lr, beta, rules):
    """SGD with momentum (optax's trace form) followed by the path multipliers."""
    theta = dict(leaf_paths(to_f64(params)))
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    for grads in grads_seq:
        for path, g in leaf_paths(to_f64(grads)):
            m[path] = beta * m[path] + g
            theta[path] = theta[path] - lr * ref_multiplier(path, rules) * m[path]
    return theta


def run(tx, params, grads_seq):
    state = tx.init(params)
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def assert_matches_reference(params, ref):
    got = dict(leaf_paths(params))
    assert got.keys() == ref.keys()
    for path in ref:
        np.testing.assert_allclose(got[path], ref[path], rtol=1e-12, atol=1e-14, err_msg=path)


# ------------------------------------------------------------------------ decay_weights


@pytest.mark.parametrize(
    "kwargs, decayed",
    [
        ({}, lambda p: not ref_no_decay(p)),
        ({"exclude": None}, lambda p: True),
        ({"include": "layer_0", "exclude": None}, lambda p: "layer_0" in p),
        ({"include": "kernel"}, lambda p: p.endswith("kernel")),
    ],
    ids=["default", "all", "include", "include+exclude"],
)
def test_decay_weights_matches_float64_reference(kwargs, decayed):
    with x64():
        params = flax_like_params(1, dtype=jnp.float64, layers=1)
        grads = [random_grads_like(params, s) for s in range(4)]
        tx = optax.chain(decay_weights(0.1, **kwargs), optax.scale_by_learning_rate(0.05))
        got, _ = run(tx, params, grads)
        assert_matches_reference(got, ref_decay_sgd(params, grads, 0.05, 0.1, decayed))


def test_default_exclusion_hits_flax_bias_and_norm_scale_only():
    params = flax_like_params(0)
    tx = decay_weights(1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    for (path, du), (_, p) in zip(leaf_paths(u), leaf_paths(params), strict=True):
        want = np.zeros_like(p) if ref_no_decay(path) else np.asarray(p)
        np.testing.assert_array_equal(du, want, err_msg=path)
    assert any(ref_no_decay(p) for p, _ in leaf_paths(params))


def ref_mask(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: not ref_no_decay(path_to_str(p)), tree)


def test_decay_weights_in_adam_chain_equals_optax_adamw_with_mask():
    params = flax_like_params(2, layers=1)
    grads = [random_grads_like(params, s) for s in range(3)]
    mask = ref_mask(params)
    ours = optax.chain(
        optax.scale_by_adam(), decay_weights(0.05), optax.scale_by_learning_rate(1e-2)
    )
    theirs = optax.adamw(1e-2, weight_decay=0.05, mask=mask)
    assert_trees_close(run(ours, params, grads)[0], run(theirs, params, grads)[0], rtol=0, atol=0)


def test_decay_weights_schedule_and_injected():
    params = random_tree(4)
    grads = [random_grads_like(params, s) for s in range(3)]
    sched = optax.linear_schedule(0.2, 0.0, 3)
    a = optax.chain(decay_weights(sched), optax.scale_by_learning_rate(0.1))
    b = optax.chain(
        optax.add_decayed_weights(sched, mask=ref_mask), optax.scale_by_learning_rate(0.1)
    )
    assert_trees_close(run(a, params, grads)[0], run(b, params, grads)[0], rtol=0, atol=0)
    inj = optax.chain(
        optax.inject_hyperparams(decay_weights)(weight_decay=0.1), optax.scale_by_learning_rate(0.1)
    )
    plain = optax.chain(decay_weights(0.1), optax.scale_by_learning_rate(0.1))
    assert_trees_close(run(inj, params, grads)[0], run(plain, params, grads)[0], rtol=0, atol=0)


def test_decay_weights_validation_and_params_needed():
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0, inf\), got -0.1"):
        decay_weights(-0.1)
    tx = decay_weights(0.1)
    p = {"kernel": jnp.ones(2)}
    with pytest.raises(ValueError):
        tx.update(p, tx.init(p), None)


# ------------------------------------------------------------------------ scale_by_path

RULES = {"embed": 3.0, "layer_1": 0.5, "kernel$": 2.0, r"(^|/)bias$": 0.0}


def test_scale_by_path_matches_float64_reference():
    with x64():
        params = flax_like_params(3, dtype=jnp.float64)
        grads = [random_grads_like(params, s) for s in range(4)]
        tx = optax.chain(optax.sgd(0.05, momentum=0.9), scale_by_path(RULES))
        got, _ = run(tx, params, grads)
        assert_matches_reference(got, ref_sgdm_scaled(params, grads, 0.05, 0.9, RULES))


def test_all_matching_multipliers_multiply_and_unmatched_leaves_are_untouched():
    params = flax_like_params(0)
    ones = jax.tree.map(jnp.ones_like, params)
    u, _ = scale_by_path(RULES).update(ones, optax.EmptyState())
    seen = set()
    for path, x in leaf_paths(u):
        want = ref_multiplier(path, RULES)
        seen.add(want)
        np.testing.assert_array_equal(x, np.full_like(x, want), err_msg=path)
    assert {1.0, 3.0, 0.0, 0.5 * 2.0, 2.0} <= seen  # products of several rules occur
    # Unmatched leaves are passed through as the same array, not multiplied.
    g = {"head": {"w": jnp.array([np.nextafter(np.float32(1), np.float32(2))])}}
    out, _ = scale_by_path({"other": 7.0}).update(g, optax.EmptyState())
    assert out["head"]["w"] is g["head"]["w"]


@pytest.mark.parametrize("inner", INNERS)
def test_scale_by_path_wraps_any_optimizer(inner):
    """Each step's update is the inner update times the reference multiplier."""
    params = flax_like_params(4, layers=1)
    plain, scaled = inner(), optax.chain(inner(), scale_by_path(RULES))
    s_plain, s_scaled = plain.init(params), scaled.init(params)
    plain_step, scaled_step = jax.jit(plain.update), jax.jit(scaled.update)
    for seed in range(3):
        g = random_grads_like(params, seed)
        u_plain, s_plain = plain_step(g, s_plain, params)
        u_scaled, s_scaled = scaled_step(g, s_scaled, params)
        for (path, a), (_, b) in zip(leaf_paths(u_scaled), leaf_paths(u_plain), strict=True):
            np.testing.assert_allclose(
                a, ref_multiplier(path, RULES) * np.asarray(b), rtol=3e-7, atol=0, err_msg=path
            )  # 2 ulp: XLA fuses lr·m·k
        params = optax.apply_updates(params, u_scaled)


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"kernel": -1.0}, r"pattern 'kernel' must be finite and >= 0, got -1.0"),
        ({"bias": float("nan")}, r"pattern 'bias' must be finite and >= 0, got nan"),
        ([("embed", float("inf"))], r"pattern 'embed' must be finite and >= 0, got inf"),
        ({"(": 1.0}, r"invalid regular expression '\('"),
    ],
)
def test_scale_by_path_rejects_bad_rules(rules, message):
    with pytest.raises(ValueError, match=message):
        scale_by_path(rules)


def test_scale_by_path_rejects_non_numbers_and_accepts_extra_args():
    with pytest.raises(TypeError, match="multiplier for pattern 'kernel'"):
        scale_by_path({"kernel": "big"})
    with pytest.raises(TypeError, match="path rules"):
        scale_by_path(["kernel"])
    tx = scale_by_path({"a": 2.0})
    u, _ = tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}), None, loss=jnp.ones(()))
    np.testing.assert_array_equal(u["a"], 2.0)

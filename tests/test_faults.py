"""Fault injection: NaN/Inf gradients, zero learning rate, 1e30 gradients, bf16 overflow.

These back every claim of safety in the fault table (``benchmarks/fault_table.py``):

* ``nan_guard`` around any optimizer loses nothing on a NaN or Inf gradient: the inner
  state is kept bit for bit, only the bad leaf moves (toward its centre), params and
  state stay finite, and the next clean step is exactly the step the inner optimizer
  would have made had the bad step never happened.
* Tiger's own guard does the same per leaf (NaN and Inf by default, counted); with
  ``catch_inf=False`` (Su's original NaN-only check, spike guard off) an Inf gradient
  poisons that momentum entry for good.
* A finite spike (every gradient x1e30 on one step of a 200-step Flax run) is skipped
  and counted by the spike guard of ``nan_guard`` and of Tiger, and the run ends near
  the clean run's loss; without it the sign optimizers never recover in 150 steps. On a
  clean run the spike guard changes nothing, bit for bit.
* The guards' compiled programs grow linearly with the number of leaves.
* A zero learning rate leaves the params bit-identical for every optimizer (Amos: its
  decay is scaled by ξ², so ξ = 0 stops it, unless ``extra_l2 > 0``).
* Gradients of 1e30 (finite in float32 and bfloat16, their squares are not): the
  sign-based optimizers take exactly their normal step; Adam-like ones keep finite
  params but their second moment overflows to Inf and freezes them; SGD with momentum
  stays finite but steps by lr·1e30·|g|; Amos produces NaN unless it clips. The spike
  guard (on by default in ``nan_guard`` and Tiger) skips such a step: its gradient norm
  overflows float32.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_ext._common import path_to_str
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adax, adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.muon import muon
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.qk_clip import QKClipState

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import fault_table  # noqa: E402

BAD_LEAF = "params/Dense_0/kernel"
HUGE = 1e30

# the optimizers of the fault table, by learning rate (Tiger with its own guards off, so
# that nan_guard is what is tested)
OPTIMIZERS = {
    "tiger": lambda lr: tiger(lr, guard_nan=False, spike_factor=None),
    "lion": lambda lr: lion(lr),
    "adafactor": lambda lr: adafactor(lr),
    "adax": lambda lr: adax(lr),
    "amos": lambda lr: amos(lr),
    "sgdm": lambda lr: sgdm(lr),
    "optax.adamw": lambda lr: optax.adamw(lr),
}


def make_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    n = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)
    return {
        "params": {
            "embed": {"embedding": n(5, 4)},
            "Dense_0": {"kernel": n(4, 3), "bias": n(3)},
            "LayerNorm_0": {
                "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(3), dtype),
                "bias": n(3),
            },
        }
    }


def make_grads(params, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(
            scale * rng.uniform(0.5, 2, p.shape) * rng.choice([-1, 1], p.shape), p.dtype
        ),
        params,
    )


def with_bad_entry(grads, value):
    def leaf(path, g):
        return g.at[0, 0].set(value) if path_to_str(path) == BAD_LEAF else g

    return jax.tree_util.tree_map_with_path(leaf, grads)


def leaves(tree):
    return {
        path_to_str(p): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in leaves(tree).values())


def assert_trees_equal(a, b, what):
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys(), what
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=f"{what} at {k}")


_STEPS: dict = {}


def stepper(tx):
    """A jitted (params, state, grads) -> (params, state, updates), one per transform."""
    if id(tx) not in _STEPS:

        def step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        _STEPS[id(tx)] = (tx, jax.jit(step))  # keeps tx alive so its id is not reused
    return _STEPS[id(tx)][1]


def warm(tx, params, n=2):
    """n clean steps from init: a state with non-zero moments."""
    state = tx.init(params)
    step = stepper(tx)
    for i in range(n):
        params, state, _ = step(params, state, make_grads(params, 100 + i))
    return params, state


# ------------------------------------------------------------ NaN guard: nothing lost

# plus a factored AdaFactor with momentum: its state is not shaped like the params
GUARDED_INNER = {
    **OPTIMIZERS,
    "adafactor(factored, momentum)": lambda lr: adafactor(
        lr, momentum=0.9, min_dim_size_to_factor=2
    ),
}
_GUARDED = {name: nan_guard(make(1e-2), shrink_ratio=0.9) for name, make in GUARDED_INNER.items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(GUARDED_INNER))
def test_nan_guard_loses_nothing(name, bad):
    tx = _GUARDED[name]
    step = stepper(tx)
    params, state = warm(tx, make_params())

    # the bad step: inner state kept exactly, only the bad leaf moves, by the shrink
    p1, s1, _ = step(params, state, with_bad_entry(make_grads(params, 7), bad))
    assert all_finite(p1) and all_finite(s1)
    assert_trees_equal(s1.inner_state, state.inner_state, "inner state on the bad step")
    assert int(s1.skipped_steps) == int(state.skipped_steps) + 1
    assert int(s1.shrunk_leaves) == int(state.shrunk_leaves) + 1
    before, after = leaves(params), leaves(p1)
    for k in before:
        if k == BAD_LEAF:
            np.testing.assert_allclose(after[k], 0.9 * before[k], rtol=1e-6)
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)

    # the next clean step is the inner optimizer's step as if the bad one never happened
    clean = make_grads(params, 8)
    p2, s2, u2 = step(p1, s1, clean)
    inner = GUARDED_INNER[name](1e-2)
    u_ref, inner_ref = jax.jit(inner.update)(clean, state.inner_state, p1)
    assert all_finite(p2) and all_finite(s2)
    assert any(np.any(u != 0) for u in leaves(u2).values()), "the clean step did not move"
    for k, u in leaves(u2).items():
        np.testing.assert_allclose(u, leaves(u_ref)[k], rtol=1e-6, atol=1e-9, err_msg=k)
    for k, x in leaves(s2.inner_state).items():
        np.testing.assert_allclose(x, leaves(inner_ref)[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_nan_guard_centre_of_norm_scales_is_one():
    tx = _GUARDED["optax.adamw"]
    params = make_params()

    def bad_scale(path, g):
        return g.at[0].set(np.nan) if path_to_str(path).endswith("LayerNorm_0/scale") else g

    grads = jax.tree_util.tree_map_with_path(bad_scale, make_grads(params, 1))
    p1, s1, _ = stepper(tx)(params, tx.init(params), grads)
    scale = leaves(params)["params/LayerNorm_0/scale"]
    np.testing.assert_allclose(
        leaves(p1)["params/LayerNorm_0/scale"], 1 + 0.9 * (scale - 1), rtol=1e-6
    )


# ---------------------------------------------------------------- Tiger's own guard


@pytest.mark.parametrize("faithful", [False, True], ids=["default", "catch_inf=False"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_tiger_own_guard(faithful, bad):
    caught = not faithful or np.isnan(bad)
    # catch_inf=False is Su's NaN-only check; the spike guard would catch the Inf (its
    # norm is infinite), so it is off too for the original behaviour
    extra = {"catch_inf": False, "spike_factor": None} if faithful else {}
    tx = tiger(1e-2, shrink_ratio=0.9, **extra)
    step = stepper(tx)
    params, state = warm(tx, make_params())
    grads = make_grads(params, 7)
    p1, s1, u1 = step(params, state, with_bad_entry(grads, bad))
    _, s_clean, u_clean = step(params, state, grads)  # the same step without the fault

    before, after = leaves(params), leaves(p1)
    for k, u in leaves(u1).items():
        if k != BAD_LEAF:  # other leaves step as usual: Tiger decides per leaf
            np.testing.assert_array_equal(u, leaves(u_clean)[k], err_msg=k)
    mu_before, mu_after = leaves(optax.tree.get(state, "mu")), leaves(optax.tree.get(s1, "mu"))
    assert all_finite(p1)
    if caught:
        np.testing.assert_allclose(after[BAD_LEAF], 0.9 * before[BAD_LEAF], rtol=1e-6)
        np.testing.assert_array_equal(mu_after[BAD_LEAF], mu_before[BAD_LEAF])
        assert all_finite(s1)
        # counted like nan_guard's: one step on which the guard acted, one leaf
        assert (int(s1.skipped_steps), int(s1.shrunk_leaves), int(s1.spike_steps)) == (1, 1, 0)
        p2, s2, u2 = step(p1, s1, make_grads(params, 8))
        assert all_finite(p2) and all_finite(s2)
        assert np.any(leaves(u2)[BAD_LEAF] != 0)
    else:
        # the hazard of the NaN-only check: +Inf enters the momentum, whose entry stays
        # +Inf and pushes that parameter one way forever, and nothing counts it
        assert np.isinf(mu_after[BAD_LEAF][0, 0])
        p, s = p1, s1
        for i in range(3):
            p, s, u = step(p, s, make_grads(params, 20 + i))
        assert np.isinf(leaves(optax.tree.get(s, "mu"))[BAD_LEAF][0, 0])
        assert all_finite(p)
        assert int(s.skipped_steps) == int(s.shrunk_leaves) == 0


def test_fault_table_reads_the_counters_of_every_guard():
    """The table's "counted" read the counters of states reached through tuples only:
    Muon's, inside its PartitionState's dict of partitions, were never seen (nor its
    Tiger partition's). A NaN in a Muon matrix is counted by Muon's state; under
    nan_guard by nan_guard's, Muon's found beneath it; qk_clip's nonfinite_heads too."""
    params = make_params()
    bad = with_bad_entry(make_grads(params, 7), np.nan)
    tx = muon(1e-2, other="tiger")
    _, state, _ = stepper(tx)(params, tx.init(params), bad)
    assert fault_table._counters(state) == {
        "skipped_steps": 1,
        "shrunk_leaves": 1,
        "spike_steps": 0,
    }
    muon_counts = {"skipped_steps": 1, "shrunk_leaves": 1}
    tiger_counts = {"skipped_steps": 0, "shrunk_leaves": 0, "spike_steps": 0}
    assert fault_table._counters_by_state(state) == {
        "ScaleByMuonState": muon_counts,
        "NanGuardState": tiger_counts,  # Tiger's guard, around its chain
    }
    clipped = QKClipState(inner_state=state, nonfinite_heads=jnp.int32(3), cycle_max=())
    assert fault_table._counters_by_state(clipped)["QKClipState"] == {"nonfinite_heads": 3}
    assert fault_table._counters_by_state(clipped)["ScaleByMuonState"] == muon_counts

    guarded = nan_guard(muon(1e-2, other="tiger"))
    _, state, _ = stepper(guarded)(params, guarded.init(params), bad)
    # two NanGuardStates add up: the outer guard's and Tiger's own (which saw none)
    assert fault_table._counters_by_state(state) == {
        "NanGuardState": {"skipped_steps": 1, "shrunk_leaves": 1, "spike_steps": 0},
        "ScaleByMuonState": {"skipped_steps": 0, "shrunk_leaves": 0},
    }


# ------------------------------------------------------------------ zero learning rate

ZERO_LR = {
    **{name: make for name, make in OPTIMIZERS.items()},
    "tiger(guard)": lambda lr: tiger(lr, weight_decay=0.1),
    "lion(tiger scales)": lambda lr: lion(lr, weight_decay=0.1, param_scaling="tiger"),
    "adafactor(decay)": lambda lr: adafactor(lr, weight_decay=0.1),
    "adaxw": lambda lr: adaxw(lr, weight_decay=0.1),
    "amos(momentum, clip)": lambda lr: amos(lr, momentum=0.9, clip_value=1.0),
    "sgdm(nesterov, k=2)": lambda lr: sgdm(lr, nesterov=True, accumulation_steps=2),
    "nan_guard(adamw)": lambda lr: nan_guard(optax.adamw(lr, weight_decay=0.1)),
    "layer_adapted(adam)": lambda lr: layer_adapted(optax.scale_by_adam(), lr, 0.1),
    "lookahead(tiger)": lambda lr: lookahead(tiger(lr), sync_period=2),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", sorted(ZERO_LR))
def test_zero_learning_rate_leaves_params_unchanged(name, dtype):
    tx = ZERO_LR[name](0.0)
    check_zero_lr(tx, dtype, name)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_zero_learning_rate_under_nan_guard(name):
    check_zero_lr(nan_guard(OPTIMIZERS[name](0.0)), jnp.float32, f"nan_guard({name})")


def check_zero_lr(tx, dtype, name):
    step = stepper(tx)
    params = make_params(dtype)
    state = tx.init(params)
    p = params
    for i in range(3):
        p, state, _ = step(p, state, make_grads(params, i))
    assert_trees_equal(p, params, f"{name} with learning rate 0")


def test_amos_extra_l2_decays_even_at_zero_learning_rate():
    # extra_l2 is not scaled by ξ (Amos: Δθ = dfac·(-(γ/2 + extra_l2)·θ - ...))
    tx = amos(0.0, extra_l2=0.1)
    params = make_params()
    updates, _ = tx.update(make_grads(params, 0), tx.init(params), params)
    for k, u in leaves(updates).items():
        np.testing.assert_allclose(u, -0.1 * leaves(params)[k], rtol=1e-6, err_msg=k)


# --------------------------------------------------------- enormous gradients (1e30)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("guard", [False, True], ids=["plain", "nan_guard"])
@pytest.mark.parametrize("name", ["tiger", "lion"])
def test_sign_optimizers_take_their_normal_step_on_huge_gradients(name, guard, dtype):
    # from init, m = (1-β)·g: the sign of 1e30·g is the sign of g, so the step is
    # exactly the normal one; the momentum (~1e28) stays finite, as do later steps
    # (nan_guard's spike guard, off here, would skip the step: see below)
    tx = nan_guard(OPTIMIZERS[name](1e-2), spike_factor=None) if guard else OPTIMIZERS[name](1e-2)
    step = stepper(tx)
    params = make_params(dtype)
    grads = make_grads(params, 3)
    huge = make_grads(params, 3, scale=HUGE)
    assert all_finite(huge) and all(np.all(np.abs(g) >= 1e29) for g in leaves(huge).values())
    p_huge, s_huge, _ = step(params, tx.init(params), huge)
    p_norm, _, _ = step(params, tx.init(params), grads)
    assert_trees_equal(p_huge, p_norm, f"{name}: 1e30 gradients vs ordinary ones")
    assert all_finite(s_huge)
    p, s = p_huge, s_huge
    for i in range(3):
        p, s, u = step(p, s, make_grads(params, 30 + i))
        assert all_finite(p) and all_finite(s)
        assert jax.tree.leaves(p)[0].dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["optax.adamw", "adax", "adafactor"])
def test_adam_like_keep_finite_params_but_freeze_on_huge_gradients(name, dtype):
    # g² = 1e60 overflows (float32 and bfloat16): v = Inf, so m/√v = 0 and the params
    # stay finite, but the Inf second moment never decays back: later updates are 0
    # (adamw's default weight decay still moves them by lr·λ·θ)
    tx = OPTIMIZERS[name](1e-2)
    step = stepper(tx)
    params, state = warm(tx, make_params(dtype))
    p, s, _ = step(params, state, make_grads(params, 3, scale=HUGE))
    assert all_finite(p)
    assert not all_finite(s), "the second moment was expected to overflow"
    for i in range(2):
        prev = p
        p, s, u = step(p, s, make_grads(params, 40 + i))
        assert all_finite(p)
    for k, x in leaves(p).items():
        old = np.abs(leaves(prev)[k])
        decay = 1e-2 * 1e-4 * old if name == "optax.adamw" else 0.0
        rounding = 2 * float(jnp.finfo(dtype).eps) * old
        assert np.all(np.abs(x - leaves(prev)[k]) <= decay + rounding), f"{name} moved {k}"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sgdm_on_huge_gradients_is_finite_but_huge(dtype):
    tx = OPTIMIZERS["sgdm"](1e-2)
    params, state = warm(tx, make_params(dtype))
    p, s, u = stepper(tx)(params, state, make_grads(params, 3, scale=HUGE))
    assert all_finite(p) and all_finite(s)
    assert max(np.max(np.abs(x)) for x in leaves(u).values()) > 1e27


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_amos_huge_gradients_nan_unless_clipped(dtype):
    # v = Inf, rv = 0 and γ = ξ²·rv·g2 = 0·Inf = NaN: unclipped Amos produces NaN params;
    # clip_value bounds g before it is squared
    params = make_params(dtype)
    huge = make_grads(params, 3, scale=HUGE)
    tx = amos(0.1)
    p, _, _ = stepper(tx)(params, tx.init(params), huge)
    assert not all_finite(p)
    tx = amos(0.1, clip_value=1.0)
    p, s, _ = stepper(tx)(params, tx.init(params), huge)
    assert all_finite(p) and all_finite(s)


def test_nan_guard_without_spike_guard_does_not_catch_finite_huge_gradients():
    # 1e30 gradients are finite and so is SGDM's huge step: no non-finite check fires
    tx = nan_guard(OPTIMIZERS["sgdm"](1e-2), shrink_ratio=0.9, spike_factor=None)
    params, state = warm(tx, make_params())
    p, s, u = stepper(tx)(params, state, make_grads(params, 3, scale=HUGE))
    assert int(s.skipped_steps) == 0
    assert max(np.max(np.abs(x)) for x in leaves(u).values()) > 1e27


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "name", ["nan_guard(sgdm)", "nan_guard(lion)", "nan_guard(optax.adamw)", "tiger"]
)
def test_spike_guard_skips_huge_gradients_even_during_warmup(name, dtype):
    # the norm of 1e30 gradients overflows float32 (their squares do): a spike on the
    # third step already, before any warm-up; state kept, params unchanged, counted
    inner = name.removeprefix("nan_guard(").removesuffix(")")
    tx = tiger(1e-2) if name == "tiger" else nan_guard(OPTIMIZERS[inner](1e-2))
    step = stepper(tx)
    params, state = warm(tx, make_params(dtype))
    p, s, u = step(params, state, make_grads(params, 3, scale=HUGE))
    assert_trees_equal(p, params, f"{name}: params on the spike step")
    kept = (lambda st: optax.tree.get(st, "mu")) if name == "tiger" else (lambda st: st.inner_state)
    assert_trees_equal(kept(s), kept(state), "state")
    assert (int(s.spike_steps), int(s.skipped_steps), int(s.shrunk_leaves)) == (1, 1, 0)
    p2, s2, _ = step(p, s, make_grads(params, 4))
    assert (
        all_finite(p2)
        and all_finite(s2)
        and not np.array_equal(leaves(p2)[BAD_LEAF], leaves(p)[BAD_LEAF])
    )


# --------------------------------------------- a finite spike in a 200-step Flax run

SPIKE_STEP, RUN_STEPS = 50, 200


class _Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.LayerNorm()(nn.Dense(32)(x)))
        return nn.Dense(1)(x)[:, 0]


@functools.cache
def _regression():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 8)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal(8), jnp.float32))
    model = _Regressor()
    params = model.init(jax.random.key(0), x[:1])
    loss = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
    return params, loss


def _train_with_spike(tx, factor, steps=RUN_STEPS):
    """Full-batch steps in one jitted scan, the gradients times ``factor`` on step 50;
    returns the final loss, the final params and state."""
    params, loss = _regression()
    # the scales are an argument, not a constant of the program: runs that differ only
    # in the spike's size compile to one program (the compilation cache then has it)
    scales = jnp.ones(steps).at[SPIKE_STEP].set(factor)

    def step(carry, scale):
        p, s = carry
        g = jax.tree.map(lambda x: x * scale, jax.grad(loss)(p))
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(p, scales):
        (p, s), _ = jax.lax.scan(step, (p, tx.init(p)), scales)
        return loss(p), p, s

    final, p, s = run(params, scales)
    return float(final), p, s


#: Tiger with a long momentum in these runs: the checks compare the final loss of a run
#: one update short with a full one, which needs a trajectory that settles; at β = 0.9
#: (the default) sign steps of 1e-2 keep oscillating about the optimum, by 8x in loss
#: from one update to the next.
SETTLING = dict(beta=0.965)

SPIKE_CASES = {
    "tiger": lambda **kw: tiger(1e-2, **SETTLING, **kw),
    "nan_guard(lion)": lambda **kw: nan_guard(lion(1e-3), **kw),
    "nan_guard(tiger, no own guards)": lambda **kw: nan_guard(
        tiger(1e-2, **SETTLING, guard_nan=False, spike_factor=None), **kw
    ),
}


@pytest.mark.parametrize("name", sorted(SPIKE_CASES))
def test_spike_guard_skips_a_finite_spike_and_changes_nothing_on_a_clean_run(name):
    make = SPIKE_CASES[name]
    clean, p_clean, s_clean = _train_with_spike(make(), 1.0)
    clean_off, p_off, _ = _train_with_spike(make(spike_factor=None), 1.0)
    # on a clean run the guard never fires: bit-identical to running without it
    assert_trees_equal(p_clean, p_off, f"{name}: clean run with and without the spike guard")
    assert int(s_clean.spike_steps) == int(s_clean.skipped_steps) == 0
    assert int(s_clean.norm_steps) == RUN_STEPS

    # the full-batch run with the spike skipped is the clean run one step shorter
    _, p_shorter, _ = _train_with_spike(make(), 1.0, steps=RUN_STEPS - 1)
    # x1e30 at step 50: finite gradients, an overflowing norm; and x1e6: a finite norm
    for factor in (1e30, 1e6):
        spiked, p, s = _train_with_spike(make(), factor)
        assert int(s.spike_steps) == int(s.skipped_steps) == 1, f"{name} x{factor:g}"
        # an overflowing norm is not averaged; a finite spike enters at the threshold
        assert int(s.norm_steps) == RUN_STEPS - (factor == 1e30), f"{name} x{factor:g}"
        assert_trees_equal(p, p_shorter, f"{name} x{factor:g} against 199 clean steps")
        assert spiked <= 1.5 * clean, (name, factor, spiked, clean)
        unguarded, _, _ = _train_with_spike(make(spike_factor=None), factor)
        # without the guard the spike's sign rules the momentum for the rest of the run
        # (worse than the start: Tiger 1.6-1.8, Lion 2.3, from 0.91; clean 0.002-0.08)
        assert unguarded > 10 * clean, (name, factor, unguarded, clean)


def test_spike_clip_recovers_too():
    clean, _, _ = _train_with_spike(tiger(1e-2, **SETTLING), 1.0)
    clipped, p, s = _train_with_spike(tiger(1e-2, **SETTLING, spike_action="clip"), 1e6)
    assert int(s.spike_steps) == 1 and int(s.skipped_steps) == 0  # clipped, not skipped
    assert int(s.norm_steps) == RUN_STEPS
    assert clipped <= 1.5 * clean, (clipped, clean)


# ------------------------------------------------- compile size against the leaf count


def _many_leaves(n):
    return {f"layer_{i}": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)} for i in range(n // 2)}


def _compiled_instructions(tx, n):
    """The compiled step's instruction count, and its largest fused kernel's."""
    params = _many_leaves(n)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(tx.init, params)
    text = jax.jit(step).lower(params, state, params).compile().as_text()
    count = lambda t: len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", t, re.M))
    fused = [c for c in re.split(r"\n(?=\S)", text) if re.match(r"%(fused|wrapped)", c)]
    return count(text), max(count(c) for c in fused)


LINEAR_COMPILE = {
    "nan_guard(adam)": lambda: nan_guard(optax.adam(1e-3)),
    "nan_guard(adam, clip, check_result)": lambda: nan_guard(
        optax.adam(1e-3), spike_action="clip", check_result=True
    ),
    "accumulate_gradients(adam, skip_nonfinite)": lambda: accumulate_gradients(
        optax.adam(1e-3), 2, skip_nonfinite=True
    ),
    "tiger": lambda: tiger(1e-3),
    "tiger(clip, k=2)": lambda: tiger(1e-3, accumulation_steps=2, spike_action="clip"),
}


@pytest.mark.parametrize("name", sorted(LINEAR_COMPILE))
def test_guards_compile_to_a_program_linear_in_the_leaf_count(name):
    """Every leaf selects on one whole-step decision; built as a chain of per-leaf flags
    XLA fused a copy of the chain into every leaf's kernel (N² instructions, compile
    time ~6x per doubling of the leaves). Counted, not timed: each 8 more leaves must
    add the same number of compiled instructions, within 15%. And no single fused kernel
    may grow with the leaf count: XLA rewrote a sum of N stacked flags into one kernel
    holding a chain of N additions, which LLVM compiled in superlinear time (compile
    times: benchmarks/RESULTS.md)."""
    make = LINEAR_COMPILE[name]
    (c8, k8), (c16, _), (c32, k32) = (_compiled_instructions(make(), n) for n in (8, 16, 32))
    per_leaf_small, per_leaf_large = (c16 - c8) / 8, (c32 - c16) / 16
    assert per_leaf_large <= 1.15 * per_leaf_small, (name, c8, c16, c32)
    assert k32 <= k8, (name, "largest fused kernel, 8 and 32 leaves:", k8, k32)

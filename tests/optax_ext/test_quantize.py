"""8-bit block-wise states: the dynamic map, round-trip error, stability of a quantised
second moment, every optimizer, every device path and Orbax checkpoints."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import (
    abstract_init_matches,
    assert_no_recompile,
    assert_same_on_all_paths,
    leaf_paths,
    random_grads_like,
)

from optax_ext._common import tree_bytes
from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.quantize import (
    QuantizedArray,
    dequantize,
    dynamic_map,
    quantize,
    quantize_state,
)

# ------------------------------------------------- the map, from the spec's words


def spec_map(signed: bool) -> np.ndarray:
    """The dynamic map read off its bit description (spec/low_precision.md): after the
    sign bit, a run of zero bits gives the decimal exponent, a 1 flags its end, the
    remaining bits are a linear fraction in (0.1, 1] (the last, fraction-less decade:
    the single value 10^-z); all zeros is 0. Returns values by magnitude code."""
    bits = 7 if signed else 8
    out = []
    for code in range(2**bits):
        s = format(code, f"0{bits}b")
        if "1" not in s:
            out.append(0.0)
            continue
        z = s.index("1")
        frac_bits = s[z + 1 :]
        n = 2 ** len(frac_bits)
        f = int(frac_bits, 2) if frac_bits else 0
        if frac_bits:
            out.append(10.0**-z * (0.1 + 0.9 * (f + 1) / n))
        else:
            out.append(10.0**-z)
    return np.asarray(out)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_matches_its_description(signed):
    table = dynamic_map(signed)
    np.testing.assert_allclose(table, spec_map(signed), rtol=1e-12)
    assert table.size == (128 if signed else 256)
    assert np.all(np.diff(table) > 0) and table[-1] == 1.0
    assert table[1] == pytest.approx(1e-6 if signed else 1e-7)  # ~7 decades
    # the top decade has the finest steps (<= 14% of the value signed, 7% unsigned);
    # every decade down to the smallest value holds at least one code
    rel = np.diff(table)[1:] / table[2:]
    assert rel[table[2:] > 0.1].max() <= (0.141 if signed else 0.071)
    decades = 6 if signed else 7
    for z in range(decades):
        assert np.any((table > 10.0 ** -(z + 1)) & (table <= 10.0**-z)), z


def _nearest_codes(y, signed):
    table = dynamic_map(signed)
    mag = np.abs(y) if signed else np.maximum(y, 0)
    m = np.abs(mag[:, None] - table[None]).argmin(axis=1)
    return np.where(y < 0, -m, m) if signed else m


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_is_nearest_code_per_block_and_round_trip_error_is_bounded(signed):
    rng = np.random.default_rng(0)
    block = 256
    n = 5 * block + 77  # a shorter last block
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 1, n)
    x[block : 2 * block] = 0.0  # an all-zero block
    x = x.astype(np.float32) if signed else np.abs(x).astype(np.float32)
    q = quantize(jnp.asarray(x).reshape(23, 59), signed=signed, block=block)
    assert q.codes.dtype == (jnp.int8 if signed else jnp.uint8)
    assert q.codes.shape == (23, 59) and q.absmax.shape == (6,)
    flat = x.reshape(-1)
    table = dynamic_map(signed)
    back = np.asarray(dequantize(q, block=block)).reshape(-1)
    codes = np.asarray(q.codes).reshape(-1).astype(int)
    for b in range(6):
        part = slice(b * block, min((b + 1) * block, n))
        amax = np.abs(flat[part]).max()
        assert float(q.absmax[b]) == amax
        if amax == 0:
            assert np.all(codes[part] == 0) and np.all(back[part] == 0)
            continue
        y = flat[part].astype(np.float64) / amax
        want = _nearest_codes(y, signed)
        # ties (a value exactly half-way) may go either way: compare values, not codes
        got_err = np.abs(table[np.abs(codes[part])] - np.abs(y))
        want_err = np.abs(table[np.abs(want)] - np.abs(y))
        np.testing.assert_allclose(got_err, want_err, atol=1e-6)
        # the round trip is within half the map's local gap (times the block's absmax)
        i = np.clip(np.searchsorted(table, np.abs(y)), 1, table.size - 1)
        half_gap = (table[i] - table[i - 1]) / 2
        err = np.abs(back[part] - flat[part]) / amax
        assert np.all(err <= half_gap * (1 + 1e-5) + 1e-7)
        assert err.max() <= (0.9 / 64 if signed else 0.9 / 128) / 2 + 1e-7
        assert np.abs(back[part]).max() == amax  # the block's absmax is exact


def test_codes_round_trip_and_unsigned_clamps_negatives():
    for signed in (True, False):
        table = dynamic_map(signed).astype(np.float32)
        values = np.concatenate([-table[1:][::-1], table]) if signed else table
        q = quantize(jnp.asarray(values), signed=signed, block=values.size)
        np.testing.assert_allclose(np.asarray(dequantize(q, block=values.size)), values, rtol=3e-7)
    q = quantize(jnp.array([-1.0, 0.5, 1.0]), signed=False, block=4)
    np.testing.assert_array_equal(np.asarray(dequantize(q, block=4))[0], 0.0)


# --------------------------------------- a second moment: dynamic vs linear int8


def test_dynamic_map_keeps_adam_stable_where_a_linear_map_diverges():
    """Gradient scales spread over 3 decades inside each block: v spans 6. A linear
    int8 map rounds v below absmax/510 to 0 and m / (sqrt(0) + eps) explodes; the dynamic
    map (down to 1e-7 of absmax) keeps every step near float32 Adam's."""
    rng = np.random.default_rng(0)
    n, lr, steps = 8192, 1e-3, 30
    scales = jnp.asarray(10.0 ** rng.uniform(-3, 0, n), jnp.float32)
    params = {"w": jnp.zeros(n)}
    keys = jax.random.split(jax.random.key(0), steps)
    biggest = {}
    for name, make in [
        ("float32", lambda: optax.adam(lr)),
        ("dynamic", lambda: quantize_state(optax.adam(lr), block=2048, min_size=4096)),
        ("linear", lambda: quantize_state(optax.adam(lr), code="linear")),
    ]:
        tx = make()
        state, step_max = tx.init(params), 0.0
        update = jax.jit(tx.update)
        for k in keys:
            g = {"w": scales * (1.0 + 0.3 * jax.random.normal(k, (n,)))}
            u, state = update(g, state, params)
            step_max = max(step_max, float(jnp.abs(u["w"]).max()))
        biggest[name] = step_max
    assert biggest["float32"] <= 2 * lr  # Adam's steps are about lr
    assert biggest["dynamic"] <= 3 * biggest["float32"], biggest
    assert biggest["linear"] > 100 * biggest["float32"], biggest


# ------------------------------------------------------------ every optimizer


class MomentumState(NamedTuple):
    """A state shaped like Muon's: a counter and a param-shaped momentum (not "mu")."""

    count: jax.Array
    momentum: optax.Updates


def momentum_like():
    """A Muon-shaped stand-in: heavy-ball momentum stored under another field name."""

    def init(params):
        return MomentumState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(g, state, params=None):
        m = jax.tree.map(lambda m, g: 0.9 * m + g, state.momentum, g)
        return jax.tree.map(lambda m: -0.01 * m, m), MomentumState(state.count + 1, m)

    return optax.GradientTransformation(init, update)


INNERS = {
    "tiger": lambda: tiger(1e-2),
    "lion": lambda: lion(1e-3),
    "sgdm": lambda: sgdm(1e-2, 0.9),
    "adaxw": lambda: adaxw(1e-2),
    "adamw": lambda: optax.adamw(1e-2),
    "muon_like": momentum_like,
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)},
        lambda p: jax.tree.map(lambda x: "a" if x.ndim > 1 else "b", p),
    ),
}
SMALL = dict(block=32, min_size=64)  # small trees: quantise every leaf of >= 64 elements


def small_params(seed):
    """A few leaves with Flax names: each quantised leaf adds its own encode and decode
    to the compiled step, so few leaves keep compiles short. Two leaves are quantised
    with SMALL (one with a short last block), two stay float; 16 shards over 8 devices."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {
        "params": {
            "embed": {"embedding": n(16, 9)},
            "dense": {"kernel": n(16, 8), "bias": n(8)},
            "norm": {"scale": 1 + n(8)},
        }
    }


def _states_close_enough(inner_state, q_state):
    """Quantised leaves agree with the float32 run to the map's resolution."""
    is_q = lambda x: isinstance(x, QuantizedArray)
    f_leaves = leaf_paths(inner_state)
    q_leaves = jax.tree_util.tree_flatten_with_path(q_state.inner_state, is_leaf=is_q)[0]
    assert len(f_leaves) == len(q_leaves)
    quantised = 0
    for (path, f), (_, q) in zip(f_leaves, q_leaves, strict=True):
        if is_q(q):
            quantised += 1
            back = np.asarray(dequantize(q, block=SMALL["block"]))
            scale = np.abs(np.asarray(f)).max() + 1e-30
            assert np.abs(back - np.asarray(f)).max() <= 0.05 * scale, path
        else:
            np.testing.assert_allclose(np.asarray(q), np.asarray(f), rtol=1e-5, atol=1e-6)
    return quantised


@pytest.mark.parametrize("name", list(INNERS))
def test_every_optimizer_runs_8bit_and_stays_close_to_float32(name):
    params = small_params(0)
    grads = [random_grads_like(params, s) for s in range(4)]
    ref_tx, q_tx = INNERS[name](), quantize_state(INNERS[name](), **SMALL)
    ref_s, q_s = ref_tx.init(params), q_tx.init(params)
    p_ref = params
    for g in grads:
        u, ref_s = ref_tx.update(g, ref_s, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        u, q_s = q_tx.update(g, q_s, p_ref)  # the same params: compare the states
    n = _states_close_enough(ref_s, q_s)
    assert n >= 1
    # only param-shaped float leaves of >= min_size elements are quantised
    for x in jax.tree.leaves(q_s, is_leaf=lambda x: isinstance(x, QuantizedArray)):
        if isinstance(x, QuantizedArray):
            assert x.codes.size >= SMALL["min_size"]


def test_which_leaves_are_signed_and_the_bytes():
    params = {"big": jnp.zeros((64, 128)), "small": jnp.zeros(100)}
    state = quantize_state(optax.adamw(1e-3)).init(params)
    adam = state.inner_state[0]
    assert adam.mu["big"].codes.dtype == jnp.int8 and adam.nu["big"].codes.dtype == jnp.uint8
    assert adam.mu["small"].dtype == jnp.float32  # under min_size: stays float
    assert tree_bytes(state) == 2 * (64 * 128 + 4 * 4) + 2 * 100 * 4
    custom = quantize_state(optax.adamw(1e-3), second_moments=lambda path: "mu" in path)
    adam = custom.init(params).inner_state[0]
    assert adam.mu["big"].codes.dtype == jnp.uint8 and adam.nu["big"].codes.dtype == jnp.int8
    kept = quantize_state(optax.adamw(1e-3), keep_float=r"(^|/)nu/").init(params).inner_state[0]
    assert kept.nu["big"].dtype == jnp.float32 and isinstance(kept.mu["big"], QuantizedArray)


def test_inner_inject_hyperparams_keeps_its_scalars():
    params = small_params(0)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    tx = quantize_state(inner, **SMALL)
    state = tx.init(params)
    assert state.inner_state.hyperparams["learning_rate"].dtype == jnp.float32
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    g = random_grads_like(params, 0)
    _, state = step(params, state, g)
    state.inner_state.hyperparams["learning_rate"] = jnp.float32(0.0)
    u, _ = step(params, state, g)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))


# -------------------------------------------------------------------- contract


CONTRACT = [
    pytest.param(lambda: quantize_state(tiger(1e-2), **SMALL), id="tiger"),
    pytest.param(lambda: quantize_state(optax.adamw(1e-2), **SMALL), id="adamw"),
]


@pytest.mark.parametrize("make", CONTRACT)
def test_same_on_every_device_path(make):
    params = small_params(1)
    grads = [random_grads_like(params, s) for s in range(3)]
    assert_same_on_all_paths(make(), params, grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", CONTRACT)
def test_abstract_init_and_no_recompile(make):
    params = small_params(2)
    abstract_init_matches(make(), params)
    assert_no_recompile(make(), params, [random_grads_like(params, s) for s in range(3)])


def test_bad_arguments():
    for kwargs, name in [
        ({"bits": 4}, "bits"),
        ({"block": 0}, "block"),
        ({"min_size": -1}, "min_size"),
        ({"code": "log"}, "code"),
        ({"second_moments": "("}, "second_moments"),
        ({"keep_float": "["}, "keep_float"),
    ]:
        with pytest.raises(ValueError, match=name):
            quantize_state(optax.adam(1e-3), **kwargs)


# ------------------------------------------------------------------ checkpoints


def test_orbax_checkpoint_resumes_bit_identically(tmp_path):
    params = small_params(3)
    grads = [random_grads_like(params, s) for s in range(6)]
    tx = quantize_state(optax.adamw(1e-2), **SMALL)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    step = jax.jit(step)
    p, s = params, tx.init(params)
    for g in grads[:3]:
        p, s = step(p, s, g)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    checkpointer.wait_until_finished()
    target = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    restored = checkpointer.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    p2, s2 = restored["params"], restored["opt_state"]
    for g in grads[3:]:
        p, s = step(p, s, g)
        p2, s2 = step(p2, s2, g)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

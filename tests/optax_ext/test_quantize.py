"""8-bit block-wise states: the dynamic map, round-trip error, stability of a quantised
second moment, every optimizer, every device path and Orbax checkpoints."""

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers import (
    SMALL_QUANTIZED,
    leaf_paths,
    random_grads_like,
    small_quantized_params,
)

from optax_ext._common import tree_bytes
from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.muon import muon
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.precision import pure_bf16
from optax_ext.wrappers.quantize import (
    LinearQuantizedArray,
    NothingQuantizedWarning,
    Quantized4Array,
    Quantized4State,
    QuantizedArray,
    RankOne4Array,
    Unsigned4Array,
    _finite_absmax,
    code_of,
    dequantize,
    dynamic_map,
    linear4_map,
    quantize,
    quantize4,
    quantize_state,
)

# ------------------------------------------------- the map, from its bit description


def spec_map(signed: bool) -> np.ndarray:
    """The dynamic map read off its bit description (Dettmers et al. 2022, arXiv
    2110.02861): after the sign bit, a run of zero bits gives the decimal exponent, a 1
    flags its end, the remaining bits are a linear fraction in (0.1, 1] (the last,
    fraction-less decade: the single value 10^-z); all zeros is 0. Returns values by
    magnitude code."""
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
    """The codes of ``y`` (float64): the nearest value of the map, except that a positive
    value on the unsigned map takes the smallest positive code where the nearest is 0."""
    table = dynamic_map(signed)
    mag = np.abs(y) if signed else np.maximum(y, 0)
    m = np.abs(mag[:, None] - table[None]).argmin(axis=1)
    return np.where(y < 0, -m, m) if signed else np.where(y > 0, np.maximum(m, 1), m)


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


def test_8bit_blocks_keep_the_leading_axes_and_the_flat_absmax_still_decodes():
    """A leaf whose trailing axes hold whole blocks keeps its leading axes in the absmax
    ((4, 2) for (4, 4096) in blocks of 2048), the same blocks as the flattened leaf's, so
    the older flat absmax (8,) decodes to the same values; another block is refused."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 4096)), jnp.float32)
    q = quantize(x, signed=True)
    assert q.absmax.shape == (4, 2)
    flat = q._replace(absmax=q.absmax.reshape(-1))
    np.testing.assert_array_equal(np.asarray(dequantize(flat)), np.asarray(dequantize(q)))
    with pytest.raises(ValueError, match="block"):
        dequantize(q, block=1024)


@pytest.mark.parametrize("bits", [8, 4])
def test_an_eager_init_compiles_one_program_per_stored_leaf(bits, caplog):
    """``init`` runs eagerly (as Flax's ``TrainState.create`` calls it): each quantised
    leaf is one compiled program, not one per operation of the encoder (on an
    accelerator each is a compile of its own, per leaf shape)."""
    # shapes no other test uses: nothing for them is compiled yet in this process
    params = {"a": jnp.ones((37, 64 + bits)), "b": jnp.ones((41, 64 + bits))}
    tx = quantize_state(optax.sgd(1e-2, momentum=0.9), bits=bits, block=32, min_size=0)
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        tx.init(params)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling")]
    # per leaf the inner state's zeros and the quantiser, and the 4-bit state's seed key
    assert len(compiled) <= 2 * len(params) + (bits == 4), compiled


def test_codes_round_trip_and_unsigned_clamps_negatives():
    for signed in (True, False):
        table = dynamic_map(signed).astype(np.float32)
        values = np.concatenate([-table[1:][::-1], table]) if signed else table
        q = quantize(jnp.asarray(values), signed=signed, block=values.size)
        np.testing.assert_allclose(np.asarray(dequantize(q, block=values.size)), values, rtol=3e-7)
    q = quantize(jnp.array([-1.0, 0.5, 1.0]), signed=False, block=4)
    np.testing.assert_array_equal(np.asarray(dequantize(q, block=4))[0], 0.0)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_leaves_the_rest_of_its_block_alone(signed, bad):
    """The block's absmax is taken over its finite values: the other values of a block
    holding one NaN or inf code and decode exactly as with a 0 in its place. The bad
    value stays NaN on the signed map (its spare code -128); the unsigned map stores
    NaN and +inf as the absmax, -inf as 0."""
    block = 64
    x = np.random.default_rng(1).standard_normal(2 * block).astype(np.float32)
    x = x if signed else np.abs(x)
    x[5] = 0.0
    clean = quantize(jnp.asarray(x), signed=signed, block=block)
    x[5] = bad
    q = quantize(jnp.asarray(x), signed=signed, block=block)
    np.testing.assert_array_equal(np.asarray(q.absmax), np.asarray(clean.absmax))
    assert np.all(np.isfinite(np.asarray(q.absmax)))
    others = np.arange(2 * block) != 5
    np.testing.assert_array_equal(np.asarray(q.codes)[others], np.asarray(clean.codes)[others])
    back = np.asarray(dequantize(q, block=block))
    np.testing.assert_array_equal(back[others], np.asarray(dequantize(clean, block=block))[others])
    if signed:
        assert np.isnan(back[5])
    else:
        assert back[5] == (0.0 if bad < 0 else float(q.absmax[0]))
    # a block of nothing finite, or of subnormals only (1/absmax overflows), decodes
    # without a stray NaN: non-finite values as above, the rest within float32's tiny
    y = np.array([bad, bad, 1e-39, -1e-39, 0.0, 0.0], np.float32)
    y = y if signed else np.abs(y)
    back = np.asarray(dequantize(quantize(jnp.asarray(y), signed=signed, block=2), block=2))
    assert np.array_equal(np.isnan(back), signed & ~np.isfinite(y))
    assert np.all(np.isfinite(back[2:]))
    assert np.all(np.abs(back[2:] - y[2:]) <= np.finfo(np.float32).tiny)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_one_bad_gradient_element_costs_one_update_element_as_in_float32(bad):
    """Adam after one NaN/Inf gradient element, then a clean step: float32 Adam's update
    is non-finite at that element only; the 8-bit state's must be too (not its whole
    block), and every other element equals the 8-bit run with a 0 in its place."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}
    g = jnp.asarray(rng.standard_normal((64, 64)) * 1e-2, jnp.float32).at[0, 0].set(0.0)
    runs = {}
    for name, tx in [("float32", optax.adam(1e-3)), ("8-bit", quantize_state(optax.adam(1e-3)))]:
        for first in ("bad", "zero"):
            s = tx.init(params)
            _, s = tx.update({"w": g.at[0, 0].set(bad if first == "bad" else 0.0)}, s, params)
            u, _ = tx.update({"w": g}, s, params)
            runs[name, first] = np.asarray(u["w"])
    bad_elements = lambda u: int(np.sum(~np.isfinite(u)))
    assert bad_elements(runs["float32", "bad"]) == 1
    assert bad_elements(runs["8-bit", "bad"]) == bad_elements(runs["float32", "bad"])
    assert not np.isfinite(runs["8-bit", "bad"][0, 0])
    others = np.ones((64, 64), bool)
    others[0, 0] = False
    np.testing.assert_array_equal(runs["8-bit", "bad"][others], runs["8-bit", "zero"][others])


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


def test_a_positive_second_moment_never_decodes_as_zero_and_its_round_trip_is_bounded():
    """The unsigned map's round trip against a float64 reference, over 12 decades below
    a block's absmax: each value takes its nearest code, except that 0 < y < 5e-8 (y the
    value over absmax; the nearest value is 0) takes the smallest positive one, 1e-7.
    The error is then within half the map's local gap, or (rounded up) below 1e-7 of
    absmax; a positive value never decodes as 0, and 0 or a negative value decodes as 0."""
    table = dynamic_map(False)
    amax = 3.7  # not a power of ten: y = x / absmax is rounded in float32
    ratios = np.concatenate([[0.0, -1e-3, -1.0], 10.0 ** np.linspace(-12, 0, 1201)])
    x = (ratios * amax).astype(np.float32)
    q = quantize(jnp.asarray(x), signed=False, block=x.size)
    assert float(q.absmax[0]) == np.float32(amax)
    y = x.astype(np.float64) / np.float64(np.float32(amax))
    back = np.asarray(dequantize(q, block=x.size), np.float64) / np.float32(amax)
    codes = np.asarray(q.codes).astype(int)
    positive = y > 0
    assert np.all(back[positive] > 0) and np.all(back[~positive] == 0)
    # the code is the reference's (a value within float32 rounding of a tie may take
    # either neighbour: compare the errors)
    want = _nearest_codes(y, signed=False)
    err, want_err = np.abs(table[codes] - y), np.abs(table[want] - y)
    assert np.all(err <= want_err + 1e-6 * np.abs(y)), np.max(err - want_err)
    tiny = positive & (y < 0.49e-7)
    assert tiny.sum() > 400 and np.all(codes[tiny] == 1)
    np.testing.assert_allclose(back[tiny], table[1], rtol=1e-6)
    # the bound: half the local gap, or the smallest value where rounded up
    i = np.clip(np.searchsorted(table, y), 1, table.size - 1)
    bound = np.where(y < table[1] / 2, table[1], (table[i] - table[i - 1]) / 2)
    assert np.all(np.abs(back - np.maximum(y, 0)) <= bound * (1 + 1e-5))


def test_adam_stays_bounded_where_a_small_second_moment_decoded_as_zero():
    """One block with one large gradient and many small ones, 1e-12 to 1e-1 of it, then
    a step where only the large one is non-zero (a unit that did not fire on that batch).
    Rounded to the nearest code, every v below 5e-8 of its block's absmax (gradients
    below 2.2e-4 of the largest) decoded as 0 while its m (down to 5e-7 of its absmax)
    did not: the second step m / (0 + eps) was thousands of learning rates. Now every
    decoded v is positive, and each element's step is float32 Adam's times at most what
    the maps' rounding allows: m read up to `up` times too large, v up to `down` times
    too small (both from the tables)."""
    n, lr = 256, 1e-3
    g1 = np.concatenate([[1.0], 10.0 ** np.linspace(-12, -1, n - 1)]).astype(np.float32)
    g2 = np.zeros(n, np.float32)
    g2[0] = 1.0
    params = {"w": jnp.zeros(n)}
    steps = {}
    for name, tx in [
        ("float32", optax.adam(lr)),
        ("8-bit", quantize_state(optax.adam(lr), block=n, min_size=0)),
    ]:
        state = tx.init(params)
        _, state = tx.update({"w": jnp.asarray(g1)}, state, params)
        if name == "8-bit":
            nu = np.asarray(dequantize(state.inner_state[0].nu["w"], block=n))
            assert np.all(nu > 0), np.sum(nu == 0)
        u, _ = tx.update({"w": jnp.asarray(g2)}, state, params)
        steps[name] = np.abs(np.asarray(u["w"], np.float64))
    s, v = dynamic_map(True), dynamic_map(False)
    up = np.max(s[1:] / ((s[:-1] + s[1:]) / 2))  # 2: the signed code 1 holds [5e-7, ...)
    down = np.max(((v[1:-1] + v[2:]) / 2) / v[1:-1])  # 3.25: v's code 1 holds (0, 3.25e-7)
    bound = up * np.sqrt(down) * (1 + 1e-4)
    assert steps["float32"].max() <= lr
    assert np.all(steps["8-bit"] <= bound * steps["float32"]), np.max(
        steps["8-bit"] / steps["float32"]
    )
    assert steps["8-bit"].max() <= bound * lr


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
            back = np.asarray(dequantize(q, block=SMALL_QUANTIZED["block"]))
            scale = np.abs(np.asarray(f)).max() + 1e-30
            assert np.abs(back - np.asarray(f)).max() <= 0.05 * scale, path
        else:
            np.testing.assert_allclose(np.asarray(q), np.asarray(f), rtol=1e-5, atol=1e-6)
    return quantised


@pytest.mark.parametrize("name", list(INNERS))
def test_every_optimizer_runs_8bit_and_stays_close_to_float32(name):
    params = small_quantized_params(0)
    grads = [random_grads_like(params, s) for s in range(4)]
    ref_tx, q_tx = INNERS[name](), quantize_state(INNERS[name](), **SMALL_QUANTIZED)
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
            assert x.codes.size >= SMALL_QUANTIZED["min_size"]


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


def _codes_dtypes(state):
    """``{state path: codes dtype name}`` of the quantised leaves."""
    is_q = lambda x: isinstance(x, QuantizedArray)
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_q)[0]
    return {jax.tree_util.keystr(p): x.codes.dtype.name for p, x in leaves if is_q(x)}


NAMED_LIKE_MOMENTS = {
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "tiger": lambda: tiger(1e-2),
    # Adan's own field v is an EMA of gradient differences: signed
    "adan": lambda: optax.adan(1e-2),
    # a partition label named like a second moment is part of the state, not its field
    "partition_label_v": lambda: optax.partition(
        {"v": optax.sgd(1e-2, momentum=0.9)}, lambda p: jax.tree.map(lambda _: "v", p)
    ),
}


@pytest.mark.parametrize("name", list(NAMED_LIKE_MOMENTS))
def test_modules_named_v_or_nu_keep_a_signed_momentum(name):
    """The second-moment regex sees the state's part of a path only: the momentum of a
    module named ``v`` or ``nu`` is signed like ``q``'s, and as a copy of ``q`` (same
    weights and gradients) it decodes to the same values and gives the same update.
    Stored unsigned, every negative momentum entry was clamped to 0."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)
    params = {"attn": {m: {"kernel": w} for m in ("q", "v", "nu")}}
    ref_tx = NAMED_LIKE_MOMENTS[name]()
    q_tx = quantize_state(NAMED_LIKE_MOMENTS[name](), **SMALL_QUANTIZED)
    ref_s, q_s = ref_tx.init(params), q_tx.init(params)
    for seed in range(3):
        g = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((16, 8)), jnp.float32)
        grads = {"attn": {m: {"kernel": g} for m in ("q", "v", "nu")}}
        _, ref_s = ref_tx.update(grads, ref_s, params)
        u, q_s = q_tx.update(grads, q_s, params)
    dtypes = _codes_dtypes(q_s)
    for path, dtype in dtypes.items():
        same_as_q = path.replace("['attn']['v']", "['attn']['q']")
        same_as_q = same_as_q.replace("['attn']['nu']", "['attn']['q']")
        assert dtype == dtypes[same_as_q], path
        unsigned = (".nu[" in path) or (name == "adan" and ".n[" in path)
        assert dtype == ("uint8" if unsigned else "int8"), path
    for m in ("v", "nu"):
        np.testing.assert_array_equal(u["attn"][m]["kernel"], u["attn"]["q"]["kernel"])
    assert _states_close_enough(ref_s, q_s) >= 3


def test_a_factored_statistic_shaped_like_another_parameter_stays_float():
    """Amos keeps a (1, n) statistic per (m, n) kernel: a parameter of shape (1, n)
    elsewhere in the model does not make it a parameter-shaped moment."""
    params = {"w": jnp.ones((64, 64)), "s": jnp.ones((1, 64))}
    state = quantize_state(amos(1e-2), min_size=64).init(params)
    assert state.inner_state.v["w"].shape == (1, 64)
    assert not isinstance(state.inner_state.v["w"], QuantizedArray)


def test_multisteps_is_wrapped_through_its_transform():
    """optax.MultiSteps is an object with init and update: its state (the inner state
    and the accumulated gradient) is stored in 8 bits like any other."""
    params = small_quantized_params(4)
    grads = [random_grads_like(params, s) for s in range(4)]
    ref_tx = optax.MultiSteps(optax.adam(1e-2), 2)
    q_tx = quantize_state(optax.MultiSteps(optax.adam(1e-2), 2), **SMALL_QUANTIZED)
    ref_s, q_s = ref_tx.init(params), q_tx.init(params)
    for i, g in enumerate(grads):
        u_ref, ref_s = ref_tx.update(g, ref_s, params)
        u, q_s = q_tx.update(g, q_s, params)
        moved = any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(u))
        assert moved == (i % 2 == 1)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            assert float(jnp.abs(a - b).max()) <= 0.1 * 1e-2
    dtypes = _codes_dtypes(q_s)
    assert dtypes[".inner_state.acc_grads['params']['embed']['embedding']"] == "int8"
    assert dtypes[".inner_state.inner_opt_state[0].nu['params']['embed']['embedding']"] == "uint8"
    assert _states_close_enough(ref_s, q_s) >= 3


def test_nothing_to_quantise_warns_once_naming_min_size():
    """A model whose moments are all below min_size gets float32 states: init says so
    once (abstract init too), naming min_size and the largest leaf; it is quiet when
    anything is quantised or there are no moments."""
    small = {"w": jnp.zeros((32, 32)), "b": jnp.zeros(32)}
    for init in (
        lambda tx: tx.init(small),
        lambda tx: jax.eval_shape(
            tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small)
        ),
    ):
        with pytest.warns(NothingQuantizedWarning) as record:
            state = init(quantize_state(optax.adam(1e-3)))
        assert len(record) == 1
        assert "min_size=4096" in str(record[0].message)
        assert "largest has 1024" in str(record[0].message)
        assert not _codes_dtypes(state)
    quiet = [
        (optax.adam(1e-3), small, {"min_size": 1024}),
        (optax.adam(1e-3), {"w": jnp.zeros((64, 64)), "b": jnp.zeros(32)}, {}),
        (optax.sgd(1e-3), small, {}),  # no moments
        (optax.adam(1e-3), small, {"keep_float": "."}),  # kept float on purpose
    ]
    for inner, params, kwargs in quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("error", NothingQuantizedWarning)
            quantize_state(inner, **kwargs).init(params)


def test_the_class_names_the_map():
    """quantize(code="linear") gives a LinearQuantizedArray (its signature differs from
    the dynamic map's, so checkpoints tell them apart); decoding it as another map is
    an error."""
    x = jnp.linspace(-1.0, 1.0, 16)
    lin, dyn = quantize(x, signed=True, code="linear"), quantize(x, signed=True)
    assert type(lin) is LinearQuantizedArray and type(dyn) is QuantizedArray
    assert (code_of(lin), code_of(dyn)) == ("linear", "dynamic")
    assert type(jax.tree.map(lambda a: a, lin)) is LinearQuantizedArray
    np.testing.assert_allclose(np.asarray(dequantize(lin)), np.asarray(x), atol=1 / 127)
    with pytest.raises(ValueError, match="code='dynamic'.*LinearQuantizedArray"):
        dequantize(lin, code="dynamic")
    state = quantize_state(optax.adam(1e-3), code="linear").init({"w": jnp.zeros((64, 64))})
    assert type(state.inner_state[0].nu["w"]) is LinearQuantizedArray


def test_inner_inject_hyperparams_keeps_its_scalars():
    params = small_quantized_params(0)
    inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)
    tx = quantize_state(inner, **SMALL_QUANTIZED)
    state = tx.init(params)
    assert state.inner_state.hyperparams["learning_rate"].dtype == jnp.float32
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    g = random_grads_like(params, 0)
    _, state = step(params, state, g)
    state.inner_state.hyperparams["learning_rate"] = jnp.float32(0.0)
    u, _ = step(params, state, g)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))


def _steps(tx, params, grads):
    """The updates of ``tx`` over ``grads`` (jitted), and its last state."""
    step = jax.jit(lambda s, g: tx.update(g, s, params))
    state, out = tx.init(params), []
    for g in grads:
        u, state = step(state, g)
        out.append(u)
    return out, state


def _assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# the inner wrapper's settings: a 150-element leaf is 2 blocks of it, 8 elements stay float
NEST_INNER = dict(block=100, min_size=64)


@pytest.mark.parametrize(
    "outer",
    [
        dict(block=100, min_size=64),
        dict(block=75, min_size=0),  # 2 blocks too, cut elsewhere: decoded silently wrong
        dict(block=32),  # 5 blocks: a broadcasting error
        dict(block=100, min_size=0, code="linear"),
    ],
    ids=["same_settings", "same_block_count", "other_block_count", "other_code"],
)
def test_a_nested_quantize_state_keeps_its_own_leaves(outer):
    """quantize_state(quantize_state(adam, ...), ...) decoded the inner wrapper's leaves
    with the outer's block and map: with another number of blocks it crashed, with the
    same number cut elsewhere each block's codes were scaled by another block's absmax.
    The nested wrapper's leaves are its own: the stack gives bit for bit the single
    wrapper's updates and state, whose moments agree with float32 Adam's."""
    rng = np.random.default_rng(5)
    n = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    params = {"w": n(150), "b": n(8)}
    grads = [{"w": n(150), "b": n(8)} for _ in range(3)]
    single_u, single_s = _steps(quantize_state(optax.adam(1e-2), **NEST_INNER), params, grads)
    nested = quantize_state(quantize_state(optax.adam(1e-2), **NEST_INNER), **outer)
    nested_u, nested_s = _steps(nested, params, grads)
    _assert_bit_equal(nested_u, single_u)
    _assert_bit_equal(nested_s.inner_state, single_s)
    adam = nested_s.inner_state.inner_state[0]
    assert type(adam.mu["w"]) is QuantizedArray and adam.mu["w"].absmax.shape == (2,)
    assert adam.nu["w"].codes.dtype == jnp.uint8 and not isinstance(adam.mu["b"], QuantizedArray)
    _, ref = _steps(optax.adam(1e-2), params, grads)
    for field in ("mu", "nu"):
        back = np.asarray(dequantize(getattr(adam, field)["w"], block=NEST_INNER["block"]))
        want = np.asarray(getattr(ref[0], field)["w"], np.float64)
        assert np.abs(back - want).max() <= 0.05 * np.abs(want).max(), field


def test_an_outer_quantize_state_stores_only_the_float_leaves_outside_a_nested_one():
    """In quantize_state(chain(quantize_state(adam), trace)) the outer wrapper stores the
    trace in 8 bits with its own block and map, and leaves Adam's moments to the inner
    wrapper: the same as wrapping each transform of the chain on its own."""
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.standard_normal(150), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.standard_normal(150), jnp.float32)} for _ in range(3)]
    outer = dict(block=32, min_size=64, code="linear")
    adam = lambda: quantize_state(optax.adam(1e-2), **NEST_INNER)
    nested = quantize_state(optax.chain(adam(), optax.trace(0.9)), **outer)
    ref = optax.chain(adam(), quantize_state(optax.trace(0.9), **outer))
    nested_u, nested_s = _steps(nested, params, grads)
    ref_u, ref_s = _steps(ref, params, grads)
    _assert_bit_equal(nested_u, ref_u)
    _assert_bit_equal(nested_s.inner_state[0], ref_s[0])
    _assert_bit_equal(nested_s.inner_state[1], ref_s[1].inner_state)
    trace = nested_s.inner_state[1].trace["w"]
    assert type(trace) is LinearQuantizedArray and trace.absmax.shape == (5,)


def test_a_quantised_leaf_outside_a_nested_quantize_state_is_refused_at_init():
    """A transform that quantises its own state leaves no record of its block: decoding
    its leaf with the wrapper's block would misread it, so init refuses, naming the leaf."""

    class OwnState(NamedTuple):
        m: QuantizedArray

    inner = optax.GradientTransformation(
        lambda p: OwnState(quantize(jnp.zeros(150), signed=True, block=100)),
        lambda u, s, p=None: (u, s),
    )
    with pytest.raises(ValueError, match=r"QuantizedArray at '.*m'.*not inside a QuantizedState"):
        quantize_state(inner, block=75, min_size=0).init({"w": jnp.zeros(150)})


# (device paths, abstract init and one compile of quantize_state around Tiger and AdamW,
# 8 and 4 bits: tests/test_device_paths.py)


def test_bad_arguments():
    for kwargs, name in [
        ({"bits": 3}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": 4, "block": 0}, "block"),
        ({"bits": 4, "block": -128}, "block"),
        ({"bits": 4, "code": "linear"}, "code"),
        ({"bits": 4, "seed": -1}, "seed"),
        ({"block": 0}, "block"),
        ({"min_size": -1}, "min_size"),
        ({"code": "log"}, "code"),
        ({"second_moments": "("}, "second_moments"),
        ({"keep_float": "["}, "keep_float"),
        ({"bits": 4, "momentum_rounding": "up"}, "momentum_rounding"),
        ({"momentum_rounding": "stochastic"}, "momentum_rounding"),  # 8 bits: nearest
    ]:
        with pytest.raises(ValueError, match=name):
            quantize_state(optax.adam(1e-3), **kwargs)
    for kwargs, name in [({"bits": 4.0}, "bits"), ({"bits": 4, "block": 128.0}, "block")]:
        with pytest.raises(TypeError, match=name):
            quantize_state(optax.adam(1e-3), **kwargs)


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("bits", [8, 4])
def test_orbax_checkpoint_resumes_bit_identically(tmp_path, bits):
    # 4 bits: the stochastic re-quantisation's key is in the state, so the resume is exact
    params = small_quantized_params(3)
    grads = [random_grads_like(params, s) for s in range(6)]
    tx = quantize_state(optax.adamw(1e-2), bits=bits, **SMALL_QUANTIZED)

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


# ---------------------------------------------------------------------- 4 bits

FOUR = (Quantized4Array, Unsigned4Array, RankOne4Array)
is_four = lambda x: isinstance(x, FOUR)


def test_4bit_maps_match_their_description():
    """Signed momenta: the dynamic map with 3 magnitude bits (decades [0.1, 1] in 4
    steps, [0.01, 0.1] in 2, then 0.01 and 0). Second moments: (i + 1)/16, no zero."""
    np.testing.assert_allclose(
        dynamic_map(True, 4), [0, 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1.0], rtol=1e-12
    )
    np.testing.assert_allclose(spec_map_bits(3), dynamic_map(True, 4), rtol=1e-12)
    np.testing.assert_allclose(linear4_map(), np.arange(1, 17) / 16, rtol=0)
    assert linear4_map().min() > 0


def spec_map_bits(bits):
    """:func:`spec_map`'s reading of the bits, for ``bits`` magnitude bits."""
    out = []
    for code in range(2**bits):
        s = format(code, f"0{bits}b")
        if "1" not in s:
            out.append(0.0)
            continue
        z, frac = s.index("1"), s[s.index("1") + 1 :]
        n = 2 ** len(frac)
        out.append(10.0**-z * (0.1 + 0.9 * (int(frac, 2) + 1) / n) if frac else 10.0**-z)
    return np.asarray(out)


def _scales64(x, kind, block):
    """Each entry's scale in float64: the block's absmax, or min(row max, col max)."""
    a = np.abs(x.astype(np.float64))
    if kind == "rank1":
        m = a.reshape(-1, x.shape[-1])
        return np.minimum(m.max(1, keepdims=True), m.max(0, keepdims=True)).reshape(x.shape)
    flat = a.reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        out[start : start + block] = flat[start : start + block].max()
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(9, 31), (6, 4, 32)], ids=["ragged", "blocked"])
@pytest.mark.parametrize("kind", ["signed", "unsigned_blocks", "rank1"])
def test_4bit_round_trip_is_nearest_and_bounded_against_float64(kind, shape):
    """Every entry decodes to the map value nearest x / scale (scales and the error in
    float64): within half the map's local gap of the entry's scale, 0.1125 at most for
    the signed map, 1/32 for the unsigned one (or, below 1/16 of the scale, rounded up
    to 1/16, never to 0). The scales are the float64 maxima of blocks of the flattened
    leaf (or of its rows and columns, the last axis the columns): (9, 31) has an odd
    last axis and a shorter last block; in (6, 4, 32) the blocks of 64 run along the
    last two axes, one absmax per (row, block)."""
    rng = np.random.default_rng(1)
    block = 64
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 0, shape)
    x.flat[0] = 40.0  # an outlier: rank-1 keeps the other rows and columns fine
    signed = kind == "signed"
    x = (x if signed else x * x).astype(np.float32)
    # the block-wise second-moment path is for ndim 1
    q = jax.jit(quantize4, static_argnames=("signed", "block"))(
        jnp.asarray(x.reshape(-1) if kind == "unsigned_blocks" else x), signed=signed, block=block
    )
    want_cls = {
        "signed": Quantized4Array,
        "unsigned_blocks": Unsigned4Array,
        "rank1": RankOne4Array,
    }
    assert type(q) is want_cls[kind] and q.codes.dtype == jnp.uint8
    n = x.size if kind == "unsigned_blocks" else shape[-1]
    assert q.codes.shape[-1] == (n + 1) // 2  # two codes per byte
    if kind == "rank1":
        assert q.row_max.shape == (*shape[:-1], 1) and q.col_max.shape == (1,) * (x.ndim - 1) + (
            shape[-1],
        )
    elif kind == "signed":
        assert q.absmax.shape == ((5,) if shape == (9, 31) else (6, 2))
    back = np.asarray(jax.jit(dequantize, static_argnames="block")(q, block=block), np.float64)
    back = back.reshape(shape)
    scale = _scales64(x if kind != "unsigned_blocks" else x.reshape(-1), kind, block)
    scale = scale.reshape(shape)
    y = x.astype(np.float64) / scale
    table = dynamic_map(True, 4) if signed else linear4_map()
    mag = np.abs(y)
    nearest = table[np.argmin(np.abs(table[None, :] - mag.reshape(-1, 1)), axis=1)]
    got = np.abs(back) / scale
    np.testing.assert_allclose(got.reshape(-1), nearest, atol=1e-6)
    if signed:  # a value rounded to 0 is +0, never NaN (the code "-0")
        assert np.all((np.sign(back) == np.sign(x)) | (back == 0))
    else:
        assert np.all(back > 0)
    err = np.abs(back - x) / scale
    assert err.max() <= (0.225 / 2 if signed else 1 / 16) + 1e-6
    if not signed:
        above = y >= 1 / 16
        assert err[above].max() <= 1 / 32 + 1e-6
    if kind == "rank1":  # entries away from the outlier keep their own scale
        m, mx = back.reshape(-1, shape[-1]), x.reshape(-1, shape[-1])
        assert np.abs(m[1:, 1:] - mx[1:, 1:]).max() <= mx[1:, 1:].max() / 16


def _adam_and_tiger():
    labels = {"w": "adam", "u": "tiger"}
    return optax.multi_transform({"adam": optax.adam(1e-2), "tiger": tiger(1e-2)}, labels)


@pytest.mark.parametrize(
    "name, rounding, nearest",
    [
        ("adam", "auto", [True]),
        ("adam", "stochastic", [False]),
        ("tiger", "auto", [False]),
        ("tiger", "nearest", [True]),
        ("adam_and_tiger", "auto", [True, False]),  # by parameter, not by wrapper
    ],
)
def test_4bit_momenta_round_to_nearest_beside_a_second_moment(name, rounding, nearest):
    """After one update, each stored momentum entry against float64 (the block's
    absmax, the map): with a 4-bit second moment of the same parameter (Adam,
    ``"auto"``) the nearest map value; where momenta round stochastically (Tiger's
    ``"auto"``, or asked for) within a whole gap, and off the nearest value for a good
    share of the entries (before, Adam's momenta rounded stochastically)."""
    rng = np.random.default_rng(7)
    n = lambda scale: jnp.asarray(rng.standard_normal((16, 64)) * scale, jnp.float32)
    params = {"w": n(1.0), "u": n(1.0)}
    g = {k: n(10.0 ** rng.uniform(-3, 0, (16, 64))) for k in params}
    inner = {
        "adam": lambda: optax.adam(1e-2),
        "tiger": lambda: tiger(1e-2),
        "adam_and_tiger": _adam_and_tiger,
    }[name]
    tx = quantize_state(inner(), bits=4, min_size=0, momentum_rounding=rounding)
    _, state = jax.jit(tx.update)(g, tx.init(params), params)
    # from zeros (exact in 4 bits) the inner float state after one update is the reference
    _, ref = inner().update(g, inner().init(params), params)
    pairs = zip(
        jax.tree.leaves(ref), jax.tree.leaves(state.inner_state, is_leaf=is_four), strict=True
    )
    momenta = [(np.asarray(f, np.float64), q) for f, q in pairs if type(q) is Quantized4Array]
    assert len(momenta) == len(nearest) * (1 if name == "adam_and_tiger" else 2)
    table = dynamic_map(True, 4)
    for (x, q), want in zip(momenta, nearest * 2, strict=False):
        scale = _scales64(x, "signed", 256)
        back = np.asarray(dequantize(q, block=256), np.float64)
        y = np.abs(x) / scale
        near = table[np.argmin(np.abs(table[None, :] - y.reshape(-1, 1)), axis=1)]
        off = np.abs(np.abs(back) / scale - near.reshape(x.shape)) > 1e-6
        assert np.all((np.sign(back) == np.sign(x)) | (back == 0))
        if want:
            assert not off.any()
        else:
            assert off.mean() > 0.1, off.mean()
            assert (np.abs(back - x) / scale).max() <= 0.225 + 1e-6


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_4bit_requantisation_is_unbiased(signed):
    """Stochastic rounding: over 1e5 keys the decoded value's mean error is below 1e-4
    of the scale (and each entry's within 5 standard errors), for values a quarter of
    a gap above a map value, where nearest rounding is off by a quarter gap."""
    table = dynamic_map(True, 4) if signed else linear4_map()
    lo, hi = table[:-1], table[1:]
    y = np.concatenate([lo + 0.25 * (hi - lo), [1.0]])  # 1.0: the absmax, exact
    if signed:
        y = np.concatenate([y, -y[:-1]])
    x = jnp.asarray(np.tile(y, 4), jnp.float32)
    y64 = np.asarray(x, np.float64)
    draws, chunk = 100_000, 50_000

    @jax.jit
    def mean_error(keys):
        back = jax.vmap(
            lambda k: dequantize(quantize4(x, signed=signed, block=x.size, key=k), block=x.size)
        )(keys)
        return jnp.sum(back.astype(jnp.float32) - x, axis=0)

    total = np.zeros(x.size)
    for c in range(draws // chunk):
        keys = jax.random.split(jax.random.key(c), chunk)
        total += np.asarray(mean_error(keys), np.float64)
    mean = total / draws
    # signed by the value's sign: a bias towards (or away from) 0 must not cancel
    # between x and -x
    assert abs(np.mean(mean * np.sign(y64))) <= 1e-4, np.mean(mean * np.sign(y64))
    i = np.clip(np.searchsorted(table, np.abs(y64), side="right") - 1, 0, table.size - 2)
    gap = table[i + 1] - table[i]
    sd = gap * np.sqrt(0.25 * 0.75) / np.sqrt(draws)
    assert np.all(np.abs(mean) <= 5 * sd + 1e-6), np.max(np.abs(mean) / (sd + 1e-12))
    nearest = np.asarray(
        jax.jit(lambda x: dequantize(quantize4(x, signed=signed, block=x.size), block=x.size))(x)
    )
    assert abs(np.mean((nearest - y64) * np.sign(y64))) > 1e-2  # what the test catches


def _linear_with_zero(v, block):
    """A plain linear 4-bit map with a zero point (round(15 v / A) / 15 · A per block)."""
    flat = v.reshape(-1)
    out = np.empty_like(flat)
    for s in range(0, flat.size, block):
        a = flat[s : s + block].max()
        out[s : s + block] = np.round(flat[s : s + block] / a * 15) / 15 * a
    return out.reshape(v.shape)


@pytest.mark.parametrize("shape", [(16, 16), (256,)], ids=["rank1", "blocks"])
def test_4bit_second_moment_without_zero_keeps_adam_bounded_on_a_spike(shape):
    """One gradient element 20x the others, then a step where only it is non-zero.
    With a linear 4-bit map with a zero point, every v below 1/30 of the block's largest
    (gradients under 0.18 of the spike) decodes as 0 while its momentum does not: the
    second step is m / eps, ~1e5 learning rates (float64 reference). With the map
    without zero (and rank-1 scales for the matrix) it stays within a few."""
    rng = np.random.default_rng(2)
    n, lr, b1, b2, eps = int(np.prod(shape)), 1e-3, 0.9, 0.999, 1e-8
    g1 = (0.05 * rng.uniform(0.5, 1, n) * rng.choice([-1, 1], n)).reshape(shape)
    g1.flat[0] = 1.0
    g2 = np.zeros(shape)
    g2.flat[0] = 1.0
    # float64 Adam whose nu is stored on the zero-point map between the steps
    m1, v1 = (1 - b1) * g1, _linear_with_zero((1 - b2) * g1**2, 256)
    m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2**2
    zero_point = lr * (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)
    assert np.abs(zero_point).max() > 1e4 * lr
    tx = quantize_state(optax.adam(lr, b1, b2, eps), bits=4, min_size=0)
    params = {"w": jnp.zeros(shape)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step({"w": jnp.asarray(g1, jnp.float32)}, state, params)
    nu = state.inner_state[0].nu["w"]
    assert isinstance(nu, RankOne4Array if len(shape) == 2 else Unsigned4Array)
    u, _ = step({"w": jnp.asarray(g2, jnp.float32)}, state, params)
    assert np.all(np.isfinite(np.asarray(u["w"])))
    assert np.abs(np.asarray(u["w"])).max() <= 5 * lr, np.abs(np.asarray(u["w"])).max() / lr


@pytest.mark.parametrize("kind", ["signed", "rank1"])
def test_4bit_a_non_finite_value_leaves_the_rest_alone(kind):
    """A NaN and an inf entry: scales are the largest *finite* values, so every other
    entry decodes exactly as with 0 there; in a momentum they decode as NaN (the code
    "-0"), in a second moment as their scale (no spare code: a bounded step)."""
    x = np.random.default_rng(3).standard_normal((4, 9)).astype(np.float32)
    signed = kind == "signed"
    x = x if signed else x * x
    bad = np.zeros(x.shape, bool)
    bad[1, 2] = bad[2, 3] = True
    clean, dirty = np.where(bad, 0.0, x), x.copy()
    dirty[1, 2], dirty[2, 3] = np.nan, np.inf
    run = jax.jit(lambda x: dequantize(quantize4(x, signed=signed, block=16), block=16))
    back_clean, back = np.asarray(run(jnp.asarray(clean))), np.asarray(run(jnp.asarray(dirty)))
    np.testing.assert_array_equal(back[~bad], back_clean[~bad])
    if signed:
        assert np.all(np.isnan(back[bad]))
    else:
        scale = np.minimum(clean.max(1, keepdims=True), clean.max(0, keepdims=True))
        np.testing.assert_allclose(back[bad], scale[bad], rtol=1e-6)


def _bytes_per_param(tx, params):
    state = jax.eval_shape(tx.init, params)
    return tree_bytes(state) / sum(x.size for x in jax.tree.leaves(params))


def test_4bit_state_bytes_per_parameter():
    """Codes 0.5 B, a float32 absmax per 256 momenta (0.0156 B), row and column maxima
    of a matrix's second moment (4 (r + c) / (r c) B), counted on abstract states."""
    s = jax.ShapeDtypeStruct
    params = {
        "w": s((1024, 512), jnp.float32),
        "e": s((512, 1024), jnp.float32),
        "b": s((16384,), jnp.float32),
    }
    tiger_bytes = _bytes_per_param(quantize_state(tiger(1e-3), bits=4), params)
    adam_bytes = _bytes_per_param(quantize_state(optax.adam(1e-3), bits=4), params)
    assert tiger_bytes <= 0.52, tiger_bytes
    assert adam_bytes <= 1.04, adam_bytes
    assert _bytes_per_param(quantize_state(optax.adam(1e-3)), params) > 2.0  # 8 bits


INNERS4 = {
    "tiger": lambda: tiger(1e-2),
    "lion": lambda: lion(1e-3),
    "sgdm": lambda: sgdm(1e-2, 0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2),
    "muon": lambda: muon(1e-2),
    "adaxw": lambda: adaxw(1e-2),
    # Amos's v and b are factored (never param-shaped): its momentum is what is stored
    "amos": lambda: amos(1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", list(INNERS4))
def test_every_optimizer_runs_4bit_under_jit(name):
    """Each jitted step is the inner optimizer's float32 step on the decoded state (the
    same update), and the stored state is that step's new state to within one gap of
    the map (stochastic rounding goes to either neighbour): 0.225 of the leaf's largest
    |value| for the signed map, 1/16 for the unsigned one."""
    params = small_quantized_params(0)
    grads = [random_grads_like(params, s) for s in range(2)]
    ref_tx, q_tx = INNERS4[name](), quantize_state(INNERS4[name](), bits=4, **SMALL_QUANTIZED)
    q_s = q_tx.init(params)
    assert isinstance(q_s, Quantized4State)
    block = SMALL_QUANTIZED["block"]
    decode = lambda t: jax.tree.map(
        lambda x: dequantize(x, block=block) if is_four(x) else x, t, is_leaf=is_four
    )
    ref_step = jax.jit(lambda g, s, p: ref_tx.update(g, decode(s), p))
    q_step = jax.jit(q_tx.update)
    quantised = 0
    for g in grads:
        ref_u, ref_s = ref_step(g, q_s.inner_state, params)
        u, q_s = q_step(g, q_s, params)  # the same params: compare the states
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        f_leaves = leaf_paths(ref_s)
        q_leaves = jax.tree_util.tree_flatten_with_path(q_s.inner_state, is_leaf=is_four)[0]
        assert len(f_leaves) == len(q_leaves)
        quantised = 0
        for (path, f), (_, q) in zip(f_leaves, q_leaves, strict=True):
            if not is_four(q):
                np.testing.assert_allclose(np.asarray(q), np.asarray(f), rtol=1e-5, atol=1e-6)
                continue
            quantised += 1
            second = "nu" in jax.tree_util.keystr(path)
            assert isinstance(q, (RankOne4Array, Unsigned4Array) if second else Quantized4Array)
            back, f = np.asarray(decode(q)), np.asarray(f)
            assert back.shape == f.shape
            gap = 1 / 16 if second else 0.225
            assert np.abs(back - f).max() <= gap * np.abs(f).max() * (1 + 1e-5) + 1e-30, path
    assert quantised >= 1 and int(q_s.count) == 2


def test_4bit_rounding_is_seeded_by_seed_step_and_leaf():
    params = small_quantized_params(1)
    grads = [random_grads_like(params, s) for s in range(2)]

    def run(seed):
        tx = quantize_state(optax.adam(1e-2), bits=4, seed=seed, **SMALL_QUANTIZED)
        s = tx.init(params)
        for g in grads:
            _, s = tx.update(g, s, params)
        return jax.tree.leaves(s)

    run = jax.jit(run)  # the seed traced: one compile for every seed

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c, strict=True))


# ----------------------------------------------------- 4 bits: the absmax, sharding


def _finite_absmax64(x, axis):
    """Largest finite |x| along ``axis`` in float64, 0 where there is none."""
    a = np.abs(x.astype(np.float64))
    return np.where(np.isfinite(a), a, 0.0).max(axis=axis, keepdims=True)


def test_the_absmax_matches_float64():
    """The block scale, the largest *finite* |x|, against float64, with NaN, ±inf, -0,
    rows without a finite value and rows of subnormals (which a float max may flush to
    0: a scale under float32's tiny codes its block as zeros either way)."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((7, 40)) * 10.0 ** rng.uniform(-30, 30, (7, 40))).astype(np.float32)
    x[0] = 0.0
    x[0, 1] = -0.0
    x[1, 3], x[1, 4], x[1, 5] = np.nan, np.inf, -np.inf
    x[2] = np.nan
    x[3, :4] = [np.inf, -np.inf, np.nan, np.inf]
    x[3, 4:] = 0.0
    x[4] = rng.uniform(-1, 1, 40).astype(np.float32) * np.float32(1e-39)  # subnormals
    run = jax.jit(_finite_absmax, static_argnums=1)
    tiny = np.finfo(np.float32).tiny
    for axis in (1, 0):
        want, got = _finite_absmax64(x, axis), np.asarray(run(jnp.asarray(x), axis), np.float64)
        normal = want >= tiny
        np.testing.assert_array_equal(got[normal], want[normal])
        assert np.all((got[~normal] == 0) | (got[~normal] == want[~normal]))


def test_the_absmax_is_one_program_on_every_backend():
    """A float max over the finite entries wherever it runs: no bit-pattern form on any
    backend (it was XLA:CPU's, measured no faster there)."""
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    absmax = jax.jit(lambda x: _finite_absmax(x, 1))
    for platform in ("cpu", "cuda", "rocm", "tpu"):
        text = jax.export.export(absmax, platforms=(platform,))(x).mlir_module()
        assert "bitcast_convert" not in text and "stablehlo.maximum" in text, platform


def _collective_counts(text):
    return {op: text.count(f" {op}(") + text.count(f" {op}-start(") for op in ("all-gather",)}


@pytest.mark.parametrize("bits", [8, 4])
def test_explicitly_sharded_states_are_quantised_per_shard(bits):
    """AdamW in 8 and 4 bits (4 bits: both maps) on a mesh with an explicit axis, the
    params sharded by rows and by columns: the compiled step has no all-gather (each
    shard holds whole blocks of 16), the codes, scales and rank-1 maxima keep the
    params' sharding, and params and state equal the unsharded run's bit for bit.
    Shards that split a block (24 columns over 8 devices) warn at init and are
    gathered, with the same values."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(5)
    grads = [{"w": jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)} for _ in range(2)]
    params = {"w": jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)}
    tx = quantize_state(optax.adamw(1e-2), bits=bits, block=16, min_size=0)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run(params, put=lambda t: t):
        p = put(params)
        s = jax.jit(tx.init)(p)
        compiled = jax.jit(step).lower(p, s, p).compile()
        for g in grads:
            p, s = compiled(p, s, put(g))
        return p, s, compiled.as_text()

    ref = run(params)[:2]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    for spec in (P("data", None), P(None, "data")):
        with jax.set_mesh(mesh):
            put = lambda t, spec=spec: jax.device_put(t, NamedSharding(mesh, spec))
            p, s, text = run(params, put)
        assert _collective_counts(text)["all-gather"] == 0, spec
        adam = s.inner_state[0]
        mu, nu = adam.mu["w"], adam.nu["w"]
        assert mu.codes.sharding.spec == spec and mu.absmax.sharding.spec == spec
        assert nu.codes.sharding.spec == spec
        if bits == 8:
            assert nu.absmax.sharding.spec == spec
        else:
            assert nu.row_max.sharding.spec == P(spec[0], None)
            assert nu.col_max.sharding.spec == P(None, spec[1])
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # 24 columns over 8 devices: 3 per shard, an odd piece (and a block of 16 split)
    split = params["w"][:, :24]
    q, dq = (quantize, dequantize) if bits == 8 else (quantize4, dequantize)
    with jax.set_mesh(mesh):
        put = lambda t: jax.device_put(t, NamedSharding(mesh, P(None, "data")))
        with pytest.warns(UserWarning, match=r"gathers it whole"):
            jax.eval_shape(tx.init, put({"w": split}))
        round_trip = jax.jit(lambda x: dq(q(x, signed=True, block=16), block=16))
        sharded = round_trip(put(split))
    want = jax.jit(round_trip)(split)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(want))


def test_bf16_params_with_stochastic_rounding_and_4bit_tiger_bytes():
    """bf16 params (2 bytes) with every update stochastically rounded, and Tiger's
    momentum in 4 bits: at most 2.6 bytes per parameter for params and state together,
    counted on abstract trees (a GPT-2-shaped layer, its biases and norms included)."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    params = {
        "embed": s(4096, 768),
        "attn": {"qkv": s(768, 2304), "qkv_bias": s(2304), "out": s(768, 768)},
        "mlp": {"up": s(768, 3072), "up_bias": s(3072), "down": s(3072, 768)},
        "norm": {"scale": s(768), "bias": s(768)},
    }
    tx = quantize_state(pure_bf16(tiger(1e-3)), bits=4)
    state = jax.eval_shape(tx.init, params)
    count = sum(x.size for x in jax.tree.leaves(params))
    total = (tree_bytes(params) + tree_bytes(state)) / count
    assert tree_bytes(params) == 2 * count
    assert total <= 2.6, total
    mu = optax.tree.get(state, "mu")
    assert isinstance(mu["attn"]["qkv"], Quantized4Array)
    assert mu["norm"]["scale"].dtype == jnp.bfloat16  # below min_size: bf16 with SR

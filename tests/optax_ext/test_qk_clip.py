"""QK-Clip: logits recomputed after the clip, bit-identical untouched heads, MLA, Flax feeds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import abstract_init_matches, attention_params, jit_once, leaf_paths

import optax_ext as ox
from optax_ext.attention import attention_with_max_logits, max_logits_per_head
from optax_ext.optimizers.muon import muon
from optax_ext.wrappers.qk_clip import MIN_FACTOR, MLA_PARTS, qk_clip


class Model(nn.Module):
    """Two attention layers that record their per-head max logits, and a dense layer."""

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        for i in range(2):
            attn = nn.MultiHeadDotProductAttention(
                4, attention_fn=attention_with_max_logits, name=f"attn_{i}"
            )
            x = x + attn(x, x, mask=mask, sow_weights=True)
        return nn.Dense(8, name="dense")(x)


def setup(seed=0, scale=6.0):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 6, 8)), jnp.float32)
    model = Model()
    params = model.init(jax.random.key(seed), x)["params"]
    # large query/key weights: logits of tens to hundreds; nonzero biases
    rng = np.random.default_rng(seed + 10)
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * scale if "query" in str(p) or "key" in str(p) else v, params
    )
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.asarray(rng.standard_normal(v.shape), v.dtype) if "bias" in str(p) else v,
        params,
    )
    return model, params, x


def measure(model, params, x):
    _, inter = model.apply({"params": params}, x, mutable=["intermediates"])
    return inter["intermediates"]


def ref_logit_max(params, x, layer):
    """Per-head max logit of layer 0 recomputed in float64 as QK-Clip defines it (q·k/√d, causal;
    kexue.fm/archives/11126)."""
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params[f"attn_{layer}"])
    x = np.asarray(x, np.float64)
    q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bld,dhk->blhk", x, p["key"]["kernel"]) + p["key"]["bias"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    causal = np.tril(np.ones((x.shape[1], x.shape[1]), bool))
    return np.where(causal, logits, -np.inf).max(axis=(0, 2, 3))


def test_clipped_heads_land_on_tau_and_the_rest_is_bit_identical():
    model, params, x = setup()
    s = np.asarray(measure(model, params, x)["attn_0"]["max_logits"][0])
    np.testing.assert_allclose(s, ref_logit_max(params, x, 0), rtol=1e-5)
    tau = float(np.median(s))  # half the heads of layer 0 exceed τ
    tx = qk_clip(optax.set_to_zero(), tau)
    inter = measure(model, params, x)
    u, _ = jax.jit(lambda g, s, p, m: tx.update(g, s, p, max_logits=m))(
        jax.tree.map(jnp.zeros_like, params), tx.init(params), params, inter
    )
    new = optax.apply_updates(params, u)
    # only layer 0's first attention sublayer is recomputed here: its input is x itself
    s_new = ref_logit_max(new, x, 0)
    clipped = s > tau
    assert clipped.any() and (~clipped).any()
    assert np.all(s_new[clipped] <= tau * (1 + 1e-5))
    np.testing.assert_allclose(s_new[clipped], tau, rtol=1e-5)
    np.testing.assert_allclose(s_new[~clipped], s[~clipped], rtol=1e-5)
    for path, value in leaf_paths(new):
        old = dict(leaf_paths(params))[path]
        if "attn_0" in path and ("query" in path or "key" in path):
            # head axis -2 of the kernel (d, heads, dim) and the bias (heads, dim)
            same = np.all(np.asarray(value) == np.asarray(old), axis=-1)
            same = same.all(axis=0) if same.ndim == 2 else same
            np.testing.assert_array_equal(same, ~clipped, err_msg=path)
        elif "attn_1" not in path:
            np.testing.assert_array_equal(value, old, err_msg=path)
    # after the clip the recorded maxima of every layer are at most τ (layer 1 sees a
    # changed input, so its logits moved too: the clip uses this step's measurement)
    s0 = np.asarray(measure(model, new, x)["attn_0"]["max_logits"][0])
    assert np.all(s0 <= tau * (1 + 1e-5))


def test_with_a_real_optimizer_the_clip_rescales_the_updated_weights():
    model, params, x = setup(1)
    inter = measure(model, params, x)
    s = {f"attn_{i}": np.asarray(inter[f"attn_{i}"]["max_logits"][0], np.float64) for i in (0, 1)}
    tau = float(np.median(s["attn_0"]))
    inner = muon(1e-2)
    tx = qk_clip(inner, tau)
    grads = jax.tree.map(
        lambda v: jnp.asarray(np.random.default_rng(2).standard_normal(v.shape), v.dtype), params
    )
    u, state = tx.update(grads, tx.init(params), params, max_logits=inter)
    u_inner, state_inner = inner.update(grads, inner.init(params), params)
    new, plain = optax.apply_updates(params, u), optax.apply_updates(params, u_inner)
    params_by_path = dict(leaf_paths(params))
    for path, value in leaf_paths(new):
        want = np.asarray(dict(leaf_paths(plain))[path], np.float64)
        layer = path.split("/")[0]
        if layer.startswith("attn") and path.split("/")[1] in ("query", "key"):
            gamma = np.sqrt(tau / np.maximum(s[layer], tau))  # per head
            want = want * gamma[:, None]  # head axis -2
            untouched = gamma == 1
            np.testing.assert_array_equal(
                np.asarray(value)[..., untouched, :],
                np.asarray(dict(leaf_paths(plain))[path])[..., untouched, :],
                err_msg=path,
            )
            # the update is (p + u)·γ - p, added to p: two float32 roundings at |p|'s scale
            atol = 2 * np.finfo(np.float32).eps * np.abs(np.asarray(params_by_path[path])).max()
            np.testing.assert_allclose(value, want, rtol=1e-6, atol=atol, err_msg=path)
        else:
            np.testing.assert_array_equal(value, dict(leaf_paths(plain))[path], err_msg=path)
    # the state holds the inner optimizer's
    assert jax.tree.structure(state.inner_state) == jax.tree.structure(state_inner)
    assert int(state.nonfinite_heads) == 0


def test_mla_parts_and_fused_heads():
    rng = np.random.default_rng(3)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    params = {
        "mla": {
            "q_nope": {"kernel": n(8, 2, 4)},
            "k_nope": {"kernel": n(8, 2, 4)},
            "q_rope": {"kernel": n(8, 2, 3)},
            "k_rope": {"kernel": n(8, 3)},  # shared by the heads: never clipped
        }
    }
    s = jnp.array([400.0, 20.0])
    tx = qk_clip(optax.set_to_zero(), 100.0, parts=MLA_PARTS)
    u, _ = tx.update(params, tx.init(params), params, max_logits={"mla": {"max_logits": s}})
    new = optax.apply_updates(params, u)
    for part, factor in (("q_nope", 0.5), ("k_nope", 0.5), ("q_rope", 0.25)):
        np.testing.assert_allclose(
            new["mla"][part]["kernel"][:, 0],
            params["mla"][part]["kernel"][:, 0] * factor,
            rtol=1e-6,
        )
        np.testing.assert_array_equal(
            new["mla"][part]["kernel"][:, 1], params["mla"][part]["kernel"][:, 1]
        )
    np.testing.assert_array_equal(new["mla"]["k_rope"]["kernel"], params["mla"]["k_rope"]["kernel"])
    # heads fused in the last axis: 2-D kernel (d, heads*dim), 1-D bias (heads*dim,)
    fused = {"a": {"query": {"kernel": n(8, 6), "bias": n(6)}, "key": {"kernel": n(8, 6)}}}
    tx = qk_clip(optax.set_to_zero(), 100.0)
    u, _ = tx.update(
        fused, tx.init(fused), fused, max_logits={"a": {"m": (jnp.array([25.0, 400.0]),)}}
    )
    new = optax.apply_updates(fused, u)
    np.testing.assert_array_equal(
        new["a"]["query"]["kernel"][:, :3], fused["a"]["query"]["kernel"][:, :3]
    )
    np.testing.assert_allclose(
        new["a"]["query"]["bias"][3:], fused["a"]["query"]["bias"][3:] * 0.5, rtol=1e-6
    )


def test_repeated_records_are_maxed_and_none_skips():
    params = {
        "attn": {"query": {"kernel": jnp.ones((2, 2, 1))}, "key": {"kernel": jnp.ones((2, 2, 1))}}
    }
    tx = qk_clip(optax.set_to_zero(), 100.0)
    records = {
        "intermediates": {
            "attn": {"max_logits": (jnp.array([50.0, 400.0]), jnp.array([400.0, 20.0]))}
        }
    }
    u, _ = tx.update(params, tx.init(params), params, max_logits=records)
    np.testing.assert_allclose(
        optax.apply_updates(params, u)["attn"]["query"]["kernel"][0, :, 0], [0.5, 0.5]
    )
    u, _ = tx.update(params, tx.init(params), params, max_logits=None)
    assert all(not bool(jnp.any(v)) for v in jax.tree.leaves(u))


def test_attention_helper_equals_flax_and_masks():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32) for _ in range(3))
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    np.testing.assert_allclose(
        attention_with_max_logits(q, k, v, mask=mask, deterministic=True),
        nn.dot_product_attention(q, k, v, mask=mask, deterministic=True),
        rtol=1e-6,
        atol=1e-6,
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / 2.0, k)
    want = np.where(np.asarray(mask, bool), np.asarray(logits), -np.inf).max(axis=(0, 2, 3))
    np.testing.assert_allclose(max_logits_per_head(logits, mask), want, rtol=1e-6)


def test_nnx_attention_records_and_clips():
    attn = nnx.MultiHeadAttention(
        2, 8, decode=False, rngs=nnx.Rngs(0), attention_fn=attention_with_max_logits
    )
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 8)), jnp.float32) * 10
    _, records = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)(attn, x)
    params = nnx.state(attn, nnx.Param)
    s = np.asarray(jax.tree.leaves(records)[0])
    tx = qk_clip(optax.set_to_zero(), float(s.min()) * 0.5)  # every head clipped
    u, _ = tx.update(params, tx.init(params), params, max_logits=records)
    new = optax.apply_updates(params, u)
    value = lambda tree, name: np.asarray(tree[name]["kernel"][...])
    assert np.all(value(new, "query") != value(params, "query"))
    np.testing.assert_array_equal(value(new, "value"), value(params, "value"))


def test_bad_input():
    params = {"attn": {"query": {"kernel": jnp.ones((2, 2, 1))}}}
    tx = qk_clip(optax.set_to_zero())
    with pytest.raises(ValueError, match=r"tau must be in \(0, inf\), got 0.0"):
        qk_clip(optax.sgd(0.1), tau=0.0)
    with pytest.raises(ValueError, match=r"parts power for 'query/kernel' must be in \(0, inf\)"):
        qk_clip(optax.sgd(0.1), parts={"query/kernel": -1.0})
    with pytest.raises(ValueError, match="needs the per-head max attention logits"):
        tx.update(params, tx.init(params), params)
    with pytest.raises(
        ValueError, match=r"no parameters .* under the attention module\(s\) \['other'\]"
    ):
        tx.update(
            params, tx.init(params), params, max_logits={"other": {"max_logits": jnp.ones(2)}}
        )
    with pytest.raises(ValueError, match="one value per head"):
        tx.update(
            params, tx.init(params), params, max_logits={"attn": {"max_logits": jnp.ones((2, 2))}}
        )
    with pytest.raises(ValueError, match="no axis -2 of 3 heads"):
        tx.update(
            params, tx.init(params), params, max_logits={"attn": {"max_logits": jnp.ones(3) * 200}}
        )


# ------------------------------------------------------------------- accumulation


ACCUMULATING = {
    "tiger": lambda: ox.tiger(0.0, accumulation_steps=2),
    "sgdm": lambda: ox.sgdm(0.0, accumulation_steps=2),
    "accumulate_gradients": lambda: ox.accumulate_gradients(optax.sgd(0.0), 2),
}


@pytest.mark.parametrize("name", sorted(ACCUMULATING))
def test_around_accumulation_clips_once_per_update_by_the_cycles_largest_logit(name):
    """With lr = 0 only the clip moves the weights: on a cycle's last micro-step only,
    by √(τ / max over the cycle's micro-batches), also while k changes (2, 3, 1, 4)."""
    tau, cycles = 100.0, (2, 3, 1, 4)
    params = attention_params(1)
    # per micro-step logits: a cycle's largest is mostly not on its last micro-step
    logits = [[400, 1], [1, 150]] + [[1, 1], [900, 1], [1, 1]] + [[1, 400]]
    logits = np.array(logits + [[150, 1], [1, 1], [1, 900], [1, 1]], np.float32)
    tx = ox.qk_clip(ACCUMULATING[name](), tau)
    step = jit_once(
        lambda g, s, p, m, k: tx.update(g, s, p, max_logits=m, set_accumulation_steps=k)
    )
    state, p = tx.init(params), params
    zeros = jax.tree.map(jnp.zeros_like, params)
    want = np.asarray(params["attn"]["query"]["kernel"], np.float64)
    t = 0
    for k in cycles:
        cycle_max = np.max(logits[t : t + k], axis=0)
        for i in range(k):
            record = {"attn": {"max_logits": jnp.asarray(logits[t], jnp.float32)}}
            u, state = step(zeros, state, p, record, jnp.int32(k))
            p = optax.apply_updates(p, u)
            if i == k - 1:
                want = want * np.sqrt(tau / np.maximum(cycle_max, tau))[:, None]
            np.testing.assert_allclose(p["attn"]["query"]["kernel"], want, rtol=1e-6)
            t += 1
    assert int(state.nonfinite_heads) == 0


def test_state_initialises_abstractly_and_keeps_the_inner_state():
    params = attention_params(11)
    state = abstract_init_matches(ox.qk_clip(ox.tiger(1e-3, accumulation_steps=2)), params)
    assert [x.shape for x in state.cycle_max] == [(2, 1), (2, 1)]  # per head, key and query
    state = abstract_init_matches(ox.qk_clip(optax.adamw(1e-3)), params)
    assert state.cycle_max == ()  # every call is an update: nothing to carry


def test_inside_accumulate_gradients_it_raises_giving_the_order():
    params = attention_params(3)
    zeros = jax.tree.map(jnp.zeros_like, params)
    record = {"attn": {"max_logits": jnp.array([400.0, 1.0])}}
    for inner in (ox.qk_clip(optax.sgd(0.0)), optax.chain(ox.qk_clip(optax.sgd(0.0)))):
        tx = ox.accumulate_gradients(inner, 2)
        with pytest.raises(ValueError, match=r"put it outside, ox\.qk_clip\(ox\.accumulate_grad"):
            tx.update(zeros, tx.init(params), params, max_logits=record)
    # with one micro-batch per update nothing is selected away: allowed
    tx = ox.accumulate_gradients(ox.qk_clip(optax.sgd(0.0)), 1)
    u, _ = tx.update(zeros, tx.init(params), params, max_logits=record)
    new = optax.apply_updates(params, u)["attn"]["query"]["kernel"]
    np.testing.assert_allclose(new[:, 0], params["attn"]["query"]["kernel"][:, 0] * 0.5, rtol=1e-6)


# ---------------------------------------------------------- extreme measurements


@pytest.mark.parametrize("jit", [False, True])
def test_a_huge_logit_clips_by_at_most_min_factor_and_never_zeroes(jit):
    """S = 1e38 asks for a factor of 1e-18, which p + u cannot carry (it came out 0): the
    clip is bounded at MIN_FACTOR per step, finite, against a float64 reference;
    S = 1e5 is within the bound and clipped exactly."""
    params = attention_params(4)
    grads = jax.tree.map(lambda x: x * 0.3, attention_params(5))
    tau = 100.0
    tx = ox.qk_clip(optax.sgd(0.1), tau)
    update = jax.jit(tx.update) if jit else tx.update
    s = np.array([1e38, 1e5])
    u, state = update(
        grads, tx.init(params), params, max_logits={"attn": {"max_logits": jnp.asarray(s)}}
    )
    new = optax.apply_updates(params, u)
    factor = np.sqrt(np.maximum(tau / s, MIN_FACTOR**2))  # float64: [2**-10, √1e-3]
    assert factor[0] == 2.0**-10
    for part in ("query", "key"):
        p = np.asarray(params["attn"][part]["kernel"], np.float64)
        g = np.asarray(grads["attn"][part]["kernel"], np.float64)
        want = (p - 0.1 * g) * factor[:, None]
        got = np.asarray(new["attn"][part]["kernel"], np.float64)
        assert np.all(np.isfinite(got)) and np.all(got[:, 0] != 0)
        # the written weight is p + u: the addition rounds at |p|'s scale
        atol = 2 * np.finfo(np.float32).eps * np.abs(p).max()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)
        np.testing.assert_array_equal(np.sign(got), np.sign(want))
    assert int(state.nonfinite_heads) == 0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_non_finite_logit_skips_the_head_and_is_counted(bad):
    """+inf gave a factor of 0 (the head's q and k zeroed for good) and NaN was dropped
    unseen: both are measurement faults, so the head is not clipped and the state
    counts it; the other heads and modules clip as usual."""
    params = {"b0": attention_params(6)["attn"], "b1": attention_params(7)["attn"]}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = ox.qk_clip(optax.sgd(0.0), 100.0)
    record = {
        "b0": {"max_logits": jnp.array([bad, 400.0])},
        "b1": {"max_logits": jnp.array([bad, bad])},
    }
    state = tx.init(params)
    for _ in range(2):
        u, state = jax.jit(tx.update)(zeros, state, params, max_logits=record)
    new = optax.apply_updates(params, u)
    for part in ("query", "key"):
        got, old = new["b0"][part]["kernel"], params["b0"][part]["kernel"]
        np.testing.assert_array_equal(got[:, 0], old[:, 0])
        np.testing.assert_allclose(got[:, 1], old[:, 1] * 0.5, rtol=1e-6)
        np.testing.assert_array_equal(new["b1"][part]["kernel"], params["b1"][part]["kernel"])
    assert int(state.nonfinite_heads) == 2 * 3  # three faulty heads on each of two calls


def test_a_tau_schedule_is_rejected_and_can_be_injected_by_update():
    with pytest.raises(ValueError, match=r"tau must be a number.*ox\.inject_hyperparams\(ox\.qk"):
        qk_clip(optax.sgd(0.1), tau=lambda count: 100.0)
    # τ = 100 for the first update, 10 after: read by update, not by micro-step
    params = attention_params(8)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = ox.inject_hyperparams(ox.qk_clip)(
        ox.tiger(0.0, accumulation_steps=2), tau=lambda n: jnp.where(n == 0, 100.0, 10.0)
    )
    state, p = tx.init(params), params
    record = {"attn": {"max_logits": jnp.array([40.0, 1.0])}}
    for _ in range(4):
        u, state = tx.update(zeros, state, p, max_logits=record)
        p = optax.apply_updates(p, u)
    old = params["attn"]["query"]["kernel"]
    np.testing.assert_allclose(p["attn"]["query"]["kernel"][:, 0], old[:, 0] * 0.5, rtol=1e-6)
    np.testing.assert_array_equal(p["attn"]["query"]["kernel"][:, 1], old[:, 1])


# ----------------------------------------------------------------- record paths


def test_a_suffix_record_must_name_one_module():
    """A record at ``attn`` clipped every module ending in ``attn``; a stray record beside
    a full one won the match. Both are errors naming the paths; full paths clip."""
    params = {"block_0": attention_params(9), "block_1": attention_params(10)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = qk_clip(optax.sgd(0.0), 100.0)
    s = lambda: {"max_logits": jnp.array([400.0, 1.0])}
    with pytest.raises(
        ValueError, match=r"record at 'attn' matches several .* 'block_0/attn' and 'block_1/attn'"
    ):
        tx.update(zeros, tx.init(params), params, max_logits={"attn": s()})
    one = {"block_0": params["block_0"]}
    with pytest.raises(
        ValueError, match=r"records at 'attn' and 'block_0/attn' both match .* 'block_0/attn'"
    ):
        tx.update(
            {"block_0": zeros["block_0"]},
            tx.init(one),
            one,
            max_logits={"attn": s(), "block_0": {"attn": s()}},
        )
    # one record per module, by its path or an unambiguous suffix of it
    wrapped = {"params": params}
    u, _ = tx.update(
        {"params": zeros},
        tx.init(wrapped),
        wrapped,
        max_logits={"block_0": {"attn": s()}, "params": {"block_1": {"attn": s()}}},
    )
    new = optax.apply_updates(wrapped, u)["params"]
    for block in ("block_0", "block_1"):
        old = params[block]["attn"]["query"]["kernel"]
        got = new[block]["attn"]["query"]["kernel"]
        np.testing.assert_allclose(got[:, 0], old[:, 0] * 0.5, rtol=1e-6)
        np.testing.assert_array_equal(got[:, 1], old[:, 1])

"""Muon against a float64 NumPy implementation of its formulas (kexue.fm/archives/10592, Moonlight
arXiv 2502.16982), optax.contrib.muon, Flax trees."""

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import (
    assert_trees_close,
    flax_like_params,
    jit_once,
    leaf_paths,
    random_grads_like,
    random_tree,
    run_path,
    run_steps,
    x64,
)
from jax.sharding import NamedSharding, PartitionSpec

from optax_ext.optimizers.msign import NS_COEFFICIENTS, msign_svd
from optax_ext.optimizers.muon import (
    MUON_LAYOUT_RULES,
    MUON_RULES,
    ScaleByMuonState,
    matrix_shape,
    muon,
    muon_labels,
    scale_by_muon,
)
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients

# ------------------------------------------------------------ float64 reference


def ref_msign(m, coeffs, steps, eps):
    """Newton–Schulz in float64: transpose to wide, X0 = Y/(‖Y‖_F + ε) for
    Y = M/max|M_ij|, then X <- aX + (bA + cA²)X with A = XXᵀ, row min(i, len-1) at step i."""
    rows = NS_COEFFICIENTS[coeffs]
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / np.abs(x).max()
    x = x / (np.sqrt(np.sum(x**2)) + eps)
    for i in range(steps):
        a, b, c = rows[min(i, len(rows) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def ref_matrices(path, shape, attention):
    """Muon's matrix view: Flax (d_in, d_out); conv (..., d_in, d_out) folded into
    (prod(...)·d_in, d_out); attention kernels (d_in, H, hd) / (H, hd, d_out) fused or per head.
    Returns (to matrices, back) functions on a float64 array."""
    name = path.split("/")
    if len(shape) == 3 and name[-2] in ("query", "key", "value"):
        d_in, h, hd = shape
        if attention == "fused":
            return lambda x: [x.reshape(d_in, h * hd)], lambda ms: ms[0].reshape(shape)
        return (
            lambda x: [x[:, i, :] for i in range(h)],
            lambda ms: np.stack(ms, axis=1),
        )
    if len(shape) == 3 and name[-2] == "out":
        h, hd, d_out = shape
        if attention == "fused":
            return lambda x: [x.reshape(h * hd, d_out)], lambda ms: ms[0].reshape(shape)
        return lambda x: list(x), lambda ms: np.stack(ms)
    return (
        lambda x: [x.reshape(-1, shape[-1])],
        lambda ms: ms[0].reshape(shape),
    )


def ref_scale(kind, d_in, d_out, rms=0.2, tau=None):
    """The shape scale; ``tau`` is τ_t of Su's 11772 scale √max(τ_t, d_out/d_in)."""
    if kind == "keller_to_mup":
        return math.sqrt(max(tau, d_out / d_in))
    return {
        "moonlight": rms * math.sqrt(max(d_in, d_out)),
        "keller": math.sqrt(max(1.0, d_out / d_in)),
        "mup": math.sqrt(d_out / d_in),
        "none": 1.0,
    }[kind]


def ref_muon(
    params,
    grads_seq,
    *,
    lr,
    beta,
    wd,
    nesterov=True,
    ns_coeffs="polar_express",
    ns_steps=5,
    scale="moonlight",
    attention="fused",
    eps=1e-7,
    guard=True,
    tau=None,
):
    """Runs Muon in float64 on every leaf given; lr(t) is the step's rate, and
    ``tau`` (a number or a function of the step t = 0, 1, ...) Su's τ_t.

    Returns the params after each step and the final momentum, by path."""
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    for t, grads in enumerate(grads_seq):
        tau_t = None if tau is None else float(tau(t) if callable(tau) else tau)
        for p, g in leaf_paths(grads):
            g = np.asarray(g, np.float64)
            if guard and not np.all(np.isfinite(g)):
                theta[p] = theta[p] - lr(t) * wd * theta[p]
                continue
            m[p] = beta * m[p] + g
            n = beta * m[p] + g if nesterov else m[p]
            split, join = ref_matrices(p, g.shape, attention)
            outs = []
            for mat in split(n):
                alpha = ref_scale(scale, *mat.shape, tau=tau_t)
                outs.append(alpha * ref_msign(mat, ns_coeffs, ns_steps, eps))
            theta[p] = theta[p] - lr(t) * (join(outs) + wd * theta[p])
    return theta, m


def kernels_only(tree):
    """The hidden kernels of a tree (rank >= 2, no embedding, bias or head), paths kept."""
    return nested(
        {
            p: x
            for p, x in leaf_paths(tree)
            if x.ndim >= 2 and p.endswith("kernel") and "/head/" not in p
        }
    )


def small_tree(seed):
    """Every kind of leaf muon() routes, small: embedding, attention, dense, bias, norm."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
    return {
        "embed": {"embedding": n(24, 8)},
        "attn": {"query": {"kernel": n(8, 2, 4), "bias": n(2, 4)}, "out": {"kernel": n(2, 4, 8)}},
        "mlp": {"kernel": n(8, 16), "bias": n(16)},
        "norm": {"scale": 1 + n(8)},
        "lm_head": {"kernel": n(8, 24)},
    }


def tree_like(params, by_path):
    leaves = [by_path[p] for p, _ in leaf_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


run = functools.partial(run_steps, jit=False)


def schedule(i):
    return 2e-2 / (1.0 + 0.5 * i)


def grads_seq(params, n, seed):
    return [random_grads_like(params, seed * 100 + t) for t in range(n)]


def tau_steps(t):
    """τ_t from 1 to 0 over four steps, exact in any float dtype; at 0.75 and 0.25 it is
    above and below the d_out/d_in = 0.5 of the tall matrices."""
    return jnp.asarray([1.0, 0.75, 0.25, 0.0])[jnp.minimum(t, 3)]


# ------------------------------------------------------- the float64 reference


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(nesterov=False, ns_coeffs="keller", scale="keller"),
        dict(ns_coeffs="su", ns_steps=6, scale="mup", attention="per_head"),
        dict(ns_coeffs="su_single", ns_steps=3, scale="none"),
        # (16, 16), (16, 32) and (32, 16) matrices; per head (16, 8) and (8, 16)
        dict(scale="keller_to_mup", tau=tau_steps),
        dict(nesterov=False, scale="keller_to_mup", tau=0.75, attention="per_head"),
    ],
    ids=[
        "moonlight",
        "keller",
        "su-mup-per-head",
        "su_single-none",
        "keller_to_mup-schedule",
        "keller_to_mup-constant-per-head",
    ],
)
def test_scale_by_muon_matches_float64_reference(kw):
    with x64():
        params = jax.tree.map(
            lambda x: x.astype(jnp.float64), kernels_only(flax_like_params(1, layers=1))
        )
        grads = grads_seq(params, 4, 1)
        tx = optax.chain(scale_by_muon(beta=0.9, **kw), optax.scale(-0.05))
        got, state = run(tx, params, grads)
    want, m = ref_muon(params, grads, lr=lambda t: 0.05, beta=0.9, wd=0.0, **kw)
    assert_trees_close(got, tree_like(params, want), rtol=1e-10, atol=1e-10)
    # the state holds E = (1-β)M, Moonlight's M damped into the gradients' range
    damped = {p: (1 - 0.9) * x for p, x in m.items()}
    assert_trees_close(state[0].mu, tree_like(params, damped), rtol=1e-12, atol=1e-12)
    assert int(state[0].count) == 4


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.filterwarnings("ignore:scale_by_muon. no layout rule matches")  # random names
def test_random_trees_float32(seed):
    params = kernels_only(random_tree(seed, max_leaves=6))
    grads = grads_seq(params, 5, seed)
    got, _ = run(optax.chain(scale_by_muon(), optax.scale(-1e-2)), params, grads)
    want, _ = ref_muon(params, grads, lr=lambda t: 1e-2, beta=0.95, wd=0.0)
    # float32 Newton–Schulz: rounding of order 1e-6 relative to the O(1) direction, x lr
    assert_trees_close(got, tree_like(params, want), rtol=1e-5, atol=2e-7)


@pytest.mark.parametrize("other", ["adamw", "tiger"])
def test_muon_alias_routes_and_matches_reference(other):
    params = flax_like_params(4, layers=1)
    grads = grads_seq(params, 4, 4)
    tx = muon(
        schedule,
        beta=0.9,
        weight_decay=0.1,
        other=other,
        other_learning_rate=3e-3,
        other_weight_decay=0.01,
    )
    got, _ = run(tx, params, grads)
    muon_paths = {p for p, lab in leaf_paths(muon_labels(params)) if lab == "muon"}
    # Muon leaves: the float64 reference with decoupled decay multiplied by the lr
    sub = lambda tree, keep: {p: x for p, x in leaf_paths(tree) if (p in muon_paths) == keep}
    want, _ = ref_muon(
        sub(params, True), [sub(g, True) for g in grads], lr=schedule, beta=0.9, wd=0.1
    )
    for p, x in leaf_paths(got):
        if p in muon_paths:
            np.testing.assert_allclose(x, want[p], rtol=1e-5, atol=2e-7, err_msg=p)
    # the other leaves: exactly the second optimizer run on them alone
    others = sub(params, False)
    if other == "tiger":
        inner = tiger(3e-3, weight_decay=0.01)
    else:  # our AdamW branch decays everything but biases and norm scales
        decays = {p: not p.endswith(("bias", "scale")) for p in others}
        inner = optax.adamw(3e-3, weight_decay=0.01, mask=decays)
    alone, _ = run(inner, others, [sub(g, False) for g in grads])
    for p, x in leaf_paths(got):
        if p not in muon_paths:
            np.testing.assert_allclose(x, alone[p], rtol=1e-6, atol=1e-7, err_msg=p)


def ref_adamw(params, grads_seq, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW in float64 (bias-corrected moments, decay multiplied by the lr, none on
    biases and norm scales); the params after the last step, by path."""
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    v = {p: np.zeros_like(x) for p, x in theta.items()}
    for t, grads in enumerate(grads_seq):
        for p, g in leaf_paths(grads):
            g = np.asarray(g, np.float64)
            m[p] = b1 * m[p] + (1 - b1) * g
            v[p] = b2 * v[p] + (1 - b2) * g * g
            m_hat, v_hat = m[p] / (1 - b1 ** (t + 1)), v[p] / (1 - b2 ** (t + 1))
            decay = 0.0 if p.endswith(("bias", "scale")) else wd
            theta[p] = theta[p] - lr(t) * (m_hat / (np.sqrt(v_hat) + eps) + decay * theta[p])
    return theta


def test_default_routing_is_moonlights_in_float64(float64):
    """``muon(lr)`` with its defaults: Muon on the hidden kernels and AdamW at the same
    learning rate and weight decay on every other leaf (embeddings, head, biases, norm
    scales), both against float64 references over several steps."""
    params = jax.tree.map(lambda x: x.astype(jnp.float64), small_tree(31))
    grads = [jax.tree.map(lambda g: g.astype(jnp.float64), g) for g in grads_seq(params, 5, 31)]
    got, _ = run(muon(schedule), params, grads)
    labels = dict(leaf_paths(muon_labels(params)))
    assert {p for p, lab in labels.items() if lab == "other"} == {
        "embed/embedding", "attn/query/bias", "mlp/bias", "norm/scale", "lm_head/kernel"
    }  # fmt: skip
    sub = lambda tree, label: {p: x for p, x in leaf_paths(tree) if labels[p] == label}
    want = ref_muon(sub(params, "muon"), [sub(g, "muon") for g in grads], lr=schedule,
                    beta=0.95, wd=0.1)[0]  # fmt: skip
    want |= ref_adamw(sub(params, "other"), [sub(g, "other") for g in grads], lr=schedule, wd=0.1)
    for p, x in leaf_paths(got):
        np.testing.assert_allclose(x, want[p], rtol=1e-10, atol=1e-12, err_msg=p)


def test_default_other_leaves_are_guarded_against_non_finite_gradients():
    """A NaN in an embedding's gradient (an AdamW leaf of the default routing) never
    reaches the params: the other leaves skip that step, the bad one shrinks toward 0
    by the nan_guard ratio, the fault is counted, and the Muon leaves step as usual."""
    params = small_tree(41)
    bad = random_grads_like(params, 1)
    bad["embed"]["embedding"] = bad["embed"]["embedding"].at[2, 3].set(jnp.nan)
    tx = muon(1e-2)
    state = tx.init(params)
    u, state = tx.update(bad, state, params)
    new = optax.apply_updates(params, u)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    np.testing.assert_allclose(new["embed"]["embedding"], 0.99 * params["embed"]["embedding"],
                               rtol=1e-6)  # fmt: skip
    for leaf in (("mlp", "bias"), ("norm", "scale"), ("lm_head", "kernel")):
        np.testing.assert_array_equal(new[leaf[0]][leaf[1]], params[leaf[0]][leaf[1]])
    assert not np.allclose(new["mlp"]["kernel"], params["mlp"]["kernel"])  # Muon stepped
    guard = state.inner_states["other"].inner_state
    assert (int(guard.skipped_steps), int(guard.shrunk_leaves)) == (1, 1)
    # without the guard the NaN reaches the embedding, as in optax.adamw
    raw = muon(1e-2, guard_nan=False)
    u, _ = raw.update(bad, raw.init(params), params)
    assert not bool(jnp.all(jnp.isfinite(u["embed"]["embedding"])))


def test_equals_optax_contrib_muon_where_they_coincide():
    # same coefficients, consistent_rms 0.2 (= moonlight), all-Muon tree, Nesterov off
    params = {
        f"dense_{i}": {
            "kernel": jnp.asarray(np.random.default_rng(i).standard_normal(s), jnp.float32)
        }
        for i, s in enumerate([(16, 24), (32, 8)])
    }
    grads = grads_seq(params, 4, 5)
    # optax's positional order: ns_coeffs, ns_steps, beta, eps, weight_decay
    keller = ((3.4445, -4.7750, 2.0315),)
    ours = muon(schedule, keller, 5, 0.9, 1e-8, 0.1, nesterov=False)
    theirs = optax.contrib.muon(
        schedule, keller[0], 5, 0.9, 1e-8, 0.1, nesterov=False, consistent_rms=0.2
    )
    p1, s1 = run(ours, params, grads, jit=True)
    p2, _ = run(theirs, params, grads, jit=True)
    assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7)
    # with Nesterov on they differ by design (optax bias-corrects the two terms differently)
    p3, _ = run(
        muon(schedule, "keller", beta=0.9, eps=1e-8, weight_decay=0.1), params, grads[:2], jit=True
    )
    p4, _ = run(
        optax.contrib.muon(schedule, beta=0.9, weight_decay=0.1, consistent_rms=0.2, eps=1e-8),
        params,
        grads[:2],
        jit=True,
    )
    assert not np.allclose(p3["dense_0"]["kernel"], p4["dense_0"]["kernel"], atol=1e-4)


def test_moonlight_scale_gives_update_rms_02_on_full_rank_matrices():
    for shape in [(64, 64), (48, 96), (128, 32)]:
        g = jnp.asarray(np.random.default_rng(shape[0]).standard_normal(shape), jnp.float32)
        exact = scale_by_muon(ns_steps=10)  # converged Newton–Schulz: msign itself
        u, _ = exact.update(g, exact.init(g))
        assert float(jnp.sqrt(jnp.mean(u**2))) == pytest.approx(0.2, rel=2e-3)
        u, _ = scale_by_muon().update(g, scale_by_muon().init(g))  # 5 steps: σ in [0.85, 1.12]
        assert 0.2 * 0.8 < float(jnp.sqrt(jnp.mean(u**2))) < 0.2 * 1.12


def test_layouts_conv_stacked_and_per_head():
    assert matrix_shape("conv/kernel", (3, 3, 8, 16)) == (72, 16)
    assert matrix_shape("attn/query/kernel", (32, 4, 8)) == (32, 32)
    assert matrix_shape("attn/query/kernel", (32, 4, 8), attention="per_head") == (4, 32, 8)
    assert matrix_shape("attn/out/kernel", (4, 8, 32)) == (32, 32)
    assert matrix_shape("attn/out/kernel", (4, 8, 32), attention="per_head") == (4, 8, 32)
    stacked = [(r"layers/", "stacked")] + list(optax_ext_layout())
    assert matrix_shape("layers/mlp/kernel", (6, 32, 64), stacked) == (6, 32, 64)
    # a stacked leaf equals its matrices run one by one
    rng = np.random.default_rng(7)
    g = jnp.asarray(rng.standard_normal((3, 8, 12)), jnp.float32)
    tx = scale_by_muon(layout=[("", "stacked")])
    u, _ = tx.update({"k": g}, tx.init({"k": g}))
    for i in range(3):
        one = scale_by_muon()
        ui, _ = one.update(g[i], one.init(g[i]))
        np.testing.assert_allclose(u["k"][i], ui, rtol=1e-5, atol=1e-6)


def optax_ext_layout():
    return MUON_LAYOUT_RULES


def nested(paths_to_leaves):
    """A tree of dicts from ``{"a/b/kernel": leaf}``."""
    out = {}
    for path, leaf in paths_to_leaves.items():
        *parents, last = path.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def muon_warnings(fn):
    """The layout warnings ``fn()`` emits (every one: no once-per-location filter)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "scale_by_muon" in str(w.message)]


def test_scanned_dense_kernel_is_a_stack_of_layers():
    # nn.scan stacks its layers' (d_in, d_out) kernels along a leading axis. Folded into
    # one (L·d_in, d_out) matrix like a conv kernel, the layers shared one msign: per-layer
    # update RMS was [0.011, 0.098, 0.265, 0.283] for gradients scaled 1, 10, 100, 1000.
    rng = np.random.default_rng(20)
    g = rng.standard_normal((4, 16, 32)) * np.array([1.0, 10.0, 100.0, 1000.0])[:, None, None]
    path = "ScanBlock_0/Dense_0/kernel"
    tx = scale_by_muon(nesterov=False, ns_steps=8)
    grads = nested({path: jnp.asarray(g, jnp.float32)})
    assert muon_warnings(lambda: tx.init(grads)) == []
    u, _ = tx.update(grads, tx.init(grads))
    u = np.asarray(u["ScanBlock_0"]["Dense_0"]["kernel"], np.float64)
    for i in range(4):  # each layer: moonlight's 0.2·√max(d_in, d_out)·msign of its own
        np.testing.assert_allclose(u[i], 0.2 * math.sqrt(32) * msign_svd(g[i]), atol=1e-4)
        assert np.sqrt(np.mean(u[i] ** 2)) == pytest.approx(0.2, rel=1e-3)


@pytest.mark.parametrize(
    "path, shape, matrices",
    [
        ("ScanBlock_0/Dense_0/kernel", (4, 16, 32), (4, 16, 32)),  # nn.scan
        ("layers/mlp/kernel", (4, 16, 32), (4, 16, 32)),  # nnx.vmap / nnx.scan stacks
        ("blocks/mlp/kernel", (4, 16, 32), (4, 16, 32)),
        ("VmapMLP_0/Dense_0/kernel", (3, 16, 32), (3, 16, 32)),
        ("moe/experts/wi/kernel", (8, 16, 32), (8, 16, 32)),
        ("stacked_layers/kernel", (2, 2, 16, 32), (2, 2, 16, 32)),
        ("Conv_0/kernel", (3, 16, 32), (48, 32)),  # real conv kernels: spatial axes folded
        ("Conv_0/kernel", (3, 3, 8, 16), (72, 16)),
        ("conv1/kernel", (5, 5, 3, 8), (75, 8)),
        ("layers/0/conv/kernel", (3, 16, 32), (48, 32)),  # a list index: not a stack
        ("module/kernel", (1, 16, 32), (16, 32)),  # one matrix either way
    ],
)
def test_unmatched_rank3_leaves_are_read_by_their_names(path, shape, matrices):
    assert matrix_shape(path, shape) == matrices
    tree = nested({path: jax.ShapeDtypeStruct(shape, jnp.float32)})
    assert muon_warnings(lambda: scale_by_muon().init(tree)) == []


def test_ambiguous_rank3_leaf_warns_once_with_the_fix():
    # (L, d_in, d_out) or (width, d_in, d_out): the names say neither (or both, a scanned
    # conv), so the conv view is kept and init says so, naming the paths and the rule
    tree = nested(
        {
            "mlp/wi/kernel": jnp.zeros((4, 16, 32)),
            "ScanBlock_0/Conv_0/kernel": jnp.zeros((2, 3, 8, 16)),
            "mlp/wo/kernel": jnp.zeros((32, 16)),
        }
    )
    tx = scale_by_muon()
    [message] = muon_warnings(lambda: tx.init(tree))
    assert "'mlp/wi/kernel' (4, 16, 32) as one (64, 32) matrix" in message
    assert "'ScanBlock_0/Conv_0/kernel' (2, 3, 8, 16) as one (48, 16) matrix" in message
    assert "layout=[(r'ScanBlock_0/Conv_0/kernel$', 'stacked')]" in message
    assert "mlp/wo" not in message
    assert matrix_shape("mlp/wi/kernel", (4, 16, 32)) == (64, 32)
    # an explicit rule settles it, either way, without a warning
    for name, matrices in (("stacked", (4, 16, 32)), ("conv", (64, 32))):
        rules = [(r"(wi|Conv_0)/kernel$", name)] + list(MUON_LAYOUT_RULES)
        assert muon_warnings(lambda rules=rules: scale_by_muon(layout=rules).init(tree)) == []
        assert matrix_shape("mlp/wi/kernel", (4, 16, 32), rules) == matrices


def test_bf16_params_and_mu_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), small_tree(8))
    got, state = run(muon(1e-2, mu_dtype=jnp.float32), params, grads_seq(params, 1, 8))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    # every first moment (Muon's and the other optimizer's mu) in mu_dtype; AdamW's
    # second moment follows the params, as in optax.adamw(mu_dtype=...)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    name = lambda path: "/".join(str(getattr(k, "name", getattr(k, "key", k))) for k in path)
    mus = [x for path, x in leaves if getattr(x, "ndim", 0) >= 1 and "nu" not in name(path)]
    nus = [x for path, x in leaves if getattr(x, "ndim", 0) >= 1 and "nu" in name(path)]
    assert mus and all(x.dtype == jnp.float32 for x in mus)
    assert nus and all(x.dtype == jnp.bfloat16 for x in nus)
    # bf16 Newton–Schulz: as close to the exact msign as float32's (the two differ from
    # each other by bf16 rounding amplified by the large first-step coefficients)
    g = np.random.default_rng(8).standard_normal((32, 48))
    exact = 0.2 * math.sqrt(48) * msign_svd(g)
    for dtype in (None, jnp.bfloat16):
        tx = scale_by_muon(compute_dtype=dtype)
        u, _ = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.asarray(g, jnp.float32)))
        u = np.asarray(u, np.float64)
        sv = np.linalg.svd(u / (0.2 * math.sqrt(48)), compute_uv=False)
        assert 0.78 < sv.min() and sv.max() < 1.15, (dtype, sv.min(), sv.max())
        # within the σ range above: |u - exact| stays below max|σ - 1| of exact's RMS
        assert np.sqrt(np.mean((u - exact) ** 2)) < 0.15 * np.sqrt(np.mean(exact**2))


def test_float16_momentum_stays_finite_with_large_gradients():
    # Moonlight's undamped M settles near G/(1-β) = 20·G: with mu_dtype=float16 gradients
    # of scale 5000 overflowed it to inf at step 5 and the params turned NaN. The state
    # now holds E = (1-β)M, within the gradients' range; the updates are the same.
    key, key1 = jax.random.split(jax.random.key(0))
    params = {"Dense_0": {"kernel": jax.random.normal(key, (32, 32))}}
    g = {"Dense_0": {"kernel": jax.random.normal(key1, (32, 32)) * 5000.0}}
    got, state = run_steps(muon(1e-3, mu_dtype=jnp.float16), params, [g] * 8)
    want, _ = run_steps(muon(1e-3, mu_dtype=jnp.float32), params, [g] * 8)
    mu = state.inner_states["muon"].inner_state[0]
    assert mu.mu["Dense_0"]["kernel"].dtype == jnp.float16
    assert bool(jnp.all(jnp.isfinite(mu.mu["Dense_0"]["kernel"])))
    assert int(mu.shrunk_leaves) == 0
    assert_trees_close(got, want, rtol=0, atol=1e-5)


def test_momentum_beyond_its_dtype_is_discarded_and_counted():
    # float32 gradients whose average exceeds float16's 65504 cannot enter a float16
    # momentum: the leaf is held like a non-finite one (zero direction, momentum kept)
    # and counted; one large entry that the average absorbs is stored as usual
    rng = np.random.default_rng(21)
    g = {k: jnp.asarray(rng.standard_normal((8, 12)), jnp.float32) for k in ("a", "b")}
    tx = scale_by_muon(mu_dtype=jnp.float16)
    _, state = tx.update(g, tx.init(g))
    u, new = tx.update(dict(g, a=g["a"].at[0, 0].set(1e5)), state)  # E gets 0.05·1e5
    assert bool(jnp.all(u["a"] != 0)) and int(new.shrunk_leaves) == 0
    big = dict(g, a=g["a"].at[0, 0].set(2e6))  # E would get 1e5
    u, new = tx.update(big, state)
    assert not bool(jnp.any(u["a"])) and bool(jnp.all(u["b"] != 0))
    np.testing.assert_array_equal(new.mu["a"], state.mu["a"])
    assert (int(new.skipped_steps), int(new.shrunk_leaves)) == (1, 1)
    # bfloat16 has float32's range: nothing to discard
    tx = scale_by_muon(mu_dtype=jnp.bfloat16)
    u, new = tx.update(big, tx.init(g))
    assert bool(jnp.all(u["a"] != 0)) and int(new.shrunk_leaves) == 0
    assert bool(jnp.all(jnp.isfinite(new.mu["a"])))


# ---------------------------------------------------------- non-finite gradients


def test_nonfinite_leaf_keeps_momentum_and_gets_zero_direction():
    params = kernels_only(flax_like_params(9, layers=1))
    tx = scale_by_muon()
    state = tx.init(params)
    g = random_grads_like(params, 0)
    _, state = tx.update(g, state, params)
    name, other = "params/layer_0/mlp/Dense_0", "params/layer_0/mlp/Dense_1"
    get = lambda t, n: t["params"][n.split("/")[1]]["mlp"][n.split("/")[3]]
    # a -0 entry too: the kept momentum must be the same bits, not merely equal
    get(state.mu, name)["kernel"] = get(state.mu, name)["kernel"].at[0, 1].set(-0.0)
    bits = lambda s: np.asarray(get(s.mu, name)["kernel"]).view(np.uint32)
    for bad_value in (jnp.nan, jnp.inf):
        bad = jax.tree.map(lambda x: x, g)
        leaf = get(bad, name)
        leaf["kernel"] = leaf["kernel"].at[0, 0].set(bad_value)
        u, new = tx.update(bad, state, params)
        assert not bool(jnp.any(get(u, name)["kernel"])), bad_value
        np.testing.assert_array_equal(bits(new), bits(state))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
        assert bool(jnp.any(get(u, other)["kernel"] != 0))
    # in muon() only the weight decay moves the leaf; the reference does the same
    with x64():
        p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        seq = grads_seq(p64, 3, 9)
        seq[1] = jax.tree.map(lambda x: x, seq[1])
        leaf = get(seq[1], name)
        leaf["kernel"] = leaf["kernel"].at[1, 2].set(jnp.nan)
        got, _ = run(muon(schedule, beta=0.9, weight_decay=0.1), p64, seq)
    want, _ = ref_muon(p64, seq, lr=schedule, beta=0.9, wd=0.1)
    assert_trees_close(got, tree_like(p64, want), rtol=1e-10, atol=1e-10)


def test_nonfinite_leaves_are_counted():
    # the guard acted without a trace: the state now counts as Tiger's and nan_guard's do
    rng = np.random.default_rng(22)
    g = {k: jnp.asarray(rng.standard_normal((6, 10)), jnp.float32) for k in ("a", "b")}
    tx = scale_by_muon()
    step = jax.jit(tx.update)
    state = tx.init(g)
    counts = []
    for bad in ({}, {"a": jnp.nan}, {"a": jnp.inf, "b": jnp.nan}, {}, {"b": -jnp.inf}):
        grads = {k: x.at[1, 2].set(bad[k]) if k in bad else x for k, x in g.items()}
        _, state = step(grads, state)
        counts.append((int(state.skipped_steps), int(state.shrunk_leaves)))
    assert counts == [(0, 0), (1, 1), (2, 3), (2, 3), (3, 4)]
    assert state.skipped_steps.dtype == state.shrunk_leaves.dtype == jnp.int32
    # in muon() the Muon part's state counts a Muon leaf (with other="tiger", Tiger counts its own)
    params = small_tree(22)
    bad = random_grads_like(params, 0)
    bad["mlp"]["kernel"] = bad["mlp"]["kernel"].at[0, 0].set(jnp.nan)
    tx = muon(1e-2, other="tiger")
    _, state = tx.update(bad, tx.init(params), params)
    counted = state.inner_states["muon"].inner_state[0]
    assert (int(counted.skipped_steps), int(counted.shrunk_leaves)) == (1, 1)
    assert int(state.inner_states["other"].inner_state.shrunk_leaves) == 0


def test_without_guard_nan_propagates():
    g = {"k": jnp.full((3, 4), jnp.nan)}
    tx = scale_by_muon(guard_nan=False)
    u, _ = tx.update(g, tx.init(g))
    assert bool(jnp.all(jnp.isnan(u["k"])))


# ------------------------------------------------------------- routing on Flax


class GPT2Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln_1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attn")(h, h)
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(4 * self.width, name="c_fc")(h)
        return x + nn.Dense(self.width, name="c_proj")(nn.gelu(h))


class GPT2(nn.Module):
    """GPT-2 with a tied head: the token embedding is the output layer."""

    vocab: int = 50
    width: int = 16

    @nn.compact
    def __call__(self, ids):
        wte = nn.Embed(self.vocab, self.width, name="wte")
        x = wte(ids) + nn.Embed(32, self.width, name="wpe")(jnp.arange(ids.shape[1]))
        for i in range(2):
            x = GPT2Block(self.width, 2, name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return w * x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)


class Llama(nn.Module):
    """Llama's names (Hugging Face Flax): q/k/v/o_proj, gate/up/down_proj, untied lm_head."""

    vocab: int = 50
    width: int = 16

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed_tokens")(ids)
        for i in range(2):
            h = RMSNorm(name=f"layers_{i}_input_layernorm")(x)
            dense = lambda n, f, i=i: nn.Dense(f, use_bias=False, name=f"layers_{i}_{n}")
            q, k, v = (dense(n, self.width)(h) for n in ("q_proj", "k_proj", "v_proj"))
            att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 4.0) @ v
            x = x + dense("o_proj", self.width)(att)
            h = RMSNorm(name=f"layers_{i}_post_attention_layernorm")(x)
            gate = nn.silu(dense("gate_proj", 3 * self.width)(h)) * dense(
                "up_proj", 3 * self.width
            )(h)
            x = x + dense("down_proj", self.width)(gate)
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(RMSNorm(name="norm")(x))


class NnxGPT(nnx.Module):
    def __init__(self, rngs, vocab=20, width=8):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, width, decode=False, rngs=rngs)
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.mlp = nnx.Linear(width, 4 * width, rngs=rngs)
        self.proj = nnx.Linear(4 * width, width, rngs=rngs)
        self.lm_head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn(self.norm(x))
        x = x + self.proj(nnx.gelu(self.mlp(x)))
        return self.lm_head(x)


def _check_routing(params, expect_muon):
    labels = dict(leaf_paths(muon_labels(params)))
    got = {p for p, lab in labels.items() if lab == "muon"}
    assert got == expect_muon, sorted(got ^ expect_muon)
    for p in labels:
        if "embed" in p or "wte" in p or "wpe" in p or "lm_head" in p:
            assert labels[p] == "other", p


def test_routing_linen_gpt2_tied_embedding_and_llama():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 9)))
    # shapes are all routing needs: abstract init, nothing is computed
    gpt = GPT2()
    p = jax.eval_shape(gpt.init, jax.random.key(0), ids)["params"]
    hidden = {
        f"h_{i}/{m}/kernel"
        for i in range(2)
        for m in ("attn/query", "attn/key", "attn/value", "attn/out", "c_fc", "c_proj")
    }
    _check_routing(p, hidden)
    llama = Llama()
    p = jax.eval_shape(llama.init, jax.random.key(1), ids)["params"]
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    _check_routing(p, {f"layers_{i}_{n}/kernel" for i in range(2) for n in names})


def test_routing_nnx_and_nnx_optimizer():
    model = NnxGPT(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    expect = {"attn/query/kernel", "attn/key/kernel", "attn/value/kernel", "attn/out/kernel"}
    _check_routing(params, expect | {"mlp/kernel", "proj/kernel"})
    # the NNX state initialises a Muon optimizer with NNX's own Optimizer (the update is
    # the same code as on Linen trees, tested above and below)
    optimizer = nnx.Optimizer(model, muon(1e-2), wrt=nnx.Param)
    mus = jax.tree.leaves(optimizer.opt_state)
    assert any(getattr(x, "ndim", 0) == 3 for x in mus)  # Muon's momentum of the attention


@pytest.mark.parametrize(
    "path, label",
    [
        # embeddings and heads named otherwise than embed/head, in any case
        ("token_emb/kernel", "other"),
        ("TokEmb/kernel", "other"),
        ("pos_emb/kernel", "other"),
        ("EMBED/kernel", "other"),
        ("Unembed_0/kernel", "other"),
        ("wte/kernel", "other"),
        ("LMHead/kernel", "other"),
        ("LM_Head/kernel", "other"),
        ("Head_0/kernel", "other"),
        ("head/Dense_0/kernel", "other"),
        ("cls_head/kernel", "other"),
        ("Classifier_0/kernel", "other"),
        ("output/kernel", "other"),
        ("Output_0/kernel", "other"),
        ("logits/kernel", "other"),
        ("logits_dense/kernel", "other"),
        ("vocab_proj/kernel", "other"),
        # hidden layers whose names hold those words keep Muon
        ("MultiHeadDotProductAttention_0/query/kernel", "muon"),
        ("multi_head/query/kernel", "muon"),
        ("encoder/layer/0/output/dense/kernel", "muon"),  # BERT's MLP output
        ("attention/output/dense/kernel", "muon"),
        ("token_mixing/Dense_0/kernel", "muon"),  # MLP-Mixer
        ("attn/out/kernel", "muon"),
        ("member/kernel", "muon"),
        ("headless/kernel", "muon"),
    ],
)
def test_routing_by_name_embeddings_and_heads(path, label):
    # LMHead (case), token_emb, output and vocab_proj went to Muon
    labels = dict(leaf_paths(muon_labels(nested({path: jnp.zeros((4, 6))}))))
    assert labels == {path: label}


def test_rules_are_user_overridable():
    params = flax_like_params(10)
    rules = [(r"head/kernel$", "muon")] + list(MUON_RULES)
    labels = dict(leaf_paths(muon_labels(params, rules)))
    assert labels["params/head/kernel"] == "muon"
    assert labels["params/embed/embedding"] == "other"
    all_other = dict(leaf_paths(muon_labels(params, [("", "other")])))
    assert set(all_other.values()) == {"other"}
    # 1-D leaves never go to Muon, whatever the rules say
    assert set(dict(leaf_paths(muon_labels({"b": jnp.ones(3)}, [("", "muon")]))).values()) == {
        "other"
    }


# ------------------------------------------------------- optax integration


def test_inject_hyperparams_traced_steps_and_lr():
    params = flax_like_params(11, layers=1)
    grads = grads_seq(params, 3, 11)
    injected = optax.inject_hyperparams(muon)(
        learning_rate=1e-2, beta=0.9, weight_decay=0.05, ns_steps=5
    )
    plain = muon(1e-2, beta=0.9, weight_decay=0.05)
    p1, s1 = run(injected, params, grads)
    p2, _ = run(plain, params, grads)
    assert_trees_close(p1, p2, rtol=1e-5, atol=1e-6)
    s1.hyperparams["learning_rate"] = jnp.asarray(0.0)
    s1.hyperparams["weight_decay"] = jnp.asarray(0.0)
    u, _ = injected.update(grads[0], s1, p1)
    assert all(not bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def test_keller_to_mup_tau_schedule_injected_jitted_and_sharded():
    # Su's τ_t read at the update count: plain, under ox.inject_hyperparams (a schedule
    # or a number) and on sharded meshes, each compiled once
    from optax_ext.hyperparams import inject_hyperparams

    rng = np.random.default_rng(15)
    n = lambda *shape: jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32)
    params = {"up": {"kernel": n(8, 16)}, "down": {"kernel": n(16, 8)}}
    grads = grads_seq(params, 4, 15)
    kw = dict(learning_rate=1e-2, weight_decay=0.0, scale="keller_to_mup")

    def run_once_compiled(tx):
        def update(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        step, p, s = jit_once(update), params, tx.init(params)  # τ_t is traced
        for g in grads:
            p, s = step(p, s, g)
        return p, s

    want, _ = run_once_compiled(muon(tau=tau_steps, **kw))
    injected = inject_hyperparams(muon)(tau=tau_steps, **kw)
    got, state = run_once_compiled(injected)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert float(state.hyperparams["tau"]) == 0.0  # the last update's τ
    # an injected number can be changed in the state; τ = 1 is "keller", τ = 0 "mup"
    injected = inject_hyperparams(muon)(tau=0.5, **kw)
    state = injected.init(params)
    step = jit_once(injected.update)
    for tau, scale in ((1.0, "keller"), (0.0, "mup")):
        state.hyperparams["tau"] = jnp.asarray(tau)
        u, _ = step(grads[0], state, params)
        plain = muon(1e-2, weight_decay=0.0, scale=scale)
        u_want, _ = jax.jit(plain.update)(grads[0], state.inner_state, params)
        assert_trees_close(u, u_want, rtol=1e-5, atol=1e-7, err=scale)  # f32, |u| ~ 1e-3
    # explicitly sharded leaves run inside auto_axes, which closes over τ_t
    direction = optax.chain(scale_by_muon(scale="keller_to_mup", tau=tau_steps), optax.scale(-0.1))
    want = run_path(direction, params, grads, "jit")
    for path in ("sharded", "explicit"):
        got = run_path(direction, params, grads, path)
        assert_trees_close(jax.tree.map(np.asarray, got), want, rtol=2e-5, atol=1e-6, err=path)


def test_masked_chain_and_state_types():
    params = small_tree(12)
    grads = grads_seq(params, 3, 12)
    is_muon = lambda p: jax.tree.map(lambda lab: lab == "muon", muon_labels(p))
    masked = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(optax.chain(scale_by_muon(), optax.scale(-1e-2)), is_muon),
    )
    got, _ = run(masked, params, grads[:1])
    labels = dict(leaf_paths(muon_labels(params)))
    clipped = optax.clip_by_global_norm(1.0).update(grads[0], None)[0]
    for (p, x), (_, x0), (_, g) in zip(
        leaf_paths(got), leaf_paths(params), leaf_paths(clipped), strict=True
    ):
        if labels[p] == "other":
            np.testing.assert_allclose(x, x0 + g, rtol=1e-6, err_msg=p)
        else:
            assert bool(jnp.any(x != x0 + g)), p
    # (abstract init and one compile: tests/test_device_paths.py)
    state = jax.eval_shape(muon(schedule).init, params)
    inner = state.inner_states["muon"].inner_state[0]
    assert isinstance(inner, ScaleByMuonState) and inner.count.dtype == jnp.int32


def test_sharded_muon_equals_single_device_by_rows_columns_and_fully():
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "mlp": {"kernel": jnp.asarray(0.1 * rng.standard_normal((32, 64)), jnp.float32)},
            "proj": {"kernel": jnp.asarray(0.1 * rng.standard_normal((64, 32)), jnp.float32)},
        }
    }
    grads = grads_seq(params, 2, 14)
    want, _ = run(muon(schedule), params, grads, jit=True)
    auto = jax.sharding.AxisType.Auto
    line = jax.make_mesh((8,), ("x",), axis_types=(auto,))
    layouts = {
        "rows": (line, PartitionSpec("x", None)),
        "columns": (line, PartitionSpec(None, "x")),
        "fully": (
            jax.make_mesh((2, 4), ("a", "b"), axis_types=(auto, auto)),
            PartitionSpec("a", "b"),
        ),
    }
    for how, (mesh, spec) in layouts.items():
        put = lambda t, mesh=mesh, spec=spec: jax.tree.map(
            lambda x: jax.device_put(
                x, NamedSharding(mesh, spec if x.ndim == 2 else PartitionSpec())
            ),
            t,
        )
        got, _ = run(muon(schedule), put(params), [put(g) for g in grads], jit=True)
        assert got["params"]["mlp"]["kernel"].sharding.is_equivalent_to(
            NamedSharding(mesh, spec), 2
        )
        assert_trees_close(got, want, rtol=1e-5, atol=1e-6, err=how)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 1.0}, r"beta must be in \[0, 1\), got 1.0"),
        ({"learning_rate": -1.0}, r"learning_rate must be in \[0, inf\), got -1.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be in \[0, inf\)"),
        ({"ns_steps": -1}, r"ns_steps must be an int >= 0, got -1"),
        ({"ns_coeffs": "newton"}, r"ns_coeffs must be one of"),
        ({"ns_coeffs": [(1.0, 2.0)]}, r"ns_coeffs must be an \(a, b, c\) triple"),
        (
            {"scale": "torch"},
            r"scale must be one of \['moonlight', 'keller', 'mup', 'none', 'keller_to_mup'\]",
        ),
        # Su's τ_t: a number or a schedule's start in [0, 1], given with its scale only
        *(
            (
                {"scale": "keller_to_mup", "tau": tau},
                r"tau must be a number in \[0, 1\] or a " + got,
            )
            for tau, got in [
                (1.5, r"schedule .* got 1.5: τ_t goes from 1"),
                (-0.1, r".* got -0.1: .*optax.linear_schedule\(1.0, 0.0, total_steps\)"),
                (float("nan"), r".* got nan"),
                ("linear", r".* got 'linear'"),
                (True, r".* got True"),
                ([0.5], r".* got \[0.5\]"),
                (optax.linear_schedule(2.0, 0.0, 10), r".* got the schedule .* tau\(0\) = .*2\."),
            ]
        ),
        ({"scale": "keller_to_mup"}, r"scale='keller_to_mup' needs tau, a number in \[0, 1\]"),
        ({"tau": 0.5}, r"tau=0.5 is read by scale='keller_to_mup' only .* with scale='moonlight'"),
        ({"update_rms": 0.0}, r"update_rms must be in \(0, inf\), got 0.0"),
        ({"attention": "split"}, r"attention must be one of \['fused', 'per_head'\]"),
        ({"layout": [("", "dense")]}, r"layout for '' must be one of"),
        ({"rules": [("", "adam")]}, r"rules label must be one of \['muon', 'other'\]"),
        ({"other": "sgd"}, r"other must be one of \['tiger', 'adamw'\]"),
        ({"other_learning_rate": -1.0}, r"other_learning_rate must be in \[0, inf\)"),
        ({"eps": -1.0}, r"eps must be in \[0, inf\)"),
        # the other_* arguments were silently ignored with a transform as `other`
        (
            {"other": optax.sgd(0.1), "other_learning_rate": 5.0},
            r"other_learning_rate=5.0: the other_\* arguments configure other='tiger' or",
        ),
        (
            {"other": optax.sgd(0.1), "other_weight_decay": 3.0, "other_kwargs": {"bogus": 1}},
            r"other_weight_decay=3.0, other_kwargs=\{'bogus': 1\}: .* build the transform",
        ),
        (
            {"other_kwargs": {"accumulation_steps": 4}},
            r"other_kwargs\['accumulation_steps'\]=4: .* ox.accumulate_gradients",
        ),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    kwargs = {"learning_rate": 1e-3} | kwargs
    with pytest.raises(ValueError, match=match):
        muon(**kwargs)


def test_set_accumulation_steps_raises_and_accumulate_gradients_works():
    # ignored before: Muon's leaves stepped on every call (and in muon() Tiger's leaves
    # alone accumulated)
    params = small_tree(23)
    grads = grads_seq(params, 4, 23)
    match = r"set_accumulation_steps was passed to ox\.muon.*ox\.accumulate_gradients\(ox\.muon"
    tx = muon(1e-2)
    with pytest.raises(ValueError, match=match):
        tx.update(grads[0], tx.init(params), params, set_accumulation_steps=2)
    direction, tree = scale_by_muon(), {"w": jnp.ones((3, 4))}
    with pytest.raises(ValueError, match=match):
        direction.update(tree, direction.init(tree), set_accumulation_steps=2)
    # the wrapper takes it: the params move on every second call only
    tx = accumulate_gradients(muon(1e-2), 2)
    state, p = tx.init(params), params
    moved = []
    for g in grads:
        u, state = tx.update(g, state, p, set_accumulation_steps=2)
        moved.append(any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(u)))
        p = optax.apply_updates(p, u)
    assert moved == [False, True, False, True]


def test_bad_calls():
    tx = scale_by_muon()
    with pytest.raises(ValueError, match=r"rank-1 leaf 'b'.*route 1-D leaves"):
        tx.update({"b": jnp.ones(3)}, tx.init({"b": jnp.ones(3)}))
    with pytest.raises(TypeError, match="ns_steps must be an int"):
        scale_by_muon(ns_steps=2.5)
    # Newton-Schulz in an integer dtype returned zeros: rejected when built
    with pytest.raises(TypeError, match="compute_dtype must be a floating dtype"):
        muon(1e-3, compute_dtype=jnp.int32)
    with pytest.raises(ValueError, match="layout 'heads_in' expects a 3-D attention kernel"):
        t = {"q": {"query": {"kernel": jnp.ones((2, 2, 2, 2))}}}
        scale_by_muon().update(t, scale_by_muon().init(t))

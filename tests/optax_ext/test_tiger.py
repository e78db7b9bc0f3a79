"""Tiger against a float64 NumPy implementation of its formulas (kexue.fm/archives/9512),
and optax.lion (its device paths: tests/test_device_paths.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    flax_like_params,
    leaf_paths,
    poison,
    random_grads_like,
    random_tree,
    run_steps,
    to_f64,
    x64,
)

import optax_ext as ox
import optax_ext._xla_cpu as xla_cpu
from optax_ext._common import NORM_AND_BIAS, tree_bytes
from optax_ext.optimizers.tiger import ScaleByTigerState, row_mean_square, scale_by_tiger, tiger
from optax_ext.wrappers.nan_guard import NanGuardState, leafwise_guard

# ------------------------------------------------------------ float64 reference


def ref_scale(path, theta, min_rms):
    """Tiger's per-parameter scale and decay/centre rules (bojone/tiger), written out here."""
    name = path.split("/")[-1]
    if name in ("bias", "scale"):
        return 0.5, False, (1.0 if name == "scale" else 0.0)
    if name == "embedding":
        return np.maximum(np.sqrt(np.mean(theta**2, axis=-1, keepdims=True)), min_rms), True, 0.0
    return max(np.sqrt(np.mean(theta**2)), min_rms), True, 0.0


def ref_tiger(
    params,
    grads_seq,
    *,
    lr,
    beta,
    wd,
    k,
    min_rms=1e-3,
    shrink=0.99,
    scaling=True,
    catch_inf=False,
    guard=True,
):
    """Runs Tiger's update in float64 NumPy. ``lr`` is a function of the update index."""
    paths = [p for p, _ in leaf_paths(params)]
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    m = {p: np.zeros_like(x) for p, x in theta.items()}
    history = []
    for t, grads in enumerate(grads_seq):
        g_all = {p: np.asarray(x, np.float64) for p, x in leaf_paths(grads)}
        for p in paths:
            g = g_all[p]
            bad = guard and (not np.all(np.isfinite(g)) if catch_inf else np.any(np.isnan(g)))
            if bad:
                g = np.zeros_like(g)
            b1 = 1.0 if bad else (beta if t % k == 0 else 1.0)
            m[p] = b1 * m[p] + (1 - beta) / k * g
            if scaling:
                s, decays, centre = ref_scale(p, theta[p], min_rms)
            else:
                s, decays, centre = 1.0, True, 0.0
            if bad:
                theta[p] = theta[p] + (shrink - 1) * (theta[p] - centre)
            elif (t + 1) % k == 0:
                eta = lr(t // k) * s
                theta[p] = theta[p] - eta * (np.sign(m[p]) + (wd if decays else 0.0) * theta[p])
        history.append({p: theta[p].copy() for p in paths})
    return theta, m, history


def grads_with_nans(params, steps, seed, *, nan_every=5, value=np.nan):
    """Random gradients; every ``nan_every``-th step poisons one leaf (cycling through leaves)."""
    out = []
    n_leaves = len(jax.tree.leaves(params))
    for t in range(steps):
        g = random_grads_like(params, seed * 1000 + t)
        if nan_every and t % nan_every == nan_every - 1:
            g = poison(g, {(t // nan_every * 7) % n_leaves: value})
        out.append(g)
    return out


run = run_steps


def mu_of(state):
    """Tiger's momentum, wherever the chain's state holds it."""
    return optax.tree.get(state, "mu")


def schedule(i):
    return 1e-2 / (1.0 + 0.1 * i)


@pytest.fixture(params=["one reduction", "row blocks"])
def row_blocks(request, monkeypatch):
    """Runs a test with the embedding rows reduced at once and in small blocks of rows.

    The CPU path reduces large tables in blocks of about 2**20 elements; shrinking the
    block makes the test trees' embeddings take that path too.
    """
    if request.param == "row blocks":
        monkeypatch.setattr(xla_cpu, "_ROW_BLOCK_ELEMENTS", 40)
    return request.param


# ------------------------------------------------------- the float64 reference


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_reference_with_nans(k, seed, row_blocks):
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), flax_like_params(seed))
        grads = grads_with_nans(params, 24, seed)
        got, state = run(tiger(schedule, 0.9, 0.05, accumulation_steps=k), params, grads)
    want, m, _ = ref_tiger(params, grads, lr=schedule, beta=0.9, wd=0.05, k=k)
    assert_trees_close(got, _tree_like(params, want), rtol=1e-12, atol=1e-12)
    assert_trees_close(mu_of(state), _tree_like(params, m), rtol=1e-12, atol=1e-12)
    assert int(state.count) == 24


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_random_trees_float32_and_inf_caught(seed):
    params = random_tree(seed)
    grads = grads_with_nans(params, 20, seed, nan_every=4, value=np.inf)
    tx = tiger(3e-3, 0.95, 0.1, accumulation_steps=2, catch_inf=True, min_rms=0.0)
    got, _ = run(tx, params, grads)
    want, _, _ = ref_tiger(
        params, grads, lr=lambda i: 3e-3, beta=0.95, wd=0.1, k=2, catch_inf=True, min_rms=0.0
    )
    assert_trees_close(got, _tree_like(params, want), rtol=2e-5, atol=2e-6)


def test_bf16_params_follow_the_reference_to_bf16_rounding():
    params = flax_like_params(5, dtype=jnp.bfloat16)
    grads = grads_with_nans(params, 12, 5, nan_every=6)
    got, state = run(tiger(1e-2, 0.9, 0.01), params, grads)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mu_of(state)))
    want, _, _ = ref_tiger(params, grads, lr=lambda i: 1e-2, beta=0.9, wd=0.01, k=1)
    # 12 steps, each rounded to bf16 (8 bits): a few ulps of the largest entries
    assert_trees_close(got, _tree_like(params, want), rtol=3e-2, atol=2e-2)


def test_mu_dtype_float32_with_bf16_params():
    params = flax_like_params(6, dtype=jnp.bfloat16)
    _, state = run(
        tiger(1e-2, mu_dtype=jnp.float32), params, grads_with_nans(params, 3, 6, nan_every=0)
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu_of(state)))


def test_equals_optax_lion_with_the_extras_off():
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), flax_like_params(7))
        grads = grads_with_nans(params, 20, 7, nan_every=0)
        ours = tiger(2e-3, 0.9, 0.03, param_scaling=None, mask=True)
        theirs = optax.lion(2e-3, b1=0.9, b2=0.9, weight_decay=0.03)
        p1, s1 = run(ours, params, grads)
        p2, s2 = run(theirs, params, grads)
    assert_trees_close(p1, p2, rtol=1e-13, atol=1e-13)
    assert_trees_close(mu_of(s1), s2[0].mu, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "param_scaling, lr, guards",
    [
        (None, 2e-3, {}),  # finite gradients: the default guards never act
        ("tiger", optax.warmup_cosine_decay_schedule(0.0, 3e-3, 3, 12),
         {"guard_nan": False, "spike_factor": None}),
    ],
    ids=["constant, guards on", "scales and schedule"],
)  # fmt: skip
def test_tiger_is_the_chain_of_its_pieces(param_scaling, lr, guards):
    """With k = 1 and finite gradients Tiger is the optax.chain of its direction, optax's
    own masked decay and learning rate, and its per-parameter scale."""
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), flax_like_params(9))
        grads = grads_with_nans(params, 12, 9, nan_every=0)
        ours = tiger(lr, 0.9, 0.03, param_scaling=param_scaling, **guards)
        scale = [] if param_scaling is None else [ox.scale_by_param_scale(param_scaling)]
        chained = optax.chain(
            scale_by_tiger(0.9),
            optax.add_decayed_weights(0.03, ox.path_mask(exclude=NORM_AND_BIAS)),
            *scale,
            optax.scale_by_learning_rate(lr),
        )
        assert_trees_close(
            run(ours, params, grads)[0], run(chained, params, grads)[0], rtol=1e-13, atol=1e-13
        )


@pytest.mark.parametrize("k", [2, 5])
def test_accumulation_equals_k1_fed_the_mean_gradient(k):
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), flax_like_params(9))
        micro = grads_with_nans(params, 4 * k, 9, nan_every=0)
        means = [jax.tree.map(lambda *g: sum(g) / k, *micro[i * k : (i + 1) * k]) for i in range(4)]
        p_acc, s_acc = run(tiger(schedule, accumulation_steps=k), params, micro)
        p_one, s_one = run(tiger(schedule), params, means)
    assert_trees_close(p_acc, p_one, rtol=1e-12, atol=1e-13)
    assert_trees_close(mu_of(s_acc), mu_of(s_one), rtol=1e-12, atol=1e-13)


def test_parameters_do_not_move_between_updates():
    params = flax_like_params(10)
    tx = tiger(1e-2, accumulation_steps=3)
    state = tx.init(params)
    for t, g in enumerate(grads_with_nans(params, 9, 10, nan_every=0)):
        updates, state = tx.update(g, state, params)
        moved = any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))
        assert moved == (t % 3 == 2), f"micro-step {t}"
        params = optax.apply_updates(params, updates)


def test_nan_leaf_keeps_momentum_and_shrinks_toward_centre():
    params = flax_like_params(11)
    tx = tiger(1e-2)
    state = tx.init(params)
    g = random_grads_like(params, 0)
    _, state = tx.update(g, state, params)
    # a -0 entry too: the kept momentum must be the same bits, not merely equal
    mu = mu_of(state)
    mu["params"]["final_norm"]["scale"] = mu["params"]["final_norm"]["scale"].at[0].set(-0.0)
    state = optax.tree.set(state, mu=mu)
    bad = jax.tree.map(lambda x: x, g)
    bad["params"]["final_norm"]["scale"] = bad["params"]["final_norm"]["scale"].at[3].set(jnp.nan)
    updates, new_state = tx.update(bad, state, params)
    scale = params["params"]["final_norm"]["scale"]
    np.testing.assert_allclose(
        updates["params"]["final_norm"]["scale"], -0.01 * (scale - 1.0), rtol=1e-5, atol=1e-7
    )
    bits = lambda s: np.asarray(mu_of(s)["params"]["final_norm"]["scale"]).view(np.uint32)
    np.testing.assert_array_equal(bits(new_state), bits(state))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    # the other leaves stepped normally
    assert bool(jnp.any(updates["params"]["head"]["kernel"] != 0))


def test_without_guard_nan_propagates():
    params = {"kernel": jnp.ones((2, 2))}
    tx = tiger(1e-2, guard_nan=False)
    updates, _ = tx.update({"kernel": jnp.full((2, 2), jnp.nan)}, tx.init(params), params)
    assert bool(jnp.all(jnp.isnan(updates["kernel"])))


def test_inf_is_caught_by_default_nan_only_reproduces_the_source():
    params = {"kernel": jnp.ones((2, 2))}
    g = {"kernel": jnp.array([[jnp.inf, 1.0], [1.0, 1.0]])}
    u, state = tiger(1e-2).update(g, tiger(1e-2).init(params), params)
    np.testing.assert_allclose(u["kernel"], -0.01 * np.ones((2, 2)), rtol=1e-6)  # shrink to 0
    assert (int(state.skipped_steps), int(state.shrunk_leaves)) == (1, 1)
    assert bool(jnp.all(mu_of(state)["kernel"] == 0))
    # Su's NaN-only check (with the spike guard off, which would see an infinite norm)
    faithful = tiger(1e-2, catch_inf=False, spike_factor=None)
    u, state = faithful.update(g, faithful.init(params), params)
    assert float(u["kernel"][0, 0]) == pytest.approx(-1e-2 * (1 + 0.01))  # sign(inf) = 1
    assert np.isinf(float(mu_of(state)["kernel"][0, 0]))
    assert (int(state.skipped_steps), int(state.shrunk_leaves)) == (0, 0)


@pytest.mark.parametrize("k", [1, 2])
def test_guard_counters(k):
    """shrunk_leaves counts discarded leaves, skipped_steps the micro-steps with any, in
    the guard's NanGuardState, as nan_guard's counters do."""
    params = flax_like_params(3)
    grads = grads_with_nans(params, 12, 3, nan_every=3, value=np.inf)
    grads[4] = _poison_two(grads[4])
    _, state = run(tiger(1e-2, accumulation_steps=k), params, grads)
    assert isinstance(state, NanGuardState)
    assert (int(state.skipped_steps), int(state.shrunk_leaves)) == (5, 6)
    assert int(state.spike_steps) == 0 and int(state.norm_steps) == 12 - 5
    assert all(bool(jnp.all(jnp.isfinite(m))) for m in jax.tree.leaves(mu_of(state)))


def test_direction_holds_the_discarded_leaves():
    """scale_by_tiger's protocol with its guard: a leaf named in discarded_leaves keeps
    its momentum bit for bit and gets a zero update; the others step."""
    params = flax_like_params(4)
    tx = scale_by_tiger(0.9)
    state = tx.update(random_grads_like(params, 1), tx.init(params))[1]
    names = [p for p, _ in leaf_paths(params)]
    discarded = jax.tree.unflatten(
        jax.tree.structure(params), [jnp.asarray(n.endswith("bias")) for n in names]
    )
    updates, new = tx.update(random_grads_like(params, 2), state, discarded_leaves=discarded)
    for (path, u), (_, m0), (_, m1) in zip(
        leaf_paths(updates), leaf_paths(state.mu), leaf_paths(new.mu), strict=True
    ):
        held = path.endswith("bias")
        assert bool(jnp.all(u == 0)) == held, path
        assert bool(jnp.all(m0 == m1)) == held, path


def _poison_two(g):
    leaves, treedef = jax.tree.flatten(g)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(-np.inf)
    return jax.tree.unflatten(treedef, leaves)


def test_min_rms_zero_reproduces_the_sources_zero_kernel_never_moves():
    params = {"dense": {"kernel": jnp.zeros((4, 3))}}
    grads = [{"dense": {"kernel": jnp.ones((4, 3))}}] * 3
    p0, _ = run(tiger(1e-2, min_rms=0.0), params, grads)
    assert bool(jnp.all(p0["dense"]["kernel"] == 0))
    p1, _ = run(tiger(1e-2), params, grads)
    np.testing.assert_allclose(p1["dense"]["kernel"], -3 * 1e-2 * 1e-3, rtol=1e-5)


def test_custom_scale_rules_and_mask():
    params = {"emb": {"embedding": jnp.full((3, 2), 2.0)}, "k": {"kernel": jnp.full((2, 2), 4.0)}}
    g = jax.tree.map(jnp.ones_like, params)
    tx = tiger(0.1, weight_decay=0.0, param_scaling={r"embedding": 3.0})
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["emb"]["embedding"], -0.3)
    np.testing.assert_allclose(u["k"]["kernel"], -0.1)  # unmatched: scale 1
    tx = tiger(0.1, weight_decay=0.5, param_scaling=None, mask={"emb": False, "k": True})
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["emb"]["embedding"], -0.1)
    np.testing.assert_allclose(u["k"]["kernel"], -0.1 * (1 + 0.5 * 4.0))


def test_default_mask_skips_bias_and_norm_scale():
    params = {"d": {"bias": jnp.ones(2), "kernel": jnp.ones((2, 2))}, "ln": {"scale": jnp.ones(2)}}
    g = jax.tree.map(jnp.ones_like, params)
    tx = tiger(0.1, weight_decay=0.5, min_rms=0.0)
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(u["d"]["bias"], -0.05)
    np.testing.assert_allclose(u["ln"]["scale"], -0.05)
    np.testing.assert_allclose(u["d"]["kernel"], -0.1 * 1.5)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_state_bytes_equal_param_bytes(k):
    params = flax_like_params(12)
    state = jax.eval_shape(tiger(1e-3, accumulation_steps=k).init, params)
    assert tree_bytes(state) == tree_bytes(params)
    bf = flax_like_params(12, dtype=jnp.bfloat16)
    assert tree_bytes(tiger(accumulation_steps=k).init(bf)) == tree_bytes(bf)


# ------------------------------------------------------- optax integration


def test_inject_hyperparams_matches_constants():
    params = flax_like_params(13)
    grads = grads_with_nans(params, 8, 13, nan_every=3)
    hp = dict(learning_rate=3e-3, beta=0.9, weight_decay=0.02, shrink_ratio=0.9, min_rms=1e-3)
    # optax's wrapper would read schedules per micro-step: refused while accumulating
    with pytest.raises(ValueError, match=r"ox\.inject_hyperparams\(ox\.tiger"):
        optax.inject_hyperparams(tiger)(**hp, accumulation_steps=2).init(params)
    injected = ox.inject_hyperparams(tiger, static_args=("accumulation_steps",))(
        **hp, accumulation_steps=2
    )
    plain = tiger(3e-3, 0.9, 0.02, shrink_ratio=0.9, accumulation_steps=2)
    p1, s1 = run(injected, params, grads)
    p2, _ = run(plain, params, grads)
    assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7)
    # a hyperparameter can be changed between steps without recompiling
    s1.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = injected.update(grads[0], s1, p1)
    u, _ = injected.update(grads[1], _, p1)
    assert all(not bool(jnp.any(x != 0)) for x in jax.tree.leaves(u))


def test_inside_chain_masked_and_partition():
    params = flax_like_params(14)
    grads = grads_with_nans(params, 6, 14, nan_every=0)
    is_kernel = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: "kernel" in jax.tree_util.keystr(path), p
    )
    clip = optax.clip_by_global_norm(1.0)
    # masked: tiger on kernels, the other leaves pass their (clipped) gradients through
    masked = optax.chain(clip, optax.masked(tiger(1e-2), is_kernel))
    alone = optax.chain(clip, tiger(1e-2))
    p_masked, _ = run(masked, params, grads[:1])
    p_alone, _ = run(alone, params, grads[:1])
    g0 = clip.update(grads[0], clip.init(params))[0]
    for (path, a), (_, b), (_, p0), (_, g) in zip(
        leaf_paths(p_masked), leaf_paths(p_alone), leaf_paths(params), leaf_paths(g0), strict=True
    ):
        want = b if "kernel" in path else p0 + g
        np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-7, err_msg=path)
    # partition: tiger on kernels, everything else frozen
    labels = lambda p: jax.tree.map(lambda k: "tiger" if k else "frozen", is_kernel(p))
    part = optax.partition({"tiger": tiger(1e-2), "frozen": optax.set_to_zero()}, labels)
    new, _ = run(part, params, grads)
    for (path, a), (_, b) in zip(leaf_paths(new), leaf_paths(params), strict=True):
        assert bool(jnp.any(a != b)) == ("kernel" in path), path


def test_state_is_the_guard_around_the_chain_with_int32_counts():
    """(Abstract init and one compile, on every device path: tests/test_device_paths.py.)"""
    state = jax.eval_shape(tiger(accumulation_steps=3).init, flax_like_params(15))
    assert isinstance(state, NanGuardState) and state.count.dtype == jnp.int32
    direction = state.inner_state[0]
    assert isinstance(direction, ScaleByTigerState) and direction.count.dtype == jnp.int32
    bare = jax.eval_shape(tiger(guard_nan=False, spike_factor=None).init, flax_like_params(15))
    assert isinstance(bare, tuple) and isinstance(bare[0], ScaleByTigerState)


@pytest.mark.parametrize(
    "shape", [(37, 5), (3, 11, 4), (64, 8), (9,), ()], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_row_mean_square_both_forms_equal_numpy(shape, dtype, monkeypatch):
    """The plain reduction and the CPU form in blocks of 2 or 3 rows (the last block
    overlapping the one before it), each called directly, against float64 NumPy."""
    monkeypatch.setattr(xla_cpu, "_ROW_BLOCK_ELEMENTS", 12)
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
    want = np.asarray(x, np.float64) ** 2
    want = want.mean(axis=-1, keepdims=True) if x.ndim >= 2 else want.mean(keepdims=True)
    block = xla_cpu.row_block(x.shape)
    assert (block is not None) == (x.ndim >= 2)
    forms = [row_mean_square, jax.jit(row_mean_square, static_argnums=1)]
    if block is not None:
        forms.append(lambda x, work: xla_cpu.row_mean_square_in_blocks(x, block, work))
    for f in forms:
        got = f(x, jnp.float32)
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_explicitly_sharded_embedding_rows(monkeypatch):
    # an explicitly row-sharded table keeps the one reduction (row blocks would gather it)
    monkeypatch.setattr(xla_cpu, "_ROW_BLOCK_ELEMENTS", 40)
    params = flax_like_params(17, vocab=64)
    grads = grads_with_nans(params, 4, 17, nan_every=0)
    want, _ = run(tiger(1e-2, 0.9, 0.01), params, grads)
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(jax.sharding.AxisType.Explicit,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", None))
    put = lambda tree: {
        "params": tree["params"]
        | {"embed": {"embedding": jax.device_put(tree["params"]["embed"]["embedding"], rows)}}
    }
    with jax.set_mesh(mesh):
        got, _ = run(tiger(1e-2, 0.9, 0.01), put(params), [put(g) for g in grads])
    assert got["params"]["embed"]["embedding"].sharding.spec == rows.spec
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)


def test_direction_inside_the_leafwise_guard_follows_the_reference():
    with x64():
        params = jax.tree.map(lambda x: x.astype(jnp.float64), random_tree(17))
        grads = grads_with_nans(params, 12, 17, nan_every=4)
        direction = optax.chain(scale_by_tiger(0.9, accumulation_steps=2), optax.scale(-0.1))
        guarded = leafwise_guard(
            direction, 1.0, guard_nan=True, catch_inf=False, spike_args=(None, 1, 0.0, "skip")
        )
        got, _ = run(guarded, params, grads)
    want, _, _ = ref_tiger(
        params, grads, lr=lambda i: 0.1, beta=0.9, wd=0.0, k=2, scaling=False, shrink=1.0
    )
    assert_trees_close(got, _tree_like(params, want), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 1.0}, r"beta must be in \[0, 1\), got 1.0"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\)"),
        ({"learning_rate": -1e-3}, r"learning_rate must be in \[0, inf\), got -0.001"),
        ({"weight_decay": -0.1}, r"weight_decay must be in \[0, inf\)"),
        ({"accumulation_steps": 0}, r"accumulation_steps must be an int >= 1, got 0"),
        ({"shrink_ratio": 0.0}, r"shrink_ratio must be in \(0, 1\], got 0.0"),
        ({"shrink_ratio": 1.5}, r"shrink_ratio must be in \(0, 1\]"),
        ({"min_rms": -1.0}, r"min_rms must be in \[0, inf\)"),
        ({"param_scaling": "lion"}, r"param_scaling must be one of \['tiger'\]"),
        ({"param_scaling": {"kernel": "max"}}, r"rule for 'kernel' must be one of"),
        ({"param_scaling": {"kernel": -1.0}}, r"multiplier for 'kernel' must be in \(0, inf\)"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiger(**kwargs)


def test_bad_calls_have_clear_errors():
    tx = tiger()
    params = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="tiger needs the params"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="accumulation_steps must be an int"):
        tiger(accumulation_steps=2.5)
    with pytest.raises(ValueError, match="mask must be"):
        tx = tiger(mask={"other": True})
        tx.update(params, tx.init(params), params)


def _tree_like(params, by_path):
    leaves = [by_path[p] for p, _ in leaf_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def test_reference_helpers_are_consistent():
    params = flax_like_params(0)
    assert_trees_close(_tree_like(params, dict(leaf_paths(to_f64(params)))), params)


@pytest.mark.parametrize("action", ["skip", "clip"])
def test_spike_guard_counts_a_spike_once(action):
    """A x1e4 spike after a 2-step warm-up: skipped (momentum kept, no move) or scaled to
    the average norm, counted once (the same on every device path: the rows
    tiger-spike-skip and tiger-spike-clip of tests/test_device_paths.py)."""
    params = random_tree(21, max_leaves=3)
    grads = [random_grads_like(params, 40 + s, scale=1e4 if s == 3 else 1.0) for s in range(5)]
    tx = tiger(1e-2, accumulation_steps=1, spike_warmup=2, spike_action=action)
    _, state = run(tx, params, grads)
    assert int(state.spike_steps) == 1
    assert int(state.skipped_steps) == (1 if action == "skip" else 0)
    # skipping step 3 is the run without it
    if action == "skip":
        p_skip, s_skip = run(tx, params, grads[:3])
        u, _ = tx.update(grads[3], s_skip, p_skip)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))


# ------------------------------------------------ bf16 momentum, stochastic rounding


def test_rounding_seed_is_validated_and_nearest_is_a_cast_of_the_float32_ema():
    """(Seeds giving reproducible, different roundings: tests/test_contract.py.)"""
    with pytest.raises(ValueError, match="rounding_seed"):
        scale_by_tiger(rounding_seed=-1)
    params = {"w": jnp.zeros(1000)}
    g = {"w": jnp.linspace(-1.0, 1.0, 1000)}
    tx = tiger(1e-3, mu_dtype=jnp.bfloat16)
    mu = mu_of(jax.jit(tx.update)(g, tx.init(params), params)[1])["w"]
    np.testing.assert_array_equal(mu, ((1 - 0.9) * g["w"]).astype(jnp.bfloat16))

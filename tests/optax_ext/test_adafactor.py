"""AdaFactor (Su's reading, kexue.fm/archives/7302) against a float64 NumPy reference,
optax.adafactor where they coincide, each documented difference, and every device path."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_trees_close,
    leaf_paths,
    random_grads_like,
    x64,
)

import optax_ext._xla_cpu as xla_cpu
from optax_ext._common import path_to_str, tree_bytes
from optax_ext.optimizers.adafactor import (
    FactoredMoment,
    adafactor,
    relative_step_size,
    scale_by_adafactor,
    scale_by_parameter_rms,
)

# ------------------------------------------------------------ float64 reference


def rms(x):
    return np.sqrt(np.mean(np.square(x)))


def ref_adafactor(
    params,
    grads_seq,
    *,
    lr=None,
    decay_rate=None,
    momentum=None,
    wd=0.0,
    decays=lambda p: True,
    mbps=True,
    scaled=lambda p: True,
    clip=1.0,
    eps1=1e-30,
    eps2=1e-3,
    min_dim=128,
):
    """Spec §3 in float64 NumPy, step by step.

    Returns (θ, second moments, momentum, number of leaf-steps the clipping shrank)."""
    theta = {p: np.asarray(x, np.float64) for p, x in leaf_paths(params)}
    nu, mu = {}, {p: np.zeros_like(x) for p, x in theta.items()}
    clipped = 0
    for t, grads in enumerate(grads_seq):
        tau = t + 1
        beta2 = 1 - tau**-0.8 if decay_rate is None else decay_rate
        if lr is None:
            lr_t = min(1e-2, 1 / math.sqrt(tau)) * (1.0 if mbps else 0.05)
        else:
            lr_t = lr(t)
        for p, g in leaf_paths(grads):
            g = np.asarray(g, np.float64)
            g2 = g**2 + eps1
            shape = g.shape
            order = sorted(range(len(shape)), key=lambda i: (shape[i], i))  # ties: later = larger
            if len(shape) >= 2 and shape[order[-2]] >= min_dim:
                largest, second = order[-1], order[-2]
                vr, vc = nu.get(p, (0.0, 0.0))
                vr = beta2 * vr + (1 - beta2) * g2.mean(axis=largest, keepdims=True)
                vc = beta2 * vc + (1 - beta2) * g2.mean(axis=second, keepdims=True)
                nu[p] = (vr, vc)
                v = vr * vc / vr.mean(axis=second, keepdims=True)
            else:
                v = beta2 * nu.get(p, 0.0) + (1 - beta2) * g2
                nu[p] = v
            u = g / np.sqrt(v + eps1)
            if clip is not None:
                clipped += int(rms(u) > clip)
                u = u / max(1.0, rms(u) / clip)
            if momentum is not None:
                mu[p] = momentum * mu[p] + (1 - momentum) * u
                u = mu[p]
            if mbps and scaled(p):
                u = u * max(rms(theta[p]), eps2)
            theta[p] = theta[p] - lr_t * (u + (wd if decays(p) else 0.0) * theta[p])
    return theta, nu, mu, clipped


def mixed_params(seed=0):
    """Flax-named leaves that exercise every factoring case at min_dim_size_to_factor=4:
    3-D and 4-D tensors whose two largest axes are not the last two, a tie, a matrix below
    the threshold, vectors."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
    return {
        "params": {
            "embed": {"embedding": n(12, 6)},
            # the kernel factors axes 0 and 2; the (2, 5) bias is below the threshold
            "attention": {"kernel": n(6, 2, 5, s=0.3), "bias": n(2, 5, s=0.1)},
            "LayerNorm_0": {"scale": 1 + n(6, s=0.1), "bias": jnp.zeros(6)},
            "tie": {"kernel": n(5, 5, s=0.3)},  # a tie: axis 1 counts as the largest
            "thin": {"kernel": n(3, 9, s=0.3)},  # second-largest 3 < 4: not factored
            "deep": {"kernel": n(4, 3, 2, 7, s=0.3)},  # 4-D: axes 3 and 0, keeps 1 and 2
        }
    }


def nu_by_path(nu):
    """{path: full second moment or FactoredMoment}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        nu, is_leaf=lambda x: isinstance(x, FactoredMoment)
    )
    return {path_to_str(p): x for p, x in flat}


def f64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def run(tx, params, grads_seq):
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for g in grads_seq:
        params, state = step(params, state, g)
    return params, state


def not_norm_or_bias(path):
    return path.split("/")[-1] not in ("bias", "scale")


def schedule(t):
    return 3e-2 / (1.0 + 0.2 * t)


CASES = {
    # name: (adafactor kwargs, reference kwargs); all at min_dim_size_to_factor=4
    "defaults": (dict(), dict()),
    "momentum_constant_beta2_schedule_decay": (
        dict(
            learning_rate=schedule,
            decay_rate=0.95,
            momentum=0.9,
            weight_decay=0.1,
            clipping_threshold=0.5,
            eps2=1e-2,
        ),
        dict(
            lr=schedule,
            decay_rate=0.95,
            momentum=0.9,
            wd=0.1,
            decays=not_norm_or_bias,
            clip=0.5,
            eps2=1e-2,
        ),
    ),
    # bert4keras's exclude_from_parameter_scale: embeddings and biases skip the θ-scale
    "exclude_from_parameter_scale": (
        dict(exclude_from_parameter_scale=r"embedding|bias$", momentum=0.9),
        dict(scaled=lambda p: not re.search(r"embedding|bias$", p), momentum=0.9),
    ),
    "absolute_step_no_clipping": (
        dict(
            multiply_by_parameter_scale=False,
            clipping_threshold=None,
            momentum=0.5,
            weight_decay=0.05,
            mask=True,
        ),
        dict(mbps=False, clip=None, momentum=0.5, wd=0.05),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case):
    kwargs, ref_kwargs = CASES[case]
    with x64():
        params = f64(mixed_params(1))
        grads = [f64(random_grads_like(params, 10 + t, scale=0.1 + t % 3)) for t in range(20)]
        tx = adafactor(**kwargs, min_dim_size_to_factor=4)
        got, state = run(tx, params, grads)
        want, want_nu, want_mu, clipped = ref_adafactor(params, grads, min_dim=4, **ref_kwargs)
        if ref_kwargs.get("clip", 1.0) is not None:
            assert clipped > 0, "the update clipping never acted: the case tests nothing"
        for p, x in leaf_paths(got):
            np.testing.assert_allclose(x, want[p], rtol=1e-11, atol=1e-14, err_msg=p)
        inner = state[0]
        nu = nu_by_path(inner.nu)
        for p, v in want_nu.items():
            got_v = (nu[p].row, nu[p].col) if isinstance(nu[p], FactoredMoment) else nu[p]
            assert isinstance(v, tuple) == isinstance(got_v, tuple), p
            for a, b in zip(
                got_v if isinstance(v, tuple) else [got_v],
                v if isinstance(v, tuple) else [v],
                strict=True,
            ):
                np.testing.assert_allclose(a, b, rtol=1e-12, err_msg=p)
        if "momentum" in kwargs:
            for p, m in leaf_paths(inner.mu):
                np.testing.assert_allclose(m, want_mu[p], rtol=1e-11, atol=1e-14, err_msg=p)


@pytest.mark.parametrize("case", ["defaults", "momentum_constant_beta2_schedule_decay"])
def test_matches_float64_reference_with_moments_in_slabs(case, monkeypatch):
    """The factored moments' CPU slab path (optax_ext._xla_cpu, taken at real sizes for
    rows of >= 4096 entries) forced on the small tree gives the same float64 numbers."""
    monkeypatch.setattr(xla_cpu, "_MIN_TRAILING", 1)
    monkeypatch.setattr(xla_cpu, "_SLAB_ELEMENTS", 8)
    params = mixed_params(1)
    tx = adafactor(min_dim_size_to_factor=4)
    jaxpr = str(jax.make_jaxpr(tx.update)(params, tx.init(params), params))
    assert re.search(r"\b(scan|while)\[", jaxpr), "no slab loop traced: the case tests nothing"
    test_matches_float64_reference(case)


@pytest.mark.parametrize("case", ["defaults", "momentum_constant_beta2_schedule_decay"])
def test_matches_float64_reference_in_the_plain_form(case, monkeypatch):
    """The plain form, which GPU and TPU programs hold (no fence, no branch), run here."""
    forms = []

    def plain_only(*args, plain, cpu):
        forms.append(cpu is not None)
        return plain(*args)

    monkeypatch.setattr(xla_cpu, "on_cpu", plain_only)
    test_matches_float64_reference(case)
    assert any(forms), "no CPU form was bypassed: the case tests nothing"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cpu_mean_square_of_u_is_the_same_on_both_branches(dtype):
    """XLA:CPU's mean(u²): where ε1/r vanishes beside c, a product of reciprocals, else
    the per-entry form; both are mean(g²/(r·c + ε1)) in float64."""
    with x64():
        rng = np.random.default_rng(4)
        g = rng.standard_normal((40, 30))
        row, col = rng.uniform(0.5, 2.0, (40, 1)), rng.uniform(0.5, 2.0, (1, 30))
        rtol = 1e-6 if dtype == jnp.float32 else 1e-14
        as_dtype = lambda x: jnp.asarray(x, dtype)
        for eps1, vanishes in ((1e-30, True), (0.3, False)):
            assert bool(xla_cpu._eps1_vanishes(as_dtype(row), as_dtype(col), eps1)) == vanishes
            got = xla_cpu.adafactor_mean_square(as_dtype(g), as_dtype(row), as_dtype(col), eps1)
            want = np.mean(g**2 / (row * col + eps1))
            np.testing.assert_allclose(float(got), want, rtol=rtol, err_msg=f"eps1={eps1}")


def test_factored_rows_far_below_eps1():
    """Rows whose g² is far below ε1 make ε1 comparable to the factored v: the mean of u²
    must still be that of g/√(v + ε1), with ε1 inside the square root for every entry."""
    with x64():
        rng = np.random.default_rng(3)
        params = {"w": jnp.asarray(rng.standard_normal((6, 8)), jnp.float64)}

        def grad(t):
            g = np.random.default_rng(20 + t).standard_normal((6, 8))
            g[:2] *= 1e-16  # g² ≈ 1e-32 ≪ ε1 = 1e-30 in the first two rows
            return {"w": jnp.asarray(g)}

        grads = [grad(t) for t in range(6)]
        tx = adafactor(min_dim_size_to_factor=4, clipping_threshold=0.5)
        got, _ = run(tx, params, grads)
        want, _, _, clipped = ref_adafactor(params, grads, min_dim=4, clip=0.5)
        assert clipped > 0
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-11, atol=1e-14)


def test_factoring_keeps_the_other_axes():
    params = {
        "a": jnp.zeros((6, 2, 5)),
        "b": jnp.zeros((5, 5)),
        "c": jnp.zeros((3, 9)),
        "d": jnp.zeros((4, 3, 2, 7)),
        "e": jnp.zeros(11),
    }
    nu = scale_by_adafactor(min_dim_size_to_factor=4).init(params).nu
    assert (nu["a"].row.shape, nu["a"].col.shape) == ((1, 2, 5), (6, 2, 1))
    assert (nu["b"].row.shape, nu["b"].col.shape) == ((5, 1), (1, 5))
    assert nu["c"].shape == (3, 9) and nu["e"].shape == (11,)
    assert (nu["d"].row.shape, nu["d"].col.shape) == ((4, 3, 2, 1), (1, 3, 2, 7))
    full = scale_by_adafactor(min_dim_size_to_factor=4, factored=False).init(params).nu
    assert jax.tree.map(jnp.shape, full) == jax.tree.map(jnp.shape, params)


def test_parameter_scale_float64():
    """u·max(RMS(θ), ε2) per leaf, 1 on the excluded paths, in float64 NumPy."""
    with x64():
        params = f64(mixed_params(2))
        params["params"]["tie"]["kernel"] = jnp.zeros((5, 5))  # RMS 0: the floor ε2
        u = f64(random_grads_like(params, 3))
        tx = scale_by_parameter_rms(2e-3, exclude_from_parameter_scale=r"embedding|bias$")
        got, _ = tx.update(u, tx.init(params), params)
        theta = dict(leaf_paths(params))
        for p, g in leaf_paths(got):
            x = np.asarray(theta[p], np.float64)
            scale = 1.0 if re.search(r"embedding|bias$", p) else max(rms(x), 2e-3)
            want = np.asarray(dict(leaf_paths(u))[p], np.float64) * scale
            np.testing.assert_allclose(g, want, rtol=1e-14, err_msg=p)
        # the exclusion changes the numbers: the excluded leaves' scale would not be 1
        excluded = [p for p in theta if re.search(r"embedding|bias$", p)]
        assert any(max(rms(np.asarray(theta[p])), 2e-3) != 1.0 for p in excluded)


def test_relative_step_size():
    """min(1e-2, 1/√τ): 1e-2 up to τ = 10⁴, then 1/√τ; ×0.05 without the parameter scale."""
    f, g = relative_step_size(True), relative_step_size(False)
    for count, want in [(0, 1e-2), (9_999, 1e-2), (39_999, 5e-3), (999_999, 1e-3)]:
        np.testing.assert_allclose(float(f(jnp.asarray(count))), want, rtol=1e-6)
        np.testing.assert_allclose(float(g(jnp.asarray(count))), 0.05 * want, rtol=1e-6)


# ------------------------------------------------- vs optax.adafactor: where they agree


def big_params(seed=0, full=True):
    """Leaves large enough to be factored at the default min_dim_size_to_factor=128
    (``full=False``: only the matrix and its bias, for fewer compilations)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
    params = {"dense": {"kernel": n(128, 136), "bias": n(136)}}
    if full:
        params.update(conv={"kernel": n(3, 130, 128)}, small={"kernel": n(5, 140)})
    return params


def test_equals_optax_adafactor_with_matching_settings():
    params = big_params(0)
    grads = [random_grads_like(params, t) for t in range(6)]
    ours, _ = run(adafactor(1e-2), params, grads)
    theirs, _ = run(optax.adafactor(1e-2), params, grads)
    assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-7)


# ------------------------------------------------ the documented differences, one each


def first_updates(tx, params, grads_seq):
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads_seq:
        u, state = update(g, state, params)
        out.append(u)
    return out, state


def test_difference_learning_rate_none_is_the_relative_step():
    params = big_params(1, full=False)
    g = random_grads_like(params, 0)
    ours, theirs = adafactor(), optax.adafactor(learning_rate=None)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    # jump to τ = 40000, where min(1e-2, 1/√τ) = 5e-3 (optax: a step of 1)
    at = lambda s: s._replace(count=jnp.asarray(39_999))
    s_ours = (at(s_ours[0]), *s_ours[1:-1], at(s_ours[-1]))  # the direction and the lr
    s_theirs = (s_theirs[0]._replace(count=jnp.asarray(39_999)),) + tuple(s_theirs[1:])
    u_ours, _ = jax.jit(ours.update)(g, s_ours, params)
    u_theirs, _ = jax.jit(theirs.update)(g, s_theirs, params)
    assert_trees_close(u_ours, jax.tree.map(lambda u: 5e-3 * u, u_theirs), rtol=1e-5)


def test_difference_momentum_before_the_parameter_scale():
    with x64():
        params1 = f64(big_params(2, full=False))
        params2 = jax.tree.map(lambda p: 3.0 * p, params1)  # RMS(θ) changes between steps
        g1, g2 = (f64(random_grads_like(params1, s)) for s in (1, 2))
        lr, b1 = 1e-2, 0.9
        plain = scale_by_adafactor()
        (d1, d2), _ = first_updates(plain, params1, [g1, g2])  # clipped normalised û1, û2
        ours = adafactor(lr, momentum=b1)
        theirs = optax.adafactor(lr, momentum=b1, dtype_momentum=jnp.float64)
        s_o, s_t = ours.init(params1), theirs.init(params1)
        step_o, step_t = jax.jit(ours.update), jax.jit(theirs.update)
        _, s_o = step_o(g1, s_o, params1)
        _, s_t = step_t(g1, s_t, params1)
        u_o, _ = step_o(g2, s_o, params2)
        u_t, _ = step_t(g2, s_t, params2)
        for p, uo in leaf_paths(u_o):
            r1 = max(rms(dict(leaf_paths(params1))[p]), 1e-3)
            r2 = max(rms(dict(leaf_paths(params2))[p]), 1e-3)
            a, b = np.asarray(dict(leaf_paths(d1))[p]), np.asarray(dict(leaf_paths(d2))[p])
            want_ours = -lr * (b1 * (1 - b1) * a + (1 - b1) * b) * r2
            want_optax = -(b1 * (1 - b1) * lr * r1 * a + (1 - b1) * lr * r2 * b)
            np.testing.assert_allclose(uo, want_ours, rtol=1e-10, err_msg=p)
            # optax computes β2 in float32: agreement to ~1e-7 of the update's scale
            np.testing.assert_allclose(
                dict(leaf_paths(u_t))[p],
                want_optax,
                rtol=1e-6,
                atol=1e-6 * np.abs(want_optax).max(),
                err_msg=p,
            )
            assert not np.allclose(want_ours, want_optax, rtol=1e-3)
        # where the parameter scale is constant the two orders coincide
        ours = adafactor(lr, momentum=b1, multiply_by_parameter_scale=False)
        theirs = optax.adafactor(
            lr, momentum=b1, multiply_by_parameter_scale=False, dtype_momentum=jnp.float64
        )
        (_, uo2), _ = first_updates(ours, params1, [g1, g2])
        (_, ut2), _ = first_updates(theirs, params1, [g1, g2])
        assert_trees_close(uo2, ut2, rtol=1e-6)


def test_difference_eps1_inside_the_square_root():
    with x64():
        params = {"b": jnp.zeros(5, jnp.float64)}
        g = {"b": jnp.full(5, 1e-16, jnp.float64)}  # g² = 1e-32, far below ε1 = 1e-30
        (u_ours,), _ = first_updates(adafactor(1.0, multiply_by_parameter_scale=False), params, [g])
        (u_theirs,), _ = first_updates(
            optax.adafactor(1.0, multiply_by_parameter_scale=False), params, [g]
        )
        # ours: g/√(g² + 2ε1), optax: g/√(g² + ε1)
        np.testing.assert_allclose(u_ours["b"], -1e-16 / np.sqrt(1e-32 + 2e-30), rtol=1e-12)
        np.testing.assert_allclose(u_theirs["b"], -1e-16 / np.sqrt(1e-32 + 1e-30), rtol=1e-6)


def test_difference_weight_decay_is_multiplied_by_the_learning_rate():
    params = big_params(3, full=False)
    zero = jax.tree.map(jnp.zeros_like, params)
    lr, wd = 0.1, 0.5
    (u_ours,), _ = first_updates(adafactor(lr, weight_decay=wd, mask=True), params, [zero])
    (u_theirs,), _ = first_updates(optax.adafactor(lr, weight_decay_rate=wd), params, [zero])
    assert_trees_close(u_ours, jax.tree.map(lambda p: -lr * wd * p, params), rtol=1e-6)
    assert_trees_close(u_theirs, jax.tree.map(lambda p: -wd * p, params), rtol=1e-6)
    # the default mask spares biases
    (u_default,), _ = first_updates(adafactor(lr, weight_decay=wd), params, [zero])
    assert float(jnp.abs(u_default["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(u_default["dense"]["kernel"]).max()) > 0.0


def test_difference_eps2_is_an_argument():
    params = jax.tree.map(jnp.zeros_like, big_params(4, full=False))  # RMS(θ) = 0: the scale is ε2
    g = [random_grads_like(params, 5)]
    (u_default,), _ = first_updates(adafactor(1e-2), params, g)
    (u_theirs,), _ = first_updates(optax.adafactor(1e-2), params, g)
    (u_big,), _ = first_updates(adafactor(1e-2, eps2=1e-2), params, g)
    assert_trees_close(u_default, u_theirs, rtol=1e-5, atol=1e-12)
    assert_trees_close(u_big, jax.tree.map(lambda u: 10 * u, u_default), rtol=1e-5)


def test_difference_decay_rate_is_the_constant_beta2():
    params = big_params(5, full=False)
    grads = [random_grads_like(params, 6 + t) for t in range(2)]
    (_, u_none), _ = first_updates(adafactor(1e-2, decay_rate=None), params, grads)
    (_, u_optax), _ = first_updates(optax.adafactor(1e-2, decay_rate=0.8), params, grads)
    (_, u_const), s = first_updates(adafactor(1e-2, decay_rate=0.8), params, grads)
    assert_trees_close(u_none, u_optax, rtol=1e-5)
    with pytest.raises(AssertionError):
        assert_trees_close(u_const, u_optax, rtol=1e-3)
    # constant β2 = 0.8 on the unfactored bias: v = 0.8·0.2·G1 + 0.2·G2
    g1, g2 = (np.asarray(g["dense"]["bias"], np.float64) for g in grads)
    np.testing.assert_allclose(s[0].nu["dense"]["bias"], 0.16 * g1**2 + 0.2 * g2**2, rtol=1e-5)


def test_state_is_m_plus_n_per_factored_matrix():
    params = {
        "w": jax.ShapeDtypeStruct((300, 200), jnp.float32),
        "t": jax.ShapeDtypeStruct((4, 200, 300), jnp.float32),
        "s": jax.ShapeDtypeStruct((100, 300), jnp.float32),
        "b": jax.ShapeDtypeStruct((300,), jnp.float32),
    }
    factored = (300 + 200) + 4 * (200 + 300)
    unfactored = 100 * 300 + 300
    n_params = 300 * 200 + 4 * 200 * 300 + 100 * 300 + 300
    ours = jax.eval_shape(adafactor().init, params)
    assert tree_bytes(ours) == 4 * (factored + unfactored)
    with_momentum = jax.eval_shape(adafactor(momentum=0.9).init, params)
    assert tree_bytes(with_momentum) == 4 * (factored + unfactored + n_params)
    # optax keeps 1-element placeholders: v per factored leaf, v_row and v_col otherwise
    theirs = jax.eval_shape(optax.adafactor().init, params)
    assert tree_bytes(theirs) == 4 * (factored + unfactored + 2 * 1 + 2 * 2)


# --------------------------------------------------------------------- optax glue


def test_inject_hyperparams():
    params = big_params(7, full=False)
    grads = [random_grads_like(params, 40 + t) for t in range(4)]
    hp = dict(
        decay_rate=0.9,
        momentum=0.8,
        weight_decay=0.1,
        eps1=1e-30,
        clipping_threshold=0.7,
        eps2=2e-3,
    )
    for lr in (None, 1e-2):  # None is the structural relative-step rule
        tx = optax.inject_hyperparams(adafactor)(learning_rate=lr, **hp)
        state = jax.jit(tx.init)(params)
        assert set(hp) <= set(state.hyperparams)
        assert ("learning_rate" in state.hyperparams) == (lr is not None)
        step = jax.jit(tx.update)
        p = params
        for g in grads:
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        want, _ = run(adafactor(lr, **hp), params, grads)
        assert_trees_close(p, want, rtol=1e-5, atol=1e-7)
    # an injected decay_rate drives β2
    state.hyperparams["decay_rate"] = jnp.asarray(0.0)
    _, state = step(grads[0], state, p)
    g = np.asarray(grads[0]["dense"]["bias"], np.float64)
    np.testing.assert_allclose(state.inner_state[0].nu["dense"]["bias"], g**2 + 1e-30, rtol=1e-6)


def test_min_dim_size_to_factor_under_inject_hyperparams():
    params = big_params(8)
    g = random_grads_like(params, 0)
    injected = optax.inject_hyperparams(adafactor)(learning_rate=1e-2, min_dim_size_to_factor=64)
    state = injected.init(params)  # eager init sees a concrete value
    assert isinstance(state.inner_state[0].nu["small"]["kernel"], jnp.ndarray)
    jax.jit(injected.update)(g, state, params)
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(injected.init)(params)
    static = optax.inject_hyperparams(adafactor, static_args="min_dim_size_to_factor")(
        learning_rate=1e-2, min_dim_size_to_factor=4
    )
    state = jax.jit(static.init)(params)
    assert isinstance(state.inner_state[0].nu["small"]["kernel"], FactoredMoment)


def test_chain_and_masked():
    params = big_params(9, full=False)
    params["embed"] = {"embedding": 0.1 * jnp.ones((130, 128))}
    grads = [random_grads_like(params, 50 + t) for t in range(2)]
    mask = {"dense": True, "embed": False}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(adafactor(1e-2), mask))
    sub = {"dense": params["dense"]}
    ref = adafactor(1e-2)
    s, s_ref = tx.init(params), ref.init(sub)
    step, ref_step = jax.jit(tx.update), jax.jit(ref.update)
    clip = jax.jit(lambda g: optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())[0])
    for g in grads:
        clipped = clip(g)
        u, s = step(g, s, params)
        u_ref, s_ref = ref_step({k: clipped[k] for k in sub}, s_ref, sub)
        assert_trees_close({k: u[k] for k in sub}, u_ref, rtol=1e-6)
        assert_trees_close(u["embed"], clipped["embed"], rtol=1e-6)


def test_bf16_params_and_mu_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), big_params(11, full=False))
    grads = [random_grads_like(params, 60 + t) for t in range(3)]
    tx = adafactor(1e-2, momentum=0.9)
    got, state = run(tx, params, grads)
    assert {x.dtype for x in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state[0].nu)} == {jnp.dtype(jnp.float32)}
    f32_mu = jax.eval_shape(adafactor(momentum=0.9, mu_dtype=jnp.float32).init, params)
    assert {x.dtype for x in jax.tree.leaves(f32_mu[0].mu)} == {jnp.dtype(jnp.float32)}
    f32, _ = run(
        adafactor(1e-2, momentum=0.9),
        jax.tree.map(lambda x: x.astype(jnp.float32), params),
        [jax.tree.map(lambda x: x.astype(jnp.float32), g) for g in grads],
    )
    assert_trees_close(got, f32, rtol=2e-2, atol=2e-3)


def test_update_needs_params():
    tx = adafactor()
    with pytest.raises(ValueError, match="needs the params"):
        tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.ones(3)}))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(learning_rate=-1.0), ValueError, r"learning_rate must be in \[0, inf\), got -1.0"),
        (dict(decay_rate=1.5), ValueError, r"decay_rate must be in \[0, 1\], got 1.5"),
        (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\], got -0.1"),
        (dict(weight_decay=-0.1), ValueError, r"weight_decay must be in \[0, inf\), got -0.1"),
        (dict(eps1=-1e-30), ValueError, r"eps1 must be in \[0, inf\)"),
        (dict(eps2=-1.0), ValueError, r"eps2 must be in \[0, inf\), got -1.0"),
        (dict(clipping_threshold=0.0), ValueError, r"clipping_threshold must be in \(0, inf\)"),
        (dict(min_dim_size_to_factor=0), ValueError, r"min_dim_size_to_factor must be an int >= 1"),
        (dict(min_dim_size_to_factor=2.5), TypeError, r"min_dim_size_to_factor must be an int"),
        (
            dict(exclude_from_parameter_scale="bias("),
            ValueError,
            r"invalid regular expression 'bias\(' in exclude_from_parameter_scale",
        ),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        adafactor(**kwargs)

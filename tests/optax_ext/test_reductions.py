"""optax_ext._reductions.sum_of_squares: one sum, and on CPU (optax_ext._xla_cpu) slabs
of rows added elementwise where XLA:CPU's direct form is slow. Both forms, each called
directly, are checked against float64 NumPy; small thresholds (monkeypatched) make small
arrays take the slab path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_on_all_paths, x64

import optax_ext._xla_cpu as xla_cpu
from optax_ext._reductions import axis_sum, sum_of_squares


def normal_axes(shape, axes):
    return tuple(sorted(a % len(shape) for a in ((axes,) if isinstance(axes, int) else axes)))


def uses_slabs(shape, axes) -> bool:
    """Whether the CPU program takes slabs (rather than one sum) for this shape."""
    return xla_cpu.slab_rows(shape, normal_axes(shape, axes)) is not None


@pytest.fixture
def small_slabs(monkeypatch):
    """Slabs for small arrays: trailing rows of >= 3 entries, slabs of 24 entries."""
    monkeypatch.setattr(xla_cpu, "_MIN_TRAILING", 3)
    monkeypatch.setattr(xla_cpu, "_SLAB_ELEMENTS", 24)


CASES = [
    # shape, axes, the slab path taken at the small thresholds
    ((37, 5), 0, True),  # 4 rows a slab: 9 slabs and a tail of 1 row
    ((40, 6), (0,), True),  # 4 rows a slab, no tail
    ((3, 11, 4), 1, True),  # leading axis kept: slabs of (3, 2, 4)
    ((5, 7, 3), (0, 1), True),  # two contiguous axes reduced, the last kept
    ((9, 4, 3), (0, 2), False),  # not contiguous
    ((37, 5), 1, False),  # no trailing axis kept
    ((6, 2), 0, False),  # a trailing row of 2 < 3
    ((5, 8), 0, False),  # 5 rows < two slabs of 3
    ((), (), False),
    ((0, 5), 0, False),
]


@pytest.mark.parametrize("squares", [True, False], ids=["sum_of_squares", "axis_sum"])
@pytest.mark.parametrize("shape, axes, slabs", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_equals_float64_numpy(small_slabs, shape, axes, slabs, squares):
    x = np.random.default_rng(0).standard_normal(shape)
    want = np.sum(x**2 if squares else x, axis=axes, keepdims=True)
    fn = (lambda x: sum_of_squares(x, axes)) if squares else (lambda x: axis_sum(x, axes))
    assert uses_slabs(shape, axes) == slabs
    forms = [fn, jax.jit(fn)]
    if slabs:  # the CPU form called directly
        ax = normal_axes(shape, axes)
        term = jnp.square if squares else (lambda x: x)
        forms.append(lambda x: xla_cpu.sum_in_slabs(x, ax, xla_cpu.slab_rows(shape, ax), term))
    for f in forms:
        got = f(jnp.asarray(x, jnp.float32))
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
    with x64():
        got = jax.jit(fn)(jnp.asarray(x, jnp.float64))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_default_thresholds_leave_narrow_rows_to_one_reduction():
    """At the shipped thresholds a GPT-2-small kernel (rows of 3072) and a tree of small
    leaves keep the direct form; rows of 8192 over 128 of them take slabs."""
    assert not uses_slabs((768, 3072), 0)
    assert uses_slabs((128, 8192), 0)
    assert xla_cpu.slab_rows((64, 8192), (0,)) == 32  # 1 MB of float32 per slab
    assert xla_cpu.slab_rows((32, 8192), (0,)) is None  # fewer than two slabs


def test_inf_and_nan_propagate_through_slabs(small_slabs):
    x = np.ones((20, 4), np.float32)
    x[7, 1], x[13, 2] = np.inf, np.nan
    got = np.asarray(jax.jit(lambda x: sum_of_squares(x, 0))(jnp.asarray(x)))
    assert got[0, 0] == 20 and got[0, 1] == np.inf and np.isnan(got[0, 2])


def test_explicitly_sharded_input_keeps_one_reduction(small_slabs):
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(jax.sharding.AxisType.Explicit,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", None))
    x = np.random.default_rng(1).standard_normal((64, 6)).astype(np.float32)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(x, rows)
        got = jax.jit(lambda x: sum_of_squares(x, 0))(sharded)
    np.testing.assert_allclose(got, np.sum(x.astype(np.float64) ** 2, 0, keepdims=True), 2e-6)


def test_explicitly_sharded_argument_never_takes_the_cpu_form():
    mesh = jax.make_mesh((8,), ("rows",), axis_types=(jax.sharding.AxisType.Explicit,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows", None))

    def cpu(x):
        raise AssertionError("the CPU form was traced for an explicitly sharded array")

    with jax.set_mesh(mesh):
        x = jax.device_put(np.ones((16, 2), np.float32), rows)
        got = jax.jit(lambda x: xla_cpu.on_cpu(x, plain=lambda x: 2 * x, cpu=cpu))(x)
    np.testing.assert_array_equal(got, 2 * np.ones((16, 2)))


def test_same_on_every_device_path(small_slabs):
    """Through an optimizer-shaped transform: eager, jit, pmap and a sharded mesh agree."""
    import optax

    def scale_by_column_rms():
        def update(g, state, params=None):
            del params
            out = jax.tree.map(lambda x: x * jax.lax.rsqrt(sum_of_squares(x, 0) + 1.0), g)
            return out, state

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    params = {"w": jnp.zeros((40, 6)), "v": jnp.zeros((16, 3))}
    rng = np.random.default_rng(2)
    grads = [{k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}]
    assert_same_on_all_paths(scale_by_column_rms(), params, grads)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_value_and_grad_means_the_parts_in_slabs(small_slabs, splits):
    """training.split_value_and_grad averages the parts' gradients with axis_sum (slabs on
    CPU for large leaves): the mean gradient and the mean squared part norm equal a float64
    computation from each part's own gradient."""
    from optax_ext.training import split_value_and_grad

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32), "b": jnp.zeros(5)}
    batch = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
    loss = lambda p, apply_fn, x: jnp.mean(jnp.square(x @ p["w"] + p["b"] - 1.0))
    value, grads, extra = jax.jit(split_value_and_grad(loss, splits), static_argnums=1)(
        params, None, batch
    )
    parts = [jax.grad(loss)(params, None, x) for x in np.split(np.asarray(batch), splits)]
    for k in params:
        want = np.mean([np.asarray(p[k], np.float64) for p in parts], axis=0)
        np.testing.assert_allclose(grads[k], want, rtol=1e-6, atol=1e-7)
    sq = [sum(np.sum(np.asarray(v, np.float64) ** 2) for v in p.values()) for p in parts]
    np.testing.assert_allclose(extra["micro_grad_sq_norm"], np.mean(sq), rtol=1e-6)
    assert extra["accumulation_steps"] == splits


@pytest.mark.parametrize("platform, loops", [("cpu", True), ("cuda", False), ("tpu", False)])
def test_cpu_forms_only_in_programs_lowered_for_cpu(platform, loops):
    """The one platform_dependent: lowered for GPU or TPU, the slab sums and Tiger's row
    blocks are the plain reductions (no loop in the program); lowered for CPU they loop."""
    import optax_ext as ox

    wide = jnp.ones((64, 8192))
    table = {"embed": {"embedding": jnp.ones((4096, 512))}}
    tx = ox.tiger(1e-3)
    programs = [
        (jax.jit(lambda x: sum_of_squares(x, 0)), (wide,)),
        (jax.jit(lambda g, s, p: tx.update(g, s, p)), (table, tx.init(table), table)),
    ]
    for fn, args in programs:
        text = fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert ("stablehlo.while" in text) == loops

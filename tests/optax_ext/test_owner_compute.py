"""owner_compute and Muon's owner_axes: each whole matrix computed once, by one owner.

owner_compute is checked with fn(X) = X Xᵀ X (a whole-matrix function that commutes
with transposition) against float64 NumPy, per matrix; Muon's owner_axes against the
single-device update of the same transform (its float64 reference is in test_muon.py).
Trees are small and every case compiles once.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, jit_once, leaf_paths, one_device_env
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ext as ox
from optax_ext.owner_compute import _balanced_counts, _compaction, owner_compute

AUTO, EXPLICIT = AxisType.Auto, AxisType.Explicit


def cube(x):
    """X Xᵀ X per matrix: needs the whole matrix, and (Xᵀ)(X)(Xᵀ) = (X Xᵀ X)ᵀ."""
    return x @ jnp.swapaxes(x, -1, -2) @ x


def ref_cube(x):
    x = np.asarray(x, np.float64)
    return x @ np.swapaxes(x, -1, -2) @ x


def mesh_1d(axis_type):
    return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def mesh_2d(axis_type):
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def put(tree, specs, mesh):
    """Each leaf on ``mesh`` by its spec, written as jit writes its outputs' (to the
    leaf's rank under explicit axes, without trailing Nones under auto ones), so that a
    step's outputs fed back are the same cache key and the step compiles once."""

    def one(x, spec):
        spec = (*spec, *(None,) * (x.ndim - len(spec)))
        while spec and spec[-1] is None and EXPLICIT not in mesh.axis_types:
            spec = spec[:-1]
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(one, tree, specs)


def random(shape, seed, dtype=jnp.float32, scale=0.5):
    rng = np.random.default_rng(seed)
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


# ---------------------------------------------------------------- owner_compute

#: On 8 devices along "data": a group of 15 (10 wide and 5 tall by rows, transposed by
#: their owners: 2 slots each, 3 once both are padded), 3 by columns (fewer than the
#: devices), one matrix alone, a stack of 8 split over "data" along its batch axis, a
#: replicated batch of 3, a bf16 matrix.
LINE = {
    "wide": ((10, 8, 16), P(None, "data")),
    "tall": ((5, 16, 8), P(None, "data")),
    "columns": ((3, 16, 24), P(None, None, "data")),
    "one": ((16, 32), P("data")),
    "stacked": ((8, 8, 8), P("data")),
    "replicated": ((3, 12, 20), P()),
    "bf16": ((8, 16), P("data")),
}


def line_tree(seed):
    return {
        name: random(shape, seed + i, jnp.bfloat16 if name == "bf16" else jnp.float32)
        for i, (name, (shape, _)) in enumerate(LINE.items())
    }


def check_cube(out, tree, *, rtol=1e-5):
    for (path, y), (_, x) in zip(leaf_paths(out), leaf_paths(tree), strict=True):
        assert y.shape == x.shape and y.dtype == x.dtype, path
        assert y.sharding.is_equivalent_to(x.sharding, x.ndim), (path, y.sharding, x.sharding)
        tol = 2e-2 if x.dtype == jnp.bfloat16 else rtol
        np.testing.assert_allclose(
            np.asarray(y, np.float64), ref_cube(x), rtol=tol, atol=tol, err_msg=path
        )


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_every_matrix_once_on_a_line_of_devices(axis_type):
    mesh = mesh_1d(axis_type)
    specs = {name: spec for name, (_, spec) in LINE.items()}
    apply = jit_once(owner_compute(cube, "data", transposable=True))
    with jax.set_mesh(mesh):
        for seed in (0, 10):  # new values, the same program
            tree = put(line_tree(seed), specs, mesh)
            check_cube(apply(tree), tree)


@pytest.mark.parametrize("axis_type", [AUTO, EXPLICIT], ids=["auto", "explicit"])
def test_two_axes_owners_along_one_or_both(axis_type):
    mesh = mesh_2d(axis_type)
    # Owners along "data" (4 of them, 5 matrices): columns stay split over "model".
    by_data = {"grid": random((3, 8, 16), 1), "stacked": random((2, 8, 16), 2)}
    specs_data = {"grid": P(None, "data", "model"), "stacked": P(None, "data", "model")}
    # Owners along both axes, "model" major (8 of them, 10 wide and 5 tall matrices:
    # the owners' padding skipped as they count them), rows split over both or one.
    by_both = {"wide": random((10, 8, 16), 3), "tall": random((5, 16, 8), 6)}
    specs_both = {"wide": P(None, ("model", "data")), "tall": P(None, None, "data")}
    on_data = owner_compute(cube, "data", transposable=True)
    on_both = owner_compute(cube, ("model", "data"), transposable=True)
    with jax.set_mesh(mesh):
        a, b = put(by_data, specs_data, mesh), put(by_both, specs_both, mesh)
        out_a, out_b = jax.jit(lambda a, b: (on_data(a), on_both(b)))(a, b)
    check_cube(out_a, a)
    check_cube(out_b, b)


def test_leaves_not_on_the_mesh_come_back_replicated_on_it():
    # under explicit axes a leaf's type names its mesh; a plain array names none
    tree = {"w": random((3, 8, 16), 5)}
    with jax.set_mesh(mesh_1d(EXPLICIT)):
        out = jax.jit(owner_compute(cube, "data"))(tree)
    np.testing.assert_allclose(out["w"], ref_cube(tree["w"]), rtol=1e-5, atol=1e-6)
    assert out["w"].sharding.is_fully_replicated


def test_fn_may_close_over_traced_values():
    # as an injected hyperparameter (ox.inject_hyperparams' Newton–Schulz steps) is
    tree = {"w": random((8, 16), 4)}
    scaled = jax.jit(lambda t, s: owner_compute(lambda x: s * cube(x), "data")(t))
    with jax.set_mesh(mesh_1d(AUTO)):
        out = scaled(put(tree, {"w": P("data")}, mesh_1d(AUTO)), 3.0)
    np.testing.assert_allclose(out["w"], 3 * ref_cube(tree["w"]), rtol=1e-5, atol=1e-6)


def test_extra_matrices_go_to_the_least_loaded_owners():
    load = [0] * 4
    assert _balanced_counts(5, 4, cost=8, load=load) == [2, 1, 1, 1]
    # The next group's remainder avoids owner 0, which took the costlier extra.
    assert _balanced_counts(2, 4, cost=3, load=load) == [0, 1, 1, 0]
    assert load == [16, 11, 11, 8]
    assert _balanced_counts(4, 4, cost=1, load=load) == [1, 1, 1, 1]


def test_owners_skip_the_padding_of_two_orientations():
    # 10 wide and 5 tall matrices on 8 owners: slots 2 + 1, but at most 2 real ones each
    wide, tall = [2, 2, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]
    table = _compaction([wide, tall], [2, 1])
    assert table.tolist() == [[0, 1]] * 2 + [[0, 2]] * 5 + [[0, 1]]
    assert _compaction([wide], [2]) is None  # one orientation: every slot is needed
    # one matrix per owner, of one orientation or the other: one slot computed, not two
    assert _compaction([[1, 1, 0, 0], [0, 0, 1, 1]], [1, 1]).tolist() == [[0], [0], [1], [1]]


def test_owner_compute_bad_input():
    leaf = {"w": jnp.ones((8, 8))}
    apply = owner_compute(cube, "data")
    with pytest.raises(ValueError, match=r"axes=\('data',\) needs a device mesh.*jax.set_mesh"):
        apply(leaf)
    with jax.set_mesh(mesh_1d(AUTO)):
        with pytest.raises(ValueError, match=r"'model' is not in the mesh \{'data': 8\}"):
            owner_compute(cube, ("data", "model"))(leaf)
        with pytest.raises(ValueError, match=r"must be a .*matrices, got shape \(8,\)"):
            apply({"b": jnp.ones(8)})
    for axes in (3, (), "", ("data", 1)):
        with pytest.raises(ValueError, match="axes must be a mesh axis name"):
            owner_compute(cube, axes)
    with pytest.raises(ValueError, match="names an axis twice"):
        owner_compute(cube, ("data", "data"))


def test_benchmark_counts_collectives_per_device():
    """bench_owner_compute reads the partitioned HLO: every collective (plain or
    tupled) with the bytes of its result, nothing else; an async start it cannot
    count is refused."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_owner_compute import collectives

    hlo = """
  %all-gather = f32[8,16]{1,0} all-gather(%param.1), channel_id=4, dimensions={0}
  %all-reduce = f32[] all-reduce(%wrapped_reduce), channel_id=3, to_apply=%region_0
  %all-to-all.2 = (f32[1,16]{1,0}, f32[1,16]{1,0}) all-to-all(%a, %b), channel_id=5
  %gte = f32[1,16]{1,0} get-tuple-element(%all-to-all.2), index=0
  ROOT %ag = bf16[4,2]{1,0} all-gather(%p), channel_id=6, dimensions={0}
  %fusion = f32[8,16]{1,0} fusion(%all-gather), kind=kLoop, calls=%fused_all-gather
"""
    assert collectives(hlo) == {
        "all-gather": {"ops": 2, "bytes": 8 * 16 * 4 + 4 * 2 * 2},
        "all-reduce": {"ops": 1, "bytes": 4},
        "all-to-all": {"ops": 1, "bytes": 2 * 16 * 4},
    }
    start = "%s = (f32[2]{0}, f32[16]{0}) all-gather-start(%p), dimensions={0}"
    with pytest.raises(ValueError, match="asynchronous"):
        collectives(start)


# ------------------------------------------------------------------ Muon


def muon_tree(seed, dtype):
    """A block's kernels (attention 3-D, MLP wide and tall), a scanned stack of 9 (16, 16)
    layers (more matrices than devices, not a multiple of them) and a projection whose
    shape no other leaf has. With attention="per_head", the 2 query heads (16, 8) and 2
    output heads (8, 16) make one group of 4, the MLP's (16, 32) and (32, 16) another."""
    shapes = {
        "Dense_0": (16, 32),
        "Dense_1": (32, 16),
        "query": (16, 2, 8),
        "out": (2, 8, 16),
        "ScanBlock_0": (9, 16, 16),
        "proj": (24, 16),
    }
    return {
        name: {"kernel": random(shape, seed + i, dtype)}
        for i, (name, shape) in enumerate(shapes.items())
    }


#: One axis: FSDP (rows, d_in, over "data"), the MLP's second kernel by columns (TP).
SPECS_1D = {
    "ScanBlock_0": P(None, "data"),
    "Dense_0": P("data"),
    "Dense_1": P(None, "data"),
    "query": P("data"),
    "out": P(None, None, "data"),
    "proj": P("data"),
}
#: Rows over "data" and columns over "model" (owners along "data" only).
SPECS_2D = {
    "ScanBlock_0": P(None, "data", "model"),
    "Dense_0": P("data", "model"),
    "Dense_1": P("data", "model"),
    "query": P("data"),
    "out": P(None, None, "model"),
    "proj": P("data", "model"),
}


def specs_for(tree, table):
    """Each leaf's spec: the first name of ``table`` in its path."""

    def spec(path, _):
        return next(s for name, s in table.items() if name in jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(spec, tree)


def run_muon(tx, dtype, mesh=None, table=None, steps=2):
    """(updates, momentum) after ``steps`` updates, and the jitted step."""
    grads = [muon_tree(seed, dtype) for seed in range(0, 100 * steps, 100)]
    step = jit_once(lambda g, s: tx.update(g, s, g))
    if mesh is None:
        state = tx.init(grads[0])
        for g in grads:
            u, state = step(g, state)
        return u, state.mu, step
    specs = specs_for(grads[0], table)
    with jax.set_mesh(mesh):
        state = tx.init(grads[0])
        # the counters on the mesh as the step returns them, so that it compiles once
        state = jax.device_put(state, NamedSharding(mesh, P()))
        state = state._replace(mu=put(state.mu, specs, mesh))
        for g in grads:
            u, state = step(put(g, specs, mesh), state)
    for tree in (u, state.mu):  # the params' own sharding, kept
        for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs), strict=True):
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
    return u, state.mu, step


@functools.cache
def single_device(dtype, **kwargs):
    u, mu, _ = run_muon(ox.scale_by_muon(**kwargs), dtype)
    return jax.tree.map(np.asarray, (u, mu))


@pytest.mark.parametrize(
    "axis_type, table",
    [
        pytest.param(AUTO, SPECS_1D, id="fsdp-tp-auto"),
        pytest.param(EXPLICIT, SPECS_1D, id="fsdp-tp-explicit"),
        pytest.param(AUTO, SPECS_2D, id="2d-auto"),
    ],
)
def test_muon_owner_axes_equals_the_single_device_update(axis_type, table, float64):
    # In float64: two programs that round differently in float32 (batched products,
    # other fusions) agree to 1e-12, so any matrix moved to the wrong place shows.
    mesh = (mesh_2d if table is SPECS_2D else mesh_1d)(axis_type)
    want_u, want_mu = single_device(jnp.float64, attention="per_head")
    tx = ox.scale_by_muon(owner_axes="data", attention="per_head")
    u, mu, _ = run_muon(tx, jnp.float64, mesh, table)  # one compile (jit_once)
    assert_trees_close(u, want_u, rtol=1e-12, atol=1e-13, err="updates")
    assert_trees_close(mu, want_mu, rtol=1e-12, atol=1e-13, err="momentum")


def test_muon_owner_axes_bf16_compute_within_its_rounding():
    """Newton–Schulz in bfloat16 on the owners against the same on one device: equal
    up to bf16 rounding (ε = 2⁻⁸ ≈ 4e-3; the matrices transposed before msign rather
    than inside it differ by about 1e-3, the others not at all)."""
    kwargs = {"compute_dtype": jnp.bfloat16}
    want_u, _ = single_device(jnp.float32, **kwargs)
    tx = ox.scale_by_muon(owner_axes="data", **kwargs)
    u, _, _ = run_muon(tx, jnp.float32, mesh_1d(EXPLICIT), SPECS_1D)
    for (path, a), (_, b) in zip(leaf_paths(u), leaf_paths(want_u), strict=True):
        rel = np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)
        assert rel < 1e-2, (path, rel)


def test_muon_owner_axes_bad_input():
    for axes in (1, ("data", "data"), ""):
        with pytest.raises(ValueError, match="owner_axes"):
            ox.scale_by_muon(owner_axes=axes)
    g = {"dense": {"kernel": jnp.ones((8, 8))}, "b": {"bias": jnp.ones(8)}}
    # Through the alias: an axis not in the mesh fails at init, naming it and the mesh.
    with jax.set_mesh(mesh_1d(AUTO)):
        with pytest.raises(ValueError, match=r"owner_axes: the axis 'model' is not in the mesh"):
            ox.muon(1e-2, owner_axes="model").init(g)
    # Without a mesh, init cannot tell; the first update does.
    tx = ox.scale_by_muon(owner_axes="data")
    state = tx.init(g["dense"])
    with pytest.raises(ValueError, match=r"owner_axes=\('data',\) needs a device mesh"):
        tx.update(g["dense"], state)


# ------------------------------------------------------- across two processes

WORKER = Path(__file__).parent.parent / "owner_compute_worker.py"


def _gloo_available() -> bool:
    try:
        from jaxlib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _gloo_available(), reason="this jaxlib has no gloo CPU collectives")
def test_two_processes_equal_one(tmp_path):
    """2 processes × 4 CPU devices (gloo) give the updates of 1 process × 8 devices."""
    sys.path.insert(0, str(WORKER.parent))
    import owner_compute_worker as worker

    flag = "--xla_force_host_platform_device_count"
    env = one_device_env()
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(f"{flag}=1", f"{flag}=4")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(WORKER.parents[1]), env.get("PYTHONPATH")])
    )
    port, procs, logs = _free_port(), [], []
    try:
        for i in range(2):
            logs.append(open(tmp_path / f"{i}.log", "w+b"))  # noqa: SIM115 (closed below)
            cmd = [sys.executable, str(WORKER), str(i), str(port), str(tmp_path / f"{i}.npz")]
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
        want = worker.run()  # meanwhile, the same on this process's 8 devices
        deadline = time.monotonic() + 120
        while None in [p.poll() for p in procs] and time.monotonic() < deadline:
            time.sleep(0.05)
        for p, log in zip(procs, logs, strict=True):
            log.seek(0)
            assert p.returncode == 0, log.read().decode(errors="replace")[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    for i in range(2):
        got = dict(np.load(tmp_path / f"{i}.npz"))
        assert set(got) == set(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)

"""Train steps under jit, pmap and a NamedSharding mesh give the single-device result."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, traced_once
from jax.sharding import PartitionSpec

from optax_ext.optimizers.tiger import tiger
from optax_ext.training import (
    TrainState,
    data_parallel_mesh,
    make_train_step,
    replicate,
    shard_batch,
    shard_params,
    split_batch,
    unreplicate,
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.relu(nn.Dense(32)(x)))
        return nn.Dense(3)(x)


def loss_fn(params, apply_fn, batch):
    logits = apply_fn({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_state(tx):
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 8)))["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def batches(n=6, size=32):
    rng = np.random.default_rng(0)
    return [
        {
            "x": jnp.asarray(rng.standard_normal((size, 8)), jnp.float32),
            "y": jnp.asarray(rng.integers(0, 3, size)),
        }
        for _ in range(n)
    ]


def run_jit(tx):
    state, step = make_state(tx), make_train_step(loss_fn, mode="jit", donate=False)
    losses = []
    for b in batches():
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference():
    return run_jit(tiger(1e-2, accumulation_steps=2))


def test_pmap_equals_single_device_and_compiles_once(reference):
    state = replicate(make_state(tiger(1e-2, accumulation_steps=2)))
    step = make_train_step(traced_once(loss_fn), mode="pmap")  # replicate's layout is pmap's
    losses = []
    for b in batches():
        state, m = step(state, split_batch(b))
        losses.append(float(m["loss"][0]))
    ref_state, ref_losses = reference
    assert_trees_close(unreplicate(state).params, ref_state.params, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_replicate_puts_one_copy_on_each_of_the_first_n_devices():
    x = jnp.arange(6.0).reshape(2, 3)
    copies = replicate({"x": x, "step": 3}, 4)
    assert copies["x"].shape == (4, 2, 3) and copies["step"].shape == (4,)
    for leaf, value in ((copies["x"], x), (copies["step"], 3)):
        shards = sorted(leaf.addressable_shards, key=lambda s: s.device.id)
        assert [s.device for s in shards] == jax.local_devices()[:4]
        for shard in shards:
            assert shard.data.shape == (1, *np.shape(value))
            np.testing.assert_array_equal(shard.data[0], value)


def test_sharded_mesh_equals_single_device_and_compiles_once(reference):
    mesh = data_parallel_mesh()
    state = shard_params(mesh, make_state(tiger(1e-2, accumulation_steps=2)))
    step = make_train_step(traced_once(loss_fn), mode="sharded")
    for b in batches():
        state, _ = step(state, shard_batch(mesh, b))
    assert_trees_close(state.params, reference[0].params, rtol=2e-5, atol=2e-6)


def test_params_sharded_by_path_rules_keep_shardings(reference):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    state = make_state(tiger(1e-2, accumulation_steps=2))
    state = shard_params(mesh, state, {r"Dense_0/kernel$": PartitionSpec(None, "model")})
    step = make_train_step(loss_fn, mode="sharded")
    for b in batches():
        state, _ = step(state, shard_batch(mesh, b))
    kernel = state.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "model")
    mu = optax.tree.get(state.opt_state, "mu")
    assert mu["Dense_0"]["kernel"].sharding.spec == PartitionSpec(None, "model")
    assert_trees_close(state.params, reference[0].params, rtol=2e-5, atol=2e-6)


def test_extra_args_reach_the_optimizer():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    tx = optax.chain(
        optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update), optax.sgd(0.1)
    )
    state = make_state(tx)
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads=grads, extra_args={"loss": 1.5})
    assert seen == {"loss": 1.5} and int(new.step) == 1
    assert_trees_close(new.params, jax.tree.map(lambda p: p - 0.1, state.params))


def test_the_callers_params_survive_a_step_by_default():
    state = make_state(tiger(1e-2))
    first = make_train_step(loss_fn)(state, batches(1)[0])[0]
    second = make_train_step(loss_fn)(state, batches(1)[0])[0]  # the same init again
    assert_trees_close(first.params, second.params, rtol=0, atol=0)
    assert not jax.tree.leaves(state.params)[0].is_deleted()


def test_donated_step_consumes_its_input():
    state = make_state(tiger(1e-2))
    make_train_step(loss_fn, donate=True)(state, batches(1)[0])
    assert jax.tree.leaves(state.params)[0].is_deleted()


def test_a_two_argument_loss_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match=r"calls loss_fn\(params, apply_fn, batch\).*lambda"):
        make_train_step(lambda params, batch: 0.0)


def test_extra_args_reach_a_plain_transform_too():
    state = make_state(optax.scale_by_adam())  # a GradientTransformation without extra args
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads=grads, extra_args={"loss": 1.5})
    assert int(new.step) == 1


def test_two_dimensional_mesh_for_tensor_parallel_rules():
    mesh = data_parallel_mesh(model=2)
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (4, 2)
    assert data_parallel_mesh().axis_names == ("data",)
    with pytest.raises(ValueError, match=r"model=3 must divide the number of devices \(8\)"):
        data_parallel_mesh(model=3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode must be one of"):
        make_train_step(loss_fn, mode="tpu")
    with pytest.raises(ValueError, match="not divisible into 8 equal parts"):
        split_batch({"x": jnp.zeros((12, 2))})


def _pmap_noise(axis_name, average_grads):
    from optax_ext.noise_measurement import measure_noise_scale, noise_scale

    tx = optax.chain(measure_noise_scale(batch_size=4, axis_name=axis_name), tiger(1e-2))
    state = replicate(make_state(tx))
    step = make_train_step(loss_fn, mode="pmap", average_grads=average_grads)
    for b in batches(4):
        state, _ = step(state, split_batch(b))
    return float(noise_scale(state.opt_state).b_simple), unreplicate(state).params


def test_noise_measurement_composes_with_the_pmap_step_defaults():
    """The README's pair, measure_noise_scale(axis_name="batch") and make_train_step's
    averaging pmap step, measures what the transform measures when it averages itself
    (once it averaged twice and reported B_simple = -4e-7); without an axis name the
    step's per-device statistic is used the same way."""
    reference, ref_params = _pmap_noise("batch", average_grads=False)
    assert reference > 0
    for axis_name in ("batch", None):
        b_simple, params = _pmap_noise(axis_name, average_grads=True)
        np.testing.assert_allclose(b_simple, reference, rtol=1e-4)
        assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-6)

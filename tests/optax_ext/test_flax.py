"""Tiger inside real Flax training: Linen's TrainState and NNX's Optimizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

from optax_ext.optimizers.tiger import tiger


def teacher_data(seed=0, n=512, dim=16, classes=4):
    """A learnable classification task: labels from a fixed random two-layer teacher."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, 32))
    w2 = rng.standard_normal((32, classes))
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=-1)
    return jnp.asarray(x), jnp.asarray(y)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(4)(x)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_linen_train_state_with_tiger_and_accumulation_learns():
    x, y = teacher_data()
    model = LinenMLP()
    params = model.init(jax.random.key(0), x[:1])["params"]
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=tiger(1e-2, accumulation_steps=2)
    )

    @jax.jit
    def step(state, xb, yb):
        loss_fn = lambda p: xent(state.apply_fn({"params": p}, xb), yb)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    first = float(xent(model.apply({"params": params}, x), y))
    for i in range(200):
        sl = slice((i % 8) * 64, (i % 8 + 1) * 64)
        state, _ = step(state, x[sl], y[sl])
    last = float(xent(model.apply({"params": state.params}, x), y))
    accuracy = float(jnp.mean(jnp.argmax(model.apply({"params": state.params}, x), -1) == y))
    assert last < 0.4 * first, (first, last)
    assert accuracy > 0.85
    assert int(state.opt_state.count) == 200  # micro-steps; 100 parameter updates


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.dense1 = nnx.Linear(16, 64, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.dense2 = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.dense2(self.norm(nnx.gelu(self.dense1(x))))


def test_nnx_optimizer_with_tiger_learns():
    x, y = teacher_data(1)
    model = NnxMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tiger(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(xb), yb))(model)
        optimizer.update(model, grads)
        return loss

    first = float(xent(model(x), y))
    for i in range(100):
        sl = slice((i % 8) * 64, (i % 8 + 1) * 64)
        step(model, optimizer, x[sl], y[sl])
    last = float(xent(model(x), y))
    assert last < 0.4 * first, (first, last)
    # NNX variables flatten to ".value": the path rules still see ".../bias" and ".../scale"
    from optax_ext._common import tree_paths

    paths = jax.tree.leaves(tree_paths(nnx.state(model, nnx.Param)))
    assert "norm/scale" in paths and "dense1/bias" in paths, paths

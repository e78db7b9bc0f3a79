"""FGM and the gradient penalty on a small Flax text classifier, against float64 NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, to_f64, x64

from optax_ext.adversarial import fgm_value_and_grad, gradient_penalty_loss

VOCAB, LENGTH, WIDTH, HIDDEN, CLASSES, BATCH = 20, 5, 6, 7, 3, 8


class Classifier(nn.Module):
    """Token + position embeddings, mean-pool, tanh hidden layer, logits."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, WIDTH, name="tok")(tokens)
        x = x + nn.Embed(LENGTH, WIDTH, name="pos")(jnp.arange(tokens.shape[1]))
        h = jnp.tanh(nn.Dense(HIDDEN, name="hidden")(x.mean(axis=1)))
        return nn.Dense(CLASSES, name="out")(h)


MODEL = Classifier()


def loss_fn(params, tokens, labels):
    logp = jax.nn.log_softmax(MODEL.apply(params, tokens))
    return -jnp.mean(logp[jnp.arange(len(labels)), labels])


def data(seed=0):
    r = np.random.default_rng(seed)
    return (
        jnp.asarray(r.integers(0, VOCAB, (BATCH, LENGTH))),
        jnp.asarray(r.integers(0, CLASSES, BATCH)),
    )


def init(seed=0):
    return MODEL.init(jax.random.key(seed), jnp.zeros((1, LENGTH), jnp.int32))


# ------------------------------------------------------- float64 NumPy reference


def np_loss_and_grads(p, tokens, labels):
    """Forward and hand-written backward of the classifier in float64."""
    tok, pos = p["tok"]["embedding"], p["pos"]["embedding"]
    w1, b1 = p["hidden"]["kernel"], p["hidden"]["bias"]
    w2, b2 = p["out"]["kernel"], p["out"]["bias"]
    h0 = (tok[tokens] + pos[None]).mean(axis=1)
    h1 = np.tanh(h0 @ w1 + b1)
    z = h1 @ w2 + b2
    z = z - z.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.mean(np.log(prob[np.arange(n), labels]))
    dz = (prob - np.eye(CLASSES)[labels]) / n
    da = (dz @ w2.T) * (1 - h1**2)
    dh0 = da @ w1.T / tokens.shape[1]  # every position gets 1/L of the pooled gradient
    dtok = np.zeros_like(tok)
    np.add.at(dtok, tokens, np.broadcast_to(dh0[:, None], (*tokens.shape, WIDTH)))
    grads = {
        "tok": {"embedding": dtok},
        "pos": {"embedding": np.broadcast_to(dh0.sum(axis=0), pos.shape).copy()},
        "hidden": {"kernel": h0.T @ da, "bias": da.sum(axis=0)},
        "out": {"kernel": h1.T @ dz, "bias": dz.sum(axis=0)},
    }
    return loss, grads


def np_fgm(p, tokens, labels, eps, tables):
    _, g = np_loss_and_grads(p, tokens, labels)
    q = jax.tree.map(np.copy, p)
    for t in tables:
        gt = g[t]["embedding"]
        q[t]["embedding"] = p[t]["embedding"] + eps * gt / (np.sqrt(np.sum(gt**2)) + 1e-8)
    return np_loss_and_grads(q, tokens, labels)


def test_reference_backward_is_autodiff_of_the_flax_model():
    """Anchors the hand-written NumPy backward before it serves as the FGM reference."""
    params, (tokens, labels) = init(), data()
    with x64():
        p64 = jax.tree.map(jnp.asarray, to_f64(params))
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(p64, tokens, labels)
    want_loss, want = np_loss_and_grads(
        to_f64(params)["params"], np.asarray(tokens), np.asarray(labels)
    )
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
    assert_trees_close(grads["params"], want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("rule, tables", [(None, ("tok", "pos")), (r"tok/embedding$", ("tok",))])
def test_fgm_matches_float64_reference(rule, tables):
    params, (tokens, labels) = init(1), data(1)
    kwargs = {} if rule is None else {"embedding": rule}
    with x64():
        p64 = jax.tree.map(jnp.asarray, to_f64(params))
        loss, grads = jax.jit(fgm_value_and_grad(loss_fn, epsilon=0.7, **kwargs))(
            p64, tokens, labels
        )
    want_loss, want = np_fgm(
        to_f64(params)["params"], np.asarray(tokens), np.asarray(labels), 0.7, tables
    )
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-12)
    assert_trees_close(grads["params"], want, rtol=1e-10, atol=1e-13)
    clean_loss, _ = np_loss_and_grads(
        to_f64(params)["params"], np.asarray(tokens), np.asarray(labels)
    )
    assert want_loss > clean_loss + 1e-3  # the perturbation climbs the loss: the test bites


def test_fgm_in_float32_with_default_epsilon_and_aux():
    params, (tokens, labels) = init(2), data(2)

    def with_aux(p, tokens, *, labels):
        return loss_fn(p, tokens, labels), {"n": tokens.shape[0]}

    (loss, aux), grads = jax.jit(fgm_value_and_grad(with_aux, has_aux=True))(
        params, tokens, labels=labels
    )
    want_loss, want = np_fgm(
        to_f64(params)["params"], np.asarray(tokens), np.asarray(labels), 1.0, ("tok", "pos")
    )
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert_trees_close(grads["params"], want, rtol=1e-4, atol=1e-6)
    assert aux["n"] == BATCH
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_zero_epsilon_is_the_plain_gradient():
    params, (tokens, labels) = init(3), data(3)
    loss, grads = jax.jit(fgm_value_and_grad(loss_fn, epsilon=0.0))(params, tokens, labels)
    want_loss, want = jax.jit(jax.value_and_grad(loss_fn))(params, tokens, labels)
    assert float(loss) == float(want_loss)
    assert_trees_close(grads, want, rtol=0, atol=0)
    penalised = jax.jit(gradient_penalty_loss(loss_fn, epsilon=0.0))(params, tokens, labels)
    assert float(penalised) == float(want_loss)


def test_gradient_penalty_value_and_gradient():
    """Value against NumPy; gradient against central differences of the NumPy value."""
    params, (tokens, labels) = init(4), data(4)
    p_np, t_np, y_np = to_f64(params)["params"], np.asarray(tokens), np.asarray(labels)

    def np_penalised(p):
        loss, g = np_loss_and_grads(p, t_np, y_np)
        return loss + 0.5 * 0.3 * sum(np.sum(g[t]["embedding"] ** 2) for t in ("tok", "pos"))

    with x64():
        p64 = jax.tree.map(jnp.asarray, to_f64(params))
        value, grads = jax.jit(jax.value_and_grad(gradient_penalty_loss(loss_fn, epsilon=0.3)))(
            p64, tokens, labels
        )
    np.testing.assert_allclose(float(value), np_penalised(p_np), rtol=1e-12)
    r = np.random.default_rng(0)
    shift = lambda step, direction: jax.tree.map(lambda a, b: a + step * b, p_np, direction)
    for _ in range(3):
        v = jax.tree.map(lambda a: r.standard_normal(a.shape), p_np)
        fd = (np_penalised(shift(1e-5, v)) - np_penalised(shift(-1e-5, v))) / 2e-5
        ours = sum(
            np.sum(np.asarray(g) * d)
            for g, d in zip(jax.tree.leaves(grads["params"]), jax.tree.leaves(v), strict=True)
        )
        np.testing.assert_allclose(ours, fd, rtol=1e-7)


def test_gradient_penalty_with_aux():
    params, (tokens, labels) = init(5), data(5)
    with_aux = lambda p, t, y: (loss_fn(p, t, y), jnp.ones(()))
    (value, aux), _ = jax.jit(
        jax.value_and_grad(
            gradient_penalty_loss(with_aux, epsilon=0.5, embedding=r"tok/embedding$", has_aux=True),
            has_aux=True,
        )
    )(params, tokens, labels)
    plain = jax.jit(gradient_penalty_loss(loss_fn, epsilon=0.5, embedding=r"tok/embedding$"))
    assert float(value) == pytest.approx(float(plain(params, tokens, labels)), rel=1e-6)
    assert float(aux) == 1.0


def test_fgm_training_step_lowers_the_loss():
    params, (tokens, labels) = init(6), data(6)
    tx = optax.adam(3e-2)
    vg = fgm_value_and_grad(loss_fn, epsilon=0.1)

    @jax.jit
    def step(params, opt_state):
        _, grads = vg(params, tokens, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state, start = tx.init(params), float(loss_fn(params, tokens, labels))
    for _ in range(30):
        params, opt_state = step(params, opt_state)
    assert float(loss_fn(params, tokens, labels)) < 0.5 * start


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="epsilon"):
        fgm_value_and_grad(loss_fn, epsilon=-0.1)
    with pytest.raises(ValueError, match="epsilon"):
        gradient_penalty_loss(loss_fn, epsilon=float("nan"))
    params, (tokens, labels) = init(), data()
    with pytest.raises(ValueError, match="no parameter path matches.*word_embeddings"):
        fgm_value_and_grad(loss_fn, embedding="word_embeddings")(params, tokens, labels)

"""Exact chunked contrastive gradients: losses vs float64 NumPy, gradients vs the full batch."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, x64
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_ext.contrastive import (
    am_softmax_loss,
    contrastive_value_and_grad,
    cosent_loss,
    info_nce_loss,
    simcse_loss,
)

# ------------------------------------------------------- float64 NumPy references


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ce(logits, targets):
    m = logits.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return float(np.mean(logz - logits[np.arange(len(targets)), targets]))


def np_info_nce(q, k, tau, symmetric):
    s = np_normalize(q) @ np_normalize(k).T / tau
    t = np.arange(len(q))
    return 0.5 * (np_ce(s, t) + np_ce(s.T, t)) if symmetric else np_ce(s, t)


def np_simcse(h, tau):
    n = len(h)
    s = np_normalize(h) @ np_normalize(h).T / tau
    total = 0.0
    for i in range(n):
        j = i + 1 if i % 2 == 0 else i - 1
        others = [s[i, c] for c in range(n) if c != i]
        total += np.log(np.sum(np.exp(others))) - s[i, j]
    return total / n


def np_am_softmax(q, k, labels, m, scale, symmetric):
    cos = np_normalize(q) @ np_normalize(k).T
    t = np.arange(len(q)) if labels is None else np.asarray(labels)
    logits = scale * cos
    logits[np.arange(len(t)), t] -= scale * m
    return 0.5 * (np_ce(logits, t) + np_ce(logits.T, t)) if symmetric else np_ce(logits, t)


def np_cosent(a, b, y, lam):
    cos = np.sum(np_normalize(a) * np_normalize(b), axis=1)
    total = 1.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] > y[j]:  # pair i should be more similar than pair j
                total += np.exp(lam * (cos[j] - cos[i]))
    return float(np.log(total))


def test_losses_match_float64_numpy():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    extra = rng.standard_normal((9, 5))  # one-directional keys with extra negatives
    labels = np.array([2, 0, 1, 2, 0, 1])
    scores = np.array([0.1, 0.7, 0.7, 0.3, 1.0, 0.0])  # graded, with a tie
    cases = [
        (lambda: info_nce_loss(q, k, 0.07), np_info_nce(q, k, 0.07, False)),
        (lambda: info_nce_loss(q, k, 0.5, symmetric=True), np_info_nce(q, k, 0.5, True)),
        (lambda: info_nce_loss(q, extra, 0.1), np_info_nce(q, extra, 0.1, False)),
        (lambda: simcse_loss(q, 0.05), np_simcse(q, 0.05)),
        (lambda: am_softmax_loss(q, k), np_am_softmax(q, k, None, 0.35, 30.0, False)),
        (
            lambda: am_softmax_loss(q, k, margin=0.2, scale=5.0, symmetric=True),
            np_am_softmax(q, k, None, 0.2, 5.0, True),
        ),
        (
            lambda: am_softmax_loss(q, k[:3], labels),
            np_am_softmax(q, k[:3], labels, 0.35, 30.0, False),
        ),
        (lambda: cosent_loss(q, k, scores), np_cosent(q, k, scores, 20.0)),
        (lambda: cosent_loss(q, k, labels, scale=3.0), np_cosent(q, k, labels, 3.0)),
    ]
    with x64():
        q, k, extra = map(jnp.asarray, (q, k, extra))
        for i, (ours, ref) in enumerate(cases):
            np.testing.assert_allclose(float(ours()), ref, rtol=1e-12, err_msg=f"case {i}")


def test_masked_losses_have_finite_exact_gradients():
    """simcse and cosent mask terms with -inf: their gradients must stay finite and right."""
    rng = np.random.default_rng(1)
    h = rng.standard_normal((4, 3))
    y = np.array([0.0, 1.0, 1.0, 0.5])
    with x64():
        fns = [lambda x: simcse_loss(x, 0.3), lambda x: cosent_loss(x, x[::-1] + 0.5, y, 4.0)]
        for fn in fns:
            g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(h)))
            assert np.all(np.isfinite(g))
            steps = 1e-6 * np.eye(h.size).reshape(h.size, *h.shape)
            values = jax.jit(jax.vmap(fn))(jnp.asarray(np.concatenate([h + steps, h - steps])))
            fd = (values[: h.size] - values[h.size :]).reshape(h.shape) / 2e-6
            np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_losses_reject_bad_hyperparameters():
    q = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(q, q, temperature=0.0)
    with pytest.raises(ValueError, match="scale"):
        am_softmax_loss(q, q, scale=-1.0)
    with pytest.raises(ValueError, match="symmetric"):
        am_softmax_loss(q, q, jnp.array([0, 1]), symmetric=True)
    with pytest.raises(ValueError, match="scale"):
        cosent_loss(q, q, jnp.array([0, 1]), scale=0.0)
    with pytest.raises(ValueError, match="even"):
        simcse_loss(jnp.ones((3, 2)))


# ------------------------------------------------------------ a small Flax encoder

VOCAB, LENGTH, WIDTH, DIM = 64, 4, 32, 32


class Encoder(nn.Module):
    """Embedding + mean-pool + dropout + Dense: rows are independent."""

    rate: float = 0.1

    @nn.compact
    def __call__(self, tokens, *, train):
        x = nn.Embed(VOCAB, WIDTH)(tokens).mean(axis=1)
        x = nn.Dropout(self.rate, deterministic=not train)(x)
        return nn.Dense(DIM)(jnp.tanh(x))


MODEL = Encoder()


def encode(params, tokens, rng):
    rngs = None if rng is None else {"dropout": rng}
    return MODEL.apply(params, tokens, train=rng is not None, rngs=rngs)


def tower(name):
    return lambda p, x, rng: encode(p[name], x, rng)


def init_encoder(seed):
    return MODEL.init(jax.random.key(seed), jnp.zeros((1, LENGTH), jnp.int32), train=False)


def tokens(seed, n):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (n, LENGTH)), jnp.int32)


def reference_loss(
    params, batch, rng, *, chunk, q_fn, k_fn, loss, loss_args=(), loss_uses_params=False
):
    """The full-batch loss, with the documented key rule written out row block by row block."""
    n = jax.tree.leaves(batch)[0].shape[0]
    rows = lambda t, c: jax.tree.map(lambda x: x[c * chunk : (c + 1) * chunk], t)
    q_parts, k_parts = [], []
    for c in range(n // chunk):
        key_c = None if rng is None else jax.random.fold_in(rng, c)
        if k_fn is None:
            q_parts.append(q_fn(params, rows(batch, c), key_c))
        else:
            sub = (None, None) if key_c is None else (jax.random.fold_in(key_c, i) for i in (0, 1))
            kq, kk = sub
            q_parts.append(q_fn(params, rows(batch[0], c), kq))
            k_parts.append(k_fn(params, rows(batch[1], c), kk))
    embs = [jnp.concatenate(q_parts)] + ([jnp.concatenate(k_parts)] if k_parts else [])
    lead = (params,) if loss_uses_params else ()
    return loss(*lead, *embs, *loss_args)


def learned_temperature_clip(params, q, k):
    loss = info_nce_loss(q, k, jnp.exp(-params["log_scale"]), symmetric=True)
    return loss, {"top1": jnp.mean(jnp.argmax(q @ k.T, axis=1) == jnp.arange(len(q)))}


def am_softmax_classes(params, h, labels):
    return am_softmax_loss(h, params["classes"], labels, margin=0.3, scale=10.0)


def case(name):
    """(params, batch, loss_args, q_fn, k_fn, loss, loss_uses_params, has_aux) for a layout."""
    n = 16
    if name == "simcse_one_tower":  # two dropout views of each sentence, side by side
        return (
            init_encoder(0),
            jnp.repeat(tokens(1, n // 2), 2, axis=0),
            (),
            encode,
            None,
            partial(simcse_loss, temperature=0.05),
            False,
            False,
        )
    if name == "clip_two_towers":  # separate towers, learnable temperature, aux metric
        params = {"q": init_encoder(0), "k": init_encoder(1), "log_scale": jnp.asarray(2.0)}
        return (
            params,
            (tokens(2, n), tokens(3, n)),
            (),
            tower("q"),
            tower("k"),
            learned_temperature_clip,
            True,
            True,
        )
    if name == "cosent_shared_tower":  # one tower applied to both sides, graded labels
        labels = jnp.asarray(np.random.default_rng(4).integers(0, 3, n), jnp.float32)
        return (
            init_encoder(0),
            (tokens(5, n), tokens(6, n)),
            (labels,),
            encode,
            encode,
            partial(cosent_loss, scale=20.0),
            False,
            False,
        )
    if name == "am_softmax_classes":  # Su's form: learnt class centres live in params
        params = {"enc": init_encoder(0), "classes": jax.random.normal(jax.random.key(7), (5, DIM))}
        labels = jnp.asarray(np.random.default_rng(8).integers(0, 5, n))
        return (
            params,
            tokens(9, n),
            (labels,),
            tower("enc"),
            None,
            am_softmax_classes,
            True,
            False,
        )
    raise ValueError(name)


@pytest.mark.parametrize(
    "name", ["simcse_one_tower", "clip_two_towers", "cosent_shared_tower", "am_softmax_classes"]
)
def test_chunked_gradient_equals_full_batch_gradient(name):
    params, batch, args, q_fn, k_fn, loss, lup, aux = case(name)
    rng = jax.random.key(42)
    vg = contrastive_value_and_grad(
        q_fn, loss, chunk_size=4, key_encode_fn=k_fn, loss_uses_params=lup, has_aux=aux
    )
    ref = partial(
        reference_loss,
        chunk=4,
        q_fn=q_fn,
        k_fn=k_fn,
        loss=loss,
        loss_args=args,
        loss_uses_params=lup,
    )
    value, grads = jax.jit(vg)(params, batch, *args, rng=rng)
    ref_vg = jax.jit(jax.value_and_grad(ref, has_aux=aux))
    want_value, want_grads = ref_vg(params, batch, rng)
    loss_value, want_loss = (value[0], want_value[0]) if aux else (value, want_value)
    np.testing.assert_allclose(loss_value, want_loss, rtol=2e-6)
    if aux:
        np.testing.assert_allclose(value[1]["top1"], want_value[1]["top1"])
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-6 * scale)
    assert all(
        g.dtype == p.dtype
        for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True)
    )
    # The comparison can fail: dropout is on, so other keys give a clearly different gradient.
    _, other = ref_vg(params, batch, jax.random.key(43))
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want_grads), strict=True)
    )
    assert diff > 1e-3 * scale


def test_without_rng_is_deterministic_and_exact():
    params, batch = init_encoder(0), jnp.repeat(tokens(1, 8), 2, axis=0)
    loss = partial(simcse_loss, temperature=0.1)
    value, grads = contrastive_value_and_grad(encode, loss, chunk_size=8)(params, batch)
    want, want_grads = jax.value_and_grad(lambda p: loss(encode(p, batch, None)))(params)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-7)


def test_plain_accumulation_would_be_wrong():
    """Why the method exists: the mean of per-chunk gradients is not the full-batch one."""
    params, batch = init_encoder(0), jnp.repeat(tokens(1, 8), 2, axis=0)
    grad = jax.jit(jax.grad(lambda p, x: simcse_loss(encode(p, x, None), 0.05)))
    full = grad(params, batch)
    chunks = batch.reshape(4, 4, LENGTH)
    naive = jax.tree.map(lambda g: g.mean(0), jax.jit(jax.vmap(grad, (None, 0)))(params, chunks))
    _, exact = jax.jit(
        contrastive_value_and_grad(encode, partial(simcse_loss, temperature=0.05), 4)
    )(params, batch)
    gap = lambda a, b: max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert gap(naive, full) > 100 * gap(exact, full)


def test_sharded_params_and_batch_give_the_same_gradient():
    mesh = Mesh(np.array(jax.devices()), ("model",))
    params = {"q": init_encoder(0), "k": init_encoder(1), "log_scale": jnp.asarray(2.0)}
    batch = (tokens(2, 32), tokens(3, 32))
    vg = jax.jit(
        contrastive_value_and_grad(
            tower("q"),
            learned_temperature_clip,
            8,
            key_encode_fn=tower("k"),
            loss_uses_params=True,
            has_aux=True,
        )
    )
    rng = jax.random.key(0)
    (want, _), want_grads = vg(params, batch, rng=rng)

    def spec(x):  # vocab rows of the tables, output features of the kernels: 8-way
        if x.ndim == 2 and x.shape[0] == VOCAB:
            return PartitionSpec("model", None)
        if x.ndim == 2 or (x.ndim == 1 and x.shape[0] == DIM):
            return PartitionSpec(None, "model") if x.ndim == 2 else PartitionSpec("model")
        return PartitionSpec()

    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)
    data = jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("model"))), batch
    )
    assert len(sharded["q"]["params"]["Embed_0"]["embedding"].sharding.device_set) == 8
    # The gradient's layout is jit's to choose; out_shardings makes it the params' own.
    like_params = jax.tree.map(lambda x: x.sharding, sharded)
    pinned = jax.jit(vg, out_shardings=(NamedSharding(mesh, PartitionSpec()), like_params))
    (value, _), grads = pinned(sharded, data, rng=rng)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    assert_trees_close(grads, want_grads, rtol=1e-5, atol=1e-6 * scale)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded), strict=True):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim), (g.sharding, p.sharding)


def test_training_on_synthetic_retrieval_raises_accuracy():
    """Queries use the first half of the vocabulary; keys are the same tokens mapped by a
    fixed permutation into the second half, with one noisy token: the shared tower must
    learn that token t and perm(t) mean the same."""
    half = VOCAB // 2
    perm = half + np.random.default_rng(0).permutation(half)

    def pairs(seed, n):
        r = np.random.default_rng(seed)
        q = r.integers(0, half, (n, LENGTH))
        k = perm[q]
        k[:, 0] = r.integers(half, VOCAB, n)  # one noisy token per key
        return jnp.asarray(q, jnp.int32), jnp.asarray(k, jnp.int32)

    def accuracy(params, q, k):
        hq, hk = encode(params, q, None), encode(params, k, None)
        return float(
            jnp.mean(jnp.argmax(hq @ hk.T / jnp.linalg.norm(hk, axis=1), 1) == jnp.arange(len(q)))
        )

    tx = optax.adamw(3e-2, weight_decay=1e-4)
    vg = contrastive_value_and_grad(
        encode, partial(info_nce_loss, temperature=0.1), 16, key_encode_fn=encode
    )

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = vg(params, batch, rng=rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = init_encoder(0)
    opt_state = tx.init(params)
    held_out = pairs(10_000, 64)
    before = accuracy(params, *held_out)
    losses = []
    for i in range(40):
        params, opt_state, loss = step(params, opt_state, pairs(i, 64), jax.random.key(i))
        losses.append(float(loss))
    after = accuracy(params, *held_out)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert before < 0.1 and after > 0.6, (before, after)


# ---------------------------------------------------------------------------- errors


def test_batch_not_divisible_by_chunk_size_raises():
    vg = contrastive_value_and_grad(encode, simcse_loss, chunk_size=6)
    with pytest.raises(ValueError, match="batch size 16 is not divisible by chunk_size 6"):
        vg(init_encoder(0), tokens(0, 16))


def test_inconsistent_batches_raise():
    vg = contrastive_value_and_grad(encode, info_nce_loss, 4, key_encode_fn=encode)
    with pytest.raises(ValueError, match="same leading batch axis"):
        vg(init_encoder(0), (tokens(0, 8), tokens(1, 12)))
    with pytest.raises(ValueError, match="pair"):
        vg(init_encoder(0), tokens(0, 8))
    pooled = contrastive_value_and_grad(lambda p, x, r: encode(p, x, r).mean(0), simcse_loss, 4)
    with pytest.raises(ValueError, match="leading rows"):
        pooled(init_encoder(0), tokens(0, 8))


class BatchNormEncoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, WIDTH)(tokens).mean(axis=1)
        return nn.BatchNorm(use_running_average=False)(x)


def test_batch_statistics_are_rejected():
    model = BatchNormEncoder()
    variables = model.init(jax.random.key(0), tokens(0, 4))
    assert "batch_stats" in variables
    loss = partial(simcse_loss, temperature=0.1)
    in_params = contrastive_value_and_grad(
        lambda v, x, r: model.apply(v, x, mutable=["batch_stats"])[0], loss, 4
    )
    with pytest.raises(ValueError, match="batch statistics.*'batch_stats/"):
        in_params(variables, tokens(1, 8))
    stats = {"batch_stats": variables["batch_stats"]}
    mutating = contrastive_value_and_grad(
        lambda p, x, r: model.apply({"params": p} | stats, x, mutable=["batch_stats"]), loss, 4
    )
    with pytest.raises(ValueError, match="encoder's outputs contain batch statistics"):
        mutating(variables["params"], tokens(1, 8))


def test_chunk_size_must_be_a_positive_int():
    with pytest.raises(ValueError, match="chunk_size"):
        contrastive_value_and_grad(encode, simcse_loss, 0)


# ---------------------------------------------------------------------------- memory


class WideEncoder(nn.Module):
    """Activations dominate: two wide layers on every token of long-ish inputs."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, 32)(tokens)
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(16)(x.mean(axis=1))


def test_temporary_memory_is_at_most_a_quarter_at_one_eighth_chunks():
    model, n = WideEncoder(), 256
    batch = jax.ShapeDtypeStruct((n, 32), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32), jnp.int32))
    enc = lambda p, x, rng: model.apply(p, x)
    loss = partial(info_nce_loss, temperature=0.1)
    full = jax.value_and_grad(lambda p, x: loss(enc(p, x, None), enc(p, x[:, ::-1], None)))
    chunked = contrastive_value_and_grad(
        enc, loss, n // 8, key_encode_fn=lambda p, x, r: enc(p, x[:, ::-1], r)
    )
    temp = lambda f, *a: jax.jit(f).lower(*a).compile().memory_analysis().temp_size_in_bytes
    full_bytes = temp(full, params, batch)
    chunk_bytes = temp(chunked, params, (batch, batch))
    activation_bytes = 2 * n * 32 * 256 * 4  # one wide layer's output for both towers
    assert full_bytes > activation_bytes  # the model really is activation-dominated
    assert chunk_bytes <= full_bytes / 4, (chunk_bytes, full_bytes)

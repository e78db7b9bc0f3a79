"""Exact large-batch gradients for in-batch contrastive losses, and the losses themselves.

An in-batch softmax couples every sample with every other one, so summing the gradients
of small batches (ordinary accumulation) gives the gradient of a *different*, smaller-batch
loss. :func:`contrastive_value_and_grad` gives the exact gradient of the full-batch loss
while only ever holding the activations of one chunk, by splitting the chain rule at the
embeddings (Su's derivation; the GradCache method):

1. encode all ``N`` samples chunk by chunk, without gradients: ``H`` (``N × d``);
2. ``L = loss(H)`` and ``G = ∂L/∂H`` by autodiff on the cached embeddings;
3. for each chunk ``c``: ``grads += ∂/∂θ Σ_{i∈c} ⟨f_θ(x_i), G_i⟩`` (one VJP per chunk);
4. ``grads`` is the full-batch gradient; ``L`` from step 2 is the full-batch loss.

Both passes run under ``lax.map`` / ``lax.scan``, so the compiled program keeps one chunk's
activations (plus ``H`` and ``G``) instead of the whole batch's.

The ready-made losses (:func:`info_nce_loss`, :func:`simcse_loss`, :func:`am_softmax_loss`,
:func:`cosent_loss`) work on cosine similarities and can be used with or without it.

References:
  Su Jianlin, "Exact gradient accumulation for contrastive losses",
  https://kexue.fm/archives/8471
  Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
  (GradCache), https://arxiv.org/abs/2101.06983
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optax_ext._common import check_int, check_range, tree_paths, work_dtype

__all__ = [
    "am_softmax_loss",
    "contrastive_value_and_grad",
    "cosent_loss",
    "info_nce_loss",
    "simcse_loss",
]

#: Paths of batch-statistics collections (Flax ``BatchNorm`` keeps ``mean``/``var`` there).
_BATCH_STATS = re.compile(r"(^|/)batch_stats(/|$)")

EncodeFn = Callable[[Any, Any, Any], Any]


# ------------------------------------------------------------------ exact gradient


def contrastive_value_and_grad(
    encode_fn: EncodeFn,
    loss_fn: Callable[..., Any],
    chunk_size: int,
    *,
    key_encode_fn: EncodeFn | None = None,
    loss_uses_params: bool = False,
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""Like ``jax.value_and_grad`` for ``loss(encode(batch))``, chunk by chunk and exact.

    With ``H = f_θ(X)`` the embeddings of all ``N`` rows and ``G = ∂L/∂H``,

    .. math::

        \frac{\partial L}{\partial \theta}
        = \sum_{c} \frac{\partial}{\partial \theta}
          \sum_{i \in c} \big\langle f_\theta(x_i),\ \mathrm{sg}(G_i) \big\rangle ,

    computed in two passes over chunks of ``chunk_size`` rows: pass 1 encodes every chunk
    with no gradient and keeps only ``H``; pass 2 re-encodes each chunk inside a
    ``lax.scan`` and adds its VJP with ``G_c``. Memory: one chunk's activations, plus
    ``H``, ``G`` and one gradient accumulator. Compute: two forwards and one backward.

    **Randomness contract.** With ``rng`` given, rows ``[c·s, (c+1)·s)`` (chunk ``c``,
    ``s = chunk_size``) are encoded with the key ``jax.random.fold_in(rng, c)`` in *both*
    passes, so dropout masks match and the gradient stays exact. With two towers the
    query tower gets ``fold_in(fold_in(rng, c), 0)`` and the key tower
    ``fold_in(fold_in(rng, c), 1)``. The full-batch loss whose gradient this is::

        H = concat([encode_fn(params, rows_c(batch), jax.random.fold_in(rng, c))
                    for c in range(N // s)])
        L = loss_fn(H, *loss_args)

    Without ``rng`` the encoders receive ``None`` (deterministic mode).

    **Sharding.** Under ``jit`` with params and batch sharded over a mesh the result is the
    same gradient; its layout is left to XLA (an embedding table's gradient may come out
    replicated): pass ``out_shardings`` to ``jax.jit`` to give ``grads`` the params' own.

    **What breaks exactness.** Anything in the encoder that couples rows of a chunk, above
    all batch statistics (``BatchNorm`` in training mode): each chunk would be normalised
    by its own statistics. ``params`` holding a ``batch_stats`` collection, or an encoder
    returning one (``apply(..., mutable=["batch_stats"])``), raises ``ValueError``. A
    ``BatchNorm`` that only uses running averages is per-row and therefore fine: close
    over its ``batch_stats`` inside ``encode_fn`` instead of passing them in ``params``.

    Args:
      encode_fn: ``encode_fn(params, inputs, rng) -> embeddings``; ``inputs`` is a pytree
        of arrays with ``chunk_size`` leading rows, ``rng`` a key or ``None``; the
        embeddings are a pytree of arrays with ``chunk_size`` leading rows. It must treat
        rows independently.
      loss_fn: ``loss_fn(embeddings, *loss_args)`` (one tower) or
        ``loss_fn(query_embeddings, key_embeddings, *loss_args)`` (two towers) -> scalar,
        over the embeddings of the *whole* batch. With ``loss_uses_params`` it takes
        ``params`` first (e.g. a learnable temperature or AM-Softmax class centres).
      chunk_size: rows per chunk (static); must divide the batch size.
      key_encode_fn: the key tower, ``key_encode_fn(params, inputs, rng)``. When given,
        ``batch`` is a pair ``(query_inputs, key_inputs)`` with the same number of rows.
        Both towers receive the same ``params``: a shared tower is
        ``key_encode_fn=encode_fn``, separate towers pick their own sub-trees.
      loss_uses_params: pass ``params`` to ``loss_fn`` and add its direct gradient.
      has_aux: ``loss_fn`` returns ``(loss, aux)``, as in ``jax.value_and_grad``.

    Returns:
      A function ``(params, batch, *loss_args, rng=None) -> (loss, grads)`` (or
      ``((loss, aux), grads)``), jit-compatible; ``loss_args`` (labels, ...) are passed
      to ``loss_fn`` unchanged and are not differentiated. ``grads`` has ``params``'
      structure and dtypes (accumulated in at least float32).

    Raises:
      ValueError: batch size not divisible by ``chunk_size``, rows differing between
        leaves or towers, embeddings without ``chunk_size`` leading rows, batch stats.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from functools import partial
      >>> encode = lambda p, x, rng: jnp.tanh(x @ p["w"])
      >>> vg = contrastive_value_and_grad(
      ...     encode, partial(info_nce_loss, temperature=0.1), chunk_size=4,
      ...     key_encode_fn=encode)
      >>> params = {"w": jnp.ones((3, 2)) + jnp.eye(3, 2)}
      >>> q = jnp.arange(24.0).reshape(8, 3) / 24
      >>> loss, grads = jax.jit(vg)(params, (q, q[::-1]))
      >>> grads["w"].shape
      (3, 2)

    References:
      Su Jianlin, https://kexue.fm/archives/8471; Gao et al. (GradCache),
      https://arxiv.org/abs/2101.06983
    """
    chunk_size = check_int("chunk_size", chunk_size)
    two_towers = key_encode_fn is not None
    encode = _two_towers(encode_fn, key_encode_fn) if two_towers else encode_fn

    def full_loss(params, emb, loss_args):
        emb = tuple(emb) if two_towers else (emb,)
        lead = (params,) if loss_uses_params else ()
        return loss_fn(*lead, *emb, *loss_args)

    def value_and_grad(params, batch, *loss_args, rng=None):
        _reject_batch_stats(params, "params")
        if two_towers:
            batch = _as_pair(batch)
        n_chunks = _num_chunks(batch, chunk_size)
        index = jnp.arange(n_chunks)
        chunks = jax.tree.map(lambda x: x.reshape(n_chunks, chunk_size, *x.shape[1:]), batch)

        def encode_chunk(p, c, x):
            return encode(p, x, None if rng is None else jax.random.fold_in(rng, c))

        # Pass 1: forward only, so nothing but the embeddings survives a chunk.
        frozen = lax.stop_gradient(params)
        h = lax.map(lambda cx: encode_chunk(frozen, *cx), (index, chunks))
        _check_embeddings(h, chunk_size)
        merge = lambda t: jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), t)

        def loss_at(p, h_full):
            out = full_loss(p, h_full, loss_args)
            return out if has_aux else (out, None)

        (loss, aux), (loss_grads, g_full) = jax.value_and_grad(
            loss_at, argnums=(0, 1), has_aux=True
        )(params, merge(h))
        g = jax.tree.map(lambda x, ref: x.reshape(ref.shape), g_full, h)

        # Pass 2: one VJP per chunk; the scan frees each chunk's residuals before the next.
        def step(acc, cxg):
            c, x, g_c = cxg
            _, vjp = jax.vjp(lambda p: encode_chunk(p, c, x), params)
            return jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc, vjp(g_c)[0]), None

        # loss_grads is the loss's own dependence on params (zeros unless loss_uses_params).
        acc0 = jax.tree.map(lambda lg: lg.astype(_acc_dtype(lg)), loss_grads)
        acc, _ = lax.scan(step, acc0, (index, chunks, g))
        grads = jax.tree.map(lambda a, p: a.astype(jnp.result_type(p)), acc, params)
        return ((loss, aux) if has_aux else loss), grads

    return value_and_grad


def _two_towers(encode_fn: EncodeFn, key_encode_fn: EncodeFn) -> EncodeFn:
    def both(params, inputs, rng):
        tower_rng = lambda i: None if rng is None else jax.random.fold_in(rng, i)
        q_in, k_in = inputs
        return encode_fn(params, q_in, tower_rng(0)), key_encode_fn(params, k_in, tower_rng(1))

    return both


def _as_pair(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise ValueError(
            "with key_encode_fn the batch must be a pair (query_inputs, key_inputs), "
            f"got {type(batch).__name__}"
        )
    return tuple(batch)


def _num_chunks(batch: Any, chunk_size: int) -> int:
    sizes = set(
        zip(
            jax.tree.leaves(tree_paths(batch)),
            [x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)],
            strict=True,
        )
    )
    rows = {n for _, n in sizes}
    if not sizes:
        raise ValueError("the batch has no array leaves")
    if len(rows) != 1 or None in rows:
        raise ValueError(
            "every batch leaf (both towers included) needs the same leading batch axis; "
            f"got leading sizes {sorted(sizes, key=str)}"
        )
    (n,) = rows
    if n % chunk_size:
        raise ValueError(
            f"batch size {n} is not divisible by chunk_size {chunk_size}: choose a "
            f"chunk_size dividing {n}, or pad/drop rows so the batch is a multiple of it"
        )
    return n // chunk_size


def _reject_batch_stats(tree: Any, what: str) -> None:
    found = [p for p in jax.tree.leaves(tree_paths(tree)) if _BATCH_STATS.search(p)]
    if found:
        raise ValueError(
            f"{what} contain batch statistics ({found[0]!r}, ...): a BatchNorm that "
            "normalises by batch statistics makes each chunk see different statistics, "
            "so the chunked gradient is not the full-batch one. Use LayerNorm/RMSNorm, or, "
            "if the norm only uses running averages, close over batch_stats in encode_fn."
        )


def _check_embeddings(h: Any, chunk_size: int) -> None:
    _reject_batch_stats(h, "the encoder's outputs")
    for path, x in zip(jax.tree.leaves(tree_paths(h)), jax.tree.leaves(h), strict=True):
        if x.ndim < 2 or x.shape[1] != chunk_size:
            raise ValueError(
                f"encode_fn must return arrays with {chunk_size} (chunk_size) leading rows; "
                f"output {path!r} has shape {x.shape[1:]} per chunk"
            )


def _acc_dtype(p: Any) -> Any:
    return work_dtype(jnp.result_type(p))


# ------------------------------------------------------------------------- losses


def _normalize(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _cosine_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    return _normalize(a) @ _normalize(b).T


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[:, None], axis=-1))


def info_nce_loss(
    query: jax.Array,
    key: jax.Array,
    temperature: Any = 0.05,
    *,
    symmetric: bool = False,
) -> jax.Array:
    r"""In-batch softmax (InfoNCE) over cosine similarities; ``key[i]`` is ``query[i]``'s positive.

    .. math::

        L_{q\to k} = -\frac1N \sum_i \log
            \frac{e^{\cos(q_i, k_i)/\tau}}{\sum_j e^{\cos(q_i, k_j)/\tau}},
        \qquad L = L_{q\to k}\ \text{or}\ \tfrac12 (L_{q\to k} + L_{k\to q})

    One-directional is the SimCSE / dual-encoder retrieval loss (every other key is a
    negative); ``symmetric=True`` is CLIP's. Two dropout views of the same sentences
    through a shared tower give unsupervised SimCSE.

    Args:
      query: ``(N, d)`` query embeddings.
      key: ``(N, d)`` key embeddings (``(M, d)`` with ``M >= N`` one-directional: extra
        rows such as hard negatives are negatives for every query).
      temperature: τ > 0 (SimCSE 0.05; CLIP learns it: pass ``1/exp(logit_scale)``).
      symmetric: average with the key-to-query direction (needs ``M == N``).

    Returns:
      The scalar loss.

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.eye(4)
      >>> float(info_nce_loss(q, q, temperature=0.05)) < 1e-6
      True

    References:
      Gao et al., SimCSE, https://arxiv.org/abs/2104.08821; Radford et al., CLIP,
      https://arxiv.org/abs/2103.00020; Su Jianlin, https://kexue.fm/archives/8348
    """
    check_range("temperature", temperature, 0.0, low_open=True)
    logits = _cosine_matrix(query, key) / temperature
    targets = jnp.arange(logits.shape[0])
    loss = _cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + _cross_entropy(logits.T, targets))
    return loss


def simcse_loss(embeddings: jax.Array, temperature: Any = 0.05) -> jax.Array:
    r"""In-batch softmax for the "pairs in one batch" layout: rows ``2i`` and ``2i+1`` match.

    .. math::

        L = -\frac1N \sum_i \log \frac{e^{\cos(h_i, h_{i \oplus 1})/\tau}}
            {\sum_{j \ne i} e^{\cos(h_i, h_j)/\tau}}

    (``i ⊕ 1`` flips the last bit: 0↔1, 2↔3, ...). Each row's own similarity is left out.
    This is Su's SimCSE / SimBERT layout: repeat every sentence twice in a row (dropout
    makes the two views differ) or put a similar pair side by side. Keep ``chunk_size``
    even if the two views must come from the same chunk (they need not: the loss sees
    the whole batch).

    Args:
      embeddings: ``(N, d)`` with ``N`` even.
      temperature: τ > 0.

    Returns:
      The scalar loss.

    Example:
      >>> import jax.numpy as jnp
      >>> h = jnp.repeat(jnp.eye(3), 2, axis=0)  # three sentences, two views each
      >>> float(simcse_loss(h)) < 1e-6
      True

    References:
      Su Jianlin, "SimCSE in Chinese", https://kexue.fm/archives/8348; Gao et al.,
      https://arxiv.org/abs/2104.08821
    """
    check_range("temperature", temperature, 0.0, low_open=True)
    n = embeddings.shape[0]
    if n % 2:
        raise ValueError(f"simcse_loss needs an even number of rows (pairs), got {n}")
    logits = _cosine_matrix(embeddings, embeddings) / temperature
    logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
    return _cross_entropy(logits, jnp.arange(n) ^ 1)


def am_softmax_loss(
    query: jax.Array,
    key: jax.Array,
    labels: jax.Array | None = None,
    *,
    margin: Any = 0.35,
    scale: Any = 30.0,
    symmetric: bool = False,
) -> jax.Array:
    r"""Additive-margin softmax over cosines: the target's cosine is lowered by ``margin``.

    .. math::

        L = -\frac1N \sum_i \log \frac{e^{s(\cos(q_i, k_{y_i}) - m)}}
            {e^{s(\cos(q_i, k_{y_i}) - m)} + \sum_{j \ne y_i} e^{s \cos(q_i, k_j)}}

    With ``labels=None`` the keys are in-batch (``y_i = i``, ``key[i]`` is the positive
    of ``query[i]``). With ``labels`` the keys are class centres ``(C, d)`` and ``y_i`` the
    class of row ``i``: Su's sentence-similarity model, where every group of paraphrases
    is a class and the centres are learnt (use ``loss_uses_params`` to learn them with
    :func:`contrastive_value_and_grad`).

    Args:
      query: ``(N, d)``.
      key: ``(N, d)`` in-batch positives, or ``(C, d)`` class centres with ``labels``.
      labels: ``(N,)`` integer classes, or None for in-batch targets.
      margin: m, subtracted from the target cosine (Su: 0.35).
      scale: s > 0 (Su: 30).
      symmetric: in-batch only; average with the key-to-query direction.

    Returns:
      The scalar loss.

    Example:
      >>> import jax.numpy as jnp
      >>> q = jnp.eye(4)
      >>> l = am_softmax_loss(q, q, margin=0.5, scale=2.0)  # log(1 + 3·e^{-2·(1-0.5)})
      >>> round(float(l), 4)
      0.7437

    References:
      Su Jianlin, "GRU + AM-Softmax sentence similarity", https://kexue.fm/archives/5743;
      Wang et al., "Additive Margin Softmax", https://arxiv.org/abs/1801.05599
    """
    check_range("margin", margin)
    check_range("scale", scale, 0.0, low_open=True)
    if labels is not None and symmetric:
        raise ValueError("symmetric=True needs in-batch keys (labels=None)")
    cos = _cosine_matrix(query, key)
    targets = jnp.arange(cos.shape[0]) if labels is None else jnp.asarray(labels)
    is_target = jax.nn.one_hot(targets, cos.shape[1], dtype=cos.dtype)
    logits = scale * (cos - margin * is_target)
    loss = _cross_entropy(logits, targets)
    if symmetric:
        loss = 0.5 * (loss + _cross_entropy(logits.T, targets))
    return loss


def cosent_loss(
    first: jax.Array, second: jax.Array, labels: jax.Array, scale: Any = 20.0
) -> jax.Array:
    r"""CoSENT: every pair labelled more similar must have a larger cosine than every other.

    .. math::

        L = \log\Big(1 + \sum_{y_i > y_j} e^{\lambda(\cos_j - \cos_i)}\Big),
        \qquad \cos_i = \cos(a_i, b_i)

    over all ordered pairs of the batch's sentence pairs with different labels (labels
    may be graded scores, not only 0/1). The sum couples the whole batch, which is why
    it needs :func:`contrastive_value_and_grad` for exact large batches.

    Args:
      first: ``(N, d)`` embeddings of the first sentences ``a_i``.
      second: ``(N, d)`` embeddings of the second sentences ``b_i``.
      labels: ``(N,)`` similarity labels (larger = more similar).
      scale: λ > 0 (Su: 20).

    Returns:
      The scalar loss.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1.0, 0.0], [1.0, 0.0]])
      >>> b = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> round(float(cosent_loss(a, b, jnp.array([1, 0]))), 6)  # log(1 + e^{-20})
      0.0

    References:
      Su Jianlin, "CoSENT (1)", https://kexue.fm/archives/8847
    """
    check_range("scale", scale, 0.0, low_open=True)
    cos = jnp.sum(_normalize(first) * _normalize(second), axis=-1)
    labels = jnp.asarray(labels)
    # diff[i, j] = λ(cos_j - cos_i), counted where pair i is labelled more similar than j.
    diff = scale * (cos[None, :] - cos[:, None])
    ordered = labels[:, None] > labels[None, :]
    terms = jnp.where(ordered, diff, -jnp.inf).reshape(-1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), terms.dtype), terms]))

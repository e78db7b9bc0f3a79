"""Adversarial training on the embedding table: FGM and the gradient-penalty form.

Both perturb or penalise in the space of the token embeddings, the one continuous input
of a text model. They are training-step helpers that produce ``(loss, grads)`` or a new
loss, to be followed by any optax optimizer; they are not gradient transformations.

The embedding tables are chosen by a regular expression on parameter paths (see
:mod:`optax_ext._common`); the default :data:`~optax_ext._common.EMBEDDING` matches the
``embedding`` leaf of every Flax ``nn.Embed``. Each matching table is one ``E`` below
(perturbed and normalised on its own); give a narrower rule, e.g.
``r"token_embed/embedding$"``, to leave position embeddings alone.

References:
  Su Jianlin, "Adversarial training: concepts, methods and thoughts (with a Keras
  implementation)", https://kexue.fm/archives/7234
  Miyato et al., "Adversarial Training Methods for Semi-Supervised Text Classification"
  (FGM), https://arxiv.org/abs/1605.07725
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_ext._common import EMBEDDING, check_range, path_mask, tree_paths, work_dtype

__all__ = ["fgm_value_and_grad", "gradient_penalty_loss"]


def _embedding_split(params: Any, embedding: str) -> tuple[Callable, Callable]:
    """Which flat leaves are embeddings, and functions to take them out and put them back."""
    flags, treedef = jax.tree.flatten(path_mask(include=embedding)(params))
    if not any(flags):
        paths = jax.tree.leaves(tree_paths(params))
        raise ValueError(
            f"no parameter path matches the embedding rule {embedding!r}; paths are "
            f"{paths[:8]}{' ...' if len(paths) > 8 else ''}"
        )

    def take(tree):
        return [x for x, f in zip(jax.tree.leaves(tree), flags, strict=True) if f]

    def put(tree, tables):
        leaves, it = jax.tree.leaves(tree), iter(tables)
        return jax.tree.unflatten(
            treedef, [next(it) if f else x for x, f in zip(leaves, flags, strict=True)]
        )

    return take, put


def _embedding_value_and_grads(loss_fn, params, args, kwargs, embedding, has_aux):
    """The loss and ``∂L/∂E`` for every embedding table (only they are differentiated)."""
    take, put = _embedding_split(params, embedding)
    loss_of_tables = lambda tables: loss_fn(put(params, tables), *args, **kwargs)
    value, g = jax.value_and_grad(loss_of_tables, has_aux=has_aux)(take(params))
    return value, g, take, put


def fgm_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    epsilon: Any = 1.0,
    embedding: str = EMBEDDING,
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""FGM: the loss and gradient at embeddings pushed along their normalised gradient.

    .. math::

        G = \frac{\partial L}{\partial E}(\theta), \qquad
        \Delta = \epsilon \frac{G}{\lVert G \rVert_F + 10^{-8}}, \qquad
        \text{returns } L(\theta \,|\, E + \Delta),\ \
        \nabla_\theta L(\theta \,|\, E + \Delta)

    ``Δ`` is held constant (no gradient through it) and only the perturbed loss is
    differentiated, as in Su's Keras implementation: the returned loss is the perturbed
    one. Cost: one extra forward and backward (to the embeddings) per step. Both
    evaluations get the same ``args``, so a dropout key passed there gives the same masks.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``).
      epsilon: ε >= 0, the perturbation's Frobenius norm per table (Su: 0.5-1).
      embedding: regex on parameter paths selecting the embedding table(s).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux comes from the perturbed call.

    Returns:
      ``(params, *args, **kwargs) -> (loss, grads)`` (``((loss, aux), grads)`` with
      ``has_aux``), jit-compatible.

    Raises:
      ValueError: ``epsilon`` < 0, or no parameter path matches ``embedding``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"embed": {"embedding": jnp.eye(4)}, "head": {"kernel": jnp.ones((4, 2))}}
      >>> def loss_fn(p, tokens, labels):
      ...     logits = p["embed"]["embedding"][tokens].mean(1) @ p["head"]["kernel"]
      ...     return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
      >>> vg = fgm_value_and_grad(loss_fn, epsilon=0.5)
      >>> loss, grads = jax.jit(vg)(params, jnp.array([[0, 1], [2, 3]]), jnp.array([0, 1]))
      >>> grads["embed"]["embedding"].shape
      (4, 4)

    References:
      Su Jianlin, https://kexue.fm/archives/7234; Miyato et al.,
      https://arxiv.org/abs/1605.07725
    """
    check_range("epsilon", epsilon, 0.0)

    def value_and_grad(params, *args, **kwargs):
        _, g, take, put = _embedding_value_and_grads(
            loss_fn, params, args, kwargs, embedding, has_aux
        )
        perturbed = put(
            params,
            [
                e + _fgm_delta(gi, epsilon).astype(e.dtype)
                for e, gi in zip(take(params), g, strict=True)
            ],
        )
        return jax.value_and_grad(loss_fn, has_aux=has_aux)(perturbed, *args, **kwargs)

    return value_and_grad


def _fgm_delta(g: jax.Array, epsilon: Any) -> jax.Array:
    g32 = g.astype(work_dtype(g))
    return jax.lax.stop_gradient(epsilon * g32 / (jnp.sqrt(jnp.sum(g32 * g32)) + 1e-8))


def gradient_penalty_loss(
    loss_fn: Callable[..., Any],
    *,
    epsilon: Any = 1.0,
    embedding: str = EMBEDDING,
    has_aux: bool = False,
) -> Callable[..., Any]:
    r"""The loss plus half ε times the squared norm of its gradient on the embeddings.

    .. math::

        \tilde L(\theta) = L(\theta) + \frac{\epsilon}{2}
            \sum_{E} \Big\lVert \frac{\partial L}{\partial E} \Big\rVert_F^2

    Su's reading: with the unnormalised perturbation ``Δ = ε∇_E L`` held constant, the
    gradient of the perturbed loss is, to first order in ε, the gradient of this penalised
    loss; it asks for a loss surface that is flat around the embeddings.
    Differentiate it with ``jax.value_and_grad`` (a second-order derivative, about two
    to three times a plain step's cost).

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> loss`` (or ``(loss, aux)``).
      epsilon: ε >= 0, the penalty weight.
      embedding: regex on parameter paths selecting the embedding table(s).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; the result then does too.

    Returns:
      ``(params, *args, **kwargs) -> penalised loss`` (``(loss, aux)`` with ``has_aux``).

    Raises:
      ValueError: ``epsilon`` < 0, or no parameter path matches ``embedding``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"embed": {"embedding": jnp.eye(3)}, "w": jnp.ones(3)}
      >>> loss_fn = lambda p, t: jnp.sum(p["embed"]["embedding"][t] @ p["w"] ** 2)
      >>> penalised = gradient_penalty_loss(loss_fn, epsilon=0.1)
      >>> round(float(penalised(params, jnp.array([0]))), 6)  # 1 + 0.05·‖∂L/∂E‖² = 1 + 0.05·3
      1.15
      >>> grads = jax.grad(penalised)(params, jnp.array([0]))

    References:
      Su Jianlin, https://kexue.fm/archives/7234
    """
    check_range("epsilon", epsilon, 0.0)

    def penalised(params, *args, **kwargs):
        out, g, _, _ = _embedding_value_and_grads(loss_fn, params, args, kwargs, embedding, has_aux)
        penalty = 0.5 * epsilon * sum(jnp.sum(jnp.square(gi)) for gi in g)
        return (out[0] + penalty, out[1]) if has_aux else out + penalty

    return penalised

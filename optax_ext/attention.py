"""Dot-product attention that records each head's largest logit, to feed QK-Clip.

References:
  Su Jianlin, https://kexue.fm/archives/11126 (QK-Clip); Kimi Team, "Kimi K2",
  https://arxiv.org/abs/2507.20534.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["MAX_LOGITS", "attention_with_max_logits", "max_logits_per_head"]

#: The name under which :func:`attention_with_max_logits` sows the per-head maxima.
MAX_LOGITS = "max_logits"


def max_logits_per_head(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The largest logit of each head, shape (heads,), over the batch and all unmasked
    (query, key) positions of ``[batch..., heads, q_length, kv_length]`` logits.

    A head with every position masked gets -inf (it never triggers a clip). A logit that
    overflowed (+inf) or a NaN is recorded as it is:
    :func:`~optax_ext.wrappers.qk_clip.qk_clip` treats it as a fault of the measurement,
    clips nothing for that head and counts it. The result carries no gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.arange(8.0).reshape(1, 2, 2, 2)
      >>> max_logits_per_head(logits).tolist()
      [3.0, 7.0]
    """
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    axes = tuple(a for a in range(logits.ndim) if a != logits.ndim - 3)
    return jnp.max(logits, axis=axes)


def attention_with_max_logits(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    **unused: Any,
) -> jax.Array:
    r"""Flax's dot-product attention, also sowing each head's max logit S_h into ``module``.

    The logits are q·k/√d per head (``[batch..., heads, q, kv]``, as in
    ``flax.linen.dot_product_attention``); S_h is their maximum over the batch and the
    unmasked positions, before any additive ``bias`` (QK-Clip scales q·k only). It is
    sown as ``"max_logits"`` into Linen's ``"intermediates"`` collection or as an
    ``nnx.Intermediate`` when ``module`` is given. The output equals
    ``flax.linen.dot_product_attention``'s.

    Pass it as ``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention`` or
    ``flax.nnx.MultiHeadAttention`` and call the module with ``sow_weights=True``
    (which hands it the module), then feed the recorded tree to
    :func:`optax_ext.wrappers.qk_clip.qk_clip` as ``max_logits``. In NNX collect it
    with ``_, records = nnx.capture(forward, nnx.Intermediate)(model, x)``. In Linen::

        attn = nn.MultiHeadDotProductAttention(4, attention_fn=attention_with_max_logits)
        # inside the model: attn(x, sow_weights=True)
        y, inter = model.apply({"params": p}, x, mutable=["intermediates"])
        updates, opt_state = tx.update(grads, opt_state, p, max_logits=inter["intermediates"])

    Args:
      query, key, value: ``[batch..., length, heads, head_dim]``.
      bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype,
        precision, force_fp32_for_softmax: as in ``flax.linen.dot_product_attention``.
      module: the attention module to sow into (None: record nothing).

    Returns:
      ``[batch..., q_length, heads, head_dim]``.
    """
    import flax.linen as nn

    del unused
    q, k, v = nn.dtypes.promote_dtype(query, key, value, dtype=dtype)
    if module is not None:
        depth = q.shape[-1]
        logits = jnp.einsum(
            "...qhd,...khd->...hqk", q / jnp.sqrt(depth).astype(q.dtype), k, precision=precision
        )
        _sow(module, max_logits_per_head(logits, mask))
    weights = nn.dot_product_attention_weights(
        q,
        k,
        bias,
        mask,
        broadcast_dropout,
        dropout_rng,
        dropout_rate,
        deterministic,
        dtype,
        precision,
        force_fp32_for_softmax=force_fp32_for_softmax,
    )
    return jnp.einsum("...hqk,...khd->...qhd", weights, v, precision=precision)


def _sow(module: Any, value: jax.Array) -> None:
    from flax import nnx

    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, MAX_LOGITS, value)
    else:
        module.sow("intermediates", MAX_LOGITS, value)

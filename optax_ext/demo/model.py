"""The demo's model: a small causal character-level transformer in ``flax.linen``."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import optax

__all__ = ["Block", "CharTransformer", "lm_loss"]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.width)(h)
        return x + nn.Dense(self.width)(nn.gelu(h))


class CharTransformer(nn.Module):
    """A small causal character-level language model (token + position embeddings)."""

    vocab: int
    width: int = 64
    heads: int = 4
    layers: int = 2
    max_len: int = 256

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed")(ids)
        x = x + nn.Embed(self.max_len, self.width, name="position")(jnp.arange(ids.shape[1]))
        for i in range(self.layers):
            x = Block(self.width, self.heads, name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="final_norm")(x))


def lm_loss(params, apply_fn, batch):
    """Mean next-character cross-entropy (nats) of a ``(batch, seq_len + 1)`` window."""
    logits = apply_fn({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

"""QK-Clip (MuonClip): after the optimizer step, shrink the query and key weights of every head
whose largest attention logit exceeded τ.

References:
  Su Jianlin, https://kexue.fm/archives/11126; Kimi Team, "Kimi K2: Open Agentic
  Intelligence", https://arxiv.org/abs/2507.20534.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ext._common import check_range, check_transform, path_to_str, work_dtype

__all__ = ["MHA_PARTS", "MLA_PARTS", "qk_clip"]

#: Multi-head attention (Flax ``MultiHeadDotProductAttention`` / NNX
#: ``MultiHeadAttention`` names): the query and key projections, kernel and bias, each
#: scaled by (τ/S_max)^½, so every logit of the head scales by τ/S_max.
MHA_PARTS: dict[str, float] = {
    "query/kernel": 0.5,
    "query/bias": 0.5,
    "key/kernel": 0.5,
    "key/bias": 0.5,
}
#: Multi-head latent attention (DeepSeek / Kimi K2): per-head non-rotary query and key
#: parts by (τ/S_max)^½, the per-head rotary query by τ/S_max; the rotary key shared by
#: all heads is never touched (it is not listed). Rename the keys to your module's.
MLA_PARTS: dict[str, float] = {
    "q_nope/kernel": 0.5,
    "k_nope/kernel": 0.5,
    "q_rope/kernel": 1.0,
}


def _module_path(path: str) -> str:
    """The attention module's path from a recorded leaf's path: drops a leading
    ``intermediates`` collection, the trailing value name and ``sow``'s tuple index."""
    parts = path.split("/")
    if parts and parts[0] == "intermediates":
        parts = parts[1:]
    while parts and re.fullmatch(r"\d+", parts[-1]):
        parts = parts[:-1]
    return "/".join(parts[:-1])


def _collect(max_logits: Any) -> dict[str, jax.Array]:
    """{module path: per-head S_max}, the elementwise max over repeated records."""
    found: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(max_logits)[0]:
        module = _module_path(path_to_str(path))
        value = jnp.asarray(leaf, jnp.float32)
        if value.ndim != 1:
            raise ValueError(
                f"max_logits at {path_to_str(path)!r} must be one value per head (shape "
                f"(heads,)), got shape {value.shape}"
            )
        found[module] = value if module not in found else jnp.maximum(found[module], value)
    return found


def _owner(path: str, modules: dict[str, Any], parts: Mapping[str, float]):
    """(module, power) if ``path`` is one of ``parts`` of a recorded module, else None."""
    for module in modules:
        for rel, power in parts.items():
            tail = f"{module}/{rel}" if module else rel
            if path == tail or path.endswith("/" + tail):
                return module, power
    return None


def _per_head(factor: jax.Array, shape: tuple[int, ...], is_bias: bool, path: str) -> jax.Array:
    """``factor`` (heads,) broadcast over a query/key leaf: a head axis at -2 for
    ``DenseGeneral`` kernels (d_in, heads, dim) and biases (heads, dim); heads fused in
    the last axis (heads·dim) for 2-D kernels and 1-D biases."""
    heads = factor.shape[0]
    head_axis = len(shape) >= 3 or (is_bias and len(shape) == 2)
    if head_axis:
        if shape[-2] != heads:
            raise ValueError(f"{path!r} of shape {shape} has no axis -2 of {heads} heads")
        return factor[:, None]
    if not shape or shape[-1] % heads:
        raise ValueError(f"{path!r} of shape {shape}: last axis not divisible by {heads} heads")
    return jnp.repeat(factor, shape[-1] // heads)


def qk_clip(
    inner: optax.GradientTransformation,
    tau: float = 100.0,
    *,
    parts: Mapping[str, float] = MHA_PARTS,
    key: str = "max_logits",
) -> optax.GradientTransformationExtraArgs:
    r"""QK-Clip around any optimizer: per head, rescale the query/key weights when S_max > τ.

    With S_h the largest attention logit of head h in this step (over the batch and all
    unmasked positions, after the 1/√d scaling, passed in ``extra_args[key]``) and W⁺
    the weights after ``inner``'s update:

    .. math::

        W^{+}_{\text{part},h} \leftarrow W^{+}_{\text{part},h}\,
            \left(\frac{\tau}{S_h}\right)^{p_{\text{part}}}
        \quad\text{if } S_h > \tau, \quad\text{else unchanged,}

    with p = ½ for the MHA query and key (kernel and bias, :data:`MHA_PARTS`), so every
    logit of the head, q·k, scales by exactly τ/S_h, and the largest measured one lands
    on τ; the MLA layout (:data:`MLA_PARTS`) scales the rotary query part by τ/S_h and
    never the shared rotary key. Heads at or below τ keep ``inner``'s update bit for
    bit. Works with any optimizer (Kimi K2 uses it with Muon: MuonClip).

    ``extra_args[key]`` is a tree whose leaves are (heads,) arrays, at paths
    ``<attention module path>/<name>`` (``sow``'s tuple index and a leading
    ``intermediates`` are ignored; repeated records are maxed): what
    :func:`optax_ext.attention.attention_with_max_logits` records in Flax's
    ``intermediates``. Each module path must be a suffix of the parameters' paths of
    its parts (``params/block_0/attn/query/kernel`` for ``block_0/attn``). Pass
    ``None`` to skip clipping for a step. Under ``pmap``, take ``lax.pmax`` of the
    logits over devices first (``jit`` with sharded data needs nothing).

    The clip uses the logits measured before this step's update and applies to the
    updated weights, as in Kimi K2: it bounds the next step's logits up to the change
    the update itself makes.

    Args:
      inner: the optimizer (its extra args are forwarded).
      tau: τ > 0 (Kimi K2: 100).
      parts: {path of a weight relative to the attention module: power p}.
      key: the name of the extra argument.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s;
      ``update`` needs ``params`` and ``extra_args[key]``. Apply its updates unmodified.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"attn": {"query": {"kernel": jnp.ones((4, 2, 3))},
      ...                    "key": {"kernel": jnp.ones((4, 2, 3))}}}
      >>> tx = qk_clip(optax.sgd(0.0), tau=100.0)
      >>> grads = jax.tree.map(jnp.zeros_like, params)
      >>> s = {"attn": {"max_logits": (jnp.array([400.0, 50.0]),)}}
      >>> u, _ = tx.update(grads, tx.init(params), params, max_logits=s)
      >>> new = optax.apply_updates(params, u)
      >>> [float(v) for v in new["attn"]["query"]["kernel"][0, :, 0]]  # √(100/400), 1
      [0.5, 1.0]

    References:
      Su, `QK-Clip <https://kexue.fm/archives/11126>`_, 2025; Kimi Team, `Kimi K2
      <https://arxiv.org/abs/2507.20534>`_, 2025.
    """
    check_transform("inner", inner)
    check_range("tau", tau, 0, low_open=True)
    parts = dict(parts)
    if not parts:
        raise ValueError("parts must name at least one query or key weight")
    for rel, power in parts.items():
        check_range(f"parts power for {rel!r}", power, 0, low_open=True)
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("qk_clip needs the current params: call tx.update(g, state, params)")
        if key not in extra_args:
            raise ValueError(
                f"qk_clip needs the per-head max attention logits: tx.update(g, state, "
                f"params, {key}=...) (pass {key}=None to skip clipping this step)"
            )
        new_updates, state = inner.update(updates, state, params, **extra_args)
        if extra_args[key] is None:
            return new_updates, state
        maxima = _collect(extra_args[key])
        ratios = {m: tau / jnp.maximum(s, tau) for m, s in maxima.items()}  # 1 where S <= τ
        matched = set()

        def clip(path, u, p):
            path = path_to_str(path)
            owner = _owner(path, ratios, parts)
            if owner is None:
                return u
            module, power = owner
            matched.add(module)
            r = ratios[module]
            factor = jnp.sqrt(r) if power == 0.5 else r**power
            factor = _per_head(factor, p.shape, path.endswith("bias"), path)
            work = work_dtype(p)
            p32 = p.astype(work)
            clipped = ((p32 + u.astype(work)) * factor - p32).astype(u.dtype)
            return jnp.where(factor < 1, clipped, u)

        out = jax.tree_util.tree_map_with_path(clip, new_updates, params)
        missing = sorted(set(ratios) - matched)
        if missing:
            raise ValueError(
                f"qk_clip found no parameters {sorted(parts)} under the attention module(s) "
                f"{missing}; check the module paths of {key} against the params' paths"
            )
        return out, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)

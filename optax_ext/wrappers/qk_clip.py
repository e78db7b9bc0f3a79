"""QK-Clip (MuonClip): after the optimizer step, shrink the query and key weights of every head
whose largest attention logit exceeded τ.

References:
  Su Jianlin, https://kexue.fm/archives/11126; Kimi Team, "Kimi K2: Open Agentic
  Intelligence", https://arxiv.org/abs/2507.20534.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import (
    check_range,
    check_transform,
    path_to_str,
    require_params,
    work_dtype,
)
from optax_ext._cycles import find_counters, inside_selecting_accumulation
from optax_ext.wrappers.spike import saturating_add

__all__ = ["MHA_PARTS", "MIN_FACTOR", "MLA_PARTS", "QKClipState", "qk_clip"]

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


class QKClipState(NamedTuple):
    """State of :func:`qk_clip`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      nonfinite_heads: int32, head measurements left out because the recorded max logit
        was +inf or NaN (one per head and call): such a head is not clipped on that
        call (see :func:`qk_clip`).
      cycle_max: ``()`` when the inner optimizer updates on every call; around one that
        accumulates micro-batches, for each query/key leaf (in leaf order) the largest
        logit of the running cycle's micro-batches, per head and broadcast over that
        leaf's head layout (float32; -inf where nothing was measured).
    """

    inner_state: Any
    nonfinite_heads: jax.Array
    cycle_max: Any


#: the most a single clip may shrink a weight, as a factor: the clipped weight reaches
#: the params as p + u, and below this the addition's rounding (up to half an ulp of p)
#: would be more than 2**-14 of it; a head beyond it is clipped further on later steps
MIN_FACTOR = 2.0**-10


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


class _Part(NamedTuple):
    module: str  # the attention module's path in the params
    power: float
    is_bias: bool


def _part(path: str, parts: Mapping[str, float]) -> _Part | None:
    """The part a leaf is, by its path (``<module>/<rel>`` for one of ``parts``), or None."""
    for rel, power in parts.items():
        if path == rel or path.endswith("/" + rel):
            module = path[: -len(rel)].rstrip("/")
            return _Part(module, power, path.endswith("bias"))
    return None


def _match(records: Mapping[str, Any], modules: set[str], key: str, parts) -> dict[str, str]:
    """{attention module of the params: the record it is clipped by}.

    A record's path must be the module's path or a suffix of it (``block_0/attn`` for
    ``params/block_0/attn``), naming exactly one module; each module takes one record.
    """
    claimed: dict[str, str] = {}
    missing = []
    for record in records:
        found = sorted(
            m for m in modules if record == "" or m == record or m.endswith("/" + record)
        )
        if not found:
            missing.append(record)
            continue
        if len(found) > 1:
            raise ValueError(
                f"the {key} record at {record!r} matches several attention modules by path "
                f"suffix, {found[0]!r} and {found[1]!r}"
                + (f" (and {len(found) - 2} more)" if len(found) > 2 else "")
                + f": pass each module's record under its own path ({found[0]!r}, ...), as "
                "Flax's intermediates of the whole model give them"
            )
        module = found[0]
        if module in claimed:
            raise ValueError(
                f"the {key} records at {claimed[module]!r} and {record!r} both match the "
                f"attention module {module!r}: pass one record per module (is one of them a "
                "stray record of another subtree?)"
            )
        claimed[module] = record
    if missing:
        raise ValueError(
            f"qk_clip found no parameters {sorted(parts)} under the attention module(s) "
            f"{sorted(missing)}; check the module paths of {key} against the params' paths"
        )
    return claimed


def _head_axis(shape: tuple[int, ...], is_bias: bool) -> bool:
    """Heads on axis -2 (``DenseGeneral`` kernels (d_in, heads, dim), biases (heads,
    dim)), else fused in the last axis (2-D kernels (d_in, heads·dim), 1-D biases)."""
    return len(shape) >= 3 or (is_bias and len(shape) == 2)


def _per_head(value: jax.Array, shape: tuple[int, ...], is_bias: bool, path: str) -> jax.Array:
    """``value`` (heads,) broadcast over a query/key leaf's head layout (see
    :func:`_head_axis`): ``(heads, 1)`` or, heads fused, ``(heads·dim,)``."""
    heads = value.shape[0]
    if _head_axis(shape, is_bias):
        if shape[-2] != heads:
            raise ValueError(f"{path!r} of shape {shape} has no axis -2 of {heads} heads")
        return value[:, None]
    if not shape or shape[-1] % heads:
        raise ValueError(f"{path!r} of shape {shape}: last axis not divisible by {heads} heads")
    return jnp.repeat(value, shape[-1] // heads)


def _cycle_max_init(shape: tuple[int, ...], is_bias: bool) -> jax.Array:
    """The running maximum of one leaf, in :func:`_per_head`'s layout, before any logit."""
    layout = (shape[-2], 1) if _head_axis(shape, is_bias) else tuple(shape[-1:])
    return jnp.full(layout, -jnp.inf, jnp.float32)


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
            \max\!\left(\frac{\tau}{S_h},\, r_{\min}\right)^{p_{\text{part}}}
        \quad\text{if } S_h > \tau, \quad\text{else unchanged,}

    with p = ½ for the MHA query and key (kernel and bias, :data:`MHA_PARTS`), so every
    logit of the head, q·k, scales by exactly τ/S_h, and the largest measured one lands
    on τ; the MLA layout (:data:`MLA_PARTS`) scales the rotary query part by τ/S_h and
    never the shared rotary key. Heads at or below τ keep ``inner``'s update bit for
    bit. Works with any optimizer (Kimi K2 uses it with Muon: MuonClip).

    **One step shrinks a weight by at most** :data:`MIN_FACTOR` = 2⁻¹⁰:
    r_min = 2^(-10/p_max) for the largest power p_max of ``parts`` (2⁻²⁰ for MHA: the
    logits by up to 10⁶ per step). The clipped weight reaches the params as p + u, whose
    rounding (half an ulp of p) would otherwise swamp a tiny factor: at τ/S = 10⁻³⁶ the
    weights would come out exactly 0 and the head would never train again. A head
    beyond the bound lands above τ and is clipped again on the next steps. The factor is
    formed as max(τ/S, r_min)^p, finite for every finite S.

    **A non-finite logit** (+inf or NaN: an overflow in the forward pass, a fault of the
    measurement rather than a size) clips nothing for that head on that call and is
    counted in ``QKClipState.nonfinite_heads``; +inf would otherwise give the factor 0.
    A -inf logit (every position masked) never clips.

    ``extra_args[key]`` is a tree whose leaves are (heads,) arrays, at paths
    ``<attention module path>/<name>`` (``sow``'s tuple index and a leading
    ``intermediates`` are ignored; repeated records are maxed): what
    :func:`optax_ext.attention.attention_with_max_logits` records in Flax's
    ``intermediates``. Each record's module path must be the path of the attention
    module in the params or a suffix of it (``block_0/attn`` for
    ``params/block_0/attn/query/kernel``) matching exactly one module: a record that
    matches several (``attn`` beside ``block_0/attn`` and ``block_1/attn``) or two records
    matching one module raise a ``ValueError`` naming both paths. Pass ``None`` to
    measure nothing on a call. Under ``pmap``, take ``lax.pmax`` of the logits over
    devices first (``jit`` with sharded data needs nothing).

    The clip uses the logits measured before this step's update and applies to the
    updated weights, as in Kimi K2: it bounds the next step's logits up to the change
    the update itself makes.

    **With accumulation**, put ``qk_clip`` outside: ``qk_clip(ox.tiger(...,
    accumulation_steps=k))``, ``qk_clip(ox.sgdm(...))`` or
    ``qk_clip(ox.accumulate_gradients(inner, k))``, with the max logits of each
    micro-batch passed on its micro-step. It reads the cycle from the inner state's
    counters, keeps the cycle's running maximum per head in ``cycle_max`` and clips
    once per parameter update (on the call where the inner optimizer updates, also when
    ``set_accumulation_steps`` changes k), by the largest logit of the cycle's
    micro-batches. The other order, ``accumulate_gradients(qk_clip(...), k)``, would
    see each micro-batch's logits but keep its state only on a cycle's last micro-step,
    so it raises a ``ValueError`` giving this order (``optax.MultiSteps(qk_clip(...))``
    cannot be detected: do not use it).

    τ is a number: to vary it during training, inject it with
    ``ox.inject_hyperparams(ox.qk_clip)(inner, tau=schedule)`` (read by update).

    Args:
      inner: the optimizer (its extra args are forwarded).
      tau: τ > 0 (Kimi K2: 100).
      parts: {path of a weight relative to the attention module: power p}.
      key: the name of the extra argument.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`QKClipState`; ``update``
      needs ``params`` and ``extra_args[key]``. Apply its updates unmodified.

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
    if callable(tau):
        raise ValueError(
            f"tau must be a number in (0, inf), got the callable {tau!r}: qk_clip reads no "
            "schedule; to vary τ during training, inject it by update with "
            "ox.inject_hyperparams(ox.qk_clip)(inner, tau=schedule)"
        )
    check_range("tau", tau, 0, low_open=True)
    parts = dict(parts)
    if not parts:
        raise ValueError("parts must name at least one query or key weight")
    for rel, power in parts.items():
        check_range(f"parts power for {rel!r}", power, 0, low_open=True, schedule=False)
    # the ratio's floor, so that no part's factor r^p falls below MIN_FACTOR
    min_ratio = max(MIN_FACTOR ** (1.0 / max(float(p) for p in parts.values())), _TINY)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        inner_state = inner.init(params)
        cycle_max: Any = ()
        if find_counters(inner_state) is not None:
            cycle_max = tuple(
                _cycle_max_init(np.shape(leaf), part.is_bias)
                for part, leaf in _parts_of(params, parts)
                if part is not None
            )
        return QKClipState(inner_state, jnp.zeros([], jnp.int32), cycle_max)

    def update_fn(updates, state, params=None, **extra_args):
        require_params(params, "qk_clip", "it rescales the query and key weights")
        if key not in extra_args:
            raise ValueError(
                f"qk_clip needs the per-head max attention logits: tx.update(g, state, "
                f"params, {key}=...) (pass {key}=None to skip clipping this step)"
            )
        if inside_selecting_accumulation():
            raise ValueError(
                "qk_clip inside ox.accumulate_gradients(..., k) would see each "
                "micro-batch's max logits while its state is kept only on a cycle's last "
                "micro-step, so it could not clip by the cycle's largest logit: put it "
                "outside, ox.qk_clip(ox.accumulate_gradients(inner, k), tau), which clips "
                "once per update by the maximum over the cycle's micro-batches"
            )
        before = find_counters(state.inner_state)
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        flat, treedef = jax.tree_util.tree_flatten_with_path(new_updates)
        paths = [path_to_str(path) for path, _ in flat]
        leaf_parts = [_part(path, parts) for path in paths]
        head_max, n_bad = _measured(extra_args[key], leaf_parts, key, parts)

        if before is None:  # every call is an update: clip by this call's logits
            applied, start, old_max = True, True, [None] * len(flat)
        else:  # clip once per update, by the cycle's largest logit
            after = find_counters(inner_state)
            applied = after.updates != before.updates
            start = before.micro_step == 0
            old_max = iter(state.cycle_max)
        out, cycle_max = [], []
        for (_, u), p, path, part in zip(
            flat, treedef.flatten_up_to(params), paths, leaf_parts, strict=True
        ):
            if part is None:
                out.append(u)
                continue
            s = head_max.get(part.module)
            now = None if s is None else _per_head(s, p.shape, part.is_bias, path)
            if before is not None:
                old = next(old_max)
                if now is None:  # nothing measured on this call: -inf
                    now = jnp.where(start, -jnp.inf, old)
                else:
                    now = jnp.where(start, now, jnp.maximum(old, now))
                cycle_max.append(now.astype(jnp.float32))
            out.append(u if now is None else _clip(u, p, now, applied, tau, part, min_ratio))
        new_state = QKClipState(
            inner_state,
            saturating_add(state.nonfinite_heads, n_bad),
            () if before is None else tuple(cycle_max),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: the smallest normal float32: the floor of the ratio whatever the powers
_TINY = float(np.finfo(np.float32).tiny)


def _parts_of(tree: Any, parts: Mapping[str, float]) -> list[tuple[_Part | None, Any]]:
    return [
        (_part(path_to_str(path), parts), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _measured(
    records: Any, leaf_parts: list[_Part | None], key: str, parts
) -> tuple[dict[str, jax.Array], jax.Array]:
    """({attention module: its heads' max logits, non-finite ones as -inf}, the number
    of non-finite head measurements) from this call's records."""
    if records is None:
        return {}, jnp.zeros([], jnp.int32)
    maxima = _collect(records)
    modules = {part.module for part in leaf_parts if part is not None}
    claimed = _match(maxima, modules, key, parts)
    head_max, n_bad = {}, jnp.zeros([], jnp.int32)
    for module, record in claimed.items():
        s = maxima[record]
        # +inf or NaN is an overflow in the forward pass, not a size: clip nothing, count it
        bad = jnp.isnan(s) | (s == jnp.inf)
        head_max[module] = jnp.where(bad, -jnp.inf, s)
        n_bad = n_bad + jnp.sum(bad, dtype=jnp.int32)
    return head_max, n_bad


def _clip(u, p, s, applied, tau, part: _Part, min_ratio: float):
    """``u`` such that p + u is (p + u)·max(τ/S, r_min)^power where S > τ (and the
    inner optimizer updated), else ``u`` unchanged; S broadcasts over the leaf."""
    ratio = jnp.where(s > tau, jnp.maximum(tau / s, min_ratio), 1.0)
    factor = jnp.sqrt(ratio) if part.power == 0.5 else ratio**part.power
    work = work_dtype(p)
    p32 = p.astype(work)
    clipped = ((p32 + u.astype(work)) * factor - p32).astype(u.dtype)
    cond = factor < 1 if applied is True else (factor < 1) & applied
    return jnp.where(cond, clipped, u)

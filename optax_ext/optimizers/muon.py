"""Muon as Su and Moonlight define it: msign of a Nesterov momentum, shape-scaled, routed by path.

References:
  Su Jianlin, https://kexue.fm/archives/10592 (Muon), https://kexue.fm/archives/10739
  (weight decay and update-RMS alignment), https://kexue.fm/archives/11416 (scale
  conventions, which parameters), https://kexue.fm/archives/11772 (the Keller scale's
  max(1, ·) and its decay to MuP's); Liu et al., "Muon is Scalable for LLM Training"
  (Moonlight), https://arxiv.org/abs/2502.16982; Jordan et al.,
  https://kellerjordan.github.io/posts/muon/.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike

from optax_ext._common import (
    NORM_AND_BIAS,
    PathRules,
    canonical_dtype,
    check_choice,
    check_float_params,
    check_int,
    check_range,
    check_updates_match,
    checked,
    decay_mask,
    explicitly_sharded,
    first_match,
    has_nonfinite,
    hold_momentum,
    path_labels,
    path_to_str,
    work_dtype,
)
from optax_ext._cycles import reject_cycle_length
from optax_ext.optimizers.msign import check_compute_dtype, msign, newton_schulz_coefficients
from optax_ext.optimizers.streaming import init_streaming_basis, streaming_msign
from optax_ext.optimizers.tiger import tiger
from optax_ext.owner_compute import check_owner_axes, owner_compute, owner_mesh
from optax_ext.wrappers import spike
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.rounding import STATE_ROUNDINGS, check_seed, write_state

__all__ = [
    "MUON_LAYOUT_RULES",
    "MUON_RULES",
    "ScaleByMuonState",
    "matrix_shape",
    "muon",
    "muon_labels",
    "scale_by_muon",
]

#: Embedding tables and the modules around them, by name, in any case: ``embed``
#: anywhere (``embedding``, ``embed_tokens``, ``pos_embedding``, ``Embed_0``,
#: ``unembed``), ``emb`` starting a word (``token_emb``, ``pos_emb``, ``TokEmb``; not
#: ``member``), GPT-2's ``wte`` and ``wpe``. A bare ``token`` is not a rule: MLP-Mixer's
#: ``token_mixing`` Dense layers are hidden layers.
_EMBEDDING_NAMES = r"(?i:embed)|(?<![A-Za-z])(?i:emb)|Emb|EMB|(^|/)(?i:wte|wpe)(/|$)"
#: The output layer, by name, in any case (Flax numbering ``_0`` allowed): a module
#: named ``head``, ``lm_head`` or ``classifier`` (its whole subtree); a kernel owned by
#: a module whose name ends in ``_head`` or ``Head`` (``cls_head``, ``LMHead``), is
#: ``output``, or starts with ``logit`` (``logits``, ``logits_dense``); ``vocab``
#: anywhere (``vocab_proj``). Names are matched as words so that hidden layers keep
#: Muon: Flax's ``MultiHeadDotProductAttention_0/query`` and a ``multi_head/query``
#: attribute do not end in ``head`` at the kernel, and BERT's ``output/dense`` (the
#: MLP's second layer) does not own its kernel under ``output``.
_HEAD_NAMES = (
    r"(^|/)(?i:lm_?head|head|classifier)(_\d+)?(/|$)"
    r"|(?i:_head)(_\d+)?/kernel$|Head(_\d+)?/kernel$"
    r"|(^|/)(?i:output)(_\d+)?/kernel$|(^|/)(?i:logit)[^/]*/kernel$"
    r"|(?i:vocab)"
)

#: Which optimizer each parameter gets in :func:`muon`, by path (first match wins;
#: unmatched leaves and every leaf of rank < 2 go to the second optimizer). Muon is
#: for the kernels of layers with dense inputs only (11416): embedding tables (also
#: when tied as the output layer), the LM / classifier head, biases and norm scales go
#: to the second optimizer. Embeddings and heads are told by name (see
#: ``_EMBEDDING_NAMES`` and ``_HEAD_NAMES`` in this module); a model naming them
#: otherwise needs its own rules, e.g. ``[(r"^proj_out/", "other")] + list(MUON_RULES)``.
MUON_RULES: tuple[tuple[str, str], ...] = (
    (NORM_AND_BIAS, "other"),
    (_EMBEDDING_NAMES, "other"),
    (_HEAD_NAMES, "other"),
    (r"(^|/)kernel$", "muon"),
)
_LABELS = ("muon", "other")

#: How each Muon leaf is seen as matrices (d_in, d_out), by path (first match wins):
#:
#: - ``"conv"``: (…, d_in, d_out) → (prod(…)·d_in, d_out); a 2-D Dense kernel as is, a
#:   conv kernel (…spatial, d_in, d_out) with its spatial axes folded into the input.
#: - ``"stacked"``: (…, d_in, d_out) with the leading axes as a batch of independent
#:   matrices (``nn.scan`` layers, experts).
#: - ``"heads_in"``: Flax's ``DenseGeneral`` query/key/value kernel (d_in, heads,
#:   head_dim); ``"heads_out"``: its output kernel (heads, head_dim, d_out). With
#:   ``attention="fused"`` (default) they are the (d_in, heads·head_dim) and
#:   (heads·head_dim, d_out) matrices a 2-D Dense of heads·head_dim features would have
#:   (Moonlight's q/k/v/o projections); with ``attention="per_head"`` each head is
#:   its own (d_in, head_dim) or (head_dim, d_out) matrix.
#:
#: A leaf no rule matches is a matrix as it is when 2-D; of rank ≥ 3 its path's names
#: decide, since the shape cannot tell a 1-D conv kernel (width, d_in, d_out) from L
#: stacked Dense kernels (L, d_in, d_out), and folding a stack into one matrix couples
#: its layers (a layer with small gradients gets almost no update): ``"stacked"``
#: where a name says stack and none says conv (``scan``: ``nn.scan``'s ``ScanBlock_0``;
#: ``vmap``, ``stack``, ``expert``; a ``layers`` or ``blocks`` module not followed by
#: a list index, as ``nnx.vmap``/``nnx.scan`` stacks are named), ``"conv"`` where a
#: name says ``conv`` (``Conv_0``, ``conv1``) and none says stack; otherwise (neither,
#: or both, as a scanned conv) ``"conv"`` with a warning at ``init`` naming the leaves
#: and the ``layout=`` rule that settles them.
MUON_LAYOUT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)(query|key|value)/kernel$", "heads_in"),
    (r"(^|/)out/kernel$", "heads_out"),
)
_STACKED_NAMES = re.compile(r"(?i:scan|vmap|stack|expert)|(^|/)(?i:layers|blocks)/(?!\d+(/|$))")
_CONV_NAMES = re.compile(r"(?i:conv)")
_LAYOUTS = ("conv", "stacked", "heads_in", "heads_out")
_SCALES = ("moonlight", "keller", "mup", "none", "keller_to_mup")
_ATTENTION = ("fused", "per_head")
_ORTHOGONALIZERS = ("newton_schulz", "streaming")


class ScaleByMuonState(NamedTuple):
    """State of :func:`scale_by_muon`.

    Attributes:
      count: int32, steps seen (calls to ``update``).
      mu: the momentum E = (1-β)·M, an average of the gradients, shaped like the params
        (see :func:`scale_by_muon`).
      skipped_steps: int32, steps on which the guard discarded a gradient leaf (one
        holding a NaN or ±inf, or a value ``mu``'s dtype cannot hold).
      shrunk_leaves: int32, gradient leaves discarded so far (a step with 3 bad leaves
        adds 3); each got a zero direction and kept its momentum. The two names are
        Tiger's and ``nan_guard``'s, so one monitor reads every guard's counters.
      basis: with ``orthogonalizer="streaming"``, per leaf the
        :class:`~optax_ext.optimizers.streaming.StreamingBasis` of its matrices (the
        tracked singular basis and singular values of N_t); None with Newton–Schulz.
    """

    count: jax.Array
    mu: optax.Updates
    skipped_steps: jax.Array
    shrunk_leaves: jax.Array
    basis: Any = None


# ------------------------------------------------------------------ matrix views


def _view(shape: tuple[int, ...], layout: str, attention: str):
    """(axis permutation or None, matrices' shape (*batch, d_in, d_out)) of a leaf."""
    if len(shape) == 2:
        return None, shape
    if layout == "conv":
        return None, (math.prod(shape[:-1]), shape[-1])
    if layout == "stacked":
        return None, shape
    if len(shape) != 3:
        raise ValueError(
            f"layout {layout!r} expects a 3-D attention kernel, got shape {shape}; "
            "give this path another layout in `layout`"
        )
    if layout == "heads_in":  # (d_in, heads, head_dim)
        d_in, heads, head_dim = shape
        if attention == "fused":
            return None, (d_in, heads * head_dim)
        return (1, 0, 2), (heads, d_in, head_dim)
    heads, head_dim, d_out = shape  # heads_out
    if attention == "fused":
        return None, (heads * head_dim, d_out)
    return None, shape


def matrix_shape(
    path: str, shape: tuple[int, ...], layout: PathRules = MUON_LAYOUT_RULES, attention="fused"
) -> tuple[int, ...]:
    """The (*batch, d_in, d_out) matrices :func:`scale_by_muon` orthogonalises for a leaf."""
    return _view(tuple(shape), _layout_of(path, shape, layout)[0], attention)[1]


def _layout_of(path: str, shape: tuple[int, ...], layout: PathRules) -> tuple[str, bool]:
    """(the leaf's layout, whether it was guessed for a leaf the names cannot settle):
    the first matching rule, else the names' (see :data:`MUON_LAYOUT_RULES`)."""
    name = first_match(path, layout, default=None)
    if name is not None:
        check_choice(f"layout for {path!r}", name, _LAYOUTS)
        return name, False
    if len(shape) < 3 or math.prod(shape[:-2]) == 1:
        return "conv", False  # one matrix: "conv" and "stacked" see it alike
    stacked, conv = bool(_STACKED_NAMES.search(path)), bool(_CONV_NAMES.search(path))
    if stacked != conv:
        return ("stacked" if stacked else "conv"), False
    return "conv", True


def _warn_guessed_layouts(params: Any, layout: PathRules) -> None:
    """One warning naming the leaves of rank ≥ 3 whose layout the names cannot settle."""
    guessed = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        shape = tuple(getattr(leaf, "shape", ()))
        if len(shape) >= 3:
            path = path_to_str(path)
            if _layout_of(path, shape, layout)[1]:
                guessed.append((path, shape))
    if not guessed:
        return
    shown = ", ".join(
        f"{p!r} {s} as one {matrix_shape(p, s, layout)} matrix" for p, s in guessed[:4]
    )
    more = f" (and {len(guessed) - 4} more)" if len(guessed) > 4 else ""
    first = re.escape(guessed[0][0])
    warnings.warn(
        f"scale_by_muon: no layout rule matches {shown}{more}, and the names say neither a "
        "conv kernel alone nor a stack, so each is orthogonalised as a conv kernel, its "
        "leading axes folded into d_in. If a leaf stacks independent (d_in, d_out) "
        "matrices (nn.scan / nnx.vmap layers, experts), that couples them: give it the "
        f"'stacked' layout, e.g. layout=[(r'{first}$', 'stacked')] + "
        "list(ox.optimizers.MUON_LAYOUT_RULES); to keep the conv view and silence this warning, "
        "give it 'conv'.",
        UserWarning,
        stacklevel=2,
    )


def _to_matrices(x: jax.Array, perm, shape) -> jax.Array:
    return (x if perm is None else jnp.transpose(x, perm)).reshape(shape)


def _from_matrices(y: jax.Array, perm, like_shape) -> jax.Array:
    if perm is None:
        return y.reshape(like_shape)
    permuted = tuple(like_shape[p] for p in perm)
    return jnp.transpose(y.reshape(permuted), tuple(sorted(range(len(perm)), key=perm.__getitem__)))


def _shape_scale(scale: str, d_in: int, d_out: int, update_rms: Any, tau: Any, dtype) -> Any:
    if scale == "moonlight":
        return update_rms * math.sqrt(max(d_in, d_out))
    if scale == "keller":
        return math.sqrt(max(1.0, d_out / d_in))
    if scale == "mup":
        return math.sqrt(d_out / d_in)
    if scale == "keller_to_mup":
        # τ_t is a (traced) scalar: one compiled update serves every step
        return jnp.sqrt(jnp.maximum(jnp.asarray(tau, dtype), d_out / d_in))
    return 1.0


_TAU_HELP = (
    "τ_t goes from 1 (early in training: the 'keller' scale) to 0 (late: the 'mup' "
    "scale), e.g. tau=optax.linear_schedule(1.0, 0.0, total_steps) or "
    "optax.cosine_decay_schedule(1.0, total_steps)"
)


def _check_tau(scale: str, tau: Any) -> Any:
    """``tau`` as :func:`scale_by_muon` reads it, or ``ValueError`` naming the fix.

    A number must lie in [0, 1]; a schedule is read at update 0 here (where Su's τ
    starts), so a schedule starting outside [0, 1] (a learning-rate schedule passed by
    mistake, a warm-up to 2) is refused when built. Traced numbers
    (``inject_hyperparams`` under ``jit``) pass; concrete injected ones are checked.
    """
    if scale != "keller_to_mup":
        if tau is not None:
            raise ValueError(
                f"tau={tau!r} is read by scale='keller_to_mup' only and would be ignored "
                f"with scale={scale!r}: drop tau, or set scale='keller_to_mup'"
            )
        return None
    if tau is None:
        raise ValueError(
            "scale='keller_to_mup' needs tau, a number in [0, 1] or a schedule of the "
            f"update count with values in [0, 1]: {_TAU_HELP}"
        )
    value, shown = tau, repr(tau)
    if callable(tau):
        value = tau(jnp.zeros([], jnp.int32))
        shown = f"the schedule {tau!r} with tau(0) = {value!r}"
    try:
        if isinstance(value, bool | np.bool_):
            raise ValueError
        check_range("tau", value, 0, 1, schedule=False)
    except ValueError:
        raise ValueError(
            "tau must be a number in [0, 1] or a schedule of the update count with values "
            f"in [0, 1], got {shown}: {_TAU_HELP}"
        ) from None
    return tau


# -------------------------------------------------------------------- transforms


def scale_by_muon(
    ns_coeffs: Any = "polar_express",
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-7,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    scale: str = "moonlight",
    update_rms: float = 0.2,
    tau: optax.ScalarOrSchedule | None = None,
    layout: PathRules = MUON_LAYOUT_RULES,
    attention: str = "fused",
    guard_nan: bool = True,
    compute_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
    owner_axes: str | tuple[str, ...] | None = None,
    orthogonalizer: str = "newton_schulz",
    streaming_iters: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Muon's direction: msign of a (Nesterov) momentum, times a shape scale.

    For each leaf, seen as matrices W ∈ R^{d_in × d_out} (Flax layout, see ``layout``):

    .. math::

        E_t = \beta E_{t-1} + (1-\beta) G_t, \qquad
        N_t = \beta E_t + (1-\beta) G_t \ (\text{Nesterov; else } N_t = E_t), \qquad
        u_t = s(W)\, \operatorname{msign}(N_t)

    with s(W) = ``update_rms``·√max(d_in, d_out) (``"moonlight"``: update RMS ≈ 0.2 as
    AdamW's, so AdamW's lr and weight decay carry over), √max(1, d_out/d_in)
    (``"keller"``), √(d_out/d_in) (``"mup"``), 1 (``"none"``) or, from Keller's scale
    to MuP's over training, √max(τ_t, d_out/d_in) (``"keller_to_mup"``, see below).
    msign runs by Newton–Schulz (:func:`~optax_ext.optimizers.msign.msign`); its
    coefficients and steps are a speed knob (Su, 10922).

    **From Keller's scale to MuP's** (``scale="keller_to_mup"``, Su, 11772). Su asks
    for the same feature change ‖Δy‖_RMS ≈ η‖x‖_RMS for every input x of the layer
    y = xW, Δy = η s(W) x Φ with Φ = msign(N). For d_in ≤ d_out, ΦΦᵀ = I and
    ‖xΦ‖_RMS = √(d_in/d_out)‖x‖_RMS exactly, so s = √(d_out/d_in). For d_in > d_out
    xΦ keeps d_out of d_in rotated components: its RMS is ‖x‖_RMS on average over
    isotropic inputs (s = 1, hence Keller's max(1, ·)) but √(d_in/d_out)‖x‖_RMS at
    worst, where trained features concentrate (s = √(d_out/d_in), MuP's). Early in
    training the inputs are near isotropic, later they are not, so Su moves from one
    to the other:

    .. math::

        s_t(W) = \sqrt{\max(\tau_t,\ d_{out}/d_{in})}, \qquad \tau_t: 1 \to 0

    with τ_t decreasing from 1 (``"keller"`` exactly) to 0 (``"mup"`` exactly);
    matrices with d_out ≥ d_in get √(d_out/d_in) throughout. Su fixes no shape for
    the decay (one more schedule to tune) and puts no constant in front: like
    ``"keller"`` and ``"mup"`` (and unlike ``"moonlight"``'s 0.2·√max(d_in, d_out),
    which matches AdamW's update RMS) it needs Muon's own learning rate, and
    ``update_rms`` is not read. ``tau`` is a number in [0, 1] or an optax schedule of
    the update count (read at ``count``, the updates made before this one, as optax's
    schedules are), checked when built (a schedule at update 0); it is a traced scalar
    in the update, so a schedule or an injected ``tau`` never recompiles.

    **These are Moonlight's updates.** Moonlight keeps M_t = β M_{t-1} + G_t and takes
    msign(β M_t + G_t); here E_t = (1-β) M_t and N_t = (1-β)(β M_t + G_t), and msign is
    scale-invariant (msign(cN) = msign(N) for c > 0). The state holds the damped E, an
    average of the gradients, because M settles near G/(1-β), 20·G at β = 0.95: in
    float16 (largest value 65504) gradients of a few thousand overflowed M to inf and
    turned the params NaN. E stays within the gradients' range.

    **Every leaf it is given is orthogonalised**: route 1-D leaves, embeddings and the
    head elsewhere (:func:`muon` does, by path). A leaf of rank < 2 raises ValueError.
    A leaf of rank ≥ 3 that no ``layout`` rule matches is read by its names (see
    :data:`MUON_LAYOUT_RULES`); ``init`` warns about those the names cannot settle.

    **Non-finite gradients** (``guard_nan=True``): a leaf whose gradient holds a NaN or
    ±inf (msign of it would be NaN everywhere), or whose new momentum the momentum's
    dtype cannot hold (beyond 65504 with a float16 ``mu_dtype`` under larger float32
    gradients), keeps its momentum unchanged and gets a zero direction for that step;
    the other leaves step normally. The state counts them (``skipped_steps``,
    ``shrunk_leaves``). ``guard_nan=False`` skips the check (one reduction per leaf)
    and lets NaN propagate.

    Unlike ``optax.contrib.scale_by_muon`` with ``nesterov=True``, which bias-corrects
    its EMA and the gradient with different step counts before mixing them, the
    Nesterov form here is Moonlight's β M_t + G_t; their early steps differ by design.
    Without Nesterov the two agree (an EMA is a multiple of M_t, which msign removes).

    The momentum does not accumulate micro-batches: ``set_accumulation_steps`` in
    ``update`` raises ``ValueError``; wrap the optimizer instead,
    ``ox.accumulate_gradients(tx, k)``, and pass it there.

    **On a device mesh** (``owner_axes``). msign needs whole matrices: left to the
    compiler (``owner_axes=None``), a momentum sharded by rows (FSDP) has every
    Newton–Schulz product partitioned and all-gathered, many times the momentum's
    bytes per step. With ``owner_axes="data"`` (or a tuple of axes), under
    ``jax.set_mesh``, the matrices (as ``layout`` and ``attention`` view them: stacked
    layers, experts and heads each one matrix) are grouped by shape, each whole matrix
    goes to one device along those axes (an all-to-all per shape group), is
    orthogonalised there in one batched Newton–Schulz with its same-shaped peers, and
    comes back to the params' sharding (:func:`~optax_ext.owner_compute.owner_compute`);
    the momentum stays sharded as the params are. The update is the same; only where
    it is computed changes. Other mesh axes keep their sharding of the matrices (a 2-D
    mesh with owners along ``"data"`` and columns over ``"model"``).

    Positional order is ``optax.contrib.scale_by_muon``'s (``ns_coeffs, ns_steps, beta,
    eps, mu_dtype``); the rest is keyword-only.

    Args:
      beta: momentum β in [0, 1).
      nesterov: use N_t = β E_t + (1-β) G_t (Moonlight's β M_t + G_t, its default).
      ns_coeffs: Newton–Schulz coefficients: ``"polar_express"``, ``"su"``, ``"keller"``,
        ``"su_single"`` or explicit ``(a, b, c)`` rows.
      ns_steps: Newton–Schulz steps (≥ 0; may be injected).
      scale: ``"moonlight"``, ``"keller"``, ``"mup"``, ``"none"`` or
        ``"keller_to_mup"`` (needs ``tau``).
      update_rms: the target RMS of the ``"moonlight"`` scale (> 0).
      tau: τ_t of ``"keller_to_mup"``, going from 1 to 0 over training: a number in
        [0, 1] or a schedule of the update count with values in [0, 1], e.g.
        ``optax.linear_schedule(1.0, 0.0, total_steps)`` (may be injected). Given with
        another scale it raises ``ValueError`` (it would be ignored).
      layout: path rules naming how each leaf is seen as matrices:
        ``"conv"``, ``"stacked"``, ``"heads_in"``, ``"heads_out"`` (see
        :data:`MUON_LAYOUT_RULES`, the default).
      attention: ``"fused"`` or ``"per_head"`` for the 3-D attention kernels.
      guard_nan: zero direction and unchanged momentum for non-finite gradient leaves.
      eps: ε ≥ 0 of :func:`~optax_ext.optimizers.msign.msign`, relative to N's largest
        entry.
      compute_dtype: a floating dtype for the Newton–Schulz iteration (default: at
        least float32).
      mu_dtype: dtype of the momentum E (default: the gradients'). float16 holds it
        while the gradients' average stays below 65504 (a leaf beyond is discarded and
        counted, see above); bfloat16 has float32's range in the same two bytes.
      state_rounding: how a bf16/f16 momentum is written: ``"nearest"`` (a cast) or
        ``"stochastic"`` (unbiased,
        :func:`~optax_ext.wrappers.rounding.stochastic_round_to`, keyed by
        ``rounding_seed``, the step count and the leaf index). No effect on float32.
      rounding_seed: the seed of the stochastic rounding, an int in [0, 2**32).
      owner_axes: ``None`` (the compiler places msign's products on the params'
        sharding) or a mesh axis name or tuple of names of the mesh set by
        ``jax.set_mesh``: each matrix's msign is computed whole by one owner along
        them (see above). An axis not in the mesh, or no mesh set, raises
        ``ValueError`` at ``init`` (when a mesh is set) or at the first update.
      orthogonalizer: ``"newton_schulz"`` (msign by ``ns_coeffs`` and ``ns_steps``) or
        ``"streaming"``: Su's streaming power iteration
        (:func:`~optax_ext.optimizers.streaming.streaming_msign`, kexue.fm 11654-11710),
        one power-iteration + QR step per update from the basis kept in
        ``state.basis``, which also holds the tracked singular values of N_t.
        ``ns_coeffs``, ``ns_steps``, ``eps`` and ``compute_dtype`` are Newton–Schulz's (the
        streaming step runs in float32 or wider); not with ``owner_axes``.
      streaming_iters: power iterations per update of the streaming orthogonaliser
        (static int ≥ 1; each beyond the first costs O(k³), k = min(d_in, d_out)).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleByMuonState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = optax.chain(scale_by_muon(ns_steps=8), optax.scale(-0.1))
      >>> g = jnp.eye(4) * jnp.array([4.0, 3.0, 2.0, 1.0])
      >>> u, _ = tx.update(g, tx.init(g))
      >>> round(float(jnp.sqrt(jnp.mean(u**2))), 3)  # 0.1 * 0.2: update RMS lr·0.2
      0.02

    References:
      Su, `Muon <https://kexue.fm/archives/10592>`_, `Moonlight's choices
      <https://kexue.fm/archives/10739>`_, `a practical guide
      <https://kexue.fm/archives/11416>`_, `why Keller's Muon has the extra max(1, ·)
      <https://kexue.fm/archives/11772>`_; Liu et al., `Muon is Scalable for LLM
      Training <https://arxiv.org/abs/2502.16982>`_, 2025.
    """
    check_range("beta", beta, 0, 1, high_open=True, schedule=False)
    newton_schulz_coefficients(ns_coeffs, "ns_coeffs")
    check_int("ns_steps", ns_steps, minimum=0)
    check_choice("scale", scale, _SCALES)
    check_range("update_rms", update_rms, 0, low_open=True, schedule=False)
    tau = _check_tau(scale, tau)
    check_choice("attention", attention, _ATTENTION)
    check_range("eps", eps, 0, schedule=False)
    for pattern, name in layout.items() if isinstance(layout, dict) else layout:
        check_choice(f"layout for {pattern!r}", name, _LAYOUTS)
    compute_dtype = check_compute_dtype(compute_dtype)
    mu_dtype = canonical_dtype(mu_dtype)
    check_choice("state_rounding", state_rounding, STATE_ROUNDINGS)
    check_seed("rounding_seed", rounding_seed)
    owner_axes = check_owner_axes(owner_axes)
    check_choice("orthogonalizer", orthogonalizer, _ORTHOGONALIZERS)
    check_int("streaming_iters", streaming_iters, minimum=1)
    streaming = orthogonalizer == "streaming"
    if streaming and owner_axes is not None:
        raise ValueError(
            f"orthogonalizer='streaming' with owner_axes={owner_axes!r}: the streaming "
            "basis is kept per leaf, owner_axes groups matrices by shape; give one of them"
        )

    def basis_of(path, p):
        """The streaming start V₀ = I of one leaf's matrices (Muon's view of it)."""
        shape = tuple(p.shape)
        if len(shape) < 2:  # scale_by_muon raises for it at the first update
            return None
        return init_streaming_basis(matrix_shape(path, shape, layout, attention), work_dtype(p))

    def init_fn(params):
        check_float_params(params, "muon")
        if owner_axes is not None and not jax.sharding.get_abstract_mesh().empty:
            owner_mesh(owner_axes)  # an axis not in the mesh fails here already
        _warn_guessed_layouts(params, layout)
        # a fresh array per counter: a donated state must not hold one buffer twice
        zero = lambda: jnp.zeros([], jnp.int32)
        basis = None
        if streaming:
            basis = jax.tree_util.tree_map_with_path(
                lambda path, p: basis_of(path_to_str(path), p), params
            )
        return ScaleByMuonState(
            count=zero(),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            skipped_steps=zero(),
            shrunk_leaves=zero(),
            basis=basis,
        )

    def momentum(g, m, bad, path):
        """(E_t, N_t seen as matrices, the view back, the work dtype) of one leaf."""
        if g.ndim < 2:
            raise ValueError(
                f"scale_by_muon got the rank-{g.ndim} leaf {path!r}: Muon needs matrices; "
                "route 1-D leaves to another optimizer (muon() does)"
            )
        perm, shape = _view(g.shape, _layout_of(path, g.shape, layout)[0], attention)
        work = work_dtype(m)
        b = beta
        g32 = g.astype(work)
        if bad is not None:
            g32, b = hold_momentum(bad, g32, beta)  # msign never sees the NaN either
        # E = (1-β)M: the same msign as Moonlight's M, in the gradients' range
        m_new = b * m.astype(work) + (1.0 - beta) * g32
        n = beta * m_new + (1.0 - beta) * g32 if nesterov else m_new
        return m_new, _to_matrices(n, perm, shape), (perm, shape), work

    def finish(o, g, bad, view, work, tau_t):
        """u = s(W)·msign(N) of one leaf, from its msign ``o`` (matrices)."""
        perm, shape = view
        alpha = _shape_scale(scale, shape[-2], shape[-1], update_rms, tau_t, work)
        u = _from_matrices(alpha * o.astype(work), perm, g.shape)
        if bad is not None:
            u = jnp.where(bad, 0.0, u)
        return u.astype(g.dtype)  # E is written by update_fn (cast or SR)

    orthogonalise = functools.partial(
        msign, coeffs=ns_coeffs, steps=ns_steps, compute_dtype=compute_dtype, eps=eps
    )

    def direction(g, m, bad, basis, path, tau_t):
        m_new, n, view, work = momentum(g, m, bad, path)
        if not streaming:
            return finish(orthogonalise(n), g, bad, view, work, tau_t), m_new, basis
        o, new = streaming_msign(n, basis, iters=streaming_iters)
        if bad is not None:  # a discarded gradient leaves the basis as it was
            new = jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, basis)
        return finish(o, g, bad, view, work, tau_t), m_new, new

    def leaf(path, g, m, bad, basis, tau_t):
        if not explicitly_sharded(g):
            return direction(g, m, bad, basis, path, tau_t)
        # Matmuls of explicitly sharded operands must name their output sharding; let
        # the partitioner choose inside and hand back the gradient's sharding (the
        # streaming basis keeps its own).
        keep = 3 if streaming else 2
        shardings = (
            jax.typeof(g).sharding,
            jax.typeof(m).sharding,
            jax.tree.map(lambda b: jax.typeof(b).sharding, basis),
        )[:keep]
        run = lambda g, m, bad, basis: direction(g, m, bad, basis, path, tau_t)[:keep]
        out = jax.sharding.auto_axes(run, out_sharding=shardings)(g, m, bad, basis)
        return out if streaming else (*out, None)

    def owned(paths, gs, ms, bads, tau_t):
        """Every leaf's direction, each matrix's msign computed once by its owner along
        ``owner_axes`` (:func:`~optax_ext.owner_compute.owner_compute`)."""
        owner_mesh(owner_axes)  # no mesh, or an axis not in it: ValueError naming both
        bads = bads or [None] * len(gs)

        def run(gs, ms, bads):
            pre = [momentum(*args) for args in zip(gs, ms, bads, paths, strict=True)]
            signs = by_owner([n for _, n, _, _ in pre])
            us = [
                # the gradient's sharding (auto axes would leave it to the compiler)
                shard_alike(g, finish(o, g, bad, view, work, tau_t))[1]
                for o, g, bad, (_, _, view, work) in zip(signs, gs, bads, pre, strict=True)
            ]
            mus = [shard_alike(m, m_new)[1] for m, (m_new, *_) in zip(ms, pre, strict=True)]
            return us, mus

        if not any(explicitly_sharded(x) for x in (*gs, *ms)):
            return run(gs, ms, bads)
        # Reshapes into the matrix view of explicitly sharded leaves would have to name
        # their shardings: run in auto axes, handing back the leaves' own shardings.
        shardings = (
            [jax.typeof(g).sharding.spec for g in gs],
            [jax.typeof(m).sharding.spec for m in ms],
        )
        return jax.sharding.auto_axes(run, out_sharding=shardings)(gs, ms, bads)

    by_owner = (
        None if owner_axes is None else owner_compute(orthogonalise, owner_axes, transposable=True)
    )

    def update_fn(updates, state, params=None, **extra_args):
        reject_cycle_length(extra_args, "ox.muon")
        check_updates_match(updates, params, "muon")
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        mus = treedef.flatten_up_to(state.mu)
        pairs = [(g, m) for (_, g), m in zip(with_paths, mus, strict=True)]
        flags = [_bad_leaf(g, m, beta) for g, m in pairs] if guard_nan else []
        # τ_t of this update, read at the updates made before it (optax's schedules' count)
        tau_t = tau(state.count) if callable(tau) else tau
        paths = [path_to_str(path) for path, _ in with_paths]
        bases = treedef.flatten_up_to(state.basis) if streaming else [None] * len(pairs)
        basis = None
        if owner_axes is None:
            out = [
                leaf(path, g, m, flags[i] if guard_nan else None, bases[i], tau_t)
                for i, (path, (g, m)) in enumerate(zip(paths, pairs, strict=True))
            ]
            us, mus_new = [o[0] for o in out], [o[1] for o in out]
            if streaming:
                basis = treedef.unflatten([o[2] for o in out])
        else:
            gs, ms = [g for g, _ in pairs], [m for _, m in pairs]
            us, mus_new = owned(paths, gs, ms, flags, tau_t)
        u = treedef.unflatten(us)
        mu = treedef.unflatten(mus_new)
        mu = write_state(mu, state.mu, state_rounding, rounding_seed, state.count)
        n_bad = spike.count_flags(flags)
        return u, ScaleByMuonState(
            count=optax.safe_increment(state.count),
            mu=mu,
            skipped_steps=spike.increment_if(n_bad > 0, state.skipped_steps),
            shrunk_leaves=spike.saturating_add(state.shrunk_leaves, n_bad),
            basis=basis,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _bad_leaf(g: jax.Array, m: jax.Array, beta: Any) -> jax.Array:
    """Whether a gradient leaf must be discarded: it holds a NaN or ±inf, or the new
    momentum would not fit the momentum's dtype (one reduction either way).

    E, an average of gradients, fits any dtype that holds the gradients; a narrower one
    (float16, largest value 65504, under float32 gradients) is checked as written.
    """
    if jnp.finfo(m.dtype).max >= jnp.finfo(g.dtype).max:
        return has_nonfinite(g, catch_inf=True)
    work = work_dtype(m)
    new = beta * m.astype(work) + (1.0 - beta) * g.astype(work)
    return has_nonfinite(new.astype(m.dtype), catch_inf=True)  # NaN, ±inf g included


def muon_labels(params: Any, rules: PathRules = MUON_RULES) -> Any:
    """``"muon"`` or ``"other"`` for every leaf: the first matching rule, else ``"other"``;
    leaves of rank < 2 are always ``"other"``."""
    labels = path_labels(params, rules, default="other")
    for label in set(jax.tree.leaves(labels)):
        check_choice("MUON_RULES label", label, _LABELS)
    return jax.tree.map(
        lambda label, p: label if len(getattr(p, "shape", ())) >= 2 else "other", labels, params
    )


def muon(
    learning_rate: optax.ScalarOrSchedule,
    ns_coeffs: Any = "polar_express",
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-7,
    weight_decay: float = 0.1,
    *,
    nesterov: bool = True,
    scale: str = "moonlight",
    update_rms: float = 0.2,
    tau: optax.ScalarOrSchedule | None = None,
    layout: PathRules = MUON_LAYOUT_RULES,
    attention: str = "fused",
    rules: PathRules = MUON_RULES,
    other: str | optax.GradientTransformation = "adamw",
    other_learning_rate: optax.ScalarOrSchedule | None = None,
    other_weight_decay: float | None = None,
    other_kwargs: dict | None = None,
    guard_nan: bool = True,
    compute_dtype: Any = None,
    mu_dtype: Any = None,
    state_rounding: str = "nearest",
    rounding_seed: int = 0,
    owner_axes: str | tuple[str, ...] | None = None,
    orthogonalizer: str = "newton_schulz",
    streaming_iters: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Muon for dense hidden kernels, a second optimizer for everything else (Moonlight's recipe).

    On the leaves labelled ``"muon"`` by ``rules`` (:data:`MUON_RULES`: kernels, but not
    embeddings or the head), with decoupled weight decay multiplied by the lr:

    .. math::

        W_t = W_{t-1} - \eta_t\left[s(W)\,\operatorname{msign}(N_t) + \lambda W_{t-1}\right]

    (:func:`scale_by_muon`; Moonlight: ``p *= 1 - lr*wd; p -= lr*scale*msign``). Su
    (10739): Muon needs the decay to keep ‖W‖ bounded. Every other leaf (embeddings,
    ``lm_head``/``head``, biases, norm scales, any leaf of rank < 2) goes to ``other``:
    ``"adamw"`` by default (``optax.adamw`` at the same learning rate and weight decay,
    no decay on biases and norm scales: Moonlight's recipe), ``"tiger"``, or any optax
    transform. Embeddings and the head never get Muon (11416: "significantly worse");
    optax's ``contrib.muon`` by default sends every 2-D leaf, embeddings included, to
    Muon.

    Why AdamW by default: with the ``"moonlight"`` scale Muon's update RMS is about 0.2,
    AdamW's, so one learning rate and weight decay serve both groups and a single lr
    sweep finds it. Tiger's sign step has RMS 1 times its per-parameter scale, so at
    Muon's learning rate it needs its own ``other_learning_rate`` (or
    ``other_kwargs={"param_scaling": (("", 0.2),)}``, a sign step at Muon's RMS); with one
    shared lr it measured worse on every task of ``benchmarks/bench_suite.py``. Tiger
    keeps the smaller state (one buffer instead of two for the other leaves).

    A non-finite gradient leaf gets a zero Muon direction and keeps its momentum (see
    :func:`scale_by_muon`); only the weight decay moves it that step, and the Muon
    part's state counts it (``state.inner_states["muon"].inner_state[0]``, a
    :class:`ScaleByMuonState`). The other leaves are guarded too (``guard_nan``):
    AdamW runs inside :func:`~optax_ext.wrappers.nan_guard.nan_guard` (that step is
    skipped for the other leaves and a bad leaf shrinks toward its centre, counted in
    the ``NanGuardState``, as are gradient-norm spikes); Tiger applies the same rules itself.

    Muon does not accumulate micro-batches: for k micro-batches per update use
    ``ox.accumulate_gradients(muon(...), k)`` (``set_accumulation_steps`` goes to its
    ``update``); passing it to this ``update`` raises ``ValueError``.

    Args:
      learning_rate: η, a float or an optax schedule.
      ns_coeffs, ns_steps: Newton–Schulz's coefficients and steps, as in
        :func:`scale_by_muon`; with ``beta``, ``eps`` and ``weight_decay`` they take
        ``optax.contrib.muon``'s positions.
      beta: Muon's momentum β in [0, 1).
      eps: as in :func:`scale_by_muon`.
      weight_decay: λ ≥ 0 for the Muon leaves.
      nesterov, scale, update_rms, tau, layout, attention, guard_nan, compute_dtype,
        mu_dtype, state_rounding, rounding_seed, owner_axes, orthogonalizer,
        streaming_iters: as in :func:`scale_by_muon` (for Muon's M; the other
        optimizer takes its own in ``other_kwargs``).
      rules: path rules labelling leaves ``"muon"`` or ``"other"`` (first match wins;
        unmatched → ``"other"``).
      other: ``"adamw"`` (the default), ``"tiger"`` or an optax transform for the other leaves.
      other_learning_rate: its learning rate (default: ``learning_rate``).
      other_weight_decay: its weight decay (default: ``weight_decay``).
      other_kwargs: extra keyword arguments of ``tiger`` / ``optax.adamw``
        (``accumulation_steps`` > 1 raises: see above).
        The three ``other_*`` configure the named optimizers only: with a transform
        as ``other`` they raise ``ValueError`` (build the transform with them).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.partition``); ``update``
      needs ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"embed": {"embedding": jnp.ones((10, 4))},
      ...           "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
      >>> muon_labels(params)
      {'dense': {'bias': 'other', 'kernel': 'muon'}, 'embed': {'embedding': 'other'}}
      >>> tx = muon(1e-3)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Su, `Muon <https://kexue.fm/archives/10592>`_, `<https://kexue.fm/archives/10739>`_,
      `<https://kexue.fm/archives/11416>`_, `<https://kexue.fm/archives/11772>`_; Liu et
      al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.
    """
    check_range("learning_rate", learning_rate, 0)
    check_range("weight_decay", weight_decay, 0)
    if other_learning_rate is not None:
        check_range("other_learning_rate", other_learning_rate, 0)
    if other_weight_decay is not None:
        check_range("other_weight_decay", other_weight_decay, 0)
    if isinstance(other, str):
        check_choice("other", other, ("tiger", "adamw"))
    elif not isinstance(other, optax.GradientTransformation):
        raise ValueError(f"other must be 'tiger', 'adamw' or an optax transform, got {other!r}")
    else:
        given = {
            "other_learning_rate": other_learning_rate,
            "other_weight_decay": other_weight_decay,
            "other_kwargs": other_kwargs or None,
        }
        given = {name: value for name, value in given.items() if value is not None}
        if given:
            shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
            raise ValueError(
                f"{shown}: the other_* arguments configure other='tiger' or 'adamw' and "
                "would be ignored with an optax transform as other; build the transform "
                "with them instead, e.g. other=optax.adamw(3e-4, weight_decay=0.1)"
            )
    steps_other = dict(other_kwargs or {}).get("accumulation_steps", 1)
    # other values are Tiger's to reject (a bool, a float, k < 1)
    if (
        isinstance(steps_other, int | np.integer)
        and not isinstance(steps_other, bool)
        and (int(steps_other) > 1)
    ):
        raise ValueError(
            f"other_kwargs['accumulation_steps']={steps_other!r}: the other optimizer "
            "would accumulate its leaves while the Muon leaves step on every call; "
            "accumulate the whole optimizer instead, ox.accumulate_gradients(ox.muon(...), k)"
        )
    for _, label in rules.items() if isinstance(rules, dict) else rules:
        check_choice("rules label", label, _LABELS)
    direction = scale_by_muon(
        beta=beta,
        nesterov=nesterov,
        ns_coeffs=ns_coeffs,
        ns_steps=ns_steps,
        scale=scale,
        update_rms=update_rms,
        tau=tau,
        layout=layout,
        attention=attention,
        guard_nan=guard_nan,
        eps=eps,
        compute_dtype=compute_dtype,
        mu_dtype=mu_dtype,
        state_rounding=state_rounding,
        rounding_seed=rounding_seed,
        owner_axes=owner_axes,
        orthogonalizer=orthogonalizer,
        streaming_iters=streaming_iters,
    )
    muon_tx = optax.chain(
        direction,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    other_tx = _other_optimizer(
        other,
        learning_rate if other_learning_rate is None else other_learning_rate,
        weight_decay if other_weight_decay is None else other_weight_decay,
        dict(other_kwargs or {}),
        mu_dtype,
        guard_nan,
    )
    tx = optax.partition(
        {"muon": muon_tx, "other": other_tx}, lambda params: muon_labels(params, rules)
    )
    return checked(tx, "muon")


def _other_optimizer(other, lr, wd, kwargs, mu_dtype, guard_nan):
    """The optimizer of the non-Muon leaves. With ``guard_nan`` a non-finite gradient
    never reaches their params: Tiger guards itself; AdamW goes inside :func:`nan_guard`
    with its defaults, Tiger's (that step is skipped for these leaves, the bad ones
    shrink toward their centre, and the state counts it; a gradient norm 1e3 times its
    running average is skipped too, so a finite overflow cannot leave AdamW's second
    moment at inf)."""
    if not isinstance(other, str):
        return other
    kwargs.setdefault("mu_dtype", mu_dtype)
    if other == "tiger":
        kwargs.setdefault("guard_nan", guard_nan)
        return tiger(lr, weight_decay=wd, **kwargs)
    kwargs.setdefault("mask", decay_mask())
    adamw = optax.adamw(lr, weight_decay=wd, **kwargs)
    return nan_guard(adamw) if guard_nan else adamw

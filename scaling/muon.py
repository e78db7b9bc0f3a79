r"""Muon's learning rate and weight decay across its shape-scale conventions and AdamW.

Muon's update is :math:`\theta \leftarrow \theta - \eta\,(s(W)\,\mathrm{msign}(M) +
\lambda\theta)`; an orthogonal :math:`d_{in}\times d_{out}` matrix has element RMS
:math:`1/\sqrt{\max(d_{in}, d_{out})}`, so the shape scale :math:`s(W)` sets the update's
RMS. The conventions (Su, kexue.fm/archives/11416):

==========  ==============================  ===========================================
name        s(W)                            use
==========  ==============================  ===========================================
none        1                               rarely
keller      √max(1, d_out/d_in)             Keller Jordan's reference
mup         √(d_out/d_in)                   lr transfers across width
moonlight   0.2·√max(d_in, d_out)           update RMS ≈ 0.2: AdamW's lr and weight
                                            decay carry over unchanged
==========  ==============================  ===========================================

Two runs take the same steps when :math:`\eta s` (the update) and :math:`\eta\lambda` (the
decay per step) agree, so moving from convention A to B:
:math:`\eta_B = \eta_A s_A/s_B` and :math:`\lambda_B = \lambda_A s_B/s_A`. From AdamW's
(η, λ) take A = moonlight: e.g. with ``none`` and :math:`d_{in} = d_{out} = d`,
:math:`\eta_{Muon} = 0.2\sqrt d\,\eta` and :math:`\lambda_{Muon} = \lambda/(0.2\sqrt d)`.

Shapes are Flax's: a kernel is ``(d_in, d_out)`` (PyTorch's Linear stores
``(d_out, d_in)``: copying its factor into a Flax port swaps them); a convolution kernel
``(*spatial, d_in, d_out)`` counts as ``(prod(spatial)·d_in, d_out)`` (:func:`muon_dims`).

References:
  Su, https://kexue.fm/archives/11416 (conventions and conversion),
  https://kexue.fm/archives/10739 (Muon needs weight decay); Liu et al. 2025, "Muon is
  Scalable for LLM Training" (Moonlight), arXiv 2502.16982.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scaling import _validate as v
from scaling.weight_decay import LrAndDecay

__all__ = [
    "MUON_SCALES",
    "muon_dims",
    "muon_shape_scale",
    "convert_muon",
    "muon_from_adamw",
    "adamw_from_muon",
]

#: The shape-scale conventions, by name.
MUON_SCALES = ("moonlight", "keller", "mup", "none")


def muon_dims(shape: Sequence[int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Flax kernel shape; spatial axes of a conv kernel join d_in.

    Example:
      >>> muon_dims((768, 3072)), muon_dims((3, 3, 64, 128))
      ((768, 3072), (576, 128))
    """
    dims = tuple(shape)
    if len(dims) < 2 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"shape must be a kernel shape of >= 2 ints, got {shape!r}")
    if min(dims) < 1:
        raise ValueError(f"shape must have sizes >= 1, got {shape!r}")
    return math.prod(dims[:-1]), dims[-1]


def muon_shape_scale(d_in: int, d_out: int, scale: str = "moonlight") -> float:
    r"""The shape scale :math:`s(W)` of a convention (table in the module docstring).

    Example:
      >>> round(muon_shape_scale(1024, 1024), 6)  # 0.2 * 32
      6.4
      >>> muon_shape_scale(768, 3072, "keller"), muon_shape_scale(3072, 768, "mup")
      (2.0, 0.5)

    References:
      Su, https://kexue.fm/archives/11416.
    """
    v.check_choice("scale", scale, MUON_SCALES)
    for name, d in (("d_in", d_in), ("d_out", d_out)):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{name} must be an int >= 1, got {d!r}")
    if scale == "moonlight":
        return 0.2 * math.sqrt(max(d_in, d_out))
    if scale == "keller":
        return math.sqrt(max(1.0, d_out / d_in))
    if scale == "mup":
        return math.sqrt(d_out / d_in)
    return 1.0


def convert_muon(
    lr: float, weight_decay: float, d_in: int, d_out: int, from_scale: str, to_scale: str
) -> LrAndDecay:
    r"""Muon's (lr, weight decay) in one shape convention to the same steps in another.

    .. math:: \eta_B = \eta_A\,\frac{s_A}{s_B},\qquad \lambda_B = \lambda_A\,\frac{s_B}{s_A}

    (same update :math:`\eta s` and same decay per step :math:`\eta\lambda`).

    Args:
      lr: the learning rate under ``from_scale``.
      weight_decay: the decoupled weight decay (multiplied by the lr) under ``from_scale``.
      d_in, d_out: the matrix's Flax dimensions (:func:`muon_dims` for other shapes).
      from_scale, to_scale: conventions from :data:`MUON_SCALES`.

    Example:
      >>> r = convert_muon(0.02, 0.1, 768, 3072, "keller", "moonlight")
      >>> round(r.lr, 8), round(r.weight_decay, 6)
      (0.00360844, 0.554256)

    References:
      Su, https://kexue.fm/archives/11416.
    """
    v.finite_positive("lr", lr)
    v.nonnegative("weight_decay", weight_decay)
    v.check("weight_decay", weight_decay, 0.0, 1e308)
    ratio = muon_shape_scale(d_in, d_out, from_scale) / muon_shape_scale(d_in, d_out, to_scale)
    inputs = dict(lr=lr, weight_decay=weight_decay, d_in=d_in, d_out=d_out)
    new_wd = v.scalar(weight_decay / ratio)
    if weight_decay != 0:
        v.result("the weight decay", new_wd, inputs)
    return LrAndDecay(v.result("the lr", v.scalar(lr * ratio), inputs), new_wd)


def muon_from_adamw(
    lr: float, weight_decay: float, d_in: int, d_out: int, scale: str = "none"
) -> LrAndDecay:
    r"""Muon's (lr, weight decay) for one matrix from a tuned AdamW's (Su, 11416).

    Moonlight's scale gives Muon AdamW's update RMS (≈ 0.2), so AdamW's numbers carry
    over to it unchanged; another convention converts from there
    (:func:`convert_muon` with ``from_scale="moonlight"``).

    Example:
      >>> r = muon_from_adamw(3e-4, 0.1, 1024, 1024)  # "none": lr x 0.2 sqrt(d), wd / that
      >>> round(r.lr, 8), round(r.weight_decay, 8)
      (0.00192, 0.015625)

    References:
      Su, https://kexue.fm/archives/11416; Liu et al. 2025, arXiv 2502.16982.
    """
    return convert_muon(lr, weight_decay, d_in, d_out, "moonlight", scale)


def adamw_from_muon(
    lr: float, weight_decay: float, d_in: int, d_out: int, scale: str = "none"
) -> LrAndDecay:
    """The inverse of :func:`muon_from_adamw`: AdamW's (lr, weight decay) from Muon's.

    Example:
      >>> r = adamw_from_muon(0.00192, 0.015625, 1024, 1024)
      >>> round(r.lr, 10), round(r.weight_decay, 10)
      (0.0003, 0.1)
    """
    return convert_muon(lr, weight_decay, d_in, d_out, scale, "moonlight")

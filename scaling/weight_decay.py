r"""Weight decay as an EMA timescale, and how to move it with the batch size and lr.

With decoupled decay :math:`\theta \leftarrow (1-\eta\lambda)\theta - \eta u` (optax
``add_decayed_weights`` before the learning rate, PyTorch AdamW) the weights are an
exponential moving average of the updates with timescale :math:`\tau_{iter} = 1/(\eta\lambda)`
steps (Wang & Aitchison 2024; Su, kexue.fm/archives/11459). Keeping it constant in *epochs*
(:math:`\tau_{iter}B/N`) when the batch size and lr change gives
:math:`\lambda' = \lambda\,(\eta/\eta')(B'/B)`.

Also: Power Lines' τ (Bergsma et al. 2025), coupled ↔ independent decay, the equilibrium
weight RMS and its time-varying prediction (a per-leaf monitor), AdamW → Lion transfer and
Amos-derived (η, λ) for sign optimizers. Su's optimal lr / decay schedules
(kexue.fm/archives/11459) are optax schedules and live with the transforms
(``ox.schedules.constant_decay_lr_schedule``, ``ox.schedules.coupled_decay_schedules``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from scaling import _validate as v

__all__ = [
    "LrAndDecay",
    "ema_timescale",
    "ema_timescale_epochs",
    "transfer_weight_decay",
    "power_lines_tau",
    "power_lines_weight_decay",
    "coupled_to_independent",
    "independent_to_coupled",
    "equilibrium_weight_rms",
    "lion_from_adamw",
    "amos_sign_hyperparams",
    "weight_rms_prediction",
]


class LrAndDecay(NamedTuple):
    """A learning rate and a weight decay."""

    lr: float
    weight_decay: float


def ema_timescale(lr, weight_decay):
    r"""EMA timescale of the weights in steps, :math:`\tau_{iter} = 1/(\eta\lambda)`.

    Example:
      >>> round(ema_timescale(3e-4, 0.1))
      33333

    References:
      Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale model and
      dataset size", arXiv 2405.13698; Su, https://kexue.fm/archives/11459.
    """
    v.positive("lr", lr)
    v.positive("weight_decay", weight_decay)
    inputs = dict(lr=lr, weight_decay=weight_decay)
    with v.arithmetic("the EMA timescale", inputs):
        # 1/lr/wd rather than 1/(lr*wd): the product of two tiny numbers underflows to 0.
        out = 1 / lr / weight_decay
    return v.result("the EMA timescale", v.scalar(out), inputs)


def ema_timescale_epochs(lr, weight_decay, batch_size, dataset_size):
    r"""EMA timescale in epochs, :math:`\tau_{epoch} = \tau_{iter}\,B/N`.

    Example:
      >>> round(ema_timescale_epochs(1e-3, 0.1, 256, 1_000_000), 6)
      2.56

    References:
      Wang & Aitchison 2024, arXiv 2405.13698.
    """
    v.positive("batch_size", batch_size)
    v.positive("dataset_size", dataset_size)
    inputs = dict(
        lr=lr, weight_decay=weight_decay, batch_size=batch_size, dataset_size=dataset_size
    )
    with v.arithmetic("the EMA timescale in epochs", inputs):
        out = ema_timescale(lr, weight_decay) * (batch_size / dataset_size)
    return v.result("the EMA timescale in epochs", v.scalar(out), inputs)


def transfer_weight_decay(weight_decay, lr, new_lr, batch, new_batch):
    r"""Weight decay keeping the EMA timescale in epochs when (B, η) → (B', η').

    .. math:: \lambda' = \lambda\,\frac{\eta}{\eta'}\,\frac{B'}{B}

    Example:
      >>> round(transfer_weight_decay(0.1, 1e-3, 2e-3, 256, 1024), 12)
      0.2

    References:
      Wang & Aitchison 2024, arXiv 2405.13698; Su, https://kexue.fm/archives/11459.
    """
    v.nonnegative("weight_decay", weight_decay)
    v.positive("lr", lr)
    v.positive("new_lr", new_lr)
    v.positive("batch", batch)
    v.positive("new_batch", new_batch)
    inputs = dict(weight_decay=weight_decay, lr=lr, new_lr=new_lr, batch=batch, new_batch=new_batch)
    with v.arithmetic("the new weight decay", inputs):
        out = weight_decay * (lr / new_lr) * (new_batch / batch)
    if weight_decay == 0:
        return v.scalar(out)
    return v.result("the new weight decay", v.scalar(out), inputs)


def power_lines_tau(lr, weight_decay, batch_tokens, dataset_tokens):
    r"""Power Lines' normalised timescale :math:`\tau = B/(\eta\lambda D)` (fraction of
    training; B and D in tokens).

    Example:
      >>> round(power_lines_tau(3e-4, 0.1, 4e6, 2e12), 7)
      0.0666667

    References:
      Bergsma et al. 2025, "Power Lines: Scaling Laws for Weight Decay and Batch Size in
      LLM Pre-training", arXiv 2505.13738.
    """
    v.positive("batch_tokens", batch_tokens)
    v.positive("dataset_tokens", dataset_tokens)
    inputs = dict(
        lr=lr, weight_decay=weight_decay, batch_tokens=batch_tokens, dataset_tokens=dataset_tokens
    )
    with v.arithmetic("tau", inputs):
        out = ema_timescale(lr, weight_decay) * (batch_tokens / dataset_tokens)
    return v.result("tau", v.scalar(out), inputs)


def power_lines_weight_decay(lr, tau, batch_tokens, dataset_tokens):
    r"""Weight decay for a target Power Lines τ: :math:`\lambda = B/(\eta\tau D)`.

    Example:
      >>> round(power_lines_weight_decay(3e-4, 1 / 15, 4e6, 2e12), 10)
      0.1

    References:
      Bergsma et al. 2025, arXiv 2505.13738.
    """
    v.positive("lr", lr)
    v.positive("tau", tau)
    v.positive("batch_tokens", batch_tokens)
    v.positive("dataset_tokens", dataset_tokens)
    inputs = dict(lr=lr, tau=tau, batch_tokens=batch_tokens, dataset_tokens=dataset_tokens)
    with v.arithmetic("the weight decay", inputs):
        out = batch_tokens / dataset_tokens / lr / tau
    return v.result("the weight decay", v.scalar(out), inputs)


def coupled_to_independent(weight_decay, peak_lr):
    r"""Coupled decay :math:`\theta \mathrel{-}= \eta_t(u + \lambda\theta)` (optax, PyTorch) to
    independent decay :math:`\theta \mathrel{-}= s_t(\eta u + \hat\lambda\theta)` (schedule
    multiplier :math:`s_t`): :math:`\hat\lambda = \eta_{peak}\lambda`.

    Example:
      >>> round(coupled_to_independent(0.1, 1e-3), 12)
      0.0001

    References:
      Loshchilov & Hutter 2019, arXiv 1711.05101; https://kexue.fm/archives/11459.
    """
    v.nonnegative("weight_decay", weight_decay)
    v.positive("peak_lr", peak_lr)
    inputs = dict(weight_decay=weight_decay, peak_lr=peak_lr)
    out = v.scalar(peak_lr * weight_decay)
    return out if weight_decay == 0 else v.result("the independent decay", out, inputs)


def independent_to_coupled(independent_decay, peak_lr):
    r"""Inverse of :func:`coupled_to_independent`: :math:`\lambda = \hat\lambda/\eta_{peak}`."""
    v.nonnegative("independent_decay", independent_decay)
    v.positive("peak_lr", peak_lr)
    inputs = dict(independent_decay=independent_decay, peak_lr=peak_lr)
    with v.arithmetic("the coupled decay", inputs):
        out = v.scalar(independent_decay / peak_lr)
    return out if independent_decay == 0 else v.result("the coupled decay", out, inputs)


def equilibrium_weight_rms(lr, weight_decay):
    r"""Equilibrium weight RMS under AdamW, :math:`\approx\sqrt{\eta/(2\lambda)}`.

    Example:
      >>> round(equilibrium_weight_rms(3e-4, 0.1), 7)
      0.0387298

    References:
      Su, https://kexue.fm/archives/11307.
    """
    v.positive("lr", lr)
    v.positive("weight_decay", weight_decay)
    inputs = dict(lr=lr, weight_decay=weight_decay)
    with v.arithmetic("the equilibrium RMS", inputs):
        out = lr**0.5 / (2 * weight_decay) ** 0.5
    return v.result("the equilibrium RMS", v.scalar(out), inputs)


def lion_from_adamw(lr, weight_decay, k=3.0) -> LrAndDecay:
    r"""Lion's (lr, weight decay) from a tuned AdamW: lr ÷ k, λ × k (ηλ kept), k ∈ [3, 10].

    Example:
      >>> r = lion_from_adamw(3e-4, 0.1, k=3)
      >>> round(r.lr, 12), round(r.weight_decay, 12)
      (0.0001, 0.3)

    References:
      Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms" (Lion),
      arXiv 2302.06675, section 5.
    """
    v.positive("lr", lr)
    v.nonnegative("weight_decay", weight_decay)
    v.check("k", k, 3.0, 10.0)
    inputs = dict(lr=lr, weight_decay=weight_decay, k=k)
    new_wd = v.scalar(weight_decay * k)
    if weight_decay != 0:
        v.result("Lion's weight decay", new_wd, inputs)
    return LrAndDecay(v.result("Lion's lr", v.scalar(lr / k), inputs), new_wd)


def amos_sign_hyperparams(init_std, alpha0) -> LrAndDecay:
    r"""Amos-derived (η, λ) for a sign optimizer: :math:`\eta \approx \alpha_0\sigma`,
    :math:`\lambda = \alpha_0/(2\sigma)` (σ: the parameter's initial standard deviation).

    Example:
      >>> r = amos_sign_hyperparams(768**-0.5, 1.11e-3)
      >>> round(r.lr, 9), round(r.weight_decay, 6)
      (4.0054e-05, 0.015381)

    References:
      Su, https://kexue.fm/archives/9473 (Tiger), https://kexue.fm/archives/9344 (Amos).
    """
    v.finite_positive("init_std", init_std)
    v.positive("alpha0", alpha0)
    inputs = dict(init_std=init_std, alpha0=alpha0)
    with v.arithmetic("the lr and weight decay", inputs):
        lr, decay = v.scalar(alpha0 * init_std), v.scalar(alpha0 / (2 * init_std))
    return LrAndDecay(v.result("the lr", lr, inputs), v.result("the weight decay", decay, inputs))


def weight_rms_prediction(init_rms, lrs, weight_decays, update_rms=1.0, *, form="recursion"):
    r"""Predicted weight RMS over training from the lr and weight-decay schedules (Su, 11404).

    With decoupled decay :math:`\theta_t = (1-\eta_t\lambda_t)\theta_{t-1} - \eta_t u_t`
    and updates of element RMS :math:`u` uncorrelated with the weights (mean field), the
    expected squared RMS follows exactly

    .. math:: r_t^2 = (1-\eta_t\lambda_t)^2\,r_{t-1}^2 + \eta_t^2u^2

    (``form="recursion"``, the default). Su's closed form (``form="su"``), with
    :math:`\kappa_t = \sum_{s\le t}\eta_s\lambda_s` and :math:`\nu_t = u^2\sum_{s\le t}\eta_s^2`:

    .. math::
      r_t^2 \approx e^{-2\kappa_t}\,r_0^2
        + \left(1 - e^{-2\kappa_t}\right)\frac{\nu_t}{2\kappa_t}

    replaces the decay-weighted sum of :math:`\eta_s^2` by its plain average; it is exact
    while :math:`\eta/\lambda` is constant (within 0.03% for constant settings over 3000
    steps) but drifts when it is not: 8% low at the end of a cosine lr schedule, 26% low
    once the weight decay is switched off (measured in the tests). With constant η, λ both
    tend to :func:`equilibrium_weight_rms` × u. Log the prediction per leaf next to the
    measured RMS: a leaf far from it has updates correlated with its weights (or a
    schedule that is not what you think).

    Args:
      init_rms: the leaf's RMS at step 0 (>= 0).
      lrs: the learning rate of each step so far (a sequence; the schedule's values).
      weight_decays: the decoupled weight decay of each step (same length, or a scalar).
      update_rms: the optimizer's update element RMS (1 for sign updates; about 0.2 for
        Adam or Muon with Moonlight's scale).
      form: ``"recursion"`` (exact under the mean-field assumption) or ``"su"``.

    Returns:
      A NumPy array: the predicted RMS after each step.

    Example:
      >>> r = weight_rms_prediction(0.02, [3e-4] * 200_000, 0.1, update_rms=1.0)
      >>> round(float(r[-1]), 5), round(equilibrium_weight_rms(3e-4, 0.1), 5)
      (0.03873, 0.03873)

    References:
      Su, https://kexue.fm/archives/11404 and https://kexue.fm/archives/11307.
    """
    v.check_choice("form", form, ("recursion", "su"))
    v.check("init_rms", init_rms, 0.0, 1e308)
    v.check("update_rms", update_rms, 0.0, 1e308)
    eta = np.asarray(lrs, dtype=np.float64)
    if eta.ndim != 1 or eta.size == 0:
        raise ValueError(f"lrs must be a non-empty 1-D sequence, got shape {eta.shape}")
    try:
        lam = np.broadcast_to(np.asarray(weight_decays, dtype=np.float64), eta.shape)
    except ValueError:
        raise ValueError(
            f"weight_decays must be a scalar or one per step ({eta.size}), got shape "
            f"{np.shape(weight_decays)}"
        ) from None
    v.check("lrs", eta, 0.0, 1e308)
    v.check("weight_decays", lam, 0.0, 1e308)
    u2 = float(update_rms) ** 2
    if form == "recursion":
        keep, add = (1 - eta * lam) ** 2, u2 * eta * eta
        out = np.empty_like(eta)
        r2 = float(init_rms) ** 2
        for t in range(eta.size):  # a linear recurrence: one pass, no overflowing products
            r2 = keep[t] * r2 + add[t]
            out[t] = r2
        return np.sqrt(out)
    kappa = np.cumsum(eta * lam)
    nu = u2 * np.cumsum(eta * eta)
    with np.errstate(divide="ignore", invalid="ignore"):
        # -expm1(-2k)/(2k) -> 1 as k -> 0: the random-walk limit without a 0/0.
        factor = np.where(kappa > 0, -np.expm1(-2 * kappa) / (2 * kappa), 1.0)
    return np.sqrt(np.exp(-2 * kappa) * float(init_rms) ** 2 + factor * nu)

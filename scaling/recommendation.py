r"""One call from a tuned recipe to the hyperparameters at a new batch size.

:func:`recommend` chooses the rule for the optimizer family and explains every number:

=============  ===========================================================================
family         learning-rate rule (with a noise scale)
=============  ===========================================================================
sgd            :func:`~scaling.batch_size.sgd_transfer` through B_noise
sgdm           the same with the momentum factor (1-β1)/(1+β1)
adam, adamw    :func:`~scaling.batch_size.adam_transfer` (mean field with β1, B_simple)
lion, tiger    :func:`~scaling.batch_size.sign_transfer` (Su's surge form; β_noise = 1
               unless given, i.e. no peak)
muon           :func:`~scaling.batch_size.muon_transfer`, η ∝ (1 + B_simple/B)^(-1/2)
=============  ===========================================================================

Every recommended value is **the centre of a small sweep**, not a replacement for one:
the rules are one-step, mean-field statements, and the measured noise scale has an
error. With the noise scale's standard error (``stderr``) the learning rate comes with
the range the rule gives from :math:`B_{simple} \pm 1` s.e. (``lr_range``), and the
table says both.

Without a noise scale it **falls back** to a simple rule, labelled as such in the
reason: linear for sgd/sgdm, square root for adam/adamw/lion/tiger/muon. Pass ``strict=True``
to raise ``ValueError`` instead. Weight decay keeps the EMA timescale in epochs
(:func:`~scaling.weight_decay.transfer_weight_decay`); β2 of adam/adamw keeps its
half-life in examples (:func:`~scaling.batch_size.beta2_by_half_life`); steps and
examples follow the tradeoff law with B_crit ≈ the noise scale.

Inputs that are each valid but too far apart for float64 (a batch ratio of 1e600) give
a ``ValueError`` that names them, never ``inf``, ``nan`` or an underflowed 0 as the
recommended learning rate or weight decay; a step prediction that leaves float64 is
dropped (``None``) and its reason says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from scaling import _validate as v
from scaling import batch_size as bs
from scaling import weight_decay as wd

__all__ = ["FAMILIES", "RULES", "FamilyRule", "SWEEP_NOTE", "Recommendation", "recommend"]


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """Recommended hyperparameters at ``new_batch`` and why.

    ``reasons`` maps each quantity (``lr``, ``weight_decay``, ``beta1``, ``beta2``,
    ``steps``) to a one-line explanation. ``steps_ratio`` / ``examples_ratio`` are the
    tradeoff law's new/old steps and examples to the same loss (``None`` without a
    noise scale); ``new_steps`` / ``new_examples`` need the current ``steps``.
    ``lr_range`` is ``(low, high)``, the rule's lr over the noise scale ± one standard
    error (``noise_scale_stderr``), or ``None`` without one. The printed table rounds to
    three significant digits and says that each value is the centre of a small sweep.
    """

    optimizer: str
    batch: float
    new_batch: float
    rule: str
    noise_scale: float | None
    lr: float
    new_lr: float
    weight_decay: float | None
    new_weight_decay: float | None
    beta1: float | None
    new_beta1: float | None
    beta2: float | None
    new_beta2: float | None
    peak_batch: float | None
    has_peak: bool
    steps_ratio: float | None
    examples_ratio: float | None
    steps: float | None
    new_steps: float | None
    new_examples: float | None
    reasons: dict[str, str]
    noise_scale_stderr: float | None = None
    lr_range: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = [("batch", self.batch, self.new_batch, "-", f"rule: {self.rule}")]
        digits = {"batch": 6}
        lr_range = "-"
        if self.lr_range is not None:
            lr_range = f"{fmt(self.lr_range[0], 3)} to {fmt(self.lr_range[1], 3)}"
        rows.append(("lr", self.lr, self.new_lr, lr_range, self.reasons["lr"]))
        if self.weight_decay is not None:
            rows.append(
                (
                    "weight_decay",
                    self.weight_decay,
                    self.new_weight_decay,
                    "-",
                    self.reasons["weight_decay"],
                )
            )
        if self.beta1 is not None:
            rows.append(("beta1", self.beta1, self.new_beta1, "-", self.reasons["beta1"]))
        if self.beta2 is not None:
            rows.append(("beta2", self.beta2, self.new_beta2, "-", self.reasons["beta2"]))
        if self.steps_ratio is not None:
            rows.append(
                (
                    "steps",
                    self.steps if self.steps is not None else 1.0,
                    self.new_steps if self.new_steps is not None else self.steps_ratio,
                    "-",
                    self.reasons["steps"],
                )
            )
            rows.append(
                (
                    "examples",
                    None if self.steps is None else self.steps * self.batch,
                    self.new_examples if self.new_examples is not None else self.examples_ratio,
                    "-",
                    "examples = steps x batch"
                    if self.steps is not None
                    else "relative to the current run",
                )
            )
        else:
            rows.append(("steps", self.steps, None, "-", self.reasons["steps"]))
        noise = ""
        if self.noise_scale is not None:
            se = self.noise_scale_stderr
            noise = f", noise scale {fmt(self.noise_scale, 3)}" + (
                f" ± {fmt(se, 2)}" if se is not None else " (no standard error given)"
            )
        table = format_table(
            ["quantity", "current", "recommended", "range (±1 s.e.)", "reason"],
            [
                [name, fmt(a, digits.get(name, 3)), fmt(b, digits.get(name, 3)), r, why]
                for name, a, b, r, why in rows
            ],
            title=f"{self.optimizer}: batch {fmt(self.batch)} -> {fmt(self.new_batch)}{noise}",
        )
        return f"{table}\n{SWEEP_NOTE}"


#: What the table says under every recommendation.
SWEEP_NOTE = (
    "Each recommended value is the centre of a small sweep, not a replacement for one: "
    "try the lr at x0.5, x0.7, x1, x1.4 and x2 (and past the range above, if it is wider)."
)


def fmt(x, digits: int = 6) -> str:
    """Compact number formatting for tables ('-' for None), ``digits`` significant.

    Between 1e-4 and 1e6 no exponent: ``fmt(2034.0, 3)`` is ``'2030'``, not ``'2.03e+03'``.
    """
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int | float):
        if x == 0 or not math.isfinite(x) or not 1e-4 <= abs(x) < 1e6:
            return f"{x:.{digits}g}"
        decimals = digits - 1 - math.floor(math.log10(abs(x)))
        text = f"{round(x, decimals):.{max(decimals, 0)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(x)


def format_table(header, rows, title=None) -> str:
    """A plain-text table with aligned columns (the last column is left free)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    line = lambda r: "  ".join(
        [str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)] + [str(r[-1])]
    ).rstrip()
    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths] + ["-" * len(header[-1])])]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------ one rule a family


def _sgd_lr(lr, batch, new_batch, given, b1, beta_noise, c):
    new_lr = bs.sgd_transfer(lr, batch, new_batch, given, b1).lr
    rule = "sgd B_noise transfer" + (" with momentum" if b1 > 0 else "")
    reason = (
        f"lr x (1+r*Bn/B)/(1+r*Bn/B'), Bn={given:.4g}, r=(1-b1)/(1+b1)="
        f"{bs.momentum_factor(b1):.3g}; no peak"
    )
    return new_lr, None, False, rule, reason


def _adam_lr(lr, batch, new_batch, given, b1, beta_noise, c):
    res = bs.adam_transfer(lr, batch, new_batch, given, b1)
    new_lr, peak, has_peak = res.lr, res.peak_batch, res.has_peak
    if has_peak and min(batch, new_batch) >= peak:
        tail = (
            f"both batches are past the curve's peak at B={peak:.3g} "
            f"({(1 - b1) / (3 * b1 - 1):.3g} x B_simple for beta1={b1:g}), where it falls "
            f"slowly: lr x{new_lr / lr:.3g} (the momentum's sign is already nearly "
            "noise-free there: a larger batch adds curvature along the update, not "
            "signal; Su, kexue.fm/archives/11301)"
        )
    elif has_peak:
        tail = f"lr falls beyond B={peak:.3g} (the curve's peak)"
    else:
        tail = "no peak (beta1 <= 1/3)"
    reason = f"mean-field Adam curve with beta1={b1:g}, B_simple={given:.4g}; {tail}"
    return new_lr, peak, has_peak, "adam mean-field curve", reason


def _muon_lr(lr, batch, new_batch, given, b1, beta_noise, c):
    res = bs.muon_transfer(lr, batch, new_batch, given, beta_noise)
    new_lr, peak, has_peak = res.lr, res.peak_batch, res.has_peak
    if beta_noise == math.inf:
        reason = f"Su's Muon rule lr x sqrt((1+Bs/B)/(1+Bs/B')), B_simple={given:.4g}; no peak"
        return new_lr, peak, has_peak, "muon (Su)", reason
    tail = (
        f"peak at B={peak:.3g} ({peak / given:.3g} x B_simple), lr falls beyond"
        if has_peak
        else "no peak"
    )
    reason = (
        f"Su's Muon curve with a surge term, beta_noise={beta_noise:g} (the transfer "
        f"check's fit), B_simple={given:.4g}; {tail}"
    )
    return new_lr, peak, has_peak, "muon (Su, with a surge)", reason


def _sign_lr(lr, batch, new_batch, given, b1, beta_noise, c):
    res = bs.sign_transfer(lr, batch, new_batch, given, beta_noise, c)
    new_lr, peak, has_peak = res.lr, res.peak_batch, res.has_peak
    tail = (
        f"peak at B={peak:.3g}, lr falls beyond"
        if has_peak
        else f"beta_noise={beta_noise:g}: no peak"
    )
    reason = f"Su's sign curve, kappa^2=B_simple={given:.4g}, c={c:.4g}; {tail}"
    return new_lr, peak, has_peak, "sign surge (Su)", reason


def _adam_beta1(lr, b1, b2, kappa):
    sde = ""
    if 0 < kappa and kappa * (1 - b1) < 1 and kappa * (1 - b2) < 1:
        alt = bs.adam_sde_rule(lr, b1, b2, 1e-8, kappa)
        sde = f" (Malladi's SDE rule instead: beta1={alt.beta1:.3g}, lr={alt.lr:.3g})"
    return "kept: the lr curve above assumes this beta1" + sde


def _kept(why: str) -> Callable[..., str]:
    return lambda lr, b1, b2, kappa: why


def _sgdm_beta1(lr, b1, b2, kappa):
    return f"kept; momentum acts like a batch x{(1 + b1) / (1 - b1):.3g} on the noise term"


class FamilyRule(NamedTuple):
    """How one optimizer family moves to a new batch size (a row of :data:`RULES`).

    ``lr_rule(lr, batch, new_batch, noise_scale, beta1, beta_noise, c)`` returns (new lr,
    peak batch, has peak, rule name, reason); ``beta1_reason(lr, beta1, beta2, κ)`` says
    why β1 is kept.
    """

    noise: str  # the noise scale its lr rule reads: "b_noise" or "b_simple"
    beta1: float  # the family's default β1
    beta2: float | None  # its default β2 (None: it has none)
    beta_noise: float  # the default β_noise of its surge
    surge_may_vanish: bool  # whether beta_noise = inf (no surge term) is allowed
    fallback: str  # the rule without a noise scale: "linear" or "sqrt"
    lr_rule: Callable[..., tuple]
    beta1_reason: Callable[..., str]
    beta2_half_life: bool  # β2 keeps its half-life in examples (Adam)
    l2_note: bool  # its weight decay may be an L2 penalty (plain Adam)


_SIGN_KEPT = _kept("kept: the sign curve has no momentum term")

#: one rule a family; :func:`recommend` reads its row and nothing else of the family
RULES: dict[str, FamilyRule] = {
    "sgd": FamilyRule("b_noise", 0.0, None, 1.0, False, "linear", _sgd_lr,
                      _kept("plain SGD: no momentum"), False, False),
    "sgdm": FamilyRule("b_noise", 0.9, None, 1.0, False, "linear", _sgd_lr, _sgdm_beta1,
                       False, False),
    "adam": FamilyRule("b_simple", 0.9, 0.999, 1.0, False, "sqrt", _adam_lr, _adam_beta1,
                       True, True),
    "adamw": FamilyRule("b_simple", 0.9, 0.999, 1.0, False, "sqrt", _adam_lr, _adam_beta1,
                        True, False),
    "lion": FamilyRule("b_simple", 0.9, 0.99, 1.0, False, "sqrt", _sign_lr, _SIGN_KEPT,
                       False, False),
    "tiger": FamilyRule("b_simple", 0.9, None, 1.0, False, "sqrt", _sign_lr, _SIGN_KEPT,
                        False, False),
    "muon": FamilyRule("b_simple", 0.95, None, bs.MUON_BETA_NOISE, True, "sqrt", _muon_lr,
                       _kept("kept: the Muon rule has no momentum term"), False, False),
}  # fmt: skip

FAMILIES = tuple(RULES)


def _ratio(b_crit, batch, new_batch):
    # (1 + Bc/B')/(1 + Bc/B) = (B/B')(B' + Bc)/(B + Bc), and the same for examples: the
    # sums stay finite where Bc/B alone would overflow.
    inputs = dict(b_crit=b_crit, batch=batch, new_batch=new_batch)
    with v.arithmetic("the steps ratio", inputs):
        steps = (batch / new_batch) * ((new_batch + b_crit) / (batch + b_crit))
        examples = (b_crit + new_batch) / (b_crit + batch)
    return v.result("the steps ratio", steps, inputs), v.result(
        "the examples ratio", examples, inputs
    )


def recommend(
    optimizer: str,
    lr: float,
    batch: float,
    new_batch: float,
    *,
    b_noise: float | None = None,
    b_simple: float | None = None,
    weight_decay: float | None = None,
    beta1: float | None = None,
    beta2: float | None = None,
    beta_noise: float | None = None,
    c: float = bs.SU_C,
    steps: float | None = None,
    strict: bool = False,
    stderr: float | None = None,
) -> Recommendation:
    r"""Recommends lr, weight decay, betas, steps and examples at a new batch size.

    Args:
      optimizer: one of ``sgd, sgdm, adam, adamw, lion, tiger, muon``.
      lr: the tuned learning rate at ``batch``.
      batch: the current batch size (examples or tokens; same unit as the noise scale).
      new_batch: the target batch size.
      b_noise: measured or estimated :math:`B_{noise}` (SGD's rule), optional.
      b_simple: measured :math:`B_{simple}` (Adam / sign rules), optional. When only one
        of the two is given it stands in for the other (exact when H ∝ I), as the reason
        says.
      weight_decay: current decoupled weight decay λ (update θ ← θ − η(u + λθ)), optional.
      beta1: momentum / Adam β1 (family default if None: sgd 0, sgdm 0.9, adam 0.9,
        lion 0.9, tiger 0.9 (optax_ext's default), muon 0.95).
      beta2: Adam's β2 (default 0.999 for adam/adamw; lion's β2 is kept).
      beta_noise: β_noise of the surge (lion/tiger: Su's sign form, default 1, no peak;
        muon: :func:`~scaling.batch_size.muon_optimal_lr`'s surge term, default
        :data:`~scaling.batch_size.MUON_BETA_NOISE`, the transfer check's fit; ``inf``
        gives Su's rule without a surge).
      c: the sign form's constant, π/2 (Su 2024) or 1 (mean field).
      steps: steps the current run needs (to a target loss or total); gives absolute
        predicted steps and examples.
      strict: raise ``ValueError`` instead of falling back to a simple rule when no
        noise scale is given.
      stderr: the standard error of the noise scale given (``b_noise`` or
        ``b_simple``), >= 0; gives ``lr_range``, the rule's lr at the noise scale ± one
        standard error (a lower end at or below 0 is read as the limit of no noise).

    Every number is a single value (one recommendation per call): an array, a string or
    a bool raises ``ValueError`` naming the argument.

    Returns:
      A :class:`Recommendation` (``print`` it for a table, ``.as_dict()`` for JSON).

    Example:
      >>> r = recommend("adamw", 3e-4, 256, 1024, b_simple=2000, weight_decay=0.1)
      >>> round(r.new_lr / 3e-4, 4), round(r.peak_batch, 2)  # past the peak: lr falls
      (0.7408, 117.65)
      >>> r = recommend("adamw", 3e-4, 256, 1024, b_simple=2000, stderr=500)
      >>> [round(x / 3e-4, 3) for x in r.lr_range]
      [0.728, 0.759]
      >>> print(r)  # doctest: +ELLIPSIS
      adamw: batch 256 -> 1024, noise scale 2000 ± 500
      ...
      Each recommended value is the centre of a small sweep, ...

    References:
      Su, https://kexue.fm/archives/10542, https://kexue.fm/archives/11301,
      https://kexue.fm/archives/11459; McCandlish et al. 2018, arXiv 1812.06162;
      Marek et al. 2025, arXiv 2507.07101.
    """
    v.check_choice("optimizer", optimizer, FAMILIES)
    family = RULES[optimizer]
    # one recommendation: every number is a single value, named when it is not (NumPy's
    # "only 0-dimensional arrays can be converted to Python scalars" names nothing)
    if beta_noise is None:
        beta_noise = family.beta_noise
    numbers = dict(lr=lr, batch=batch, new_batch=new_batch, beta_noise=beta_noise, c=c)
    numbers |= dict(b_noise=b_noise, b_simple=b_simple, weight_decay=weight_decay)
    numbers |= dict(beta1=beta1, beta2=beta2, steps=steps, stderr=stderr)
    optional = ("b_noise", "b_simple", "weight_decay", "beta1", "beta2", "steps", "stderr")
    for name, value in numbers.items():
        if not (value is None and name in optional):
            v.single(name, value)
    strict = v.flag("strict", strict)
    v.finite_positive("lr", lr)
    v.finite_positive("batch", batch)
    v.finite_positive("new_batch", new_batch)
    for name, value in (("b_noise", b_noise), ("b_simple", b_simple)):
        if value is not None:
            v.finite_positive(name, value)
    if weight_decay is not None:
        v.nonnegative("weight_decay", weight_decay)
        v.check("weight_decay", weight_decay, 0.0, 1e308)  # finite
    if steps is not None:
        v.finite_positive("steps", steps)
    if stderr is not None:
        v.nonnegative("stderr", stderr)
        v.check("stderr", stderr, 0.0, 1e308)  # finite
        if b_noise is None and b_simple is None:
            raise ValueError(
                f"stderr={stderr!r} was given without a noise scale: it is the standard "
                "error of b_simple (or b_noise)"
            )
    v.positive("beta_noise", beta_noise)
    if not family.surge_may_vanish:
        v.finite_positive("beta_noise", beta_noise)
    v.finite_positive("c", c)
    b1 = family.beta1 if beta1 is None else beta1
    v.beta("beta1", b1)
    if beta2 is not None:
        v.beta("beta2", beta2)
    b2 = family.beta2 if beta2 is None else beta2
    lr, batch, new_batch = float(lr), float(batch), float(new_batch)
    reasons: dict[str, str] = {}
    kappa = new_batch / batch

    # --- learning rate
    needs = family.noise
    given = b_noise if needs == "b_noise" else b_simple
    other = b_simple if needs == "b_noise" else b_noise
    stand_in = ""
    if given is None and other is not None:
        given = other
        used = "B_simple" if needs == "b_noise" else "B_noise"
        stand_in = f" ({used} used as {needs}: exact if H is a multiple of I)"
    peak, has_peak, lr_range = None, False, None
    if given is None:
        if strict:
            raise ValueError(
                f"the {optimizer} rule needs a noise scale: give {needs} (or the other of "
                "b_noise/b_simple), or strict=False for the simple fallback rule"
            )
        if family.fallback == "linear":
            rule, new_lr = "linear (fallback)", bs.linear_rule(lr, batch, new_batch)
            reasons["lr"] = "fallback, no noise scale given: linear rule lr x B'/B (Goyal et al.)"
        else:
            rule, new_lr = "sqrt (fallback)", bs.sqrt_rule(lr, batch, new_batch)
            reasons["lr"] = "fallback, no noise scale given: square-root rule lr x sqrt(B'/B)"
    else:
        rule_lr = lambda noise_scale: family.lr_rule(  # noqa: E731
            lr, batch, new_batch, noise_scale, b1, beta_noise, c
        )
        new_lr, peak, has_peak, rule, reasons["lr"] = rule_lr(float(given))
        reasons["lr"] += stand_in
        if stderr is not None:
            # the no-noise limit where the lower end is not positive (every rule is
            # continuous there and keeps the lr)
            ends = [max(float(given) - float(stderr), 1e-12 * min(batch, new_batch))]
            ends.append(float(given) + float(stderr))
            lrs = [new_lr, *(rule_lr(x)[0] for x in ends)]
            lr_range = (min(lrs), max(lrs))

    # --- weight decay
    new_wd = None
    if weight_decay is not None:
        try:
            new_wd = wd.transfer_weight_decay(weight_decay, lr, new_lr, batch, new_batch)
        except ValueError:
            raise ValueError(
                f"the weight decay at new_batch={new_batch!r} (weight_decay={weight_decay!r} x "
                f"(lr/lr')(B'/B) with the recommended lr' = {new_lr:g}) is outside float64"
            ) from None
        reasons["weight_decay"] = (
            f"wd x (lr/lr') x (B'/B) = x{lr / new_lr:.3g} x {kappa:.3g}: the weights stay an "
            "average over the same examples (their EMA timescale 1/(lr*wd) updates, kept in "
            "epochs"
            + (f": {batch / (lr * weight_decay):.3g} examples" if weight_decay > 0 else "")
            + ")"
            + (" (decoupled decay; approximate for an L2 penalty)" if family.l2_note else "")
        )

    # --- betas
    new_b1 = b1
    reasons["beta1"] = family.beta1_reason(lr, b1, b2, kappa)
    new_b2 = b2
    if family.beta2_half_life:
        new_b2 = bs.beta2_by_half_life(b2, batch, new_batch)
        reasons["beta2"] = "beta2^(B'/B): keeps its half-life in examples" + (
            " (beta2 not given: 0.999 assumed)" if beta2 is None else ""
        )
    elif b2 is not None:
        reasons["beta2"] = "kept"

    # --- steps and examples
    b_crit = b_noise if b_noise is not None else b_simple
    steps_ratio = examples_ratio = new_steps = new_examples = None
    if b_crit is None:
        reasons["steps"] = "no prediction: needs a noise scale (B_crit ~ B_noise)"
    else:
        law = f"tradeoff law S=S_min(1+B_crit/B), B_crit~{b_crit:.6g}"
        try:
            steps_ratio, examples_ratio = _ratio(float(b_crit), batch, new_batch)
            if steps is not None:
                new_steps = v.result("the new steps", float(steps) * steps_ratio, {})
                new_examples = v.result("the new examples", new_steps * new_batch, {})
            reasons["steps"] = law + ("" if steps is not None else "; ratio to the current run")
        except ValueError:
            steps_ratio = examples_ratio = new_steps = new_examples = None
            reasons["steps"] = f"no prediction: the {law} leaves float64 for these inputs"

    return Recommendation(
        optimizer=optimizer,
        batch=batch,
        new_batch=new_batch,
        rule=rule,
        noise_scale=None if given is None else float(given),
        lr=lr,
        new_lr=float(new_lr),
        weight_decay=None if weight_decay is None else float(weight_decay),
        new_weight_decay=None if new_wd is None else float(new_wd),
        beta1=float(b1),
        new_beta1=float(new_b1),
        beta2=None if b2 is None else float(b2),
        new_beta2=None if new_b2 is None else float(new_b2),
        peak_batch=peak,
        has_peak=has_peak,
        steps_ratio=steps_ratio,
        examples_ratio=examples_ratio,
        steps=None if steps is None else float(steps),
        new_steps=new_steps,
        new_examples=new_examples,
        reasons=reasons,
        noise_scale_stderr=None if stderr is None or given is None else float(stderr),
        lr_range=lr_range,
    )

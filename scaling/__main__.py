"""Command line: ``python -m scaling {lr,wd,laws,noise} ...`` (``--help`` on each).

Examples::

    python -m scaling lr --optimizer adamw --lr 3e-4 --batch 256 --to 1024 \
        --b-simple 2000 --stderr 300
    python -m scaling wd --lr 3e-4 --weight-decay 0.1 --batch 256 --dataset-size 1e6
    python -m scaling laws --compute 1e20 --params 1e9 --tokens 1e11 --loss 3.0
    python -m scaling lr --optimizer muon --lr 0.02 --batch 256 --to 1024 --b-simple 2000
    python -m scaling noise train_noise.jsonl --window 50 --plot noise.png

Every subcommand prints a readable table, or JSON with ``--json``. Bad input -- a bad
number, a result outside float64, a malformed log -- prints one line on stderr and exits
with status 2 (``scaling.cli``), never a traceback. Pure Python: JAX is never imported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

from scaling import batch_size as bs
from scaling import cli, laws, noise, recommendation, weight_decay
from scaling.recommendation import fmt, format_table

PROG = "python -m scaling"


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(val) for k, val in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(val) for val in x]
    return x


def _emit(args, data, text):
    if args.json:
        print(json.dumps(_jsonable(data), indent=2, allow_nan=False))
    else:
        print(text)


# ------------------------------------------------------------------------- lr


_RULES = ("sqrt", "linear", "sgd", "sgdm", "sign", "adam", "muon", "sde")


def _row(compute):
    """(lr, note) from ``compute()``, or (None, why) when the rule cannot apply here."""
    try:
        return compute()
    except ValueError as e:
        return None, f"invalid: {e}"


def _rule_rows(a, b_noise, b_simple):
    """All batch-size rules that apply to the inputs: (name, lr or None, note)."""
    b1 = a.beta1 if a.beta1 is not None else 0.9
    rows = {
        "sqrt": _row(lambda: (bs.sqrt_rule(a.lr, a.batch, a.to), "lr x sqrt(B'/B)")),
        "linear": _row(lambda: (bs.linear_rule(a.lr, a.batch, a.to), "lr x B'/B")),
    }
    bn = b_noise if b_noise is not None else b_simple
    if bn is not None:
        rows["sgd"] = _row(
            lambda: (bs.sgd_transfer(a.lr, a.batch, a.to, bn).lr, f"B_noise={bn:.6g}")
        )
        rows["sgdm"] = _row(
            lambda: (
                bs.sgd_transfer(a.lr, a.batch, a.to, bn, b1).lr,
                f"B_noise={bn:.6g}, beta1={b1:g}",
            )
        )
    else:
        rows["sgd"] = rows["sgdm"] = (None, "needs --b-noise or --b-simple")
    bsim = b_simple if b_simple is not None else b_noise
    if bsim is not None:

        def sign():
            bn = 1.0 if a.beta_noise is None else a.beta_noise
            r = bs.sign_transfer(a.lr, a.batch, a.to, bsim, bn, a.c)
            return r.lr, f"peak at B={fmt(r.peak_batch)}" if r.has_peak else "no peak"

        def adam():
            r = bs.adam_transfer(a.lr, a.batch, a.to, bsim, b1)
            return r.lr, f"beta1={b1:g}, " + (
                f"lr falls beyond B={r.peak_batch:.6g}" if r.has_peak else "no peak"
            )

        def muon():
            bn = bs.MUON_BETA_NOISE if a.beta_noise is None else a.beta_noise
            r = bs.muon_transfer(a.lr, a.batch, a.to, bsim, bn)
            if bn == math.inf:
                return r.lr, "lr x sqrt((1+Bs/B)/(1+Bs/B'))"
            return r.lr, f"beta_noise={bn:g}: " + (
                f"peak at B={r.peak_batch:.3g}" if r.has_peak else "no peak"
            )

        rows["sign"], rows["adam"], rows["muon"] = _row(sign), _row(adam), _row(muon)
    else:
        rows["sign"] = rows["adam"] = rows["muon"] = (None, "needs --b-simple or --b-noise")
    b2 = a.beta2 if a.beta2 is not None else 0.999

    def sde():
        kappa = a.to / a.batch
        if not 0 < kappa < math.inf:
            raise ValueError(f"--to/--batch = {kappa:g} is outside float64")
        r = bs.adam_sde_rule(a.lr, b1, b2, 1e-8, kappa)
        return r.lr, f"Malladi: beta1={r.beta1:.6g}, beta2={r.beta2:.6g}"

    rows["sde"] = _row(sde)
    return rows


def _cmd_lr(a):
    b_noise, b_simple = a.b_noise, a.b_simple
    rows = _rule_rows(a, b_noise, b_simple)
    if a.rule is not None:
        value, note = rows[a.rule]
        if value is None:
            raise ValueError(f"rule {a.rule!r}: {note}")
        _emit(
            a,
            {"rule": a.rule, "lr": value, "note": note},
            format_table(["rule", "lr", "note"], [[a.rule, fmt(value, 3), note]]),
        )
        return
    rec = recommendation.recommend(
        a.optimizer,
        a.lr,
        a.batch,
        a.to,
        b_noise=b_noise,
        b_simple=b_simple,
        weight_decay=a.weight_decay,
        beta1=a.beta1,
        beta2=a.beta2,
        beta_noise=a.beta_noise,
        c=a.c,
        steps=a.steps,
        strict=a.strict,
        stderr=a.stderr,
    )
    data = {
        "recommendation": rec.as_dict(),
        "rules": {k: {"lr": val, "note": note} for k, (val, note) in rows.items()},
    }
    table = format_table(
        ["rule", "lr", "note"],
        [[k, fmt(val, 3), note] for k, (val, note) in rows.items()],
        title=f"learning-rate rules, batch {fmt(a.batch)} -> {fmt(a.to)}",
    )
    _emit(a, data, f"{rec}\n\n{table}")


# ------------------------------------------------------------------------- wd


def _cmd_wd(a):
    rows, data = [], {}

    def add(key, value, note):
        data[key] = value
        rows.append([key, fmt(value), note])

    add("tau_iter", weight_decay.ema_timescale(a.lr, a.weight_decay), "1/(lr*wd) steps")
    if a.dataset_size is not None:
        if a.batch is None:
            raise ValueError("--dataset-size needs --batch")
        add(
            "tau_epochs",
            weight_decay.ema_timescale_epochs(a.lr, a.weight_decay, a.batch, a.dataset_size),
            "tau_iter*B/N (Power Lines' tau when B, N are tokens)",
        )
    add(
        "equilibrium_rms",
        weight_decay.equilibrium_weight_rms(a.lr, a.weight_decay),
        "sqrt(lr/(2 wd)) under AdamW",
    )
    add(
        "independent_decay",
        weight_decay.coupled_to_independent(a.weight_decay, a.lr),
        "lr_peak*wd (decay not multiplied by the lr)",
    )
    lion = weight_decay.lion_from_adamw(a.lr, a.weight_decay, a.lion_k)
    add("lion_lr", lion.lr, f"AdamW -> Lion: lr/{a.lion_k:g}")
    add("lion_weight_decay", lion.weight_decay, f"AdamW -> Lion: wd x {a.lion_k:g}")
    if a.to is not None:
        if a.batch is None:
            raise ValueError("--to needs --batch")
        flags = (
            f"--lr {a.lr:g}, --weight-decay {a.weight_decay:g}, --batch {a.batch:g}, --to {a.to:g}"
        )
        if a.new_lr is not None:
            new_lr, note = a.new_lr, ""
            flags += f", --new-lr {a.new_lr:g}"
        else:
            try:
                new_lr = bs.sqrt_rule(a.lr, a.batch, a.to)
            except ValueError:
                raise ValueError(
                    f"the new lr by the sqrt rule is outside float64 for {flags}; give --new-lr"
                ) from None
            note = " (new lr by the sqrt rule; give --new-lr)"
            flags += f" (new lr {new_lr:g} by the sqrt rule)"
        add("new_lr", new_lr, "given" if a.new_lr is not None else "sqrt rule")
        try:
            new_wd = weight_decay.transfer_weight_decay(a.weight_decay, a.lr, new_lr, a.batch, a.to)
        except ValueError:
            raise ValueError(
                f"the new weight decay wd x (lr/lr')(B'/B) is outside float64 for {flags}"
            ) from None
        add("new_weight_decay", new_wd, "wd x (lr/lr')(B'/B): same timescale in epochs" + note)
    _emit(
        a,
        data,
        format_table(
            ["quantity", "value", "note"],
            rows,
            title=f"weight decay {fmt(a.weight_decay)} at lr {fmt(a.lr)}",
        ),
    )


# ----------------------------------------------------------------------- laws


def _cmd_laws(a):
    if a.compute is None and a.tokens is None and a.loss is None:
        raise ValueError("give --compute, --params with --tokens, and/or --loss")
    rows, data = [], {}
    if a.compute is not None:
        r = laws.deepseek_law(a.compute)
        data["deepseek"] = r._asdict()
        rows.append(["DeepSeek LLM", fmt(r.lr), fmt(r.batch_tokens), f"C={a.compute:g} FLOPs"])
    if a.tokens is not None or a.params is not None:
        if a.tokens is None or a.params is None:
            raise ValueError("the Step Law needs both --params and --tokens")
        r = laws.step_law(a.params, a.tokens)
        data["step_law"] = r._asdict()
        rows.append(["Step Law", fmt(r.lr), fmt(r.batch_tokens), f"N={a.params:g}, D={a.tokens:g}"])
    if a.loss is not None:
        b = laws.kaplan_critical_batch(a.loss)
        data["kaplan_b_crit"] = b
        rows.append(["Kaplan B_crit", "-", fmt(b), f"L={a.loss:g} nats"])
    _emit(a, data, format_table(["law", "lr", "batch (tokens)", "inputs"], rows))


# ---------------------------------------------------------------------- noise


def _cmd_noise(a):
    if a.plot is not None:
        _require_matplotlib()  # before reading: fail in a second, not after the work
    try:
        if a.log == "-":
            entries = noise.read_noise_log(sys.stdin, a.ema)
        else:
            with open(a.log, encoding="utf-8") as f:
                entries = noise.read_noise_log(f, a.ema)
    except UnicodeDecodeError as e:
        raise ValueError(f"{a.log}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    window = a.window if a.window is not None else noise.default_window(len(entries))
    current = noise.settled_noise_scale(entries, window)
    windows = noise.window_estimates(entries, window)
    last = entries[-1]
    data = _noise_json(current, entries, a.ema)

    text = f"noise scale from {a.log} ({len(entries)} updates)\n{current.summary()}"
    picks = {"start": windows[0], "middle": windows[len(windows) // 2], "last": windows[-1]}
    if len(windows) < 3:
        picks.pop("middle")
    if len(windows) < 2:
        picks.pop("start")
    rows = [
        [
            name,
            f"{w.first_step}-{w.last_step}",
            str(w.count),
            noise.format_b_simple(w.b_simple, w.stderr),
        ]
        for name, w in picks.items()
    ]
    text += "\n\n" + format_table(
        ["window", "steps", "updates", "B_simple ± s.e."],
        rows,
        title=f"trajectory: B_simple over windows of {window} updates (ratio of means)",
    )
    every = a.every if a.every is not None else max(1, len(entries) // 10)
    shown = [e for i, e in enumerate(entries) if i % every == 0]
    if shown[-1] is not entries[-1]:
        shown.append(entries[-1])
    rows = [[str(e.step), _b_cell(e.b_simple_raw), _b_cell(e.b_simple_ema)] for e in shown]
    text += "\n\n" + format_table(
        ["step", "b_simple (one update)", "b_simple_ema"],
        rows,
        title=f"secondary: the EMA over the run (decay {a.ema:g}, weighted by the whole "
        "history; not the current value)",
    )
    text += f"\nb_simple_ema = {_b_cell(last.b_simple_ema)} (secondary)"
    if not (_measured(last.b_simple_ema) and current.measurable):
        text += _NOT_MEASURED
    steps = [e.step for e in entries]
    gaps = [(x, y) for x, y in itertools.pairwise(steps) if y - x > 1]
    if gaps:
        big = max(gaps, key=lambda p: p[1] - p[0])
        text += (
            f"\nnote: {len(gaps)} gap(s) in the logged steps (largest {big[0]} -> {big[1]});"
            " windows and EMAs count logged updates"
        )
    data["windows"] = [w._asdict() for w in windows]
    data["entries"] = [e._asdict() for e in shown]
    data["gaps"] = len(gaps)
    if a.plot is not None:
        if _plot_noise(entries, windows, current, a.plot, a.log):
            text += f"\nplot: {a.plot}"
            data["plot"] = a.plot
        else:
            text += (
                f"\nplot: nothing to plot (no step or window has a measurable B_simple, "
                f"finite and > 0): {a.plot} not written"
            )
            data["plot"] = None
    _emit(a, data, text)


#: ``--json`` keys of ``python -m scaling noise`` (the schema tests check them).
NOISE_JSON_KEYS = (
    "b_simple", "stderr", "text", "window", "settled", "precise", "stable", "reason",
    "previous", "previous_stderr", "b_simple_ema", "g2_ema", "trace_sigma_ema", "ema",
    "steps", "last_step", "windows", "entries", "gaps",
)  # fmt: skip


def _noise_json(current, entries, ema) -> dict:
    """The current value first (``b_simple`` is it; ``None`` when not measurable), then
    the secondary EMA and the log's size."""
    last = entries[-1]
    measurable = current.measurable
    return {
        "b_simple": current.b_simple if measurable else None,
        "stderr": current.stderr if measurable else None,
        "text": current.text(),
        "window": current.window,
        "settled": current.settled,
        "precise": current.precise,
        "stable": current.stable,
        "reason": current.reason,
        "previous": current.previous if _measured(current.previous) else None,
        "previous_stderr": current.previous_stderr if _measured(current.previous) else None,
        "b_simple_ema": last.b_simple_ema if _measured(last.b_simple_ema) else None,
        "g2_ema": last.g2_ema,
        "trace_sigma_ema": last.trace_sigma_ema,
        "ema": ema,
        "steps": len(entries),
        "last_step": last.step,
    }


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        raise ValueError(f"--plot needs matplotlib: {cli.PLOT_HINT}") from None


def _plot_noise(entries, windows, settled, path, title) -> bool:
    """Draws the trajectory to ``path``; False (nothing written) when no value is > 0.

    A log scale cannot show a B_simple <= 0, and an empty figure would only make
    matplotlib warn that its legend has no entries.
    """
    positive = lambda x: math.isfinite(x) and x > 0
    finite = [(e.step, e.b_simple_raw) for e in entries if positive(e.b_simple_raw)]
    ema = [(e.step, e.b_simple_ema) for e in entries if positive(e.b_simple_ema)]
    good = [w for w in windows if positive(w.b_simple)]
    if not (finite or ema or good or positive(settled.b_simple)):
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if finite:
        ax.scatter(
            *zip(*finite, strict=True), s=4, alpha=0.3, color="0.6", label="per-step ratio (raw)"
        )
    if ema:
        ax.plot(*zip(*ema, strict=True), color="tab:blue", lw=1, alpha=0.6, label="EMA (secondary)")
    if good:
        ax.errorbar(
            [(w.first_step + w.last_step) / 2 for w in good],
            [w.b_simple for w in good],
            yerr=[2 * min(w.stderr, w.b_simple * 0.999) for w in good],
            fmt="o",
            color="tab:orange",
            capsize=3,
            label="windows: ratio of means ± 2 s.e.",
        )
    if positive(settled.b_simple):
        state = "settled" if settled.settled else "not settled"
        ax.axhline(
            settled.b_simple,
            color="tab:green",
            ls="--",
            label=f"current {settled.text()} ({state})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple")
    ax.set_title(f"noise scale: {title}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


_NOT_MEASURED = (
    "\n'-': not measurable: the averaged |G|^2 is <= 0 (the noise swamps the signal), the "
    "averaged tr(Sigma) or per-step ratio is < 0, or both averages are 0; average over more "
    "updates or measure with other batch sizes"
)


def _measured(x) -> bool:
    return x is not None and math.isfinite(x) and x >= 0


def _b_cell(x):
    # inf and nan are the documented "noise swamps the signal" / "no data" answers of
    # noise_ema_read, and a negative ratio estimates nothing; a table shows them all as
    # '-' and says why once.
    return f"{x:.3g}" if _measured(x) else "-"


# --------------------------------------------------------------------- parser


def _beta_noise(text: str) -> float:
    """A number > 0, or ``inf`` (no surge)."""
    if text.strip().lower() in ("inf", "infinity"):
        return math.inf
    return cli.positive_float(text)


_beta_noise.__name__ = "number"


_positive, _nonneg, _beta, _count = (
    cli.positive_float,
    cli.nonnegative_float,
    cli.unit_interval,
    cli.positive_int,
)


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog=PROG, description="Learning rate and weight decay when the batch size changes."
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)

    def common(q):
        q.add_argument("--json", action="store_true", help="machine-readable JSON output")

    q = sub.add_parser(
        "lr",
        help="learning-rate rules and the recommendation at a new batch",
        description="Learning-rate rules and the full recommendation "
        "(lr, weight decay, betas, steps) at a new batch size.",
    )
    q.add_argument("--optimizer", required=True, choices=recommendation.FAMILIES)
    q.add_argument("--lr", required=True, type=_positive, help="tuned learning rate")
    q.add_argument("--batch", required=True, type=_positive, help="current batch size")
    q.add_argument("--to", required=True, type=_positive, help="new batch size")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--b-noise", type=_positive, help="B_noise (SGD's rule)")
    g.add_argument("--b-simple", type=_positive, help="B_simple (Adam / sign rules)")
    q.add_argument(
        "--stderr",
        type=_nonneg,
        help="standard error of --b-simple / --b-noise (python -m scaling noise prints "
        "it): the lr range from the noise scale ± 1 s.e.",
    )
    q.add_argument("--beta1", type=_beta, help="momentum / Adam beta1")
    q.add_argument("--beta2", type=_beta, help="Adam beta2")
    q.add_argument("--weight-decay", type=_nonneg, help="decoupled weight decay")
    q.add_argument("--steps", type=_positive, help="steps of the current run (for predictions)")
    q.add_argument(
        "--beta-noise",
        type=_beta_noise,
        default=None,
        help="beta_noise of the surge (lion/tiger default 1: no peak; muon default: the "
        "transfer check's fit, scaling.MUON_BETA_NOISE; inf: Su's rule)",
    )
    q.add_argument(
        "--c",
        type=_positive,
        default=bs.SU_C,
        help="constant of the sign form: pi/2 (default) or 1 (mean field)",
    )
    q.add_argument(
        "--rule",
        choices=_RULES,
        help="print only this rule (error if it needs a missing noise scale)",
    )
    q.add_argument(
        "--strict",
        action="store_true",
        help="error instead of the simple fallback when no noise scale is given",
    )
    common(q)
    q.set_defaults(func=_cmd_lr)

    q = sub.add_parser(
        "wd",
        help="weight decay as an EMA timescale",
        description="EMA timescale, equilibrium RMS, independent decay, "
        "AdamW->Lion transfer and the weight decay at a new batch size.",
    )
    q.add_argument("--lr", required=True, type=_positive)
    q.add_argument("--weight-decay", required=True, type=_positive)
    q.add_argument("--batch", type=_positive, help="current batch size")
    q.add_argument("--to", type=_positive, help="new batch size")
    q.add_argument("--new-lr", type=_positive, help="lr at the new batch (default: sqrt rule)")
    q.add_argument("--dataset-size", type=_positive, help="examples (tokens) per epoch")
    q.add_argument("--lion-k", type=_positive, default=3.0, help="AdamW->Lion factor in [3, 10]")
    common(q)
    q.set_defaults(func=_cmd_wd)

    q = sub.add_parser(
        "laws",
        help="published fitted laws (DeepSeek, Step Law, Kaplan)",
        description="Learning rate and batch size from published fits.",
    )
    q.add_argument("--compute", type=_positive, help="training FLOPs (DeepSeek LLM)")
    q.add_argument("--params", type=_positive, help="non-vocabulary parameters (Step Law)")
    q.add_argument("--tokens", type=_positive, help="training tokens (Step Law)")
    q.add_argument("--loss", type=_positive, help="target loss in nats (Kaplan B_crit)")
    common(q)
    q.set_defaults(func=_cmd_laws)

    q = sub.add_parser(
        "noise",
        help="average a JSON-lines log of noise statistics",
        description="Reads a JSON-lines log (one object per line with 'step' "
        "and either 'g2' and 'trace_sigma' or 'b_simple') and prints the current "
        "B_simple (ratio of means over the last window) with its standard error and "
        "whether it has settled (stable and precise), its trajectory over windows, and "
        "the EMA over the run (secondary).",
    )
    q.add_argument("log", help="path of the log, or - for stdin")
    q.add_argument(
        "--ema", type=_beta, default=0.99, help="decay of the secondary EMA (default 0.99)"
    )
    q.add_argument("--every", type=_count, help="print every N-th entry (default: ~10 rows)")
    q.add_argument(
        "--window",
        type=cli.number(2, integer=True),
        default=None,
        help="updates per window of the current value and the trajectory (default: a "
        "sixth of the log, 10 to 100, as the demo and ox.current_noise_scale)",
    )
    q.add_argument("--plot", metavar="PNG", help="draw the trajectory to this PNG file")
    common(q)
    q.set_defaults(func=_cmd_noise)
    return p


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (0, or 2 on bad input)."""
    parser = build_parser()

    def body():
        args = parser.parse_args(argv)
        args.func(args)

    return cli.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())

"""What the demo prints and draws: the current noise scale, recommendations at other batch
sizes (each with the lr range from B_simple ± 1 s.e.), the loss plot."""

from __future__ import annotations

import math
from typing import Any

from optax_ext.demo.loop import History
from optax_ext.demo.recipes import RECIPES
from scaling import cli
from scaling.recommendation import SWEEP_NOTE

__all__ = [
    "PLOT_HINT",
    "describe_noise",
    "print_recommendations",
    "recommendations",
    "require_matplotlib",
    "save_plot",
]

PLOT_HINT = cli.PLOT_HINT  # how to get matplotlib, as the README says


def recommendations(history: History, args: Any) -> list[dict[str, Any]]:
    """``scaling.recommend`` at other batch sizes from the measured noise scale."""
    from scaling import recommend

    recipe = RECIPES[args.optimizer]
    lr = recipe.lr if args.lr is None else args.lr
    batch = args.batch_size * args.accumulation_steps
    current = history.current
    b_simple = float(current.b_simple)
    if not (math.isfinite(b_simple) and b_simple > 0):
        return []
    stderr = float(current.stderr) if math.isfinite(current.stderr) else None
    rows = []
    for factor in (0.5, 2, 4, 8, 16):
        r = recommend(
            recipe.family,
            lr,
            batch,
            batch * factor,
            b_simple=b_simple,
            weight_decay=recipe.weight_decay or None,
            beta1=recipe.beta1 or None,
            steps=args.steps,
            stderr=stderr,
        )
        rows.append(
            {
                "batch": r.new_batch,
                "lr": r.new_lr,
                "lr_range": r.lr_range,
                "weight_decay": r.new_weight_decay,
                "steps": r.new_steps,
                "examples": r.new_examples,
                "reason": r.reasons["lr"],
            }
        )
    return rows


def describe_noise(noise: Any) -> str:
    """The line ``python -m scaling noise`` prints for the demo's log, word for word:
    ``current B_simple = 64 ± 59 windows (last 50 updates): NOT settled: ...``."""
    return noise.summary(unit="windows")


def print_recommendations(rows: list[dict[str, Any]], history: History, args: Any) -> None:
    batch = args.batch_size * args.accumulation_steps
    print(f"\nnoise scale at batch {batch}: {describe_noise(history.current)}")
    if history.noise is not None:
        ema = float(history.noise.b_simple)
        print(f"  (secondary: the measurement's EMA, weighted by the run's history: {ema:.3g})")
    print(f"recommended {args.optimizer} settings at other batch sizes:")
    if not rows:
        print("  (no measurable estimate yet: train longer)")
        return
    print(
        f"  {'batch':>7}  {'lr':>9}  {'lr range (±1 s.e.)':>19}  {'decay':>9}  {'steps':>7}  "
        f"{'examples':>9}  reason"
    )
    for r in rows:
        wd = "-" if r["weight_decay"] is None else f"{r['weight_decay']:.3g}"
        steps = "-" if r["steps"] is None else f"{r['steps']:,.0f}"
        examples = "-" if r["examples"] is None else f"{r['examples']:,.0f}"
        low_high = r.get("lr_range")
        span = "-" if low_high is None else f"{low_high[0]:.3g} to {low_high[1]:.3g}"
        print(
            f"  {r['batch']:>7,.0f}  {r['lr']:>9.3g}  {span:>19}  {wd:>9}  {steps:>7}  "
            f"{examples:>9}  {r['reason']}"
        )
    print(f"  {SWEEP_NOTE}")


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or ``ImportError`` with :data:`PLOT_HINT`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(f"--plot needs matplotlib: {PLOT_HINT}") from None
    return plt


def save_plot(history: History, path: str, title: str) -> None:
    """The training loss per update, and the measured B_simple on a second axis."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.steps, history.losses, lw=1, label="train loss")
    ax.axhline(history.uniform_loss, color="grey", ls=":", label="uniform guess")
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = ax.get_lines()
    if history.b_simple:
        twin = ax.twinx()
        label = "B_simple, EMA (secondary)"
        handles += twin.plot(history.steps, history.b_simple, color="tab:orange", lw=1, label=label)
        current = history.current
        if current is not None and current.measurable and current.b_simple > 0:
            # the value recommendations use: the last window's ratio of means
            b = current.b_simple
            se = current.stderr if math.isfinite(current.stderr) else b
            low = min(2 * se, 0.95 * b)  # a log axis: the lower bar stops above zero
            bar = twin.errorbar(
                [history.steps[-1]],
                [b],
                yerr=[[low], [2 * se]],
                fmt="o",
                color="tab:red",
                capsize=3,
                label=f"current (last {current.window} updates) ± 2 s.e.",
            )
            handles.append(bar)
        twin.set_ylabel("B_simple (windows)", color="tab:orange")
        twin.set_yscale("log")
    ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

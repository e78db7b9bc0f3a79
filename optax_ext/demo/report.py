"""What the demo prints and draws: recommendations at other batch sizes, the loss plot."""

from __future__ import annotations

import math
from typing import Any

from optax_ext.demo.loop import History
from optax_ext.demo.recipes import RECIPES

__all__ = [
    "PLOT_HINT",
    "describe_noise",
    "print_recommendations",
    "recommendations",
    "require_matplotlib",
    "save_plot",
]

#: How to get matplotlib, as the README says.
PLOT_HINT = 'pip install matplotlib (in a checkout: pip install -e ".[notebooks]")'


def recommendations(history: History, args: Any) -> list[dict[str, Any]]:
    """``scaling.recommend`` at other batch sizes from the measured noise scale."""
    from scaling import recommend

    recipe = RECIPES[args.optimizer]
    lr = recipe.lr if args.lr is None else args.lr
    batch = args.batch_size * args.accumulation_steps
    b_simple = float(history.current.b_simple)
    if not (math.isfinite(b_simple) and b_simple > 0):
        return []
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
        )
        rows.append(
            {
                "batch": r.new_batch,
                "lr": r.new_lr,
                "weight_decay": r.new_weight_decay,
                "steps": r.new_steps,
                "examples": r.new_examples,
                "reason": r.reasons["lr"],
            }
        )
    return rows


def describe_noise(noise: Any) -> str:
    """``B_simple ~ 138 ± 21 windows over the last 50 updates (settled)``."""
    b, se = float(noise.b_simple), float(noise.stderr)
    state = "settled" if bool(noise.settled) else "NOT settled: still moving or too noisy"
    return (
        f"B_simple ~ {b:,.0f} ± {se:,.0f} windows over the last {int(noise.window)} "
        f"updates ({state})"
    )


def print_recommendations(rows: list[dict[str, Any]], history: History, args: Any) -> None:
    batch = args.batch_size * args.accumulation_steps
    print(
        f"\nmeasured noise scale {describe_noise(history.current)} at batch {batch}; "
        f"recommended {args.optimizer} settings at other batch sizes:"
    )
    if not rows:
        print("  (no finite estimate yet: train longer)")
        return
    print(f"  {'batch':>7}  {'lr':>9}  {'decay':>9}  {'steps':>7}  {'examples':>9}  reason")
    for r in rows:
        wd = "-" if r["weight_decay"] is None else f"{r['weight_decay']:.3g}"
        steps = "-" if r["steps"] is None else f"{r['steps']:,.0f}"
        examples = "-" if r["examples"] is None else f"{r['examples']:,.0f}"
        print(
            f"  {r['batch']:>7,.0f}  {r['lr']:>9.3g}  {wd:>9}  {steps:>7}  {examples:>9}  "
            f"{r['reason']}"
        )


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
        window = int(history.current.window) if history.current is not None else None
        label = "B_simple" + (f" (EMA over {window} updates)" if window else "")
        handles += twin.plot(history.steps, history.b_simple, color="tab:orange", lw=1, label=label)
        if history.current is not None:  # the value recommendations use, at the last update
            b, se = float(history.current.b_simple), float(history.current.stderr)
            low = min(2 * se, 0.95 * b)  # a log axis: the lower bar stops above zero
            bar = twin.errorbar(
                [history.steps[-1]],
                [b],
                yerr=[[low], [2 * se]],
                fmt="o",
                color="tab:red",
                capsize=3,
                label="current value ± 2 s.e.",
            )
            handles.append(bar)
        twin.set_ylabel("B_simple (windows)", color="tab:orange")
        twin.set_yscale("log")
    ax.legend(handles=handles, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

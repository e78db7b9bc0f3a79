"""Quality: final held-out loss of each optimizer on the demo task, and pure-bf16 training.

1. Every optimizer of ``optax_ext.demo.RECIPES`` trains the demo model (a character-level
   Flax transformer on the docstrings of Python's standard library) for the same number
   of updates from the same initialisation and batches, at its recommended learning rate
   times 1/4, 1/2, 1, 2 and 4, extended by doubling (or halving) while the best rate is
   at an end of the sweep; the table gives the held-out loss of each, which rate was best
   for each optimizer (flagged if it is still an end) and which optimizer won.
2. Su's claim that sign updates (Tiger, Lion) train in pure bf16 — params and optimizer
   state in bf16, no float32 master copy: final loss against the float32 run, next to
   AdamW in pure bf16::

    python benchmarks/bench_quality.py                 # 300 updates each (~20 min on 2 cores)
    python benchmarks/bench_quality.py --steps 30      # a quick check

Prints two tables and writes benchmarks/results/quality.json.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
from benchlib import machine, table, write_json

from optax_ext import demo

FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MAX_EXTEND = 4  # extra doublings or halvings while the best rate is at an end
BF16 = ("tiger", "lion", "adamw")


def run(name, lr, steps, batch, dtype=None):
    h = demo.train(
        steps=steps,
        batch_size=batch,
        seq_len=64,
        optimizer=name,
        learning_rate=lr,
        measure_noise=False,
        param_dtype=dtype,
        progress=False,
    )
    return {
        "optimizer": name,
        "lr": lr,
        "dtype": "bfloat16" if dtype else "float32",
        "valid_loss": h.valid_loss_end,
        "train_loss": sum(h.losses[-10:]) / 10,
        "seconds": h.seconds,
    }


def sweep_lr(name, base_lr, steps, batch):
    """Runs ``base_lr`` x FACTORS, then keeps doubling (or halving) while the best is at
    the end of the sweep and improving, up to MAX_EXTEND more runs: the best rate ends
    bracketed by worse ones on both sides, or is flagged as an edge."""
    rows = {}

    def at(f):
        if f not in rows:
            rows[f] = run(name, base_lr * f, steps, batch) | {"factor": f}
            print(f"  {name} lr={base_lr * f:.3g}: {rows[f]['valid_loss']:.4f}", flush=True)
        return rows[f]

    best = lambda: min(rows, key=lambda f: rows[f]["valid_loss"])
    for f in FACTORS:
        at(f)
    for _ in range(MAX_EXTEND):
        if best() == max(rows):
            at(best() * 2)
        elif best() == min(rows):
            at(best() / 2)
        else:
            break
    for f, r in rows.items():
        r["best_lr_for_optimizer"] = f == best()
        r["best_at_edge"] = f == best() and f in (min(rows), max(rows))
    return [rows[f] for f in sorted(rows)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    sweep = []
    for name, recipe in demo.RECIPES.items():
        sweep += sweep_lr(name, recipe.lr, args.steps, args.batch_size)
    best = {r["optimizer"]: r for r in sweep if r["best_lr_for_optimizer"]}
    winner = min(best.values(), key=lambda r: r["valid_loss"])["optimizer"]
    bf16 = []
    for name in BF16:
        lr = best[name]["lr"]
        low = run(name, lr, args.steps, args.batch_size, jnp.bfloat16)
        bf16.append(
            {
                "optimizer": name,
                "lr": lr,
                "float32": best[name]["valid_loss"],
                "bfloat16": low["valid_loss"],
                "gap": low["valid_loss"] - best[name]["valid_loss"],
            }
        )
        print(f"  {name} bf16: {low['valid_loss']:.4f}", flush=True)
    f4 = lambda x: f"{x:.4f}"
    print(
        f"\nheld-out loss after {args.steps} updates of batch {args.batch_size} "
        f"(lower is better); best: {winner}"
    )
    print(
        table(
            sweep,
            [
                ("optimizer", "optimizer", str),
                ("lr", "lr", lambda x: f"{x:.3g}"),
                ("valid_loss", "held-out", f4),
                ("train_loss", "train (last 10)", f4),
                ("factor", "x recipe", lambda x: f"{x:g}"),
                ("best_lr_for_optimizer", "best lr", lambda b: "*" if b else ""),
                ("best_at_edge", "at an edge", lambda b: "yes" if b else ""),
            ],
        )
    )
    print("\npure bf16 (params and state in bf16, no float32 copy) at each one's best lr")
    print(
        table(
            bf16,
            [
                ("optimizer", "optimizer", str),
                ("lr", "lr", lambda x: f"{x:.3g}"),
                ("float32", "float32", f4),
                ("bfloat16", "bfloat16", f4),
                ("gap", "bf16 - f32", lambda x: f"{x:+.4f}"),
            ],
        )
    )
    results = {
        "machine": machine(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sweep": sweep,
        "winner": winner,
        "bf16": bf16,
    }
    print("wrote", write_json("quality", results))


if __name__ == "__main__":
    main()

"""Does the batch-size recommendation hold? A direct check on the demo task.

1. Measure B_simple while training at batch B (``demo.train(measure_noise=True)``, the
   EMA's value at the end of the run: the noise scale grows during training, and the
   late value is the one the transfer is about).
2. For AdamW, Tiger and Muon: sweep the learning rate at B, 4B and 16B (a ×√2 grid,
   extended past an edge until the best is inside it, two data seeds, the same number
   of updates at every batch), fit the best lr of each batch
   (a parabola in log lr through the grid minimum), anchor at B, and ask
   ``scaling.recommend`` for 4B and 16B. Reported: measured best lr / recommended lr,
   beside the square-root and linear rules' ratios.
3. Steps to a target loss for AdamW over batches 2 … 64 (the lr at each batch: the best
   of three around the Adam-curve transfer of the anchor), fitted with
   ``scaling.fit_tradeoff`` to McCandlish's law; its B_crit is compared with the
   measured B_simple.

All runs of one optimizer and batch are one ``vmap`` over (lr, seed) inside one
``lax.scan``, so each compiles once.

    python benchmarks/bench_transfer.py            # about 5 minutes on 2 CPU cores
    python benchmarks/bench_transfer.py --quick    # a smoke run

Writes benchmarks/results/transfer.json and transfer.png.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from benchlib import machine, write_json

import optax_ext as ox
import scaling
from optax_ext import demo

SEQ, WIDTH = 32, 32
#: optimizer -> (family for scaling.recommend, factory of lr, centre of the lr grid at B)
OPTIMIZERS = {
    "adamw": ("adamw", lambda lr: optax.adamw(lr, weight_decay=0.01), 1.6e-2),
    "tiger": ("tiger", lambda lr: ox.tiger(lr, weight_decay=0.01), 8e-3),
    "muon": ("muon", lambda lr: ox.muon(lr), 2e-2),
}


def setup():
    data = demo.CharData.from_text(demo.load_corpus())
    model = demo.CharTransformer(vocab=len(data.vocab), width=WIDTH, layers=1, max_len=SEQ)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
    valid = jnp.asarray(data.valid_batch(128, SEQ))
    return data, model, params0, valid


def stream(data, batch, steps, seeds):
    """(seed, step, batch, SEQ + 1) windows: the same data for every lr of a seed."""
    take = lambda seed: list(itertools.islice(data.batches(batch, SEQ, seed), steps))
    return jnp.asarray(np.stack([np.stack(take(s)) for s in seeds]))


def train_many(make_tx, model, params0, valid, lrs, windows, *, curve=False):
    """Held-out loss after training on ``windows`` (seed, step, B, SEQ+1) for each lr and
    seed: an (lr, seed) array; with ``curve`` the held-out loss after every step too."""

    def loss_fn(params, batch):
        return demo.lm_loss(params, model.apply, batch)

    def one(lr, batches):
        tx = make_tx(lr)

        def step(carry, batch):
            params, state = carry
            grads = jax.grad(loss_fn)(params, batch)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), (loss_fn(params, valid) if curve else None)

        (params, _), losses = jax.lax.scan(step, (params0, tx.init(params0)), batches)
        return losses if curve else loss_fn(params, valid)

    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return np.asarray(run(jnp.asarray(lrs, jnp.float32), windows))


def best_lr(lrs, losses):
    """The minimum of a parabola in log(lr) through the grid's best point and its two
    neighbours; ``None`` when the best point is at the grid's edge."""
    i = int(np.nanargmin(losses))
    if i in (0, len(lrs) - 1) or not np.all(np.isfinite(losses[i - 1 : i + 2])):
        return None
    x, y = np.log(lrs[i - 1 : i + 2]), losses[i - 1 : i + 2]
    a, b, _ = np.polyfit(x, y, 2)
    return float(np.exp(-b / (2 * a))) if a > 0 else float(lrs[i])


def sweep(run, lrs, extend=3, max_extensions=3):
    """Losses (lr, seed) of ``run`` over the ×√2 grid ``lrs``, extended by ``extend``
    points past an edge while the seed-mean best lies on it (each extension one more
    compiled sweep)."""
    losses = run(lrs)
    ratio = lrs[1] / lrs[0]
    for _ in range(max_extensions):
        i = int(np.nanargmin(losses.mean(axis=1)))
        if 0 < i < len(lrs) - 1:
            break
        if i == 0:
            more = lrs[0] / ratio ** np.arange(extend, 0, -1)
            lrs, losses = np.concatenate([more, lrs]), np.concatenate([run(more), losses])
        else:
            more = lrs[-1] * ratio ** np.arange(1, extend + 1)
            lrs, losses = np.concatenate([lrs, more]), np.concatenate([losses, run(more)])
    return lrs, losses


def measure_b_simple(batch, steps):
    run = demo.train(
        steps=steps,
        batch_size=batch,
        seq_len=SEQ,
        width=WIDTH,
        layers=1,
        optimizer="adamw",
        measure_noise=True,
        progress=False,
    )
    return float(run.noise.b_simple), [float(x) for x in run.b_simple]


def transfer(name, b_simple, batch, steps, data, model, params0, valid, grid, seeds):
    family, make_tx, centre = OPTIMIZERS[name]
    rows, best = [], {}
    for factor in (1, 4, 16):
        b = batch * factor
        windows = stream(data, b, steps, seeds)
        run = lambda lrs, w=windows: train_many(make_tx, model, params0, valid, lrs, w)
        lrs, losses = sweep(run, centre * 2.0 ** (np.arange(grid) / 2 - (grid - 1) / 4))
        mean = losses.mean(axis=1)
        best[b] = best_lr(lrs, mean)
        rows.append(
            {
                "batch": b,
                "lrs": lrs.tolist(),
                "valid_loss": mean.tolist(),
                "per_seed": losses.tolist(),
                "best_lr": best[b],
            }
        )
    anchor = best[batch]
    for row in rows:
        b = row["batch"]
        if anchor is None or b == batch:
            continue
        rec = scaling.recommend(family, anchor, batch, b, b_simple=b_simple)
        row["recommended_lr"] = rec.new_lr
        if best[b] is not None:
            row["measured_over_recommended"] = best[b] / rec.new_lr
            row["measured_over_sqrt"] = best[b] / scaling.sqrt_rule(anchor, batch, b)
            row["measured_over_linear"] = best[b] / scaling.linear_rule(anchor, batch, b)
    return {"optimizer": name, "anchor_batch": batch, "anchor_lr": anchor, "rows": rows}


def steps_to_target(
    b_simple, anchor_batch, anchor_lr, data, model, params0, valid, batches, max_steps, target
):
    """For each batch, the fewest steps (over three lrs) to reach the held-out target."""
    make_tx = OPTIMIZERS["adamw"][1]
    out = []
    for b in batches:
        centre = scaling.adam_transfer(anchor_lr, anchor_batch, b, b_simple=b_simple).lr
        lrs = centre * np.array([0.5, 1.0, 2.0])
        curves = train_many(
            make_tx, model, params0, valid, lrs, stream(data, b, max_steps, (1,)), curve=True
        )[:, 0]
        reached = [int(np.argmax(c <= target)) + 1 if np.any(c <= target) else None for c in curves]
        done = [s for s in reached if s is not None]
        out.append(
            {
                "batch": b,
                "lrs": lrs.tolist(),
                "steps": min(done) if done else None,
                "final_loss": [float(c[-1]) for c in curves],
            }
        )
    pairs = [(r["steps"], r["steps"] * r["batch"]) for r in out if r["steps"] is not None]
    fit = None
    if len(pairs) >= 2:
        try:
            f = scaling.fit_tradeoff(*zip(*pairs, strict=True))
            fit = {"s_min": f.s_min, "e_min": f.e_min, "b_crit": f.b_crit}
        except ValueError as e:
            fit = {"error": str(e)}
    return {"target": target, "runs": out, "fit": fit}


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for t in results["transfer"]:
        rows = [r for r in t["rows"] if r["best_lr"] is not None]
        (line,) = axes[0].plot(
            [r["batch"] for r in rows],
            [r["best_lr"] for r in rows],
            "o-",
            label=f"{t['optimizer']}: measured best",
        )
        rec = [(r["batch"], r["recommended_lr"]) for r in t["rows"] if "recommended_lr" in r]
        if rec and t["anchor_lr"] is not None:
            xs, ys = zip(*([(t["anchor_batch"], t["anchor_lr"])] + rec), strict=True)
            axes[0].plot(
                xs, ys, "x--", color=line.get_color(), label=f"{t['optimizer']}: recommended"
            )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="batch (windows)",
        ylabel="learning rate",
        title="best lr vs scaling.recommend",
    )
    axes[0].legend(fontsize=7)
    runs = [r for r in results["steps_to_target"]["runs"] if r["steps"] is not None]
    if runs:
        s = np.array([r["steps"] for r in runs], float)
        e = s * np.array([r["batch"] for r in runs])
        axes[1].plot(e, s, "o", label="AdamW runs")
        fit = results["steps_to_target"]["fit"] or {}
        if "b_crit" in fit:
            # the law's curve exists for E > E_min only (S → ∞ as E → E_min)
            ee = np.geomspace(max(e.min() / 1.5, fit["e_min"] * 1.05), e.max() * 1.5, 100)
            axes[1].plot(
                ee,
                1 / (1 / fit["s_min"] - fit["b_crit"] / ee),
                "-",
                label=f"fit: B_crit = {fit['b_crit']:.3g}",
            )
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="examples (windows)",
            ylabel="steps",
            title=f"steps to held-out loss {results['steps_to_target']['target']} "
            f"(B_simple = {results['b_simple']:.3g})",
        )
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny grid and steps")
    ap.add_argument("--batch", type=int, default=8, help="B, the anchor batch (windows)")
    ap.add_argument("--steps", type=int, default=80, help="updates per lr-sweep run")
    ap.add_argument("--target", type=float, default=3.0, help="held-out loss to reach")
    ap.add_argument("--only", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = ap.parse_args(argv)
    grid, seeds, steps, max_steps = 7, (1, 2), args.steps, 300
    batches = (2, 4, 8, 16, 32, 64)
    if args.quick:
        grid, seeds, steps, max_steps, batches = 3, (1,), 4, 6, (2, 4)
    t0 = time.time()
    data, model, params0, valid = setup()
    b_simple, trajectory = measure_b_simple(args.batch, max(steps, 20))
    print(f"B_simple measured at batch {args.batch}: {b_simple:.3g} windows (end of the run)")
    results = {
        "machine": machine(),
        "batch": args.batch,
        "steps": steps,
        "b_simple": b_simple,
        "b_simple_trajectory": trajectory,
        "transfer": [],
    }
    for name in args.only:
        t = transfer(name, b_simple, args.batch, steps, data, model, params0, valid, grid, seeds)
        results["transfer"].append(t)
        for r in t["rows"]:
            ratio = r.get("measured_over_recommended")
            print(
                f"{name:>6} B={r['batch']:>4} best lr "
                f"{'edge' if r['best_lr'] is None else format(r['best_lr'], '.3g'):>8}"
                + (f"  recommended {r['recommended_lr']:.3g}" if "recommended_lr" in r else "")
                + (
                    f"  measured/recommended x{ratio:.2f} (sqrt x{r['measured_over_sqrt']:.2f}, "
                    f"linear x{r['measured_over_linear']:.2f})"
                    if ratio
                    else ""
                )
            )
    adam = next((t for t in results["transfer"] if t["optimizer"] == "adamw"), None)
    if adam is not None and adam["anchor_lr"] is not None:
        results["steps_to_target"] = steps_to_target(
            b_simple,
            args.batch,
            adam["anchor_lr"],
            data,
            model,
            params0,
            valid,
            batches,
            max_steps,
            args.target,
        )
        st = results["steps_to_target"]
        print("steps to target:", {r["batch"]: r["steps"] for r in st["runs"]}, "fit:", st["fit"])
    results["seconds"] = time.time() - t0
    print(f"{results['seconds']:.0f} s; {write_json('transfer', results)}")
    if "steps_to_target" in results:
        plot(
            results,
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transfer.png"),
        )
    return results


if __name__ == "__main__":
    main()

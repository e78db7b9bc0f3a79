"""Does the batch-size recommendation hold? A direct check on the demo task and a task
of the quality suite.

1. Measure B_simple while training with AdamW at batch B: the current value (the ratio
   of means over the last ``scaling.default_window(steps)`` updates, with its standard
   error: what the demo and ``python -m scaling noise`` print), and its trajectory over
   windows (it grows during training).
2. For AdamW, Tiger and Muon: sweep the learning rate at B, 4B and 16B (a ×√2 grid,
   extended past an edge until the best is inside it, two data seeds, the same number
   of updates at every batch), fit the best lr of each batch
   (a parabola in log lr through the grid minimum), anchor at B, and ask
   ``scaling.recommend`` for 4B and 16B with the measured B_simple and its standard
   error. Reported: measured best lr / recommended lr, whether the measured lr lies in
   the recommended range (B_simple ± 1 s.e.) and in the x0.5-x2 sweep around it, beside
   the square-root and linear rules' ratios; for Muon also the surge's β_noise that
   fits the measured ratios best (``scaling.muon_transfer(beta_noise=...)``).
3. (demo only) Steps to a target loss for AdamW over batches 2 … 64 (the lr at each
   batch: the best of three around the Adam-curve transfer of the anchor), fitted with
   ``scaling.fit_tradeoff`` to McCandlish's law; its B_crit is compared with the
   measured B_simple.

Tasks: ``demo`` (the demo's character transformer at width 32, one layer, windows of 32
characters) and ``digits_mlp`` of ``benchmarks/suite_tasks.py`` (the UCI handwritten
digits, an MLP; the suite's held-out loss). All runs of one optimizer and batch are one
``vmap`` over (lr, seed) inside one ``lax.scan``, so each compiles once.

    python benchmarks/bench_transfer.py            # about 15 minutes on 2 CPU cores
    python benchmarks/bench_transfer.py --quick    # a smoke run
    python benchmarks/bench_transfer.py --tasks digits_mlp --only muon

Writes benchmarks/results/transfer.json and transfer.png.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from benchlib import machine, write_json
from suite_tasks import TASKS

import optax_ext as ox
import scaling
from optax_ext import demo
from optax_ext.noise_measurement import measure_noise_scale

SEQ, WIDTH = 32, 32
#: optimizer -> (family for scaling.recommend, factory of lr, centre of the lr grid at B)
OPTIMIZERS = {
    "adamw": ("adamw", lambda lr: optax.adamw(lr, weight_decay=0.01), 1.6e-2),
    "tiger": ("tiger", lambda lr: ox.tiger(lr, weight_decay=0.01), 8e-3),
    "muon": ("muon", lambda lr: ox.muon(lr), 2e-2),
}
#: the lr grid's centre at B = 8 on digits_mlp: the quality suite's best at batch 32
#: (benchmarks/results/quality_suite.json) moved by the square-root rule
SUITE_CENTRES = {"adamw": 3e-3, "tiger": 1.2e-2, "muon": 6e-3}
#: beta_noise values tried for Muon's surge (inf: Su's rule, no surge)
BETA_NOISE_GRID = np.round(np.arange(0.3, 1.51, 0.05), 2).tolist() + [math.inf]


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


def noise_summary(g2, trace_sigma):
    """The current B_simple of per-update estimates (scaling's one estimator) and the
    trajectory over windows of the same length."""
    g2, trace_sigma = np.asarray(g2, float), np.asarray(trace_sigma, float)
    window = scaling.default_window(len(g2))
    now = scaling.current_b_simple(g2, trace_sigma, window)
    ends = range(len(g2) % window or window, len(g2) + 1, window)
    windows = [scaling.current_b_simple(g2[:e], trace_sigma[:e], window) for e in ends]
    return {
        "b_simple": now.b_simple,
        "stderr": now.stderr,
        "text": now.text(),
        "settled": now.settled,
        "reason": now.reason,
        "window": window,
        "trajectory": [
            {"last_update": e, "b_simple": w.b_simple, "stderr": w.stderr}
            for e, w in zip(ends, windows, strict=True)
        ],
    }


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
    return noise_summary(run.g2, run.trace_sigma)


def measure_task_b_simple(task, lr, steps, seed=0):
    """B_simple on a suite task with AdamW: each batch's gradient as the mean of its two
    halves, measured by ``measure_noise_scale`` (half a batch against the whole)."""
    tx = optax.chain(measure_noise_scale(task.batch_size // 2), optax.adamw(lr))
    params = task.init(jax.random.key(0))
    key = jax.random.key(seed)
    data = jax.tree.map(jnp.asarray, task.data)  # indexed by traced batch indices

    def half_loss(p, part):
        return task.loss(p, part)

    def step(carry, i):
        p, s = carry
        batch = task.batch(data, jax.random.fold_in(key, i))
        halves = jax.tree.map(lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:]), batch)
        grads = jax.vmap(jax.grad(half_loss), in_axes=(None, 0))(p, halves)
        sq = sum(
            jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim))) for g in jax.tree.leaves(grads)
        )
        mean = jax.tree.map(lambda g: g.mean(0), grads)
        u, s = tx.update(mean, s, p, micro_grad_sq_norm=sq.mean(), accumulation_steps=2)
        out = s[0]
        return (optax.apply_updates(p, u), s), (out.last_g2, out.last_trace_sigma)

    run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jnp.arange(steps))[1])
    g2, trace = run(params)
    return noise_summary(np.asarray(g2), np.asarray(trace))


def train_many_task(task, make_tx, lrs, seeds, steps):
    """Held-out loss (the suite's) after ``steps`` updates for each (lr, seed): the same
    initialisation, the seed draws the batches."""
    params0 = task.init(jax.random.key(0))
    data = jax.tree.map(jnp.asarray, task.data)  # indexed by traced batch indices

    def one(lr, seed):
        tx = make_tx(lr)
        key = jax.random.key(seed)

        def step(carry, i):
            p, s = carry
            grads = jax.grad(task.loss)(p, task.batch(data, jax.random.fold_in(key, i)))
            u, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (params0, tx.init(params0)), jnp.arange(steps))
        return task.evaluate(p, data)[1]

    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return np.asarray(run(jnp.asarray(lrs, jnp.float32), jnp.asarray(seeds)))


def transfer(name, noise_at_b, batch, grid, make_run, centre):
    """Sweeps at B, 4B, 16B with ``make_run(b, make_tx)(lrs) -> (lr, seed) losses``."""
    family, make_tx, _ = OPTIMIZERS[name]
    b_simple, stderr = noise_at_b["b_simple"], noise_at_b["stderr"]
    rows, best = [], {}
    for factor in (1, 4, 16):
        b = batch * factor
        run = make_run(b, make_tx)
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
                "per_seed_best_lr": [best_lr(lrs, losses[:, j]) for j in range(losses.shape[1])],
            }
        )
    anchor = best[batch]
    for row in rows:
        b = row["batch"]
        if anchor is None or b == batch:
            continue
        se = stderr if math.isfinite(stderr) else None
        rec = scaling.recommend(family, anchor, batch, b, b_simple=b_simple, stderr=se)
        row["recommended_lr"] = rec.new_lr
        row["recommended_range"] = rec.lr_range
        if best[b] is not None:
            got = best[b]
            row["measured_over_recommended"] = got / rec.new_lr
            row["measured_over_sqrt"] = got / scaling.sqrt_rule(anchor, batch, b)
            row["measured_over_linear"] = got / scaling.linear_rule(anchor, batch, b)
            low, high = rec.lr_range if rec.lr_range else (rec.new_lr, rec.new_lr)
            row["in_range"] = bool(low <= got <= high)
            row["in_sweep"] = bool(low / 2 <= got <= 2 * high)  # the x0.5-x2 sweep note
    out = {"optimizer": name, "anchor_batch": batch, "anchor_lr": anchor, "rows": rows}
    if name == "muon" and anchor is not None:
        out["surge_fit"] = fit_beta_noise([out], b_simple)
    return out


def fit_beta_noise(transfers, b_simple):
    """Muon's surge: the beta_noise whose curve fits the measured best-lr ratios (least
    squares in log), over :data:`BETA_NOISE_GRID`; ``inf`` is Su's rule without a surge."""
    pairs = [
        (t["anchor_batch"], r["batch"], r["best_lr"] / t["anchor_lr"])
        for t in transfers
        for r in t["rows"]
        if r["batch"] != t["anchor_batch"] and r["best_lr"] is not None and t["anchor_lr"]
    ]
    if not pairs:
        return None

    def err(bn):
        bn = None if bn == math.inf else bn
        pred = [scaling.muon_transfer(1.0, b0, b1, b_simple, bn).lr for b0, b1, _ in pairs]
        return float(
            np.sqrt(np.mean([np.log(m / p) ** 2 for (_, _, m), p in zip(pairs, pred, strict=True)]))
        )

    errors = {str(bn): err(bn) for bn in BETA_NOISE_GRID}
    best = min(BETA_NOISE_GRID, key=err)
    return {
        "best_beta_noise": best,
        "rms_log_error": errors[str(best)],
        "su_rule_rms_log_error": errors[str(math.inf)],
        "errors": errors,
        "pairs": pairs,
    }


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
            f"(B_simple = {results['noise']['text']})",
        )
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def demo_runner(steps, seeds, setup_out):
    data, model, params0, valid = setup_out

    def make_run(b, make_tx):
        windows = stream(data, b, steps, seeds)
        return lambda lrs, w=windows: train_many(make_tx, model, params0, valid, lrs, w)

    return make_run


def suite_runner(name, steps, seeds):
    def make_run(b, make_tx):
        task = TASKS[name](steps=steps, batch_size=b)
        return lambda lrs: train_many_task(task, make_tx, lrs, seeds, steps)

    return make_run


def print_rows(task, t):
    for r in t["rows"]:
        ratio = r.get("measured_over_recommended")
        print(
            f"{task:>10} {t['optimizer']:>6} B={r['batch']:>4} best lr "
            f"{'edge' if r['best_lr'] is None else format(r['best_lr'], '.3g'):>8}"
            + (f"  recommended {r['recommended_lr']:.3g}" if "recommended_lr" in r else "")
            + (
                f"  measured/recommended x{ratio:.2f} (sqrt x{r['measured_over_sqrt']:.2f}, "
                f"linear x{r['measured_over_linear']:.2f})"
                if ratio
                else ""
            )
        )
    if t.get("surge_fit"):
        f = t["surge_fit"]
        print(
            f"{task:>10}   muon surge: beta_noise {f['best_beta_noise']} (rms log error "
            f"{f['rms_log_error']:.3f}; Su's rule {f['su_rule_rms_log_error']:.3f})"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny grid and steps")
    ap.add_argument("--batch", type=int, default=8, help="B, the anchor batch")
    ap.add_argument("--steps", type=int, default=80, help="updates per demo lr-sweep run")
    ap.add_argument("--suite-steps", type=int, default=150, help="updates per suite run")
    ap.add_argument("--target", type=float, default=3.0, help="held-out loss to reach (demo)")
    ap.add_argument("--only", nargs="*", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--tasks", nargs="*", default=["digits_mlp", "demo"])
    ap.add_argument("--no-steps-to-target", action="store_true")
    args = ap.parse_args(argv)
    grid, seeds, steps, max_steps = 7, (1, 2), args.steps, 300
    suite_steps = args.suite_steps
    batches = (2, 4, 8, 16, 32, 64)
    if args.quick:
        grid, seeds, steps, max_steps, batches, suite_steps = 3, (1,), 4, 6, (2, 4), 4
    t0 = time.time()
    results = {"machine": machine(), "batch": args.batch, "tasks": {}}
    for task in args.tasks:
        if task == "demo":
            setup_out = setup()
            n = max(steps, 20)
            noise_b = measure_b_simple(args.batch, n)
            make_run = demo_runner(steps, seeds, setup_out)
            centres = {k: v[2] for k, v in OPTIMIZERS.items()}
        else:
            noise_b = measure_task_b_simple(
                TASKS[task](steps=suite_steps, batch_size=args.batch), 3e-3, suite_steps
            )
            make_run = suite_runner(task, suite_steps, seeds)
            centres = SUITE_CENTRES
            n = suite_steps
        print(
            f"{task}: B_simple at batch {args.batch} after {n} updates: {noise_b['text']} "
            f"(last {noise_b['window']} updates): {noise_b['reason']}"
        )
        out = {"steps": steps if task == "demo" else suite_steps, "noise": noise_b, "transfer": []}
        for name in args.only:
            t = transfer(name, noise_b, args.batch, grid, make_run, centres[name])
            out["transfer"].append(t)
            print_rows(task, t)
        adam = next((t for t in out["transfer"] if t["optimizer"] == "adamw"), None)
        if task == "demo" and not args.no_steps_to_target and adam and adam["anchor_lr"]:
            data, model, params0, valid = setup_out
            out["steps_to_target"] = steps_to_target(
                noise_b["b_simple"], args.batch, adam["anchor_lr"], data, model, params0,
                valid, batches, max_steps, args.target,
            )  # fmt: skip
            st = out["steps_to_target"]
            print("steps to target:", {r["batch"]: r["steps"] for r in st["runs"]}, st["fit"])
        results["tasks"][task] = out
        write_json("transfer", results)  # after each task: a long run keeps what it has
    muons = [
        (t, results["tasks"][k]["noise"]["b_simple"])
        for k in results["tasks"]
        for t in results["tasks"][k]["transfer"]
        if t["optimizer"] == "muon" and t["anchor_lr"]
    ]
    if muons:
        # one beta_noise for every task: B_simple differs per task, beta_noise need not
        fits = {
            str(bn): float(
                np.sqrt(np.mean([fit_beta_noise([t], b)["errors"][str(bn)] ** 2 for t, b in muons]))
            )
            for bn in BETA_NOISE_GRID
        }
        best = min(BETA_NOISE_GRID, key=lambda bn: fits[str(bn)])
        results["muon_surge_joint"] = {"best_beta_noise": best, "rms_log_error": fits}
        print(
            f"muon surge over all tasks: beta_noise {best} (Su's rule: {fits[str(math.inf)]:.3f}, "
            f"fit: {fits[str(best)]:.3f})"
        )
    results["seconds"] = time.time() - t0
    print(f"{results['seconds']:.0f} s; {write_json('transfer', results)}")
    if "demo" in results["tasks"] and "steps_to_target" in results["tasks"]["demo"]:
        plot(
            results["tasks"]["demo"],
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "transfer.png"),
        )
    return results


if __name__ == "__main__":
    main()

"""The quality suite: does an optimizer train real models better than optax's?

Protocol (after Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find
Them", arXiv 2509.02046): on each task every optimizer gets its own learning-rate sweep
on a log grid (factor 2), one seed at every rate (``--sweep-seeds``); while the best rate
is at an end of the grid the sweep extends past that end, so the best is bracketed by
worse rates on both sides (or flagged); then the other seeds (3 in all) run at the best
rate. All use the same warm-up (5%) +
cosine schedule (to 10% of the peak) and weight decay 0. The numbers are those at the end
of training: the held-out metric at the best rate (mean ± sd over seeds), the best rate,
the updates needed to reach AdamW's final held-out metric (from evaluations every
``steps/10`` updates) and the optimizer state's bytes per parameter.

The whole grid of one optimizer (rates x seeds) is one jitted ``vmap`` of a ``lax.scan``
over the training steps; the seeds fix the initialisation and the batches, so at the
same seed every optimizer sees the same data in the same order. A sweep starts warm (the
default): at the optimizer's best rate in the last results file, or on the task that
trains the same model (``SAME_MODEL``), with one seed at half and twice that rate, so
that one program brackets an unmoved best; otherwise it extends as a cold grid does.

    python benchmarks/bench_suite.py                      # every task and optimizer
    python benchmarks/bench_suite.py --tasks demo_lm --only muon
    python benchmarks/bench_suite.py --candidates muon    # Muon's routing candidates too
    python benchmarks/bench_suite.py --quick              # 1 task, 2 optimizers (tests)

Writes benchmarks/results/quality_suite.json (or --out) and, with --plot, a PNG of the
sweeps. The tasks need scikit-learn (digits) and Debian's ``fortunes`` package.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import RESULTS_DIR, machine, markdown_table, write_json  # noqa: E402
from suite_optimizers import OPTIMIZERS, Entry, candidate_sets  # noqa: E402
from suite_tasks import SAME_MODEL, TASKS, Task  # noqa: E402

SEEDS = (0, 1, 2)
GRID = tuple(2.0**k for k in range(-2, 3))  # x centre: 1/4 ... 4
MAX_EXTEND = 4  # extra rates past an edge, one at a time
EVALS = 10  # held-out evaluations per run


def base_schedule(steps: int):
    """Warm-up over 5% of the updates to 1, cosine to 0.1: the learning rate is a multiple."""
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, steps // 20), steps, 0.1)


def grid_runner(task: Task, entry: Entry):
    """``run(lrs, seeds) -> (metric, loss, train_loss)``, each ``(runs, EVALS)``: one program."""
    steps, every = task.steps, task.steps // EVALS
    shape = base_schedule(steps)

    def one(lr, seed, data):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = task.init(k_init)
        tx = entry.make(lambda t: lr * shape(t))
        state = tx.init(params)

        def step(carry, t):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(
                params, task.batch(data, jax.random.fold_in(k_data, t))
            )
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        def block(carry, i):
            carry, losses = jax.lax.scan(step, carry, i * every + jnp.arange(every))
            metric, loss = task.evaluate(carry[0], data)
            return carry, (metric, loss, jnp.mean(losses))

        _, out = jax.lax.scan(block, (params, state), jnp.arange(EVALS))
        return out

    program = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))
    data = jax.tree.map(jnp.asarray, task.data)

    def run_pairs(pairs):
        """``(metric, loss, train_loss)``, each ``(len(pairs), EVALS)``, of (lr, seed) pairs."""
        lr = jnp.asarray([a for a, _ in pairs], jnp.float32)
        seed = jnp.asarray([s for _, s in pairs], jnp.uint32)
        return [np.asarray(o) for o in jax.device_get(program(lr, seed, data))]

    def run(lrs, seeds):
        out = run_pairs([(a, s) for a in lrs for s in seeds])
        return [o.reshape(len(lrs), len(seeds), EVALS) for o in out]

    run.pairs = run_pairs
    return run


def score(task: Task, final: np.ndarray) -> np.ndarray:
    """Higher is better; a diverged run (NaN) is the worst score."""
    s = final if task.higher_is_better else -final
    return np.where(np.isfinite(s), s, -np.inf)


def sweep(
    task: Task,
    entry: Entry,
    seeds=SEEDS,
    grid=GRID,
    max_extend=MAX_EXTEND,
    sweep_seeds=1,
    warm: float | None = None,
):
    """The rate sweep of one optimizer: rows per rate (as factors of ``entry.centre``),
    the best factor, and whether it is still at an edge.

    Cold (``warm=None``): the grid (and its extensions past an edge) runs the first
    ``sweep_seeds`` seeds; the remaining seeds then run at the best rate only, so the
    final numbers have every seed while the sweep costs ``sweep_seeds / len(seeds)`` of a
    full grid.

    Warm (``warm``: a factor where the best rate was found before, on this task): the
    first program runs every seed at ``warm`` and the first ``sweep_seeds`` at ``warm/2``
    and ``2 warm``, so when the best has not moved one program brackets it and gives its
    seeds; otherwise the sweep extends past the edge as a cold one does, and the
    remaining seeds run at the new best. Rates are compared on the sweep seeds alone, so
    a warm sweep picks the rate a cold one over the same rates would.
    """
    run = grid_runner(task, entry)
    rows: dict[float, dict[str, np.ndarray]] = {}
    ran: dict[float, tuple] = {}  # the seeds each rate has run
    first = tuple(seeds[:sweep_seeds])

    def add(plan):
        """Run ``{factor: seeds}`` in one program and append each rate's seeds to its row."""
        out = run.pairs([(entry.centre * f, s) for f, fs in plan.items() for s in fs])
        i = 0
        for f, fs in plan.items():
            new = {
                k: o[i : i + len(fs)] for k, o in zip(("metric", "loss", "train"), out, strict=True)
            }
            i += len(fs)
            old = rows.get(f)
            rows[f] = new if old is None else {k: np.concatenate([old[k], new[k]]) for k in new}
            ran[f] = ran.get(f, ()) + tuple(fs)

    def best():
        # every rate judged on the same seeds (the sweep's), wherever the sweep started
        mean = lambda f: np.mean(score(task, rows[f]["metric"][: len(first), -1]))
        return max(rows, key=mean)

    if warm is None:
        add({f: first for f in grid})
    else:
        add({warm / 2: first, warm: tuple(seeds), warm * 2: first})
    for _ in range(max_extend):
        b = best()
        if b == max(rows):
            add({b * 2: first})
        elif b == min(rows):
            add({b / 2: first})
        else:
            break
    b = best()
    rest = tuple(s for s in seeds if s not in ran[b])
    if rest:
        add({b: rest})
    return rows, b, b in (min(rows), max(rows))


def warm_factors(path: str | None, entries: dict[str, Entry]) -> dict[tuple[str, str], float]:
    """``{(task, optimizer): best_lr / centre}`` from an earlier results file (or none)."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        tasks = json.load(f)["tasks"]
    return {
        (t, r["optimizer"]): r["best_lr"] / entries[r["optimizer"]].centre
        for t, info in tasks.items()
        for r in info["rows"]
        if r["optimizer"] in entries and not r.get("best_at_edge", False)
    }


def warm_factor(warm: dict[tuple[str, str], float], task: str, optimizer: str):
    """Where ``optimizer``'s sweep on ``task`` starts: its best on this task, else on a task
    training the same model (``SAME_MODEL``), else nowhere (the cold grid)."""
    for t in (task, SAME_MODEL.get(task)):
        if (t, optimizer) in warm:
            return warm[t, optimizer], t
    return None, None


def summarise(task: Task, name: str, entry: Entry, rows, best: float, edge: bool, seconds: float):
    finals = rows[best]["metric"][:, -1]
    curve = np.mean(rows[best]["metric"], axis=0)
    return {
        "task": task.name,
        "optimizer": name,
        "source": entry.source,
        "note": entry.note,
        "best_lr": entry.centre * best,
        "best_at_edge": bool(edge),
        "mean": float(np.mean(finals)),
        "sd": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
        "seeds": [float(x) for x in finals],
        "held_out_loss": float(np.mean(rows[best]["loss"][:, -1])),
        "curve": [float(x) for x in curve],
        "sweep": {
            f"{entry.centre * f:.6g}": [float(x) for x in rows[f]["metric"][:, -1]]
            for f in sorted(rows)
        },
        "state_bytes_per_param": state_bytes_per_param(task, entry),
        "seconds": seconds,
    }


def state_bytes_per_param(task: Task, entry: Entry) -> float:
    """The optimizer state's bytes per parameter, from an abstract init (counters excluded)."""
    params = jax.eval_shape(task.init, jax.random.key(0))
    state = jax.eval_shape(lambda p: entry.make(lambda t: 1e-3).init(p), params)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    big = [x for x in jax.tree.leaves(state) if math.prod(x.shape) > 1]
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in big) / n


def steps_to_reach(task: Task, row: dict, target: float) -> int | None:
    """The first evaluation (in updates) at which the mean curve reaches ``target``."""
    every = task.steps // EVALS
    for i, v in enumerate(row["curve"]):
        if (v >= target) if task.higher_is_better else (v <= target):
            return (i + 1) * every
    return None


def add_steps_to_adamw(task: Task, rows: list[dict]) -> None:
    ref = next((r for r in rows if r["optimizer"] == "optax.adamw"), None)
    for r in rows:
        r["steps_to_adamw"] = steps_to_reach(task, r, ref["mean"]) if ref else None


def report(task: Task, rows: list[dict]) -> str:
    fmt = (lambda x: f"{100 * x:.1f}") if task.higher_is_better else (lambda x: f"{x:.3f}")
    unit = " (%)" if task.higher_is_better else ""
    ranked = sorted(rows, key=lambda r: -r["mean"] if task.higher_is_better else r["mean"])
    cols = [
        ("optimizer", "optimizer", str),
        ("mean", f"{task.metric}{unit}", lambda x: x),
        ("best_lr", "best lr", lambda x: f"{x:.3g}"),
        ("steps_to_adamw", "updates to AdamW's final", str),
        ("state_bytes_per_param", "state bytes/param", lambda x: f"{x:.2f}"),
    ]
    shown = [
        r
        | {
            "mean": f"{fmt(r['mean'])} ± {fmt(r['sd'])}",
            "best_lr": r["best_lr"],
            "optimizer": r["optimizer"] + (" (edge)" if r["best_at_edge"] else ""),
            "steps_to_adamw": "never" if r.get("steps_to_adamw") is None else r["steps_to_adamw"],
        }
        for r in ranked
    ]
    return markdown_table(shown, cols)


def plot(results: dict, path: str, names: list[str] | None = None) -> None:
    """Each task's sweep curves, one colour per optimizer in every panel; ``names`` picks
    the rows (default: all)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'optax-ext[plot]'") from e
    tasks = results["tasks"]
    present = dict.fromkeys(r["optimizer"] for info in tasks.values() for r in info["rows"])
    names = [n for n in (names or present) if n in present]
    colour = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # same in every panel
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks) + 2.5, 4.2), squeeze=False)
    for ax, (tname, info) in zip(axes[0], tasks.items(), strict=True):
        for r in (r for r in info["rows"] if r["optimizer"] in colour):
            lrs = sorted(r["sweep"], key=float)
            m = [np.mean(r["sweep"][k]) for k in lrs]
            s = [np.std(r["sweep"][k], ddof=1) if len(r["sweep"][k]) > 1 else 0 for k in lrs]
            style = "-" if r["source"] == "optax-ext" else "--"
            ax.errorbar([float(k) for k in lrs], m, yerr=s, fmt=style, marker="o", ms=3,
                        capsize=2, label=r["optimizer"], color=colour[r["optimizer"]])  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(info["metric"])
        ax.set_title(tname)
        # the whole of every curve near the best, cutting off diverged rates
        means = [np.mean(v) for r in info["rows"] if r["optimizer"] in colour
                 for v in r["sweep"].values()]  # fmt: skip
        if info["higher_is_better"]:
            best = max(means)
            worst = min(m for m in means if m > best - 0.25)
            ax.set_ylim(worst - 0.01, min(1.0, best + 0.01))
        else:
            best = min(means)
            ax.set_ylim(best - 0.05, max(m for m in means if m < best + 0.6) + 0.05)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
               fontsize=7, loc="center right")  # fmt: skip
    fig.subplots_adjust(right=0.84)
    fig.suptitle(
        "quality suite: final held-out metric against the peak learning rate "
        "(mean ± sd of 3 seeds; dashed: optax)"
    )
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)


def print_report(
    path: str, plot_path: str | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """The markdown tables of a results file, one per task, its summary and plot over
    ``names`` (default: every row)."""
    with open(path) as f:
        results = json.load(f)
    for tname, info in results["tasks"].items():
        view = _View(tname, info)
        batch = info.get("batch_size") or default_batch_size(tname)
        print(f"\n### {tname}: {info['source']}, {info['steps']} updates of {batch}\n")
        print(report(view, info["rows"]))
    print("\n### Summary (bold: within one seed-sd of the task's best)\n")
    print(summary_table(results, names))
    if plot_path:
        plot(results, plot_path, names)
        print("wrote", plot_path)
    return results


def summary_table(results: dict[str, Any], names: list[str] | None = None) -> str:
    """One row per optimizer, one column per task (mean ± sd at its best lr), and the
    state bytes per parameter on the first language-model task: the README's table."""
    tasks = results["tasks"]
    rows = {t: {r["optimizer"]: r for r in info["rows"]} for t, info in tasks.items()}
    names = names or list(dict.fromkeys(n for t in rows for n in rows[t]))
    lm = next((t for t, info in tasks.items() if not info["higher_is_better"]), None)
    header = ["optimizer"] + [
        f"{t} ({'accuracy %' if tasks[t]['higher_is_better'] else 'loss'})" for t in tasks
    ]
    header.append(f"state bytes/param ({lm})" if lm else "state bytes/param")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        cells = [f"`{name}`"]
        for t, info in tasks.items():
            r = rows[t].get(name)
            if r is None:
                cells.append("")
                continue
            scale, digits = (100, 1) if info["higher_is_better"] else (1, 3)
            best = max if info["higher_is_better"] else min
            top = best(x["mean"] for x in rows[t].values())
            tie = abs(r["mean"] - top) <= r["sd"]  # within one seed-sd of the task's best
            text = f"{scale * r['mean']:.{digits}f} ± {scale * r['sd']:.{digits}f}"
            cells.append(f"**{text}**" if tie else text)
        r = rows.get(lm, {}).get(name) or next(rows[t][name] for t in rows if name in rows[t])
        cells.append(f"{r['state_bytes_per_param']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_batch_size(task_name: str) -> int:
    return inspect.signature(TASKS[task_name]).parameters["batch_size"].default


class _View:
    """What ``report`` reads of a task, from a results file."""

    def __init__(self, name: str, info: dict[str, Any]):
        self.name, self.metric = name, info["metric"]
        self.higher_is_better, self.steps = info["higher_is_better"], info["steps"]


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--only", nargs="*", help="optimizer names (default: all)")
    ap.add_argument(
        "--candidates", nargs="*", default=[], choices=list(candidate_sets()),
        help="groups of candidates beside the default rows (Muon's routing, Tiger's "
        "defaults apart, 4-bit states, spectral pieces)",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds at the best rate")
    ap.add_argument(
        "--sweep-seeds", type=int, default=1,
        help="seeds at every rate of the sweep (the rest run at the best rate only)",
    )  # fmt: skip
    ap.add_argument(
        "--warm-start", default=os.path.join(RESULTS_DIR, "quality_suite.json"),
        help="start each sweep at the best rate of this earlier results file (same task and "
        "optimizer): 3 rates, extended past an edge as usual; '' for the full cold grid",
    )  # fmt: skip
    ap.add_argument("--steps", type=int, default=None, help="updates per run (task default)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per update")
    ap.add_argument("--quick", action="store_true", help="digits_mlp, adamw and tiger, 60 steps")
    ap.add_argument("--out", default="quality_suite", help="results/<out>.json")
    ap.add_argument("--plot", default=None, help="write the sweeps' PNG here")
    ap.add_argument(
        "--merge", action="store_true", help="add to (replace rows of) an existing results file"
    )
    ap.add_argument(
        "--report", action="store_true", help="print the tables of the results file, run nothing"
    )
    args = ap.parse_args(argv)
    entries = dict(OPTIMIZERS)
    for group in args.candidates:
        entries |= candidate_sets()[group]
    seeds, grid, extend = tuple(range(args.seeds)), GRID, MAX_EXTEND
    if args.quick:
        args.tasks, args.only, args.steps = ["digits_mlp"], ["optax.adamw", "tiger"], 60
        seeds, grid, extend = (0, 1), (0.25, 1.0, 4.0, 16.0), 2
        args.warm_start = ""
    # a warm start only where the runs are the ones the file measured
    same = not (args.steps or args.batch_size)
    warm = warm_factors(args.warm_start, entries) if same else {}
    if args.only:
        unknown = sorted(set(args.only) - set(entries))
        if unknown:
            raise SystemExit(f"unknown optimizers {unknown}; known: {sorted(entries)}")
        entries = {k: entries[k] for k in entries if k in args.only}
        if "optax.adamw" not in entries and not args.merge:
            # the reference for "updates to AdamW's final" (with --merge: the file's row)
            entries = {"optax.adamw": OPTIMIZERS["optax.adamw"]} | entries
    path = os.path.join(RESULTS_DIR, f"{args.out}.json")
    if args.report:
        return print_report(path, args.plot, list(entries))
    results: dict[str, Any] = {
        "machine": machine(), "seeds": list(seeds), "sweep_seeds": args.sweep_seeds, "tasks": {},
    }  # fmt: skip
    if args.merge and os.path.exists(path):
        with open(path) as f:
            results["tasks"] = json.load(f)["tasks"]
    started = time.perf_counter(), time.process_time()
    results["run"] = {"tasks": args.tasks, "optimizers": list(entries)}  # what this call ran
    for tname in args.tasks:
        sizes = {"steps": args.steps, "batch_size": args.batch_size}
        task = TASKS[tname](**{k: v for k, v in sizes.items() if v})
        info = results["tasks"].setdefault(tname, {"rows": []})
        info |= {
            "source": task.source,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "steps": task.steps,
            "batch_size": task.batch_size,
        }
        print(f"\n## {tname}: {task.source}, {task.steps} updates of {task.batch_size}", flush=True)
        for name, entry in entries.items():
            t0, c0 = time.perf_counter(), time.process_time()
            start, source = warm_factor(warm, tname, name)
            sw, best, edge = sweep(task, entry, seeds, grid, extend, args.sweep_seeds, start)
            row = summarise(task, name, entry, sw, best, edge, time.perf_counter() - t0)
            row["cpu_seconds"] = time.process_time() - c0  # every thread of this process
            row["runs"] = sum(len(r["metric"]) for r in sw.values())
            row["sweep_seeds"] = args.sweep_seeds
            row["warm_start"] = source  # the task whose best rate the sweep started from
            info["rows"] = [r for r in info["rows"] if r["optimizer"] != name] + [row]
            add_steps_to_adamw(task, info["rows"])
            results["run"]["seconds"] = time.perf_counter() - started[0]
            results["run"]["cpu_seconds"] = time.process_time() - started[1]
            write_json(args.out, results)  # after every optimizer: a long run can be resumed
            print(
                f"  {name:28s} {row['mean']:.4f} ± {row['sd']:.4f} at lr {row['best_lr']:.3g}"
                f"{' (edge)' if edge else ''}  [{row['seconds']:.0f} s]",
                flush=True,
            )
        print(report(task, info["rows"]))
    print("wrote", write_json(args.out, results))
    if args.plot:
        plot(results, args.plot)
        print("wrote", args.plot)
    return results


if __name__ == "__main__":
    main()

"""Update speed of every optimizer against its closest optax counterpart, same run, same tree.

For each pair, the jitted update + apply (params and state donated) is warmed up and then
timed round-robin with its counterpart; the median of ``--repeats`` is one trial, and
``--trials`` trials with fresh buffers give the reported median ratio ours/optax (lower is
better) and its range: this machine's memory bandwidth drifts by up to 1.6x over minutes,
and an update dominated by reductions gains less from a fast spell than a pure
elementwise one, so a single trial can mislead. For the large tree the bytes a perfect
update must move (each input read once, each output written once) divided by the time
give the achieved bandwidth, reported as a fraction of a donated in-place copy timed in
the same round-robin (each trial against its own copy, then the median). Accumulation
pairs are timed over whole cycles of k micro-steps. Compile time
is measured on the many-leaf tree::

    python benchmarks/bench_speed.py                      # GPT-2 small (124M) + 512 leaves
    python benchmarks/bench_speed.py --tree small --repeats 3   # a quick check

Prints a table and writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics

import jax
import optax
from benchlib import (
    GPT2_SMALL,
    CopyStep,
    compile_seconds,
    gpt2_like_params,
    machine,
    many_leaf_params,
    n_params,
    optax_guarded,
    random_like,
    table,
    time_interleaved,
    versions,
    write_json,
)

import optax_ext as ox

BETA = 0.965
K = 8

# name: (ours, optax counterpart, param-sized passes a perfect update moves, target ratio)
PAIRS = {
    "tiger (scaling and guards off) vs optax.lion(β, β)": (
        lambda: ox.tiger(
            1e-3, BETA, 0.01, param_scaling=None, guard_nan=False, spike_factor=None, mask=True
        ),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
        5,
        1.05,
    ),
    "tiger (defaults) vs optax.lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
        7,
        1.45,
    ),
    "lion vs optax.lion": (
        lambda: ox.lion(1e-4, 0.9, 0.99, mask=True),
        lambda: optax.lion(1e-4, 0.9, 0.99),
        5,
        1.05,
    ),
    # AdaFactor's defaults need 6 passes: the gradient read for the factored moments,
    # again for RMS(u) and again for the update (each waits for the reduction before
    # it), the parameters read for RMS(θ) and for the update, and written once.
    "adafactor vs optax.adafactor": (
        lambda: ox.adafactor(1e-3, mask=True),
        lambda: optax.adafactor(1e-3),
        6,
        1.10,
    ),
    "adafactor vs optax.adamw": (
        lambda: ox.adafactor(1e-3, mask=True),
        lambda: optax.adamw(1e-3),
        6,
        1.00,
    ),
    "sgdm vs optax.sgd(momentum)": (
        lambda: ox.sgdm(1e-2, 0.9),
        lambda: optax.sgd(1e-2, momentum=0.9),
        5,
        1.05,
    ),
    "adax vs optax.adamw": (lambda: ox.adax(1e-3), lambda: optax.adamw(1e-3), 7, None),
    "amos vs optax.adamw": (lambda: ox.amos(1e-2), lambda: optax.adamw(1e-3), None, None),
    f"accumulate_gradients(adamw, {K}) vs optax.MultiSteps(adamw, {K})": (
        lambda: ox.accumulate_gradients(optax.adamw(1e-3), K),
        lambda: optax.MultiSteps(optax.adamw(1e-3), K),
        None,
        1.05,
    ),
    # tiger's chain (its decay and learning rate read by update, for accumulation)
    # against the same direction chained with optax's own pieces, where the two coincide
    # (k = 1, no guards): what do the cycle-reading pieces cost?
    "tiger (guards off) vs the optax.chain of optax's pieces": (
        lambda: ox.tiger(1e-3, BETA, 0.01, guard_nan=False, spike_factor=None),
        lambda: optax.chain(
            ox.scale_by_tiger(BETA),
            optax.add_decayed_weights(0.01, mask=ox.path_mask(exclude=ox.NORM_AND_BIAS)),
            ox.scale_by_param_scale("tiger"),
            optax.scale_by_learning_rate(1e-3),
        ),
        6,
        None,
    ),
    # like-for-like: optax's own NaN check and global norm around lion (benchlib)
    "tiger (defaults) vs optax-guarded lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01),
        lambda: optax_guarded(optax.lion(1e-3, BETA, BETA, weight_decay=0.01)),
        7,
        None,
    ),
}


def cycle(tx, k):
    """Runs k micro-steps per call, so an accumulation cycle is timed as one unit."""

    def update(g, s, p=None):
        total = None
        for _ in range(k):
            u, s = tx.update(g, s, p)
            total = u if total is None else jax.tree.map(lambda a, b: a + b, total, u)
        return total, s

    return optax.GradientTransformation(tx.init, update)


def run_tree(label, params, repeats, trials, names, with_bandwidth, *, grads=None, stop=None):
    """Rows of ``names`` on ``params``; ``stop()`` true before a pair skips the rest."""
    grads = random_like(params) if grads is None else grads
    nbytes = ox.tree_bytes(params)
    rows, copies = [], []
    for name in names:
        if stop is not None and stop():
            rows.append({"tree": label, "pair": name, "skipped": "time budget"})
            continue
        make_ours, make_theirs, passes, target = PAIRS[name]
        per_step = K if "accumulate" in name else 1
        runs = []
        for _ in range(trials):  # fresh buffers each trial: the machine's speed drifts
            ours, theirs = make_ours(), make_theirs()
            if "accumulate" in name:
                ours, theirs = cycle(ours, K), cycle(theirs, K)
            copy = CopyStep(nbytes) if with_bandwidth else None
            t = time_interleaved({"ours": ours, "optax": theirs}, params, grads, repeats, copy)
            runs.append({k: v["median_s"] * 1e3 / per_step for k, v in t.items()})
            runs[-1]["compilations"] = max(v["compilations"] for v in t.values())
            if copy is not None:
                runs[-1]["copy_GBps"] = copy.gbps()
                copies.append(copy.gbps())
            del t, copy
            gc.collect()
        ratios = [r["ours"] / r["optax"] for r in runs]
        row = {
            "tree": label,
            "pair": name,
            "ours_ms": statistics.median(r["ours"] for r in runs),
            "optax_ms": statistics.median(r["optax"] for r in runs),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "trial_ratios": ratios,
            "target": target,
            "compilations": max(r["compilations"] for r in runs),
        }
        if with_bandwidth and passes:
            # each trial against the copy timed beside it, then the median over trials
            fractions = [passes * nbytes / (r["ours"] / 1e3) / 1e9 / r["copy_GBps"] for r in runs]
            row.update(
                ours_GBps=passes * nbytes / (row["ours_ms"] / 1e3) / 1e9,
                fraction_of_copy=statistics.median(fractions),
                trial_fractions=fractions,
            )
        rows.append(row)
        print(
            f"  {label}: {name}: {row['ours_ms']:.2f} ms vs {row['optax_ms']:.2f} ms, "
            f"ratio {row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
            flush=True,
        )
    return rows, (statistics.median(copies) if copies else None)


def compile_rows(params, names):
    grads = random_like(params)
    rows = []
    for name in names:
        make_ours, make_theirs, *_ = PAIRS[name]
        a, b = (
            compile_seconds(make_ours(), params, grads),
            compile_seconds(make_theirs(), params, grads),
        )
        rows.append({"pair": name, "ours_s": a, "optax_s": b, "ratio": a / b})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tree",
        choices=["gpt2", "small"],
        default="gpt2",
        help="gpt2: GPT-2 small (124M); small: a 3M-parameter check",
    )
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--trials", type=int, default=3, help="fresh runs per pair; the median ratio is reported"
    )
    ap.add_argument("--only", default=None, help="run only pairs whose name contains this")
    ap.add_argument(
        "--out", default=None, help="write the JSON here (default benchmarks/results/speed.json)"
    )
    args = ap.parse_args(argv)
    names = [n for n in PAIRS if args.only is None or args.only in n]

    shape = (
        GPT2_SMALL if args.tree == "gpt2" else dict(width=256, layers=2, vocab=4096, context=256)
    )
    large = gpt2_like_params(**shape)
    many = many_leaf_params()
    results = {
        "machine": machine(),
        "repeats": args.repeats,
        "trials": args.trials,
        "trees": {
            "large": dict(shape, params=n_params(large)),
            "many_leaf": {"leaves": len(jax.tree.leaves(many)), "params": n_params(many)},
        },
    }
    print(
        f"large tree {n_params(large) / 1e6:.1f}M params; many-leaf tree "
        f"{len(jax.tree.leaves(many))} leaves; median of {args.repeats}, {args.trials} trials",
        flush=True,
    )
    rows_large, copy = run_tree("large", large, args.repeats, args.trials, names, True)
    del large
    gc.collect()
    rows_many, _ = run_tree("many-leaf", many, args.repeats, args.trials, names, False)
    results.update(copy_GBps=copy, speed=rows_large + rows_many, compile=compile_rows(many, names))
    results["versions"] = versions()
    fmt2 = lambda x: f"{x:.2f}"
    print(f"\ndonated copy: {copy:.1f} GB/s (median over trials)")
    print(
        table(
            results["speed"],
            [
                ("tree", "tree", str),
                ("pair", "pair", str),
                ("ours_ms", "ours ms", fmt2),
                ("optax_ms", "optax ms", fmt2),
                ("ratio", "ratio", fmt2),
                ("ratio_min", "min", fmt2),
                ("ratio_max", "max", fmt2),
                ("target", "target", lambda x: f"<= {x:.2f}"),
                ("fraction_of_copy", "of copy BW", lambda x: f"{x:.0%}"),
            ],
        )
    )
    print("\ncompile time, many-leaf tree")
    print(
        table(
            results["compile"],
            [
                ("pair", "pair", str),
                ("ours_s", "ours s", fmt2),
                ("optax_s", "optax s", fmt2),
                ("ratio", "ratio", fmt2),
            ],
        )
    )
    print("wrote", write_json("speed", results, args.out))
    return results


if __name__ == "__main__":
    main()

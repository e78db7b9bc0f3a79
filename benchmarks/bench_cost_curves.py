"""How an update's time and an optimizer's memory grow with the work: cost curves.

Step time (donated, interleaved, median) and optimizer-state bytes against the number of
parameters, for one leaf and for GPT-2-shaped trees, and against the number of leaves at
a fixed parameter count, for Tiger, Lion, AdaFactor and Muon (where this checkout has
it) next to optax's. At each size a donated in-place copy of the parameters' bytes is
timed in the same round-robin; the bytes a perfect update moves (``PASSES``
parameter-sized reads and writes) over the step time, as a fraction of that copy's
bandwidth, should stay flat as the size grows. Arrays are drawn on the default device.

    python benchmarks/bench_cost_curves.py                 # CPU: 1M..64M, 10..1000 leaves
    python benchmarks/bench_cost_curves.py --sizes 1e6,1e7,1e8,1e9 --leaf-counts 10,100,1000,10000
    python benchmarks/bench_cost_curves.py --quick         # seconds, tiny sizes

Writes benchmarks/results/cost_curves.json and a log-log plot
benchmarks/results/cost_curves.png, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from benchlib import (
    RESULTS_DIR,
    CopyStep,
    abstract_gpt2,
    leaf_count_params,
    machine,
    markdown_table,
    n_params,
    on_device_like,
    one_leaf_params,
    time_interleaved,
    versions,
    write_json,
)

import optax_ext as ox

BETA = 0.965

#: Parameter-sized passes a perfect update moves (each input read once, each output
#: written once). AdaFactor with its defaults (update clipping and the parameter scale):
#: the gradient is read three times, for the factored moments, for RMS(u) and for the
#: update, since each needs the reduction before it; the parameters twice, for RMS(θ)
#: and the update, and written once: 6. Tiger's defaults add one read of the gradient
#: (the NaN check) and one of the parameters (RMS scales) to Lion's 5.
PASSES = {
    "tiger": 7,
    "optax.lion(β, β)": 5,
    "lion": 5,
    "optax.lion": 5,
    "adafactor": 6,
    "optax.adafactor": 6,
    "optax.adamw": 7,
    # the per-unit statistics read the gradient; the step reads it and θ, writes θ
    "amos": 4,
}


def optimizers() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """name: factory. Muon joins where ``optax_ext.optimizers.muon`` exists."""
    opts = {
        "tiger": lambda: ox.tiger(1e-3, BETA, 0.01),
        "optax.lion(β, β)": lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
        "lion": lambda: ox.lion(1e-4, 0.9, 0.99),
        "optax.lion": lambda: optax.lion(1e-4, 0.9, 0.99),
        "adafactor": lambda: ox.adafactor(1e-3),
        "optax.adafactor": lambda: optax.adafactor(1e-3),
        "optax.adamw": lambda: optax.adamw(1e-3),
        "amos": lambda: ox.amos(1e-3),
    }
    try:
        from optax_ext.optimizers.muon import muon

        opts["muon"] = lambda: muon(1e-3)
        if hasattr(optax, "contrib") and hasattr(optax.contrib, "muon"):
            opts["optax.contrib.muon"] = lambda: optax.contrib.muon(1e-3)
    except ImportError:
        pass
    return opts


def _measure(label, params, names, repeats, extra) -> list[dict]:
    """Times ``names`` interleaved on ``params`` with a copy beside them: one row each."""
    opts = optimizers()
    names = [n for n in names if n in opts]
    grads = on_device_like(params, seed=1)
    nbytes = ox.tree_bytes(params)
    copy = CopyStep(nbytes)
    t = time_interleaved({n: opts[n]() for n in names}, params, grads, repeats, copy)
    gbps = copy.gbps()
    rows = []
    for name in names:
        r = t[name]
        passes = PASSES.get(name)
        row = {
            "curve": label,
            "optimizer": name,
            "params": n_params(params),
            "leaves": len(jax.tree.leaves(params)),
            "dtype": str(jax.tree.leaves(params)[0].dtype),
            "step_ms": r["median_s"] * 1e3,
            "state_bytes": r["state_bytes"],
            "state_bytes_per_param": r["state_bytes"] / max(n_params(params), 1),
            "compilations": r["compilations"],
            "copy_GBps": gbps,
            "passes": passes,
            **extra,
        }
        if passes:
            row["GBps"] = passes * nbytes / r["median_s"] / 1e9
            row["fraction_of_copy"] = row["GBps"] / gbps
        rows.append(row)
    del t, copy, grads
    gc.collect()
    return rows


def param_curve(sizes, names, *, kind="one leaf", dtype=jnp.float32, repeats=7) -> list[dict]:
    """Rows for each size (parameter count) of one leaf or of a GPT-2-shaped tree."""
    rows = []
    for n in sizes:
        if kind == "one leaf":
            params = one_leaf_params(int(n), dtype=dtype)
        else:
            params = on_device_like(abstract_gpt2(int(n), dtype=dtype), seed=0, scale=0.02)
        rows += _measure(kind, params, names, repeats, {"target_params": int(n)})
        print(f"  {kind}, {n_params(params) / 1e6:.1f}M params: done", flush=True)
        del params
        gc.collect()
    return rows


def leaf_curve(leaf_counts, names, *, n_floats=2**20, dtype=jnp.float32, repeats=7):
    """Rows for each leaf count at about ``n_floats`` parameters in all."""
    rows = []
    for count in leaf_counts:
        params = leaf_count_params(int(count), int(n_floats), dtype=dtype)
        rows += _measure("leaf count", params, names, repeats, {"target_leaves": int(count)})
        print(f"  {len(jax.tree.leaves(params))} leaves: done", flush=True)
        del params
        gc.collect()
    return rows


def plot(rows, path) -> str | None:
    """A log-log plot: step time and copy fraction against parameters, time against
    leaves. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with_leaves = any(r["curve"] == "leaf count" for r in rows)
    fig, axes = plt.subplots(1, 3 if with_leaves else 2, figsize=(17 if with_leaves else 12, 5))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for curve, style in (("one leaf", "-"), ("GPT-2 shaped", "--")):
        for name in names:
            pts = sorted(
                (r["params"], r["step_ms"], r.get("fraction_of_copy"))
                for r in rows
                if r["curve"] == curve and r["optimizer"] == name
            )
            if not pts:
                continue
            x, y, f = zip(*pts, strict=True)
            label = f"{name} ({curve})"
            axes[0].plot(x, y, style, marker="o", color=colors[name], label=label)
            if all(v is not None for v in f):
                axes[1].plot(x, f, style, marker="o", color=colors[name], label=label)
    for name in names if with_leaves else ():
        pts = sorted(
            (r["leaves"], r["step_ms"])
            for r in rows
            if r["curve"] == "leaf count" and r["optimizer"] == name
        )
        if pts:
            x, y = zip(*pts, strict=True)
            axes[2].plot(x, y, marker="o", color=colors[name], label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="step ms")
    axes[0].set_title("step time (solid: one leaf, dashed: GPT-2 shaped)")
    axes[1].set(xscale="log", xlabel="parameters", ylabel="fraction of copy bandwidth")
    axes[1].set_title("achieved / donated copy")
    if with_leaves:
        axes[2].set(xscale="log", yscale="log", xlabel="leaves", ylabel="step ms")
        axes[2].set_title("step time at a fixed parameter count")
        axes[2].legend(fontsize=6)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"cost curves, {jax.devices()[0].device_kind}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x, spec):
    return format(x, spec)


COLUMNS = [
    ("curve", "curve", str),
    ("optimizer", "optimizer", str),
    ("params", "params", lambda x: f"{x / 1e6:.1f}M"),
    ("leaves", "leaves", str),
    ("step_ms", "step ms", lambda x: f"{x:.3f}" if x < 1 else f"{x:.2f}"),
    ("state_bytes_per_param", "state bytes/param", lambda x: f"{x:.3f}"),
    ("fraction_of_copy", "of copy BW", lambda x: f"{x:.0%}"),
]


def run(sizes, gpt2_sizes, leaf_counts, names, *, dtype=jnp.float32, repeats=7, leaf_floats=2**20):
    """All three curves; the dict written as JSON."""
    rows = param_curve(sizes, names, kind="one leaf", dtype=dtype, repeats=repeats)
    rows += param_curve(gpt2_sizes, names, kind="GPT-2 shaped", dtype=dtype, repeats=repeats)
    rows += leaf_curve(leaf_counts, names, n_floats=leaf_floats, dtype=dtype, repeats=repeats)
    return {"machine": machine(), "versions": versions(), "repeats": repeats, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e6,4e6,1.6e7,6.4e7", help="one-leaf parameter counts")
    ap.add_argument("--gpt2-sizes", default=None, help="GPT-2-shaped counts (default: --sizes)")
    ap.add_argument("--leaf-counts", default="10,100,1000")
    ap.add_argument("--leaf-floats", type=float, default=2**20)
    ap.add_argument("--only", default=None, help="optimizer names separated by ';'")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--out", default=None, help="JSON path (default results/cost_curves.json)")
    ap.add_argument("--plot", default=os.path.join(RESULTS_DIR, "cost_curves.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.gpt2_sizes, args.leaf_counts = "1e4,1e5", "1e5", "8,40"
        args.repeats, args.leaf_floats = 3, 1e4
    parse = lambda s: [int(float(x)) for x in s.split(",") if x]
    names = list(optimizers()) if args.only is None else args.only.split(";")
    results = run(
        parse(args.sizes),
        parse(args.gpt2_sizes or args.sizes),
        parse(args.leaf_counts),
        names,
        dtype=jnp.dtype(args.dtype),
        repeats=args.repeats,
        leaf_floats=args.leaf_floats,
    )
    print()
    print(markdown_table(results["rows"], COLUMNS))
    results["plot"] = plot(results["rows"], args.plot)
    print("wrote", write_json("cost_curves", results, args.out), results["plot"] or "(no plot)")
    return results


if __name__ == "__main__":
    main()

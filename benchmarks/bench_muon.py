"""Muon: msign accuracy and speed, the step against optax.contrib.muon, sharded memory, quality.

Parts (``--part``, default all; each merges its results into benchmarks/results/muon.json):

- ``ranges``: the singular-value range each Newton–Schulz coefficient set reaches from
  Su's design interval [1e-3, 1] in 5 and 6 steps (the scalar map composed, exact), and
  on a 512×768 float32 matrix whose X0 singular values span [1e-3, 1].
- ``msign``: time of one msign per GPT-2-small kernel shape and coefficient set, against
  optax's ``orthogonalize_via_newton_schulz`` (same 5 steps), jitted, round-robin.
- ``step``: the jitted update + apply, params and state donated, timed round-robin:
  ``muon`` against ``optax.contrib.muon`` on the GPT-2-small tree's hidden kernels (both
  orthogonalise the same leaves; Keller's coefficients in both, and ours with Polar
  Express), and on the whole tree with each library's routing (optax sends the
  embeddings to Muon too).
- ``memory``: compiled temporary memory per device of the ``muon`` step on the hidden
  kernels over 8 (fake CPU) devices: replicated, sharded by rows, by columns and fully
  (a 2×4 mesh), and whether each equals the single-device result.
- ``quality``: the demo task (``optax_ext.demo``), Muon's learning rate swept the
  bench_quality way around AdamW's rate, next to AdamW and Tiger at their recipes'
  rates; updates until each reaches AdamW's final loss::

    python benchmarks/bench_muon.py                           # everything (~15 min, 2 cores)
    python benchmarks/bench_muon.py --part step --layers 1    # one part, quicker
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys

if "--part=memory" in sys.argv or ("--part" in sys.argv and "memory" in sys.argv):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from benchlib import (  # noqa: E402
    RESULTS_DIR,
    gpt2_like_params,
    machine,
    n_params,
    random_like,
    table,
    time_functions,
    time_interleaved,
)
from optax.contrib._muon import orthogonalize_via_newton_schulz  # noqa: E402

from optax_ext._common import path_to_str  # noqa: E402
from optax_ext.optimizers.msign import (  # noqa: E402
    NS_COEFFICIENTS,
    msign,
    msign_svd,
    singular_value_range,
)
from optax_ext.optimizers.muon import muon, muon_labels  # noqa: E402

PATH = os.path.join(RESULTS_DIR, "muon.json")
KELLER = NS_COEFFICIENTS["keller"][0]


def hidden_kernels(width=768, layers=12, seed=0):
    """The GPT-2-small tree's hidden kernels only (what both libraries orthogonalise)."""
    tree = gpt2_like_params(width=width, layers=layers, vocab=8, context=8, seed=seed)
    labels = dict(leaf_paths(muon_labels(tree)))
    out = {}
    for path, x in leaf_paths(tree):
        if labels[path] == "muon":
            node = out
            *parents, last = path.split("/")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = x
    return out


def leaf_paths(tree):
    return [(path_to_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ---------------------------------------------------------------------- ranges


def part_ranges(args):
    rows = []
    rng = np.random.default_rng(0)
    k = 512
    s = np.concatenate([[1.0], np.geomspace(1e-3, 0.03, k - 1)])
    u, _ = np.linalg.qr(rng.standard_normal((k, k)))
    v, _ = np.linalg.qr(rng.standard_normal((768, k)))
    m = (u * (s / np.linalg.norm(s))) @ v.T  # X0 = m: singular values span [~1e-3, 1]
    exact = msign_svd(m)
    for name in NS_COEFFICIENTS:
        for steps in (5, 6):
            lo, hi = singular_value_range(name, steps)
            got = np.asarray(msign(jnp.asarray(m, jnp.float32), coeffs=name, steps=steps))
            sv = np.linalg.svd(got.astype(np.float64), compute_uv=False)
            rows.append(
                {
                    "coeffs": name,
                    "steps": steps,
                    "interval_min": lo,
                    "interval_max": hi,
                    "matrix_min": float(sv.min()),
                    "matrix_max": float(sv.max()),
                    "matrix_spectral_error": float(np.linalg.norm(got - exact, 2)),
                }
            )
    f3 = lambda x: f"{x:.3f}"
    print("singular values after Newton–Schulz from X0's in [1e-3, 1]")
    print(
        table(
            rows,
            [
                ("coeffs", "coeffs", str),
                ("steps", "steps", str),
                ("interval_min", "min (map)", f3),
                ("interval_max", "max (map)", f3),
                ("matrix_min", "min (512x768 f32)", f3),
                ("matrix_max", "max (512x768 f32)", f3),
                ("matrix_spectral_error", "|O - UVᵀ|_2", f3),
            ],
        )
    )
    return {"ranges": rows}


# ----------------------------------------------------------------------- msign


def part_msign(args):
    w = args.width
    shapes = [(w, w), (w, 3 * w), (w, 4 * w), (4 * w, w)]
    pe = jnp.asarray(NS_COEFFICIENTS["polar_express"][:5])
    rows = []
    for shape in shapes:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        fns = {f"ours {n}": functools.partial(msign, coeffs=n, steps=5) for n in NS_COEFFICIENTS}
        fns["optax keller"] = lambda x: orthogonalize_via_newton_schulz(x, jnp.asarray(KELLER), 5)
        fns["optax polar_express rows"] = lambda x: orthogonalize_via_newton_schulz(x, pe, 5)
        t = time_functions(fns, x, repeats=args.repeats)
        for name, sec in t.items():
            rows.append(
                {
                    "shape": "x".join(map(str, shape)),
                    "candidate": name,
                    "ms": 1e3 * sec,
                    "ratio_vs_optax_keller": sec / t["optax keller"],
                }
            )
        print(
            f"  msign {shape}: " + ", ".join(f"{n} {1e3 * s:.1f} ms" for n, s in t.items()),
            flush=True,
        )
    print(
        table(
            rows,
            [
                ("shape", "shape", str),
                ("candidate", "msign (5 steps, f32)", str),
                ("ms", "ms", lambda x: f"{x:.1f}"),
                ("ratio_vs_optax_keller", "/ optax keller", lambda x: f"{x:.2f}"),
            ],
        )
    )
    return {"msign": {"width": w, "repeats": args.repeats, "rows": rows}}


# ------------------------------------------------------------------------ step


def part_step(args):
    w, layers = args.width, args.layers
    hidden = hidden_kernels(w, layers)
    g = random_like(hidden)
    cands = {
        "ours keller": muon(1e-3, ns_coeffs="keller"),
        "ours polar_express (default)": muon(1e-3),
        "optax.contrib.muon (keller, consistent_rms=0.2)": optax.contrib.muon(
            1e-3, weight_decay=0.1, consistent_rms=0.2
        ),
    }
    rows = []
    for trial in range(args.trials):
        t = time_interleaved(cands, hidden, g, repeats=args.repeats)
        base = t["optax.contrib.muon (keller, consistent_rms=0.2)"]["median_s"]
        for name, r in t.items():
            rows.append(
                {
                    "tree": "hidden kernels",
                    "trial": trial,
                    "candidate": name,
                    "ms": 1e3 * r["median_s"],
                    "ratio": r["median_s"] / base,
                }
            )
        print(
            f"  hidden kernels trial {trial}: "
            + ", ".join(f"{n} {1e3 * r['median_s']:.0f} ms" for n, r in t.items()),
            flush=True,
        )
    whole = gpt2_like_params(width=w, layers=layers)
    gw = random_like(whole)
    cands = {
        "ours (Tiger for embeddings, biases, norms)": muon(1e-3),
        "ours, AdamW for the rest": muon(1e-3, other="adamw"),
        "optax.contrib.muon (embeddings to Muon)": optax.contrib.muon(
            1e-3, weight_decay=0.1, consistent_rms=0.2
        ),
    }
    t = time_interleaved(cands, whole, gw, repeats=max(2, args.repeats // 2))
    base = t["optax.contrib.muon (embeddings to Muon)"]["median_s"]
    for name, r in t.items():
        rows.append(
            {
                "tree": "whole tree",
                "trial": 0,
                "candidate": name,
                "ms": 1e3 * r["median_s"],
                "ratio": r["median_s"] / base,
            }
        )
    print(
        table(
            rows,
            [
                ("tree", "tree", str),
                ("trial", "trial", str),
                ("candidate", "update + apply (donated)", str),
                ("ms", "ms", lambda x: f"{x:.0f}"),
                ("ratio", "/ optax", lambda x: f"{x:.2f}"),
            ],
        )
    )
    summary = {}
    for name in {r["candidate"] for r in rows if r["tree"] == "hidden kernels"}:
        ratios = sorted(r["ratio"] for r in rows if r["candidate"] == name)
        summary[name] = {
            "median_ratio": ratios[len(ratios) // 2],
            "min": ratios[0],
            "max": ratios[-1],
        }
    return {
        "step": {
            "width": w,
            "layers": layers,
            "hidden_params": n_params(hidden),
            "whole_params": n_params(whole),
            "repeats": args.repeats,
            "rows": rows,
            "hidden_ratio_summary": summary,
        }
    }


# ---------------------------------------------------------------------- memory


def part_memory(args):
    from jax.sharding import NamedSharding, PartitionSpec

    assert jax.device_count() == 8, "the memory part needs 8 devices (run it with --part memory)"
    w, layers = args.width, args.layers
    hidden = hidden_kernels(w, layers)
    g = random_like(hidden)
    tx = muon(1e-3)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    line = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    grid = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    layouts = {
        "one device": None,
        "replicated (8 devices)": (line, PartitionSpec()),
        "rows": (line, PartitionSpec("x", None)),
        "columns": (line, PartitionSpec(None, "x")),
        "fully (2x4)": (grid, PartitionSpec("a", "b")),
    }
    rows, want = [], None
    for name, layout in layouts.items():
        put = (
            (lambda t: t)
            if layout is None
            else (
                lambda t, m=layout[0], s=layout[1]: jax.tree.map(
                    lambda x: jax.device_put(x, NamedSharding(m, s)), t
                )
            )
        )
        p, gg = put(hidden), put(g)
        s = jax.jit(tx.init)(p)
        compiled = jax.jit(step).lower(p, s, gg).compile()
        mem = compiled.memory_analysis()
        out, _ = compiled(p, s, gg)
        out = jax.tree.map(np.asarray, out)
        if want is None:
            want = out
        diff = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True)
        )
        rows.append(
            {
                "layout": name,
                "temp_mb_per_device": mem.temp_size_in_bytes / 2**20,
                "argument_mb_per_device": mem.argument_size_in_bytes / 2**20,
                "max_abs_diff_vs_one_device": diff,
            }
        )
    print(
        f"muon step on {layers} layer(s) of GPT-2-small hidden kernels "
        f"({n_params(hidden) / 1e6:.1f}M params)"
    )
    print(
        table(
            rows,
            [
                ("layout", "params sharded", str),
                ("temp_mb_per_device", "temp MB / device", lambda x: f"{x:.1f}"),
                ("argument_mb_per_device", "args MB / device", lambda x: f"{x:.1f}"),
                ("max_abs_diff_vs_one_device", "max |Δ| vs 1 device", lambda x: f"{x:.1e}"),
            ],
        )
    )
    return {
        "memory": {"width": w, "layers": layers, "hidden_params": n_params(hidden), "rows": rows}
    }


# --------------------------------------------------------------------- quality


def muon_recipe():
    """The demo recipe for Muon: AdamW's rate and decay carry over (Moonlight scale); the
    embeddings, head, biases and norms go to Tiger at half the rate (Tiger's demo rate is
    half AdamW's)."""
    from optax_ext.demo.recipes import Recipe, accumulated

    def make(lr, wd):
        other = (lambda t: 0.5 * lr(t)) if callable(lr) else 0.5 * lr
        return muon(lr, weight_decay=wd, other_learning_rate=other)

    return Recipe(accumulated(make), 1.2e-2, "muon", 0.01, 0.95)


def _steps_to(losses, target, window=10):
    smooth = np.convolve(np.asarray(losses), np.ones(window) / window, mode="valid")
    hit = np.nonzero(smooth <= target)[0]
    return int(hit[0] + window) if hit.size else None


def part_quality(args):
    from bench_quality import FACTORS

    from optax_ext import demo

    demo.RECIPES["muon"] = muon_recipe()

    def run(name, lr):
        h = demo.train(
            steps=args.quality_steps,
            batch_size=32,
            seq_len=64,
            optimizer=name,
            learning_rate=lr,
            measure_noise=False,
            progress=False,
        )
        row = {
            "optimizer": name,
            "lr": lr,
            "valid_loss": h.valid_loss_end,
            "train_loss": float(np.mean(h.losses[-10:])),
            "seconds": h.seconds,
            "losses": [float(v) for v in h.losses],
        }
        print(f"  {name} lr={lr:.3g}: held-out {row['valid_loss']:.4f}", flush=True)
        return row

    rows = [run("adamw", demo.RECIPES["adamw"].lr), run("tiger", demo.RECIPES["tiger"].lr)]
    base = demo.RECIPES["muon"].lr
    factors = FACTORS if args.quality_factors is None else args.quality_factors
    sweep = {f: run("muon", base * f) for f in factors}
    while True:  # extend while the best rate is at an end (as bench_quality does), twice at most
        best = min(sweep, key=lambda f: sweep[f]["valid_loss"])
        if len(sweep) >= len(factors) + 2 or best not in (min(sweep), max(sweep)):
            break
        f = best * 2 if best == max(sweep) else best / 2
        sweep[f] = run("muon", base * f)
    best = min(sweep, key=lambda f: sweep[f]["valid_loss"])
    for f, r in sweep.items():
        r["factor"] = f
        r["best_lr_for_optimizer"] = f == best
        rows.append(r)
    target = rows[0]["train_loss"]  # AdamW's final train loss (mean of the last 10 updates)
    for r in rows:
        r["updates_to_adamw_final_train_loss"] = _steps_to(r["losses"], target)
    f4 = lambda x: f"{x:.4f}"
    print(
        f"\ndemo task, {args.quality_steps} updates of 32 windows; "
        f"AdamW's final train loss {target:.4f}"
    )
    print(
        table(
            rows,
            [
                ("optimizer", "optimizer", str),
                ("lr", "lr", lambda x: f"{x:.3g}"),
                ("valid_loss", "held-out", f4),
                ("train_loss", "train (last 10)", f4),
                ("best_lr_for_optimizer", "best muon lr", lambda b: "*" if b else ""),
                ("updates_to_adamw_final_train_loss", "updates to AdamW's final", str),
            ],
        )
    )
    for r in rows:
        r.pop("losses")
    return {"quality": {"steps": args.quality_steps, "batch_size": 32, "rows": rows}}


# ------------------------------------------------------------------------ main

PARTS = {
    "ranges": part_ranges,
    "msign": part_msign,
    "step": part_step,
    "memory": part_memory,
    "quality": part_quality,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", *PARTS], default="all")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2, help="GPT-2-small layers in the step trees")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=300)
    ap.add_argument("--quality-factors", type=float, nargs="*", default=None)
    args = ap.parse_args(argv)
    parts = list(PARTS) if args.part == "all" else [args.part]
    for part in parts:
        if part == "memory" and jax.device_count() != 8:
            cmd = [
                sys.executable,
                __file__,
                "--part",
                "memory",
                "--width",
                str(args.width),
                "--layers",
                str(args.layers),
            ]
            subprocess.run(cmd, check=True)
            continue
        new = PARTS[part](args)
        # re-read before writing: parts may run in separate processes
        results = json.load(open(PATH)) if os.path.exists(PATH) else {}
        results.update(new)
        results.setdefault("machine", {})[part] = machine()
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(PATH, "w") as f:
            json.dump(results, f, indent=2, default=float)
    print(f"\nwrote {PATH}")


if __name__ == "__main__":
    main()

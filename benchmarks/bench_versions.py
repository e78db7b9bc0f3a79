"""Step time and compiled cost of optimizers against another checkout of the package.

A refactor of an optimizer must not make its step slower. This script loads the package
of another checkout (``--before DIR``, e.g. a ``git worktree`` of the old commit) under
the name ``optax_ext_old`` beside the current one and, on the same parameter tree and
gradients, times each configuration's jitted, donated update + apply round-robin against
its old self (:func:`benchlib.time_interleaved`); ``--trials`` fresh repeats give the
median ratio new/old and its range. It also reads the compiled program of each side
(XLA's ``cost_analysis``: bytes accessed and flops, and ``memory_analysis``' temporary
bytes), which do not depend on what else runs on the machine::

    git worktree add /tmp/before <commit>
    python benchmarks/bench_versions.py --before /tmp/before
    python benchmarks/bench_versions.py --before /tmp/before --only adafactor --trials 1

Prints a table and writes benchmarks/results/versions.json (``--out`` to rename).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax
from benchlib import gpt2_like_params, machine, n_params, random_like, table, time_interleaved
from benchlib import write_json as _write_json


def load_old(before: str):
    """The package of the checkout ``before``, importable as ``optax_ext_old``.

    A copy with ``optax_ext`` renamed (and ``scaling`` to ``scaling_old`` in its imports,
    so both sides use their own version of the lower package).
    """
    root = tempfile.mkdtemp(prefix="optax_ext_old_")
    for name, new in (("optax_ext", "optax_ext_old"), ("scaling", "scaling_old")):
        shutil.copytree(os.path.join(before, name), os.path.join(root, new))
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            with open(path) as fh:
                text = fh.read()
            text = re.sub(r"\boptax_ext\b", "optax_ext_old", text)
            text = re.sub(r"^(\s*)(from|import) scaling\b", r"\1\2 scaling_old", text, flags=re.M)
            text = re.sub(r"\bscaling\.(\w+)", r"scaling_old.\1", text)
            with open(path, "w") as fh:
                fh.write(text)
    sys.path.insert(0, root)
    return importlib.import_module("optax_ext_old")


def _with_extra(tx, **extra):
    """``tx`` with fixed extra arguments passed to every update (a step that passes them)."""

    def update_fn(updates, state, params=None, **_):
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def configs(pkg) -> dict:
    """name -> transform, built from ``pkg`` (``optax_ext`` or ``optax_ext_old``)."""
    adafactor = importlib.import_module(pkg + ".optimizers.adafactor").adafactor
    adax = importlib.import_module(pkg + ".optimizers.adax")
    amos = importlib.import_module(pkg + ".optimizers.amos").amos
    noise = importlib.import_module(pkg + ".noise_measurement").measure_noise_scale
    tiger = importlib.import_module(pkg + ".optimizers.tiger").tiger
    nan_guard = importlib.import_module(pkg + ".wrappers.nan_guard").nan_guard
    return {
        "tiger": lambda: tiger(1e-3),
        "tiger_k4": lambda: tiger(optax.cosine_decay_schedule(1e-3, 1000), accumulation_steps=4),
        "tiger_no_guards": lambda: tiger(1e-3, guard_nan=False, spike_factor=None),
        "nan_guard_adamw": lambda: nan_guard(optax.adamw(1e-3)),
        "adafactor": lambda: adafactor(),
        "adafactor_momentum": lambda: adafactor(momentum=0.9, weight_decay=1e-2),
        "adafactor_absolute": lambda: adafactor(
            1e-3, multiply_by_parameter_scale=False, clipping_threshold=None
        ),
        "adax": lambda: adax.adax(1e-3),
        "adaxw": lambda: adax.adaxw(1e-3),
        "amos": lambda: amos(1e-2),
        "amos_momentum": lambda: amos(1e-2, momentum=0.9),
        "noise+adam": lambda: _with_extra(
            optax.chain(noise(8.0), optax.adam(1e-3)),
            micro_grad_sq_norm=jnp.float32(1.0),
            accumulation_steps=4,
        ),
    }


def compiled_cost(tx, params, grads) -> dict:
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "flops": float(cost.get("flops", float("nan"))),
        "temp_bytes": int(getattr(mem, "temp_size_in_bytes", -1)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", required=True, help="a checkout of the old version")
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--out", default="versions")
    args = ap.parse_args()

    load_old(args.before)
    new, old = configs("optax_ext"), configs("optax_ext_old")
    names = args.only or list(new)
    params = gpt2_like_params(args.width, args.layers, args.vocab, context=512)
    grads = random_like(params, seed=1)
    rows = []
    for name in names:
        row = {"config": name}
        for side, cfg in (("old", old), ("new", new)):
            for key, value in compiled_cost(cfg[name](), params, grads).items():
                row[f"{side}_{key}"] = value
        ratios = []
        for _ in range(args.trials):
            res = time_interleaved(
                {"old": old[name](), "new": new[name]()}, params, grads, repeats=args.repeats
            )
            ratios.append(res["new"]["median_s"] / res["old"]["median_s"])
            row.setdefault("old_median_s", []).append(res["old"]["median_s"])
            row.setdefault("new_median_s", []).append(res["new"]["median_s"])
            assert res["new"]["compilations"] == 1 and res["old"]["compilations"] == 1
        row["ratio"] = statistics.median(ratios)
        row["ratio_min"], row["ratio_max"] = min(ratios), max(ratios)
        row["bytes_ratio"] = row["new_bytes_accessed"] / row["old_bytes_accessed"]
        row["flops_ratio"] = row["new_flops"] / row["old_flops"]
        rows.append(row)
        print(
            name,
            f"time {row['ratio']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]",
            f"bytes {row['bytes_ratio']:.3f} flops {row['flops_ratio']:.3f}",
            f"temp {row['old_temp_bytes']} -> {row['new_temp_bytes']}",
            flush=True,
        )
    fmt = lambda x: f"{x:.3f}"
    print(
        table(
            rows,
            [
                ("config", "config", str),
                ("ratio", "time new/old", fmt),
                ("ratio_min", "min", fmt),
                ("ratio_max", "max", fmt),
                ("bytes_ratio", "bytes new/old", fmt),
                ("flops_ratio", "flops new/old", fmt),
            ],
        )
    )
    header = {"machine": machine(), "params": n_params(params), "before": args.before}
    header.update(trials=args.trials, repeats=args.repeats)
    print("wrote", _write_json(args.out, {"header": header, "rows": rows}))


if __name__ == "__main__":
    main()

"""Per-leaf overhead: an update over ≥500 small leaves, leaf by leaf versus flattened.

On a tree of many small leaves each leaf is its own small kernel and the fixed cost per
leaf dominates. ``optax.flatten(tx)`` ravels params, gradients and state into one vector
so the update is one pass: exactly right for optimizers whose update does not depend on
a leaf's path or shape (Lion or Tiger with ``param_scaling=None`` and ``mask=True``,
AdamW); path rules and per-tensor RMS scales need the leaves. The donated, interleaved
median of each, on the many-leaf tree and on one leaf of the same size::

    python benchmarks/bench_flatten.py

Prints a table and writes benchmarks/results/flatten.json.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from benchlib import (
    machine,
    many_leaf_params,
    n_params,
    random_like,
    table,
    time_interleaved,
    write_json,
)

import optax_ext as ox

CANDIDATES = {
    "lion": lambda: ox.lion(1e-4, mask=True),
    "tiger (no path rules)": lambda: ox.tiger(1e-3, param_scaling=None, mask=True),
    "optax.adamw": lambda: optax.adamw(1e-3),
}


def main():
    many = many_leaf_params()
    one = {"w": jnp.zeros(n_params(many), jnp.float32)}
    rows = []
    for name, make in CANDIDATES.items():
        t = time_interleaved(
            {"per-leaf": make(), "flattened": optax.flatten(make())}, many, random_like(many), 25
        )
        single = time_interleaved({"one leaf": make()}, one, random_like(one), 25)
        rows.append(
            {
                "optimizer": name,
                "per_leaf_ms": t["per-leaf"]["median_s"] * 1e3,
                "flattened_ms": t["flattened"]["median_s"] * 1e3,
                "one_leaf_ms": single["one leaf"]["median_s"] * 1e3,
            }
        )
        rows[-1]["speedup"] = rows[-1]["per_leaf_ms"] / rows[-1]["flattened_ms"]
        print(
            f"  {name}: {rows[-1]['per_leaf_ms']:.2f} -> {rows[-1]['flattened_ms']:.2f} ms",
            flush=True,
        )
    f2 = lambda x: f"{x:.2f}"
    print(f"\n{len(many['params']) * 4} leaves, {n_params(many):,} parameters")
    print(
        table(
            rows,
            [
                ("optimizer", "optimizer", str),
                ("per_leaf_ms", "per-leaf ms", f2),
                ("flattened_ms", "optax.flatten ms", f2),
                ("one_leaf_ms", "one leaf ms", f2),
                ("speedup", "speed-up", f2),
            ],
        )
    )
    print("wrote", write_json("flatten", {"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()

"""Per-leaf overhead: an update over ≥500 small leaves, leaf by leaf versus flattened.

On a tree of many small leaves the fixed cost per leaf dominates. Two flattened paths:

- ``optax.flatten(tx)`` ravels gradients and params into one vector inside the step and
  keeps the state as one vector: one pass of arithmetic, but the step still takes and
  returns every parameter leaf;
- parameters kept flat between steps (``jax.flatten_util.ravel_pytree`` once, the model
  unravels inside its loss), so the step sees one leaf.

Both are exactly right for updates that do not depend on a leaf's path, shape or
per-leaf reductions (AdamW; Lion or Tiger with ``param_scaling=None``, ``mask=True``,
``guard_nan=False``). A no-op update (adding zeros) gives the price of passing the
leaves in and out of a jitted step. The donated, interleaved median of each::

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
    "no-op (adds zeros)": lambda: optax.set_to_zero(),
    "lion": lambda: ox.lion(1e-4, mask=True),
    "tiger (no path rules, no guard)": lambda: ox.tiger(
        1e-3, param_scaling=None, mask=True, guard_nan=False
    ),
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
        row = {
            "optimizer": name,
            "per_leaf_ms": t["per-leaf"]["median_s"] * 1e3,
            "flattened_ms": t["flattened"]["median_s"] * 1e3,
            "one_leaf_ms": single["one leaf"]["median_s"] * 1e3,
        }
        row["flatten_speedup"] = row["per_leaf_ms"] / row["flattened_ms"]
        row["flat_params_speedup"] = row["per_leaf_ms"] / row["one_leaf_ms"]
        rows.append(row)
        print(
            f"  {name}: {row['per_leaf_ms']:.2f} -> {row['flattened_ms']:.2f} "
            f"-> {row['one_leaf_ms']:.2f} ms",
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
                ("one_leaf_ms", "params kept flat ms", f2),
                ("flatten_speedup", "optax.flatten speed-up", f2),
                ("flat_params_speedup", "kept-flat speed-up", f2),
            ],
        )
    )
    print("wrote", write_json("flatten", {"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()

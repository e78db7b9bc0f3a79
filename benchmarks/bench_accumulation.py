"""Gradient accumulation: time per micro-step and optimizer-state bytes against optax.MultiSteps.

Pairs (k = 8 micro-batches per update by default):

- ``accumulate_gradients(adamw, k)`` vs ``optax.MultiSteps(adamw, k)``: same state (an f32
  accumulator beside Adam's moments); ours runs the inner update on every micro-step and
  selects with ``jnp.where`` (no ``lax.cond``), so its micro-step time is the cost of that.
- ``sgdm(accumulation_steps=k)`` vs ``MultiSteps(optax.sgd(momentum), k)`` and
  ``tiger(accumulation_steps=k)`` vs ``MultiSteps(optax.lion(b1=β, b2=β), k)``:
  accumulation inside the momentum, one buffer instead of two.
- ``nan_guard(adamw)`` vs ``optax.apply_if_finite(adamw)`` on finite gradients: the cost
  of selecting the skip with ``jnp.where`` instead of ``lax.cond``.

Every micro-step (update + apply) is jitted with params and state donated, warmed up for a
whole cycle, then cycles of ours and optax's alternate; each micro-step is timed alone.
The ``copy`` instructions in each compiled step (a donated buffer copied) are counted.
The copy bandwidth of a donated ``x * 1.0001`` over the params is measured in the same run
for reference::

    python benchmarks/bench_accumulation.py                  # ~16M floats
    python benchmarks/bench_accumulation.py --size 200000 --cycles 2   # quick check

Prints a table and writes JSON to benchmarks/results/accumulation.json (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from benchlib import (
    make_step,
    random_like,
    run_header,
    sized_params,
    table,
    write_json,
)

from optax_ext._common import tree_bytes
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.nan_guard import nan_guard


def hlo_copies(step, params, state, grads) -> int:
    """Number of ``copy`` instructions in the compiled step (a donated buffer copied)."""
    text = step.lower(params, state, grads).compile().as_text()
    return sum(1 for line in text.splitlines() if " copy(" in line)


def time_cycles(candidates: dict, params, grads, k: int, cycles: int) -> dict:
    """Per-micro-step times of each candidate, whole cycles alternating after a warm-up."""
    runs = {}
    for name, tx in candidates.items():
        p = jax.tree.map(jnp.copy, params)
        step = make_step(tx)
        state = tx.init(p)
        copies = hlo_copies(step, p, state, grads)
        for _ in range(k):  # compile + one warm-up cycle (both kinds of micro-step)
            p, state = jax.block_until_ready(step(p, state, grads))
        runs[name] = {
            "step": step,
            "p": p,
            "state": state,
            "times": [],
            "cycle_times": [],
            "copies": copies,
        }
    for _ in range(cycles):
        for run in runs.values():
            p, state, total = run["p"], run["state"], 0.0
            for _ in range(k):
                t0 = time.perf_counter()
                p, state = jax.block_until_ready(run["step"](p, state, grads))
                dt = time.perf_counter() - t0
                run["times"].append(dt)
                total += dt
            run["p"], run["state"] = p, state
            run["cycle_times"].append(total)
    out = {}
    for name, run in runs.items():
        out[name] = {
            "median_micro_step_s": statistics.median(run["times"]),
            "median_cycle_s": statistics.median(run["cycle_times"]),
            "compilations": run["step"]._cache_size(),
            "hlo_copies": run["copies"],
            "state_bytes": tree_bytes(jax.eval_shape(candidates[name].init, params)),
        }
    return out


def pairs(k: int, beta: float = 0.965) -> dict:
    """pair name -> {"ours": transform, "optax": its optax counterpart}."""
    return {
        "adamw": {
            "ours": accumulate_gradients(optax.adamw(1e-3), k),
            "optax": optax.MultiSteps(optax.adamw(1e-3), k),
        },
        "sgdm": {
            "ours": sgdm(1e-2, 0.9, accumulation_steps=k),
            "optax": optax.MultiSteps(optax.sgd(1e-2, momentum=0.9), k),
        },
        # not accumulation, but the same trade-off: a where-selected skip vs optax's lax.cond
        "guard": {
            "ours": nan_guard(optax.adamw(1e-3)),
            "optax": optax.apply_if_finite(optax.adamw(1e-3), 10),
        },
        "tiger": {
            "ours": tiger(1e-3, beta, 0.0, accumulation_steps=k, param_scaling=None),
            "optax": optax.MultiSteps(optax.lion(1e-3, beta, beta), k),
        },
    }


COLUMNS = [
    ("pair", "pair", str),
    ("impl", "impl", str),
    ("median_micro_step_s", "ms/micro", lambda s: f"{1e3 * s:.3f}"),
    ("median_cycle_s", "ms/cycle", lambda s: f"{1e3 * s:.3f}"),
    ("state_over_params", "state/params", lambda x: f"{x:.2f}"),
    ("hlo_copies", "copies", str),
    ("ours_over_optax_time", "time ratio", lambda x: f"{x:.2f}x"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16_000_000, help="about this many floats")
    ap.add_argument("--k", type=int, default=8, help="micro-batches per update")
    ap.add_argument("--cycles", type=int, default=5, help="timed cycles per candidate")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/accumulation.json)")
    args = ap.parse_args(argv)
    k = args.k

    params = sized_params(args.size)
    grads = random_like(params)
    results = dict(run_header(params), k=k, cycles=args.cycles, pairs={})
    param_bytes, copy_s = results["param_bytes"], results["copy_s"]
    print(
        f"{results['params'] / 1e6:.2f}M floats ({param_bytes / 1e6:.1f} MB) on "
        f"{results['machine']['device']}, k={k}, donated copy {1e3 * copy_s:.2f} ms, "
        f"median over {args.cycles} cycles"
    )
    rows = []
    for name, candidates in pairs(k).items():
        timing = time_cycles(candidates, params, grads, k, args.cycles)
        ratio = timing["ours"]["median_micro_step_s"] / timing["optax"]["median_micro_step_s"]
        results["pairs"][name] = {"ours_over_optax_time": ratio, **timing}
        for impl, r in timing.items():
            rows.append(
                {
                    "pair": name,
                    "impl": impl,
                    **r,
                    "state_over_params": r["state_bytes"] / param_bytes,
                    "ours_over_optax_time": ratio if impl == "ours" else None,
                }
            )
            if r["compilations"] != 1:
                print(f"  warning: {name}/{impl} compiled {r['compilations']} times")
    print(table(rows, COLUMNS))
    print("wrote", write_json("accumulation", results, args.out))
    return results


if __name__ == "__main__":
    main()

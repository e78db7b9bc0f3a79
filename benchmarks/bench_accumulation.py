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
The copy bandwidth of a donated ``x * 1.0001`` over the params is measured in the same run
for reference::

    python benchmarks/bench_accumulation.py                  # ~16M floats
    python benchmarks/bench_accumulation.py --size 200000 --cycles 2   # quick check

Prints a table and writes JSON to benchmarks/results/accumulation.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optax_ext._common import tree_bytes  # noqa: E402
from optax_ext.optimizers.sgdm import sgdm  # noqa: E402
from optax_ext.wrappers.accumulation import accumulate_gradients  # noqa: E402
from optax_ext.wrappers.nan_guard import nan_guard  # noqa: E402

try:
    from optax_ext.optimizers.tiger import tiger  # noqa: E402
except ImportError:  # pragma: no cover - Tiger is optional for this benchmark
    tiger = None


def make_params(n_floats: int, seed: int = 0):
    """A transformer-like tree of about ``n_floats`` float32 values (Flax names)."""
    width = max(8, int(math.sqrt(n_floats / 13)) // 8 * 8)  # 12 w² per layer + embedding
    layers = max(1, round((n_floats - width * width) / (12 * width * width)))
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(0.02 * rng.standard_normal(shape, np.float32))
    params = {"embed": {"embedding": n(width, width)}}
    for i in range(layers):
        params[f"layer_{i}"] = {
            "attn": {"kernel": n(width, 4 * width), "bias": jnp.zeros(4 * width)},
            "mlp_in": {"kernel": n(width, 4 * width), "bias": jnp.zeros(4 * width)},
            "mlp_out": {"kernel": n(4 * width, width), "bias": jnp.zeros(width)},
            "norm": {"scale": jnp.ones(width), "bias": jnp.zeros(width)},
        }
    return {"params": params}


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def copy_seconds(nbytes: int, repeats: int) -> float:
    """Median seconds of a donated in-place ``x * 1.0001`` over ``nbytes`` of float32."""
    x = jnp.ones(max(1, nbytes // 4), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
        runs[name] = {"step": step, "p": p, "state": state, "times": [], "cycle_times": [],
                      "copies": copies}
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16_000_000, help="about this many floats")
    ap.add_argument("--k", type=int, default=8, help="micro-batches per update")
    ap.add_argument("--cycles", type=int, default=5, help="timed cycles per candidate")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "accumulation.json"))
    args = ap.parse_args(argv)
    k = args.k

    params = make_params(args.size)
    grads = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), x.dtype),
        params)
    param_bytes = tree_bytes(params)
    beta = 0.965
    pairs = {
        "adamw": {"ours": accumulate_gradients(optax.adamw(1e-3), k),
                  "optax": optax.MultiSteps(optax.adamw(1e-3), k)},
        "sgdm": {"ours": sgdm(1e-2, 0.9, accumulation_steps=k),
                 "optax": optax.MultiSteps(optax.sgd(1e-2, momentum=0.9), k)},
    }
    # not accumulation, but the same trade-off: a where-selected skip vs optax's lax.cond
    pairs["guard"] = {"ours": nan_guard(optax.adamw(1e-3)),
                      "optax": optax.apply_if_finite(optax.adamw(1e-3), 10)}
    if tiger is not None:
        pairs["tiger"] = {
            "ours": tiger(1e-3, beta, 0.0, accumulation_steps=k, param_scaling=None),
            "optax": optax.MultiSteps(optax.lion(1e-3, beta, beta), k)}

    copy_s = copy_seconds(param_bytes, 15)
    results = {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        "param_bytes": param_bytes,
        "k": k,
        "cycles": args.cycles,
        "copy_s": copy_s,
        "pairs": {},
    }
    print(f"{results['params'] / 1e6:.2f}M floats ({param_bytes / 1e6:.1f} MB) on "
          f"{results['device']}, k={k}, donated copy {1e3 * copy_s:.2f} ms, "
          f"median over {args.cycles} cycles")
    print(f"{'pair':<7}{'impl':<7}{'ms/micro':>10}{'ms/cycle':>10}{'state/params':>14}"
          f"{'copies':>8}{'time ratio':>12}")
    for name, candidates in pairs.items():
        timing = time_cycles(candidates, params, grads, k, args.cycles)
        ratio = timing["ours"]["median_micro_step_s"] / timing["optax"]["median_micro_step_s"]
        results["pairs"][name] = {"ours_over_optax_time": ratio, **timing}
        for impl, r in timing.items():
            shown = f"{ratio:.2f}x" if impl == "ours" else ""
            print(f"{name:<7}{impl:<7}{1e3 * r['median_micro_step_s']:>10.3f}"
                  f"{1e3 * r['median_cycle_s']:>10.3f}{r['state_bytes'] / param_bytes:>14.2f}"
                  f"{r['hlo_copies']:>8}{shown:>12}")
            if r["compilations"] != 1:
                print(f"  warning: {name}/{impl} compiled {r['compilations']} times")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

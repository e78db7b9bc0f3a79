"""Overhead of measuring the gradient noise scale: chain(measure_noise_scale, adamw) vs adamw.

``optax_ext.noise_measurement.measure_noise_scale`` (``ox.measure_noise_scale``) adds
one squared-norm reduction over the gradients to the step (and a few scalars: EMAs and one
row of the small ring of raw estimates the current value is read from). Two pairs are
timed on the same ~10M-float tree:

- ``accum`` (plain ``jit``, one device): the gradient-accumulation path, where the step
  receives ``micro_grad_sq_norm`` and ``accumulation_steps`` as extra arguments, against
  ``optax.adamw`` alone.
- ``pmap`` (when more than one local device): ``chain(measure(axis_name), adamw)``
  (which averages the gradients itself) against ``lax.pmean`` + ``optax.adamw``.

Each step (update + apply) is jitted (pmapped) with params and state donated, warmed up,
then the two candidates alternate step by step; the median step time and the ratio are
reported, with the copy bandwidth of a donated ``x * 1.0001`` over the params as a floor::

    python benchmarks/bench_noise.py                       # ~10M floats
    python benchmarks/bench_noise.py --size 100000 --steps 5   # quick check

Prints a table and writes JSON to benchmarks/results/noise.json (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from benchlib import (
    random_like,
    run_header,
    sized_params,
    table,
    write_json,
)

from optax_ext.noise_measurement import measure_noise_scale


def accum_steps(lr: float, batch: int, k: int):
    """Jitted donated steps: adamw alone, and measure (accumulation extra args) + adamw."""
    base = optax.adamw(lr)
    measured = optax.chain(measure_noise_scale(batch), optax.adamw(lr))

    def plain(params, state, grads, micro_sq):
        del micro_sq
        updates, state = base.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def with_noise(params, state, grads, micro_sq):
        updates, state = measured.update(
            grads, state, params, micro_grad_sq_norm=micro_sq, accumulation_steps=k
        )
        return optax.apply_updates(params, updates), state

    jit = lambda f: jax.jit(f, donate_argnums=(0, 1))
    return {"adamw": (base, jit(plain)), "measure+adamw": (measured, jit(with_noise))}


def pmap_steps(lr: float, batch: int):
    """Pmapped donated steps: pmean + adamw, and measure(axis_name) + adamw."""
    base = optax.adamw(lr)
    measured = optax.chain(measure_noise_scale(batch, axis_name="d"), optax.adamw(lr))

    def plain(params, state, grads, micro_sq):
        del micro_sq
        grads = jax.lax.pmean(grads, "d")
        updates, state = base.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def with_noise(params, state, grads, micro_sq):
        del micro_sq
        updates, state = measured.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    pm = lambda f: jax.pmap(f, axis_name="d", donate_argnums=(0, 1))
    return {"pmean+adamw": (base, pm(plain)), "measure+adamw": (measured, pm(with_noise))}


def time_pair(candidates: dict, params, grads, micro_sq, steps: int, replicate: int = 0):
    rep = (
        (lambda t: jax.tree.map(lambda x: jnp.broadcast_to(x, (replicate, *x.shape)), t))
        if replicate
        else (lambda t: t)
    )
    runs = {}
    for name, (tx, step) in candidates.items():
        p = rep(jax.tree.map(jnp.copy, params))
        state = rep(tx.init(params))
        for _ in range(2):  # compile + warm-up
            p, state = jax.block_until_ready(step(p, state, grads, micro_sq))
        runs[name] = {"step": step, "p": p, "state": state, "times": []}
    for _ in range(steps):  # interleaved, step by step
        for run in runs.values():
            t0 = time.perf_counter()
            run["p"], run["state"] = jax.block_until_ready(
                run["step"](run["p"], run["state"], grads, micro_sq)
            )
            run["times"].append(time.perf_counter() - t0)
    out = {}
    for name, run in runs.items():
        cache = getattr(run["step"], "_cache_size", None)
        out[name] = {
            "median_step_s": statistics.median(run["times"]),
            "compilations": cache() if cache else None,
        }
    return out


COLUMNS = [
    ("pair", "pair", str),
    ("impl", "impl", str),
    ("median_step_s", "ms/step", lambda s: f"{1e3 * s:.3f}"),
    ("copies_of_floor", "copies of floor", lambda x: f"{x:.2f}"),
    ("ratio", "ratio", lambda x: f"{x:.3f}x"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10_000_000, help="about this many floats")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per candidate")
    ap.add_argument("--batch", type=int, default=32, help="per-device / micro batch size")
    ap.add_argument("--k", type=int, default=8, help="accumulation steps (accum pair)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/noise.json)")
    args = ap.parse_args(argv)

    params = sized_params(args.size)
    grads = random_like(params)
    micro_sq = jnp.float32(2.0 * sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads)))
    results = dict(run_header(params), steps=args.steps, pairs={})
    param_bytes, copy_s = results["param_bytes"], results["copy_s"]
    print(
        f"{results['params'] / 1e6:.2f}M floats ({param_bytes / 1e6:.1f} MB) on "
        f"{results['machine']['device']}, donated copy {1e3 * copy_s:.2f} ms, "
        f"median of {args.steps}"
    )
    pairs = {"accum": (accum_steps(1e-3, args.batch, args.k), grads, micro_sq, 0)}
    n_dev = jax.local_device_count()
    if n_dev > 1:
        dev_grads = jax.tree.map(lambda g: jnp.broadcast_to(g, (n_dev, *g.shape)), grads)
        pairs["pmap"] = (
            pmap_steps(1e-3, args.batch),
            dev_grads,
            jnp.zeros((n_dev,), jnp.float32),
            n_dev,
        )
    rows = []
    for pair, (cands, g, m, rep) in pairs.items():
        timing = time_pair(cands, params, g, m, args.steps, rep)
        base, ours = list(timing)
        ratio = timing[ours]["median_step_s"] / timing[base]["median_step_s"]
        results["pairs"][pair] = {"measure_over_base_time": ratio, "devices": max(rep, 1), **timing}
        for impl, r in timing.items():
            rows.append(
                {
                    "pair": pair,
                    "impl": impl,
                    **r,
                    "copies_of_floor": r["median_step_s"] / copy_s,
                    "ratio": ratio if impl == ours else None,
                }
            )
            if r["compilations"] not in (None, 1):
                print(f"  warning: {pair}/{impl} compiled {r['compilations']} times")
    print(table(rows, COLUMNS))
    print("wrote", write_json("noise", results, args.out))
    return results


if __name__ == "__main__":
    main()

"""Step time of float, 8-bit and 4-bit optimizer states (Tiger, AdamW).

For each optimizer, the jitted update + apply (params and state donated, the returned
buffers fed back in) with its state in float32, in 8 bits and in 4 bits
(``ox.quantize_state``), all timed round-robin after a warm-up
(``benchlib.time_interleaved``), ``--trials`` trials with fresh buffers. Reported per
trial and as the median over trials: milliseconds per step and the ratio to the float
state's step of the same trial (the machine's speed drifts; a ratio from one
round-robin is what to read). Also: state bytes per parameter, and from the compiled
step its fusions and temporary bytes (``memory_analysis``), which do not depend on the
machine's load::

    python benchmarks/bench_quantize.py            # a GPT-2-shaped tree of width 512, 8.9M
    python benchmarks/bench_quantize.py --layers 1 --trials 1 --repeats 5   # a quick check

Prints a table and writes benchmarks/results/quantize_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import jax
import optax
from benchlib import (
    gpt2_like_params,
    hlo_summary,
    machine,
    make_step,
    n_params,
    random_like,
    table,
    time_interleaved,
    write_json,
)

import optax_ext as ox


def candidates(name: str) -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The state variants of one optimizer (bitsandbytes' threshold: leaves of ≥ 4096)."""
    make = {
        "tiger": lambda: ox.tiger(1e-3),
        "adamw": lambda: optax.adamw(1e-3),
    }[name]
    return {
        f"{name} float32": make,
        f"{name} 8-bit": lambda: ox.quantize_state(make()),
        f"{name} 4-bit": lambda: ox.quantize_state(make(), bits=4),
    }


def compiled_counts(tx, params, grads) -> dict:
    """Fusions and temporary bytes of the donated step's compiled program."""
    state = jax.eval_shape(tx.init, params)
    compiled = make_step(tx).lower(params, state, grads).compile()
    memory = compiled.memory_analysis()
    return {
        "fusions": hlo_summary(compiled.as_text())["fusions"],
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
    }


def measure(params, grads, trials: int, repeats: int) -> list[dict]:
    count = n_params(params)
    rows = []
    for name in ("tiger", "adamw"):
        makes = candidates(name)
        per_trial = []
        for _ in range(trials):
            per_trial.append(
                time_interleaved({k: m() for k, m in makes.items()}, params, grads, repeats=repeats)
            )
        base = f"{name} float32"
        for variant, make in makes.items():
            ms = [t[variant]["median_s"] * 1e3 for t in per_trial]
            ratios = [t[variant]["median_s"] / t[base]["median_s"] for t in per_trial]
            rows.append(
                {
                    "optimizer": variant,
                    "ms": statistics.median(ms),
                    "ms_trials": ms,
                    "ratio_to_float": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "compilations": max(t[variant]["compilations"] for t in per_trial),
                    "state_bytes_per_param": per_trial[0][variant]["state_bytes"] / count,
                    **compiled_counts(make(), params, grads),
                }
            )
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="quantize_speed")
    args = parser.parse_args(argv)
    params = gpt2_like_params(args.width, args.layers, args.vocab, context=1024)
    grads = random_like(params)
    rows = measure(params, grads, args.trials, args.repeats)
    results = {
        "machine": machine(),
        "tree": {
            "width": args.width,
            "layers": args.layers,
            "vocab": args.vocab,
            "params": n_params(params),
        },
        "trials": args.trials,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"GPT-2-shaped tree, {n_params(params) / 1e6:.1f}M float32 parameters")
    print(
        table(
            rows,
            [
                ("optimizer", "state", str),
                ("ms", "ms/step", lambda x: f"{x:.1f}"),
                ("ratio_to_float", "× float", lambda x: f"{x:.2f}"),
                ("ratio_min", "min", lambda x: f"{x:.2f}"),
                ("ratio_max", "max", lambda x: f"{x:.2f}"),
                ("state_bytes_per_param", "B/param", lambda x: f"{x:.3f}"),
                ("fusions", "fusions", str),
                ("temp_bytes", "temp MB", lambda x: f"{x / 1e6:.1f}"),
            ],
        )
    )
    print("wrote", write_json(args.out, results))
    return results


if __name__ == "__main__":
    main()

"""Speed of our Lion and AdaFactor against optax's on a GPT-2-like parameter tree.

Each optimizer step (update + apply) is jitted with params and state donated, warmed up,
then timed interleaved with its optax counterpart (median of many repeats). The bytes a
perfect step must move, divided by the time, are compared with the bandwidth of a donated
in-place multiply measured in the same run::

    python benchmarks/bench_lion_adafactor.py                 # ~18M params
    python benchmarks/bench_lion_adafactor.py --scale small   # a quick check
    python benchmarks/bench_lion_adafactor.py --width 1024 --layers 8 --vocab 32768

Prints a table and writes JSON to benchmarks/results/lion_adafactor.json (``--out``).
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

from optax_ext.optimizers.adafactor import adafactor  # noqa: E402
from optax_ext.optimizers.lion import lion  # noqa: E402

SCALES = {
    # width, layers, vocab, context
    "small": (128, 2, 512, 128),
    "default": (512, 5, 4096, 1024),  # ~18.3M parameters
    "large": (1024, 8, 32768, 1024),  # ~135M parameters (GPU)
}


def gpt2_like_params(width: int, layers: int, vocab: int, context: int, seed: int = 0):
    """A GPT-2-shaped tree with Flax names (embeddings, attention, MLP, LayerNorms)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: jnp.asarray(0.02 * rng.standard_normal(shape, np.float32))
    norm = lambda: {"scale": jnp.ones(width), "bias": jnp.zeros(width)}
    params = {"wte": {"embedding": n(vocab, width)}, "wpe": {"embedding": n(context, width)}}
    for i in range(layers):
        params[f"h_{i}"] = {
            "ln_1": norm(),
            "attn": {
                "c_attn": {"kernel": n(width, 3 * width), "bias": jnp.zeros(3 * width)},
                "c_proj": {"kernel": n(width, width), "bias": jnp.zeros(width)},
            },
            "ln_2": norm(),
            "mlp": {
                "c_fc": {"kernel": n(width, 4 * width), "bias": jnp.zeros(4 * width)},
                "c_proj": {"kernel": n(4 * width, width), "bias": jnp.zeros(width)},
            },
        }
    params["ln_f"] = norm()
    return {"params": params}


def tree_nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if getattr(x, "ndim", 0))


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of a donated in-place ``x * 1.0001`` over ``nbytes`` (read + write)."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    f = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = jax.block_until_ready(f(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times) / 1e9


def time_interleaved(candidates: dict, params, grads, repeats: int) -> dict:
    """Median seconds per step of each candidate, timed round-robin after a warm-up."""
    runs = {}
    for name, tx in candidates.items():
        p = jax.tree.map(jnp.copy, params)
        step = make_step(tx)
        state = tx.init(p)
        p, state = jax.block_until_ready(step(p, state, grads))  # compile + warm-up
        runs[name] = [step, p, state, []]
    for _ in range(repeats):
        for run in runs.values():
            step, p, state, times = run
            t0 = time.perf_counter()
            p, state = jax.block_until_ready(step(p, state, grads))
            times.append(time.perf_counter() - t0)
            run[1], run[2] = p, state
    out = {}
    for name, (step, _, state, times) in runs.items():
        out[name] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "compilations": step._cache_size(),
            "state_bytes": tree_nbytes(state),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="default")
    ap.add_argument("--width", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "lion_adafactor.json"))
    args = ap.parse_args(argv)

    width, layers, vocab, context = SCALES[args.scale]
    width, layers = args.width or width, args.layers or layers
    vocab, context = args.vocab or vocab, args.context or context
    params = gpt2_like_params(width, layers, vocab, context)
    grads = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), x.dtype),
        params,
    )
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    param_bytes = tree_nbytes(params)

    pairs = {
        # (candidates, bytes a perfect step moves in units of the param bytes)
        "lion": ({"ours": lion(1e-4, 0.9, 0.99, mask=True),
                  "optax": optax.lion(1e-4, 0.9, 0.99)}, 5),  # read θ g m, write θ m
        # read θ g, write θ; AdamW is the yardstick AdaFactor should not be slower than
        "adafactor": ({"ours": adafactor(1e-3, mask=True),
                       "optax": optax.adafactor(1e-3),
                       "adamw": optax.adamw(1e-3)}, 3),
    }
    bandwidth = copy_bandwidth(param_bytes, args.repeats)
    results = {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "params": n_params,
        "param_bytes": param_bytes,
        "shape": {"width": width, "layers": layers, "vocab": vocab, "context": context},
        "repeats": args.repeats,
        "copy_GBps": bandwidth,
        "optimizers": {},
    }
    print(f"{n_params / 1e6:.1f}M params ({param_bytes / 1e6:.0f} MB) on {results['device']}, "
          f"donated copy {bandwidth:.1f} GB/s, median of {args.repeats}")
    print(f"{'optimizer':<11}{'impl':<7}{'ms/step':>9}{'GB/s':>8}{'of copy':>9}"
          f"{'state MB':>10}{'ratio':>8}")
    for name, (candidates, passes) in pairs.items():
        timing = time_interleaved(candidates, params, grads, args.repeats)
        floor_bytes = passes * param_bytes
        for r in timing.values():
            r["GBps"] = floor_bytes / r["median_s"] / 1e9
            r["fraction_of_copy"] = r["GBps"] / bandwidth
        ratio = timing["optax"]["median_s"] / timing["ours"]["median_s"]
        results["optimizers"][name] = {"floor_bytes": floor_bytes, "speedup_vs_optax": ratio,
                                       **timing}
        for impl, r in timing.items():
            shown = f"{ratio:.2f}x" if impl == "ours" else ""
            print(f"{name:<11}{impl:<7}{1e3 * r['median_s']:>9.2f}{r['GBps']:>8.1f}"
                  f"{r['fraction_of_copy']:>9.0%}{r['state_bytes'] / 1e6:>10.2f}{shown:>8}")
            if r["compilations"] != 1:
                print(f"  warning: {name}/{impl} compiled {r['compilations']} times")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

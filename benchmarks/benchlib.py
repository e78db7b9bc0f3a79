"""Shared pieces of the benchmarks: parameter trees, donated steps, interleaved timing.

How we time (benchmarks/RESULTS.md says more): every step is jitted with
params and state donated (updated in place), warmed up, then all candidates are timed
round-robin in the same run and the median of many repeats is reported, next to the
bandwidth of a donated in-place copy measured in the same run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optax_ext._common import tree_bytes  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

#: GPT-2 small: width 768, 12 layers, vocabulary 50257, context 1024 (≈124M parameters).
GPT2_SMALL = dict(width=768, layers=12, vocab=50257, context=1024)


def gpt2_like_params(
    width=768, layers=12, vocab=50257, context=1024, *, abstract=False, dtype=jnp.float32, seed=0
):
    """A GPT-2-shaped parameter tree with Flax names (embeddings, attention, MLP, norms).

    ``abstract=True`` returns ``jax.ShapeDtypeStruct`` leaves (for memory counting
    without allocating).
    """
    rng = np.random.default_rng(seed)

    def leaf(*shape, value=None):
        if abstract:
            return jax.ShapeDtypeStruct(shape, dtype)
        if value is not None:
            return jnp.full(shape, value, dtype)
        return jnp.asarray(0.02 * rng.standard_normal(shape, np.float32), dtype)

    norm = lambda: {"scale": leaf(width, value=1.0), "bias": leaf(width, value=0.0)}
    dense = lambda i, o: {"kernel": leaf(i, o), "bias": leaf(o, value=0.0)}
    params = {"wte": {"embedding": leaf(vocab, width)}, "wpe": {"embedding": leaf(context, width)}}
    for i in range(layers):
        params[f"h_{i}"] = {
            "ln_1": norm(),
            "attn": {"c_attn": dense(width, 3 * width), "c_proj": dense(width, width)},
            "ln_2": norm(),
            "mlp": {"c_fc": dense(width, 4 * width), "c_proj": dense(4 * width, width)},
        }
    params["ln_f"] = norm()
    return {"params": params}


def many_leaf_params(n_blocks=128, width=64, *, dtype=jnp.float32, seed=0):
    """≥500 small leaves: ``n_blocks`` blocks of (kernel, bias, norm scale, norm bias)."""
    rng = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(0.05 * rng.standard_normal(s, np.float32), dtype)
    return {
        "params": {
            f"block_{i}": {
                "dense": {"kernel": n(width, width), "bias": n(width)},
                "norm": {"scale": 1 + n(width), "bias": n(width)},
            }
            for i in range(n_blocks)
        }
    }


def random_like(tree, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32), x.dtype), tree
    )


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def make_step(tx):
    """A jitted update + apply with params and state donated."""

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def copy_bandwidth(nbytes: int, repeats: int = 15) -> float:
    """GB/s of a donated in-place ``x * 1.0001`` over ``nbytes`` (counting read + write)."""
    copy = CopyStep(nbytes)
    for _ in range(repeats):
        copy.time_once()
    return copy.gbps()


class CopyStep:
    """A donated in-place ``x * 1.0001`` over ``nbytes``: the bandwidth floor of an update."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.step = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
        self.x = jax.block_until_ready(self.step(jnp.ones(nbytes // 4, jnp.float32)))
        self.times: list[float] = []

    def time_once(self) -> None:
        t0 = time.perf_counter()
        self.x = jax.block_until_ready(self.step(self.x))
        self.times.append(time.perf_counter() - t0)

    def gbps(self) -> float:
        return 2 * self.nbytes / statistics.median(self.times) / 1e9


def time_interleaved(
    candidates: dict[str, Any], params, grads, repeats: int = 15, copy: CopyStep | None = None
) -> dict:
    """Median seconds per step of each optimizer, timed round-robin after a warm-up.

    Also records the compile time of the first call and how many times each step
    compiled (it must be once). With ``copy``, a donated copy is timed in the same
    round-robin (read its ``gbps()`` after), so bandwidth fractions compare moments of
    the same machine state.
    """
    runs = {}
    for name, tx in candidates.items():
        p = jax.tree.map(jnp.copy, params)
        step = make_step(tx)
        state = tx.init(p)
        t0 = time.perf_counter()
        p, state = jax.block_until_ready(step(p, state, grads))
        first = time.perf_counter() - t0
        runs[name] = {"step": step, "p": p, "s": state, "times": [], "first_call_s": first}
    for _ in range(repeats):
        for run in runs.values():
            t0 = time.perf_counter()
            run["p"], run["s"] = jax.block_until_ready(run["step"](run["p"], run["s"], grads))
            run["times"].append(time.perf_counter() - t0)
        if copy is not None:
            copy.time_once()
    return {
        name: {
            "median_s": statistics.median(r["times"]),
            "min_s": min(r["times"]),
            "first_call_s": r["first_call_s"],
            "compilations": r["step"]._cache_size(),
            "state_bytes": tree_bytes(r["s"]),
        }
        for name, r in runs.items()
    }


def compile_seconds(tx, params, grads, repeats: int = 3) -> float:
    """Median wall time of lowering + compiling the donated step (no cache reuse)."""
    times = []
    for _ in range(repeats):
        step = make_step(tx)
        state = jax.eval_shape(tx.init, params)
        t0 = time.perf_counter()
        step.lower(params, state, grads).compile()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine while measuring
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
    }


def write_json(name: str, results: dict, path: str | None = None) -> str:
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=float)
    return path


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, Callable[[Any], str]]]) -> str:
    """A fixed-width text table: columns are (key, header, formatter)."""
    cells = [[h for _, h, _ in columns]] + [
        [fmt(r.get(k)) if r.get(k) is not None else "" for k, _, fmt in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sized_params(n_floats: int, **kwargs):
    """A GPT-2-shaped tree of about ``n_floats`` values: as many layers of one width as fit.

    Token and position embeddings are width × width each (2·width²), a layer 12·width².
    """
    width = max(8, int(math.sqrt(n_floats / 14)) // 8 * 8)
    layers = max(1, round((n_floats - 2 * width * width) / (12 * width * width)))
    return gpt2_like_params(width, layers, vocab=width, context=width, **kwargs)


def run_header(params) -> dict[str, Any]:
    """Machine, tree size and a donated in-place copy over the params' bytes (GB/s and s)."""
    nbytes = tree_bytes(params)
    gbps = copy_bandwidth(nbytes)
    return {
        "machine": machine(),
        "params": n_params(params),
        "param_bytes": nbytes,
        "copy_GBps": gbps,
        "copy_s": 2 * nbytes / (gbps * 1e9),
    }

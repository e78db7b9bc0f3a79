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
import re
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
    return counted_step(tx)[0]


def counted_step(tx):
    """(jitted donated step, counter): ``counter[0]`` is how many times the step was
    traced, which for fixed argument types is how many times it compiled (public API
    only, unlike a jitted function's private cache size)."""
    counter = [0]

    def step(params, state, grads):
        counter[0] += 1
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1)), counter


def optax_guarded(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` behind optax's own guards: ``optax.apply_if_finite`` (a step with a
    non-finite gradient is skipped) around ``optax.clip_by_global_norm(1.0)`` (a global
    norm, read from every leaf) and ``inner``. The closest optax has to Tiger's default
    NaN check and spike guard, which also read every leaf for a finiteness check and a
    global norm: the like-for-like counterpart of a guarded optimizer, beside the
    unguarded one."""
    return optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), inner), 10)


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
        step, traces = counted_step(tx)
        state = tx.init(p)
        t0 = time.perf_counter()
        p, state = jax.block_until_ready(step(p, state, grads))
        first = time.perf_counter() - t0
        runs[name] = {"step": step, "p": p, "s": state, "times": [], "first_call_s": first}
        runs[name]["traces"] = traces
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
            "compilations": r["traces"][0],
            "state_bytes": tree_bytes(r["s"]),
        }
        for name, r in runs.items()
    }


def time_functions(fns: dict[str, Callable], *args, repeats: int = 15) -> dict[str, float]:
    """Median seconds of each function of ``fns``, jitted, on the same ``args``: a
    warm-up call each, then ``repeats`` calls timed round-robin (this machine's speed
    drifts, so the functions compared share its moments)."""
    compiled = {name: jax.jit(f) for name, f in fns.items()}
    for f in compiled.values():
        jax.block_until_ready(f(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


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


# ----------------------------------------------------------- accelerator-sized trees


def on_device_like(tree, seed: int = 1, scale: float = 1.0):
    """Normal(0, scale²) arrays shaped like ``tree`` (arrays or ``ShapeDtypeStruct``),
    drawn on the default device: a 1B-parameter tree in seconds, where NumPy on the host
    would take minutes and a transfer."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    # one leaf at a time (not one jitted draw of the tree): no compile per tree, and the
    # peak memory is one float32 leaf beyond the result
    drawn = [
        (scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, drawn)


def one_leaf_params(n_floats: int, *, dtype=jnp.float32, abstract: bool = False):
    """One square-ish kernel of about ``n_floats`` values (sides multiples of 8)."""
    side = max(8, int(math.sqrt(n_floats)) // 8 * 8)
    shape = (side, max(8, n_floats // side // 8 * 8))
    leaf = jax.ShapeDtypeStruct(shape, dtype)
    tree = {"params": {"dense": {"kernel": leaf}}}
    return tree if abstract else on_device_like(tree, seed=0, scale=0.02)


def leaf_count_params(n_leaves: int, n_floats: int, *, dtype=jnp.float32, abstract=False):
    """About ``n_leaves`` leaves holding about ``n_floats`` values in all: blocks of
    (kernel, bias, norm scale, norm bias) of one width, like ``many_leaf_params``."""
    blocks = max(1, n_leaves // 4)
    width = max(2, int(math.sqrt(n_floats / blocks)))
    spec = lambda *s: jax.ShapeDtypeStruct(s, dtype)
    tree = {
        "params": {
            f"block_{i}": {
                "dense": {"kernel": spec(width, width), "bias": spec(width)},
                "norm": {"scale": spec(width), "bias": spec(width)},
            }
            for i in range(blocks)
        }
    }
    return tree if abstract else on_device_like(tree, seed=0, scale=0.05)


def abstract_gpt2(n_floats: int | None = None, *, dtype=jnp.float32):
    """A GPT-2-shaped tree of ``ShapeDtypeStruct`` leaves: GPT-2 small, or about
    ``n_floats`` values via ``sized_params``'s shapes."""
    if n_floats is None:
        return gpt2_like_params(**GPT2_SMALL, abstract=True, dtype=dtype)
    return sized_params(n_floats, abstract=True, dtype=dtype)


_HLO_NAME = re.compile(r"%[\w.\-]+")
_HLO_ATTRIBUTES = re.compile(
    r", (metadata|backend_config|frontend_attributes)=\{.*?\}(?=,|$)", re.M
)


def distinct_kernels(compiled_text: str) -> int:
    """How many of a compiled module's fused computations differ once instruction names
    and metadata are stripped: the kernels XLA:CPU generates code for (it compiles
    identical ones, e.g. the same update of same-shaped leaves, once)."""
    bodies = re.findall(
        r"^%(?:fused_computation|wrapped_)[\w.\-]* .*?^\}", compiled_text, re.M | re.S
    )
    # each body without its header line (the computation's own name and parameters)
    canonical = {_HLO_NAME.sub("%", _HLO_ATTRIBUTES.sub("", b.split("\n", 1)[-1])) for b in bodies}
    return len(canonical)


def hlo_summary(compiled_text: str) -> dict[str, int]:
    """Counts in a compiled module: the entry computation's fusions, library (YNNPACK)
    fusions, while loops and copies of arrays of rank >= 2 (a copied donated buffer is
    the smell BENCHMARKING.md describes); the distinct kernels (:func:`distinct_kernels`)
    and the instructions of all computations (what XLA's HLO passes walk)."""
    entry = compiled_text.split("ENTRY", 1)[-1]
    return {
        "fusions": len(re.findall(r"= \S+ fusion\(", entry)),
        "library_fusions": compiled_text.count('"__ynn_fusion"'),
        "while_loops": len(re.findall(r"= \S+ while\(", entry)),
        "large_copies": len(re.findall(r"= \w+\[\d+,\d+[\],]\S* copy\(", entry)),
        "distinct_kernels": distinct_kernels(compiled_text),
        "instructions": len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", compiled_text, re.M)),
    }


def compile_interleaved(
    candidates: dict[str, Callable[[], Any]], params, grads, repeats: int = 3
) -> dict[str, dict[str, Any]]:
    """Trace + lower and XLA-compile seconds of each donated step, candidates alternated
    ``repeats`` times (fresh transforms each time, so nothing is reused): medians, and
    the compiled module's ``hlo_summary``."""
    times = {name: {"lower": [], "compile": []} for name in candidates}
    summary = {}
    for _ in range(repeats):
        for name, make in candidates.items():
            tx = make()
            step = make_step(tx)
            state = jax.eval_shape(tx.init, params)
            t0 = time.perf_counter()
            lowered = step.lower(params, state, grads)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            times[name]["lower"].append(t1 - t0)
            times[name]["compile"].append(t2 - t1)
            if name not in summary:
                summary[name] = hlo_summary(compiled.as_text())
    out = {}
    for name, t in times.items():
        total = [a + b for a, b in zip(t["lower"], t["compile"], strict=True)]
        out[name] = {
            "lower_s": statistics.median(t["lower"]),
            "compile_s": statistics.median(t["compile"]),
            "total_s": statistics.median(total),
            "total_runs_s": total,
            **summary[name],
        }
    return out


def versions() -> dict[str, str]:
    """Versions of the packages a run depends on ('absent' where not importable)."""
    import importlib
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "numpy", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    try:
        out["backend"] = jax.default_backend()
        out["devices"] = ", ".join(str(d.device_kind) for d in jax.devices())
    except Exception as e:  # a broken accelerator plugin must not hide the versions
        out["backend"] = f"error: {e}"
    return out


def markdown_table(rows: list[dict[str, Any]], columns) -> str:
    """The rows as a markdown table; columns are (key, header, formatter)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |"]
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        cells = [fmt(r[k]) if r.get(k) is not None else "" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

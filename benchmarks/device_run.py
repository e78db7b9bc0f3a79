"""One prepared run of the project on an accelerator: versions, a smoke test, the benchmarks.

Runs from a checkout with ``PYTHONPATH=.`` and installs nothing. In order, each step in
its own ``try`` (a failure is recorded with its traceback in the JSON and the run goes
on), under one time budget checked before every step and between the sizes and pairs
inside it (what does not fit is recorded as skipped):

1. versions of Python, jax, jaxlib, optax, flax, orbax, NumPy and the devices;
2. a smoke test of every optimizer (tiger, lion, adafactor, adax, adaxw, amos, sgdm, and
   Muon and the 8-bit state wrapper where this checkout has them, else 'absent'): three
   donated steps on a small GPT-2-shaped tree, finite, moved, compiled once;
3. the bandwidth floor: a donated in-place copy at several sizes;
4. the speed pairs of ``bench_speed.py`` on GPT-2 small and a ~1B-parameter GPT-2-shaped
   tree, float32 and bf16, each with a donated copy timed beside it;
5. msign alone and Muon against ``optax.contrib.muon``; the 8-bit state step
   (``quantize_state(adamw)`` against ``optax.adamw``);
6. the cost curves of ``bench_cost_curves.py`` at accelerator sizes (1M to 1B);
7. compile time of ``bench_compile.py``'s pairs on the 512-leaf tree.

The JSON is rewritten after every step, so a run cut short still leaves its results::

    bash benchmarks/device_run.sh                 # on the GPU machine, about 6 minutes
    python benchmarks/device_run.py --quick       # the same code on CPU, tiny sizes

Results go to ``$OUT/device_run.json`` (``$OUT`` unset: ``benchmarks/results/device_run``),
the cost-curve plot beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import benchlib  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import optax_ext as ox  # noqa: E402


class Budget:
    """Seconds left of the run's budget; ``stop`` is what the benchmarks poll."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def stop(self) -> bool:
        return self.left() <= 0


# ------------------------------------------------------------------ settings


#: Sizes and repeats of each step. ``quick`` runs the same code at sizes a loaded CPU
#: finishes in well under a minute; ``gpu`` fills an H200 (≥ 100M floats per tree).
SETTINGS = {
    "gpu": dict(
        smoke_tree=dict(width=128, layers=1, vocab=512, context=128),
        smoke_steps=3,
        copy_sizes=[2**26, 2**28, 2**30],
        speed_trees=[("GPT-2 small", None), ("~1B GPT-2 shaped", 10**9)],
        speed_dtypes=["float32", "bfloat16"],
        speed_repeats=20,
        speed_trials=2,
        speed_pairs=None,  # all of bench_speed.PAIRS
        msign_shapes=[(4096, 4096), (8192, 8192), (4096, 16384)],
        muon_tree=None,  # GPT-2 small
        curve_sizes=[10**6, 10**7, 10**8, 10**9],
        curve_gpt2_sizes=[10**7, 10**8, 10**9],
        curve_leaf_counts=[10, 100, 1000],
        curve_leaf_floats=2**24,
        curve_repeats=10,
        compile_leaves=512,
        compile_repeats=1,
        compile_pairs=None,  # all of bench_compile's pairs
        curve_optimizers=None,  # all of bench_cost_curves.optimizers()
        budget_s=330.0,
    ),
    "quick": dict(
        smoke_tree="tiny",
        smoke_steps=2,
        copy_sizes=[2**20],
        speed_trees=[("tiny", "tiny")],
        speed_dtypes=["float32", "bfloat16"],
        speed_repeats=1,
        speed_trials=1,
        speed_pairs=["tiger (defaults) vs optax.lion(β, β)"],
        msign_shapes=[(64, 128)],
        muon_tree="tiny",
        curve_sizes=[10**4],
        curve_gpt2_sizes=[5 * 10**4],
        curve_leaf_counts=[8],
        curve_leaf_floats=10**4,
        curve_repeats=1,
        compile_leaves=8,
        compile_repeats=1,
        compile_pairs=["amos vs optax.adamw"],
        curve_optimizers=["tiger"],
        budget_s=50.0,
    ),
}

#: Optimizers whose update is matrix arithmetic, not a few passes: left out of the
#: cost curves above this many parameters (a 1B-entry square matrix takes seconds).
CURVE_MAX_PARAMS = {"muon": 2 * 10**8, "optax.contrib.muon": 2 * 10**8}


# ------------------------------------------------------------------ optional pieces


def optional_imports() -> dict[str, Any]:
    """Muon, msign and the 8-bit state wrapper, where this checkout has them."""
    found = {}
    for key, module, name in (
        ("muon", "optax_ext.optimizers.muon", "muon"),
        ("msign", "optax_ext.optimizers.msign", "msign"),
        ("quantize_state", "optax_ext.wrappers.quantize", "quantize_state"),
    ):
        try:
            found[key] = getattr(__import__(module, fromlist=[name]), name)
        except Exception:  # absent, or broken mid-change: recorded, never fatal
            found[key] = None
            found[f"{key}_error"] = traceback.format_exc(limit=3)
    return found


def smoke_optimizers(extra: dict[str, Any]) -> dict[str, Callable | None]:
    """name: factory of the transform, None where absent."""
    muon, quantize_state = extra.get("muon"), extra.get("quantize_state")
    return {
        "tiger": lambda: ox.tiger(1e-3),
        "lion": lambda: ox.lion(1e-4),
        "adafactor": lambda: ox.adafactor(1e-3),
        "adax": lambda: ox.adax(1e-3),
        "adaxw": lambda: ox.adaxw(1e-3),
        "amos": lambda: ox.amos(1e-2),
        "sgdm": lambda: ox.sgdm(1e-2, 0.9),
        "muon": (lambda: muon(1e-3)) if muon else None,
        "quantize_state(adamw)": (lambda: quantize_state(optax.adamw(1e-3)))
        if quantize_state
        else None,
    }


# ------------------------------------------------------------------ the steps


def tree_of(spec, dtype=jnp.float32):
    """Abstract tree: ``None`` GPT-2 small, an int that many parameters GPT-2-shaped,
    ``"tiny"`` :func:`tiny_tree`."""
    if spec == "tiny":
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tiny_tree())
    return benchlib.abstract_gpt2(spec, dtype=dtype)


def tiny_tree():
    """Four leaves with Flax names that reach every rule: an embedding table (Tiger's row
    RMS, Amos's row statistics), a factored kernel (AdaFactor), a bias and a norm scale."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    return {
        "params": {
            "wte": {"embedding": spec(256, 128)},
            "h_0": {
                "mlp": {"c_fc": {"kernel": spec(128, 256), "bias": spec(256)}},
                "ln_1": {"scale": spec(128)},
            },
        }
    }


def smoke(cfg, extra, budget) -> dict:
    """Three donated steps of each optimizer: finite, moved, compiled once."""
    shapes = cfg["smoke_tree"]
    if shapes == "tiny":
        shapes = tiny_tree()
    else:
        shapes = benchlib.gpt2_like_params(**shapes, abstract=True)
    params0 = benchlib.on_device_like(shapes, seed=0, scale=0.02)
    grads = benchlib.on_device_like(params0, seed=1)
    out = {}
    for name, make in smoke_optimizers(extra).items():
        if make is None:
            out[name] = {"status": "absent"}
            continue
        if budget.stop():
            out[name] = {"status": "skipped", "reason": "time budget"}
            continue
        t0 = time.perf_counter()
        try:
            tx = make()
            step, traces = benchlib.counted_step(tx)
            params = jax.tree.map(jnp.copy, params0)
            state = tx.init(params)
            for _ in range(cfg["smoke_steps"]):
                params, state = step(params, state, grads)
            params = jax.block_until_ready(params)
            finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
            moved = max(
                float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0), strict=True)
            )
            ok = finite and moved > 0 and traces[0] == 1
            out[name] = {
                "status": "ok" if ok else "failed",
                "finite": finite,
                "max_change": moved,
                "compilations": traces[0],
                "seconds": time.perf_counter() - t0,
            }
        except Exception:
            out[name] = {"status": "error", "traceback": traceback.format_exc()}
    return out


def copy_floor(cfg, extra, budget) -> dict:
    """GB/s of a donated in-place copy (read + write) at each size."""
    rows = []
    for nbytes in cfg["copy_sizes"]:
        if budget.stop():
            rows.append({"bytes": nbytes, "skipped": "time budget"})
            continue
        rows.append({"bytes": nbytes, "GBps": benchlib.copy_bandwidth(nbytes, 20)})
        gc.collect()
    return {"rows": rows}


def _speed(cfg, budget, dtype) -> dict:
    import bench_speed

    names = cfg["speed_pairs"] or list(bench_speed.PAIRS)
    rows, copies = [], {}
    for label, size in cfg["speed_trees"]:
        if budget.stop():
            rows.append({"tree": label, "skipped": "time budget"})
            continue
        shapes = tree_of(size, jnp.dtype(dtype))
        params = benchlib.on_device_like(shapes, seed=0, scale=0.02)
        grads = benchlib.on_device_like(shapes, seed=1)
        got, copy = bench_speed.run_tree(
            label,
            params,
            cfg["speed_repeats"],
            cfg["speed_trials"],
            names,
            True,
            grads=grads,
            stop=budget.stop,
        )
        for r in got:
            r.update(dtype=dtype, params=benchlib.n_params(shapes))
        rows += got
        copies[label] = copy
        del params, grads
        gc.collect()
    return {"rows": rows, "copy_GBps": copies}


def speed_float32(cfg, extra, budget) -> dict:
    return _speed(cfg, budget, "float32")


def speed_bfloat16(cfg, extra, budget) -> dict:
    return _speed(cfg, budget, "bfloat16")


def msign_and_muon(cfg, extra, budget) -> dict:
    """msign alone on a few matrices (ms and TFLOP/s of its matrix products), then Muon
    against optax.contrib.muon on a GPT-2-shaped tree."""
    msign, muon = extra.get("msign"), extra.get("muon")
    out: dict[str, Any] = {}
    if msign is None:
        out["msign"] = "absent"
    else:
        rows = []
        for shape in cfg["msign_shapes"]:
            for dtype in ("float32", "bfloat16"):
                if budget.stop():
                    rows.append({"shape": shape, "dtype": dtype, "skipped": "time budget"})
                    continue
                m = benchlib.on_device_like(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
                f = jax.jit(lambda x: msign(x))
                jax.block_until_ready(f(m))
                times = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(m))
                    times.append(time.perf_counter() - t0)
                rows_, cols = min(shape), max(shape)
                # five steps of X·Xᵀ (2r²c), A² (2r³) and (bA + cA²)·X (2r²c)
                flops = 5 * (4 * rows_ * rows_ * cols + 2 * rows_**3)
                med = statistics.median(times)
                rows.append(
                    {"shape": shape, "dtype": dtype, "ms": med * 1e3, "TFLOPs": flops / med / 1e12}
                )
        out["msign"] = rows
    if muon is None:
        out["muon"] = "absent"
    elif not hasattr(optax, "contrib") or not hasattr(optax.contrib, "muon"):
        out["muon"] = "optax.contrib.muon absent"
    elif budget.stop():
        out["muon"] = "skipped: time budget"
    else:
        shapes = tree_of(cfg["muon_tree"])
        params = benchlib.on_device_like(shapes, seed=0, scale=0.02)
        t = benchlib.time_interleaved(
            {"muon": muon(1e-3), "optax.contrib.muon": optax.contrib.muon(1e-3)},
            params,
            benchlib.on_device_like(shapes, seed=1),
            max(cfg["speed_repeats"], 1),
        )
        out["muon"] = {
            "params": benchlib.n_params(shapes),
            **{
                k: {"ms": v["median_s"] * 1e3, "state_bytes": v["state_bytes"]}
                for k, v in t.items()
            },
        }
    return out


def eight_bit_state(cfg, extra, budget) -> dict:
    """quantize_state(adamw) against optax.adamw on GPT-2 small: time and state bytes."""
    quantize_state = extra.get("quantize_state")
    if quantize_state is None:
        return {"status": "absent"}
    label, size = cfg["speed_trees"][0]
    shapes = tree_of(size)
    params = benchlib.on_device_like(shapes, seed=0, scale=0.02)
    copy = benchlib.CopyStep(ox.tree_bytes(params))
    t = benchlib.time_interleaved(
        {
            "quantize_state(adamw)": quantize_state(optax.adamw(1e-3)),
            "optax.adamw": optax.adamw(1e-3),
        },
        params,
        benchlib.on_device_like(shapes, seed=1),
        max(cfg["speed_repeats"], 1),
        copy,
    )
    rows = {k: {"ms": v["median_s"] * 1e3, "state_bytes": v["state_bytes"]} for k, v in t.items()}
    q, a = rows["quantize_state(adamw)"], rows["optax.adamw"]
    return {
        "tree": label,
        "params": benchlib.n_params(shapes),
        "rows": rows,
        "time_ratio": q["ms"] / a["ms"],
        "state_ratio": q["state_bytes"] / a["state_bytes"],
        "copy_GBps": copy.gbps(),
    }


def cost_curves(cfg, extra, budget, out_dir) -> dict:
    import bench_cost_curves as cc

    names = cfg["curve_optimizers"] or list(cc.optimizers())
    rows = []
    for kind, sizes in (
        ("one leaf", cfg["curve_sizes"]),
        ("GPT-2 shaped", cfg["curve_gpt2_sizes"]),
    ):
        for n in sizes:
            if budget.stop():
                rows.append({"curve": kind, "target_params": n, "skipped": "time budget"})
                continue
            fit = [m for m in names if n <= CURVE_MAX_PARAMS.get(m, float("inf"))]
            rows += cc.param_curve([n], fit, kind=kind, repeats=cfg["curve_repeats"])
    for count in cfg["curve_leaf_counts"]:
        if budget.stop():
            rows.append({"curve": "leaf count", "target_leaves": count, "skipped": "time budget"})
            continue
        rows += cc.leaf_curve(
            [count], names, n_floats=cfg["curve_leaf_floats"], repeats=cfg["curve_repeats"]
        )
    done = [r for r in rows if "skipped" not in r]
    plot = cc.plot(done, os.path.join(out_dir, "cost_curves.png")) if done else None
    print(benchlib.markdown_table(done, cc.COLUMNS), flush=True)
    return {"rows": rows, "plot": plot}


def compile_times(cfg, extra, budget) -> dict:
    import bench_compile

    tree = bench_compile.block_tree(cfg["compile_leaves"])
    pairs = {**bench_compile.PAIRS, **bench_compile.optional_pairs()}
    rows = []
    for name in cfg["compile_pairs"] or pairs:
        if budget.stop():
            rows.append({"pair": name, "skipped": "time budget"})
            continue
        rows += bench_compile.compile_pairs(tree, [name], cfg["compile_repeats"], pairs)
    return {"leaves": cfg["compile_leaves"], "rows": rows}


def owner_compute_timing(cfg, extra, budget) -> dict:
    """msign of GPT-2 small's Muon matrices batched by shape against one at a time."""
    import bench_owner_compute

    return bench_owner_compute.timing(cfg is SETTINGS["quick"])


STEPS = [
    ("smoke", smoke),
    ("copy_floor", copy_floor),
    ("speed_float32", speed_float32),
    ("msign_and_muon", msign_and_muon),
    ("eight_bit_state", eight_bit_state),
    ("owner_compute_timing", owner_compute_timing),
    ("speed_bfloat16", speed_bfloat16),
    ("cost_curves", cost_curves),
    ("compile_times", compile_times),
]


# ------------------------------------------------------------------ driver


def out_dir(arg: str | None) -> str:
    path = arg or os.environ.get("OUT") or os.path.join(benchlib.RESULTS_DIR, "device_run")
    os.makedirs(path, exist_ok=True)
    return path


def run(quick=False, budget_s=None, out=None, only=None) -> dict:
    """Every step in order under one budget; returns (and writes) the results."""
    cfg = SETTINGS["quick" if quick else "gpu"]
    budget = Budget(cfg["budget_s"] if budget_s is None else budget_s)
    folder = out_dir(out)
    path = os.path.join(folder, "device_run.json")
    results: dict[str, Any] = {
        "mode": "quick" if quick else "gpu",
        "budget_s": budget.seconds,
        "versions": benchlib.versions(),
        "machine": benchlib.machine(),
        "steps": {},
    }
    print(json.dumps(results["versions"], indent=1), flush=True)
    extra = optional_imports()
    results["optional"] = {
        k: (v if k.endswith("_error") else v is not None) for k, v in extra.items()
    }

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)

    for name, fn in STEPS:
        if only is not None and name not in only:
            continue
        if budget.stop():
            results["steps"][name] = {"status": "skipped", "reason": "time budget"}
            save()
            continue
        print(f"== {name} ({budget.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            args = (cfg, extra, budget) + ((folder,) if name == "cost_curves" else ())
            got = fn(*args)
            results["steps"][name] = {"status": "ok", "seconds": time.perf_counter() - t0, **got}
        except Exception:
            results["steps"][name] = {
                "status": "error",
                "seconds": time.perf_counter() - t0,
                "traceback": traceback.format_exc(),
            }
            print(results["steps"][name]["traceback"], flush=True)
        gc.collect()
        save()
    results["elapsed_s"] = budget.elapsed()
    save()
    print(summary(results), flush=True)
    print("wrote", path, flush=True)
    return results


def summary(results: dict) -> str:
    """A short text summary (the end of the output is what a remote run shows)."""
    lines = [f"device: {results['versions'].get('devices')}, jax {results['versions'].get('jax')}"]
    steps = results["steps"]
    smoke_rows = steps.get("smoke", {})
    lines.append(
        "smoke: "
        + ", ".join(
            f"{k} {v.get('status')}"
            for k, v in smoke_rows.items()
            if isinstance(v, dict) and "status" in v
        )
    )
    for name in ("speed_float32", "speed_bfloat16"):
        for r in steps.get(name, {}).get("rows", []):
            if "ratio" in r:
                frac = r.get("fraction_of_copy")
                lines.append(
                    f"{name[6:]} {r['tree']}: {r['pair']}: {r['ours_ms']:.3f} vs "
                    f"{r['optax_ms']:.3f} ms, ratio {r['ratio']:.2f}"
                    + (f", {frac:.0%} of copy" if frac else "")
                )
    for name, step in steps.items():
        lines.append(f"{name}: {step.get('status')} ({step.get('seconds', 0):.1f} s)")
    lines.append(f"elapsed {results.get('elapsed_s', 0):.1f} s of {results['budget_s']:.0f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on whatever device")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--out", default=None, help="folder (default $OUT, else results/device_run)")
    ap.add_argument("--only", default=None, help="comma-separated step names")
    args = ap.parse_args(argv)
    only = None if args.only is None else set(args.only.split(","))
    results = run(args.quick, args.budget, args.out, only)
    failed = [k for k, v in results["steps"].items() if v.get("status") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

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

``--part errors``: where 4-bit AdamW loses accuracy, without training a 4-bit model.
Float AdamW trains the suite's task (``benchmarks/suite_tasks.py``, the suite's schedule
at ``--lr``) while *shadow* moments follow the same gradients through a quantised EMA,
``m <- Q(b1 D(m) + (1 - b1) g)`` and ``v <- Q(b2 D(v) + (1 - b2) g^2)``, one shadow per
variant (width, block, rounding). Every ``steps/10`` updates it records, per variant,
the relative error of Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` with that one
moment taken from the shadow (the other float), summed over the quantised leaves, and
the median relative error of the shadow moment itself::

    python benchmarks/bench_quantize.py --part errors --task fortunes_lm --lr 0.012

``--part muon-sim``: why a 4-bit momentum costs Muon and not Tiger, in float64 NumPy
(:func:`muon_simulation`; writes ``quantize4_quality_muon_simulation.json``).

``--part quality``: the suite's runner (``bench_suite.grid_runner``) at one rate, seeds
0-2, for 4-bit variants of AdamW (``--inner``: or Muon, Tiger; writes
``quantize4_quality_<task>.json``)::

    python benchmarks/bench_quantize.py --part quality --task fortunes_lm --lr 0.012
    python benchmarks/bench_quantize.py --part quality --task digits_mlp --lr 0.012 --inner muon
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
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
from optax_ext.wrappers.quantize import _dequantize4, dequantize, dynamic_map, quantize, quantize4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------- where 4-bit AdamW loses accuracy


def _q4(signed: bool, block: int, stochastic: bool, rank_one: bool = True, sqrt: bool = False):
    """A shadow moment's ``(encode(x, key), decode(q))`` in 4 bits (``quantize4``);
    ``rank_one=False`` quantises a matrix second moment block-wise (flattened),
    ``sqrt=True`` stores sqrt(v) instead of v."""

    def enc(x, key):
        y = jnp.sqrt(x) if sqrt else x
        y = y if rank_one else y.reshape(-1)
        return quantize4(y, signed=signed, block=block, key=key if stochastic else None)

    def dec(q, shape):
        y = _dequantize4(q, block).reshape(shape)
        return y * y if sqrt else y

    return enc, dec


def _q8(signed: bool):
    return (
        lambda x, key: quantize(x, signed=signed),
        lambda q, shape: dequantize(q).reshape(shape),
    )


#: Shadow variants: name -> (moment, (encode, decode)).
SHADOWS = {
    "m 4-bit b256 stochastic": ("m", _q4(True, 256, True)),
    "m 4-bit b256 nearest (default beside a 4-bit v)": ("m", _q4(True, 256, False)),
    "m 4-bit b128 stochastic": ("m", _q4(True, 128, True)),
    "m 8-bit": ("m", _q8(True)),
    "v 4-bit rank-1 stochastic (default)": ("v", _q4(False, 256, True)),
    "v 4-bit rank-1 nearest": ("v", _q4(False, 256, False)),
    "v 4-bit b256 stochastic": ("v", _q4(False, 256, True, rank_one=False)),
    "v 4-bit rank-1 sqrt stochastic": ("v", _q4(False, 256, True, sqrt=True)),
    "v 8-bit": ("v", _q8(False)),
}


def moment_errors(task_name: str, lr: float, seed: int = 0, min_size: int = 256) -> dict:
    """Float AdamW on the task, with every :data:`SHADOWS` moment following its gradients."""
    from bench_suite import EVALS, base_schedule
    from suite_tasks import TASKS

    task = TASKS[task_name]()
    b1, b2, eps = 0.9, 0.999, 1e-8
    shape = base_schedule(task.steps)
    tx = optax.adamw(lambda t: lr * shape(t), b1=b1, b2=b2, eps=eps, weight_decay=0.0)
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params = task.init(k_init)
    leaves = [x for x in jax.tree.leaves(params) if x.size >= min_size]
    pick = lambda tree: [x for x in jax.tree.leaves(tree) if x.size >= min_size]
    zeros = [jnp.zeros_like(x) for x in leaves]
    shadows0 = {n: [c[0](z, None) for z in zeros] for n, (_, c) in SHADOWS.items()}
    data = jax.tree.map(jnp.asarray, task.data)
    every = task.steps // EVALS

    def direction(m, v, t):
        return m / (1 - b1**t) / (jnp.sqrt(v / (1 - b2**t)) + eps)

    def stats(opt_state, shadows, t):
        adam = opt_state[0]
        mus, nus = pick(adam.mu), pick(adam.nu)
        out = {}
        for name, (moment, (_, dec)) in SHADOWS.items():
            err = ref = 0.0
            rel = []
            for q, m, v in zip(shadows[name], mus, nus, strict=True):
                s = dec(q, m.shape)
                u = direction(m, v, t)
                uq = direction(s, v, t) if moment == "m" else direction(m, s, t)
                err += jnp.sum((uq - u) ** 2)
                ref += jnp.sum(u**2)
                f = m if moment == "m" else v
                rel.append((jnp.abs(s - f) / jnp.maximum(jnp.abs(f), 1e-30)).reshape(-1))
            out[name] = {
                "step_rel_err": jnp.sqrt(err / ref),
                "moment_median_rel_err": jnp.median(jnp.concatenate(rel)),
            }
        return out

    def step(carry, t):
        params, opt_state, shadows = carry
        grads = jax.grad(task.loss)(params, task.batch(data, jax.random.fold_in(k_data, t)))
        updates, opt_state = tx.update(grads, opt_state, params)
        gs = pick(grads)
        new = {}
        for name, (moment, (enc, dec)) in SHADOWS.items():
            key = jax.random.fold_in(jax.random.key(seed + 1), t)
            new[name] = []
            for i, (q, g) in enumerate(zip(shadows[name], gs, strict=True)):
                old = dec(q, g.shape)
                x = b1 * old + (1 - b1) * g if moment == "m" else b2 * old + (1 - b2) * g * g
                new[name].append(enc(x, jax.random.fold_in(key, i)))
        return (optax.apply_updates(params, updates), opt_state, new), None

    def block(carry, i):
        carry, _ = jax.lax.scan(step, carry, i * every + jnp.arange(every))
        return carry, stats(carry[1], carry[2], (i + 1) * every)

    run = jax.jit(
        lambda: jax.lax.scan(block, (params, tx.init(params), shadows0), jnp.arange(EVALS))[1]
    )
    records = jax.device_get(run())
    rows = []
    for name in SHADOWS:
        rows.append(
            {
                "variant": name,
                **{k: [float(e) for e in records[name][k]] for k in records[name]},
            }
        )
    return {
        "task": task_name,
        "lr": lr,
        "seed": seed,
        "min_size": min_size,
        "every": every,
        "rows": rows,
    }


# ------------------------------------------------------------ 4-bit quality variants


def _patched_quantize4(
    v_nearest: bool = False, m_block: int | None = None, v_sqrt=False, m_nearest=False
):
    """A diagnostic variant of the 4-bit re-quantisation (the wrapper calls the module's
    ``quantize4`` and ``_dequantize4`` at trace time): second moments rounded to
    nearest (``v_nearest``) or stored as sqrt(v) (``v_sqrt``: a map uniform in sqrt(v),
    v = s((i + 1)/16)^2), momenta rounded to nearest (``m_nearest``) or in blocks of
    ``m_block``. Diagnostics, not options of the library (``m_nearest`` is what
    ``momentum_rounding="nearest"`` does, the default beside a 4-bit second moment)."""
    # the module itself: optax_ext.wrappers exports a function of the same name
    module = sys.modules["optax_ext.wrappers.quantize"]

    original, decode = module.quantize4, module._dequantize4

    def variant(x, *, signed, block=256, key=None):
        if (not signed and v_nearest) or (signed and m_nearest):
            key = None
        if not signed and v_sqrt:
            x = jnp.sqrt(jnp.maximum(x, 0.0))
        if signed and m_block is not None:
            block = m_block
        return original(x, signed=signed, block=block, key=key)

    def variant_decode(q, block):
        if isinstance(q, module.Quantized4Array):
            return decode(q, m_block or block)
        y = decode(q, block)
        return y * y if v_sqrt else y

    return module, (original, decode), (variant, variant_decode)


#: name -> (``_patched_quantize4`` arguments, ``quantize_state`` arguments)
QUALITY_VARIANTS = {
    "4-bit": ({}, {}),
    "4-bit, m stochastic": ({}, {"momentum_rounding": "stochastic"}),
    "4-bit, v nearest": ({"v_nearest": True}, {}),
    "4-bit, v sqrt": ({"v_sqrt": True}, {}),
    "4-bit, m block 128": ({"m_block": 128}, {"momentum_rounding": "stochastic"}),
    "4-bit, m nearest": ({"m_nearest": True}, {}),
    "4-bit, m nearest, block 128": ({"m_nearest": True, "m_block": 128}, {}),
    "8-bit": ({}, {"bits": 8}),
}

#: the inner optimizers of ``--part quality`` (the suite's settings: weight decay 0)
QUALITY_INNERS = {
    "adamw": lambda s: optax.adamw(s, weight_decay=0.0),
    "muon": lambda s: ox.muon(s, weight_decay=0.0),
    "tiger": lambda s: ox.tiger(s, weight_decay=0.0),
}


def quality(
    task_name: str, lr: float, names: list[str], inner: str = "adamw", seeds=(0, 1, 2)
) -> list[dict]:
    """Final held-out metric of each 4-bit variant of ``inner`` at one rate, seeds 0-2,
    with the suite's runner (same schedule, data order and initialisation as its float
    rows)."""
    from bench_suite import grid_runner
    from suite_optimizers import Entry
    from suite_tasks import TASKS

    task = TASKS[task_name]()
    rows = []
    for name in names:
        patch, kwargs = QUALITY_VARIANTS[name]
        entry = Entry(
            lambda s, kwargs=kwargs: ox.quantize_state(
                QUALITY_INNERS[inner](s), **{"bits": 4, "min_size": 256, **kwargs}
            ),
            lr,
            "optax-ext",
        )
        module, original, variant = _patched_quantize4(**patch)
        module.quantize4, module._dequantize4 = variant
        try:
            metric, _, _ = grid_runner(task, entry)([lr], list(seeds))
        finally:
            module.quantize4, module._dequantize4 = original
        finals = [float(x) for x in metric[0, :, -1]]
        rows.append(
            {
                "variant": f"{inner} {name}",
                "lr": lr,
                "seeds": finals,
                "mean": statistics.mean(finals),
                "sd": statistics.stdev(finals),
            }
        )
        print(
            f"{inner} {name:32s} {rows[-1]['mean']:.4f} ± {rows[-1]['sd']:.4f}  {finals}",
            flush=True,
        )
    return rows


# ------------------------------------------- why a 4-bit momentum fails Muon, not Tiger


def _q4_numpy(x: np.ndarray, block: int, rng: np.random.Generator | None) -> np.ndarray:
    """float64 round trip through the signed 4-bit map (``dynamic_map(True, 4)``) per
    block of the flattened ``x`` (a multiple of ``block``): stochastic with ``rng``,
    nearest without."""
    levels = dynamic_map(True, 4)
    grid = np.concatenate([-levels[:0:-1], levels])
    flat = x.reshape(-1, block)
    a = np.abs(flat).max(1, keepdims=True)
    a[a == 0] = 1.0
    y = flat / a
    hi = np.searchsorted(grid, y).clip(1, len(grid) - 1)
    lo = hi - 1
    p = (y - grid[lo]) / (grid[hi] - grid[lo])
    up = rng.random(y.shape) < p if rng is not None else p >= 0.5
    return (np.where(up, grid[hi], grid[lo]) * a).reshape(x.shape)


def _msign(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def muon_simulation(rows=64, cols=256, rank=4, beta=0.95, steps=200, seed=0) -> list[dict]:
    """An EMA momentum (β = 0.95) of noisy gradients with a rank-``rank`` mean, in
    float64 and stored in 4 or 8 bits; over the last 50 steps, the cosine of Muon's
    direction msign(m) and of a sign step sign(m) with the float EMA's, and the relative
    error of m. Error feedback: the stored momentum's rounding error is added back
    before the next quantisation (kept in float64, or itself in 4 bits)."""
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / rank**0.5
    cos = lambda a, b: float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))
    variants = {
        "4-bit b256 stochastic": lambda m, e, r: (_q4_numpy(m, 256, r), e),
        "4-bit b256 nearest": lambda m, e, r: (_q4_numpy(m, 256, None), e),
        "4-bit b64 stochastic": lambda m, e, r: (_q4_numpy(m, 64, r), e),
        "4-bit b256 + float64 error feedback": lambda m, e, r: _feedback(m, e, r, None),
        "4-bit b256 + 4-bit error feedback": lambda m, e, r: _feedback(m, e, r, 256),
        "8-bit": lambda m, e, r: (
            np.asarray(dequantize(quantize(m.astype(np.float32), signed=True)), np.float64),
            e,
        ),
    }
    out = []
    for name, store in variants.items():
        r = np.random.default_rng(seed + 1)
        m, mf, e = np.zeros((rows, cols)), np.zeros((rows, cols)), np.zeros((rows, cols))
        cs, ct, cm = [], [], []
        for t in range(steps):
            g = signal + r.standard_normal((rows, cols))
            mf = beta * mf + (1 - beta) * g
            m, e = store(beta * m + (1 - beta) * g, e, r)
            if t >= steps - 50:
                cs.append(cos(_msign(m), _msign(mf)))
                ct.append(cos(np.sign(m), np.sign(mf)))
                cm.append(np.linalg.norm(m - mf) / np.linalg.norm(mf))
        out.append(
            {
                "variant": name,
                "cos_msign": float(np.mean(cs)),
                "cos_sign": float(np.mean(ct)),
                "momentum_rel_err": float(np.mean(cm)),
            }
        )
        print(
            f"{name:36s} cos msign {out[-1]['cos_msign']:.3f}  cos sign "
            f"{out[-1]['cos_sign']:.3f}  |m - m_float|/|m_float| {out[-1]['momentum_rel_err']:.3f}",
            flush=True,
        )
    return out


def _feedback(m, e, rng, block_e):
    want = m + e
    stored = _q4_numpy(want, 256, rng)
    e = want - stored
    return stored, e if block_e is None else _q4_numpy(e, block_e, rng)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--part", choices=("speed", "errors", "quality", "muon-sim"), default="speed"
    )
    parser.add_argument("--task", default="fortunes_lm")
    parser.add_argument("--lr", type=float, default=0.012)
    parser.add_argument("--variants", nargs="+", default=list(QUALITY_VARIANTS))
    parser.add_argument("--inner", choices=list(QUALITY_INNERS), default="adamw")
    args = parser.parse_args(argv)
    if args.part == "muon-sim":
        results = {"machine": machine(), "rows": muon_simulation()}
        print("wrote", write_json(args.out or "quantize4_quality_muon_simulation", results))
        return results
    if args.part == "quality":
        rows = quality(args.task, args.lr, args.variants, args.inner)
        results = {"machine": machine(), "task": args.task, "rows": rows}
        print("wrote", write_json(args.out or f"quantize4_quality_{args.task}", results))
        return results
    if args.part == "errors":
        results = {"machine": machine(), **moment_errors(args.task, args.lr)}
        for r in results["rows"]:
            print(
                f"{r['variant']:40s} step err "
                + " ".join(f"{e:.3f}" for e in r["step_rel_err"])
                + f" | moment median rel err {r['moment_median_rel_err'][-1]:.3f}"
            )
        print("wrote", write_json(args.out or f"quantize4_quality_errors_{args.task}", results))
        return results
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
    print("wrote", write_json(args.out or "quantize_speed", results))
    return results


if __name__ == "__main__":
    main()

"""Low precision: pure-bf16 training with each rounding, 8-bit states, their bytes and speed.

1. Quality, on the demo task of ``benchmarks/bench_quality.py`` (the demo's model, data,
   optimizer recipes and schedule, each optimizer at its recipe's rate, the same
   initialisation and batches): the held-out loss of Tiger, Lion and AdamW with
   - ``float32``: params and state in float32 (the reference);
   - ``bf16 nearest``: params and state cast to bf16, round-to-nearest everywhere (what
     ``bench_quality`` calls pure bf16);
   - ``bf16 SR params``: the same, the update added with stochastic rounding
     (``chain(tx, stochastic_round())``), the state still rounded to nearest;
   - ``bf16 SR``: ``pure_bf16(tx)``: state and params both written with SR;
   - ``bf16 Kahan``: ``pure_bf16(tx, summation="kahan")``: state with SR, params with
     compensated summation;
   - ``8-bit states``: float32 params, ``quantize_state(tx)``;
   - ``4-bit states``: float32 params, ``quantize_state(tx, bits=4)``;
   - ``bf16 SR + 4-bit``: bf16 params, ``quantize_state(pure_bf16(tx), bits=4)`` (params
     written with SR, moments in 4 bits, the small float leaves in bf16 with SR);
   and the mean fraction of weights that changed per update. The held-out loss is
   computed with the trained weights cast to float32 (exact), so it measures the
   weights: a loss computed in bf16 is itself rounded to bf16's 2^-6 = 0.016-nat
   steps near 2.8 (``bench_quality``'s pure-bf16 column is such a number), coarser
   than the differences measured here; that bf16-computed loss is also recorded.
2. State bytes per parameter on the GPT-2-small tree (abstract init, as in
   ``bench_state_memory.py``), float32 and 8-bit.
3. Step time of 8-bit states against float32 states on the GPT-2-small tree (donated
   update + apply, timed round-robin, median of ``--repeats``, ``--trials`` fresh
   trials, as in ``bench_speed.py``; 4-bit states: ``bench_quantize.py``).
4. Seeds (``--part seeds``, not in ``all``): Tiger on the demo task with float32,
   4-bit and bf16 SR + 4-bit states over ``--seeds`` (initialisation and batches),
   the mean and sample standard deviation of the held-out loss per variant::

    python benchmarks/bench_low_precision.py                  # parts 1-3 (~20 min, 2 cores)
    python benchmarks/bench_low_precision.py --part memory    # one part
    python benchmarks/bench_low_precision.py --steps 30 --part quality   # a quick check
    python benchmarks/bench_low_precision.py --part seeds     # 9 demo runs

Prints tables and writes (merges its parts into) benchmarks/results/low_precision.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from benchlib import (
    GPT2_SMALL,
    RESULTS_DIR,
    gpt2_like_params,
    machine,
    n_params,
    random_like,
    table,
    time_interleaved,
    write_json,
)

import optax_ext as ox
from optax_ext import demo
from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.training import TrainState
from optax_ext.wrappers.precision import pure_bf16
from optax_ext.wrappers.quantize import quantize_state
from optax_ext.wrappers.rounding import stochastic_round

OPTIMIZERS = ("tiger", "lion", "adamw")
VARIANTS = (
    "float32",
    "bf16 nearest",
    "bf16 SR params",
    "bf16 SR",
    "bf16 Kahan",
    "8-bit states",
    "4-bit states",
    "bf16 SR + 4-bit",
)
#: "bf16 SR params" separates the params' rounding from the state's; run for Tiger only
#: (each bf16 run takes minutes on the 2-core machine), as the cheapest setup.
ONLY_FOR = {"bf16 SR params": ("tiger",), "bf16 SR + 4-bit": ("tiger",)}
SEED_VARIANTS = ("float32", "4-bit states", "bf16 SR + 4-bit")


def wrap(tx, variant):
    """The demo's optimizer ``tx`` as run by one variant (params' dtype set by the caller)."""
    if variant == "bf16 SR params":
        return optax.chain(tx, stochastic_round(seed=0))
    if variant == "bf16 SR":
        return pure_bf16(tx, seed=0)
    if variant == "bf16 Kahan":
        return pure_bf16(tx, seed=0, summation="kahan")
    if variant == "8-bit states":
        return quantize_state(tx)
    if variant == "4-bit states":
        return quantize_state(tx, bits=4)
    if variant == "bf16 SR + 4-bit":
        return quantize_state(pure_bf16(tx, seed=0), bits=4)
    return tx


def train(name, variant, *, steps, batch_size, seq_len=64, seed=0, lr=None):
    """``demo.train``'s loop (no noise measurement) with the variant's optimizer.

    Returns per-update losses, the fraction of weights that moved at each update, and
    the final held-out loss.
    """
    data = demo.CharData.from_text(demo.load_corpus())
    model = demo.CharTransformer(vocab=len(data.vocab), max_len=seq_len)
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
    if variant.startswith("bf16"):
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tx = optax.with_extra_args_support(wrap(demo.make_optimizer(name, lr, 1, steps=steps), variant))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    total = n_params(params)

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(demo.lm_loss)(state.params, state.apply_fn, batch)
        new = state.apply_gradients(grads=grads)
        moved = sum(
            jnp.sum(a != b)
            for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
        )
        return new, loss, moved / total

    evaluate = jax.jit(lambda p, b: demo.lm_loss(p, model.apply, b))
    as_f32 = lambda p: jax.tree.map(lambda x: x.astype(jnp.float32), p)
    valid = jnp.asarray(data.valid_batch(64, seq_len))
    batches = data.batches(batch_size, seq_len, seed)
    losses, moved = [], []
    start = time.perf_counter()
    for _ in range(steps):
        state, loss, frac = step(state, jnp.asarray(next(batches)))
        losses.append(loss)
        moved.append(frac)
    losses, moved = (np.asarray(jax.device_get(x), np.float64).tolist() for x in (losses, moved))
    seconds = time.perf_counter() - start
    return {
        "optimizer": name,
        "variant": variant,
        "lr": demo.RECIPES[name].lr if lr is None else lr,
        "valid_loss": float(evaluate(as_f32(state.params), valid)),
        "valid_loss_in_param_dtype": float(evaluate(state.params, valid)),
        "train_loss": float(np.mean(losses[-10:])),
        "moved_fraction": float(np.mean(moved)),
        "moved_fraction_last_100": float(np.mean(moved[-100:])),
        "state_bytes": ox.tree_bytes(state.opt_state),
        "params_bytes": ox.tree_bytes(state.params),
        "n_params": total,
        "seconds": seconds,
        "losses": losses,
        "moved": moved,
    }


def quality(steps, batch_size):
    rows = []
    for name in OPTIMIZERS:
        for variant in VARIANTS:
            if name not in ONLY_FOR.get(variant, (name,)):
                continue
            r = train(name, variant, steps=steps, batch_size=batch_size)
            rows.append(r)
            print(
                f"  {name} {variant}: {r['valid_loss']:.4f}, moved {r['moved_fraction']:.3f}, "
                f"{r['seconds']:.0f} s",
                flush=True,
            )
    ref = {r["optimizer"]: r["valid_loss"] for r in rows if r["variant"] == "float32"}
    for r in rows:
        r["gap"] = r["valid_loss"] - ref[r["optimizer"]]
    return rows


def seeds_part(name, seeds, steps, batch_size):
    """``name`` on the demo task under :data:`SEED_VARIANTS`, one run per seed."""
    rows = []
    for variant in SEED_VARIANTS:
        runs = []
        for seed in seeds:
            r = train(name, variant, steps=steps, batch_size=batch_size, seed=seed)
            print(f"  {name} {variant} seed {seed}: {r['valid_loss']:.4f}", flush=True)
            runs.append(r)
        losses = [r["valid_loss"] for r in runs]
        rows.append(
            {
                "optimizer": name,
                "variant": variant,
                "seeds": list(seeds),
                "valid_losses": losses,
                "mean": float(np.mean(losses)),
                "sd": float(np.std(losses, ddof=1)),
                "state_bytes_per_param": runs[0]["state_bytes"] / runs[0]["n_params"],
                "total_bytes_per_param": (runs[0]["state_bytes"] + runs[0]["params_bytes"])
                / runs[0]["n_params"],
                "moved_fraction": float(np.mean([r["moved_fraction"] for r in runs])),
                "seconds": float(np.mean([r["seconds"] for r in runs])),
            }
        )
    ref = rows[0]
    for r in rows:
        r["gap"] = r["mean"] - ref["mean"]
        r["gap_in_float_sd"] = r["gap"] / ref["sd"]
    return rows


def state_candidates():
    """name -> (float32-state optimizer, its 8-bit-state version's class)."""
    return {
        "tiger": lambda: tiger(1e-3),
        "lion": lambda: lion(1e-4),
        "sgdm": lambda: sgdm(1e-2, 0.9),
        "adaxw": lambda: adaxw(1e-3),
        "optax.adamw": lambda: optax.adamw(1e-3),
    }


def memory():
    params = gpt2_like_params(**GPT2_SMALL, abstract=True)
    half = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    count = n_params(params)
    rows = []
    for name, make in state_candidates().items():
        per = lambda tx, p: ox.tree_bytes(jax.eval_shape(tx.init, p)) / count
        rows.append(
            {
                "optimizer": name,
                "float32": per(make(), params),
                "pure_bf16": per(pure_bf16(make()), half),
                "8-bit": per(quantize_state(make()), params),
            }
        )
    return {"tree": dict(GPT2_SMALL, params=count), "rows": rows}


SPEED = {
    "tiger": lambda: tiger(1e-3),
    "lion": lambda: lion(1e-4, mask=True),
    "optax.adamw": lambda: optax.adamw(1e-3),
}


def speed(repeats, trials):
    params = gpt2_like_params(**GPT2_SMALL)
    grads = random_like(params)
    rows = []
    for name, make in SPEED.items():
        runs = []
        for _ in range(trials):  # fresh buffers each trial: the machine's speed drifts
            t = time_interleaved(
                {"float32": make(), "8-bit": quantize_state(make())}, params, grads, repeats
            )
            runs.append({k: v["median_s"] * 1e3 for k, v in t.items()})
            runs[-1]["compilations"] = max(v["compilations"] for v in t.values())
            del t
            gc.collect()
        ratios = [r["8-bit"] / r["float32"] for r in runs]
        row = {
            "optimizer": name,
            "float32_ms": statistics.median(r["float32"] for r in runs),
            "8bit_ms": statistics.median(r["8-bit"] for r in runs),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "trial_ratios": ratios,
            "compilations": max(r["compilations"] for r in runs),
            "target": 1.15,
        }
        rows.append(row)
        print(
            f"  {name}: float32 {row['float32_ms']:.1f} ms, 8-bit {row['8bit_ms']:.1f} ms, "
            f"ratio {row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})",
            flush=True,
        )
    return {"tree": dict(GPT2_SMALL, params=n_params(params)), "rows": rows}


def _previous() -> dict:
    path = os.path.join(RESULTS_DIR, "low_precision.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "quality", "memory", "speed", "seeds"], default="all")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args(argv)
    results = _previous()
    results["machine"] = machine()
    f4 = lambda x: f"{x:.4f}"
    if args.part in ("all", "memory"):
        results["memory"] = memory()
        print("\nstate bytes per parameter, GPT-2 small")
        print(
            table(
                results["memory"]["rows"],
                [
                    ("optimizer", "optimizer", str),
                    ("float32", "float32", lambda x: f"{x:.3f}"),
                    ("pure_bf16", "pure bf16", lambda x: f"{x:.3f}"),
                    ("8-bit", "8-bit", lambda x: f"{x:.4f}"),
                ],
            )
        )
    if args.part in ("all", "quality"):
        rows = quality(args.steps, args.batch_size)
        results["quality"] = {"steps": args.steps, "batch_size": args.batch_size, "rows": rows}
        print(f"\nheld-out loss after {args.steps} updates of batch {args.batch_size}")
        print(
            table(
                rows,
                [
                    ("optimizer", "optimizer", str),
                    ("variant", "variant", str),
                    ("lr", "lr", lambda x: f"{x:.3g}"),
                    ("valid_loss", "held-out", f4),
                    ("gap", "- float32", lambda x: f"{x:+.4f}"),
                    ("moved_fraction", "weights moved/step", lambda x: f"{x:.3f}"),
                ],
            )
        )
    if args.part in ("all", "speed"):
        results["speed"] = speed(args.repeats, args.trials) | {
            "repeats": args.repeats,
            "trials": args.trials,
        }
        print("\nstep time, 8-bit states vs float32 states, GPT-2 small (donated, median)")
        print(
            table(
                results["speed"]["rows"],
                [
                    ("optimizer", "optimizer", str),
                    ("float32_ms", "float32 ms", lambda x: f"{x:.1f}"),
                    ("8bit_ms", "8-bit ms", lambda x: f"{x:.1f}"),
                    ("ratio", "ratio", lambda x: f"{x:.2f}"),
                ],
            )
        )
    if args.part == "seeds":
        rows = seeds_part("tiger", args.seeds, args.steps, args.batch_size)
        results["seeds"] = {"steps": args.steps, "batch_size": args.batch_size, "rows": rows}
        print(f"\nTiger, held-out loss after {args.steps} updates of batch {args.batch_size}")
        print(
            table(
                rows,
                [
                    ("variant", "variant", str),
                    ("mean", "held-out", f4),
                    ("sd", "sd", f4),
                    ("gap", "- float32", lambda x: f"{x:+.4f}"),
                    ("gap_in_float_sd", "/ float sd", lambda x: f"{x:+.2f}"),
                    ("state_bytes_per_param", "state B/param", lambda x: f"{x:.3f}"),
                    ("total_bytes_per_param", "params + state B/param", lambda x: f"{x:.3f}"),
                ],
            )
        )
    print("wrote", write_json("low_precision", results))


if __name__ == "__main__":
    main()

"""Fewer optimizer steps for the same examples: a growing batch against a constant one.

Three ways to spend the same examples (N micro-batches of b), with AdamW:

- ``constant``: batch b throughout, a warm-up + cosine schedule whose peak lr is tuned
  (a ×2 grid, 3 seeds, the best seed-mean held-out loss);
- ``seesaw``: ``scaling.seesaw`` of that tuned schedule (the batch doubles where the
  cosine has halved again, the lr falls by √2 instead; capped at ``--max-k`` b);
- ``noise plan f=...``: ``scaling.noise_plan`` of the same schedule: the batch follows a
  fraction f of the measured B_simple (its lower one-standard-error bound, capped at
  ``--max-k`` b), the lr keeps lr/√B on the schedule; f = 1 (the batch at the noise scale)
  and f = 0.1 (where the transfer check's fitted critical batch sat, a tenth of B_simple).

Both plans drive ``set_accumulation_steps`` of ``ox.accumulate_gradients`` in a Flax
``TrainState`` loop: one jitted micro-step per task (the lr and k are traced arguments),
compiled once; the noise is measured per micro-batch (its two halves against it) by
``ox.measure_noise_scale`` and read with ``ox.current_noise_scale`` at each update. All
arms and seeds see the same micro-batches in the same order.

Reported per task and arm: the final held-out loss (mean ± sd over 3 seeds) and the
optimizer updates. Target: a noise plan within one seed-sd of ``constant`` with >= 25%
fewer updates.

    python benchmarks/bench_batch_plan.py                 # demo_lm and digits_mlp
    python benchmarks/bench_batch_plan.py --quick         # a smoke run
    python benchmarks/bench_batch_plan.py --tasks demo_lm --micro 2 --micro-batches 960 \
        --max-k 16 --fractions 1 0.25 0.1 --centre 2e-3 --out batch_plan_micro2

Writes benchmarks/results/batch_plan.json.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from benchlib import machine, write_json
from suite_tasks import TASKS

import optax_ext as ox
import scaling
from optax_ext.training import TrainState, split_value_and_grad

#: task -> (micro-batch, micro-batches per run, lr grid centre for AdamW at the micro-batch)
SETUPS = {
    "demo_lm": (8, 480, 4e-3),
    "digits_mlp": (8, 480, 6e-3),
}


class Runner:
    """One task's jitted micro-step and evaluation, shared by every arm and seed."""

    def __init__(self, name, micro, window):
        self.task = TASKS[name](batch_size=micro)
        self.micro = micro
        self.data = jax.tree.map(jnp.asarray, self.task.data)
        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.0)
        # one optimizer object: the TrainState keeps it as static data
        self.tx = optax.chain(
            ox.measure_noise_scale(micro // 2, window=window), ox.accumulate_gradients(adamw, 1)
        )
        task = self.task
        grad_fn = split_value_and_grad(lambda p, _apply, batch: task.loss(p, batch), 2)
        self.traces = 0

        def step(state, data, key, i, k, lr):
            self.traces += 1
            opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=lr)
            batch = task.batch(data, jax.random.fold_in(key, i))
            _, grads, extra = grad_fn(state.params, state.apply_fn, batch)
            state = state.replace(opt_state=opt_state)
            extra = extra | {"set_accumulation_steps": k}
            return state.apply_gradients(grads=grads, extra_args=extra)

        self.step = jax.jit(step, donate_argnums=(0,))
        self.evaluate = jax.jit(lambda p, d: task.evaluate(p, d)[1])

    def run(self, choose, total, seed):
        """Trains on ``total`` micro-batches; ``choose(seen, state) -> (lr, k)`` at each
        update's start (the last update takes only what is left)."""
        params = self.task.init(jax.random.key(0))
        state = TrainState.create(apply_fn=None, params=params, tx=self.tx)
        key = jax.random.key(1000 + seed)
        seen, ks = 0, []
        while seen < total:
            lr, k = choose(seen, state)
            k = min(int(k), total - seen)
            for _ in range(k):
                state = self.step(state, self.data, key, jnp.int32(seen), jnp.int32(k),
                                  jnp.float32(lr))  # fmt: skip
                seen += 1
            ks.append(k)
        loss = float(self.evaluate(state.params, self.data))
        updates = int(state.opt_state[1].gradient_step)
        assert updates == len(ks), (updates, len(ks))
        return {"loss": loss, "updates": updates, "ks": ks}


def schedule(peak, total):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, total // 20), total, 0.0)


def constant(base):
    return lambda seen, state: (float(base(seen)), 1)


def seesaw_arm(base, micro, max_k):
    plan = scaling.seesaw(base, micro, max_batch_size=max_k * micro)
    return lambda seen, state: (plan(seen).lr, plan(seen).batch // micro)


def noise_arm(base, micro, max_k, fraction, confidence):
    plan = scaling.noise_plan(base, micro, max_accumulation_steps=max_k, fraction=fraction,
                              confidence=confidence)  # fmt: skip

    def choose(seen, state):
        now = ox.current_noise_scale(state.opt_state) if seen else None
        point = plan(seen, now)
        return point.lr, point.accumulation_steps

    return choose


def summarise(runs):
    losses = np.array([r["loss"] for r in runs])
    updates = np.array([r["updates"] for r in runs])
    return {
        "loss_mean": float(losses.mean()),
        "loss_sd": float(losses.std(ddof=1)) if len(runs) > 1 else 0.0,
        "losses": losses.tolist(),
        "updates_mean": float(updates.mean()),
        "updates": updates.tolist(),
        "ks": [r["ks"] for r in runs],
    }


def bench_task(name, args):
    micro, total, centre = SETUPS[name]
    micro = args.micro or micro
    total = args.micro_batches or total
    centre = args.centre or centre
    if args.quick:
        total = 24
    seeds = range(args.seeds)
    window = scaling.default_window(total)
    runner = Runner(name, micro, window)
    t0 = time.time()
    lrs = centre * 2.0 ** (np.arange(args.grid) - (args.grid - 1) // 2)
    sweep = {}
    for lr in lrs:
        base = schedule(float(lr), total)
        sweep[f"{lr:.3g}"] = summarise([runner.run(constant(base), total, s) for s in seeds])
        print(f"  {name} constant lr {lr:.3g}: {sweep[f'{lr:.3g}']['loss_mean']:.4f}", flush=True)
    best = min(sweep, key=lambda k: sweep[k]["loss_mean"])
    at_edge = best in (f"{lrs[0]:.3g}", f"{lrs[-1]:.3g}")
    base = schedule(float(best), total)
    arms = {"constant": sweep[best]}
    arms["seesaw"] = summarise(
        [runner.run(seesaw_arm(base, micro, args.max_k), total, s) for s in seeds]
    )
    for f in args.fractions:
        arms[f"noise plan f={f:g}"] = summarise(
            [
                runner.run(noise_arm(base, micro, args.max_k, f, args.confidence), total, s)
                for s in seeds
            ]
        )
    ref = arms["constant"]
    for arm in arms.values():
        arm["fewer_updates"] = 1 - arm["updates_mean"] / ref["updates_mean"]
        arm["loss_minus_constant"] = arm["loss_mean"] - ref["loss_mean"]
        arm["within_one_sd"] = abs(arm["loss_minus_constant"]) <= max(ref["loss_sd"], 1e-12)
    return {
        "micro_batch": micro,
        "micro_batches": total,
        "examples": micro * total,
        "max_batch": args.max_k * micro,
        "window": window,
        "best_lr": float(best),
        "best_lr_at_grid_edge": at_edge,
        "lr_sweep": sweep,
        "arms": arms,
        "compiles": runner.traces,
        "seconds": time.time() - t0,
    }


def print_task(name, out):
    edge = " (grid edge)" if out["best_lr_at_grid_edge"] else ""
    print(
        f"\n{name}: {out['examples']} examples in micro-batches of {out['micro_batch']}, "
        f"tuned peak lr {out['best_lr']:.3g}{edge}, {out['compiles']} compile(s)"
    )
    print(f"  {'arm':<18} {'held-out loss':>17} {'updates':>8} {'fewer':>6}  within 1 sd")
    for arm, r in out["arms"].items():
        print(
            f"  {arm:<18} {r['loss_mean']:>9.4f} ± {r['loss_sd']:.4f} {r['updates_mean']:>8.0f} "
            f"{r['fewer_updates']:>6.0%}  {r['within_one_sd']}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--quick", action="store_true", help="a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--grid", type=int, default=4, help="peak lrs of the constant sweep (x2)")
    ap.add_argument("--max-k", type=int, default=8, help="the largest batch in micro-batches")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="*",
        default=[1.0, 0.1],
        help="noise plan: batch / B_simple",
    )
    ap.add_argument("--confidence", type=float, default=1.0, help="noise plan: s.e. below")
    ap.add_argument("--micro", type=int, help="the micro-batch (default: the task's)")
    ap.add_argument("--micro-batches", type=int, help="micro-batches per run (default: the task's)")
    ap.add_argument("--centre", type=float, help="the constant arm's lr grid centre")
    ap.add_argument("--out", default="batch_plan")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.grid = 2, 2
    results = {"machine": machine(), "args": vars(args), "tasks": {}}
    t0 = time.time()
    for name in args.tasks:
        results["tasks"][name] = out = bench_task(name, args)
        print_task(name, out)
        results["seconds"] = time.time() - t0
        write_json(args.out, results)  # after each task: a long run keeps what it has
    print(f"{time.time() - t0:.0f} s; benchmarks/results/{args.out}.json")
    return results


if __name__ == "__main__":
    main()

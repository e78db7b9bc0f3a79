"""‖W‖₂ of the hidden matrices while training (plain Muon, Post-Clip, spectral decay), the
spectral monitor's cost, and the streaming orthogonaliser on the momenta of a real run.

    python benchmarks/bench_spectral.py --plot                 # digits_mlp, JSON and PNG
    python benchmarks/bench_spectral.py --tasks digits_cnn --every 20
    python benchmarks/bench_spectral.py --report --plot        # redraw from the JSON

1. Norms: plain ``ox.muon`` and each optimizer of ``suite_spectral.py`` train the task
   once (seed 0, the suite's warm-up + cosine schedule) at its own best learning rate
   in the suite's results (``results/quality_suite_spectral.json``; plain Muon's best
   where a candidate has no row yet), with ``ox.spectral_stats`` every ``--every``
   updates inside the jitted scan: σ_max of every hidden matrix against
   1 + √(d_out/d_in) (its LeCun-init value, Post-Clip's bound, see
   ``suite_spectral.py``) and the singular-value entropy against the random-matrix value.
2. Monitor cost: compiled flops of ``spectral_stats`` against one Muon train step
   (cost_analysis, plus the LAPACK eigenvalue calls it leaves uncounted).
3. Streaming: during a plain-Muon run, the Nesterov momentum N_t of every hidden matrix
   goes through ``streaming_msign`` (its basis carried from step to step, 1 and 2
   iterations) and 5-step Polar Express; both are compared with U Vᵀ from an SVD
   (singular values below float32's resolution, max(d_in, d_out)·eps·σ₁, count as 0).

Writes ``results/spectral_norms.json`` (or ``--out``) and, with ``--plot``,
``docs/spectral_norms.png``.

``--owner`` instead compiles Post-Clip's and spectral decay's update on 8 fake devices,
every kernel's rows split over "data" (FSDP), with the compiler placing the products
(``owner_axes=None``) and with each matrix computed by its owner (``owner_axes="data"``),
and counts per device what ``bench_owner_compute.py`` counts for Muon (FLOPs, temporary
memory, collectives and their bytes), on that benchmark's "issue" tree (8 layers
(a (512, 2048) and a (512, 512) kernel each); ``results/spectral_owner_compute.json``::

    python benchmarks/bench_spectral.py --owner
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_suite import base_schedule  # noqa: E402
from benchlib import RESULTS_DIR, machine, markdown_table, write_json  # noqa: E402
from suite_spectral import LECUN_EDGE, SPECTRAL_CANDIDATES  # noqa: E402
from suite_tasks import TASKS, Task  # noqa: E402

import optax_ext as ox  # noqa: E402
from optax_ext.optimizers.msign import msign  # noqa: E402
from optax_ext.optimizers.muon import ScaleByMuonState, matrix_shape  # noqa: E402
from optax_ext.optimizers.streaming import init_streaming_basis, streaming_msign  # noqa: E402
from optax_ext.training import TrainState, make_train_step  # noqa: E402

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
OPTIMIZERS = {"muon": lambda s: ox.muon(s, weight_decay=0.0)} | {
    name: entry.make for name, entry in SPECTRAL_CANDIDATES.items()
}
#: plain Muon's best peak lr per task if results/quality_suite.json lacks the task
FALLBACK_LR = {"digits_mlp": 0.012, "fortunes_lm": 0.024, "demo_lm": 0.024, "digits_cnn": 0.012}


def _suite_rows(name: str, task_name: str) -> dict[str, dict]:
    try:
        with open(os.path.join(RESULTS_DIR, f"{name}.json")) as f:
            rows = json.load(f)["tasks"][task_name]["rows"]
    except (OSError, KeyError):
        return {}
    return {r["optimizer"]: r for r in rows}


def muon_best_lr(task_name: str) -> float:
    row = _suite_rows("quality_suite", task_name).get("muon")
    return float(row["best_lr"]) if row else FALLBACK_LR[task_name]


def best_lrs(task_name: str) -> dict[str, tuple[float, str]]:
    """Each optimizer's best peak lr on the task, and where it comes from."""
    spectral = _suite_rows("quality_suite_spectral", task_name)
    out = {}
    for name in OPTIMIZERS:
        row = spectral.get(name)
        if name == "muon" or row is None:
            out[name] = (muon_best_lr(task_name), "plain Muon's best (quality_suite.json)")
        else:
            out[name] = (float(row["best_lr"]), "its own best (quality_suite_spectral.json)")
    return out


def monitor(params) -> dict[str, tuple[jax.Array, jax.Array]]:
    return {path: (s.sigma_max, s.entropy) for path, s in ox.spectral_stats(params).items()}


def hidden_shapes(params) -> dict[str, tuple[int, ...]]:
    """Each hidden matrix's (*batch, d_in, d_out) as Muon sees it."""
    labels = dict(zip(_paths(params), jax.tree.leaves(ox.muon_labels(params)), strict=True))
    return {
        path: matrix_shape(path, leaf.shape)
        for path, leaf in zip(_paths(params), jax.tree.leaves(params), strict=True)
        if labels[path] == "muon"
    }


def _paths(tree) -> list[str]:
    return [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


# ----------------------------------------------------------------------- 1. norms


def track(task: Task, make, lr: float, every: int, seed: int = 0) -> dict[str, Any]:
    """One training run (the library's train step) with the monitor every ``every`` updates."""
    shape = base_schedule(task.steps)
    blocks = task.steps // every
    train_step = make_train_step(lambda params, apply_fn, batch: task.loss(params, batch))

    def run(data):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = task.init(k_init)
        state = TrainState.create(apply_fn=None, params=params, tx=make(lambda t: lr * shape(t)))

        def block(state, i):
            def one(state, t):
                batch = task.batch(data, jax.random.fold_in(k_data, t))
                return train_step(state, batch)[0], None

            state, _ = jax.lax.scan(one, state, i * every + jnp.arange(every))
            return state, monitor(state.params)

        first = monitor(params)
        state, stats = jax.lax.scan(block, state, jnp.arange(blocks))
        metric, loss = task.evaluate(state.params, data)
        return first, stats, metric, loss

    t0 = time.perf_counter()
    first, stats, metric, loss = jax.device_get(jax.jit(run)(jax.tree.map(jnp.asarray, task.data)))
    params = jax.eval_shape(task.init, jax.random.key(0))
    shapes = hidden_shapes(params)
    out = {"lr": lr, "metric": float(metric), "held_out_loss": float(loss), "matrices": {}}
    for path, (s0, h0) in first.items():
        d_in, d_out = shapes[path][-2:]
        s, h = stats[path]
        out["matrices"][path] = {
            "shape": list(shapes[path]),
            "init_edge": LECUN_EDGE(d_in, d_out),
            "random_entropy": ox.spectral_stats({"k": {"kernel": jnp.zeros((d_in, d_out))}})[
                "k/kernel"
            ].random_entropy,
            "sigma_max": [float(np.max(s0))] + [float(np.max(x)) for x in s],
            "entropy": [float(np.mean(h0))] + [float(np.mean(x)) for x in h],
        }
    out["steps"] = [i * every for i in range(blocks + 1)]
    out["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- 2. monitor cost

_EIGEN = re.compile(r'custom_call_target="[^"]*(syevd|heevd|syev)[^"]*"')


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # eigvalsh is a LAPACK call cost_analysis does not count: about (4/3)k³ to
    # tridiagonalise a k x k matrix plus O(k²) for the eigenvalues
    for line in compiled.as_text().splitlines():
        if _EIGEN.search(line):
            dims = [int(d) for d in re.search(r"= \(?\w+\[([\d,]*)\]", line).group(1).split(",")]
            flops += int(np.prod(dims[:-2])) * 4 / 3 * dims[-1] ** 3
    return flops


def monitor_cost(task: Task, every: int) -> dict[str, Any]:
    params = task.init(jax.random.key(0))
    tx = ox.muon(1e-2, weight_decay=0.0)
    state = tx.init(params)
    data = jax.tree.map(jnp.asarray, task.data)

    def train_step(params, state, key):
        loss, grads = jax.value_and_grad(task.loss)(params, task.batch(data, key))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    step = jax.jit(train_step).lower(params, state, jax.random.key(1)).compile()
    mon = jax.jit(monitor).lower(params).compile()
    step_flops, mon_flops = _flops(step), _flops(mon)
    timed = {}
    for name, fn, args in (
        ("train_step", step, (params, state, jax.random.key(1))),
        ("monitor", mon, (params,)),
    ):
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(20):
            jax.block_until_ready(fn(*args))
        timed[name] = (time.perf_counter() - t0) / 20
    return {
        "train_step_flops": step_flops,
        "monitor_flops": mon_flops,
        "monitor_over_step": mon_flops / step_flops,
        "every": every,
        "amortised_fraction": mon_flops / step_flops / every,
        "train_step_seconds": timed["train_step"],
        "monitor_seconds": timed["monitor"],
    }


# ------------------------------------------------------------------- 3. streaming


def _muon_state(state) -> ScaleByMuonState:
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaleByMuonState))
        if isinstance(s, ScaleByMuonState)
    ]
    return found[0]


def streaming_on_real_momenta(task: Task, lr: float, iters=(1, 2), seed: int = 0):
    """Relative Frobenius errors against U Vᵀ (SVD) per step, averaged over the hidden
    matrices: streaming_msign with each of ``iters``, and 5-step Polar Express."""
    shape = base_schedule(task.steps)
    beta = 0.95  # ox.muon's default, Nesterov

    def run(data):
        k_init, k_data = jax.random.split(jax.random.key(seed))
        params = task.init(k_init)
        shapes = hidden_shapes(params)
        tx = ox.muon(lambda t: lr * shape(t), weight_decay=0.0)
        bases = {(p, i): init_streaming_basis(s) for p, s in shapes.items() for i in iters}

        def step(carry, t):
            params, state, bases = carry
            loss, grads = jax.value_and_grad(task.loss)(
                params, task.batch(data, jax.random.fold_in(k_data, t))
            )
            updates, state = tx.update(grads, state, params)
            # E_t of the Muon leaves (the others are masked out of Muon's state)
            masked = lambda x: isinstance(x, optax.MaskedNode)
            leaves = jax.tree.leaves(_muon_state(state).mu, is_leaf=masked)
            mus = {p: x for p, x in zip(_paths(grads), leaves, strict=True) if not masked(x)}
            g = dict(zip(_paths(grads), jax.tree.leaves(grads), strict=True))
            errs, new_bases = {}, {}
            for p, s in shapes.items():
                n = (beta * mus[p] + (1 - beta) * g[p]).reshape(s)
                u, sv, vt = jnp.linalg.svd(n, full_matrices=False)
                # U Vᵀ over the singular values float32 resolves (a zero one has no sign:
                # an input pixel that is always 0 leaves a row of the momentum 0), and
                # over those above 1e-3·σ₁, the range both methods are built for
                resolved = sv > max(s[-2:]) * jnp.finfo(n.dtype).eps * sv[..., :1]
                exact = {
                    ref: (u * keep[..., None, :]) @ vt
                    for ref, keep in (("all", resolved), ("top", sv > 1e-3 * sv[..., :1]))
                }
                outs = {"polar_express[5]": msign(n, steps=5)}
                for i in iters:
                    outs[f"streaming[iters={i}]"], new_bases[(p, i)] = streaming_msign(
                        n, bases[(p, i)], iters=i
                    )
                for name, o in outs.items():
                    for ref, want in exact.items():
                        err = jnp.linalg.norm(o - want) / jnp.linalg.norm(want)
                        errs.setdefault((name, ref), []).append(err)
            errs = {k: jnp.stack(v) for k, v in errs.items()}
            return (optax.apply_updates(params, updates), state, new_bases), errs

        carry = (params, tx.init(params), bases)
        _, errs = jax.lax.scan(step, carry, jnp.arange(task.steps))
        return errs

    t0 = time.perf_counter()
    errs = jax.device_get(jax.jit(run)(jax.tree.map(jnp.asarray, task.data)))
    out = {"lr": lr, "seconds": time.perf_counter() - t0, "errors": {}, "errors_top": {}}
    for (name, ref), e in errs.items():  # (steps, matrices)
        out["errors" if ref == "all" else "errors_top"][name] = {
            "mean": [float(x) for x in np.mean(e, axis=1)],
            "max": [float(x) for x in np.max(e, axis=1)],
        }
    return out


# ---------------------------------------------------------------- 4. owner-compute


def owner_counts(layers: int = 8) -> dict[str, Any]:
    """Compiled per-device counts of Post-Clip and spectral decay, placed by the compiler
    and by owners, on a row-sharded (FSDP) mesh of 8 fake devices (set in ``main``)."""
    from bench_owner_compute import abstract, counts, issue_tree, make_step, shardings_like

    params = issue_tree(layers)
    weights = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = []
    for name, make in (
        ("clip_singular_values", lambda axes: ox.clip_singular_values(1.0, owner_axes=axes)),
        ("add_spectral_decay", lambda axes: ox.add_spectral_decay(0.1, owner_axes=axes)),
    ):
        for program, axes in (("placement", None), ("owner", "data")):
            tx = make(axes)
            with jax.set_mesh(mesh):
                s_abs = jax.eval_shape(tx.init, params)
                p_in = abstract(params, shardings_like(params, mesh, "fsdp"))
                s_in = abstract(s_abs, shardings_like(s_abs, mesh, "fsdp"))
                t0 = time.perf_counter()
                compiled = make_step(tx).lower(p_in, s_in, p_in).compile()
            row = counts(compiled) | {"transform": name, "program": program}
            row["compile_s"] = time.perf_counter() - t0
            row["collective_bytes_vs_weights"] = row["collective_bytes"] / weights
            rows.append(row)
            print(f"{name} {program}: {row['collective_ops']} collectives, "
                  f"{row['collective_bytes'] / 1e6:.1f} MB", flush=True)  # fmt: skip
    return {"machine": machine(), "layers": layers, "weights_bytes": weights, "rows": rows}


def owner_report(results: dict[str, Any]) -> str:
    return markdown_table(results["rows"], [
        ("transform", "transform", str),
        ("program", "program", str),
        ("flops", "GFLOP/device", lambda v: f"{v / 1e9:.3f}"),
        ("collective_ops", "collectives", str),
        ("collective_bytes", "MB moved/device", lambda v: f"{v / 1e6:.1f}"),
        ("collective_bytes_vs_weights", "÷ weights", lambda v: f"{v:.2f}"),
        ("temp_bytes", "temp MB/device", lambda v: f"{v / 1e6:.1f}"),
    ])  # fmt: skip


# ------------------------------------------------------------------------ report


def _panels(info: dict[str, Any]) -> list[tuple[str, Any]]:
    """What one task's figure shows: σ_max of each hidden matrix (up to 4), or their
    σ_max / init edge (mean and range) for a model with more; the entropy; streaming."""
    matrices = list(next(iter(info["norms"].values()))["matrices"])
    sigma = [("sigma", m) for m in matrices] if len(matrices) <= 4 else [("sigma_rel", None)]
    return sigma + [("entropy", None), ("streaming", None)]


def plot(results: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--plot needs matplotlib: pip install 'optax-ext[plot]'") from e

    tasks = results["tasks"]
    layout = [(t, kind, key) for t, info in tasks.items() for kind, key in _panels(info)]
    rows = -(-len(layout) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.8 * rows), squeeze=False)
    colours = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(OPTIMIZERS)}
    for ax, (tname, kind, key) in zip(axes.flat, layout, strict=False):
        info = tasks[tname]
        for name, run in info["norms"].items():
            label, c = f"{name} (lr {run['lr']:.3g})", colours[name]
            mats = run["matrices"]
            if kind == "sigma":
                ax.plot(run["steps"], mats[key]["sigma_max"], color=c, label=label)
            elif kind == "sigma_rel":
                rel = np.array([np.array(m["sigma_max"]) / m["init_edge"] for m in mats.values()])
                ax.plot(run["steps"], rel.mean(0), color=c, label=label)
                ax.fill_between(run["steps"], rel.min(0), rel.max(0), color=c, alpha=0.15)
            elif kind == "entropy":
                ent = np.array([m["entropy"] for m in mats.values()])
                ax.plot(run["steps"], ent.mean(0), color=c, label=label)
        any_run = next(iter(info["norms"].values()))["matrices"]
        if kind == "sigma":
            m = any_run[key]
            ax.axhline(m["init_edge"], color="k", ls=":", lw=1, label="1 + √(d_out/d_in)")
            ax.set_title(f"{tname}: {key} {' x '.join(map(str, m['shape']))}")
            ax.set_ylabel("σ_max")
        elif kind == "sigma_rel":
            ax.axhline(1.0, color="k", ls=":", lw=1)
            ax.set_title(f"{tname}: hidden matrices (mean, band: min-max)")
            ax.set_ylabel("σ_max / (1 + √(d_out/d_in))")
        elif kind == "entropy":
            ref = np.mean([m["random_entropy"] for m in any_run.values()])
            ax.axhline(ref, color="k", ls=":", lw=1, label="random matrix (Marchenko-Pastur)")
            ax.set_title(f"{tname}: singular-value entropy (mean over hidden matrices)")
        else:
            for i, (name, e) in enumerate(info["streaming"]["errors_top"].items()):
                ls = "--" if name.startswith("polar") else "-"
                ax.plot(e["mean"], ls=ls, color=plt.get_cmap("Set1")(i), label=name)
            ax.set_yscale("log")
            ax.set_title(f"{tname}: msign of plain Muon's momenta against U Vᵀ")
            ax.set_ylabel("‖o − UVᵀ‖_F / ‖UVᵀ‖_F (σ > 1e-3·σ₁)")
        ax.set_xlabel("update")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layout) :]:
        ax.set_visible(False)
    fig.suptitle("Hidden matrices while training: σ_max and entropy at each optimizer's best lr")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(results: dict[str, Any]) -> str:
    lines = []
    for tname, info in results["tasks"].items():
        rows = []
        for name, run in info["norms"].items():
            rel = [m["sigma_max"][-1] / m["init_edge"] for m in run["matrices"].values()]
            peak = [max(m["sigma_max"]) / m["init_edge"] for m in run["matrices"].values()]
            ent = [m["entropy"][-1] for m in run["matrices"].values()]
            rows.append({
                "optimizer": name, "lr": run["lr"], "metric": run["metric"],
                "final": np.mean(rel), "peak": np.max(peak), "entropy": np.mean(ent),
            })  # fmt: skip
        lines.append(f"\n### {tname}: one run (seed 0) per optimizer at its best lr\n")
        lines.append(markdown_table(rows, [
            ("optimizer", "optimizer", str),
            ("lr", "peak lr", lambda x: f"{x:.3g}"),
            ("metric", info["metric"], lambda x: f"{x:.4f}"),
            ("final", "final σ_max / init edge (mean)", lambda x: f"{x:.2f}"),
            ("peak", "largest σ_max / init edge", lambda x: f"{x:.2f}"),
            ("entropy", "final entropy (mean)", lambda x: f"{x:.3f}"),
        ]))  # fmt: skip
        for key, what in (
            ("errors", "all the singular values float32 resolves"),
            ("errors_top", "the singular values above 1e-3·σ₁"),
        ):
            s = info["streaming"][key]
            n = len(next(iter(s.values()))["mean"])
            at = sorted({t for t in (1, 10, 30, 100) if t <= n} | {n})
            srows = [
                {"method": k, "median": np.median(v["mean"])}
                | {f"@{t}": v["mean"][t - 1] for t in at}
                for k, v in s.items()
            ]
            lines.append(
                f"\nmsign error on plain Muon's momenta against U Vᵀ over {what} "
                "(relative Frobenius, mean over hidden matrices)\n"
            )
            lines.append(markdown_table(srows, [("method", "method", str)] + [
                (f"@{t}", f"update {t}", lambda x: f"{x:.3f}") for t in at
            ] + [("median", "median", lambda x: f"{x:.3f}")]))  # fmt: skip
        c = info["monitor_cost"]
        lines.append(
            f"\nmonitor: {c['monitor_flops']:.3g} flops against {c['train_step_flops']:.3g} "
            f"for a Muon train step ({100 * c['monitor_over_step']:.1f}%; every "
            f"{c['every']} updates: {100 * c['amortised_fraction']:.2f}% per update)"
        )
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="*", default=["digits_mlp"], choices=list(TASKS))
    ap.add_argument("--every", type=int, default=5, help="updates between monitor calls")
    ap.add_argument("--steps", type=int, default=None, help="updates per run (task default)")
    ap.add_argument("--out", default="spectral_norms", help="results/<out>.json")
    ap.add_argument(
        "--plot", nargs="?", const=os.path.join(DOCS, "spectral_norms.png"), default=None,
        help="write the PNG (default path docs/spectral_norms.png)",
    )  # fmt: skip
    ap.add_argument("--report", action="store_true", help="print the tables, run nothing")
    ap.add_argument("--owner", action="store_true", help="owner-compute counts instead")
    args = ap.parse_args(argv)
    if args.owner:
        # before the backend starts: the mesh needs 8 devices
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
        out = owner_counts()
        print(owner_report(out))
        print("wrote", write_json("spectral_owner_compute", out))
        return out
    path = os.path.join(RESULTS_DIR, f"{args.out}.json")
    if args.report:
        with open(path) as f:
            results = json.load(f)
    else:
        results = run_all(args.tasks, args.every, args.steps, args.out, path)
    print(report(results))
    if args.plot:
        plot(results, args.plot)
        print("wrote", args.plot)
    return results


def run_all(tasks, every: int, steps: int | None, out: str, path: str) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "every": every, "tasks": {}}
    for tname in tasks:
        task = TASKS[tname](**({"steps": steps} if steps else {}))
        info = {"metric": task.metric, "steps": task.steps, "norms": {}}
        for name, (lr, source) in best_lrs(tname).items():
            print(f"{tname}: {name} at lr {lr:.3g} ({source})", flush=True)
            info["norms"][name] = track(task, OPTIMIZERS[name], lr, every) | {"lr_from": source}
        print(f"{tname}: monitor cost", flush=True)
        info["monitor_cost"] = monitor_cost(task, every)
        print(f"{tname}: streaming on plain Muon's momenta", flush=True)
        info["streaming"] = streaming_on_real_momenta(task, muon_best_lr(tname))
        results["tasks"][tname] = info
        write_json(out, results, path)
    print("wrote", path)
    return results


if __name__ == "__main__":
    main()

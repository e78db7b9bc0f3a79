"""Muon on a device mesh: owner-compute (``owner_axes="data"``) against compiler placement.

Counts from the compiled ``ox.muon`` step (update + apply, params and state donated)
on 8 fake CPU devices, per device: FLOPs (``cost_analysis``), temporary memory
(``memory_analysis``), and the collectives in the partitioned HLO (ops and the bytes
of their results). Each sharding is compiled with the mesh's axis auto and explicit:

- ``fsdp``: every leaf split along its first axis divisible by 8 (the rows, d_in, of
  every kernel);
- ``tp``: along its last axis divisible by 8 (the columns, d_out).

Trees: the "issue" tree, 8 layers of (512, 2048) and (512, 512) kernels, and the
GPT-2-small tree (AdamW on its embeddings, biases and norms, as ``ox.muon`` routes
them). The single-device program (one device, no mesh) is the reference: with
``--check`` (default) every owner-compute step is run once on random gradients from
zero params and its new params compared with the single device's (relative Frobenius
error per leaf, the largest reported).

Targets: relative error <= 1e-5; FLOPs per device <= 1.25 x single / 8; collective
bytes per device <= 0.5 x the Muon momentum's bytes; temporary memory per device <=
the single-device program's. Each run replaces its trees' rows in
``benchmarks/results/owner_compute.json``::

    python benchmarks/bench_owner_compute.py                    # both trees (~20 min, 2 cores)
    python benchmarks/bench_owner_compute.py --tree issue --no-check

``--timing`` instead times, on one device, msign of the GPT-2-small tree's 48 Muon
matrices batched by shape (``owner_compute`` on a 1-device mesh: one Newton–Schulz
per shape group, the tall matrices transposed into the wide group) against one matrix
at a time, in float32 and with bfloat16 compute; ``--quick`` shrinks the matrices to
width 64 (a check that it runs, on CPU)::

    python benchmarks/bench_owner_compute.py --timing --out owner_compute_timing.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from benchlib import (  # noqa: E402
    RESULTS_DIR,
    gpt2_like_params,
    machine,
    markdown_table,
    time_functions,
    versions,
    write_json,
)
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

from optax_ext.optimizers.msign import msign  # noqa: E402
from optax_ext.optimizers.muon import muon, muon_labels  # noqa: E402
from optax_ext.owner_compute import owner_compute  # noqa: E402

N_DEVICES = 8
_DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1}
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) "
    r"(all-gather|all-to-all|all-reduce|reduce-scatter|collective-permute)(-start)?\("
)


def shape_bytes(text: str) -> int:
    """Bytes of the HLO array shapes in ``text`` (``f32[8,512]{1,0}``, tuples of them)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"ops": count, "bytes": bytes of their results}} in a partitioned module:
    per device (an all-gather's result is the gathered array, an all-to-all's or
    all-reduce's the size of its operand). XLA:CPU's collectives are synchronous; an
    asynchronous ``-start`` (whose result tuple holds the operand too) is refused
    rather than miscounted."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.match(line)
        if m and m.group(3):
            raise ValueError(f"asynchronous collective, not counted: {line.strip()[:120]}")
        if m:
            row = out.setdefault(m.group(2), {"ops": 0, "bytes": 0})
            row["ops"] += 1
            row["bytes"] += shape_bytes(m.group(1))
    return out


# ----------------------------------------------------------------- trees, specs


def issue_tree(layers: int = 8):
    """8 layers of a (512, 2048) and a (512, 512) kernel: every leaf a Muon matrix."""
    leaf = lambda *shape: {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}  # noqa: E731
    return {
        f"layer_{i}": {"Dense_0": leaf(512, 2048), "Dense_1": leaf(512, 512)} for i in range(layers)
    }


def gpt2_tree():
    return gpt2_like_params(abstract=True)


TREES = {"issue": issue_tree, "gpt2": gpt2_tree}


def spec_for(shape, layout: str) -> PartitionSpec:
    """``fsdp``: the first axis divisible by the devices over "data"; ``tp``: the last."""
    axes = range(len(shape)) if layout == "fsdp" else reversed(range(len(shape)))
    for axis in axes:
        if shape[axis] % N_DEVICES == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return PartitionSpec(*spec)
    return PartitionSpec()


def muon_momentum_bytes(params) -> int:
    labels = jax.tree.leaves(muon_labels(params))
    return sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x, label in zip(jax.tree.leaves(params), labels, strict=True)
        if label == "muon"
    )


# ------------------------------------------------------------------- programs


def make_step(tx):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def counts(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    coll = collectives(compiled.as_text())
    return {
        "flops": float(cost.get("flops", 0.0)),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "collective_ops": sum(c["ops"] for c in coll.values()),
        "collective_bytes": sum(c["bytes"] for c in coll.values()),
        "collectives": coll,
    }


def abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def shardings_like(tree, mesh, layout):
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_for(x.shape, layout)), tree)


def concrete(params_abs, seed):
    """Zero params (new params = −lr·update exactly) and gradients of RMS 0.02."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params_abs)
    grads = jax.tree.map(
        lambda x: 0.02 * rng.standard_normal(x.shape, dtype=np.float32), params_abs
    )
    return params, grads


def relative_error(new, want) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        denom = np.linalg.norm(b)
        if denom:
            worst = max(worst, float(np.linalg.norm(a - b) / denom))
    return worst


def run_tree(name: str, check: bool) -> list[dict]:
    params_abs = TREES[name]()
    mom = muon_momentum_bytes(params_abs)
    rows = []

    # the single-device program: one device, no mesh
    tx = muon(1e-3)
    state_abs = jax.eval_shape(tx.init, params_abs)
    t0 = time.perf_counter()
    single_compiled = make_step(tx).lower(params_abs, state_abs, params_abs).compile()
    single = counts(single_compiled) | {
        "tree": name,
        "program": "single device",
        "compile_s": time.perf_counter() - t0,
    }
    rows.append(single)
    print(f"{name}: single device compiled ({single['compile_s']:.0f} s)", flush=True)
    want = None
    if check:
        params, grads = concrete(params_abs, seed=0)
        state = jax.jit(tx.init)(params)
        want = jax.tree.map(np.asarray, single_compiled(params, state, grads)[0])
        del state

    for axis_type in ("auto", "explicit"):
        kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
        mesh = jax.make_mesh((N_DEVICES,), ("data",), axis_types=(kind,))
        for layout in ("fsdp", "tp"):
            for program, owner in (("placement", None), ("owner", "data")):
                tx = muon(1e-3, owner_axes=owner)
                with jax.set_mesh(mesh):
                    p_sh = shardings_like(params_abs, mesh, layout)
                    s_abs = jax.eval_shape(tx.init, params_abs)
                    s_sh = shardings_like(s_abs, mesh, layout)
                    args = (abstract(params_abs, p_sh), abstract(s_abs, s_sh))
                    t0 = time.perf_counter()
                    compiled = make_step(tx).lower(*args, args[0]).compile()
                    row = counts(compiled) | {
                        "tree": name,
                        "program": program,
                        "axis_type": axis_type,
                        "layout": layout,
                        "compile_s": time.perf_counter() - t0,
                    }
                    if check and owner is not None:
                        params, grads = concrete(params_abs, seed=0)
                        put = lambda t, s: jax.tree.map(jax.device_put, t, s)  # noqa: E731
                        state = jax.jit(tx.init, out_shardings=s_sh)(put(params, p_sh))
                        new = compiled(put(params, p_sh), state, put(grads, p_sh))[0]
                        row["relative_error"] = relative_error(new, want)
                        del state, new
                row |= targets(row, single, mom)
                rows.append(row)
                print(
                    f"{name} {axis_type} {layout} {program}: "
                    f"{row['flops'] / 1e9:.2f} GFLOP, {row['temp_bytes'] / 1e6:.1f} MB temp, "
                    f"{row['collective_ops']} collectives {row['collective_bytes'] / 1e6:.1f} MB"
                    + (f", rel err {row['relative_error']:.1e}" if "relative_error" in row else "")
                    + f" ({row['compile_s']:.0f} s to compile)",
                    flush=True,
                )
    return rows


def targets(row: dict, single: dict, momentum_bytes: int) -> dict:
    out = {
        "momentum_bytes": momentum_bytes,
        "flops_vs_single_over_8": row["flops"] / (single["flops"] / N_DEVICES),
        "collective_bytes_vs_momentum": row["collective_bytes"] / momentum_bytes,
        "temp_vs_single": row["temp_bytes"] / max(single["temp_bytes"], 1),
    }
    met = (
        out["flops_vs_single_over_8"] <= 1.25
        and out["collective_bytes_vs_momentum"] <= 0.5
        and out["temp_vs_single"] <= 1.0
        and row.get("relative_error", 0.0) <= 1e-5
    )
    return out | {"targets_met": met}


COLUMNS = [
    ("tree", "tree", str),
    ("axis_type", "axes", str),
    ("layout", "sharding", str),
    ("program", "program", str),
    ("flops", "GFLOP/device", lambda v: f"{v / 1e9:.2f}"),
    ("flops_vs_single_over_8", "÷ (single/8)", lambda v: f"{v:.2f}"),
    ("collective_ops", "collectives", str),
    ("collective_bytes", "MB moved/device", lambda v: f"{v / 1e6:.1f}"),
    ("collective_bytes_vs_momentum", "÷ momentum", lambda v: f"{v:.2f}"),
    ("temp_bytes", "temp MB/device", lambda v: f"{v / 1e6:.1f}"),
    ("temp_vs_single", "÷ single", lambda v: f"{v:.2f}"),
    ("relative_error", "rel. error", lambda v: f"{v:.1e}"),
    ("targets_met", "targets", lambda v: "met" if v else "missed"),
]


def timing(quick: bool) -> dict:
    """Median ms of msign over the GPT-2 tree's Muon matrices: batched by shape against
    one matrix at a time, on this process's first device."""
    width, layers = (64, 2) if quick else (768, 12)
    tree = gpt2_like_params(width=width, layers=layers, vocab=8, context=8, seed=0)
    labels = jax.tree.leaves(muon_labels(tree))
    mats = [x for x, label in zip(jax.tree.leaves(tree), labels, strict=True) if label == "muon"]
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    rows = []
    for compute in ("float32", "bfloat16"):
        run = functools.partial(msign, compute_dtype=jnp.dtype(compute))
        fns = {
            "batched by shape": owner_compute(run, "data", transposable=True),
            "one at a time": lambda xs, run=run: [run(x) for x in xs],
        }
        with jax.set_mesh(mesh):
            ms = time_functions(fns, mats, repeats=3 if quick else 15)
        rows += [{"compute": compute, "way": way, "ms": 1e3 * t} for way, t in ms.items()]
        print(f"{compute}: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in ms.items()))
    return {"matrices": len(mats), "width": width, "layers": layers, "rows": rows}


def merged(path: str, rows: list[dict]) -> list[dict]:
    """``rows`` after the rows of other trees already in the results file at ``path``."""
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        old = json.load(f).get("rows", [])
    trees = {row["tree"] for row in rows}
    return [row for row in old if row["tree"] not in trees] + rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", choices=[*TREES, "all"], default="all")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "owner_compute.json"))
    parser.add_argument("--timing", action="store_true", help="batched against one at a time")
    parser.add_argument("--quick", action="store_true", help="--timing at width 64")
    args = parser.parse_args(argv)
    if args.timing:
        results = {"machine": machine(), "versions": versions()} | timing(args.quick)
        write_json("owner_compute_timing", results, args.out)
        return results
    assert jax.device_count() == N_DEVICES, "XLA_FLAGS must give 8 CPU devices"
    trees = list(TREES) if args.tree == "all" else [args.tree]
    rows = [row for name in trees for row in run_tree(name, args.check)]
    results = {"machine": machine(), "versions": versions(), "rows": merged(args.out, rows)}
    write_json("owner_compute", results, args.out)
    print(markdown_table(rows, COLUMNS))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

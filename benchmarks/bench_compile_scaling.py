"""Compile time and compile memory of one donated step against the leaf count, each in a
fresh process.

``bench_compile.py`` compares pairs at 512 leaves in one process. Here every (transform,
leaf count) is traced, lowered and compiled in a process of its own, so its peak
resident memory (``ru_maxrss``) is its own, on trees of blocks of (kernel, bias, norm
scale, norm bias) with up to thousands of leaves: whether time and memory grow in
proportion to the leaves or faster. Tiger's guards are split into their parts (the NaN
check without and with the exact ±inf check under its ``lax.cond``, the spike guard),
next to ``optax.lion(β, β)``::

    python benchmarks/bench_compile_scaling.py                       # 1000, 2000, 4000 leaves
    python benchmarks/bench_compile_scaling.py --leaves 64 128 --only "optax.lion"

Prints a table and writes benchmarks/results/compile_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import optax
from bench_compile import block_tree
from benchlib import hlo_summary, machine, make_step, markdown_table, versions, write_json

import optax_ext as ox

BETA = 0.965

CANDIDATES = {
    "optax.lion(β, β)": lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
    "tiger, guards off": lambda: ox.tiger(1e-3, BETA, 0.01, guard_nan=False, spike_factor=None),
    "tiger, spike guard only": lambda: ox.tiger(1e-3, BETA, 0.01, guard_nan=False),
    "tiger, NaN check only": lambda: ox.tiger(1e-3, BETA, 0.01, spike_factor=None, catch_inf=False),
    "tiger, NaN and ±inf check": lambda: ox.tiger(1e-3, BETA, 0.01, spike_factor=None),
    "tiger (defaults)": lambda: ox.tiger(1e-3, BETA, 0.01),
}


def compile_one(name: str, n_leaves: int) -> dict:
    """Trace + lower and compile ``name``'s step on ``n_leaves`` abstract leaves, in this
    process: seconds, peak resident memory and the compiled module's instructions."""
    params = block_tree(n_leaves)
    tx = CANDIDATES[name]()
    state = jax.eval_shape(tx.init, params)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    lowered = make_step(tx).lower(params, state, params)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return {
        "transform": name,
        "leaves": n_leaves,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "peak_GB": peak * 1024 / 1e9,
        "before_GB": before * 1024 / 1e9,
        "instructions": hlo_summary(compiled.as_text())["instructions"],
    }


def in_fresh_process(name: str, n_leaves: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, str(n_leaves)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"transform": name, "leaves": n_leaves, "skipped": f"over {timeout:.0f} s"}
    except subprocess.CalledProcessError as err:
        return {"transform": name, "leaves": n_leaves, "failed": err.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--only", default=None, help="transforms whose name contains this")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per compile")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "LEAVES"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="JSON path (default results/compile_scaling.json)")
    args = ap.parse_args(argv)
    if args.one:  # the child: one compile, one JSON line
        print(json.dumps(compile_one(args.one[0], int(args.one[1]))), flush=True)
        return None
    names = [n for n in CANDIDATES if args.only is None or args.only in n]
    rows = []
    for n_leaves in args.leaves:
        for name in names:
            rows.append(in_fresh_process(name, n_leaves, args.timeout))
            print(f"  {name}, {n_leaves} leaves: {rows[-1]}", flush=True)
    results = {"machine": machine(), "versions": versions(), "rows": rows}
    f1 = lambda x: f"{x:.1f}"
    print(
        markdown_table(
            rows,
            [
                ("transform", "transform", str),
                ("leaves", "leaves", str),
                ("lower_s", "trace + lower s", f1),
                ("compile_s", "compile s", f1),
                ("peak_GB", "peak memory GB", lambda x: f"{x:.2f}"),
                ("instructions", "HLO instructions", str),
            ],
        )
    )
    print("wrote", write_json("compile_scaling", results, args.out))
    return results


if __name__ == "__main__":
    main()

"""Compile time of every optimizer's donated step against its optax counterpart.

For each pair, a fresh transform's step is traced and lowered, then compiled by XLA,
ours and optax's alternated ``--repeats`` times in one run (this machine's speed drifts);
medians are reported with their ratio (lower is better; the target is <= 1.3). Trees:
blocks of (kernel, bias, norm scale, norm bias) with 512 and 1000 leaves, and GPT-2
small's shapes (148 leaves, with the embedding tables that take Tiger's CPU row-block
loop). Abstract leaves (``jax.ShapeDtypeStruct``): nothing is allocated.

Diagnostic rows split Tiger's defaults into their parts (the NaN and spike guards, the
path-rule scales, both off), since those are what a per-leaf compile cost can come from. The
compiled module's fusion count is reported too: compile time follows it closely::

    python benchmarks/bench_compile.py                   # 512 and 1000 leaves, GPT-2 small
    python benchmarks/bench_compile.py --leaves 512 --repeats 1 --only amos

Prints a table and writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import jax
import optax
from benchlib import (
    abstract_gpt2,
    compile_interleaved,
    machine,
    markdown_table,
    n_params,
    optax_guarded,
    versions,
    write_json,
)

import optax_ext as ox

BETA = 0.965


def optional_pairs() -> dict[str, tuple[Callable, Callable]]:
    """Muon against optax.contrib.muon, where both exist in this checkout and optax."""
    pairs = {}
    try:
        from optax_ext.optimizers.muon import muon

        pairs["muon vs optax.contrib.muon"] = (lambda: muon(1e-3), lambda: optax.contrib.muon(1e-3))
    except (ImportError, AttributeError):
        pass
    return pairs


#: name: (ours, optax counterpart), both factories of fresh transforms
PAIRS: dict[str, tuple[Callable, Callable]] = {
    "tiger (defaults) vs optax.lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
    ),
    "tiger (guards off) vs optax.lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01, guard_nan=False, spike_factor=None),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
    ),
    "tiger (scaling off) vs optax.lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01, param_scaling=None),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
    ),
    "tiger (scaling and guards off) vs optax.lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01, param_scaling=None, guard_nan=False, spike_factor=None),
        lambda: optax.lion(1e-3, BETA, BETA, weight_decay=0.01),
    ),
    "lion vs optax.lion": (lambda: ox.lion(1e-4, 0.9, 0.99), lambda: optax.lion(1e-4, 0.9, 0.99)),
    "adafactor vs optax.adafactor": (lambda: ox.adafactor(1e-3), lambda: optax.adafactor(1e-3)),
    "sgdm vs optax.sgd(momentum)": (
        lambda: ox.sgdm(1e-2, 0.9),
        lambda: optax.sgd(1e-2, momentum=0.9),
    ),
    "adax vs optax.adamw": (lambda: ox.adax(1e-3), lambda: optax.adamw(1e-3)),
    "adaxw vs optax.adamw": (lambda: ox.adaxw(1e-3), lambda: optax.adamw(1e-3)),
    "amos vs optax.adamw": (lambda: ox.amos(1e-2), lambda: optax.adamw(1e-3)),
    # like-for-like rows: an optax setup doing the same kind of per-leaf work
    "tiger (defaults) vs optax-guarded lion(β, β)": (
        lambda: ox.tiger(1e-3, BETA, 0.01),
        lambda: optax_guarded(optax.lion(1e-3, BETA, BETA, weight_decay=0.01)),
    ),
    "amos vs optax.adafactor": (lambda: ox.amos(1e-2), lambda: optax.adafactor(1e-3)),
}


def block_tree(n_leaves: int, width: int = 64):
    """``n_leaves`` abstract leaves: blocks of a width×width kernel, a bias, a norm scale
    and bias (512 leaves: the many-leaf tree of bench_speed.py)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jax.numpy.float32)
    return {
        "params": {
            f"block_{i}": {
                "dense": {"kernel": spec(width, width), "bias": spec(width)},
                "norm": {"scale": spec(width), "bias": spec(width)},
            }
            for i in range(n_leaves // 4)
        }
    }


def compile_pairs(params, names, repeats=3, pairs=None) -> list[dict]:
    """One row per pair: median lower and compile seconds of ours and optax's, ratios."""
    pairs = pairs or {**PAIRS, **optional_pairs()}
    rows = []
    for name in names:
        make_ours, make_theirs = pairs[name]
        t = compile_interleaved({"ours": make_ours, "optax": make_theirs}, params, params, repeats)
        ours, theirs = t["ours"], t["optax"]
        ratios = [a / b for a, b in zip(ours["total_runs_s"], theirs["total_runs_s"], strict=True)]
        rows.append(
            {
                "pair": name,
                "ours_s": ours["total_s"],
                "optax_s": theirs["total_s"],
                "ours_lower_s": ours["lower_s"],
                "ours_compile_s": ours["compile_s"],
                "optax_lower_s": theirs["lower_s"],
                "optax_compile_s": theirs["compile_s"],
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ours_fusions": ours["fusions"],
                "optax_fusions": theirs["fusions"],
                "ours_distinct_kernels": ours["distinct_kernels"],
                "optax_distinct_kernels": theirs["distinct_kernels"],
                "ours_instructions": ours["instructions"],
                "optax_instructions": theirs["instructions"],
            }
        )
        print(
            f"  {name}: {ours['total_s']:.2f} s vs {theirs['total_s']:.2f} s, ratio "
            f"{rows[-1]['ratio']:.2f}; fusions {ours['fusions']} vs {theirs['fusions']}",
            flush=True,
        )
    return rows


COLUMNS = [
    ("tree", "tree", str),
    ("pair", "pair", str),
    ("ours_s", "ours s", lambda x: f"{x:.2f}"),
    ("optax_s", "optax s", lambda x: f"{x:.2f}"),
    ("ratio", "ratio", lambda x: f"{x:.2f}"),
    ("ratio_min", "min", lambda x: f"{x:.2f}"),
    ("ratio_max", "max", lambda x: f"{x:.2f}"),
    ("ours_lower_s", "ours trace+lower s", lambda x: f"{x:.2f}"),
    ("ours_fusions", "ours fusions", str),
    ("optax_fusions", "optax fusions", str),
    ("ours_distinct_kernels", "ours distinct kernels", str),
    ("optax_distinct_kernels", "optax distinct kernels", str),
    ("ours_instructions", "ours HLO instructions", str),
    ("optax_instructions", "optax HLO instructions", str),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--leaves", default="512,1000", help="comma-separated leaf counts")
    ap.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2 small tree")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="run only pairs whose name contains this")
    ap.add_argument("--out", default=None, help="JSON path (default results/compile.json)")
    args = ap.parse_args(argv)
    pairs = {**PAIRS, **optional_pairs()}
    names = [n for n in pairs if args.only is None or args.only in n]
    trees = {f"{n} leaves": block_tree(int(n)) for n in args.leaves.split(",") if n}
    if not args.no_gpt2:
        trees["GPT-2 small (148 leaves)"] = abstract_gpt2()
    results = {"machine": machine(), "versions": versions(), "repeats": args.repeats, "rows": []}
    for label, tree in trees.items():
        leaves = len(jax.tree.leaves(tree))
        print(f"{label}: {leaves} leaves, {n_params(tree):,} params", flush=True)
        for row in compile_pairs(tree, names, args.repeats, pairs):
            results["rows"].append({"tree": label, **row})
    print()
    print(markdown_table(results["rows"], COLUMNS))
    print("wrote", write_json("compile", results, args.out))
    return results


if __name__ == "__main__":
    main()

"""Compile time of the guards and wrappers against the number of parameter leaves.

Every leaf of a guarded step selects on one whole-step decision ("skip this step"). If
that decision is written as a chain of per-leaf flags, XLA fuses a copy of the chain
into each leaf's kernel and the program grows with the square of the leaf count; the
guards build it with ``optax_ext.wrappers.spike.any_flag`` instead. This script
measures what a user waits for: tracing, lowering and compiling one donated step
(``jax.jit(step, donate_argnums=(0, 1))``) of a tree of ``n`` small leaves (blocks of
kernel, bias, norm scale and norm bias, ``benchlib.many_leaf_params``), for each
transform, the transforms alternated at each size. Reported per size: seconds (the
fastest of ``--repeats`` runs up to 160 leaves, one run above), the ratio to
``optax.apply_if_finite`` around the same Adam (the guard target: <= 2) and to the bare
inner optimizer, and the number of instructions in the compiled module (which is what
grew quadratically). Seconds are CPU seconds of the compiling process (compilation is
single-threaded: on a shared machine this counts the work, not the waiting); wall
seconds are in the JSON. Above 160 leaves only the transforms matching ``--large``
are run (the guards and their references; the rest are per-leaf wrappers with no
whole-step decision), and a transform whose next size would take over ``--budget``
seconds, extrapolated as n^1.5 from its last one, is not run there (reported skipped).

    python benchmarks/bench_guard_compile.py                       # 12 ... 1000 leaves
    python benchmarks/bench_guard_compile.py --leaves 12 40 --only nan_guard

Prints a table and writes benchmarks/results/guard_compile.json.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import jax
import optax
from benchlib import machine, make_step, many_leaf_params, table, write_json

from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lazy import lazy
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.param_ema import param_ema

LR, BETA = 1e-3, 0.965
REFERENCE = "optax.apply_if_finite(adam)"

#: name: (factory of a fresh transform, name of its bare inner optimizer)
CANDIDATES: dict[str, tuple[Callable[[], optax.GradientTransformation], str | None]] = {
    "optax.adam": (lambda: optax.adam(LR), None),
    REFERENCE: (lambda: optax.apply_if_finite(optax.adam(LR), 5), "optax.adam"),
    "nan_guard(adam)": (lambda: nan_guard(optax.adam(LR)), "optax.adam"),
    "nan_guard(adam, spike_factor=None)": (
        lambda: nan_guard(optax.adam(LR), spike_factor=None),
        "optax.adam",
    ),
    "nan_guard(adam, spike_action='clip')": (
        lambda: nan_guard(optax.adam(LR), spike_action="clip"),
        "optax.adam",
    ),
    "nan_guard(adam, check_result=True)": (
        lambda: nan_guard(optax.adam(LR), check_result=True),
        "optax.adam",
    ),
    "optax.MultiSteps(adam, 4)": (lambda: optax.MultiSteps(optax.adam(LR), 4), "optax.adam"),
    "accumulate_gradients(adam, 4)": (
        lambda: accumulate_gradients(optax.adam(LR), 4),
        "optax.adam",
    ),
    "accumulate_gradients(adam, 4, skip_nonfinite)": (
        lambda: accumulate_gradients(optax.adam(LR), 4, skip_nonfinite=True),
        "optax.adam",
    ),
    "optax.lion(β, β)": (lambda: optax.lion(LR, BETA, BETA), None),
    "tiger (defaults: own guard, spike guard)": (lambda: tiger(LR, BETA), "optax.lion(β, β)"),
    "tiger (guard_nan=False, spike_factor=None)": (
        lambda: tiger(LR, BETA, guard_nan=False, spike_factor=None),
        "optax.lion(β, β)",
    ),
    "nan_guard(tiger)": (lambda: nan_guard(tiger(LR, BETA)), "optax.lion(β, β)"),
    "lookahead(adam)": (lambda: lookahead(optax.adam(LR)), "optax.adam"),
    "chain(adam, param_ema)": (lambda: optax.chain(optax.adam(LR), param_ema()), "optax.adam"),
    "layer_adapted(scale_by_adam)": (
        lambda: layer_adapted(optax.scale_by_adam(), LR),
        "optax.adam",
    ),
    "lazy(adam)": (lambda: lazy(optax.adam(LR), include="kernel"), "optax.adam"),
}


def n_instructions(compiled_text: str) -> int:
    """Instructions in a compiled module, fused computations included."""
    return len(re.findall(r"^\s+(?:ROOT )?%\S+ = ", compiled_text, re.M))


def compile_once(make, params) -> tuple[float, float, int]:
    """(wall s, CPU s, instructions) of tracing, lowering and compiling a fresh step."""
    tx = make()
    step = make_step(tx)
    state = jax.eval_shape(tx.init, params)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = step.lower(params, state, params).compile()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, n_instructions(compiled.as_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leaves", type=int, nargs="+", default=[12, 40, 160, 640, 1000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget", type=float, default=90.0, help="seconds per compile, at most")
    ap.add_argument("--only", default=None, help="a regex on the transform names")
    ap.add_argument(
        "--large",
        default=r"^optax\.(adam|apply_if_finite|lion)|^nan_guard\(adam\)$|skip_nonfinite|check_r|"
        r"tiger \(",
        help="a regex: the transforms also measured above 160 leaves",
    )
    args = ap.parse_args()
    names = [n for n in CANDIDATES if args.only is None or re.search(args.only, n)]
    names = list(dict.fromkeys([REFERENCE, *names]))  # the reference is always measured
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # first-compile overhead out of the way

    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    last: dict[str, tuple[int, float]] = {}
    for n in args.leaves:
        params = many_leaf_params(n_blocks=max(1, n // 4), width=8)
        leaves = len(jax.tree.leaves(params))
        repeats = args.repeats if leaves <= 160 else 1
        runs: dict[str, list] = {name: [] for name in names}
        for _ in range(repeats):
            for name in names:  # alternated: the machine's speed drifts
                if leaves > 160 and not re.search(args.large, name):
                    continue
                if name in last:
                    prev_n, prev_s = last[name]
                    if prev_s * (leaves / prev_n) ** 1.5 > args.budget:
                        continue
                runs[name].append(compile_once(CANDIDATES[name][0], params))
        for name in names:
            if not runs[name]:
                if leaves <= 160 or re.search(args.large, name):
                    results[name][leaves] = {"skipped": f"extrapolated > {args.budget:g} s"}
                continue
            cpu, wall, instructions = min((c, w, h) for w, c, h in runs[name])
            results[name][leaves] = {"seconds": cpu, "wall_seconds": wall, "hlo": instructions}
            last[name] = (leaves, cpu)
        print(f"{leaves} leaves done", flush=True)

    for name, by_n in results.items():
        inner = CANDIDATES[name][1]
        for n, r in by_n.items():
            if "seconds" not in r:
                continue
            ref = results.get(REFERENCE, {}).get(n, {}).get("seconds")
            base = results.get(inner, {}).get(n, {}).get("seconds") if inner else None
            r["vs_apply_if_finite"] = r["seconds"] / ref if ref else None
            r["vs_inner"] = r["seconds"] / base if base else None

    sizes = sorted({n for by_n in results.values() for n in by_n})
    rows = []
    for name, by_n in results.items():
        row = {"name": name}
        for n in sizes:
            r = by_n.get(n, {})
            if "seconds" in r:
                ratio = r.get("vs_apply_if_finite")
                row[n] = (
                    f"{r['seconds']:.2f} s ({ratio:.2f}x)" if ratio else f"{r['seconds']:.2f} s"
                )
            else:
                row[n] = "skipped" if r else ""
        rows.append(row)
    columns = [("name", "transform", str)] + [(n, f"{n} leaves", str) for n in sizes]
    print("\nCPU seconds to trace + lower + compile one donated step (x apply_if_finite's):")
    print(table(rows, columns))
    growth = {}
    for name, by_n in results.items():
        timed = [(n, r["hlo"]) for n, r in sorted(by_n.items()) if "hlo" in r]
        if len(timed) >= 2:
            (n0, h0), (n1, h1) = timed[0], timed[-1]
            growth[name] = (h1 - h0) / (n1 - n0)
    path = write_json(
        "guard_compile",
        {
            "machine": machine(),
            "leaves": sizes,
            "repeats_up_to_160_leaves": args.repeats,
            "budget_s": args.budget,
            "results": {
                name: {str(n): r for n, r in by_n.items()} for name, by_n in results.items()
            },
            "hlo_instructions_per_leaf": growth,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

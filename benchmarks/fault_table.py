"""What each optimizer does with bad gradients: NaN, Inf, zero lr, 1e30, bf16 overflow.

A small Flax model (embedding, dense, LayerNorm, dense) is trained on fixed random data.
Each run makes 2 clean steps, one step with the fault, then 3 clean steps. Faults:

* ``nan``: one entry of ``Dense_0/kernel``'s gradient is NaN;
* ``inf``: one entry of ``Dense_0/kernel``'s gradient is +Inf;
* ``zero_lr``: the optimizer is built with learning rate 0 (clean gradients);
* ``huge``: on the fault step every gradient is multiplied by 1e30 (finite in float32,
  but its square is not);
* ``bf16``: params and gradients in bfloat16, gradients multiplied by 1e30 on the fault
  step (finite in bfloat16; its square overflows bfloat16 and float32 alike).

Recorded per run (JSON): params finite after the fault and at the end, which leaves the
fault step moved (and whether the faulty leaf shrank toward its centre), the largest
parameter change, whether the optimizer state is finite, its largest entry, and whether
the clean steps afterwards recover (params and state finite and the params still move).
The Markdown table summarises each run in a few words. Deterministic: no timing.

Usage: ``python benchmarks/fault_table.py`` (writes benchmarks/results/faults.md, .json).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from optax_ext._common import path_to_str  # noqa: E402
from optax_ext.optimizers.adafactor import adafactor  # noqa: E402
from optax_ext.optimizers.adax import adax  # noqa: E402
from optax_ext.optimizers.amos import amos  # noqa: E402
from optax_ext.optimizers.lion import lion  # noqa: E402
from optax_ext.optimizers.sgdm import sgdm  # noqa: E402
from optax_ext.optimizers.tiger import tiger  # noqa: E402
from optax_ext.wrappers.nan_guard import nan_guard  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FAULTS = ("nan", "inf", "zero_lr", "huge", "bf16")
FAULT_TITLES = {
    "nan": "NaN in one leaf",
    "inf": "+Inf in one leaf",
    "zero_lr": "lr = 0",
    "huge": "gradients ×1e30 (f32)",
    "bf16": "gradients ×1e30 (bf16)",
}
FAULTY_LEAF = "params/Dense_0/kernel"
CLEAN_BEFORE, CLEAN_AFTER = 2, 3
HUGE = 1e30


class Model(nn.Module):
    """Tokens -> embedding -> mean -> Dense -> LayerNorm -> gelu -> Dense(1)."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(16, 8)(tokens).mean(axis=1)
        x = nn.gelu(nn.LayerNorm()(nn.Dense(16)(x)))
        return nn.Dense(1)(x)[:, 0]


# learning rates typical of each optimizer on this scale of problem; lr=None -> default
def _lr(lr, default):
    return default if lr is None else lr


BASE = {
    "lion": lambda lr: lion(_lr(lr, 1e-3)),
    "adafactor": lambda lr: adafactor(lr),  # None: the relative step min(1e-2, 1/√τ)
    "adax": lambda lr: adax(_lr(lr, 1e-2)),
    "amos": lambda lr: amos(_lr(lr, 0.1)),
    "sgdm": lambda lr: sgdm(_lr(lr, 1e-1)),
    "optax.adamw": lambda lr: optax.adamw(_lr(lr, 1e-2)),
}


def rows() -> list[tuple[str, Any]]:
    """(row name, factory of lr): Tiger with its own guard in each setting, every
    optimizer alone and inside ``nan_guard`` (Tiger with its own guard off)."""
    out = [
        ("tiger (own guard, NaN only)", lambda lr: tiger(_lr(lr, 1e-2))),
        ("tiger (own guard, catch_inf)", lambda lr: tiger(_lr(lr, 1e-2), catch_inf=True)),
        ("tiger (guard_nan=False)", lambda lr: tiger(_lr(lr, 1e-2), guard_nan=False)),
        (
            "nan_guard(tiger(guard_nan=False))",
            lambda lr: nan_guard(tiger(_lr(lr, 1e-2), guard_nan=False)),
        ),
    ]
    for name, make in BASE.items():
        out.append((name, make))
        out.append((f"nan_guard({name})", lambda lr, make=make: nan_guard(make(lr))))
    return out


@functools.cache
def problem(dtype):
    """Initial params in ``dtype`` and a jitted loss-and-gradient function."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 16, size=(32, 5)))
    targets = jnp.asarray(rng.standard_normal(32), jnp.float32)
    model = Model()
    params = model.init(jax.random.key(0), tokens)
    params = jax.tree.map(lambda x: x.astype(dtype), params)

    def loss(p):
        pred = model.apply(p, tokens).astype(jnp.float32)
        return jnp.mean((pred - targets) ** 2)

    return params, jax.jit(jax.value_and_grad(loss))


def inject(grads, fault: str):
    def leaf(path, g):
        if fault in ("huge", "bf16"):
            return (g.astype(jnp.float32) * HUGE).astype(g.dtype)
        if path_to_str(path) != FAULTY_LEAF:
            return g
        bad = jnp.nan if fault == "nan" else jnp.inf
        return g.at[(0,) * g.ndim].set(bad)

    return jax.tree_util.tree_map_with_path(leaf, grads)


def _finite(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    )


def _nonfinite_kind(tree) -> str | None:
    leaves = [
        np.asarray(x, np.float64)
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if any(np.isnan(x).any() for x in leaves):
        return "NaN"
    if any(np.isinf(x).any() for x in leaves):
        return "Inf"
    return None


def _max_abs(tree) -> float:
    vals = [
        float(np.max(np.abs(np.asarray(x, np.float64))))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and np.size(x)
    ]
    return max(vals, default=0.0)


def _max_change(old, new) -> float:
    """Largest |new - old| over all leaves (NaN/Inf if the params are not finite)."""
    a, b = _leaf_dict(old), _leaf_dict(new)
    return max((float(np.max(np.abs(b[k] - a[k]))) for k in a if a[k].size), default=0.0)


def _leaf_dict(tree) -> dict[str, np.ndarray]:
    return {
        path_to_str(p): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def run_case(make, fault: str) -> dict[str, Any]:
    """2 clean steps, the fault, 3 clean steps; what happened, as plain data."""
    dtype = jnp.bfloat16 if fault == "bf16" else jnp.float32
    params, value_and_grad = problem(dtype)
    tx = make(0.0 if fault == "zero_lr" else None)
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params0 = params
    for _ in range(CLEAN_BEFORE):
        prev = params
        params, state = step(params, state, value_and_grad(params)[1])
    clean_delta = _max_change(prev, params)  # a normal step's size, to compare with later
    before = params
    loss_before = float(value_and_grad(before)[0])
    grads = value_and_grad(params)[1]
    if fault != "zero_lr":
        grads = inject(grads, fault)
    params, state = step(params, state, grads)
    after = params

    old, new = _leaf_dict(before), _leaf_dict(after)
    centres = {k: 1.0 if k.endswith("/scale") else 0.0 for k in old}
    moved = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    faulty_old, faulty_new = old[FAULTY_LEAF] - centres[FAULTY_LEAF], new[FAULTY_LEAF]
    faulty_new = faulty_new - centres[FAULTY_LEAF]
    shrunk = bool(
        np.all(np.isfinite(faulty_new))
        and faulty_old.any()
        and np.all(np.abs(faulty_new) <= np.abs(faulty_old))
        and np.any(np.abs(faulty_new) < np.abs(faulty_old))
    )
    delta = max((float(np.max(np.abs(new[k] - old[k]))) for k in moved), default=0.0)

    record: dict[str, Any] = {
        "params_finite": _finite(after),
        "params_nonfinite": _nonfinite_kind(after),
        "state_finite": _finite(state),
        "state_nonfinite": _nonfinite_kind(state),
        "state_max_abs": _max_abs(state),
        "moved_leaves": moved,
        "faulty_leaf_shrank": shrunk,
        "others_moved": any(k != FAULTY_LEAF for k in moved),
        "max_abs_delta": delta,
    }
    for _ in range(CLEAN_AFTER):
        prev = params
        params, state = step(params, state, value_and_grad(params)[1])
    last_delta = _max_change(prev, params)
    # frozen: the clean steps after the fault move the params by less than 1% of a
    # normal step (an Inf second moment leaves only weight decay)
    last_moved = bool(np.isfinite(last_delta) and last_delta > 0.01 * clean_delta)
    loss_end = float(value_and_grad(params)[0])
    record.update(
        end_params_finite=_finite(params),
        end_state_finite=_finite(state),
        end_state_nonfinite=_nonfinite_kind(state),
        end_state_max_abs=_max_abs(state),
        clean_step_max_delta_before_fault=clean_delta,
        clean_step_max_delta_after_fault=last_delta,
        clean_steps_move=last_moved,
        loss_before_fault=loss_before,
        loss_end=loss_end,
        recovered=_finite(params) and _finite(state) and last_moved and np.isfinite(loss_end),
    )
    if fault == "zero_lr":
        record["unchanged_from_init"] = all(
            np.array_equal(a, b)
            for a, b in zip(_leaf_dict(params0).values(), _leaf_dict(params).values(), strict=True)
        )
        record["max_abs_change_from_init"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(_leaf_dict(params0).values(), _leaf_dict(params).values(), strict=True)
        )
    return record


def describe(fault: str, r: dict[str, Any]) -> str:
    """A few words for the table cell."""
    if fault == "zero_lr":
        if r["unchanged_from_init"]:
            return "unchanged"
        return f"moves (max {r['max_abs_change_from_init']:.1e})"
    if not r["params_finite"]:
        return f"{r['params_nonfinite']} params"
    words = []
    if not r["moved_leaves"]:
        words.append("skipped")
    elif fault in ("nan", "inf"):
        if r["faulty_leaf_shrank"] and not r["others_moved"]:
            words.append("skipped, leaf shrinks")
        elif r["faulty_leaf_shrank"]:
            words.append("leaf shrinks, others step")
        else:
            words.append("finite, stepped")
    else:
        words.append(f"finite, step {r['max_abs_delta']:.0e}")
    if not r["state_finite"]:
        words.append(f"state {r['state_nonfinite']}")
    elif r["state_max_abs"] > 1e10:
        words.append(f"state ~{r['state_max_abs']:.0e}")
    if not r["end_params_finite"]:
        words.append("later NaN params")
        return "; ".join(words)
    if not r["end_state_finite"]:
        words.append("stays " + str(r["end_state_nonfinite"]))
    if not r["clean_steps_move"]:
        words.append("frozen after")
    if not np.isfinite(r["loss_end"]):
        words.append("loss Inf after")
    if r["recovered"]:
        words.append("recovers")
    return "; ".join(words)


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = "| optimizer | " + " | ".join(FAULT_TITLES[f] for f in FAULTS) + " |"
    sep = "|---" * (len(FAULTS) + 1) + "|"
    lines = [head, sep]
    for name, by_fault in results.items():
        cells = [describe(f, by_fault[f]) for f in FAULTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, make in rows():
        results[name] = {fault: run_case(make, fault) for fault in FAULTS}
    table = markdown(results)
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    notes = (
        "\n\nEach run: 2 clean steps, the fault on step 3, then 3 clean steps, on a small "
        "Flax model (embedding, Dense, LayerNorm, Dense). The NaN/Inf fault hits one entry "
        f'of `{FAULTY_LEAF}`. "skipped": no parameter moved on the fault step; "leaf '
        'shrinks": the faulty leaf moved toward its centre (0, or 1 for norm scales); '
        '"state Inf/NaN": the optimizer state holds non-finite values after the fault; '
        '"stays": still non-finite after the clean steps; "frozen after": params finite '
        "but the clean steps move them by less than 1% of a normal step (an Inf second "
        'moment leaves only weight decay); "loss Inf after": params finite but too large '
        'for the model; "recovers": params and state finite and the clean steps move the '
        'params. "step": the largest parameter change on the fault step. "state ~1e+28": '
        "the momentum holds the 1e30 gradient; a sign optimizer keeps following that "
        "gradient's sign until it decays, about ln(1e28)/(1-β) ≈ 1800 steps at β = 0.965. "
        "Tiger's own guard checks the gradients only, so finite gradients of 1e30 pass "
        "through it; `nan_guard` also skips a step whose result (updates or new state) is "
        "not finite, which catches the overflow of Adam-like second moments and Amos, but "
        "not SGDM's finite step of lr·1e30; Amos's `clip_value` keeps it finite.\n"
    )
    with open(os.path.join(RESULTS_DIR, "faults.md"), "w") as f:
        f.write("# Fault injection\n\nGenerated by `python benchmarks/fault_table.py`.\n\n")
        f.write(table + notes)
    with open(os.path.join(RESULTS_DIR, "faults.json"), "w") as f:
        json.dump(
            {
                "faulty_leaf": FAULTY_LEAF,
                "huge": HUGE,
                "clean_before": CLEAN_BEFORE,
                "clean_after": CLEAN_AFTER,
                "results": results,
            },
            f,
            indent=1,
            default=str,
        )


if __name__ == "__main__":
    main()

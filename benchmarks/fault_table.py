"""What each optimizer does with bad gradients, and whether it recovers: NaN, Inf, zero lr,
1e30, bf16 overflow.

A small Flax model (embedding, dense, LayerNorm, dense) is trained full-batch on fixed
random data: ``CLEAN_BEFORE`` = 50 clean steps, one step with the fault, then
``CLEAN_AFTER`` = 200 clean steps, in one jitted scan. The same optimizer is also run
for the same 251 steps without the fault (the clean run). Faults:

* ``nan``: one entry of ``Dense_0/kernel``'s gradient is NaN;
* ``inf``: one entry of ``Dense_0/kernel``'s gradient is +Inf;
* ``zero_lr``: the optimizer is built with learning rate 0 (clean gradients);
* ``huge``: on the fault step every gradient is multiplied by 1e30 (finite in float32,
  but its square is not);
* ``bf16``: params and gradients in bfloat16, gradients multiplied by 1e30 on the fault
  step (finite in bfloat16; its square overflows bfloat16 and float32 alike).

Each cell says what the fault step did (skipped, shrank the faulty leaf, stepped, the
size of the step, the state's largest entry) and, from the 200 steps after it, how the
run ended: the final loss (the mean over the last 50 steps: sign optimizers oscillate
around the minimum) relative to the clean run's. "recovers": finite
and within 1.5x of the clean run's loss; "partly recovers": finite, below the initial
loss but above 1.5x the clean one; "ruined": at or above the initial loss; "state
stays Inf": params finite, the optimizer state not; "frozen": the last steps move the
params by less than 1% of the clean run's last steps; NaN/Inf params.
The JSON keeps every number (losses at the fault, its maximum afterwards, the end) and
the guard counters (:data:`COUNTERS`) of every state in the tree that holds one, by state
class: Tiger's, ``nan_guard``'s, Muon's (its own and its Tiger partition's), qk_clip's.
Deterministic: no timing.

Usage: ``python benchmarks/fault_table.py`` (writes benchmarks/results/faults.md, .json);
``--from-json`` relabels the last run's JSON without training again.
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
from optax_ext.optimizers.muon import muon  # noqa: E402
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
CLEAN_BEFORE, CLEAN_AFTER = 50, 200
RECOVERED = 1.5  # final loss within this factor of the clean run's: "recovers"
TAIL = 50  # "final loss": the mean over the last TAIL steps (sign optimizers oscillate)
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
    # the faulty leaf, Dense_0/kernel, is a matrix: Muon's partition (its own guard);
    # biases, LayerNorm and the embedding go to `other`, named so that a row does not
    # change with muon's default
    "muon(other='tiger')": lambda lr: muon(_lr(lr, 1e-2), other="tiger"),
    "muon(other='adamw')": lambda lr: muon(_lr(lr, 1e-2), other="adamw"),
}

#: the guard counters of every state in the tree: Tiger's, nan_guard's and Muon's
#: (skipped_steps, shrunk_leaves; spike_steps for the spike guard) and qk_clip's
#: nonfinite_heads (max logits left out as +inf or NaN)
COUNTERS = ("skipped_steps", "shrunk_leaves", "spike_steps", "nonfinite_heads")


def rows() -> list[tuple[str, Any]]:
    """(row name, factory of lr): Tiger with its own guards in each setting, every
    optimizer alone and inside ``nan_guard`` (Tiger with its own guards off; Muon with
    its own, which ``nan_guard`` makes redundant for a NaN or Inf)."""
    t = lambda lr, **kw: tiger(_lr(lr, 1e-2), **kw)
    out = [
        ("tiger (defaults: own guard, spike guard)", lambda lr: t(lr)),
        ("tiger (spike_factor=None)", lambda lr: t(lr, spike_factor=None)),
        (
            "tiger (catch_inf=False, spike_factor=None: Su's original)",
            lambda lr: t(lr, catch_inf=False, spike_factor=None),
        ),
        (
            "tiger (guard_nan=False, spike_factor=None)",
            lambda lr: t(lr, guard_nan=False, spike_factor=None),
        ),
        (
            "nan_guard(tiger(no own guards))",
            lambda lr: nan_guard(t(lr, guard_nan=False, spike_factor=None)),
        ),
    ]
    for name, make in BASE.items():
        out.append((name, make))
        out.append((f"nan_guard({name})", lambda lr, make=make: nan_guard(make(lr))))
    return out


@functools.cache
def problem(dtype):
    """Initial params in ``dtype``, a loss function and the initial loss."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 16, size=(32, 5)))
    targets = jnp.asarray(rng.standard_normal(32), jnp.float32)
    model = Model()
    params = model.init(jax.random.key(0), tokens)
    params = jax.tree.map(lambda x: x.astype(dtype), params)

    def loss(p):
        pred = model.apply(p, tokens).astype(jnp.float32)
        return jnp.mean((pred - targets) ** 2)

    return params, loss


def fault_inputs(fault: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the gradients' multiplier and the value added to the faulty entry."""
    steps = CLEAN_BEFORE + 1 + CLEAN_AFTER
    scale, poison = np.ones(steps, np.float32), np.zeros(steps, np.float32)
    if fault in ("huge", "bf16"):
        scale[CLEAN_BEFORE] = HUGE
    elif fault in ("nan", "inf"):
        poison[CLEAN_BEFORE] = np.nan if fault == "nan" else np.inf
    return scale, poison


def _inject(grads, scale, poison):
    def leaf(path, g):
        g = (g.astype(jnp.float32) * scale).astype(g.dtype)
        if path_to_str(path) != FAULTY_LEAF:
            return g
        return g.at[(0,) * g.ndim].add(poison.astype(g.dtype))

    return jax.tree_util.tree_map_with_path(leaf, grads)


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


@functools.cache
def trajectory_fn(make, lr, dtype):
    """A jitted run of the whole schedule: per step the loss before it, the params after
    it, whether the state is finite and its largest entry; and the final state."""
    tx = make(lr)
    params, loss = problem(dtype)

    def step(carry, inputs):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(_inject(grads, *inputs), s, p)
        p = optax.apply_updates(p, updates)
        leaves = _float_leaves(s)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
        biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(jnp.float32))) for x in leaves]))
        return (p, s), (value, p, finite, biggest)

    @jax.jit
    def run(scale, poison):
        (p, s), (losses, history, finite, biggest) = jax.lax.scan(
            step, (params, tx.init(params)), (scale, poison)
        )
        return jnp.append(losses, loss(p)), history, finite, biggest, s

    return run


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in _float_leaves(tree))


def _nonfinite_kind(tree) -> str | None:
    leaves = [np.asarray(x, np.float64) for x in _float_leaves(tree)]
    if any(np.isnan(x).any() for x in leaves):
        return "NaN"
    if any(np.isinf(x).any() for x in leaves):
        return "Inf"
    return None


def _leaf_dict(tree) -> dict[str, np.ndarray]:
    return {
        path_to_str(p): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _max_change(old, new) -> float:
    """Largest |new - old| over all leaves (NaN/Inf if the params are not finite)."""
    a, b = _leaf_dict(old), _leaf_dict(new)
    return max((float(np.max(np.abs(b[k] - a[k]))) for k in a if a[k].size), default=0.0)


def _at(history, t):
    return jax.tree.map(lambda x: x[t], history)


def run_case(
    make, fault: str | None, clean: dict[str, Any] | None = None, dtype=None
) -> dict[str, Any]:
    """The schedule with ``fault`` (None: the clean run, in ``dtype``); what happened, as
    plain data; ``clean``: the clean run's record, the reference of the recovery."""
    dtype = dtype or (jnp.bfloat16 if fault == "bf16" else jnp.float32)
    params0, _ = problem(dtype)
    run = trajectory_fn(make, 0.0 if fault == "zero_lr" else None, dtype)
    losses, history, state_finite, state_max, state = run(*map(jnp.asarray, fault_inputs(fault)))
    losses, state_finite, state_max = map(np.asarray, (losses, state_finite, state_max))
    f = CLEAN_BEFORE  # index of the fault step
    before = _at(history, f - 1)
    after = _at(history, f)
    end = _at(history, -1)
    clean_delta = _max_change(_at(history, f - 2), before)  # a normal step's size
    last_delta = _max_change(_at(history, -2), end)
    record: dict[str, Any] = {
        "loss_initial": float(losses[0]),
        "loss_before_fault": float(losses[f]),
        "loss_end": float(np.mean(losses[-TAIL:])),
        "loss_last": float(losses[-1]),
        "end_params_finite": _finite(end),
        "end_params_nonfinite": _nonfinite_kind(end),
        "end_state_finite": bool(state_finite[-1]),
        "end_state_nonfinite": _nonfinite_kind(state),
        "end_state_max_abs": float(state_max[-1]),
        "clean_step_max_delta_before_fault": clean_delta,
        "clean_step_max_delta_at_end": last_delta,
    }
    if fault is None:
        return record
    if fault == "zero_lr":
        record["unchanged_from_init"] = all(
            np.array_equal(a, b)
            for a, b in zip(_leaf_dict(params0).values(), _leaf_dict(end).values(), strict=True)
        )
        record["max_abs_change_from_init"] = _max_change(params0, end)
        return record
    old, new = _leaf_dict(before), _leaf_dict(after)
    centres = {k: 1.0 if k.endswith("/scale") else 0.0 for k in old}
    moved = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    faulty_old = old[FAULTY_LEAF] - centres[FAULTY_LEAF]
    faulty_new = new[FAULTY_LEAF] - centres[FAULTY_LEAF]
    shrunk = bool(
        np.all(np.isfinite(faulty_new))
        and faulty_old.any()
        and np.all(np.abs(faulty_new) <= np.abs(faulty_old))
        and np.any(np.abs(faulty_new) < np.abs(faulty_old))
    )
    after_fault = losses[f + 1 :]
    record.update(
        params_finite=_finite(after),
        params_nonfinite=_nonfinite_kind(after),
        state_finite=bool(state_finite[f]),
        state_max_abs=float(state_max[f]),
        moved_leaves=moved,
        faulty_leaf_shrank=shrunk,
        others_moved=any(k != FAULTY_LEAF for k in moved),
        max_abs_delta=max((float(np.max(np.abs(new[k] - old[k]))) for k in moved), default=0.0),
        loss_max_after_fault=float(np.max(after_fault))
        if np.all(np.isfinite(after_fault))
        else float("nan"),
        guard_counters=_counters(state),
        guard_counters_by_state=_counters_by_state(state),
    )
    record.update(recovery_of(record, clean))
    return record


def recovery_of(record: dict[str, Any], clean: dict[str, Any] | None) -> dict[str, Any]:
    """How a faulted run ended against its clean run: the loss ratio and a label."""
    clean_end = clean["loss_end"] if clean else float("nan")
    ratio = record["loss_end"] / clean_end if clean_end > 0 else float("nan")
    # frozen: the last steps move less than 1% of the clean run's last steps
    clean_last = clean.get("clean_step_max_delta_at_end", 0.0) if clean else 0.0
    last = record["clean_step_max_delta_at_end"]
    moves = bool(np.isfinite(last) and last > 0.01 * clean_last)
    if not (record["end_params_finite"] and np.isfinite(record["loss_end"])):
        label = "nonfinite"
    elif not record["end_state_finite"]:
        label = "poisoned"  # a non-finite entry stays in the state: that weight drifts
    elif not moves:
        label = "frozen"
    elif ratio <= RECOVERED:
        label = "recovers"
    elif record["loss_end"] < record["loss_initial"]:
        label = "partly recovers"
    else:
        label = "ruined"
    return {"loss_end_vs_clean": ratio, "clean_steps_move": moves, "recovery": label}


def _has_counters(x) -> bool:
    return hasattr(x, "_fields") and any(name in x._fields for name in COUNTERS)


def _counters_by_state(state) -> dict[str, dict[str, int]]:
    """``{state class: {counter: value}}`` of every state holding a guard counter, at
    any depth: inside dicts (Muon's PartitionState keeps its partitions in one), inside
    another guard's state (nan_guard around Tiger); two states of one class add up."""
    found: dict[str, dict[str, int]] = {}

    def visit(tree):
        for node in jax.tree_util.tree_leaves(tree, is_leaf=_has_counters):
            if not _has_counters(node):
                continue
            mine = found.setdefault(type(node).__name__, {})
            for name in COUNTERS:
                if name in node._fields:
                    mine[name] = mine.get(name, 0) + int(getattr(node, name))
            visit([getattr(node, f) for f in node._fields if f not in COUNTERS])

    visit(state)
    return found


def _counters(state) -> dict[str, int]:
    """The guard counters found in the state (:data:`COUNTERS`), summed over its guards."""
    total: dict[str, int] = {}
    for counts in _counters_by_state(state).values():
        for name, n in counts.items():
            total[name] = total.get(name, 0) + n
    return total


def describe(fault: str, r: dict[str, Any]) -> str:
    """A few words for the table cell: the fault step, then how the run ended."""
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
            words.append("stepped")
    else:
        words.append(f"step {r['max_abs_delta']:.0e}")
    if not r["state_finite"]:
        words.append("state not finite")
    elif r["state_max_abs"] > 1e10:
        words.append(f"state ~{r['state_max_abs']:.0e}")
    if any(r["guard_counters"].values()):
        words.append("counted")
    ratio = r["loss_end_vs_clean"]
    if r["recovery"] == "nonfinite":
        words.append("later " + str(r["end_params_nonfinite"] or "Inf loss") + " params")
    elif r["recovery"] == "poisoned":
        words.append(f"state stays {r['end_state_nonfinite']} (loss x{ratio:.3g} so far)")
    else:
        words.append(f"{r['recovery']} (loss x{ratio:.3g})")
    return "; ".join(words)


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    head = "| optimizer | " + " | ".join(FAULT_TITLES[f] for f in FAULTS) + " |"
    sep = "|---" * (len(FAULTS) + 1) + "|"
    lines = [head, sep]
    for name, by_fault in results.items():
        cells = [describe(f, by_fault[f]) for f in FAULTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = (
    f"\n\nEach run: {CLEAN_BEFORE} clean steps, the fault on step {CLEAN_BEFORE + 1}, then "
    f"{CLEAN_AFTER} clean steps, full-batch on a small Flax model (embedding, Dense, "
    "LayerNorm, Dense); the same optimizer's run without the fault is the reference. The "
    f'NaN/Inf fault hits one entry of `{FAULTY_LEAF}`. The fault step: "skipped": no '
    'parameter moved; "leaf shrinks": the faulty leaf moved toward its centre (0, or 1 '
    'for norm scales); "step": the largest parameter change; "state Inf": the optimizer '
    'state holds non-finite values after it ("stays": still at the end); "state ~1e+28": '
    "the momentum holds the 1e30 "
    'gradient; "counted": a guard counter (skipped_steps, shrunk_leaves, spike_steps of '
    "Tiger, nan_guard and Muon; nonfinite_heads of qk_clip) anywhere in the state "
    f"recorded it (the JSON says which state's). Muon: `{FAULTY_LEAF}` is one of its "
    "matrices; the other leaves go to `other` (Tiger or AdamW). Muon's own guard acts "
    "on non-finite gradients only: a finite 1e30 gradient enters its momentum and steers "
    "its matrices for the rest of the run (with Tiger as `other`, Tiger's spike guard "
    "skips and counts the step for the other leaves). "
    f"The end, {CLEAN_AFTER} steps later: the final loss (mean of the last "
    f'{TAIL} steps) as a multiple of the clean run\'s; "recovers": within {RECOVERED}x; '
    '"partly recovers": above that but '
    'below the initial loss; "ruined": at or above the initial loss; "state stays Inf": '
    "params finite but an Inf stays in the optimizer state, so that weight keeps stepping "
    'one way (Tiger\'s walks to -1/λ within a few thousand steps); "frozen": finite but '
    "the last steps move the params by less than 1% of the clean run's last steps (an "
    "Inf second moment leaves only weight decay). A sign optimizer that keeps a 1e30 "
    "gradient in its momentum follows that gradient's sign for about ln(1e28)/(1-β) ≈ "
    "1800 steps at β = 0.965: the spike guard (on by default in `nan_guard` and Tiger) "
    "skips a step whose gradient norm overflows float32 or exceeds 1000x its running "
    "average.\n"
)


def main() -> None:
    if "--from-json" in sys.argv:  # relabel a previous run (the labels only, no training)
        with open(os.path.join(RESULTS_DIR, "faults.json")) as f:
            results = json.load(f)["results"]
        for by_fault in results.values():
            for fault in FAULTS:
                if fault != "zero_lr":
                    clean = by_fault["clean_bf16" if fault == "bf16" else "clean"]
                    by_fault[fault].update(recovery_of(by_fault[fault], clean))
        write(results)
        return
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, make in rows():
        clean = {"f32": run_case(make, None), "bf16": run_case(make, None, dtype=jnp.bfloat16)}
        results[name] = {
            fault: run_case(make, fault, clean["bf16" if fault == "bf16" else "f32"])
            for fault in FAULTS
        }
        results[name]["clean"] = clean["f32"]
        results[name]["clean_bf16"] = clean["bf16"]
        print(f"{name}: done", flush=True)
    write(results)


def write(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    table = markdown(results)
    print(table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "faults.md"), "w") as f:
        f.write("# Fault injection\n\nGenerated by `python benchmarks/fault_table.py`.\n\n")
        f.write(table + NOTES)
    with open(os.path.join(RESULTS_DIR, "faults.json"), "w") as f:
        json.dump(
            {
                "faulty_leaf": FAULTY_LEAF,
                "huge": HUGE,
                "clean_before": CLEAN_BEFORE,
                "clean_after": CLEAN_AFTER,
                "recovered_within": RECOVERED,
                "results": results,
            },
            f,
            indent=1,
            default=str,
        )


if __name__ == "__main__":
    main()

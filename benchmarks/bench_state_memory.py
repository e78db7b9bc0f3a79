"""Optimizer-state bytes per parameter on a GPT-2-small-shaped tree (≈124M parameters).

Counted from the state ``init`` returns, by abstract init (``jax.eval_shape`` on
``jax.ShapeDtypeStruct`` leaves): nothing is allocated, and the numbers are exact and
deterministic (array leaves only; scalar counters apart)::

    python benchmarks/bench_state_memory.py

Prints a table and writes benchmarks/results/state_memory.json.
"""

from __future__ import annotations

import jax
import optax
from benchlib import GPT2_SMALL, gpt2_like_params, machine, n_params, table, write_json

import optax_ext as ox


def candidates(k: int = 8) -> dict[str, tuple[str, optax.GradientTransformation]]:
    """name -> (what it is, transform). Ours first, then optax's peers."""
    return {
        "tiger": ("optax-ext", ox.tiger(1e-3)),
        f"tiger, accumulation_steps={k}": ("optax-ext", ox.tiger(1e-3, accumulation_steps=k)),
        "lion": ("optax-ext", ox.lion(1e-4)),
        "adafactor": ("optax-ext", ox.adafactor()),
        "adafactor, momentum=0.9": ("optax-ext", ox.adafactor(momentum=0.9)),
        "adax": ("optax-ext", ox.adax(1e-3)),
        "adaxw": ("optax-ext", ox.adaxw(1e-3)),
        "amos": ("optax-ext", ox.amos(1e-2)),
        "sgdm": ("optax-ext", ox.sgdm(1e-2, 0.9)),
        f"sgdm, accumulation_steps={k}": ("optax-ext", ox.sgdm(1e-2, 0.9, accumulation_steps=k)),
        f"accumulate_gradients(adamw, {k})": (
            "optax-ext",
            ox.accumulate_gradients(optax.adamw(1e-3), k),
        ),
        "optax.adamw": ("optax", optax.adamw(1e-3)),
        "optax.lion": ("optax", optax.lion(1e-4)),
        "optax.adafactor": ("optax", optax.adafactor(1e-3)),
        f"optax.MultiSteps(adamw, {k})": ("optax", optax.MultiSteps(optax.adamw(1e-3), k)),
        f"optax.MultiSteps(lion, {k})": ("optax", optax.MultiSteps(optax.lion(1e-4), k)),
        f"optax.MultiSteps(sgd momentum, {k})": (
            "optax",
            optax.MultiSteps(optax.sgd(1e-2, 0.9), k),
        ),
    }


def measure(params) -> list[dict]:
    count = n_params(params)
    rows = []
    for name, (library, tx) in candidates().items():
        state = jax.eval_shape(tx.init, params)
        nbytes = ox.tree_bytes(state)
        rows.append(
            {
                "optimizer": name,
                "library": library,
                "state_bytes": nbytes,
                "bytes_per_param": nbytes / count,
            }
        )
    return rows


def main() -> dict:
    params = gpt2_like_params(**GPT2_SMALL, abstract=True)
    rows = measure(params)
    results = {
        "machine": machine(),
        "tree": dict(GPT2_SMALL, params=n_params(params)),
        "rows": rows,
    }
    print(f"float32 GPT-2 small, {n_params(params) / 1e6:.1f}M parameters")
    print(
        table(
            rows,
            [
                ("optimizer", "optimizer", str),
                ("library", "library", str),
                ("bytes_per_param", "bytes/param", lambda x: f"{x:.3f}"),
                ("state_bytes", "state MB", lambda x: f"{x / 1e6:,.1f}"),
            ],
        )
    )
    print("wrote", write_json("state_memory", results))
    return results


if __name__ == "__main__":
    main()

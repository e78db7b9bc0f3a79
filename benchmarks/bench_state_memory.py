"""Optimizer-state bytes per parameter on a GPT-2-small-shaped tree (≈124M parameters).

Counted from the state ``init`` returns, by abstract init (``jax.eval_shape`` on
``jax.ShapeDtypeStruct`` leaves): nothing is allocated, and the numbers are exact and
deterministic (array leaves only; scalar counters apart)::

    python benchmarks/bench_state_memory.py

Also the bytes per parameter of params and state together with bf16 params (written with
stochastic rounding by ``ox.pure_bf16``) and 8- or 4-bit moments.

Prints tables and writes benchmarks/results/state_memory.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
        # the same optimizers with their moments in 8 and 4 bits
        "tiger, 8-bit": ("optax-ext", ox.quantize_state(ox.tiger(1e-3))),
        "tiger, 4-bit": ("optax-ext", ox.quantize_state(ox.tiger(1e-3), bits=4)),
        "lion, 4-bit": ("optax-ext", ox.quantize_state(ox.lion(1e-4), bits=4)),
        "sgdm, 4-bit": ("optax-ext", ox.quantize_state(ox.sgdm(1e-2, 0.9), bits=4)),
        "muon, 4-bit": ("optax-ext", ox.quantize_state(ox.muon(1e-2), bits=4)),
        "adaxw, 4-bit": ("optax-ext", ox.quantize_state(ox.adaxw(1e-3), bits=4)),
        "amos(momentum=0.9), 4-bit": (
            "optax-ext",
            ox.quantize_state(ox.amos(1e-2, momentum=0.9), bits=4),
        ),
        "optax.adamw, 8-bit": ("optax-ext", ox.quantize_state(optax.adamw(1e-3))),
        "optax.adamw, 4-bit": ("optax-ext", ox.quantize_state(optax.adamw(1e-3), bits=4)),
    }


def bf16_candidates() -> dict[str, optax.GradientTransformation]:
    """Whole-model setups with bf16 params (every update added with stochastic rounding)."""
    return {
        "pure_bf16(tiger)": ox.pure_bf16(ox.tiger(1e-3)),
        "quantize_state(pure_bf16(tiger), bits=8)": ox.quantize_state(ox.pure_bf16(ox.tiger(1e-3))),
        "quantize_state(pure_bf16(tiger), bits=4)": ox.quantize_state(
            ox.pure_bf16(ox.tiger(1e-3)), bits=4
        ),
        "quantize_state(pure_bf16(adamw), bits=4)": ox.quantize_state(
            ox.pure_bf16(optax.adamw(1e-3)), bits=4
        ),
    }


def measure_bf16(params) -> list[dict]:
    """Params (bf16) plus state, bytes per parameter: what training holds besides
    activations and gradients."""
    half = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    count = n_params(half)
    rows = []
    for name, tx in bf16_candidates().items():
        state = ox.tree_bytes(jax.eval_shape(tx.init, half))
        total = ox.tree_bytes(half) + state
        rows.append(
            {
                "setup": name,
                "state_bytes_per_param": state / count,
                "total_bytes_per_param": total / count,
            }
        )
    return rows


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
    bf16_rows = measure_bf16(params)
    results = {
        "machine": machine(),
        "tree": dict(GPT2_SMALL, params=n_params(params)),
        "rows": rows,
        "bf16_params": bf16_rows,
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
    print("\nbf16 params (stochastic rounding) and state, bytes per parameter")
    print(
        table(
            bf16_rows,
            [
                ("setup", "setup", str),
                ("state_bytes_per_param", "state", lambda x: f"{x:.3f}"),
                ("total_bytes_per_param", "params + state", lambda x: f"{x:.3f}"),
            ],
        )
    )
    print("wrote", write_json("state_memory", results))
    return results


if __name__ == "__main__":
    main()

"""Trains and resumes runs with Orbax checkpoints, one fresh process per phase (launched
by test_checkpoint.py), and the checkpoint helpers the test exercises.

Imported, it gives the test the model, the data, the optimizers and the step. Run as a
script, in one of two modes, for each named optimizer:

- ``train``: trains ``TOTAL_STEPS`` steps without interruption, saving the TrainState to
  ``<root>/<name>`` after ``SAVE_AT`` steps (and going on);
- ``resume``: restores ``<root>/<name>`` into an abstract target (``jax.eval_shape`` of
  the same constructor) and trains the remaining steps;

then saves every leaf of the final states with ``np.savez``. With ``--cache`` both
processes share XLA's persistent compilation cache: the second loads the programs the
first compiled instead of compiling them again.

Usage (from the repository root)::

    python tests/checkpoint_worker.py train ROOT OUT.npz tiger_acc3 lion ... --cache DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from optax_ext.checkpoint import restore_train_state, save_train_state
from optax_ext.hyperparams import inject_hyperparams
from optax_ext.noise_measurement import measure_noise_scale
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adax, adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.sgdm import sgdm
from optax_ext.optimizers.tiger import tiger
from optax_ext.training import TrainState, make_train_step
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lazy import lazy
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.param_ema import param_ema
from optax_ext.wrappers.param_rules import scale_by_path
from optax_ext.wrappers.quantize import quantize_state

FEATURES = 4
HIDDEN = 8
VOCAB = 16
USED_TOKENS = 10  # rows VOCAB - USED_TOKENS.. of the embedding never get a gradient (lazy)
BATCH = 8
TOTAL_STEPS = 13
# Not a multiple of any cycle below (accumulation 2, 3, 4; lookahead 5): every
# checkpoint is written in the middle of a cycle.
SAVE_AT = 7
NAN_STEP = 3  # a NaN label on this step, for the optimizers that guard against it
SEED = 0


# ------------------------------------------------------------------ optimizers

# Every optimizer-state type of optax-ext appears at least once, wrapped the ways
# users wrap them (accumulation, lookahead, NaN guard, EMA, inject_hyperparams).
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "tiger_acc3": lambda: tiger(3e-3, weight_decay=0.01, accumulation_steps=3),
    "lion": lambda: lion(1e-3, weight_decay=0.01),
    # min_dim_size_to_factor=4: the (4, 8) kernel and the (16, 8) embedding are factored.
    "adafactor_momentum": lambda: adafactor(1e-2, momentum=0.9, min_dim_size_to_factor=4),
    "adaxw": lambda: adaxw(1e-2, weight_decay=1e-3),
    "amos_momentum": lambda: amos(1e-2, momentum=0.9),
    "sgdm_nesterov_acc3": lambda: sgdm(0.05, accumulation_steps=3, nesterov=True),
    "accumulate_adamw4": lambda: accumulate_gradients(optax.adamw(1e-2), 4),
    "lookahead_tiger5": lambda: lookahead(tiger(3e-3), sync_period=5),
    "nan_guard_tiger": lambda: nan_guard(tiger(3e-3, guard_nan=False)),
    "noise_adax_acc2": lambda: accumulate_gradients(
        optax.chain(measure_noise_scale(batch_size=BATCH), adax(1e-2)), 2
    ),
    "lazy_lamb_ema": lambda: optax.chain(
        lazy(
            optax.chain(
                layer_adapted(optax.scale_by_adam(), 1e-2, weight_decay=0.01),
                scale_by_path({"bias$": 0.5}),
            )
        ),
        param_ema(0.9),
    ),
    # ox.inject_hyperparams: it reads injected schedules by update while accumulating
    # (optax's reads them per micro-step, and Tiger refuses that combination)
    "inject_tiger_acc2": lambda: inject_hyperparams(tiger, static_args=("accumulation_steps",))(
        learning_rate=3e-3, weight_decay=0.01, accumulation_steps=2
    ),
    # 8-bit moments: the (16, 8) embedding's (4 blocks of 32), the other leaves in float32
    "quantize_adam": lambda: quantize_state(optax.adam(1e-2), block=32, min_size=64),
}
# Runs whose data has a NaN label at NAN_STEP (the guard's counters are in the checkpoint).
WITH_NAN = ("nan_guard_tiger",)


class Model(nn.Module):
    """Dense features plus a token embedding → tanh → LayerNorm → Dense: kernels, biases,
    a norm scale and an embedding, so path rules, factoring and lazy rows all act."""

    @nn.compact
    def __call__(self, x, tokens):
        h = nn.Dense(HIDDEN)(x) + nn.Embed(VOCAB, HIDDEN)(tokens)
        h = nn.LayerNorm()(nn.tanh(h))
        return nn.Dense(1)(h)[:, 0]


def batches(name: str) -> list[dict[str, np.ndarray]]:
    """The deterministic data stream of run ``name`` (seeded NumPy), one batch per step."""
    rng = np.random.default_rng(SEED)
    w = rng.standard_normal(FEATURES)
    out = []
    for i in range(TOTAL_STEPS):
        x = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
        tokens = rng.integers(0, USED_TOKENS, BATCH).astype(np.int32)
        y = (np.sin(x @ w) + 0.1 * tokens + 0.1 * rng.standard_normal(BATCH)).astype(np.float32)
        if name in WITH_NAN and i == NAN_STEP:
            y[0] = np.nan
        out.append({"x": x, "tokens": tokens, "y": y})
    return out


def create_state(tx: optax.GradientTransformation) -> TrainState:
    """The freshly initialised TrainState of the model with optimizer ``tx``."""
    model = Model()
    params = model.init(
        jax.random.key(SEED), jnp.zeros((1, FEATURES), jnp.float32), jnp.zeros((1,), jnp.int32)
    )
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def abstract_state(tx: optax.GradientTransformation) -> TrainState:
    """Restore target: shapes and dtypes of :func:`create_state`, on this process's first
    device (no arrays are allocated)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(lambda: create_state(tx)),
    )


def loss_fn(params, apply_fn, batch):
    """Mean squared error."""
    return jnp.mean(jnp.square(apply_fn(params, batch["x"], batch["tokens"]) - batch["y"]))


def make_step():
    """The jitted train step (one compilation per optimizer: ``tx`` is static)."""
    return make_train_step(loss_fn, mode="jit")


def state_leaves(state: TrainState) -> dict[str, np.ndarray]:
    """``{path: array}`` for every leaf of the state: step, params and optimizer state."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


# ------------------------------------------------------------------------ main


def train(checkpointer: ocp.AbstractCheckpointer, root: str, name: str) -> TrainState:
    """Trains run ``name`` from scratch to ``TOTAL_STEPS``, checkpointing it to
    ``<root>/<name>`` after ``SAVE_AT`` steps."""
    # Committed to the device a restored state lands on (:func:`abstract_state`): the
    # two processes then lower the step to the same program and share its compilation.
    state = jax.device_put(create_state(OPTIMIZERS[name]()), jax.devices()[0])
    step = make_step()
    for i, batch in enumerate(batches(name)):
        if i == SAVE_AT:
            save_train_state(checkpointer, os.path.join(root, name), state)
            # Orbax has copied the arrays to the host when save returns (so the step may
            # donate them); waiting makes the checkpoint complete before the run goes on.
            checkpointer.wait_until_finished()
        state, _ = step(state, batch)
    return state


def resume(checkpointer: ocp.AbstractCheckpointer, root: str, name: str) -> TrainState:
    """Restores run ``name`` from ``<root>/<name>`` and trains it to ``TOTAL_STEPS``."""
    state = restore_train_state(
        checkpointer, os.path.join(root, name), abstract_state(OPTIMIZERS[name]())
    )
    if int(state.step) != SAVE_AT:
        raise RuntimeError(f"{name}: restored step {int(state.step)}, expected {SAVE_AT}")
    step = make_step()
    for batch in batches(name)[SAVE_AT:]:
        state, _ = step(state, batch)
    return state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "resume"])
    parser.add_argument("root", help="directory holding one checkpoint per run name")
    parser.add_argument("out", help=".npz file for the final states' leaves")
    parser.add_argument("names", nargs="+", choices=sorted(OPTIMIZERS))
    parser.add_argument("--cache", help="XLA persistent compilation cache directory")
    args = parser.parse_args(argv)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    run = train if args.mode == "train" else resume
    checkpointer = ocp.StandardCheckpointer()
    arrays = {}
    for name in args.names:
        leaves = state_leaves(run(checkpointer, os.path.abspath(args.root), name))
        arrays.update({f"{name}|{path}": x for path, x in leaves.items()})
    np.savez(args.out, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One process of a data-parallel run across JAX processes (launched by test_multiprocess.py).

Run as a script, it joins a ``jax.distributed`` job on localhost (CPU devices, gloo
collectives), trains a small Flax MLP with ``jax.pmap`` over every device of every process
(each process feeds its own rows of the global batch) and saves the final parameters and
noise-scale readings with ``np.savez``. Imported, it gives the test the same model, data
and step for the single-process reference run.

Usage (from the repository root, one command per process)::

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=1 \
    python tests/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12345 \
        --out result0.npz
"""

from __future__ import annotations

import argparse
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext.noise_measurement import NoiseScaleState, measure_noise_scale, noise_scale
from optax_ext.optimizers.tiger import tiger
from optax_ext.training import TrainState, make_train_step, replicate

AXIS = "batch"
GLOBAL_BATCH = 16  # examples per micro-step, over all devices
MICRO_STEPS = 6
ACCUMULATION_STEPS = 2
FEATURES = 5
HIDDEN = 8
SEED = 0


class MLP(nn.Module):
    """Dense → tanh → LayerNorm → Dense: kernels, biases and a norm scale for Tiger's rules."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(HIDDEN)(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(1)(x)


def global_batches() -> list[dict[str, np.ndarray]]:
    """Deterministic micro-batches of a noisy linear-plus-sine regression problem."""
    rng = np.random.default_rng(SEED)
    w = rng.standard_normal((FEATURES, 1))
    out = []
    for _ in range(MICRO_STEPS):
        x = rng.standard_normal((GLOBAL_BATCH, FEATURES))
        y = x @ w + np.sin(3 * x[:, :1]) + 0.3 * rng.standard_normal((GLOBAL_BATCH, 1))
        out.append({"x": x.astype(np.float32), "y": y.astype(np.float32)})
    return out


def device_rows(batch: dict[str, np.ndarray], positions: list[int], n_devices: int):
    """The rows of ``batch`` that the devices at ``positions`` of the pmap axis get,
    shaped ``(len(positions), per_device, ...)``."""
    return {k: v.reshape(n_devices, -1, *v.shape[1:])[positions] for k, v in batch.items()}


def create_state(n_devices: int, replicas: int | None = None) -> TrainState:
    """A TrainState of the MLP with ``measure_noise_scale`` first, then Tiger accumulating.

    ``n_devices`` is the size of the pmap axis; with ``replicas`` the state comes
    replicated that many times on a leading axis (for ``jax.pmap``).
    """
    model = MLP()
    tx = optax.chain(
        measure_noise_scale(GLOBAL_BATCH // n_devices, axis_name=AXIS, ema=0.8),
        tiger(3e-2, beta=0.9, weight_decay=0.1, accumulation_steps=ACCUMULATION_STEPS),
    )

    def create():
        params = model.init(jax.random.key(SEED), jnp.zeros((1, FEATURES), jnp.float32))
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        return state if replicas is None else replicate(state, replicas)

    # One compilation instead of one per eager operation: starting up stays cheap.
    return jax.jit(create)()


def loss_fn(params, apply_fn, batch):
    """Mean squared error over the (local) batch."""
    return jnp.mean(jnp.square(apply_fn(params, batch["x"]) - batch["y"]))


def train(positions: list[int], n_devices: int) -> tuple[TrainState, np.ndarray]:
    """Runs every micro-step with ``make_train_step(mode="pmap")``; the noise transform
    averages the gradients itself (``average_grads=False``).

    ``positions`` are this process's devices' places on the pmap axis of ``n_devices``.
    Returns the final (replicated) state and the losses.
    """
    step = make_train_step(loss_fn, mode="pmap", axis_name=AXIS, average_grads=False)
    state = create_state(n_devices, replicas=len(positions))
    losses = []
    for batch in global_batches():
        state, metrics = step(state, device_rows(batch, positions, n_devices))
        losses.append(local_replica(metrics["loss"]))
    return state, np.array(losses)


def local_replica(tree):
    """This process's first replica of a pmap output, as NumPy (the output is a global
    array of which only this process's shards are addressable)."""
    return jax.tree.map(
        lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), tree
    )


def flat_params(params) -> dict[str, np.ndarray]:
    """``{"param:<path>": array}`` for every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {f"param:{jax.tree_util.keystr(path)}": np.asarray(x) for path, x in leaves}


def results(state: TrainState, losses: np.ndarray) -> dict[str, np.ndarray]:
    """Flat arrays to save: ``param:<path>`` leaves, the noise estimates, the losses."""
    local = local_replica(state)
    est = noise_scale(local.opt_state)
    is_noise = lambda s: isinstance(s, NoiseScaleState)  # noqa: E731
    (raw,) = [s for s in jax.tree.leaves(local.opt_state, is_leaf=is_noise) if is_noise(s)]
    return {
        **flat_params(local.params),
        "b_simple": np.asarray(est.b_simple),
        "g2": np.asarray(est.g2),
        "trace_sigma": np.asarray(est.trace_sigma),
        "last_g2": raw.last_g2,
        "last_trace_sigma": raw.last_trace_sigma,
        "noise_count": raw.count,
        "losses": losses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--timeout",
        type=int,
        default=60,
        help="seconds to wait for the other processes to join, to notice a "
        "dead one, and to shut down: a lone worker does not linger",
    )
    args = parser.parse_args(argv)

    # Before the CPU backend starts: it picks its cross-process collectives then.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=args.timeout,
        heartbeat_timeout_seconds=args.timeout,
        shutdown_timeout_seconds=args.timeout,
    )
    try:
        devices = jax.devices()
        positions = [devices.index(d) for d in jax.local_devices()]
        state, losses = train(positions, len(devices))
        np.savez(
            args.out,
            process_index=jax.process_index(),
            device_count=len(devices),
            **results(state, losses),
        )
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One process of a Muon step with owner_axes across JAX processes (test_owner_compute.py).

Run as a script, it joins a ``jax.distributed`` job on localhost (CPU devices, gloo
collectives), takes two ``scale_by_muon(owner_axes="data")`` updates of a small tree
sharded by rows over every device of every process, and saves the updates and the
momentum, gathered, with ``np.savez``. Imported, :func:`run` is the same on this
process's devices (the single-process reference)::

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python tests/owner_compute_worker.py 0 12345 result0.npz    # and 1 12345 result1.npz
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from optax_ext.optimizers.muon import scale_by_muon

#: A group of 10 (uneven over 8 owners, tall ones transposed in) and one of 3.
SHAPES = {"a": (6, 8, 16), "b": (4, 16, 8), "c": (3, 16, 24)}


def run() -> dict[str, np.ndarray]:
    """Two owner-computed Muon updates over every device, as host arrays."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
    rng = np.random.default_rng(0)
    grads = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(2)
    ]
    # nn.scan-style names: each leaf is a stack of matrices
    layout = [(r"^", "stacked")]
    tx = scale_by_muon(owner_axes="data", layout=layout)
    place = lambda tree: {  # noqa: E731
        k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
        for k, v in tree.items()
    }
    with jax.set_mesh(mesh):
        state = tx.init(place(grads[0]))
        state = state._replace(mu=place({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}))
        step = jax.jit(lambda g, s: tx.update(g, s, g))
        for g in grads:
            u, state = step(place(g), state)
        gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
        return {f"u:{k}": gather(v) for k, v in u.items()} | {
            f"mu:{k}": gather(v) for k, v in state.mu.items()
        }


def main(argv: list[str]) -> int:
    process_id, port, out = int(argv[0]), int(argv[1]), argv[2]
    # Before the CPU backend starts: it picks its cross-process collectives then.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=60,
        shutdown_timeout_seconds=60,
    )
    try:
        assert jax.device_count() == 8 and jax.local_device_count() == 4
        np.savez(out, **run())
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Flax glue: a TrainState that forwards extra arguments, and data-parallel train steps.

Three ways to run the same step on several devices, all giving the single-device result:

- ``"jit"``: one device (or whatever ``jax.jit`` does with the inputs' shardings).
- ``"pmap"``: ``jax.pmap`` over the local devices; state replicated, batch split on its
  leading axis; gradients averaged with ``lax.pmean`` over ``axis_name`` (unless
  ``average_grads=False``). When the optimizer measures the noise scale
  (``measure_noise_scale``), the step also passes it the per-device statistic it needs,
  so ``measure_noise_scale(batch_size=per_device_batch)`` with or without
  ``axis_name`` measures correctly under the defaults.
- ``"sharded"``: ``jax.jit`` over a ``NamedSharding`` mesh: the batch is split over the
  ``"data"`` axis (:func:`shard_batch`), params and optimizer state are replicated or
  sharded by path rules (:func:`shard_params`); XLA inserts the gradient all-reduce.

Example::

    state = TrainState.create(apply_fn=model.apply, params=params, tx=ox.tiger(1e-3))
    step = make_train_step(loss_fn, mode="pmap")
    state, metrics = step(replicate(state), split_batch(batch))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_ext._common import check_choice, check_int, first_match, tree_paths, work_dtype
from optax_ext._reductions import axis_sum
from optax_ext.noise_measurement import has_noise_scale_state
from scaling.protocol import ACCUMULATION_STEPS, GRADS_AVERAGED_OVER, MICRO_GRAD_SQ_NORM

__all__ = [
    "MODES",
    "TrainState",
    "data_parallel_mesh",
    "make_train_step",
    "replicate",
    "shard_batch",
    "shard_params",
    "split_batch",
    "split_value_and_grad",
    "unreplicate",
]

MODES = ("jit", "pmap", "sharded")


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards
    ``extra_args`` to ``tx.update`` (Linen's drops them).

    Extra arguments reach every ``GradientTransformationExtraArgs`` in the chain, e.g.
    a loss value for a line search or micro-batch statistics for a noise measurement.
    """

    def apply_gradients(self, *, grads, extra_args: Mapping[str, Any] | None = None, **kwargs):
        """Like Linen's, plus ``extra_args`` passed as keywords to ``tx.update``."""
        owg = train_state.OVERWRITE_WITH_GRADIENT in grads
        grads_opt = grads["params"] if owg else grads
        params_opt = self.params["params"] if owg else self.params
        tx = self.tx
        if extra_args and not isinstance(tx, optax.GradientTransformationExtraArgs):
            tx = optax.with_extra_args_support(tx)  # a plain transform ignores them
        updates, opt_state = tx.update(
            grads_opt, self.opt_state, params_opt, **dict(extra_args or {})
        )
        params = optax.apply_updates(params_opt, updates)
        if owg:
            owg_key = train_state.OVERWRITE_WITH_GRADIENT
            params = {"params": params, owg_key: grads[owg_key]}
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)


def make_train_step(
    loss_fn: Callable[..., Any],
    *,
    mode: str = "jit",
    axis_name: str = "batch",
    average_grads: bool = True,
    donate: bool = False,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``step(state, batch) -> (state, {"loss": ...})`` for one of :data:`MODES`.

    Args:
      loss_fn: ``loss_fn(params, apply_fn, batch) -> scalar`` (mean over the batch).
      mode: ``"jit"``, ``"pmap"`` or ``"sharded"`` (see the module docstring).
      axis_name: the pmap axis name (``"pmap"`` mode).
      average_grads: under ``"pmap"``, average gradients with ``lax.pmean``; False
        leaves them per device for an optimizer that averages them itself.
      donate: donate the state's buffers to the step, so XLA updates params and
        optimizer state in place (half the memory). The state passed in is then
        consumed: its arrays are deleted, so keep no other reference to them (off by
        default, so that two optimizers can start from the same ``params``).

    Returns:
      The compiled step. Under ``"pmap"`` the state must be replicated
      (:func:`replicate`) and the batch split (:func:`split_batch`); the loss is
      averaged over devices.
    """
    check_choice("mode", mode, MODES)
    _check_loss_signature(loss_fn)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, batch)
        extra = {}
        if mode == "pmap":
            loss = jax.lax.pmean(loss, axis_name)
            if average_grads:
                if has_noise_scale_state(state.opt_state):  # a structural, trace-time test
                    extra = _averaged_grads_extra_args(grads, axis_name)
                grads = jax.lax.pmean(grads, axis_name)
        return state.apply_gradients(grads=grads, extra_args=extra), {"loss": loss}

    donate_argnums = (0,) if donate else ()
    if mode == "pmap":
        return jax.pmap(step, axis_name=axis_name, donate_argnums=donate_argnums)
    return jax.jit(step, donate_argnums=donate_argnums)


def _averaged_grads_extra_args(grads: Any, axis_name: str) -> dict[str, Any]:
    """What a noise measurement needs from gradients this step averages itself: the mean
    over the axis of the per-device squared norms, the axis size, and the axis."""
    local = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    return {
        MICRO_GRAD_SQ_NORM: jax.lax.pmean(local, axis_name),
        ACCUMULATION_STEPS: jax.lax.axis_size(axis_name),
        GRADS_AVERAGED_OVER: axis_name,
    }


def _check_loss_signature(loss_fn: Callable[..., Any]) -> None:
    """Fails at construction when ``loss_fn`` cannot take ``(params, apply_fn, batch)``."""
    try:
        inspect.signature(loss_fn).bind(None, None, None)
    except TypeError:
        raise TypeError(
            "make_train_step calls loss_fn(params, apply_fn, batch); got a loss_fn with "
            f"signature {inspect.signature(loss_fn)}. For a loss_fn(params, batch) write "
            "make_train_step(lambda params, apply_fn, batch: loss_fn(params, batch))"
        ) from None
    except ValueError:  # no signature to read (a builtin or C function): trust the caller
        pass


# ------------------------------------------------------------------------ pmap


def replicate(tree: Any, n: int | None = None, *, axis_name: str = "batch") -> Any:
    """Adds a leading device axis of size ``n`` (default: local devices), for ``pmap``.

    The copies are placed one per device on the layout ``pmap`` gives its outputs (a mesh
    of the first ``n`` local devices along ``axis_name``, the step's axis name), so the
    step's second call reuses the program its first call compiled. Across processes, or
    inside ``jit``, the copies are left where ``pmap`` puts them.
    """
    n = n or jax.local_device_count()
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))
    if jax.process_count() > 1 or traced:
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)
    devices = jax.local_devices()[:n]
    sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)), PartitionSpec(axis_name))

    def copies(x):
        # one copy sent to each device: never n copies on one device first
        one = jnp.expand_dims(jnp.asarray(x), 0)
        shards = [jax.device_put(one, d) for d in devices]
        return jax.make_array_from_single_device_arrays((n, *one.shape[1:]), sharding, shards)

    return jax.tree.map(copies, tree)


def unreplicate(tree: Any) -> Any:
    """The first replica of a ``pmap``-replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: Any, n: int | None = None) -> Any:
    """Reshapes a batch's leading axis ``B`` into ``(n, B // n)`` for ``pmap``."""
    n = n or jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible into {n} equal parts")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])

    return jax.tree.map(split, batch)


# -------------------------------------------------------------- NamedSharding


def data_parallel_mesh(
    devices: list[Any] | None = None, axis: str = "data", *, model: int = 1
) -> Mesh:
    """A mesh over all devices: 1-D ``(axis,)``, or 2-D ``(axis, "model")`` with ``model > 1``.

    With ``model=m`` the devices form an ``(n // m, m)`` grid: the batch is split over
    ``axis`` and params can be sharded over ``"model"`` by :func:`shard_params` rules
    (tensor parallel), e.g. ``data_parallel_mesh(model=2)`` on 8 devices is 4 × 2.
    """
    devices = np.array(devices or jax.devices())
    model = check_int("model", model)
    if model == 1:
        return Mesh(devices, (axis,))
    if devices.size % model:
        raise ValueError(
            f"model={model} must divide the number of devices ({devices.size}); "
            f"valid values: {[m for m in range(1, devices.size + 1) if devices.size % m == 0]}"
        )
    return Mesh(devices.reshape(devices.size // model, model), (axis, "model"))


def shard_batch(mesh: Mesh, batch: Any, axis: str = "data") -> Any:
    """Places a batch split over the mesh's data axis (leading dimension)."""

    def put(x):
        spec = PartitionSpec(axis, *([None] * (np.ndim(x) - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, batch)


def shard_params(mesh: Mesh, tree: Any, rules: Mapping[str, PartitionSpec] | None = None) -> Any:
    """Places a params (or train-state) tree on the mesh by path rules.

    ``rules`` maps regexes on leaf paths to ``PartitionSpec``s (first match wins); leaves
    that match none are replicated. For example, to shard every kernel's output
    dimension over a ``"model"`` axis of a 2-D mesh::

        shard_params(mesh, state, {r"kernel$": PartitionSpec(None, "model")})

    Optimizer states of optax-ext keep their params' shardings (they are built with
    ``zeros_like``), so placing the whole ``TrainState`` is enough.
    """
    specs = jax.tree.map(
        lambda path, x: (
            first_match(path, rules, PartitionSpec()) if np.ndim(x) else PartitionSpec()
        ),
        tree_paths(tree),
        tree,
    )
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


# -------------------------------------------------------- noise on one device


def _mean_over_parts(g: jax.Array) -> jax.Array:
    """The mean over the leading (parts) axis, accumulated in at least float32, as
    ``jnp.mean(g, axis=0)``; summed by ``_reductions.axis_sum``, whose XLA:CPU form lives
    in ``optax_ext._xla_cpu``."""
    total = axis_sum(g.astype(work_dtype(g)), 0)[0]
    return (total / g.shape[0]).astype(g.dtype)


def split_value_and_grad(loss_fn: Callable[..., Any], splits: int = 2) -> Callable[..., Any]:
    """``value_and_grad`` over a batch cut into ``splits`` equal parts, plus noise statistics.

    The gradient is the mean of the parts' gradients (the full-batch gradient for a mean
    loss), computed with one ``vmap`` so the cost is that of the whole batch. The mean of
    the parts' squared norms is what ``ox.measure_noise_scale`` needs to compare a
    small batch (one part) with the big one (the batch) on a single device::

        grad_fn = split_value_and_grad(loss_fn, splits=2)
        loss, grads, extra = grad_fn(state.params, state.apply_fn, batch)
        state = state.apply_gradients(grads=grads, extra_args=extra)

    with ``tx = optax.chain(ox.measure_noise_scale(batch_size=B // 2), ...)``.

    Args:
      loss_fn: ``loss_fn(params, apply_fn, batch) -> scalar`` mean over the batch.
      splits: number of equal parts (≥ 2); the batch's leading axis must divide.

    Returns:
      ``f(params, apply_fn, batch) -> (loss, grads, extra_args)`` with ``extra_args`` =
      ``{"micro_grad_sq_norm": ..., "accumulation_steps": splits}``.
    """
    check_int("splits", splits, minimum=2)

    def part_value_and_grad(params, apply_fn, part):
        return jax.value_and_grad(loss_fn)(params, apply_fn, part)

    def f(params, apply_fn, batch):
        parts = split_batch(batch, splits)
        losses, grads = jax.vmap(part_value_and_grad, in_axes=(None, None, 0))(
            params, apply_fn, parts
        )
        sq_norms = sum(
            jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
            for g in jax.tree.leaves(grads)
        )
        mean_grads = jax.tree.map(_mean_over_parts, grads)
        extra = {MICRO_GRAD_SQ_NORM: jnp.mean(sq_norms), ACCUMULATION_STEPS: splits}
        return jnp.mean(losses), mean_grads, extra

    return f

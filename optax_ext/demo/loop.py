"""The demo's training loop: a jitted step, micro-batches, the noise log, a progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_ext.demo.data import CharData, load_corpus
from optax_ext.demo.model import CharTransformer, lm_loss
from optax_ext.demo.recipes import make_optimizer
from optax_ext.noise_measurement import noise_log_record, noise_scale
from optax_ext.training import TrainState, split_value_and_grad
from scaling import current_b_simple, default_window

__all__ = ["History", "train"]


@dataclass
class History:
    """What a run measured: per-update losses and wall time."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    valid_loss_start: float = math.nan
    valid_loss_end: float = math.nan
    seconds: float = 0.0
    examples: int = 0
    uniform_loss: float = math.nan
    b_simple: list[float] = field(default_factory=list)  # EMA estimate after each update
    g2: list[float] = field(default_factory=list)  # each update's raw |G|^2 estimate (logged)
    trace_sigma: list[float] = field(default_factory=list)  # ... and tr(Sigma) estimate
    noise: Any = None  # the final NoiseScale of the EMAs (secondary)
    current: Any = None  # scaling.SettledNoiseScale: the current value, as the log gives it
    state: Any = None  # the final TrainState


def train(
    *,
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 64,
    optimizer: str = "muon",
    learning_rate: float | None = None,
    accumulation_steps: int = 1,
    seed: int = 0,
    measure_noise: bool = True,
    width: int = 64,
    layers: int = 2,
    param_dtype: Any = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], Any] | None = None,
) -> History:
    """Trains the demo model and returns its :class:`History`.

    ``steps`` counts parameter updates; each consumes ``accumulation_steps`` micro-batches
    of ``batch_size`` windows. With ``measure_noise`` every micro-batch's gradient is
    computed as the mean of its two halves (:func:`~optax_ext.training.split_value_and_grad`,
    same cost) so ``measure_noise_scale`` compares half a micro-batch with a whole one;
    ``width`` and ``layers`` size the model; ``param_dtype`` casts the parameters (and so
    the optimizer state) after init, e.g. ``jnp.bfloat16`` for pure bf16 training;
    ``on_step`` then receives ``{"step", "loss", "g2", "trace_sigma", "b_simple_ema"}``
    after each update (else ``{"step", "loss"}``).

    ``History.current`` is ``scaling.current_b_simple`` of the logged estimates over
    ``scaling.default_window(steps)`` updates: what ``python -m scaling noise`` prints
    for the log of ``on_step``'s records, and what ``ox.current_noise_scale`` gives for
    the final state (one estimate per update; with ``accumulation_steps > 1`` the state
    holds one per micro-batch).
    """
    if measure_noise and batch_size % 2:
        raise ValueError(f"batch_size must be even to measure the noise scale, got {batch_size}")
    data = CharData.from_text(load_corpus())
    model = CharTransformer(vocab=len(data.vocab), width=width, layers=layers, max_len=seq_len)
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
    if param_dtype is not None:  # e.g. bf16 everywhere: no float32 master copy
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    tx = make_optimizer(
        optimizer,
        learning_rate,
        accumulation_steps,
        steps=steps,
        measure_batch=batch_size // 2 if measure_noise else None,
    )
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    grad_fn = split_value_and_grad(lm_loss, 2) if measure_noise else None

    @jax.jit
    def step(state, batch):
        if grad_fn is None:
            loss, grads = jax.value_and_grad(lm_loss)(state.params, state.apply_fn, batch)
            return state.apply_gradients(grads=grads), loss
        loss, grads, extra = grad_fn(state.params, state.apply_fn, batch)
        return state.apply_gradients(grads=grads, extra_args=extra), loss

    evaluate = jax.jit(lambda p, b: lm_loss(p, model.apply, b))
    valid = jnp.asarray(data.valid_batch(64, seq_len))
    history = History(
        valid_loss_start=float(evaluate(state.params, valid)),
        uniform_loss=math.log(len(data.vocab)),
    )
    batches = data.batches(batch_size, seq_len, seed)
    bar = _progress(steps, progress)
    start = time.perf_counter()
    for update in range(steps):
        micro_losses = []
        for _ in range(accumulation_steps):
            state, loss = step(state, jnp.asarray(next(batches)))
            micro_losses.append(loss)
        record = {"step": update + 1, "loss": float(np.mean(jax.device_get(micro_losses)))}
        if measure_noise:
            record |= noise_log_record(update + 1, state.opt_state)
            history.b_simple.append(record["b_simple_ema"])
            history.g2.append(record["g2"])
            history.trace_sigma.append(record["trace_sigma"])
        history.steps.append(update + 1)
        history.losses.append(record["loss"])
        history.examples += batch_size * accumulation_steps
        if on_step is not None:
            on_step(record)
        if bar is not None:
            rate = history.examples * seq_len / (time.perf_counter() - start)
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{rate:,.0f}"}
            if measure_noise:
                postfix["B_simple_ema"] = f"{record['b_simple_ema']:.0f}"
            bar.set_postfix(postfix)
            bar.update(1)
    jax.block_until_ready(state.params)
    history.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    history.valid_loss_end = float(evaluate(state.params, valid))
    history.state = state
    if measure_noise:
        history.noise = noise_scale(state.opt_state)
        history.current = current_b_simple(
            history.g2, history.trace_sigma, window=default_window(steps)
        )
    return history


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", leave=True)

"""The main job: train a small Flax transformer language model with Tiger, on a CPU, in a minute.

Run ``python -m optax_ext.demo --help`` for the flags. The corpus is built from the
docstrings of Python's own standard library, so nothing is downloaded; the model is a
character-level causal transformer written with ``flax.linen``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from optax_ext.optimizers.tiger import tiger

#: Standard-library modules whose docstrings make the corpus (English prose about code).
CORPUS_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "inspect", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
    "subprocess", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)  # fmt: skip


def load_corpus(max_chars: int = 400_000) -> str:
    """Concatenates the docstrings of standard-library modules, their classes and functions."""
    parts: list[str] = []
    for name in CORPUS_MODULES:
        module = importlib.import_module(name)
        members = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in [module] + [m for m in members if not inspect.ismodule(m)]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40 and doc not in parts:
                parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(c for c in text if c.isascii())[:max_chars]


@dataclass(frozen=True)
class CharData:
    """A character-level corpus as integer ids, split into train and held-out parts."""

    train: np.ndarray
    valid: np.ndarray
    vocab: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str, valid_fraction: float = 0.1) -> CharData:
        vocab = tuple(sorted(set(text)))
        ids = np.frombuffer(text.encode("ascii"), np.uint8)
        lookup = np.zeros(256, np.int32)
        lookup[np.frombuffer("".join(vocab).encode("ascii"), np.uint8)] = np.arange(len(vocab))
        ids = lookup[ids]
        cut = int(len(ids) * (1 - valid_fraction))
        return cls(ids[:cut], ids[cut:], vocab)

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
        """Endless random windows of ``seq_len + 1`` characters from the training part."""
        rng = np.random.default_rng(seed)
        while True:
            starts = rng.integers(0, len(self.train) - seq_len - 1, size=batch_size)
            yield np.stack([self.train[s : s + seq_len + 1] for s in starts])

    def valid_batch(self, batch_size: int, seq_len: int) -> np.ndarray:
        starts = np.linspace(0, len(self.valid) - seq_len - 2, batch_size).astype(int)
        return np.stack([self.valid[s : s + seq_len + 1] for s in starts])


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(4 * self.width)(h)
        return x + nn.Dense(self.width)(nn.gelu(h))


class CharTransformer(nn.Module):
    """A small causal character-level language model (token + position embeddings)."""

    vocab: int
    width: int = 64
    heads: int = 4
    layers: int = 2
    max_len: int = 256

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(self.vocab, self.width, name="embed")(ids)
        x = x + nn.Embed(self.max_len, self.width, name="position")(jnp.arange(ids.shape[1]))
        for i in range(self.layers):
            x = Block(self.width, self.heads, name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="final_norm")(x))


def lm_loss(params, apply_fn, batch):
    """Mean next-character cross-entropy (nats) of a ``(batch, seq_len + 1)`` window."""
    logits = apply_fn({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(name: str, learning_rate: float | None, accumulation_steps: int):
    """The optimizer for the demo; the learning rate defaults to one that works here."""
    if name != "tiger":
        raise ValueError(f"--optimizer must be one of ['tiger'], got {name!r}")
    lr = 3e-3 if learning_rate is None else learning_rate
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, 20, 10_000, lr * 0.1)
    return tiger(schedule, accumulation_steps=accumulation_steps)


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


def train(
    *,
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 64,
    optimizer: str = "tiger",
    learning_rate: float | None = None,
    accumulation_steps: int = 1,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float], Any] | None = None,
) -> History:
    """Trains the demo model and returns its :class:`History`.

    ``steps`` counts parameter updates; each update consumes ``accumulation_steps``
    micro-batches of ``batch_size`` windows.
    """
    data = CharData.from_text(load_corpus())
    model = CharTransformer(vocab=len(data.vocab), max_len=seq_len)
    params = model.init(jax.random.key(seed), jnp.zeros((1, seq_len), jnp.int32))["params"]
    tx = make_optimizer(optimizer, learning_rate, accumulation_steps)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(lm_loss)(state.params, state.apply_fn, batch)
        return state.apply_gradients(grads=grads), loss

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
        loss = float(np.mean(jax.device_get(micro_losses)))
        history.steps.append(update + 1)
        history.losses.append(loss)
        history.examples += batch_size * accumulation_steps
        if on_step is not None:
            on_step(update + 1, loss)
        if bar is not None:
            rate = history.examples * seq_len / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
    jax.block_until_ready(state.params)
    history.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    history.valid_loss_end = float(evaluate(state.params, valid))
    return history


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", leave=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m optax_ext.demo",
        description=(
            "Train a small Flax character-level transformer on the docstrings of Python's "
            "standard library with an optax-ext optimizer, on whatever JAX device is present."
        ),
    )
    parser.add_argument(
        "--optimizer",
        default="tiger",
        choices=["tiger"],
        help="optimizer to train with (default: tiger)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=300, help="parameter updates to run (default: 300)"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=32, help="windows per micro-batch (default: 32)"
    )
    parser.add_argument(
        "--seq-len", type=_positive_int, default=64, help="characters per window (default: 64)"
    )
    parser.add_argument(
        "--accumulation-steps",
        type=_positive_int,
        default=1,
        help="micro-batches per update, accumulated inside Tiger's momentum",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (default: the optimizer's demo default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--log",
        default=None,
        metavar="PATH",
        help="write one JSON line per update (step, loss) to PATH",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: _fail(parser.prog, message)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    log = open(args.log, "w") if args.log else None  # noqa: SIM115 (closed below)

    def on_step(step: int, loss: float) -> None:
        if log is not None:
            log.write(json.dumps({"step": step, "loss": loss}) + "\n")

    print(
        f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; "
        f"{args.optimizer}, {args.steps} updates of {args.batch_size}x{args.accumulation_steps}"
        f" windows of {args.seq_len} characters"
    )
    try:
        history = train(
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            optimizer=args.optimizer,
            learning_rate=args.lr,
            accumulation_steps=args.accumulation_steps,
            seed=args.seed,
            progress=not args.no_progress,
            on_step=on_step,
        )
    finally:
        if log is not None:
            log.close()
    print(
        f"held-out loss: {history.valid_loss_start:.3f} -> {history.valid_loss_end:.3f} nats/char "
        f"(uniform guess: {history.uniform_loss:.3f})"
    )
    print(f"train loss (first, last update): {history.losses[0]:.3f} -> {history.losses[-1]:.3f}")
    print(f"time: {history.seconds:.1f} s for {args.steps} updates")
    return 0


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

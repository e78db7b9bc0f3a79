"""The main job: train a small Flax transformer language model with Tiger, on a CPU, in a minute.

Run ``python -m optax_ext.demo --help`` for the flags. The corpus is built from the
docstrings of Python's own standard library, so nothing is downloaded; the model is a
character-level causal transformer written with ``flax.linen``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext._common import check_choice
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.tiger import tiger
from optax_ext.training import TrainState, split_value_and_grad
from optax_ext.wrappers.accumulation import accumulate_gradients
from scaling.noise import measure_noise_scale, noise_log_record, noise_scale

#: Standard-library modules whose docstrings make the corpus (English prose about code).
CORPUS_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "inspect", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
    "subprocess", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)  # fmt: skip


@functools.lru_cache(maxsize=4)
def load_corpus(max_chars: int = 400_000) -> str:
    """Concatenates the docstrings of standard-library modules, their classes and functions."""
    parts: list[str] = []
    with warnings.catch_warnings():  # deprecated aliases (typing.re, typing.io) warn on access
        warnings.simplefilter("ignore", DeprecationWarning)
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


@dataclass(frozen=True)
class Recipe:
    """A demo optimizer: its factory, default peak learning rate and scaling family."""

    make: Callable[..., optax.GradientTransformation]
    lr: float | None
    family: str  # the optimizer family `scaling.recommend` knows
    weight_decay: float
    beta1: float


def _adafactor(lr, wd):
    return adafactor(lr, weight_decay=wd)


#: Settings that train the demo model well: the best learning rate of
#: benchmarks/bench_quality.py's sweep (x1/4 to x4 around the earlier values, extended
#: until the best is bracketed by worse rates; 300 updates of 32 windows).
RECIPES: dict[str, Recipe] = {
    "tiger": Recipe(lambda lr, wd: tiger(lr, 0.965, wd), 6e-3, "tiger", 0.01, 0.965),
    "lion": Recipe(lambda lr, wd: lion(lr, 0.9, 0.99, wd), 2e-3, "lion", 0.01, 0.9),
    "adafactor": Recipe(_adafactor, 8e-2, "adam", 0.0, 0.0),
    "adax": Recipe(lambda lr, wd: adaxw(lr, weight_decay=wd), 1.2e-2, "adam", 0.01, 0.9),
    "amos": Recipe(lambda lr, wd: amos(lr), 8e-2, "adam", 0.0, 0.0),
    "adamw": Recipe(lambda lr, wd: optax.adamw(lr, weight_decay=wd), 1.2e-2, "adamw", 0.01, 0.9),
}


def make_optimizer(
    name: str,
    learning_rate: float | None = None,
    accumulation_steps: int = 1,
    *,
    steps: int = 10_000,
    measure_batch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The demo's optimizer: warm-up + cosine schedule, accumulation, optional noise meter.

    Tiger accumulates inside its momentum; the others are wrapped in
    :func:`~optax_ext.wrappers.accumulation.accumulate_gradients`. With
    ``measure_batch`` (examples in one half of a micro-batch) the chain starts with
    ``scaling.measure_noise_scale``.
    """
    check_choice("--optimizer", name, list(RECIPES))
    recipe = RECIPES[name]
    lr = recipe.lr if learning_rate is None else learning_rate
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 15), steps, lr * 0.1)
    if name == "tiger":
        tx = tiger(schedule, 0.965, recipe.weight_decay, accumulation_steps=accumulation_steps)
    else:
        tx = recipe.make(schedule, recipe.weight_decay)
        if accumulation_steps > 1:
            tx = accumulate_gradients(tx, accumulation_steps)
    if measure_batch is not None:
        tx = optax.chain(measure_noise_scale(measure_batch), tx)
    return optax.with_extra_args_support(tx)


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
    noise: Any = None  # the final scaling.NoiseScale (b_simple, g2, trace_sigma)


def train(
    *,
    steps: int = 300,
    batch_size: int = 32,
    seq_len: int = 64,
    optimizer: str = "tiger",
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
    same cost) so ``scaling.measure_noise_scale`` compares half a micro-batch with a whole
    one; ``param_dtype`` casts the parameters (and so the optimizer state) after init,
    e.g. ``jnp.bfloat16`` for pure bf16 training; ``on_step`` then receives
    ``{"step", "loss", "g2", "trace_sigma", "b_simple_ema"}`` after each update (else
    ``{"step", "loss"}``).
    """
    if measure_noise and batch_size % 2:
        raise ValueError(f"batch_size must be even to measure the noise scale, got {batch_size}")
    data = CharData.from_text(load_corpus())
    model = CharTransformer(vocab=len(data.vocab), max_len=seq_len)
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
        history.steps.append(update + 1)
        history.losses.append(record["loss"])
        history.examples += batch_size * accumulation_steps
        if on_step is not None:
            on_step(record)
        if bar is not None:
            rate = history.examples * seq_len / (time.perf_counter() - start)
            postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{rate:,.0f}"}
            if measure_noise:
                postfix["B_simple"] = f"{record['b_simple_ema']:.0f}"
            bar.set_postfix(postfix)
            bar.update(1)
    jax.block_until_ready(state.params)
    history.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    history.valid_loss_end = float(evaluate(state.params, valid))
    if measure_noise:
        history.noise = noise_scale(state.opt_state)
    return history


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", leave=True)


def recommendations(history: History, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``scaling.recommend`` at other batch sizes from the measured noise scale."""
    from scaling import recommend

    recipe = RECIPES[args.optimizer]
    lr = recipe.lr if args.lr is None else args.lr
    batch = args.batch_size * args.accumulation_steps
    b_simple = float(history.noise.b_simple)
    if not (math.isfinite(b_simple) and b_simple > 0):
        return []
    rows = []
    for factor in (0.5, 2, 4, 8, 16):
        r = recommend(
            recipe.family,
            lr,
            batch,
            batch * factor,
            b_simple=b_simple,
            weight_decay=recipe.weight_decay or None,
            beta1=recipe.beta1 or None,
            steps=args.steps,
        )
        rows.append(
            {
                "batch": r.new_batch,
                "lr": r.new_lr,
                "weight_decay": r.new_weight_decay,
                "steps": r.new_steps,
                "examples": r.new_examples,
                "reason": r.reasons["lr"],
            }
        )
    return rows


def print_recommendations(rows: list[dict[str, Any]], history: History, args) -> None:
    batch = args.batch_size * args.accumulation_steps
    print(
        f"\nmeasured noise scale B_simple ~ {float(history.noise.b_simple):,.0f} windows "
        f"(batch {batch}); recommended {args.optimizer} settings at other batch sizes:"
    )
    if not rows:
        print("  (no finite estimate yet: train longer)")
        return
    print(f"  {'batch':>7}  {'lr':>9}  {'decay':>9}  {'steps':>7}  {'examples':>9}  reason")
    for r in rows:
        wd = "-" if r["weight_decay"] is None else f"{r['weight_decay']:.3g}"
        steps = "-" if r["steps"] is None else f"{r['steps']:,.0f}"
        examples = "-" if r["examples"] is None else f"{r['examples']:,.0f}"
        print(
            f"  {r['batch']:>7,.0f}  {r['lr']:>9.3g}  {wd:>9}  {steps:>7}  {examples:>9}  "
            f"{r['reason']}"
        )


def save_plot(history: History, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'optax-ext[notebooks]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history.steps, history.losses, lw=1, label="train loss")
    ax.axhline(history.uniform_loss, color="grey", ls=":", label="uniform guess")
    ax.set_xlabel("update")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if history.b_simple:
        twin = ax.twinx()
        twin.plot(history.steps, history.b_simple, color="tab:orange", lw=1, label="B_simple")
        twin.set_ylabel("B_simple (windows)", color="tab:orange")
        twin.set_yscale("log")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m optax_ext.demo",
        description=(
            "Train a small Flax character-level transformer on the docstrings of Python's "
            "standard library with an optax-ext optimizer, measure the gradient noise scale "
            "as it trains, and recommend learning rates and weight decays for other batch "
            "sizes (scaling.recommend)."
        ),
    )
    parser.add_argument(
        "--optimizer",
        default="tiger",
        choices=list(RECIPES),
        help="optimizer to train with (default: tiger)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=300, help="parameter updates to run (default: 300)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_even,
        default=32,
        help="windows per micro-batch, even (default: 32)",
    )
    parser.add_argument(
        "--seq-len", type=_positive_int, default=64, help="characters per window (default: 64)"
    )
    parser.add_argument(
        "--accumulation-steps",
        type=_positive_int,
        default=1,
        help="micro-batches per update (Tiger accumulates inside its momentum; "
        "the others through accumulate_gradients) (default: 1)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (default: the optimizer's demo setting)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--log",
        default=None,
        metavar="PATH",
        help="write one JSON line per update (step, loss, g2, trace_sigma, "
        "b_simple_ema) to PATH; `python -m scaling noise PATH` reads it",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="save the loss curve and the noise scale to this PNG file",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.error = lambda message: _fail(parser.prog, message)  # type: ignore[method-assign]
    args = parser.parse_args(argv)
    try:
        log = open(args.log, "w") if args.log else None  # noqa: SIM115 (closed below)
    except OSError as e:
        _fail(parser.prog, f"cannot write --log {args.log}: {e.strerror}")

    def on_step(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")

    print(
        f"JAX {jax.__version__} on {jax.devices()[0].platform.upper()}; {args.optimizer}, "
        f"{args.steps} updates of {args.batch_size}x{args.accumulation_steps} windows of "
        f"{args.seq_len} characters"
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
    tokens = history.examples * args.seq_len
    print(
        f"held-out loss: {history.valid_loss_start:.3f} -> {history.valid_loss_end:.3f} "
        f"nats/char (uniform guess: {history.uniform_loss:.3f})"
    )
    print(f"train loss (first, last update): {history.losses[0]:.3f} -> {history.losses[-1]:.3f}")
    print(
        f"time: {history.seconds:.1f} s for {args.steps} updates "
        f"({tokens / history.seconds:,.0f} characters/s)"
    )
    print_recommendations(recommendations(history, args), history, args)
    if args.log:
        print(f"\nlog: {args.log} (try: python -m scaling noise {args.log})")
    if args.plot:
        save_plot(history, args.plot, f"{args.optimizer} on the demo task")
        print(f"plot: {args.plot}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_even(text: str) -> int:
    value = _positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(
            f"expected an even number (it is split in halves to "
            f"measure the noise scale), got {text!r}"
        )
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m optax_ext.demo``: flags, the run, and what it prints."""

from __future__ import annotations

import json
import sys
from typing import Any

import jax

from optax_ext.demo.loop import train
from optax_ext.demo.recipes import RECIPES
from optax_ext.demo.report import (
    print_recommendations,
    recommendations,
    require_matplotlib,
    save_plot,
)
from scaling.cli import (
    ArgumentParser,
    UsageError,
    positive_even_int,
    positive_float,
    positive_int,
    run,
)

__all__ = ["PROG", "build_parser", "main"]

PROG = "python -m optax_ext.demo"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Train a small Flax character-level transformer on the docstrings of Python's "
            "standard library with an optax-ext optimizer, measure the gradient noise scale "
            "as it trains, and recommend learning rates and weight decays for other batch "
            "sizes (scaling.recommend)."
        ),
    )
    add = parser.add_argument
    add(
        "--optimizer",
        default="muon",
        choices=list(RECIPES),
        help="optimizer to train with (default: muon, the best on the language models of "
        "benchmarks/bench_suite.py)",
    )
    add("--steps", type=positive_int, default=300, help="parameter updates to run (default: 300)")
    add(
        "--batch-size",
        type=positive_even_int,
        default=32,
        help="windows per micro-batch, even (default: 32)",
    )
    add("--seq-len", type=positive_int, default=64, help="characters per window (default: 64)")
    add(
        "--accumulation-steps",
        type=positive_int,
        default=1,
        help="micro-batches per update (Tiger accumulates inside its momentum; "
        "the others through accumulate_gradients) (default: 1)",
    )
    add(
        "--lr",
        type=positive_float,
        default=None,
        help="peak learning rate (default: the optimizer's demo setting)",
    )
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add(
        "--log",
        default=None,
        metavar="PATH",
        help="write one JSON line per update (step, loss, g2, trace_sigma, "
        "b_simple_ema) to PATH; `python -m scaling noise PATH` reads it",
    )
    add(
        "--plot",
        default=None,
        metavar="PNG",
        help="save the loss curve and the noise scale to this PNG file",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; bad flags get one line on stderr and status 2."""
    return run(PROG, lambda: _run(build_parser().parse_args(argv)))


def _run(args: Any) -> None:
    if args.plot:
        try:
            require_matplotlib()  # before training, not after it
        except ImportError as e:
            raise UsageError(f"{PROG}: error: {e}") from None
    try:
        log = open(args.log, "w") if args.log else None  # noqa: SIM115 (closed below)
    except OSError as e:
        raise UsageError(f"{PROG}: error: cannot write --log {args.log}: {e.strerror}") from None

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


if __name__ == "__main__":
    sys.exit(main())

"""The demo's optimizers: one recipe each, which builds its own optimizer.

A recipe knows its best learning rate on the demo task, the family ``scaling.recommend``
treats it as, its weight decay and β1, and how it accumulates micro-batches: Tiger and
SGDM inside their momentum, the others through
:func:`~optax_ext.wrappers.accumulation.accumulate_gradients`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax

import scaling
from optax_ext._common import check_choice
from optax_ext.noise_measurement import measure_noise_scale
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.amos import amos
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.muon import muon
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients

__all__ = ["RECIPES", "Recipe", "accumulated", "make_optimizer", "noise_window"]

#: ``build(learning_rate, weight_decay, accumulation_steps) -> optimizer``.
Build = Callable[[Any, float, int], optax.GradientTransformation]


@dataclass(frozen=True)
class Recipe:
    """A demo optimizer: how to build it, its peak learning rate and scaling family."""

    build: Build
    lr: float | None
    family: str  # the optimizer family `scaling.recommend` knows
    weight_decay: float
    beta1: float

    def optimizer(self, learning_rate: Any, accumulation_steps: int = 1):
        """The optimizer at ``learning_rate`` (a number or a schedule, indexed by update)."""
        return self.build(learning_rate, self.weight_decay, accumulation_steps)


def accumulated(make: Callable[[Any, float], optax.GradientTransformation]) -> Build:
    """A build for an optimizer with no accumulation of its own (wrapped when k > 1)."""

    def build(learning_rate, weight_decay, accumulation_steps):
        tx = make(learning_rate, weight_decay)
        return accumulate_gradients(tx, accumulation_steps) if accumulation_steps > 1 else tx

    return build


def _tiger(learning_rate, weight_decay, accumulation_steps):
    return tiger(
        learning_rate, 0.965, weight_decay=weight_decay, accumulation_steps=accumulation_steps
    )


def _muon(learning_rate, weight_decay):
    # Muon on the hidden kernels, AdamW at the same rate and decay on the rest (its
    # defaults: Moonlight's recipe)
    return muon(learning_rate, weight_decay=weight_decay)


#: Settings that train the demo model well: the best learning rate of
#: benchmarks/bench_quality.py's sweep (x1/4 to x4 around the earlier values, extended
#: until the best is bracketed by worse rates; 300 updates of 32 windows).
RECIPES: dict[str, Recipe] = {
    "tiger": Recipe(_tiger, 6e-3, "tiger", 0.01, 0.965),
    "lion": Recipe(
        accumulated(lambda lr, wd: lion(lr, 0.9, 0.99, weight_decay=wd)), 2e-3, "lion", 0.01, 0.9
    ),
    "adafactor": Recipe(
        accumulated(lambda lr, wd: adafactor(lr, weight_decay=wd)), 8e-2, "adam", 0.0, 0.0
    ),
    "adax": Recipe(
        accumulated(lambda lr, wd: adaxw(lr, weight_decay=wd)), 1.2e-2, "adam", 0.01, 0.9
    ),
    "amos": Recipe(accumulated(lambda lr, wd: amos(lr)), 8e-2, "adam", 0.0, 0.0),
    "muon": Recipe(accumulated(_muon), 1.2e-2, "muon", 0.01, 0.95),
    "adamw": Recipe(
        accumulated(lambda lr, wd: optax.adamw(lr, weight_decay=wd)), 1.2e-2, "adamw", 0.01, 0.9
    ),
}


def make_optimizer(
    name: str,
    learning_rate: float | None = None,
    accumulation_steps: int = 1,
    *,
    steps: int = 10_000,
    measure_batch: int | None = None,
    measure_window: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The demo's optimizer: warm-up + cosine schedule, accumulation, optional noise meter.

    The schedule warms up over the first 1/15 of ``steps`` updates to the recipe's
    learning rate (or ``learning_rate``) and decays to a tenth of it. With
    ``measure_batch`` (examples in one half of a micro-batch) the chain starts with
    ``measure_noise_scale`` averaging over the last ``measure_window`` updates
    (default: :func:`noise_window` of ``steps``).
    """
    check_choice("--optimizer", name, list(RECIPES))
    recipe = RECIPES[name]
    lr = recipe.lr if learning_rate is None else learning_rate
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 15), steps, lr * 0.1)
    tx = recipe.optimizer(schedule, accumulation_steps)
    if measure_batch is not None:
        window = noise_window(steps) if measure_window is None else measure_window
        tx = optax.chain(measure_noise_scale(measure_batch, window=window), tx)
    return optax.with_extra_args_support(tx)


def noise_window(steps: int) -> int:
    """The noise measurement's window: a sixth of the run, 10 to 100 updates.

    The noise scale grows while a model trains, so an average over the whole run
    answers no question; the last sixth is late enough to be the current value and
    long enough (50 updates of a 300-update run) to have a standard error worth reading.
    """
    return scaling.default_window(steps)

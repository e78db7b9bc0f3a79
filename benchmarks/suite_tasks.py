"""The quality suite's tasks: real public data, a small model, a loss and a held-out metric.

Every task is data someone else collected and published, installed from a package
registry, with nothing downloaded at run time:

- ``digits_cnn`` / ``digits_mlp``: the UCI optical handwritten digits (Alpaydin and
  Kaynak, 1998; 1797 images of 8x8 pixels), shipped inside scikit-learn
  (``sklearn.datasets.load_digits``). A small CNN and a two-hidden-layer MLP;
  held-out accuracy on a fixed 500-image split.
- ``fortunes_lm``: Debian's ``fortunes`` package (the fortune-mod quotation files,
  about 2.4 MB of English: literature, science, computing, politics...), a 2-layer
  character transformer; held-out loss in nats per character on the last 10%.
- ``demo_lm``: the demo's corpus (docstrings of Python's standard library) and model,
  what ``python -m optax_ext.demo`` trains.

A task gives ``init(key) -> params``, ``loss(params, batch)``, ``batch(data, key)``
(a training batch drawn from the training arrays) and ``evaluate(params, data) ->
(metric, loss)`` on the held-out arrays; ``higher_is_better`` says how to read the metric.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ext.demo.data import CharData, load_corpus
from optax_ext.demo.model import CharTransformer

FORTUNES_DIR = "/usr/share/games/fortunes"
#: Quotation files of ASCII pictures, not prose.
FORTUNES_SKIP = ("art", "ascii-art")


@dataclass(frozen=True)
class Task:
    """A model, its data and how to score it (see the module docstring)."""

    name: str
    data: dict[str, Any]  # numpy arrays, passed to the jitted run as arguments
    init: Callable[[jax.Array], Any]
    loss: Callable[[Any, Any], jax.Array]
    batch: Callable[[dict, jax.Array], Any]
    evaluate: Callable[[Any, dict], tuple[jax.Array, jax.Array]]
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int
    source: str


# ---------------------------------------------------------------- digits (scikit-learn)


class PatchConv(nn.Module):
    """A 'SAME' convolution as patches times a kernel ``(kh, kw, c_in, c_out)``.

    The numbers of ``nn.Conv``, written as one matrix product so that a ``vmap`` over
    many models stays a batched matrix product (a vmapped ``nn.Conv`` becomes a grouped
    convolution, several times slower on CPUs). Same parameter names and shapes.
    """

    features: int
    size: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.size, self.size, c_in, self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        patches = jax.lax.conv_general_dilated_patches(
            x, (self.size, self.size), (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip
        # patches' features are ordered (c_in, kh, kw); the kernel's (kh, kw, c_in)
        k = kernel.transpose(2, 0, 1, 3).reshape(-1, self.features)
        return patches @ k + bias


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16, then 32 channels with stride 2) and a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(PatchConv(16, name="Conv_0")(x))
        x = nn.relu(PatchConv(32, stride=2, name="Conv_1")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class DigitsMLP(nn.Module):
    """64 pixels -> 128 -> 128 -> 10 classes, GELU."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.gelu(nn.Dense(128)(x))
        x = nn.gelu(nn.Dense(128)(x))
        return nn.Dense(10, name="head")(x)


@functools.lru_cache(maxsize=1)
def digits_arrays(held_out: int = 500) -> dict[str, np.ndarray]:
    """scikit-learn's digits as (N, 8, 8, 1) floats in [0, 1], split by a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the [bench] and [test] extras have it
        raise ImportError("the digits tasks need scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:held_out], order[held_out:]
    return {"x": x[train], "y": y[train], "x_test": x[test], "y_test": y[test]}


def _classifier(name: str, module: nn.Module, steps: int, batch_size: int) -> Task:
    data = digits_arrays()

    def init(key):
        return module.init(key, jnp.zeros((1, 8, 8, 1)))["params"]

    def loss(params, batch):
        x, y = batch
        logits = module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def batch(d, key):
        i = jax.random.randint(key, (batch_size,), 0, d["y"].shape[0])
        return d["x"][i], d["y"][i]

    def evaluate(params, d):
        logits = module.apply({"params": params}, d["x_test"])
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, d["y_test"]).mean()
        return jnp.mean(jnp.argmax(logits, -1) == d["y_test"]), xent

    return Task(
        name, data, init, loss, batch, evaluate, "held-out accuracy", True, steps, batch_size,
        "UCI optical handwritten digits (scikit-learn's load_digits)",
    )  # fmt: skip


def digits_cnn(steps: int = 200, batch_size: int = 32) -> Task:
    return _classifier("digits_cnn", DigitsCNN(), steps, batch_size)


def digits_mlp(steps: int = 200, batch_size: int = 32) -> Task:
    return _classifier("digits_mlp", DigitsMLP(), steps, batch_size)


# ---------------------------------------------------------------- character language models


def load_fortunes(directory: str = FORTUNES_DIR) -> str:
    """The ASCII text of Debian's fortune files, one quotation after another."""
    files = sorted(
        f
        for f in glob.glob(os.path.join(directory, "*"))
        if "." not in os.path.basename(f)
        and os.path.basename(f) not in FORTUNES_SKIP
        and not os.path.islink(f)
    )
    if not files:
        raise FileNotFoundError(
            f"no fortune files in {directory}: the fortunes_lm task reads Debian's "
            "'fortunes' package (apt-get install fortunes)"
        )
    parts = []
    for f in files:
        with open(f, encoding="latin-1") as fh:
            parts.append(fh.read().replace("\n%\n", "\n\n"))
    return "".join(c for c in "\n".join(parts) if c.isascii())


def _char_lm(name, text, source, steps, batch_size, seq_len, width, eval_windows) -> Task:
    chars = CharData.from_text(text)
    model = CharTransformer(vocab=len(chars.vocab), width=width, heads=4, layers=2, max_len=seq_len)
    # held-out windows fixed once (a strided grid over the held-out text), not resampled
    starts = np.linspace(0, len(chars.valid) - seq_len - 2, eval_windows).astype(np.int64)
    valid = np.stack([chars.valid[s : s + seq_len + 1] for s in starts]).astype(np.int32)
    data = {"train": chars.train.astype(np.int32), "valid": valid}

    def init(key):
        return model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]

    def xent(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    def batch(d, key):
        start = jax.random.randint(key, (batch_size,), 0, d["train"].shape[0] - seq_len - 1)
        return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(d["train"], s, seq_len + 1))(start)

    def evaluate(params, d):
        loss = xent(params, d["valid"])
        return loss, loss

    return Task(
        name,
        data,
        init,
        xent,
        batch,
        evaluate,
        "held-out loss (nats/char)",
        False,
        steps,
        batch_size,
        source,
    )


def fortunes_lm(steps: int = 200, batch_size: int = 16, seq_len: int = 64) -> Task:
    return _char_lm(
        "fortunes_lm", load_fortunes(), "Debian's fortunes package (fortune-mod quotations)",
        steps, batch_size, seq_len, width=64, eval_windows=128,
    )  # fmt: skip


def demo_lm(steps: int = 200, batch_size: int = 16, seq_len: int = 64) -> Task:
    return _char_lm(
        "demo_lm", load_corpus(), "docstrings of Python's standard library (the demo)",
        steps, batch_size, seq_len, width=64, eval_windows=128,
    )  # fmt: skip


TASKS: dict[str, Callable[..., Task]] = {
    "digits_cnn": digits_cnn,
    "digits_mlp": digits_mlp,
    "fortunes_lm": fortunes_lm,
    "demo_lm": demo_lm,
}

#: Tasks that train the same model on other data: where an optimizer has no earlier best
#: rate on a task, its sweep starts from its best on the sibling (then brackets as usual).
SAME_MODEL: dict[str, str] = {"fortunes_lm": "demo_lm", "demo_lm": "fortunes_lm"}

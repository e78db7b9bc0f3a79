"""Writes the notebooks from the cell sources below (run: python notebooks/make_notebooks.py).

Keeping the sources here keeps the notebooks reviewable as code; the .ipynb files are
committed without outputs and executed by the test suite (nbmake).
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent


def write(name, cells):
    nb = new_notebook(
        cells=[new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c) for c in cells]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, HERE / name)


QUICKSTART = [
    """md:# Quickstart: Tiger in a Flax TrainState

[Tiger](https://kexue.fm/archives/9512) is Lion with a single β: one momentum buffer and
nothing else. Its update is

$$m \\leftarrow b_1 m + \\tfrac{1-\\beta}{k} g,\\qquad
\\Delta\\theta = -\\eta\\, s(\\theta)\\,(\\operatorname{sign}(m) + \\lambda\\theta)$$

where $b_1=\\beta$ on the first of $k$ micro-batches and $1$ on the others: gradient
accumulation happens **inside the momentum**, so accumulating 8 micro-batches costs no
extra memory. $s(\\theta)$ is a per-parameter scale chosen by the parameter's path (RMS of
each kernel, of each embedding row, 0.5 for biases and norm scales).

We train a small character-level transformer on the docstrings of Python's standard
library (no download) with `optax_ext.tiger` inside a plain `flax.training.train_state.TrainState`.""",
    """import jax, jax.numpy as jnp, optax
import matplotlib.pyplot as plt
from flax.training import train_state
from tqdm.auto import tqdm

import optax_ext as ox
from optax_ext.demo import CharData, CharTransformer, lm_loss, load_corpus

data = CharData.from_text(load_corpus())
model = CharTransformer(vocab=len(data.vocab), width=64, layers=2, max_len=64)
params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"]
print(f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters, vocabulary {len(data.vocab)}")""",
    """md:Chain Tiger with 4-step accumulation into the train state. The learning-rate schedule
counts **updates** (every 4th micro-step), as in `optax.MultiSteps`.""",
    """k = 4
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 100, 3e-4)
state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=ox.tiger(schedule, accumulation_steps=k))

@jax.jit
def step(state, batch):
    loss, grads = jax.value_and_grad(lm_loss)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads), loss

batches = data.batches(16, 64, seed=0)
losses = []
for _ in tqdm(range(100 * k), desc="micro-steps"):
    state, loss = step(state, jnp.asarray(next(batches)))
    losses.append(float(loss))
print(f"loss {losses[0]:.3f} -> {sum(losses[-k:]) / k:.3f}")""",
    """plt.figure(figsize=(6, 3.5))
plt.plot(range(len(losses)), losses, lw=0.8)
plt.xlabel("micro-step"); plt.ylabel("cross-entropy (nats/char)")
plt.title("Tiger, 4 micro-batches per update"); plt.grid(alpha=0.3); plt.show()""",
    """md:## Memory of the optimizer state

Tiger keeps one buffer the size of the parameters whatever $k$ is. AdamW with
`optax.MultiSteps` keeps two moments **and** an accumulation buffer. `ox.tree_bytes`
counts the bytes of a state, and `jax.eval_shape` gets it without allocating.""",
    """def state_bytes(tx):
    return ox.tree_bytes(jax.eval_shape(tx.init, params))

param_bytes = ox.tree_bytes(params)
rows = {
    "tiger, k=4": state_bytes(ox.tiger(1e-3, accumulation_steps=k)),
    "adamw + MultiSteps(4)": state_bytes(optax.MultiSteps(optax.adamw(1e-3), k)),
}
for name, b in rows.items():
    print(f"{name:24s} {b / param_bytes:.1f} x the parameters ({b / 1e6:.2f} MB)")
assert rows["tiger, k=4"] == param_bytes""",
]

if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)

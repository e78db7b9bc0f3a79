"""Writes notebooks 01 and 03 from the cell sources below (python notebooks/make_notebooks.py).

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
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{Path(name).stem[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, HERE / name)


QUICKSTART = [
    """md:# Quickstart: Tiger, accumulation, a NaN guard and a parameter EMA in a Flax TrainState

[Tiger](https://kexue.fm/archives/9512) is Lion with a single β: one momentum buffer and
nothing else. Its update is

$$m \\leftarrow b_1 m + \\tfrac{1-\\beta}{k} g,\\qquad
\\Delta\\theta = -\\eta\\, s(\\theta)\\,(\\operatorname{sign}(m) + \\lambda\\theta)$$

where $b_1=\\beta$ on the first of $k$ micro-batches and $1$ on the others: gradient
accumulation happens **inside the momentum** ([kexue.fm/archives/8634](https://kexue.fm/archives/8634)),
so accumulating 4 micro-batches costs no extra memory. $s(\\theta)$ is a per-parameter
scale chosen by the parameter's path (RMS of each kernel, of each embedding row, 0.5
for biases and norm scales).

We chain three pieces of optax-ext into a plain `flax.training.train_state.TrainState`:

- `ox.nan_guard(...)`: a leaf whose gradient is not finite shrinks toward its centre
  instead of stepping, and the inner optimizer skips the step (Tiger's strategy, for any
  optimizer; [kexue.fm/archives/9512](https://kexue.fm/archives/9512));
- `ox.tiger(..., accumulation_steps=4)`;
- `ox.param_ema(0.99)`, last in the chain: an average of the weights, read back with
  `ox.ema_params` ([kexue.fm/archives/7094](https://kexue.fm/archives/7094)).

The model is a small character-level transformer on the docstrings of Python's standard
library (no download).""",
    """import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax.training import train_state
from tqdm.auto import tqdm

import optax_ext as ox
from optax_ext.demo import CharData, CharTransformer, lm_loss, load_corpus

data = CharData.from_text(load_corpus())
model = CharTransformer(vocab=len(data.vocab), width=64, layers=2, max_len=64)
params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"]
n_params = sum(x.size for x in jax.tree.leaves(params))
print(f"{n_params:,} parameters, vocabulary {len(data.vocab)}")""",
    """md:The learning-rate schedule counts **updates** (every 4th micro-step), as in
`optax.MultiSteps`. To show the guard at work, every 50th micro-batch gets a NaN
gradient in the attention of the first block.""",
    """k = 4
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 100, 3e-4)
tx = optax.chain(
    ox.nan_guard(ox.tiger(schedule, accumulation_steps=k)),
    ox.param_ema(0.99),
)
state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

def poison(grads):
    attn = grads["block_0"]["MultiHeadDotProductAttention_0"]["query"]
    attn["kernel"] = attn["kernel"].at[0, 0, 0].set(jnp.nan)
    return grads

@jax.jit
def step(state, batch, bad):
    loss, grads = jax.value_and_grad(lm_loss)(state.params, state.apply_fn, batch)
    grads = jax.lax.cond(bad, poison, lambda g: g, grads)
    return state.apply_gradients(grads=grads), loss

batches = data.batches(16, 64, seed=0)
losses = []
for t in tqdm(range(100 * k), desc="micro-steps"):
    state, loss = step(state, jnp.asarray(next(batches)), t % 50 == 49)
    losses.append(float(loss))
finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))
print(f"loss {losses[0]:.3f} -> {np.mean(losses[-k:]):.3f}; params finite: {finite}")
assert finite""",
    """md:The guard counts what it did, and the EMA weights are read from the same state:""",
    """guard = state.opt_state[0]  # the chain's first element: ox.wrappers.NanGuardState
print(f"micro-steps seen {int(guard.count)}, skipped {int(guard.skipped_steps)}, "
      f"leaves shrunk {int(guard.shrunk_leaves)}")
assert int(guard.skipped_steps) == 100 * k // 50
ema = ox.ema_params(state.opt_state, state.params)
valid = jnp.asarray(data.valid_batch(64, 64))
print(f"held-out loss: weights {float(lm_loss(state.params, model.apply, valid)):.3f}, "
      f"EMA weights {float(lm_loss(ema, model.apply, valid)):.3f}")""",
    """plt.figure(figsize=(6, 3.5))
plt.plot(range(len(losses)), losses, lw=0.8)
for t in range(49, len(losses), 50):
    plt.axvline(t, color="red", alpha=0.2)
plt.xlabel("micro-step"); plt.ylabel("cross-entropy (nats/char)")
plt.title("Tiger, 4 micro-batches per update; red: NaN gradients"); plt.grid(alpha=0.3); plt.show()""",
    """md:## Memory of the optimizer state

Tiger keeps one buffer the size of the parameters whatever $k$ is; the EMA adds one
copy of the weights. AdamW with `optax.MultiSteps` keeps two moments **and** an
accumulation buffer. `ox.tree_bytes` counts the bytes of a state, and `jax.eval_shape`
gets it without allocating.""",
    """def state_bytes(tx):
    return ox.tree_bytes(jax.eval_shape(tx.init, params))

param_bytes = ox.tree_bytes(params)
rows = {
    "tiger, k=4": state_bytes(ox.tiger(1e-3, accumulation_steps=k)),
    "tiger, k=4 + nan_guard + param_ema": state_bytes(tx),
    "adamw + MultiSteps(4)": state_bytes(optax.MultiSteps(optax.adamw(1e-3), k)),
}
for name, b in rows.items():
    print(f"{name:36s} {b / param_bytes:.1f} x the parameters ({b / 1e6:.2f} MB)")
assert rows["tiger, k=4"] == param_bytes""",
]

TOUR = [
    """md:# Optimizer tour: Tiger, Lion, AdaFactor, AdaX, Amos, Muon and AdamW

Each optimizer trains the demo model (a character-level Flax transformer on the docstrings
of Python's standard library) for the same number of updates, from the same
initialisation and batches, at the setting `optax_ext.demo.RECIPES` recommends for it.

| optimizer | update | post |
|---|---|---|
| Tiger | $\\operatorname{sign}(m)$, one buffer, per-parameter scales | [kexue.fm/archives/9512](https://kexue.fm/archives/9512) |
| Lion | $\\operatorname{sign}(\\beta_1 m + (1-\\beta_1) g)$ | [kexue.fm/archives/9473](https://kexue.fm/archives/9473) |
| AdaFactor | factored $\\hat v$, update clipping, relative step | [kexue.fm/archives/7302](https://kexue.fm/archives/7302) |
| AdaX | $m/\\sqrt{\\hat v}$ with a growing memory | [kexue.fm/archives/7387](https://kexue.fm/archives/7387) |
| Amos | per-leaf scale $\\eta$, self-annealing decay | [kexue.fm/archives/9344](https://kexue.fm/archives/9344) |
| Muon | $0.2\\sqrt{\\max(d_{in}, d_{out})}\\,\\operatorname{msign}(\\beta m + g)$ on hidden kernels, AdamW on the rest | [kexue.fm/archives/10739](https://kexue.fm/archives/10739) |
| AdamW | the baseline | |""",
    """import jax, optax
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import optax_ext as ox
from optax_ext import demo

STEPS = 120
runs = {}
for name in tqdm(list(demo.RECIPES), desc="optimizers"):
    runs[name] = demo.train(steps=STEPS, batch_size=16, seq_len=64, optimizer=name,
                            measure_noise=False, progress=False)
for name, h in runs.items():
    print(f"{name:10s} held-out loss {h.valid_loss_start:.3f} -> {h.valid_loss_end:.3f} "
          f"({h.seconds:.1f} s)")""",
    """md:## Loss curves

Training loss per update, smoothed over 10 updates.""",
    """def smooth(x, n=10):
    return np.convolve(x, np.ones(n) / n, mode="valid")

plt.figure(figsize=(7, 4))
for name, h in runs.items():
    plt.plot(smooth(h.losses), label=f"{name} ({h.valid_loss_end:.2f})")
plt.xlabel("update"); plt.ylabel("train cross-entropy (nats/char)")
plt.legend(title="optimizer (held-out loss)"); plt.grid(alpha=0.3); plt.show()""",
    """md:## What the ranking shows

The cell below ranks the optimizers by held-out loss and says where Tiger and Muon land.
This is one seed, one short run of small batches, each optimizer at its recipe's
learning rate: a picture of this task, not a verdict. The quality suite
(`benchmarks/bench_suite.py`: four tasks on real data, a learning-rate sweep and three
seeds per optimizer; tables in `benchmarks/RESULTS.md`) finds the same order at the ends:
on language models the adaptive updates (Muon with AdamW on the other leaves, AdamW,
AdaFactor) lead and the sign updates (Tiger, Lion) trail. Tiger's case is memory, not
loss at this scale: one buffer, about 1 byte per parameter with 8-bit states.""",
    """ranking = sorted(runs, key=lambda name: runs[name].valid_loss_end)
for place, name in enumerate(ranking, 1):
    print(f"{place}. {name:10s} held-out {runs[name].valid_loss_end:.3f}")
behind = lambda name: runs[name].valid_loss_end - runs["adamw"].valid_loss_end
print(f"Tiger: {ranking.index('tiger') + 1} of {len(ranking)}, {behind('tiger'):+.3f} nats "
      f"against AdamW; Lion {behind('lion'):+.3f}; Muon {behind('muon'):+.3f}")
# what the text above says, checked on this run's numbers
sign = ("tiger", "lion")
assert all(ranking.index(s) > ranking.index("adamw") for s in sign), ranking
assert all(ranking.index(s) > ranking.index("muon") for s in sign), ranking""",
    """md:## State memory

Bytes of optimizer state per parameter on the demo model, counted from the state
`init` returns (`ox.tree_bytes` on `jax.eval_shape`). AdamW keeps two moments (8 bytes
per float32 parameter), Tiger, Lion and Muon one. AdaFactor stores a matrix's second
moment as a row and a column only when its two largest dimensions reach
`min_dim_size_to_factor` (128, as in optax); the cell below counts how many matrices of
this model qualify, and adds AdaFactor with the threshold lowered to 32.""",
    """import jax.numpy as jnp
data = demo.CharData.from_text(demo.load_corpus())
model = demo.CharTransformer(vocab=len(data.vocab), max_len=64)
params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"])
n = sum(x.size for x in jax.tree.leaves(params))
per_param = {name: ox.tree_bytes(jax.eval_shape(demo.make_optimizer(name).init, params)) / n
             for name in demo.RECIPES}
per_param["adafactor (factor >= 32)"] = ox.tree_bytes(jax.eval_shape(
    ox.adafactor(min_dim_size_to_factor=32).init, params)) / n
factorable = lambda threshold: sum(
    1 for x in jax.tree.leaves(params) if x.ndim >= 2 and sorted(x.shape)[-2] >= threshold)
print(f"matrices factored at the default threshold 128: {factorable(128)}; at 32: "
      f"{factorable(32)} of {sum(x.ndim >= 2 for x in jax.tree.leaves(params))}")
print(f"AdaFactor: {per_param['adafactor']:.2f} bytes/param by default, "
      f"{per_param['adafactor (factor >= 32)']:.2f} with the threshold at 32")
assert (per_param["adafactor"] == 4.0) == (factorable(128) == 0)   # what the text says
plt.figure(figsize=(7, 3))
plt.bar(list(per_param), list(per_param.values()), color="tab:blue")
plt.xticks(rotation=20, ha="right")
plt.ylabel("state bytes / parameter"); plt.grid(axis="y", alpha=0.3); plt.show()
per_param""",
    """md:Sign optimizers (Tiger, Lion) take the same step size for every entry, which is why
their learning rate is 2–6× smaller than AdamW's; Tiger's per-parameter scale makes that
step proportional to each tensor's RMS. `benchmarks/bench_quality.py` sweeps the learning
rates behind these settings on this task; `benchmarks/bench_suite.py` compares them
across tasks.""",
]

if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("03_optimizer_tour.ipynb", TOUR)

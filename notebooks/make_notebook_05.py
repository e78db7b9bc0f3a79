"""Writes notebook 05 from the cell sources below (python notebooks/make_notebook_05.py).

Uses ``make_notebooks.write`` so the notebook has the same stable cell ids and metadata
as the others; committed without outputs and executed by the test suite (nbmake).
"""

from make_notebooks import write

HALF_PRECISION = [
    """md:# Half precision: stochastic rounding, Kahan summation and 8-bit states

bf16 keeps 8 significant bits. Round-to-nearest discards any update smaller than half
an ulp of the weight — 0.20–0.39% of |w| — and that is exactly where the relative
steps of sign optimizers live (Tiger's $\\eta\\,\\mathrm{RMS}(\\theta)$ with
$\\eta \\approx 10^{-3}$, [kexue.fm/archives/9512](https://kexue.fm/archives/9512)), while
decoupled weight decay ($\\eta\\lambda \\approx 10^{-5}$ relative) is always below it.
Three remedies, each an optax transform:

- `stochastic_round()`, last in a chain: the update becomes $\\mathrm{SR}(p+u) - p$, so
  `optax.apply_updates` lands on the stochastically rounded sum, unbiased;
- `kahan_summation()`: a compensation buffer keeps what rounding lost;
- `pure_bf16(tx)`: params, state and update in bf16, everything written with SR.

And `quantize_state(tx)` stores moments in 8 bits (block-wise absmax + the dynamic map of
[Dettmers et al. 2022](https://arxiv.org/abs/2110.02861)).""",
    """import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt

from optax_ext.optimizers.adax import adaxw
from optax_ext.optimizers.lion import lion
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.precision import pure_bf16
from optax_ext.wrappers.quantize import quantize_state
from optax_ext.wrappers.rounding import kahan_summation, stochastic_round
from optax_ext._common import tree_bytes""",
    """md:## How many weights move per step?

Weights drawn from N(0, 0.02²) in bf16 take Tiger-like steps: every weight moves by
$\\alpha\\,\\mathrm{RMS}(\\theta)$ with a random sign. We count the fraction of weights
whose bf16 value changes, per step, averaged over 20 steps, for each rounding.""",
    """def moved_per_step(alpha, last, n=20_000, steps=20):
    theta = jnp.asarray(0.02 * np.random.default_rng(0).standard_normal(n), jnp.bfloat16)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(theta.astype(jnp.float32)))))
    tx = last or optax.identity()
    state = tx.init(theta)

    def body(carry, key):
        theta, state = carry
        u = -alpha * rms * jax.random.rademacher(key, (n,), jnp.float32)
        u, state = tx.update(u, state, theta)
        new = optax.apply_updates(theta, u)
        return (new, state), jnp.mean(new != theta)

    keys = jax.random.split(jax.random.key(1), steps)
    _, moved = jax.jit(lambda c: jax.lax.scan(body, c, keys))((theta, state))
    return float(moved.mean())

alphas = [1e-4, 3e-4, 1e-3, 2e-3, 6e-3]
roundings = {"nearest": lambda: None, "stochastic": lambda: stochastic_round(0),
             "Kahan": kahan_summation}
moved = {name: [moved_per_step(a, make()) for a in alphas] for name, make in roundings.items()}
for name, fractions in moved.items():
    print(f"{name:10s}", "  ".join(f"{a:g}: {f:.1%}" for a, f in zip(alphas, fractions)))
plt.figure(figsize=(6, 3.5))
for name, fractions in moved.items():
    plt.semilogx(alphas, fractions, "o-", label=name)
plt.xlabel("relative step α"); plt.ylabel("weights moved per step")
plt.legend(); plt.grid(alpha=0.3); plt.show()""",
    """i = alphas.index(1e-3)
print(f"At α = 1e-3, round-to-nearest moves {moved['nearest'][i]:.0%} of the weights per "
      f"step, stochastic rounding {moved['stochastic'][i]:.0%} and Kahan summation "
      f"{moved['Kahan'][i]:.0%}; at α = 1e-4 the numbers are {moved['nearest'][0]:.0%}, "
      f"{moved['stochastic'][0]:.0%} and {moved['Kahan'][0]:.0%}.")""",
    """md:With SR a weight moves with probability |u| / ulp, so its expected move is exactly
u; Kahan moves it when the compensated sum crosses half an ulp. Both keep the *average*
update; round-to-nearest loses all of it below half an ulp.

## Weight decay's steady state

With $\\theta \\leftarrow \\theta - \\eta(s + \\lambda\\theta)$ and random signs $s$ the
steady state is $\\mathrm{RMS}(\\theta) = \\sqrt{\\eta / 2\\lambda}$. Here
$\\eta\\lambda = 10^{-3}$, under half an ulp: round-to-nearest drops the decay.""",
    """def decay_walk(last, dtype=jnp.bfloat16, eta=2.0**-8, lam=0.25, n=2048, steps=6000):
    theta = jnp.asarray(np.random.default_rng(0).standard_normal(n)
                        * np.sqrt(eta / (2 * lam)), jnp.float32).astype(dtype)
    tx = last or optax.identity()

    def body(carry, key):
        theta, state = carry
        u = -eta * (jax.random.rademacher(key, (n,), jnp.float32)
                    + lam * theta.astype(jnp.float32))
        u, state = tx.update(u, state, theta)
        theta = optax.apply_updates(theta, u)
        return (theta, state), jnp.sqrt(jnp.mean(jnp.square(theta.astype(jnp.float32))))

    keys = jax.random.split(jax.random.key(2), steps)
    _, rms = jax.jit(lambda c: jax.lax.scan(body, c, keys))((theta, tx.init(theta)))
    return np.asarray(rms)

target = np.sqrt(2.0**-8 / (2 * 0.25))
walks = {"float32": decay_walk(None, jnp.float32), "bf16 nearest": decay_walk(None),
         "bf16 stochastic": decay_walk(stochastic_round(0)),
         "bf16 Kahan": decay_walk(kahan_summation())}
plt.figure(figsize=(6, 3.5))
for name, rms in walks.items():
    plt.plot(rms, label=name, lw=1)
plt.axhline(target, color="k", ls=":", label="√(η/2λ)")
plt.xlabel("step"); plt.ylabel("RMS(θ)"); plt.legend(); plt.grid(alpha=0.3); plt.show()
for name, rms in walks.items():
    print(f"{name:16s} final RMS / target = {rms[-1] / target:.2f}")""",
    """md:## Training the demo model in pure bf16

The demo's character-level transformer (`optax_ext.demo`), trained with Tiger at its
recipe's rate for a short run, in float32, in pure bf16 with round-to-nearest, and with
`pure_bf16` (SR for state and params); the run is `bench_low_precision.train`, whose
held-out loss is computed with the trained weights cast to float32.
`benchmarks/bench_low_precision.py` runs the full 300 updates for Tiger, Lion and AdamW.""",
    """import sys; sys.path.insert(0, "../benchmarks")
from bench_low_precision import train

runs = {v: train("tiger", v, steps=60, batch_size=16)
        for v in ("float32", "bf16 nearest", "bf16 SR")}
smooth = lambda x, n=10: np.convolve(x, np.ones(n) / n, mode="valid")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for v, r in runs.items():
    ax1.plot(smooth(r["losses"]), lw=1, label=f"{v} ({r['valid_loss']:.3f})")
    ax2.plot(r["moved"], lw=1, label=v)
ax1.set_xlabel("update"); ax1.set_ylabel("train loss (smoothed)"); ax1.grid(alpha=0.3)
ax1.legend(title="held-out loss")
ax2.set_xlabel("update"); ax2.set_ylabel("weights moved"); ax2.grid(alpha=0.3); ax2.legend()
plt.show()
for v, r in runs.items():
    print(f"{v:14s} held-out {r['valid_loss']:.4f}  weights moved per update "
          f"{r['moved_fraction']:.3f}")""",
    """ref = runs["float32"]["valid_loss"]
print(f"After 60 updates pure bf16 with round-to-nearest is "
      f"{runs['bf16 nearest']['valid_loss'] - ref:+.4f} nats from float32 and moves "
      f"{runs['bf16 nearest']['moved_fraction']:.0%} of the weights per update; with "
      f"stochastic rounding it is {runs['bf16 SR']['valid_loss'] - ref:+.4f} nats from "
      f"float32 and moves {runs['bf16 SR']['moved_fraction']:.0%}.")""",
    """md:## State bytes per parameter

Counted by abstract init on a GPT-2-small-shaped tree (124M parameters), as
`benchmarks/bench_state_memory.py` does: nothing is allocated.""",
    """from benchlib import GPT2_SMALL, gpt2_like_params, n_params

params = gpt2_like_params(**GPT2_SMALL, abstract=True)
half = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
count = n_params(params)
per = lambda tx, p: tree_bytes(jax.eval_shape(tx.init, p)) / count
makers = {"tiger": lambda: tiger(1e-3), "lion": lambda: lion(1e-4),
          "adaxw": lambda: adaxw(1e-3), "adamw": lambda: optax.adamw(1e-3)}
table = {name: {"float32": per(make(), params), "pure bf16": per(pure_bf16(make()), half),
                "8-bit": per(quantize_state(make()), params)} for name, make in makers.items()}
x = np.arange(len(table))
for i, kind in enumerate(["float32", "pure bf16", "8-bit"]):
    plt.bar(x + 0.27 * (i - 1), [table[n][kind] for n in table], 0.27, label=kind)
plt.xticks(x, list(table)); plt.ylabel("state bytes / parameter"); plt.legend()
plt.grid(axis="y", alpha=0.3); plt.show()
for name, row in table.items():
    print(f"{name:6s}", "  ".join(f"{k} {v:.4f}" for k, v in row.items()))""",
    """md:8-bit states cost one byte per moment and parameter plus a float32 absmax per block
of 2048 (0.002 bytes) and the small tensors (biases, norms) kept in float32.""",
]

if __name__ == "__main__":
    write("05_half_precision.ipynb", HALF_PRECISION)

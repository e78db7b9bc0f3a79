"""Memory and time of the exact chunked contrastive gradient versus the full-batch gradient.

The encoder is activation-dominated (wide Dense layers on every token of long-ish inputs),
the loss is SimCSE's in-batch softmax on the "pairs in one batch" layout. For the full
batch and for chunks of batch/8 and batch/16 it reports the compiled temporary memory
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``, deterministic
for a given XLA build) and the median wall time of a jitted step.

    python benchmarks/bench_contrastive.py                 # batch 512, length 64, width 1024
    python benchmarks/bench_contrastive.py --repeats 0     # memory only (compiles, no runs)
    python benchmarks/bench_contrastive.py --small         # a quick check that it works

Prints a table and writes JSON to benchmarks/results/contrastive.json (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import flax.linen as nn
import jax
from benchlib import machine, table, write_json

from optax_ext.contrastive import contrastive_value_and_grad, simcse_loss

TARGET_RATIO_AT_8 = 0.25


class WideEncoder(nn.Module):
    vocab: int
    embed: int
    width: int
    out: int

    @nn.compact
    def __call__(self, tokens, *, rng=None):
        x = nn.Embed(self.vocab, self.embed)(tokens)
        for _ in range(2):
            x = nn.gelu(nn.Dense(self.width)(x))
            x = nn.Dropout(0.1, deterministic=rng is None)(x, rng=rng)
        return nn.Dense(self.out)(x.mean(axis=1))


def build(args):
    model = WideEncoder(args.vocab, args.embed, args.width, args.dim)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, args.vocab)
    params = model.init(jax.random.key(1), tokens[:1])
    encode = lambda p, x, rng: model.apply(p, x, rng=rng)
    loss = partial(simcse_loss, temperature=0.05)
    full = lambda p, x, rng: loss(encode(p, x, jax.random.fold_in(rng, 0)))
    fns = {("full batch", args.batch): jax.value_and_grad(full)}
    for div in (8, 16):
        s = args.batch // div
        vg = contrastive_value_and_grad(encode, loss, s)
        fns[(f"chunked /{div}", s)] = lambda p, x, rng, vg=vg: vg(p, x, rng=rng)
    return fns, params, tokens


def median_ms(compiled, inputs, repeats):
    jax.block_until_ready(compiled(*inputs))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


COLUMNS = [
    ("method", "method", str),
    ("chunk_size", "chunk", str),
    ("temp_bytes", "temp MiB", lambda b: f"{b / 2**20:.1f}"),
    ("ratio_to_full", "vs full", lambda x: f"{x:.3f}"),
    ("median_ms", "median ms", lambda ms: f"{ms:.1f}"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--embed", type=int, default=128)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256, help="embedding size")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per method; 0 skips")
    ap.add_argument("--small", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument(
        "--out",
        "--json",
        dest="out",
        help="JSON path (default benchmarks/results/contrastive.json)",
    )
    args = ap.parse_args(argv)
    if args.small:
        args.batch, args.length, args.width, args.embed, args.dim = 64, 16, 128, 32, 32
        args.repeats = min(args.repeats, 3)

    fns, params, tokens = build(args)
    inputs = (params, tokens, jax.random.key(2))
    rows = []
    for (name, chunk), fn in fns.items():
        compiled = jax.jit(fn).lower(*inputs).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        ms = median_ms(compiled, inputs, args.repeats) if args.repeats > 0 else None
        rows.append({"method": name, "chunk_size": chunk, "temp_bytes": int(temp), "median_ms": ms})
    full_bytes = rows[0]["temp_bytes"]
    for r in rows:
        r["ratio_to_full"] = r["temp_bytes"] / full_bytes

    print(
        f"batch {args.batch}, length {args.length}, width {args.width}, "
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    print(table(rows, COLUMNS))
    at8 = rows[1]["ratio_to_full"]
    print(
        f"chunk = batch/8 uses {at8:.3f} of the full batch's temporary memory "
        f"(target <= {TARGET_RATIO_AT_8}): {'met' if at8 <= TARGET_RATIO_AT_8 else 'MISSED'}"
    )

    config = {
        k: getattr(args, k)
        for k in ("batch", "length", "vocab", "embed", "width", "dim", "repeats")
    }
    results = {
        "benchmark": "contrastive_value_and_grad temporary memory and step time",
        "machine": dict(machine(), backend=jax.default_backend()),
        "config": config,
        "results": rows,
        "target_ratio_at_batch_over_8": TARGET_RATIO_AT_8,
    }
    print("wrote", write_json("contrastive", results, args.out))
    return results


if __name__ == "__main__":
    main()

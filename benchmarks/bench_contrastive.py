"""Memory and time of the exact chunked contrastive gradient versus the full-batch gradient.

The encoder is activation-dominated (wide Dense layers on every token of long-ish inputs),
the loss is SimCSE's in-batch softmax on the "pairs in one batch" layout. For the full
batch and for chunks of batch/8 and batch/16 it reports the compiled temporary memory
(``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``, deterministic
for a given XLA build) and the median wall time of a jitted step.

    python benchmarks/bench_contrastive.py                 # batch 512, length 64, width 1024
    python benchmarks/bench_contrastive.py --repeats 0     # memory only (compiles, no runs)
    python benchmarks/bench_contrastive.py --small         # a quick check that it works

Writes benchmarks/results/contrastive.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from functools import partial

import flax.linen as nn
import jax

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
    ap.add_argument("--json", default=str(pathlib.Path(__file__).parent / "results" /
                                          "contrastive.json"))
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
        rows.append({"method": name, "chunk_size": chunk, "temp_bytes": int(temp),
                     "median_ms": ms})
    full_bytes = rows[0]["temp_bytes"]
    for r in rows:
        r["ratio_to_full"] = r["temp_bytes"] / full_bytes

    print(f"batch {args.batch}, length {args.length}, width {args.width}, "
          f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'method':<12} {'chunk':>6} {'temp MiB':>10} {'vs full':>8} {'median ms':>10}")
    for r in rows:
        ms = "-" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        print(f"{r['method']:<12} {r['chunk_size']:>6} {r['temp_bytes'] / 2**20:>10.1f} "
              f"{r['ratio_to_full']:>8.3f} {ms:>10}")
    at8 = rows[1]["ratio_to_full"]
    print(f"chunk = batch/8 uses {at8:.3f} of the full batch's temporary memory "
          f"(target <= {TARGET_RATIO_AT_8}): {'met' if at8 <= TARGET_RATIO_AT_8 else 'MISSED'}")

    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("batch", "length", "vocab", "embed", "width", "dim",
                                            "repeats")}
    out.write_text(json.dumps({
        "benchmark": "contrastive_value_and_grad temporary memory and step time",
        "config": config,
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "results": rows,
        "target_ratio_at_batch_over_8": TARGET_RATIO_AT_8,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

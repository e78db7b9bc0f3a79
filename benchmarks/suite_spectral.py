"""The quality suite's spectral candidates: Muon with Su's spectral pieces beside plain Muon.

Both keep the spectral norm of each hidden matrix near where it starts. The tasks'
hidden kernels are initialised LeCun-normal (entries N(0, 1/d_in)), whose largest
singular value is close to the Marchenko–Pastur edge 1 + √(d_out/d_in) (64 x 128: 2.41,
measured 2.31-2.37 at three seeds; 256 x 64: 1.5, measured 1.46-1.51; 64 x 256: 3.0,
measured 2.86-2.98; the truncated normal sits a little below the edge).

- ``muon+post-clip``: Post-Clip (kexue.fm/archives/11729), ``ox.clip_singular_values``
  last in the chain with the bound ``1 + √(d_out/d_in)`` per matrix: no hidden matrix
  grows past the spectral norm it starts from.
- ``muon+spectral-decay``: Pre-Decay (10648, 11729), ``ox.add_spectral_decay`` between
  Muon's direction and the learning rate, so the decay is multiplied by the learning
  rate as weight decay is: W ← W − η(s·msign(N) + λσ₁u₁v₁ᵀ). λ = 1: a Muon update has
  every singular value equal to s = 0.2·√max(d_in, d_out) (the ``"moonlight"`` scale),
  so even if every update were aligned with the top direction σ₁ would settle at s/λ,
  which for λ = 1 is the initial spectral norm within a factor 0.8-2.1 for every hidden
  kernel of the two tasks. The other leaves get ``ox.muon``'s AdamW exactly.
- ``muon[streaming]``: plain Muon with Su's streaming power iteration (11654-11710) in
  place of Newton–Schulz, one iteration per update from V₀ = I.

    python benchmarks/suite_spectral.py                    # every task, cheapest first
    python benchmarks/suite_spectral.py --tasks digits_mlp

runs ``bench_suite.py``'s protocol on these candidates into
``results/quality_suite_spectral.json``, beside plain ``muon`` and ``optax.adamw`` rows
copied from ``results/quality_suite.json`` (same tasks, steps, batch and protocol), so
plain Muon is not run again.

On a 2-core CPU the candidates that call LAPACK inside the vmapped runs (spectral decay's
QR of its Krylov basis, the streaming orthogonaliser's QR and Cholesky) can hang: jax's
batched LAPACK kernels wait, from inside XLA:CPU's intra-op thread pool, for batch work
queued on that same pool, and two of them at once fill a 2-thread pool (seen with and
without ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``). A hung run uses no CPU; stop
it and run that candidate again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from suite_optimizers import Entry  # noqa: E402

import optax_ext as ox  # noqa: E402

#: The largest singular value of a large d_in x d_out matrix of N(0, 1/d_in) entries.
LECUN_EDGE = lambda d_in, d_out: 1.0 + (d_out / d_in) ** 0.5  # noqa: E731

SPECTRAL_DECAY = 1.0


def muon_spectral_decay(schedule, weight_decay: float = SPECTRAL_DECAY):
    """``ox.muon(schedule, weight_decay=0)`` with λσ₁u₁v₁ᵀ added before the learning rate."""
    hidden = optax.chain(
        ox.scale_by_muon(),
        ox.add_spectral_decay(weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    # ox.muon's other leaves: AdamW at the same lr inside nan_guard (weight decay 0 here)
    other = ox.nan_guard(optax.adamw(schedule, weight_decay=0.0))
    return optax.partition({"muon": hidden, "other": other}, ox.muon_labels)


SPECTRAL_CANDIDATES: dict[str, Entry] = {
    "muon+post-clip": Entry(
        lambda s: optax.chain(
            ox.muon(s, weight_decay=0.0), ox.clip_singular_values(1.0, shape_factor=LECUN_EDGE)
        ),
        3e-3, "optax-ext",
        "Post-Clip: each hidden matrix's sigma_max clipped to its LeCun-init value "
        "1 + sqrt(d_out/d_in) after each update",
    ),
    "muon+spectral-decay": Entry(
        muon_spectral_decay, 3e-3, "optax-ext",
        "Pre-Decay: lambda*sigma_1*u_1*v_1^T (lambda = 1) added before the learning rate",
    ),
    "muon[streaming]": Entry(
        lambda s: ox.muon(s, weight_decay=0.0, orthogonalizer="streaming"), 3e-3, "optax-ext",
        "msign by streaming power iteration, one double Cholesky-QR step per update",
    ),
}  # fmt: skip


#: The rows the candidates are read against, from the main suite's results.
REFERENCE_ROWS = ("muon", "optax.adamw")
#: Cheapest first: the two digits tasks take minutes, the language models much longer.
TASK_ORDER = ("digits_mlp", "digits_cnn", "fortunes_lm", "demo_lm")


def copy_reference_rows(source: str, out: str, tasks) -> None:
    """Start ``out`` with the tasks' ``REFERENCE_ROWS`` of ``source`` (results/<name>.json).

    The candidates' rows already in ``out`` stay; a task whose settings (steps, batch)
    differ from the suite's defaults is refused, since its rows would not compare.
    """
    from bench_suite import default_batch_size  # noqa: PLC0415
    from benchlib import RESULTS_DIR  # noqa: PLC0415

    with open(os.path.join(RESULTS_DIR, f"{source}.json")) as f:
        ref = json.load(f)
    path = os.path.join(RESULTS_DIR, f"{out}.json")
    results = {"tasks": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    for tname in tasks:
        info = ref["tasks"][tname]
        if (info["steps"], info.get("batch_size")) not in ((200, default_batch_size(tname)),):
            raise SystemExit(f"{source}.json's {tname} is not at the suite's defaults")
        tag = {"from": f"{source}.json"}
        rows = [r | tag for r in info["rows"] if r["optimizer"] in REFERENCE_ROWS]
        mine = results["tasks"].get(tname, {}).get("rows", [])
        rows += [r for r in mine if r["optimizer"] not in REFERENCE_ROWS]
        results["tasks"][tname] = {k: v for k, v in info.items() if k != "rows"} | {"rows": rows}
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def main(argv=None):
    ap = argparse.ArgumentParser(description="the quality suite's spectral candidates")
    ap.add_argument("--tasks", nargs="*", default=list(TASK_ORDER), choices=TASK_ORDER)
    ap.add_argument("--only", nargs="*", default=list(SPECTRAL_CANDIDATES),
                    choices=list(SPECTRAL_CANDIDATES))  # fmt: skip
    ap.add_argument("--reference", default="quality_suite", help="results/<name>.json")
    ap.add_argument("--out", default="quality_suite_spectral", help="results/<out>.json")
    args = ap.parse_args(argv)
    import bench_suite  # noqa: PLC0415

    copy_reference_rows(args.reference, args.out, args.tasks)
    return bench_suite.main(
        ["--tasks", *args.tasks, "--candidates", "spectral", "--only", *args.only,
         "--merge", "--out", args.out]
    )  # fmt: skip


if __name__ == "__main__":
    main()

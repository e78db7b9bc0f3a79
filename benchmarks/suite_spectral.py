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
"""

from __future__ import annotations

import optax
from suite_optimizers import Entry

import optax_ext as ox

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

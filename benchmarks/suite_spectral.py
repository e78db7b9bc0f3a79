"""The quality suite's spectral candidates: Muon with Su's spectral pieces beside plain Muon.

Post-Clip (kexue.fm/archives/11729): ``ox.clip_singular_values`` last in the chain keeps
every hidden matrix's largest singular value at most ``max_sv``. Pre-Decay (10648):
``ox.add_spectral_decay`` adds λ·σ₁u₁v₁ᵀ of each hidden matrix to the update.
"""

from __future__ import annotations

import optax
from suite_optimizers import Entry

import optax_ext as ox

SPECTRAL_CANDIDATES: dict[str, Entry] = {
    "muon+post-clip": Entry(
        lambda s: optax.chain(ox.muon(s, weight_decay=0.0), ox.clip_singular_values(1.0)),
        3e-3, "optax-ext", "hidden matrices' σ_max clipped to 1 after each update",
    ),
}  # fmt: skip

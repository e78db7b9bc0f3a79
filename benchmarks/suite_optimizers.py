"""The quality suite's optimizers: ours against optax's, each built from a schedule.

Every entry is ``make(schedule) -> optimizer`` with the peak learning rate inside the
schedule, so one jitted program sweeps learning rates as traced values. Weight decay is
0 everywhere (one policy for all: the comparisons are of the update rules, and short
runs on small models do not need decay); every other setting is the optimizer's default.
``centre`` is where the learning-rate grid starts (the sweep extends past either edge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optax

import optax_ext as ox


@dataclass(frozen=True)
class Entry:
    make: Callable[[Callable], optax.GradientTransformation]
    centre: float
    source: str  # "optax" or "optax-ext"
    note: str = ""


def _q8(tx):
    # 8-bit moments for every floating state leaf of a kernel's size (small models
    # included: the default threshold is for leaves worth the block scales).
    return ox.quantize_state(tx, min_size=256)


def _q4(tx):
    return ox.quantize_state(tx, bits=4, min_size=256)


OPTIMIZERS: dict[str, Entry] = {
    # --- optax's
    "optax.adamw": Entry(lambda s: optax.adamw(s, weight_decay=0.0), 3e-3, "optax"),
    "optax.lion": Entry(lambda s: optax.lion(s, weight_decay=0.0), 3e-4, "optax"),
    "optax.contrib.muon": Entry(lambda s: optax.contrib.muon(s), 2e-2, "optax"),
    "optax.sgd(momentum=0.9)": Entry(lambda s: optax.sgd(s, momentum=0.9), 1e-1, "optax"),
    # --- ours, defaults
    "tiger": Entry(lambda s: ox.tiger(s, weight_decay=0.0), 6e-3, "optax-ext"),
    "muon": Entry(lambda s: ox.muon(s, weight_decay=0.0), 3e-3, "optax-ext"),
    "adafactor": Entry(lambda s: ox.adafactor(s), 3e-2, "optax-ext"),
    "adaxw": Entry(lambda s: ox.adaxw(s, weight_decay=0.0), 3e-3, "optax-ext"),
    "amos": Entry(lambda s: ox.amos(s), 3e-2, "optax-ext"),
    # --- 8-bit states
    "tiger 8-bit": Entry(lambda s: _q8(ox.tiger(s, weight_decay=0.0)), 6e-3, "optax-ext"),
    "optax.adamw 8-bit": Entry(
        lambda s: _q8(optax.adamw(s, weight_decay=0.0)), 3e-3, "optax-ext", "ox.quantize_state"
    ),
}

#: Ours that are optax's update rule at the suite's settings (tested equal: ``ox.lion`` is
#: ``optax.lion`` with weight decay 0, ``ox.sgdm`` is ``optax.sgd(momentum=0.9)``), so the
#: default run does not repeat them.
SAME_AS_OPTAX: dict[str, Entry] = {
    "lion": Entry(lambda s: ox.lion(s, weight_decay=0.0), 3e-4, "optax-ext"),
    "sgdm": Entry(lambda s: ox.sgdm(s), 1e-1, "optax-ext"),
}

#: Muon's routing candidates: what the non-Muon leaves (embeddings, head, biases, norm
#: scales, conv kernels where so routed) get. See ``benchmarks/RESULTS.md`` for the choice.
MUON_CANDIDATES: dict[str, Entry] = {
    "muon[other=tiger]": Entry(
        lambda s: ox.muon(s, weight_decay=0.0, other="tiger"), 3e-3, "optax-ext",
        "Tiger at Muon's lr for the other leaves (the default before the suite)",
    ),
    "muon[other=adamw]": Entry(
        lambda s: ox.muon(s, weight_decay=0.0, other="adamw"), 3e-3, "optax-ext",
        "Moonlight: AdamW at Muon's lr for the other leaves",
    ),
    "muon[other=tiger@0.2]": Entry(
        lambda s: ox.muon(
            s, weight_decay=0.0, other="tiger", other_kwargs={"param_scaling": (("", 0.2),)}
        ),
        3e-3, "optax-ext", "Tiger's sign step scaled to Muon's update RMS 0.2, one lr",
    ),
    "muon[other=tiger@lr/4]": Entry(
        lambda s: ox.muon(s, weight_decay=0.0, other_learning_rate=lambda t: 0.25 * s(t)),
        3e-3, "optax-ext", "Tiger at a quarter of Muon's lr",
    ),
    "muon[other=adamw, no nesterov]": Entry(
        lambda s: ox.muon(s, weight_decay=0.0, other="adamw", nesterov=False), 3e-3, "optax-ext",
        "Moonlight's routing, plain momentum instead of Nesterov",
    ),
    "muon[other=adamw, conv to adamw]": Entry(
        lambda s: ox.muon(
            s, weight_decay=0.0, other="adamw", rules=((r"(^|/)Conv", "other"),) + ox.MUON_RULES
        ),
        3e-3, "optax-ext", "Moonlight's routing, conv kernels to AdamW as well",
    ),
    "muon[keller_to_mup]": Entry(
        lambda s: ox.muon(
            s, weight_decay=0.0, scale="keller_to_mup", tau=optax.linear_schedule(1.0, 0.0, 200),
            other_learning_rate=lambda t: 0.25 * s(t),
        ),
        1e-2, "optax-ext",
        "Su's scale from Keller's to MuP's (11772), tau 1 -> 0 over 200 updates; "
        "AdamW at a quarter of the lr for the other leaves",
    ),
}  # fmt: skip

#: Tiger's defaults taken apart (Tiger is Lion with b1 = b2 = β plus per-parameter scales).
TIGER_CANDIDATES: dict[str, Entry] = {
    "tiger[param_scaling=None]": Entry(
        lambda s: ox.tiger(s, weight_decay=0.0, param_scaling=None), 6e-4, "optax-ext",
        "one step size for every entry, as Lion",
    ),
    "tiger[beta=0.965]": Entry(
        lambda s: ox.tiger(s, 0.965, weight_decay=0.0), 6e-3, "optax-ext",
        "Su's default for long NLP runs (the default before the suite: 0.9 now)",
    ),
    "tiger[beta=0.965] 8-bit": Entry(
        lambda s: _q8(ox.tiger(s, 0.965, weight_decay=0.0)), 6e-3, "optax-ext",
    ),
}  # fmt: skip

#: 4-bit states (Li et al. 2023) against the float and 8-bit rows above.
QUANT4_CANDIDATES: dict[str, Entry] = {
    "tiger 4-bit": Entry(lambda s: _q4(ox.tiger(s, weight_decay=0.0)), 6e-3, "optax-ext"),
    "optax.adamw 4-bit": Entry(
        lambda s: _q4(optax.adamw(s, weight_decay=0.0)), 3e-3, "optax-ext", "ox.quantize_state"
    ),
    "muon 4-bit": Entry(lambda s: _q4(ox.muon(s, weight_decay=0.0)), 3e-3, "optax-ext"),
}  # fmt: skip


def candidate_sets() -> dict[str, dict[str, Entry]]:
    """Named groups of candidates beside the default rows (``bench_suite.py --candidates``)."""
    from suite_spectral import SPECTRAL_CANDIDATES  # noqa: PLC0415  (its own module)

    return {
        "same-as-optax": SAME_AS_OPTAX,
        "muon": MUON_CANDIDATES,
        "tiger": TIGER_CANDIDATES,
        "4bit": QUANT4_CANDIDATES,
        "spectral": SPECTRAL_CANDIDATES,
    }

"""The optimizers' state classes and building blocks; the optimizers are at the top level.

Each optimizer lives in its own module (:mod:`optax_ext.optimizers.tiger`, ...); this
package re-exports what a user may need beyond ``ox.<name>`` and ``ox.scale_by_<name>``.
"""

from optax_ext.optimizers.adafactor import FactoredMoment, ScaleByAdafactorState, relative_step_size
from optax_ext.optimizers.adax import ScaleByAdaxState
from optax_ext.optimizers.amos import ScaleByAmosState, amos_default_eta, amos_default_shape
from optax_ext.optimizers.msign import (
    NS_COEFFICIENTS,
    msign_svd,
    newton_schulz_coefficients,
    singular_value_range,
)
from optax_ext.optimizers.muon import MUON_LAYOUT_RULES, ScaleByMuonState, matrix_shape
from optax_ext.optimizers.sgdm import ScaleBySgdmState
from optax_ext.optimizers.tiger import TIGER_SCALE_RULES, ScaleByTigerState

__all__ = [
    "FactoredMoment",
    "MUON_LAYOUT_RULES",
    "NS_COEFFICIENTS",
    "ScaleByAdafactorState",
    "ScaleByAdaxState",
    "ScaleByAmosState",
    "ScaleByMuonState",
    "ScaleBySgdmState",
    "ScaleByTigerState",
    "TIGER_SCALE_RULES",
    "amos_default_eta",
    "amos_default_shape",
    "matrix_shape",
    "msign_svd",
    "newton_schulz_coefficients",
    "relative_step_size",
    "singular_value_range",
]

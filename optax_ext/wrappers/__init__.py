"""The wrappers' state classes and helpers; the wrappers themselves are at the top level."""

from optax_ext.wrappers.accumulation import AccumulationState
from optax_ext.wrappers.lazy import touched_rows
from optax_ext.wrappers.lookahead import LookaheadState
from optax_ext.wrappers.nan_guard import NanGuardState
from optax_ext.wrappers.param_ema import ParamEMAState
from optax_ext.wrappers.precision import PureBf16State
from optax_ext.wrappers.qk_clip import MHA_PARTS, MLA_PARTS
from optax_ext.wrappers.quantize import (
    SECOND_MOMENTS,
    QuantizedArray,
    QuantizedState,
    dequantize,
    dynamic_map,
    quantize,
)
from optax_ext.wrappers.rounding import KahanState, StochasticRoundState, stochastic_round_to

__all__ = [
    "AccumulationState",
    "KahanState",
    "LookaheadState",
    "MHA_PARTS",
    "MLA_PARTS",
    "NanGuardState",
    "ParamEMAState",
    "PureBf16State",
    "QuantizedArray",
    "QuantizedState",
    "SECOND_MOMENTS",
    "StochasticRoundState",
    "dequantize",
    "dynamic_map",
    "quantize",
    "stochastic_round_to",
    "touched_rows",
]

"""optax-ext: Su Jianlin's optimizers and training tricks as chainable optax transforms.

Everything public is importable from the top level::

    import optax_ext as ox
    tx = ox.tiger(learning_rate=1e-3)

**The contract** every optimizer keeps (held for all of them by ``tests/test_contract.py``):

- Each optimizer is a direction ``scale_by_<name>`` and an alias ``<name>``; both return
  an ``optax.GradientTransformationExtraArgs`` whose state is a NamedTuple named
  ``ScaleBy<Name>State`` with an int32 ``count``. Abstract init works on
  ``jax.ShapeDtypeStruct`` trees, and a jitted step compiles once.
- Positional order is the optax sibling's: ``learning_rate``, then the optimizer's own
  moment coefficients (``ox.lion(1e-3, 0.9, 0.99, None, 0.1)`` means what it means for
  ``optax.lion``); everything else is keyword-only.
- Every number that may vary during training (learning rate, weight decay) accepts an
  optax schedule, indexed by *update*, not by micro-step, also under
  :func:`ox.inject_hyperparams <optax_ext.hyperparams.inject_hyperparams>` and with
  ``accumulation_steps > 1``. A schedule where only a number can go is a ``ValueError``
  at construction.
- ``mask=None`` means one rule everywhere: decay every leaf except biases and norm
  scales (``NORM_AND_BIAS``).
- One name per concept: ``accumulation_steps`` for micro-batches per update,
  ``mu_dtype`` for the first moment's storage dtype, ``catch_inf=True`` wherever a
  guard checks for non-finite gradients.
- Bad input fails at construction with a ``ValueError`` that names the argument, the
  value and the valid range: non-finite or out-of-range numbers, strings, integer or
  complex state dtypes, an optimizer factory given where an optimizer goes. Gradients of
  another shape than the params, or integer/complex params, fail at the first step with
  a message that names the leaf.
"""

from optax_ext._common import (
    EMBEDDING,
    NORM_AND_BIAS,
    NORM_SCALE,
    path_labels,
    path_mask,
    path_multipliers,
    tree_bytes,
    tree_paths,
)
from optax_ext.adversarial import (
    fgm_value_and_grad,
    gradient_penalty_loss,
)
from optax_ext.attention import MAX_LOGITS, attention_with_max_logits, max_logits_per_head
from optax_ext.checkpoint import (
    opt_state_signature,
    restore_train_state,
    save_train_state,
)
from optax_ext.contrastive import (
    am_softmax_loss,
    contrastive_value_and_grad,
    cosent_loss,
    info_nce_loss,
    simcse_loss,
)
from optax_ext.hyperparams import inject_hyperparams
from optax_ext.noise_measurement import (
    CurrentNoiseScale,
    NoiseScaleState,
    current_noise_scale,
    measure_noise_scale,
    noise_log_record,
    noise_scale,
)
from optax_ext.optimizers.adafactor import (
    FactoredMoment,
    ScaleByAdafactorState,
    adafactor,
    relative_step_size,
    scale_by_adafactor,
)
from optax_ext.optimizers.adax import (
    ScaleByAdaxState,
    adax,
    adaxw,
    scale_by_adax,
)
from optax_ext.optimizers.amos import (
    ScaleByAmosState,
    amos,
    amos_default_eta,
    amos_default_shape,
    scale_by_amos,
)
from optax_ext.optimizers.lion import (
    lion,
    scale_by_lion,
    scale_by_param_scale,
)
from optax_ext.optimizers.msign import (
    NS_COEFFICIENTS,
    msign,
    msign_svd,
    newton_schulz_coefficients,
    singular_value_range,
)
from optax_ext.optimizers.muon import (
    MUON_LAYOUT_RULES,
    MUON_RULES,
    ScaleByMuonState,
    matrix_shape,
    muon,
    muon_labels,
    scale_by_muon,
)
from optax_ext.optimizers.sgdm import (
    ScaleBySgdmState,
    scale_by_sgdm,
    sgdm,
)
from optax_ext.optimizers.tiger import (
    TIGER_SCALE_RULES,
    ScaleByTigerState,
    scale_by_tiger,
    tiger,
)
from optax_ext.owner_compute import owner_compute
from optax_ext.schedules import (
    DecaySchedules,
    amos_lr_schedule,
    amos_weight_decay_schedule,
    constant_decay_lr_schedule,
    coupled_decay_schedules,
    piecewise_linear,
)
from optax_ext.training import (
    TrainState,
    data_parallel_mesh,
    make_train_step,
    replicate,
    shard_batch,
    shard_params,
    split_batch,
    split_value_and_grad,
    unreplicate,
)
from optax_ext.wrappers.accumulation import (
    AccumulationState,
    accumulate_gradients,
)
from optax_ext.wrappers.layer_adaptation import (
    layer_adapted,
)
from optax_ext.wrappers.lazy import (
    lazy,
    touched_rows,
)
from optax_ext.wrappers.lookahead import (
    LookaheadState,
    lookahead,
)
from optax_ext.wrappers.nan_guard import (
    NanGuardState,
    nan_guard,
)
from optax_ext.wrappers.param_ema import (
    ParamEMAState,
    ema_params,
    param_ema,
)
from optax_ext.wrappers.param_rules import (
    decay_weights,
    scale_by_path,
)
from optax_ext.wrappers.precision import PureBf16State, pure_bf16
from optax_ext.wrappers.qk_clip import MHA_PARTS, MLA_PARTS, qk_clip
from optax_ext.wrappers.quantize import (
    SECOND_MOMENTS,
    QuantizedArray,
    QuantizedState,
    dequantize,
    dynamic_map,
    quantize,
    quantize_state,
)
from optax_ext.wrappers.rounding import (
    KahanState,
    StochasticRoundState,
    kahan_summation,
    stochastic_round,
    stochastic_round_to,
)
from optax_ext.wrappers.spectral import (
    add_spectral_decay,
    clip_singular_values,
    mclip,
    spectral_norm,
    spectral_stats,
)

__version__ = "0.1.0"

__all__ = [
    "AccumulationState",
    "CurrentNoiseScale",
    "DecaySchedules",
    "EMBEDDING",
    "FactoredMoment",
    "KahanState",
    "LookaheadState",
    "MAX_LOGITS",
    "MHA_PARTS",
    "MLA_PARTS",
    "MUON_LAYOUT_RULES",
    "MUON_RULES",
    "NORM_AND_BIAS",
    "NORM_SCALE",
    "NS_COEFFICIENTS",
    "NanGuardState",
    "NoiseScaleState",
    "ParamEMAState",
    "PureBf16State",
    "QuantizedArray",
    "QuantizedState",
    "SECOND_MOMENTS",
    "ScaleByAdafactorState",
    "ScaleByAdaxState",
    "ScaleByAmosState",
    "ScaleByMuonState",
    "ScaleBySgdmState",
    "ScaleByTigerState",
    "StochasticRoundState",
    "TIGER_SCALE_RULES",
    "TrainState",
    "accumulate_gradients",
    "adafactor",
    "adax",
    "adaxw",
    "add_spectral_decay",
    "am_softmax_loss",
    "amos",
    "amos_default_eta",
    "amos_default_shape",
    "amos_lr_schedule",
    "amos_weight_decay_schedule",
    "attention_with_max_logits",
    "clip_singular_values",
    "constant_decay_lr_schedule",
    "contrastive_value_and_grad",
    "cosent_loss",
    "coupled_decay_schedules",
    "current_noise_scale",
    "data_parallel_mesh",
    "decay_weights",
    "dequantize",
    "dynamic_map",
    "ema_params",
    "fgm_value_and_grad",
    "gradient_penalty_loss",
    "info_nce_loss",
    "inject_hyperparams",
    "kahan_summation",
    "layer_adapted",
    "lazy",
    "lion",
    "lookahead",
    "make_train_step",
    "matrix_shape",
    "max_logits_per_head",
    "mclip",
    "measure_noise_scale",
    "msign",
    "msign_svd",
    "muon",
    "muon_labels",
    "nan_guard",
    "newton_schulz_coefficients",
    "noise_log_record",
    "noise_scale",
    "opt_state_signature",
    "owner_compute",
    "param_ema",
    "path_labels",
    "path_mask",
    "path_multipliers",
    "piecewise_linear",
    "pure_bf16",
    "qk_clip",
    "quantize",
    "quantize_state",
    "relative_step_size",
    "replicate",
    "restore_train_state",
    "save_train_state",
    "scale_by_adafactor",
    "scale_by_adax",
    "scale_by_amos",
    "scale_by_lion",
    "scale_by_muon",
    "scale_by_param_scale",
    "scale_by_path",
    "scale_by_sgdm",
    "scale_by_tiger",
    "sgdm",
    "shard_batch",
    "shard_params",
    "simcse_loss",
    "singular_value_range",
    "spectral_norm",
    "spectral_stats",
    "split_batch",
    "split_value_and_grad",
    "stochastic_round",
    "stochastic_round_to",
    "tiger",
    "touched_rows",
    "tree_bytes",
    "tree_paths",
    "unreplicate",
]

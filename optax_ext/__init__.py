"""optax-ext: Su Jianlin's optimizers and training tricks as chainable optax transforms.

The top level holds the optimizers, the wrappers and the path rules::

    import optax_ext as ox
    tx = ox.tiger(learning_rate=1e-3)

Everything else lives in a named submodule, reachable as an attribute (``ox.training``)
and imported on first use, so ``import optax_ext`` loads neither flax, orbax nor tqdm:

- :mod:`optax_ext.optimizers` — the optimizers' state classes and their building blocks
  (``ScaleByTigerState``, ``msign_svd``, ``newton_schulz_coefficients``, ...);
- :mod:`optax_ext.wrappers` — the wrappers' state classes and helpers (``NanGuardState``,
  ``quantize``/``dequantize``, ``stochastic_round_to``, ``MLA_PARTS``, ...);
- :mod:`optax_ext.schedules` — Su's learning-rate and weight-decay schedules;
- :mod:`optax_ext.training` — a Flax ``TrainState``, train steps, data-parallel helpers;
- :mod:`optax_ext.checkpoint` — Orbax save/restore of a train state;
- :mod:`optax_ext.contrastive`, :mod:`optax_ext.adversarial` — exact contrastive
  accumulation and its losses, FGM and gradient penalty;
- :mod:`optax_ext.attention` — attention that reports its max logits (for ``qk_clip``);
- :mod:`optax_ext.noise_measurement` — the gradient-noise-scale transform's state and
  result types.

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

import importlib

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
from optax_ext.hyperparams import inject_hyperparams
from optax_ext.noise_measurement import (
    current_noise_scale,
    measure_noise_scale,
    noise_log_record,
    noise_scale,
)
from optax_ext.optimizers.adafactor import adafactor, scale_by_adafactor
from optax_ext.optimizers.adax import adax, adaxw, scale_by_adax
from optax_ext.optimizers.amos import amos, scale_by_amos
from optax_ext.optimizers.lion import lion, scale_by_lion
from optax_ext.optimizers.msign import msign
from optax_ext.optimizers.muon import MUON_RULES, muon, muon_labels, scale_by_muon
from optax_ext.optimizers.sgdm import scale_by_sgdm, sgdm
from optax_ext.optimizers.tiger import scale_by_param_scale, scale_by_tiger, tiger
from optax_ext.owner_compute import owner_compute
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.layer_adaptation import layer_adapted
from optax_ext.wrappers.lazy import lazy
from optax_ext.wrappers.lookahead import lookahead
from optax_ext.wrappers.nan_guard import nan_guard
from optax_ext.wrappers.param_ema import ema_params, param_ema
from optax_ext.wrappers.param_rules import decay_weights, scale_by_path
from optax_ext.wrappers.precision import pure_bf16
from optax_ext.wrappers.qk_clip import qk_clip
from optax_ext.wrappers.quantize import quantize_state
from optax_ext.wrappers.rounding import kahan_summation, stochastic_round
from optax_ext.wrappers.spectral import (
    add_spectral_decay,
    clip_singular_values,
    mclip,
    spectral_norm,
    spectral_stats,
)

__version__ = "0.1.0"

#: submodules reached as attributes and imported on first use (flax and orbax load there)
SUBMODULES = (
    "adversarial",
    "attention",
    "checkpoint",
    "contrastive",
    "noise_measurement",
    "optimizers",
    "schedules",
    "training",
    "wrappers",
)


def __getattr__(name: str):
    """``ox.training`` and the other :data:`SUBMODULES`, imported on first use."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(SUBMODULES))


__all__ = [
    "EMBEDDING",
    "MUON_RULES",
    "NORM_AND_BIAS",
    "NORM_SCALE",
    "accumulate_gradients",
    "adafactor",
    "adax",
    "adaxw",
    "add_spectral_decay",
    "amos",
    "clip_singular_values",
    "current_noise_scale",
    "decay_weights",
    "ema_params",
    "inject_hyperparams",
    "kahan_summation",
    "layer_adapted",
    "lazy",
    "lion",
    "lookahead",
    "mclip",
    "measure_noise_scale",
    "msign",
    "muon",
    "muon_labels",
    "nan_guard",
    "noise_log_record",
    "noise_scale",
    "owner_compute",
    "param_ema",
    "path_labels",
    "path_mask",
    "path_multipliers",
    "pure_bf16",
    "qk_clip",
    "quantize_state",
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
    "spectral_norm",
    "spectral_stats",
    "stochastic_round",
    "tiger",
    "tree_bytes",
    "tree_paths",
]

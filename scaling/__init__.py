"""scaling: learning rate and weight decay when the batch size changes.

From theory (Su Jianlin's kexue.fm posts, McCandlish et al.'s gradient noise scale,
the "surge" of sign and Adam optimizers, weight decay as an EMA timescale) and from
gradient-noise measurements taken during training.

Quick start::

    import scaling
    rec = scaling.recommend("adamw", lr=3e-4, batch=256, new_batch=1024,
                            b_simple=2000, weight_decay=0.1)
    print(rec)                       # table: value, recommended value, one-line reason
    scaling.sgd_transfer(0.1, 256, 4096, b_noise=1000).lr

    # the current noise scale of a log (one JSON line per update, see scaling.noise)
    now = scaling.settled_noise_scale(scaling.read_noise_log(open("noise.jsonl")))
    print(now.summary())             # current B_simple = 83 ± 12 (last 50 updates): ...

Command line: ``python -m scaling {lr,wd,laws,noise} --help``.

Modules: :mod:`scaling.batch_size` (lr rules), :mod:`scaling.weight_decay`,
:mod:`scaling.muon` (Muon's scale conventions), :mod:`scaling.tradeoff` (steps vs
examples), :mod:`scaling.batch_ramp` (Seesaw: a batch ramp in place of an lr
decay), :mod:`scaling.batch_plan` (a batch that follows the measured noise scale),
:mod:`scaling.laws` (published fits), :mod:`scaling.noise` (noise-scale estimators, logs,
the current value and whether it settled), :mod:`scaling.recommendation`,
:mod:`scaling.protocol` (extra-argument names shared with ``optax_ext``),
:mod:`scaling.cli` (the command lines' number arguments and one-line errors).

Layering: ``scaling`` is pure Python and NumPy; ``import scaling`` and ``python -m
scaling`` never load JAX, optax, flax or ``optax_ext``. ``optax_ext`` imports scaling's
public API, never the reverse: the measuring transform (``ox.measure_noise_scale``,
``ox.current_noise_scale``, ``ox.noise_log_record``) and Su's optax schedules
(``ox.schedules.coupled_decay_schedules``) live there.
"""

from scaling.batch_plan import LR_SCALINGS, NoisePlan, PlanPoint, noise_plan
from scaling.batch_ramp import Seesaw, SeesawPoint, SeesawUpdates, seesaw, seesaw_updates
from scaling.batch_size import (
    MEAN_FIELD_C,
    MUON_BETA_NOISE,
    SU_C,
    AdamPeak,
    AdamSDE,
    OptimalLR,
    SGDNoiseStats,
    SoftSignCurve,
    adam_eps_b_simple,
    adam_optimal_lr,
    adam_peak,
    adam_sde_rule,
    adam_transfer,
    beta2_by_half_life,
    half_life_tokens,
    li_optimal_lr,
    linear_rule,
    momentum_factor,
    muon_optimal_lr,
    muon_transfer,
    sgd_loss_decrease,
    sgd_noise_stats,
    sgd_optimal_lr,
    sgd_transfer,
    sign_beta,
    sign_beta_noise,
    sign_optimal_lr,
    sign_optimal_lr_mean_field,
    sign_peak_batch,
    sign_transfer,
    softsign_curve,
    softsign_optimal_lr,
    sqrt_rule,
)
from scaling.laws import (
    LawPrediction,
    PowerLawFit,
    deepseek_law,
    fit_power_law,
    kaplan_critical_batch,
    power_law,
    step_law,
)
from scaling.muon import (
    MUON_SCALES,
    adamw_from_muon,
    convert_muon,
    muon_dims,
    muon_from_adamw,
    muon_shape_scale,
)
from scaling.noise import (
    SETTLED_REL_STDERR,
    SETTLED_SIGMAS,
    MomentumNoiseScale,
    NoiseEMA,
    NoiseEstimate,
    NoiseLogEntry,
    NoiseScale,
    SettledNoiseScale,
    WindowEstimate,
    current_b_simple,
    default_window,
    ema_decay,
    ema_window,
    format_b_simple,
    momentum_noise_scale,
    noise_ema_read,
    noise_ema_update,
    read_noise_log,
    settled_noise_scale,
    two_batch_estimates,
    window_estimates,
)
from scaling.recommendation import FAMILIES, Recommendation, recommend
from scaling.tradeoff import (
    StepsAndExamples,
    TradeoffFit,
    adaptive_batch_size,
    examples_needed,
    fit_tradeoff,
    steps_and_examples,
    steps_needed,
    warmup_accumulation_steps,
)
from scaling.weight_decay import (
    LrAndDecay,
    amos_sign_hyperparams,
    coupled_to_independent,
    ema_timescale,
    ema_timescale_epochs,
    equilibrium_weight_rms,
    independent_to_coupled,
    lion_from_adamw,
    power_lines_tau,
    power_lines_weight_decay,
    transfer_weight_decay,
    weight_rms_prediction,
)

__all__ = [
    # batch_size
    "MEAN_FIELD_C",
    "MUON_BETA_NOISE",
    "SU_C",
    "AdamPeak",
    "AdamSDE",
    "OptimalLR",
    "SGDNoiseStats",
    "adam_eps_b_simple",
    "softsign_curve",
    "softsign_optimal_lr",
    "SoftSignCurve",
    "adam_optimal_lr",
    "adam_peak",
    "adam_sde_rule",
    "adam_transfer",
    "beta2_by_half_life",
    "half_life_tokens",
    "li_optimal_lr",
    "linear_rule",
    "momentum_factor",
    "muon_optimal_lr",
    "muon_transfer",
    "sgd_loss_decrease",
    "sgd_noise_stats",
    "sgd_optimal_lr",
    "sgd_transfer",
    "sign_beta",
    "sign_beta_noise",
    "sign_optimal_lr",
    "sign_optimal_lr_mean_field",
    "sign_peak_batch",
    "sign_transfer",
    "sqrt_rule",
    # laws
    "LawPrediction",
    "PowerLawFit",
    "deepseek_law",
    "fit_power_law",
    "kaplan_critical_batch",
    "power_law",
    "step_law",
    # muon
    "MUON_SCALES",
    "adamw_from_muon",
    "convert_muon",
    "muon_dims",
    "muon_from_adamw",
    "muon_shape_scale",
    # noise
    "MomentumNoiseScale",
    "NoiseEMA",
    "NoiseEstimate",
    "NoiseLogEntry",
    "NoiseScale",
    "SETTLED_REL_STDERR",
    "SETTLED_SIGMAS",
    "SettledNoiseScale",
    "WindowEstimate",
    "current_b_simple",
    "default_window",
    "ema_decay",
    "ema_window",
    "format_b_simple",
    "momentum_noise_scale",
    "noise_ema_read",
    "noise_ema_update",
    "read_noise_log",
    "settled_noise_scale",
    "two_batch_estimates",
    "window_estimates",
    # recommend
    "FAMILIES",
    "Recommendation",
    "recommend",
    # batch_plan
    "LR_SCALINGS",
    "NoisePlan",
    "PlanPoint",
    "noise_plan",
    # batch_ramp
    "Seesaw",
    "SeesawPoint",
    "SeesawUpdates",
    "seesaw",
    "seesaw_updates",
    # tradeoff
    "StepsAndExamples",
    "TradeoffFit",
    "adaptive_batch_size",
    "examples_needed",
    "fit_tradeoff",
    "steps_and_examples",
    "steps_needed",
    "warmup_accumulation_steps",
    # weight_decay
    "LrAndDecay",
    "amos_sign_hyperparams",
    "coupled_to_independent",
    "ema_timescale",
    "ema_timescale_epochs",
    "equilibrium_weight_rms",
    "independent_to_coupled",
    "lion_from_adamw",
    "power_lines_tau",
    "power_lines_weight_decay",
    "transfer_weight_decay",
    "weight_rms_prediction",
]

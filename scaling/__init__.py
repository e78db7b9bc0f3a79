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

    # measure B_simple while training (first in the chain; averages over the axis itself)
    tx = optax.chain(scaling.measure_noise_scale(batch_size=32, axis_name="batch"),
                     optax.adamw(1e-3))
    scaling.noise_scale(opt_state).b_simple

Command line: ``python -m scaling {lr,wd,laws,noise} --help``.

Modules: :mod:`scaling.batch_size` (lr rules), :mod:`scaling.weight_decay`,
:mod:`scaling.tradeoff` (steps vs examples), :mod:`scaling.laws` (published fits),
:mod:`scaling.noise` (measuring the noise scale), :mod:`scaling.recommendation`.
"""

from scaling.batch_size import (
    MEAN_FIELD_C,
    SU_C,
    AdamPeak,
    AdamSDE,
    OptimalLR,
    SGDNoiseStats,
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
    sqrt_rule,
)
from scaling.laws import LawPrediction, deepseek_law, kaplan_critical_batch, step_law
from scaling.noise import (
    NoiseEMA,
    NoiseEstimate,
    NoiseLogEntry,
    NoiseScale,
    NoiseScaleState,
    measure_noise_scale,
    noise_ema_init,
    noise_ema_read,
    noise_ema_update,
    noise_log_record,
    noise_scale,
    read_noise_log,
    two_batch_estimates,
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
)
from scaling.weight_decay import (
    DecaySchedules,
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
    su_constant_decay_lr_schedule,
    su_coupled_decay_schedules,
    transfer_weight_decay,
)

__all__ = [
    # batch_size
    "MEAN_FIELD_C",
    "SU_C",
    "AdamPeak",
    "AdamSDE",
    "OptimalLR",
    "SGDNoiseStats",
    "adam_eps_b_simple",
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
    "deepseek_law",
    "kaplan_critical_batch",
    "step_law",
    # noise
    "NoiseEMA",
    "NoiseEstimate",
    "NoiseLogEntry",
    "NoiseScale",
    "NoiseScaleState",
    "measure_noise_scale",
    "noise_ema_init",
    "noise_ema_read",
    "noise_ema_update",
    "noise_log_record",
    "noise_scale",
    "read_noise_log",
    "two_batch_estimates",
    # recommend
    "FAMILIES",
    "Recommendation",
    "recommend",
    # tradeoff
    "StepsAndExamples",
    "TradeoffFit",
    "adaptive_batch_size",
    "examples_needed",
    "fit_tradeoff",
    "steps_and_examples",
    "steps_needed",
    # weight_decay
    "DecaySchedules",
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
    "su_constant_decay_lr_schedule",
    "su_coupled_decay_schedules",
    "transfer_weight_decay",
]

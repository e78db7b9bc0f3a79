"""One table of device paths for every transform of optax-ext.

Each row is a transform in the setting its own tests care about (a schedule, an
accumulation cycle, a NaN or a spike in the gradients, extra arguments), on a tiny tree
(``helpers.tiny_params``, or the tree the transform needs), with a few update steps. Every
row is checked three ways:

* the same params and state on every device path (eager, jit, pmap, jit over an 8-device
  mesh with automatic axes, and with explicit axes; ``helpers.assert_same_on_all_paths``,
  at its tolerances unless the row says otherwise), where the jitted step compiles once:
  later steps reuse the program;
* ``init`` on ``jax.ShapeDtypeStruct`` leaves gives the state ``init`` gives on arrays.

What is specific to an algorithm (its float64 reference, sharding tests of its own such
as quantize_state's per-shard blocks) stays in that algorithm's test file.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    SMALL_QUANTIZED,
    abstract_init_matches,
    assert_same_on_all_paths,
    attention_params,
    poison,
    random_grads_like,
    random_tree,
    small_quantized_params,
    sparse_grads,
    sparse_tree,
    tiny_params,
    with_singular_values,
)

import optax_ext as ox
import optax_ext._xla_cpu as xla_cpu
from optax_ext import noise_measurement
from optax_ext._common import NORM_AND_BIAS
from optax_ext.optimizers.muon import scale_by_muon


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    make: Callable[[], optax.GradientTransformation]
    #: () -> params; the tiny tree unless the transform needs another
    params: Callable = lambda: tiny_params(0)
    #: params -> the gradients of the steps (micro-steps where the row accumulates)
    grads: Callable = lambda p: [random_grads_like(p, 10 + s) for s in range(2)]
    extra_args: dict | None = None
    #: how pmap spreads a step's gradient over the devices (helpers._per_device_grads)
    split: str = "noise"
    #: tolerances of the paths' agreement: the helper's unless the row's own test file
    #: measured why float32 rounding needs more (noted at the row)
    rtol: float = 1e-5
    atol: float = 1e-6
    #: a block size for Tiger's row-block reduction (makes small tables take that path)
    row_block: int | None = None
    #: a warning the row expects on sharded paths (a filterwarnings "ignore:" message)
    ignore_warning: str | None = None

    def param(self):
        marks = [pytest.mark.filterwarnings(f"ignore:{self.ignore_warning}")]
        return pytest.param(self, id=self.id, marks=marks if self.ignore_warning else ())


# ------------------------------------------------------------- trees and gradients


def with_nan(step, leaf=0):
    """2 steps of random gradients with a NaN in one entry of ``leaf`` on step ``step``."""

    def grads(p, n=2):
        out = [random_grads_like(p, 10 + s) for s in range(n)]
        out[step] = poison(out[step], {leaf: np.nan})
        return out

    return grads


def micro_steps(n):
    return lambda p: [random_grads_like(p, 10 + s) for s in range(n)]


def tiger_grads(p):
    """4 micro-steps (2 updates of 2), a NaN in the second update."""
    return with_nan(2, leaf=3)(p, 4)


def spike_grads(scale, seed):
    """A 2-step warm-up, then a spike of ``scale`` x on step 3, then a normal step."""
    return lambda p: [
        random_grads_like(p, seed + s, scale=scale if s == 3 else 1.0) for s in range(5)
    ]


def bf16_params():
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny_params(1))


def f32_grads(p):
    """float32 gradients for bf16 params (as a mixed-precision step computes them)."""
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    return [random_grads_like(p32, 10 + s) for s in range(2)]


def sparse_grad_steps(tree):
    """3 steps of gradients with some rows exactly zero (untouched rows of a table)."""
    return [sparse_grads(tree, s) for s in range(3)]


def gapped_matrices():
    """A kernel and a stack of two, with σ₂/σ₁ = 0.5 (crowded top singular values make
    the singular vectors ill-conditioned, and float32 reduction order would move them);
    no 1-D leaf of a kernel's d_out (the helper matches state leaves to params by shape,
    and the spectral states hold replicated (d_out,) vectors)."""
    s = np.concatenate([[2.0], np.linspace(1.0, 0.1, 7)])
    return {
        "mlp": {"kernel": jnp.asarray(with_singular_values(s, 16, 24, 0), jnp.float32)},
        "scan": {
            "kernel": jnp.asarray(
                np.stack([with_singular_values(s, 8, 16, 1), with_singular_values(s, 8, 16, 2)]),
                jnp.float32,
            )
        },
    }


def spectral_tree():
    return gapped_matrices() | {"norm": {"scale": jnp.linspace(0.5, 1.5, 16)}}


def sin_grads(p):
    return [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p) for i in range(2)]


def gaussian_grads(p):
    """Full-rank gradients: the singular directions of a near-singular momentum would
    amplify the paths' different float32 rounding."""
    rng = np.random.default_rng(5)
    noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)
    return [jax.tree.map(noise, p) for _ in range(2)]


QK_RECORD = {"max_logits": {"attn": {"max_logits": jnp.asarray([400.0, 20.0], jnp.float32)}}}


def tiger_schedule(i):
    return 1e-2 / (1.0 + 0.1 * i)


def muon_schedule(i):
    return 2e-2 / (1.0 + 0.5 * i)


#: the tiny leaves' shards (2 rows of 8 or 9) split the blocks of 32: gathered, with a warning
#: (quantisation shard by shard is tested in test_quantize)
GATHERED = "quantize_state. the shards of"

# ----------------------------------------------------------------------- the table

ROWS = [
    # -- the aliases
    Row(
        "tiger",
        lambda: ox.tiger(tiger_schedule, 0.9, 0.01, accumulation_steps=2),
        grads=tiger_grads,
    ),
    Row(
        "tiger-row-blocks",
        lambda: ox.tiger(tiger_schedule, 0.9, 0.01, accumulation_steps=2),
        grads=tiger_grads,
        row_block=40,
    ),
    Row(
        "tiger-spike-skip",
        lambda: ox.tiger(1e-2, spike_warmup=2, spike_action="skip"),
        params=lambda: random_tree(21, max_leaves=3),
        grads=spike_grads(1e4, 40),
    ),
    Row(
        "tiger-spike-clip",
        lambda: ox.tiger(1e-2, spike_warmup=2, spike_action="clip"),
        params=lambda: random_tree(21, max_leaves=3),
        grads=spike_grads(1e4, 40),
    ),
    Row("lion", lambda: ox.lion(1e-2, weight_decay=0.3, param_scaling="tiger")),
    Row("adafactor", lambda: ox.adafactor(momentum=0.9, weight_decay=0.1)),
    Row("adax", lambda: ox.adax(1e-2, b1=0.7)),
    Row("adaxw", lambda: ox.adaxw(1e-2, weight_decay=0.1)),
    Row("amos", lambda: ox.amos(0.1, momentum=0.9, clip_value=2.0, beta=0.99)),
    # per-entry statistics (v, b shaped like the params) keep the params' shardings
    Row("amos-per-entry", lambda: ox.amos(0.1, shape_fn=lambda path, shape: shape)),
    Row("sgdm", lambda: ox.sgdm(0.1, 0.9, accumulation_steps=2), grads=micro_steps(4)),
    Row(
        "sgdm-nesterov",
        lambda: ox.sgdm(0.1, 0.9, accumulation_steps=2, nesterov=True),
        grads=micro_steps(4),
    ),
    # float32 rounding of Newton-Schulz differs between layouts: test_muon measured 2e-5
    Row(
        "muon",
        lambda: ox.muon(muon_schedule, beta=0.9, weight_decay=0.1, other="adamw"),
        grads=with_nan(1, leaf=5),
        rtol=2e-5,
    ),
    # -- the wrappers
    Row("nan_guard", lambda: ox.nan_guard(optax.adamw(1e-2)), grads=with_nan(1)),
    Row(
        "nan_guard-spike",
        lambda: ox.nan_guard(optax.adam(1e-2), spike_warmup=2),
        params=lambda: random_tree(8, max_leaves=3),
        grads=spike_grads(1e5, 0),
    ),
    Row(
        "accumulate_gradients",
        lambda: ox.accumulate_gradients(optax.adamw(1e-2), 2, skip_nonfinite=True),
        grads=lambda p: with_nan(1)(p, 4),
    ),
    Row("lookahead", lambda: ox.lookahead(optax.adamw(1e-2), sync_period=2), grads=micro_steps(3)),
    Row("param_ema", lambda: optax.chain(optax.adamw(1e-2), ox.param_ema(0.9))),
    # each device's gradient keeps the zero rows: pmean must not touch untouched rows
    Row(
        "lazy",
        lambda: ox.lazy(optax.adamw(1e-2, weight_decay=0.1), include=None),
        params=sparse_tree,
        grads=sparse_grad_steps,
        split="scale",
    ),
    Row(
        "layer_adapted",
        lambda: ox.layer_adapted(
            optax.scale_by_adam(eps=1e-6), 1e-2, 0.01, ox.path_mask(exclude=NORM_AND_BIAS)
        ),
    ),
    Row(
        "scale_by_path",
        lambda: optax.chain(
            optax.adamw(1e-2), ox.scale_by_path({"kernel": 0.1}), ox.decay_weights(0.01)
        ),
    ),
    Row(
        "quantize_state-tiger",
        lambda: ox.quantize_state(ox.tiger(1e-2), **SMALL_QUANTIZED),
        params=small_quantized_params,
        ignore_warning=GATHERED,
    ),
    Row(
        "quantize_state-adamw",
        lambda: ox.quantize_state(optax.adamw(1e-2), **SMALL_QUANTIZED),
        params=small_quantized_params,
        ignore_warning=GATHERED,
    ),
    Row(
        "quantize_state-tiger-4bit",
        lambda: ox.quantize_state(ox.tiger(1e-2), bits=4, **SMALL_QUANTIZED),
        params=small_quantized_params,
        ignore_warning=GATHERED,
    ),
    Row(
        "quantize_state-adamw-4bit",
        lambda: ox.quantize_state(optax.adamw(1e-2), bits=4, **SMALL_QUANTIZED),
        params=small_quantized_params,
        ignore_warning=GATHERED,
    ),
    Row(
        "pure_bf16-tiger",
        lambda: ox.pure_bf16(ox.tiger(1e-2), 5),
        params=bf16_params,
        grads=f32_grads,
    ),
    Row(
        "pure_bf16-lion-kahan",
        lambda: ox.pure_bf16(ox.lion(1e-3), summation="kahan"),
        params=bf16_params,
        grads=f32_grads,
    ),
    Row(
        "stochastic_round",
        lambda: optax.chain(ox.tiger(1e-2), ox.stochastic_round(3)),
        params=bf16_params,
        grads=f32_grads,
    ),
    Row(
        "kahan_summation",
        lambda: optax.chain(ox.lion(1e-3), ox.kahan_summation()),
        params=bf16_params,
        grads=f32_grads,
    ),
    # Under this suite's two XLA:CPU compile flags together (tests/conftest.py), a sharded
    # program holding both of mclip's msigns is about 1e-4 less accurate than the unsharded
    # one (each flag alone, or the defaults: 2e-6; unsharded is within 1e-6 of float64's
    # U min(Σ, c) Vᵀ); a routing or sharding mistake moves entries of size 0.1 by far more.
    # The decay's power-iteration vector agrees to 2e-6.
    Row(
        "add_spectral_decay",
        lambda: optax.chain(optax.sgd(0.1), ox.add_spectral_decay(0.1)),
        params=spectral_tree,
        grads=sin_grads,
        rtol=2e-5,
        atol=2e-6,
    ),
    Row(
        "clip_singular_values",
        lambda: optax.chain(optax.sgd(0.5), ox.clip_singular_values(0.9)),
        params=spectral_tree,
        grads=sin_grads,
        rtol=2e-5,
        atol=1e-4,
    ),
    # test_streaming: the tracked basis's float32 rounding differs between layouts
    Row(
        "muon-streaming",
        lambda: optax.chain(scale_by_muon(orthogonalizer="streaming"), optax.scale(-0.05)),
        params=gapped_matrices,
        grads=gaussian_grads,
        rtol=2e-5,
        atol=2e-5,
    ),
    Row(
        "qk_clip",
        lambda: ox.qk_clip(optax.adamw(1e-2), 100.0),
        params=lambda: attention_params(3, width=8),
        extra_args=QK_RECORD,
    ),
    Row(
        "measure_noise_scale",
        lambda: optax.chain(noise_measurement.measure_noise_scale(16), optax.adamw(1e-2)),
        extra_args={"micro_grad_sq_norm": jnp.float32(5e3), "accumulation_steps": 4},
    ),
    Row("decay_weights", lambda: optax.chain(optax.sgd(1e-2), ox.decay_weights(0.1))),
    # optax's inject_hyperparams reads schedules per micro-step; ours per update
    Row(
        "inject_hyperparams",
        lambda: ox.inject_hyperparams(ox.tiger, static_args="accumulation_steps")(
            learning_rate=tiger_schedule, accumulation_steps=2
        ),
        grads=micro_steps(4),
    ),
    # -- the directions alone, each with a learning rate after it
    Row(
        "scale_by_tiger",
        lambda: optax.chain(ox.scale_by_tiger(0.9, accumulation_steps=2), optax.scale(-1e-2)),
        grads=tiger_grads,
    ),
    Row("scale_by_lion", lambda: optax.chain(ox.scale_by_lion(), optax.scale(-1e-2))),
    Row(
        "scale_by_adafactor",
        lambda: optax.chain(ox.scale_by_adafactor(momentum=0.9), optax.scale(-1e-2)),
    ),
    Row("scale_by_adax", lambda: optax.chain(ox.scale_by_adax(), optax.scale(-1e-2))),
    Row("scale_by_amos", lambda: ox.scale_by_amos(0.1, momentum=0.9)),
    Row(
        "scale_by_sgdm",
        lambda: optax.chain(ox.scale_by_sgdm(0.9, accumulation_steps=2), optax.scale(-0.1)),
        grads=micro_steps(4),
    ),
    Row(
        "scale_by_param_scale",
        lambda: optax.chain(optax.scale_by_adam(), ox.scale_by_param_scale(), optax.scale(-1e-2)),
    ),
    Row(
        "scale_by_muon",
        lambda: optax.chain(ox.scale_by_muon(beta=0.9), optax.scale(-2e-2)),
        params=gapped_matrices,
        grads=gaussian_grads,
        rtol=2e-5,
    ),
    # the harness on a plain optax optimizer
    Row("optax.adamw", lambda: optax.adamw(1e-2)),
]

IDS = [row.id for row in ROWS]
TABLE = [row.param() for row in ROWS]


@pytest.fixture
def row(request, monkeypatch):
    row = request.param
    if row.row_block is not None:
        monkeypatch.setattr(xla_cpu, "_ROW_BLOCK_ELEMENTS", row.row_block)
    return row


@pytest.mark.parametrize("row", TABLE, indirect=True)
def test_same_on_every_device_path_compiling_once(row):
    params = row.params()
    assert_same_on_all_paths(
        row.make(),
        params,
        row.grads(params),
        rtol=row.rtol,
        atol=row.atol,
        extra_args=row.extra_args,
        split=row.split,
        compile_once=True,
    )


@pytest.mark.parametrize("row", TABLE, indirect=True)
def test_abstract_init_matches_concrete(row):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layout is settled by the names: no warning
        abstract_init_matches(row.make(), row.params())


#: public names of optax_ext that are not transforms: constants, tree helpers, the
#: matrix functions (tested in their own files) and the noise-scale readers
NOT_TRANSFORMS = {
    "EMBEDDING", "MUON_RULES", "NORM_AND_BIAS", "NORM_SCALE", "current_noise_scale",
    "ema_params", "mclip", "msign", "muon_labels", "noise_log_record", "noise_scale",
    "owner_compute", "path_labels", "path_mask", "path_multipliers", "spectral_norm",
    "spectral_stats", "tree_bytes", "tree_paths",
}  # fmt: skip


def test_every_public_transform_has_a_row():
    """A new transform in ``optax_ext.__all__`` fails here until the table has a row
    whose id is its name (or starts with its name and a dash)."""
    transforms = set(ox.__all__) - NOT_TRANSFORMS
    assert NOT_TRANSFORMS <= set(ox.__all__), NOT_TRANSFORMS - set(ox.__all__)
    missing = {n for n in transforms if not any(i == n or i.startswith(n + "-") for i in IDS)}
    assert not missing, f"no device-path row for {sorted(missing)}"

"""The noise-driven batch plan (scaling.noise_plan), and both plans driving
``set_accumulation_steps`` in a Flax training loop compiled once.

The table's expected values are worked out by hand from the rule in scaling/batch_plan.py:
k = clip(ceil(fraction * (B - z s) / b), k_prev, k_max), lr = base(floor(t)) * sqrt(k).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import jit_once

import optax_ext as ox
import scaling
from optax_ext.training import TrainState, split_value_and_grad

# (t, b_simple, stderr) -> (k, lr) with b = 32, k_max = 8, base lr 1e-3 halved every 100
# steps, fraction 1, confidence 1.
TABLE = [
    (0, None, 1, 1e-3),  # nothing measured: the micro-batch
    (10, (math.nan, 1.0), 1, 1e-3),  # not measurable: keep
    (20, (40.0, 30.0), 1, 1e-3),  # 40 - 30 = 10 <= 32: one micro-batch
    (30, (100.0, 10.0), 3, 1e-3 * math.sqrt(3)),  # ceil(90 / 32) = 3
    (40, (60.0, 5.0), 3, 1e-3 * math.sqrt(3)),  # ceil(55 / 32) = 2 < 3: never shrinks
    (150, (200.0, 100.0), 4, 5e-4 * 2),  # ceil(100 / 32) = 4; the base lr halved at 100
    (210, (500.0, 10.0), 8, 2.5e-4 * math.sqrt(8)),  # ceil(490 / 32) = 16: capped at 8
    (250, (10.0, 1.0), 8, 2.5e-4 * math.sqrt(8)),
]


def step_halving(n):
    return 1e-3 / 2 ** (n // 100)


def test_noise_plan_table():
    plan = scaling.noise_plan(step_halving, 32, max_accumulation_steps=8, fraction=1.0)
    for t, noise, k, lr in TABLE:
        point = plan(t, noise)
        assert point.accumulation_steps == k and point.batch == 32 * k, (t, point)
        assert point.lr == pytest.approx(lr, rel=1e-15), (t, point)
    assert plan.history == [(30.0, 3), (150.0, 4), (210.0, 8)]


def test_noise_plan_options():
    # confidence 0: the estimate itself; fraction 0.5: half of it; linear: lr x k
    plan = scaling.noise_plan(lambda n: 0.1, 10, max_accumulation_steps=100, confidence=0.0,
                              fraction=0.5, lr_scaling="linear")  # fmt: skip
    assert plan(0, (95.0, 50.0)) == (pytest.approx(0.5), 50, 5)  # ceil(0.5 * 95 / 10) = 5
    flat = scaling.noise_plan(lambda n: 0.1, 10, max_accumulation_steps=4, lr_scaling="none")
    assert flat(0, (1e3, 0.0)) == (0.1, 40, 4)
    # a SettledNoiseScale (what ox.current_noise_scale returns) is read the same way
    now = scaling.current_b_simple([1.0] * 20, [50.0, 70.0] * 10, window=10)
    est = scaling.noise_plan(lambda n: 0.1, 8, max_accumulation_steps=64, fraction=1.0)(0, now)
    assert est.accumulation_steps == math.ceil((now.b_simple - now.stderr) / 8)
    # the default: a tenth of B_simple
    assert scaling.noise_plan(lambda n: 0.1, 8, max_accumulation_steps=64)(0, (500.0, 0.0)) == (
        pytest.approx(0.1 * math.sqrt(7)),
        56,
        7,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr_schedule": 0.1}, "lr_schedule must be callable"),
        ({"micro_batch_size": 0}, r"micro_batch_size must be an int >= 1, got 0"),
        ({"micro_batch_size": 8.0}, r"micro_batch_size must be an int >= 1, got 8.0"),
        ({"max_accumulation_steps": 0}, r"max_accumulation_steps must be an int >= 1"),
        ({"fraction": 0.0}, r"fraction must be in \(0, inf\), got 0.0"),
        ({"confidence": -1.0}, r"confidence must be in \[0, inf\), got -1.0"),
        ({"lr_scaling": "cubic"}, r"lr_scaling must be one of \['sqrt', 'linear', 'none'\]"),
        ({"lr_schedule": lambda n: -1.0}, r"finite values >= 0, got -1.0 at step 0"),
        ({"lr_schedule": lambda: 0.1}, r"lr_schedule\(0\) raised TypeError"),
    ],
)
def test_noise_plan_validation(kwargs, match):
    args = {"lr_schedule": step_halving, "micro_batch_size": 32, "max_accumulation_steps": 8}
    args |= kwargs
    with pytest.raises(ValueError, match=match):
        scaling.noise_plan(args.pop("lr_schedule"), args.pop("micro_batch_size"), **args)
    plan = scaling.noise_plan(step_halving, 32, max_accumulation_steps=8)
    with pytest.raises(ValueError, match=r"t must be in \[0, inf\)"):
        plan(-1.0)


# ------------------------------------------------------------ a Flax training loop

MICRO, WINDOW = 8, 6


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))


MODEL = MLP()
TEACHER = np.random.default_rng(0).standard_normal((4, 1))


def loss_fn(params, apply_fn, batch):
    x, y = batch
    return jnp.mean((apply_fn({"params": params}, x) - y) ** 2)


def micro_batch(index):
    rng = np.random.default_rng(1000 + index)  # the same data stream for every plan
    x = rng.standard_normal((MICRO, 4)).astype(np.float32)
    y = (x @ TEACHER + 0.5 * rng.standard_normal((MICRO, 1))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


# the learning rate is a hyperparameter the host sets each update; the noise is measured
# per micro-batch (its halves against it), before the accumulation. One optimizer object:
# a TrainState keeps it as static data, so a new one would be a new program.
TX = optax.chain(
    ox.measure_noise_scale(MICRO // 2, window=WINDOW),
    ox.accumulate_gradients(optax.inject_hyperparams(optax.adam)(learning_rate=0.0), 1),
)


def new_state():
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    return TrainState.create(apply_fn=MODEL.apply, params=params, tx=TX)


GRAD_FN = split_value_and_grad(loss_fn, 2)


def _train_step(state, batch, k, lr):
    opt_state = optax.tree_utils.tree_set(state.opt_state, learning_rate=lr)
    loss, grads, extra = GRAD_FN(state.params, state.apply_fn, batch)
    state = state.replace(opt_state=opt_state)
    return state.apply_gradients(grads=grads, extra_args=extra | {"set_accumulation_steps": k})


#: one compile for every plan and batch size: a second trace raises (chex.assert_max_traces)
train_step = jit_once(_train_step)


def drive(choose, total):
    """The loop a user writes: at each update's start the plan picks (lr, k); the last
    update takes only the micro-batches left. Returns the state and (lr, k) per update."""
    state, used, seen = new_state(), [], 0
    while seen < total:
        lr, k = choose(seen, state)
        k = min(k, total - seen)
        for i in range(k):
            state = train_step(state, micro_batch(seen), jnp.int32(k), jnp.float32(lr))
            if i == 0:  # the cycle just started has the length asked for
                assert int(state.opt_state[1].cycle_length) == k
            seen += 1
        used.append((lr, k))
    return state, used


def test_seesaw_and_the_noise_plan_drive_one_compiled_flax_step():
    total = 96  # micro-batches: the same examples for every plan
    base = optax.cosine_decay_schedule(3e-3, total)

    seesaw = scaling.seesaw(base, MICRO, max_batch_size=4 * MICRO)
    state, used = drive(lambda e, s: (seesaw(e).lr, seesaw(e).batch // MICRO), total)
    assert len(used) == scaling.seesaw_updates(seesaw, total).updates
    assert [k for _, k in used] == sorted(k for _, k in used) and used[-1][1] > 1
    assert int(state.opt_state[1].gradient_step) == len(used)
    np.testing.assert_allclose(
        state.opt_state[1].inner_state.hyperparams["learning_rate"], used[-1][0], rtol=1e-6
    )

    plan = scaling.noise_plan(base, MICRO, max_accumulation_steps=4, fraction=1.0)

    def noise_driven(seen, s):
        now = ox.current_noise_scale(s.opt_state) if seen else None
        point = plan(seen, now)
        return point.lr, point.accumulation_steps

    state, used = drive(noise_driven, total)
    ks = [k for _, k in used[:-1]]
    assert ks == sorted(ks) and max(ks) > 1 and max(ks) <= 4, ks  # grows, capped
    assert int(state.opt_state[1].gradient_step) == len(used) < total
    assert [k for _, k in plan.history] == sorted(set(ks) - {1})

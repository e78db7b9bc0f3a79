"""Seesaw (Meterez et al. 2025, arXiv 2510.14717): a batch ramp in place of an lr decay.

Expected values are worked out by hand from the rule in scaling/batch_ramp.py: the level k
starts at the first base step where the lr is at or below (running peak) / f^k; the batch
is min(max, B0 f^k); below the cap the lr is the running peak over f^(k/2) (each time the
base lr has fallen by another f, the lr falls by sqrt f instead), at the cap the base lr
times sqrt(max / B0).
"""

import doctest
import math

import numpy as np
import pytest

import scaling
from scaling import batch_ramp

R2 = math.sqrt(2.0)


def step_halving(n):
    """1 for n < 100, then halved every 100 steps."""
    return 1.0 / 2 ** (n // 100)


def cosine91(n):
    """Cosine from 1 to 0 over 91 steps (odd, so no switch lands on a rounding tie)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(n, 91) / 91))


# (t, lr, batch) for step_halving, B0 = 32, max 256, factor 2.
STEP_TABLE = [
    (0, 1.0, 32),
    (99, 1.0, 32),
    (99.9, 1.0, 32),  # floored to base step 99
    (100, 1 / R2, 64),  # lr/2 -> lr/sqrt2, batch x2
    (199, 1 / R2, 64),
    (200, 0.5, 128),
    (299, 0.5, 128),
    (300, 0.125 * math.sqrt(8), 256),  # 0.35355...: the cap
    (399, 0.125 * math.sqrt(8), 256),
    (400, 0.0625 * math.sqrt(8), 256),  # past the cap the base decay goes on, x sqrt(8)
    (1000, 2.0**-10 * math.sqrt(8), 256),
]


@pytest.mark.parametrize("t, lr, batch", STEP_TABLE)
def test_step_schedule_table(t, lr, batch):
    plan = scaling.seesaw(step_halving, 32, max_batch_size=256)
    got = plan(t)
    assert got.batch == batch and isinstance(got.batch, int)
    assert got.lr == pytest.approx(lr, rel=1e-15)


def test_step_schedule_literal_values_and_switch_steps():
    plan = scaling.seesaw(step_halving, 32, max_batch_size=256)
    assert [round(plan(t).lr, 12) for t in (0, 100, 200, 300, 400)] == [
        1.0,
        0.707106781187,
        0.5,
        0.353553390593,
        0.176776695297,
    ]
    assert plan.batches == (32, 64, 128, 256)
    assert plan.switch_steps == (100, 200, 300)


def test_step_schedule_updates():
    plan = scaling.seesaw(step_halving, 32, max_batch_size=256)
    # 100 updates of 32, 50 of 64, 25 of 128, then (500 - 300) / 8 = 25 of 256
    assert scaling.seesaw_updates(plan, 500) == (200, 500, 16000, 256)
    # one more base step: one more, partial, update of 32 examples
    assert scaling.seesaw_updates(plan, 501) == (201, 501, 16032, 32)
    # before the first switch nothing changes
    assert scaling.seesaw_updates(plan, 100).updates == 100


# cosine91: 1/2 is crossed at t = 45.5, 1/4 at t = 60.67, 1/8 at t = 91 * 0.76995 = 70.07.
# Below the cap (256 = 32 x 2^3) the lr holds at 1 / sqrt(2)^k between the cuts, where the
# cosine itself keeps falling; at the cap the cosine goes on, times sqrt(8).
COSINE_TABLE = [
    (0, 1.0, 32),
    (45, 1.0, 32),  # the cosine is at 0.5086 > 1/2: no cut yet, the lr holds at the peak
    (46, 1 / R2, 64),  # 0.4914 <= 1/2: batch x2, lr / sqrt(2)
    (60, 1 / R2, 64),  # 0.2600 > 1/4
    (61, 0.5, 128),  # 0.2450 <= 1/4
    (70, 0.5, 128),  # 0.12575 > 1/8
    (71, cosine91(71) * math.sqrt(8), 256),  # the cap: 0.114523 x 2.828 = 0.3239 < 0.5
    (85, cosine91(85) * math.sqrt(8), 256),
    (91, 0.0, 256),
]


@pytest.mark.parametrize("t, lr, batch", COSINE_TABLE)
def test_cosine_schedule_table(t, lr, batch):
    plan = scaling.seesaw(cosine91, 32, max_batch_size=256)
    got = plan(t)
    assert got.batch == batch
    assert got.lr == pytest.approx(lr, rel=1e-14, abs=1e-300)


def test_each_cut_lowers_the_lr_by_sqrt_f_and_never_raises_it():
    # what the old rule (lr = base x sqrt(B / B0) everywhere) broke: with a smooth base the
    # lr rose by sqrt(f) at each cut; here it falls by sqrt(f) there and holds in between
    plan = scaling.seesaw(cosine91, 32, max_batch_size=256)
    lrs = [plan(t).lr for t in range(92)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    for cut, k in zip(plan.switch_steps[:2], (1, 2), strict=True):
        assert lrs[cut] == pytest.approx(lrs[cut - 1] / R2, rel=1e-15)
        assert plan(cut).batch == 2 * plan(cut - 1).batch == 32 * 2**k


def test_cosine_reference_values_and_updates():
    # independent closed forms of the base lr at the steps next to each switch
    assert cosine91(45) == pytest.approx(0.508630, abs=1e-6)
    assert cosine91(46) == pytest.approx(0.491370, abs=1e-6)
    assert cosine91(60) == pytest.approx(0.260031, abs=1e-6)
    assert cosine91(61) == pytest.approx(0.245034, abs=1e-6)
    assert cosine91(70) == pytest.approx(0.125745, abs=1e-6)
    assert cosine91(71) == pytest.approx(0.114523, abs=1e-6)
    plan = scaling.seesaw(cosine91, 32, max_batch_size=256)
    # 46 updates of 32 (steps 0-45), 8 of 64 (46, 48, ..., 60), 3 of 128 (62, 66, 70),
    # 3 of 256 (74, 82, 90; the last takes the 32 examples left)
    assert scaling.seesaw_updates(plan, 91) == (60, 91, 2912, 32)
    assert plan.switch_steps == (46, 61, 71)


def test_warmup_is_not_a_decay():
    # a running peak: the warm-up's small lrs (0.1 <= 1/8 of the final peak) keep B0 and
    # are followed as they are; a peak taken over the whole schedule would start at the cap
    def warm(n):
        return n / 10 if n < 10 else step_halving(n - 10)

    plan = scaling.seesaw(warm, 32, max_batch_size=256)
    for t in range(10):
        assert plan(t) == (t / 10, 32)
    assert plan(10) == (1.0, 32)
    assert plan(109) == (1.0, 32)
    assert plan(110) == (pytest.approx(1 / R2, rel=1e-15), 64)


def test_batch_never_shrinks_and_the_lr_holds_between_cuts():
    # 1, then 0.4 (level 1: 0.8 <= 1 < 1.6), then back up to 0.9 (level 0 on its own): the
    # batch stays 64 and the lr stays at the peak / sqrt(2)
    def bumpy(n):
        return 1.0 if n < 10 else 0.4 if n < 20 else 0.9

    plan = scaling.seesaw(bumpy, 32, max_batch_size=256)
    assert plan(15) == (pytest.approx(1 / R2, rel=1e-15), 64)
    assert plan(25) == (pytest.approx(1 / R2, rel=1e-15), 64)


def test_rule_on_several_schedules():
    schedules = [
        step_halving,
        cosine91,
        lambda n: 3e-4 * math.exp(-n / 40),
        lambda n: 1e-3 * min(1.0, (n + 1) / 20) * 0.5 ** (n / 60),
    ]
    for base in schedules:
        plan = scaling.seesaw(base, 48, max_batch_size=700, factor=3.0)
        assert plan.batches == (48, 144, 432, 700)
        previous, peak = 0, 0.0
        for n in range(0, 400):
            peak = max(peak, base(n))
            if n % 7:
                continue
            lr, b = plan(n)
            assert b in plan.batches and b >= previous
            previous = b
            k = plan.batches.index(b)
            if b < 700:  # below the cap: the peak over sqrt(3)^k
                assert lr == pytest.approx(peak * 3.0 ** (-k / 2), rel=1e-14, abs=0.0)
                assert base(n) * 3.0 ** (k + 1) > peak  # the next cut has not come yet
            else:  # at it: the base schedule, scaled
                assert lr == pytest.approx(base(n) * math.sqrt(700 / 48), rel=1e-14, abs=0.0)


def test_cap_between_powers_and_non_integer_factor():
    plan = scaling.seesaw(step_halving, 32, max_batch_size=100)
    assert plan.batches == (32, 64, 100)  # 128 clipped to the cap
    assert plan(200) == (pytest.approx(0.25 * math.sqrt(100 / 32), rel=1e-15), 100)
    assert plan(300) == (pytest.approx(0.125 * math.sqrt(100 / 32), rel=1e-15), 100)
    half = scaling.seesaw(step_halving, 32, max_batch_size=300, factor=1.5)
    assert half.batches == (32, 48, 72, 108, 162, 243, 300)
    # 0.5 * 1.5 = 0.75 <= 1 but 0.5 * 1.5^2 = 1.125 > 1: level 1, lr 1 / sqrt(1.5)
    assert half(100) == (pytest.approx(0.816496580927726, rel=1e-15), 48)
    # 0.25 * 1.5^3 = 0.84 <= 1, * 1.5^4 = 1.27 > 1: level 3, lr 1.5^(-3/2)
    assert half(200) == (pytest.approx(0.5443310539518174, rel=1e-15), 108)


def test_no_ramp_when_cap_is_the_batch_and_zero_lr_goes_to_the_cap():
    flat = scaling.seesaw(step_halving, 32, max_batch_size=32)
    assert flat(250) == (0.25, 32)
    assert scaling.seesaw_updates(flat, 300).updates == 300
    stop = scaling.seesaw(lambda n: 1.0 if n < 5 else 0.0, 32, max_batch_size=256)
    assert stop(4) == (1.0, 32)
    assert stop(5) == (0.0, 256)
    zero = scaling.seesaw(lambda n: 0.0, 32, max_batch_size=256)  # no peak yet: level 0
    assert zero(50) == (0.0, 32)


def test_numpy_scalar_schedules_and_steps():
    plan = scaling.seesaw(lambda n: np.float32(0.5) ** (n // 100), 32, max_batch_size=64)
    assert plan(np.int64(150)) == (pytest.approx(0.5 * R2, rel=1e-7), 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, r"batch_size must be an int in \[1, .*got 0"),
        ({"batch_size": 32.0}, r"batch_size must be an int .*got 32\.0"),
        ({"batch_size": True}, r"batch_size must be an int .*got True"),
        ({"batch_size": "32"}, r"batch_size must be an int .*got '32'"),
        ({"max_batch_size": 16}, r"max_batch_size must be an int in \[32, .*got 16"),
        ({"max_batch_size": 2**60}, r"max_batch_size must be an int in \[32, 9007199254740992\]"),
        ({"max_batch_size": 256.0}, r"max_batch_size must be an int .*got 256\.0"),
        ({"factor": 1.0}, r"factor must be in \(1, inf\), got 1\.0"),
        ({"factor": 0.5}, r"factor must be in \(1, inf\), got 0\.5"),
        ({"factor": float("nan")}, r"factor must be in \(1, inf\), got nan"),
        ({"factor": float("inf")}, r"factor must be in \(1, inf\), got inf"),
        ({"factor": True}, r"factor must be a real number in \(1, inf\), got True"),
        ({"factor": "2"}, r"factor must be a real number, got '2'"),
        ({"factor": 1.01}, r"factor=1\.01 does not grow batch_size=32"),
        ({"lr_schedule": 0.1}, r"lr_schedule must be callable.*got 0\.1"),
        (
            {"lr_schedule": lambda n: float("nan")},
            r"finite values in \[0, inf\), got nan at step 0",
        ),
        ({"lr_schedule": lambda n: -1e-3}, r"finite values in \[0, inf\), got -0\.001 at step 0"),
        ({"lr_schedule": lambda n: math.inf}, r"finite values in \[0, inf\), got inf at step 0"),
        ({"lr_schedule": lambda n: "0.1"}, r"lr_schedule must return one real number, got '0\.1'"),
        ({"lr_schedule": lambda n: np.ones(2)}, r"lr_schedule must return one real number"),
        ({"lr_schedule": lambda: 0.1}, r"lr_schedule\(0\) raised TypeError"),
    ],
)
def test_validation(kwargs, match):
    args = {"lr_schedule": step_halving, "batch_size": 32, "max_batch_size": 256, "factor": 2.0}
    args.update(kwargs)
    lr = args.pop("lr_schedule")
    batch = args.pop("batch_size")
    with pytest.raises(ValueError, match=match):
        scaling.seesaw(lr, batch, **args)


def test_bad_lr_later_and_bad_steps_raise():
    plan = scaling.seesaw(lambda n: 1.0 if n < 50 else float("nan"), 32, max_batch_size=256)
    assert plan(49) == (1.0, 32)
    with pytest.raises(ValueError, match=r"got nan at step 50"):
        plan(50)
    good = scaling.seesaw(step_halving, 32, max_batch_size=256)
    for t, shown in ((-1, "-1"), (float("nan"), "nan"), (float("inf"), "inf")):
        with pytest.raises(ValueError, match=rf"t must be in \[0, inf\).*got {shown}"):
            good(t)
    with pytest.raises(ValueError, match=r"t must be a real number, got '3'"):
        good("3")
    with pytest.raises(ValueError, match=r"base_updates must be an int in \[1, "):
        scaling.seesaw_updates(good, 0)
    with pytest.raises(ValueError, match=r"plan must be a Seesaw"):
        scaling.seesaw_updates(step_halving, 10)


def test_docstring_examples():
    result = doctest.testmod(batch_ramp, raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_exported():
    for name in ("seesaw", "seesaw_updates", "Seesaw", "SeesawPoint", "SeesawUpdates"):
        assert name in scaling.__all__ and getattr(scaling, name) is getattr(batch_ramp, name)

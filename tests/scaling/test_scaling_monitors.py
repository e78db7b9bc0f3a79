"""The weight-RMS prediction (Su 11404) against a simulation, and power-law fitting on
synthetic power laws."""

import math

import numpy as np
import pytest

from scaling import laws
from scaling import weight_decay as wd


def _simulate(init_rms, lrs, decays, update_rms, n=20_000, seed=0):
    """theta <- (1 - lr wd) theta - lr u, u = update_rms * random signs (float64)."""
    rng = np.random.default_rng(seed)
    theta = init_rms * rng.standard_normal(n)
    out = []
    for eta, lam in zip(lrs, decays, strict=True):
        theta = (1 - eta * lam) * theta - eta * update_rms * rng.choice([-1.0, 1.0], n)
        out.append(np.sqrt(np.mean(theta**2)))
    return np.array(out)


def _schedule(name, steps=3000):
    t = np.arange(steps)
    if name == "constant":
        return np.full(steps, 2e-3), np.full(steps, 0.5)
    if name == "cosine":
        return 2e-3 * 0.5 * (1 + np.cos(np.pi * t / steps)), np.full(steps, 0.5)
    return 2e-3 * np.minimum(1, (t + 1) / 300), np.where(t < 2000, 0.5, 0.0)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "decay_switched_off"])
def test_prediction_matches_the_simulation(schedule):
    lrs, decays = _schedule(schedule)
    sim = _simulate(0.05, lrs, decays, update_rms=0.3)
    pred = wd.weight_rms_prediction(0.05, lrs, decays, update_rms=0.3)
    # 20000 elements: the sampled RMS is within ~1% of its expectation
    np.testing.assert_allclose(pred[99::100], sim[99::100], rtol=0.02)


@pytest.mark.parametrize(
    "schedule, worst", [("constant", 3e-4), ("cosine", 0.08), ("decay_switched_off", 0.26)]
)
def test_su_closed_form_accuracy_is_as_documented(schedule, worst):
    lrs, decays = _schedule(schedule)
    exact = wd.weight_rms_prediction(0.05, lrs, decays, update_rms=0.3)
    su = wd.weight_rms_prediction(0.05, lrs, decays, update_rms=0.3, form="su")
    err = np.max(np.abs(su / exact - 1))
    assert worst / 2 < err <= worst if worst > 1e-3 else err <= worst


def test_prediction_limits():
    # no decay: a random walk, RMS^2 = RMS_0^2 + u^2 sum(eta^2)
    pred = wd.weight_rms_prediction(0.1, [1e-2] * 50, 0.0, update_rms=2.0)
    assert pred[-1] == pytest.approx(math.sqrt(0.01 + 4 * 50 * 1e-4), rel=1e-12)
    # constant lr and decay: the fixed point of the recursion, u sqrt(eta/(lambda(2 - eta
    # lambda))), which is sqrt(eta/(2 lambda)) u up to the discrete step's eta lambda/4
    pred = wd.weight_rms_prediction(1.0, [1e-3] * 100_000, 1.0, update_rms=0.2)
    assert pred[-1] == pytest.approx(0.2 * math.sqrt(1e-3 / (2 - 1e-3)), rel=1e-9)
    assert pred[-1] == pytest.approx(0.2 * wd.equilibrium_weight_rms(1e-3, 1.0), rel=3e-4)
    su = wd.weight_rms_prediction(1.0, [1e-3] * 100_000, 1.0, update_rms=0.2, form="su")
    assert su[-1] == pytest.approx(0.2 * wd.equilibrium_weight_rms(1e-3, 1.0), rel=1e-9)
    # per-step decays (a schedule) broadcast like the lrs
    a = wd.weight_rms_prediction(0.1, [1e-3] * 10, [0.1] * 10)
    b = wd.weight_rms_prediction(0.1, [1e-3] * 10, 0.1)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wd.weight_rms_prediction(-1, [1e-3], 0.1), "init_rms must be in"),
        (lambda: wd.weight_rms_prediction(0.1, [], 0.1), "non-empty 1-D"),
        (lambda: wd.weight_rms_prediction(0.1, [1e-3, -1], 0.1), "lrs must be in"),
        (lambda: wd.weight_rms_prediction(0.1, [1e-3, 1e-3], [0.1, math.nan]), "weight_decays"),
        (lambda: wd.weight_rms_prediction(0.1, [1e-3] * 3, [0.1] * 2), "one per step"),
    ],
)
def test_prediction_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_power_law_recovers_exact_and_noisy_laws():
    d = np.geomspace(1e9, 1e12, 7)
    exact = laws.fit_power_law(d, 0.58 * d**0.571)
    assert (exact.coefficient, exact.exponent) == pytest.approx((0.58, 0.571), rel=1e-9)
    assert exact.rms_log_residual < 1e-9 and exact.count == 7
    # B_crit ~ D^0.47 with 10% log-normal scatter, 12 runs: the exponent within 2 s.e.
    rng = np.random.default_rng(0)
    hits, rms = 0, []
    for _ in range(50):
        d = np.geomspace(1e8, 1e11, 12)
        y = 3.2 * d**0.47 * np.exp(0.1 * rng.standard_normal(d.size))
        f = laws.fit_power_law(d, y)
        hits += abs(f.exponent - 0.47) <= 2 * f.exponent_stderr
        rms.append(f.rms_log_residual)
    assert hits >= 44  # ~95% of 50
    # E[rms residual^2] = 0.1^2 (n - 2)/n for a 2-parameter least-squares fit
    assert np.sqrt(np.mean(np.square(rms))) == pytest.approx(0.1 * np.sqrt(10 / 12), rel=0.1)
    assert laws.power_law(1e10, exact.coefficient, exact.exponent) == pytest.approx(
        0.58 * 1e10**0.571, rel=1e-9
    )


def test_power_law_bad_input():
    with pytest.raises(ValueError, match="at least 2 points"):
        laws.fit_power_law([1.0], [2.0])
    with pytest.raises(ValueError, match="y must be finite and > 0"):
        laws.fit_power_law([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="two distinct values"):
        laws.fit_power_law([3.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same length"):
        laws.fit_power_law([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="the power law is inf"):
        laws.power_law(1e300, 1.0, 2.0)
    assert laws.fit_power_law([1.0, 2.0], [1.0, 2.0]).exponent_stderr == math.inf

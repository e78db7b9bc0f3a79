"""The steps-vs-examples law (McCandlish et al. 2018, arXiv 1812.06162) and the published
laws of DeepSeek LLM (arXiv 2401.02954), Step Law (arXiv 2503.04715) and Kaplan et al. 2020."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling import laws, tradeoff

close = lambda a, b, rtol=1e-5: np.testing.assert_allclose(a, b, rtol=rtol)
FAST = settings(max_examples=60, deadline=None)


def test_tradeoff_worked():
    for batch, steps, examples in ((10, 11000, 1.1e5), (100, 2000, 2e5), (1000, 1100, 1.1e6)):
        r = tradeoff.steps_and_examples(batch, 1000, 1e5)
        close(r.steps, steps)
        close(r.examples, examples)
        # the hyperbola (S/S_min - 1)(E/E_min - 1) = 1
        close((r.steps / 1000 - 1) * (r.examples / 1e5 - 1), 1.0, rtol=1e-12)


def test_fit_recovers_worked_parameters():
    f = tradeoff.fit_tradeoff([11000, 2000, 1100], [1.1e5, 2e5, 1.1e6])
    close([f.s_min, f.e_min, f.b_crit], [1000, 1e5, 100], rtol=1e-9)
    assert f.rms_residual < 1e-12


def test_fit_with_noise_is_close():
    rng = np.random.default_rng(0)
    batch = np.geomspace(8, 4096, 12)
    s = tradeoff.steps_needed(batch, 5000, 300) * np.exp(0.01 * rng.standard_normal(12))
    f = tradeoff.fit_tradeoff(s, s * batch)
    close([f.s_min, f.b_crit], [5000, 300], rtol=0.05)


@pytest.mark.parametrize(
    "steps, examples, match",
    [
        ([1000], [1e5], "at least 2"),
        ([], [], "at least 2"),
        ([1000, 2000], [1e5], "same length"),
        ([1000, 2000], [1e5, 1e5], "degenerate"),
        ([1000, -5], [1e5, 2e5], "steps must be finite and > 0"),
        ([1000, 2000], [1e5, 2e5], "do not follow the tradeoff law"),  # more steps AND examples
    ],
)
def test_fit_rejects_bad_data(steps, examples, match):
    with pytest.raises(ValueError, match=match):
        tradeoff.fit_tradeoff(steps, examples)


def test_adaptive_batch():
    close(tradeoff.adaptive_batch_size(1000, 10), 100.0)


@settings(max_examples=40, deadline=None)
@given(
    s_min=st.floats(1, 1e6),
    b_crit=st.floats(1e-2, 1e6),
    batches=st.lists(st.floats(1, 1e6), min_size=2, max_size=6, unique=True),
)
def test_fit_recovers_exact_data(s_min, b_crit, batches):
    b = np.asarray(batches)
    if np.ptp(1 / (s_min * (b + b_crit))) < 1e-6 * np.max(1 / (s_min * (b + b_crit))):
        return  # batches too close together in 1/E to identify a slope
    s = tradeoff.steps_needed(b, s_min, b_crit)
    f = tradeoff.fit_tradeoff(s, s * b)
    close([f.s_min, f.b_crit], [s_min, b_crit], rtol=1e-4)


@FAST
@given(b1=st.floats(1, 1e7), b2=st.floats(1, 1e7), b_crit=st.floats(1e-2, 1e6))
def test_steps_fall_and_examples_rise_with_batch(b1, b2, b_crit):
    lo, hi = sorted((b1, b2))
    assert tradeoff.steps_needed(hi, 1.0, b_crit) <= tradeoff.steps_needed(lo, 1.0, b_crit)
    assert tradeoff.examples_needed(hi, 1.0, b_crit) >= tradeoff.examples_needed(lo, 1.0, b_crit)


def test_laws_worked():
    r = laws.deepseek_law(1e17)
    close([r.lr, r.batch_tokens], [2.33817e-3, 1.06190e5])
    r = laws.deepseek_law(1e20)
    close([r.lr, r.batch_tokens], [9.85998e-4, 1.01714e6])
    r = laws.step_law(1e9, 1e11)
    close([r.lr, r.batch_tokens], [1.63250e-3, 1.10771e6])
    close(laws.kaplan_critical_batch(3.0), 1.0691e6, rtol=5e-5)  # 5 digits given


def test_laws_reject_bad_input():
    with pytest.raises(ValueError, match=r"compute must be in \(0, inf\)"):
        laws.deepseek_law(0)
    with pytest.raises(ValueError, match="loss"):
        laws.kaplan_critical_batch(-1.0)
    with pytest.raises(ValueError, match="n_tokens"):
        laws.step_law(1e9, float("inf"))


# ------------------------------------------------ batch-size warm-up from the noise scale

warm = tradeoff.warmup_accumulation_steps


def test_warmup_targets_the_noise_scale_in_micro_batches():
    assert warm(300.0, 64, 16) == 5  # ceil(300 / 64)
    assert warm(256.0, 64, 16) == 4  # exactly 4 micro-batches
    assert warm(600.0, 64, 16, fraction=0.5) == 5
    assert warm(10.0, 64, 16) == 1
    assert warm(1e6, 64, 16) == 16 and warm(float("inf"), 64, 16) == 16


def test_warmup_takes_numpy_scalars_and_boolean_flags():
    assert warm(np.float32(300.0), np.int64(64), 16, settled=np.bool_(True)) == 5
    assert warm(np.array(300.0), 64, 16, settled=np.array(True)) == 5  # 0-d, as JAX gives
    assert warm(np.array(300.0), 64, 16, previous=2, settled=np.array(False)) == 2


def test_warmup_never_shrinks_and_waits_for_a_settled_estimate():
    assert warm(100.0, 64, 16, previous=5) == 5
    assert warm(1000.0, 64, 16, previous=5, settled=False) == 5
    assert warm(float("nan"), 64, 16, previous=3) == 3
    assert warm(0.0, 64, 16, previous=3) == 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e6) | st.just(float("nan")), min_size=1, max_size=30),
    st.integers(1, 512),
    st.integers(1, 64),
)
def test_warmup_is_monotone_and_bounded(estimates, micro, k_max):
    k = 1
    for b in estimates:
        new = warm(b, micro, k_max, previous=k)
        assert k <= new <= k_max
        if b == b and b > 0 and new < k_max:  # a finite estimate below the cap
            assert new >= math.ceil(b / micro) or new == k
        k = new


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(b_simple=-1.0), r"b_simple must be >= 0 or nan"),
        (dict(micro_batch_size=0), r"micro_batch_size must be in \(0, inf\)"),
        (dict(max_accumulation_steps=0), r"max_accumulation_steps must be an int >= 1"),
        (dict(max_accumulation_steps=2.5), r"max_accumulation_steps must be an int >= 1"),
        (dict(previous=0), r"previous must be an int >= 1"),
        (dict(previous=32), r"previous must be at most max_accumulation_steps=16"),
        (dict(fraction=float("inf")), r"fraction must be in \(0, inf\)"),
        # a string, None or an array used to keep `previous` or fail inside NumPy, and
        # a non-empty string counted as settled
        (dict(b_simple="300"), r"b_simple must be a real number, got '300'"),
        (dict(b_simple=None), r"b_simple must be a real number, got None"),
        (dict(b_simple=True), r"b_simple must be a real number, got True"),
        (dict(b_simple=np.array([300.0, 400.0])), r"b_simple must be a single number.*\(2,\)"),
        (dict(settled="no"), r"settled must be a bool \(True or False\), got 'no'"),
        (dict(settled=None), r"settled must be a bool"),
        (dict(settled=np.array([True, False])), r"settled must be a bool"),
        (dict(micro_batch_size=np.array([64, 32])), r"micro_batch_size must be a single number"),
        (dict(fraction="1"), r"fraction must be a real number"),
    ],
)
def test_warmup_bad_arguments(kwargs, match):
    args = dict(b_simple=100.0, micro_batch_size=64, max_accumulation_steps=16) | kwargs
    with pytest.raises(ValueError, match=match):
        warm(**args)

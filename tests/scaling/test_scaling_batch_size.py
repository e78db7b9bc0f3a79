"""Learning-rate rules (McCandlish et al. 2018, arXiv 1812.06162; Su, kexue.fm/archives/10542,
11280, 11301): worked numbers computed by hand, properties, errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling import batch_size as bs

RTOL = 1e-5
close = lambda a, b, rtol=RTOL: np.testing.assert_allclose(a, b, rtol=rtol)

batches = st.floats(1.0, 1e7, allow_nan=False)
noise_scales = st.floats(1e-3, 1e7, allow_nan=False)
lrs = st.floats(1e-6, 10.0, allow_nan=False)
betas = st.floats(0.0, 0.999)
FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------ worked numbers


def test_simple_rules_worked():
    close(bs.sqrt_rule(5e-4, 128, 1024), 1.41421e-3)
    close(bs.linear_rule(0.1, 256, 8192), 3.2)


def test_sgd_worked():
    for batch, want in ((100, 0.0090909), (1000, 0.05), (10000, 0.090909)):
        r = bs.sgd_optimal_lr(batch, 0.1, 1000)
        close(r.lr, want)
        assert r.peak_batch is None and r.has_peak is False


def test_sgd_from_matrices_worked():
    s = bs.sgd_noise_stats([1, 2], np.diag([1, 4]), np.diag([4, 1]))
    close(s.lr_max, 0.294118)
    close(s.b_noise, 0.470588)
    close(s.b_simple, 1.0)
    close(s.loss_decrease_max, 0.735294)
    close(bs.sgd_optimal_lr(8, s.lr_max, s.b_noise).lr, 0.277778)


def test_sgd_momentum_factor_shrinks_noise_term():
    # SGDM at B equals plain SGD at B * (1+b1)/(1-b1).
    b1 = 0.9
    close(
        bs.sgd_optimal_lr(100, 0.1, 1000, beta1=b1).lr,
        bs.sgd_optimal_lr(100 * 1.9 / 0.1, 0.1, 1000).lr,
        rtol=1e-12,
    )
    close(bs.momentum_factor(0.9), 0.1 / 1.9, rtol=1e-12)


def test_sign_su_form_worked():
    c = math.pi / 2
    close(bs.sign_peak_batch(1000, 0.5, c), 523.599)
    for batch, want in ((100, 0.78956), (1000, 0.97606), (1e4, 0.83433)):
        r = bs.sign_optimal_lr(batch, 1000, beta_noise=0.5, c=c)
        close(r.lr, want)
        assert r.has_peak and math.isclose(r.peak_batch, 523.599, rel_tol=RTOL)
    # at the peak the lr is exactly lr_max
    close(bs.sign_optimal_lr(bs.sign_peak_batch(1000, 0.5), 1000, 0.5, lr_max=2e-4).lr, 2e-4)


def test_sign_mean_field_worked():
    g = [1.0, 1.0, 1.0]
    h = 0.25 * np.eye(3) + 0.75 * np.ones((3, 3))
    r = bs.sign_optimal_lr_mean_field(200, g, h, 100)
    close(r.peak_batch, 200.0)
    close(r.lr, 0.408248)
    assert r.has_peak
    for batch, want in ((50, 0.384900), (800, 0.404061), (1e6, 0.400004)):
        close(bs.sign_optimal_lr_mean_field(batch, g, h, 100).lr, want)


def test_sign_mean_field_agrees_with_su_form_at_c1():
    rng = np.random.default_rng(0)
    g = rng.standard_normal(5)
    a = 0.1 * rng.standard_normal((5, 5))
    h = a @ a.T + 0.2 * np.eye(5) + 0.8 * np.outer(np.sign(g), np.sign(g))
    bn = bs.sign_beta_noise(g, h)
    assert bn < 1
    batches_ = np.array([3.0, 30.0, 300.0, 3000.0])
    mf = bs.sign_optimal_lr_mean_field(batches_, g, h, 50).lr
    su = bs.sign_optimal_lr(batches_, 50, bn, c=1.0).lr
    close(mf / mf.max(), su / su.max(), rtol=1e-10)  # same shape; peak value is lr_max


def test_sign_no_surge_without_positive_off_diagonal():
    g = [1.0, -1.0]
    h = np.array([[1.0, 0.5], [0.5, 1.0]])  # sign(g1 g2) H12 < 0
    assert bs.sign_beta_noise(g, h) == math.inf
    r = bs.sign_optimal_lr_mean_field(10, g, h, 100)
    assert r.peak_batch is None and not r.has_peak
    assert bs.sign_peak_batch(100, 1.0) is None


def test_li_form_worked():
    for batch, want in ((10, 1.9802e-4), (250, 8e-4), (1000, 1e-3), (4000, 8e-4)):
        r = bs.li_optimal_lr(batch, 1e-3, 1000)
        close(r.lr, want)
        assert r.has_peak and r.peak_batch == 1000


def test_adam_peak_worked():
    for beta1, ratio, beta in (
        (0.9, 0.0588235, 0.235702),
        (0.95, 0.0270270, 0.162221),
        (0.5, 1.0, 0.707107),
    ):
        p = bs.adam_peak(beta1, b_simple=1000)
        close(p.batch_ratio, ratio)
        close(p.beta, beta)
        close(p.peak_batch, 1000 * ratio)
        assert p.has_peak
    for beta1 in (0.0, 0.2, 1 / 3):
        p = bs.adam_peak(beta1, 1000)
        assert p == bs.AdamPeak(None, None, None, False)
        assert not bs.adam_optimal_lr(10, 1000, beta1).has_peak


def test_adam_curve_peaks_where_adam_peak_says():
    b_simple = 1000.0
    for beta1 in (0.5, 0.9, 0.95):
        grid = np.geomspace(1, 1e6, 20001)
        curve = bs.adam_optimal_lr(grid, b_simple, beta1).lr
        close(grid[np.argmax(curve)], bs.adam_peak(beta1, b_simple).peak_batch, rtol=2e-3)


def test_adam_sde_rule_worked_and_invalid():
    r = bs.adam_sde_rule(3e-4, 0.9, 0.999, 1e-8, kappa=4)
    close(list(r), [6e-4, 0.6, 0.996, 5e-9])
    with pytest.raises(ValueError, match=r"kappa\*\(1-beta1\) < 1.*kappa=10"):
        bs.adam_sde_rule(3e-4, 0.9, 0.999, 1e-8, kappa=10)
    with pytest.raises(ValueError, match="beta2"):
        bs.adam_sde_rule(3e-4, 0.9999, 0.999, 1e-8, kappa=1000)
    r = bs.adam_sde_rule(3e-4, 0.9, 0.999, 1e-8, kappa=0.25)  # shrinking the batch
    close(r.beta1, 0.975)


def test_beta2_half_life_worked():
    close(bs.beta2_by_half_life(0.999, 512, 64), 0.9998749)
    hl = bs.half_life_tokens(0.999, 512)
    close(bs.half_life_tokens(bs.beta2_by_half_life(0.999, 512, 64), 64), hl, rtol=1e-9)
    close(0.999 ** (hl / 512), 0.5, rtol=1e-12)


def test_adam_eps_weakens_noise_scale():
    close(bs.adam_eps_b_simple(100.0, 4.0, 1000, 0.0), 25.0)
    close(bs.adam_eps_b_simple(100.0, 4.0, 1000, 0.1), 100.0 / 14.0)


def test_array_batches():
    grid = np.array([100.0, 1000.0, 10000.0])
    close(bs.sgd_optimal_lr(grid, 0.1, 1000).lr, [0.0090909, 0.05, 0.090909])
    off_peak = 1e-3 / (0.5 * (10**0.5 + 10**-0.5))  # symmetric in log B around the peak
    close(bs.li_optimal_lr(grid, 1e-3, 1000).lr, [off_peak, 1e-3, off_peak])


# ---------------------------------------------------------------------- properties


@FAST
@given(lr=lrs, batch=batches, b_noise=noise_scales, beta1=betas)
def test_transfers_to_same_batch_are_identity(lr, batch, b_noise, beta1):
    close(bs.sgd_transfer(lr, batch, batch, b_noise, beta1).lr, lr, rtol=1e-12)
    close(bs.adam_transfer(lr, batch, batch, b_noise, beta1).lr, lr, rtol=1e-12)
    close(bs.sign_transfer(lr, batch, batch, b_noise, 0.5).lr, lr, rtol=1e-12)
    close(bs.sqrt_rule(lr, batch, batch), lr, rtol=1e-12)
    close(bs.linear_rule(lr, batch, batch), lr, rtol=1e-12)


@FAST
@given(
    lr=lrs,
    b1=batches,
    b2=batches,
    b_noise=noise_scales,
    beta1=betas,
    beta_noise=st.floats(0.05, 3.0),
)
def test_transfers_there_and_back_are_identity(lr, b1, b2, b_noise, beta1, beta_noise):
    there = bs.sgd_transfer(lr, b1, b2, b_noise, beta1).lr
    close(bs.sgd_transfer(there, b2, b1, b_noise, beta1).lr, lr, rtol=1e-10)
    there = bs.adam_transfer(lr, b1, b2, b_noise, beta1).lr
    close(bs.adam_transfer(there, b2, b1, b_noise, beta1).lr, lr, rtol=1e-10)
    there = bs.sign_transfer(lr, b1, b2, b_noise, beta_noise).lr
    close(bs.sign_transfer(there, b2, b1, b_noise, beta_noise).lr, lr, rtol=1e-10)
    close(bs.sqrt_rule(bs.sqrt_rule(lr, b1, b2), b2, b1), lr, rtol=1e-12)
    if b2 / b1 < 1e3:  # beyond, 0.99**(b2/b1) underflows towards 0 and the way back is lossy
        back = bs.beta2_by_half_life(bs.beta2_by_half_life(0.99, b1, b2), b2, b1)
        close(back, 0.99, rtol=1e-9)


@FAST
@given(b1=batches, b2=batches, b_noise=noise_scales, beta1=betas)
def test_sgd_lr_increases_with_batch(b1, b2, b_noise, beta1):
    lo, hi = sorted((b1, b2))
    assert (
        bs.sgd_optimal_lr(lo, 1.0, b_noise, beta1).lr
        <= bs.sgd_optimal_lr(hi, 1.0, b_noise, beta1).lr
    )
    assert bs.sgd_optimal_lr(hi, 1.0, b_noise, beta1).lr <= 1.0


@FAST
@given(b1=batches, b2=batches, b_simple=noise_scales, beta_noise=st.floats(0.05, 3.0))
def test_sign_lr_rises_before_and_falls_after_peak(b1, b2, b_simple, beta_noise):
    lo, hi = sorted((b1, b2))
    f = lambda b: bs.sign_optimal_lr(b, b_simple, beta_noise).lr
    peak = bs.sign_peak_batch(b_simple, beta_noise)
    if peak is None or hi <= peak:
        assert f(lo) <= f(hi) * (1 + 1e-12)
    elif lo >= peak:
        assert f(lo) * (1 + 1e-12) >= f(hi)
    assert f(lo) <= 1.0 + 1e-12  # never above lr_max


@FAST
@given(b1=batches, b2=batches, b_simple=noise_scales, beta1=betas)
def test_adam_lr_monotone_on_each_side_of_peak(b1, b2, b_simple, beta1):
    lo, hi = sorted((b1, b2))
    f = lambda b: bs.adam_optimal_lr(b, b_simple, beta1).lr
    peak = bs.adam_peak(beta1, b_simple).peak_batch
    if peak is None or hi <= peak:
        assert f(lo) <= f(hi) * (1 + 1e-12)
    elif lo >= peak:
        assert f(lo) * (1 + 1e-12) >= f(hi)


@FAST
@given(beta1=st.floats(0.34, 0.999))
def test_adam_threshold_increases_as_momentum_falls(beta1):
    # Less momentum (smaller beta1) moves the peak to larger batches.
    lower = max(beta1 - 0.005, 0.335)
    assert bs.adam_peak(lower).batch_ratio >= bs.adam_peak(beta1).batch_ratio


# ------------------------------------------------- Adam's epsilon as a SoftSign (10563)


def _softsign_problem(seed, n=6):
    rng = np.random.default_rng(seed)
    g = 0.1 * rng.standard_normal(n)
    a = 0.1 * rng.standard_normal((n, n))
    h = a @ a.T + 0.05 * np.eye(n) + 0.3 * np.outer(np.sign(g), np.sign(g))
    sigma = rng.uniform(0.1, 1.0, n)
    return g, h, sigma


def _softsign_lr_from_moments(batch, g, h, sigma, eps, c):
    """Su's model written out: E[phi] = nu*beta, E[phi phi^T] = nu nu^T beta^2 + (1-beta^2) I,
    and the quadratic model's best step E[phi]^T g / tr(E[phi phi^T] H)."""
    nu = np.array([gi / math.sqrt(gi * gi + eps * eps) for gi in g])
    kappa2 = sum(sigma) / (sum(gi * gi for gi in g) + len(g) * eps * eps)
    beta = (1.0 + c * kappa2 / batch) ** -0.5
    mean = nu * beta
    second = np.outer(nu, nu) * beta**2 + (1 - beta**2) * np.eye(len(g))
    return float(mean @ g) / float(np.trace(second @ h))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("c", [bs.SU_C, bs.MEAN_FIELD_C])
def test_softsign_curve_is_the_quadratic_optimum_of_su_moments(seed, eps, c):
    g, h, sigma = _softsign_problem(seed)
    curve = bs.softsign_curve(g, h, sigma, eps)
    for batch in (1.0, 7.0, 64.0, 1000.0, 1e5):
        want = _softsign_lr_from_moments(batch, g, h, sigma, eps, c)
        close(bs.softsign_optimal_lr(batch, curve, c).lr, want, rtol=1e-12)
    # a full covariance and its diagonal give the same curve
    assert bs.softsign_curve(g, h, np.diag(sigma), eps) == curve


def test_softsign_at_zero_eps_is_sign_descent_mean_field():
    g, h, sigma = _softsign_problem(3)
    curve = bs.softsign_curve(g, h, sigma, 0.0)
    b_simple = float(np.sum(sigma) / (g @ g))
    batches_ = np.array([2.0, 20.0, 200.0, 2e4])
    want = bs.sign_optimal_lr_mean_field(batches_, g, h, b_simple)
    got = bs.softsign_optimal_lr(batches_, curve, c=bs.MEAN_FIELD_C)
    close(got.lr, want.lr, rtol=1e-12)
    close(curve.beta_noise, bs.sign_beta_noise(g, h), rtol=1e-12)
    assert got.has_peak == want.has_peak
    if want.has_peak:
        close(got.peak_batch, want.peak_batch, rtol=1e-12)


def test_softsign_peak_is_the_curves_maximum():
    g, h, sigma = _softsign_problem(0)
    curve = bs.softsign_curve(g, h, sigma, 0.01)
    r = bs.softsign_optimal_lr(1.0, curve)
    assert r.has_peak
    grid = np.geomspace(r.peak_batch / 100, r.peak_batch * 100, 4001)
    lrs_ = bs.softsign_optimal_lr(grid, curve).lr
    close(grid[np.argmax(lrs_)], r.peak_batch, rtol=3e-3)  # the grid's spacing
    assert np.all(np.diff(lrs_[grid < r.peak_batch]) > 0)
    assert np.all(np.diff(lrs_[grid > r.peak_batch]) < 0)


def test_larger_eps_moves_the_surge_out_and_then_removes_it():
    g, h, sigma = _softsign_problem(0)
    peaks, gone_at = [], None
    for eps in np.geomspace(1e-4, 1.0, 40):
        r = bs.softsign_optimal_lr(1.0, bs.softsign_curve(g, h, sigma, eps))
        if not r.has_peak:
            gone_at = eps
            break
        peaks.append(r.peak_batch)
    assert len(peaks) > 5 and np.all(np.diff(peaks) > 0)
    assert gone_at is not None
    for eps in (gone_at, 2 * gone_at, 100.0):  # and it never comes back
        curve = bs.softsign_curve(g, h, sigma, eps)
        assert curve.beta_noise >= 1
        lrs_ = bs.softsign_optimal_lr(np.geomspace(1, 1e6, 50), curve).lr
        assert np.all(np.diff(lrs_) > 0)


def test_softsign_large_eps_tends_to_sgd():
    g, h, sigma = _softsign_problem(1)
    eps, c = 1e5, bs.SU_C
    curve = bs.softsign_curve(g, h, sigma, eps)
    sigma_bar = float(np.mean(sigma))
    for batch in (1.0, 10.0, 1000.0):
        sgd = float(g @ g) / (float(g @ h @ g) + c * sigma_bar * float(np.trace(h)) / batch)
        close(bs.softsign_optimal_lr(batch, curve, c).lr / eps, sgd, rtol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bs.softsign_curve([1.0, 2.0], np.eye(2), [1.0, 1.0], -1.0), "eps"),
        (lambda: bs.softsign_curve([1.0, 2.0], np.eye(2), [1.0, 1.0], math.inf), "eps"),
        (lambda: bs.softsign_curve([1.0, 2.0], np.eye(3), [1.0, 1.0], 0.1), "hessian"),
        (lambda: bs.softsign_curve([1.0, 2.0], np.eye(2), [1.0, -9.0], 0.1), "sigma"),
        (lambda: bs.softsign_curve([1.0, 2.0], np.zeros((2, 2)), [1.0, 1.0], 0.1), "trace"),
        (lambda: bs.softsign_optimal_lr(10.0, (1.0, 1.0, 1.0, 1.0, 1.0)), "SoftSignCurve"),
        (
            lambda: bs.softsign_optimal_lr(0.0, bs.softsign_curve([1.0], [[1.0]], [1.0], 0.1)),
            "batch",
        ),
    ],
)
def test_softsign_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _indefinite_hessian():
    """Eigenvalues -3.59, 2.09, 3.0 (trace 1.5 > 0) in a random basis."""
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
    return q @ np.diag([-3.59, 2.09, 3.0]) @ q.T


HESSIAN_USERS = {
    "softsign_curve": lambda g, h: bs.softsign_curve(g, h, np.ones(len(g)), 0.0),
    "sign_beta_noise": bs.sign_beta_noise,
    "sign_optimal_lr_mean_field": lambda g, h: bs.sign_optimal_lr_mean_field(10.0, g, h, 30.0).lr,
}


@pytest.mark.parametrize("name", sorted(HESSIAN_USERS))
def test_hessian_must_be_symmetric_and_positive_semi_definite(name):
    """An indefinite H with a positive trace gave a plausible lr (0.17 at B = 1) and an
    asymmetric one was used as given; both now raise, naming hessian."""
    call = HESSIAN_USERS[name]
    g = [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"hessian must be positive semi-definite.*-3\.59"):
        call(g, _indefinite_hessian())
    asymmetric = np.eye(3) + np.triu(np.full((3, 3), 0.5), 1)
    with pytest.raises(ValueError, match=r"hessian must be symmetric.*hessian\[0, 1\] = 0\.5"):
        call(g, asymmetric)
    # round-off in a singular PSD Hessian (asymmetry 1e-7, an eigenvalue -1e-8) passes
    a = np.random.default_rng(1).standard_normal((3, 2))
    exact = a @ a.T
    eigenvalues, vectors = np.linalg.eigh(exact)
    scale = eigenvalues[-1]
    null = vectors[:, 0]
    rough = exact - 1e-8 * scale * np.outer(null, null) + 1e-7 * scale * np.triu(np.ones(3), 1)
    assert rough[0, 1] != rough[1, 0] and np.linalg.eigvalsh((rough + rough.T) / 2)[0] < 0
    got, want = call(g, rough), call(g, exact)
    for x, y in zip(np.atleast_1d(got), np.atleast_1d(want), strict=True):
        close(x, y, rtol=1e-5)


@pytest.mark.parametrize("sigma", [[2.0, -1.0], [[2.0, 0.3], [0.3, -1.0]]], ids=["diag", "full"])
def test_softsign_sigma_variances_must_be_nonnegative(sigma):
    with pytest.raises(ValueError, match=r"sigma's diagonal .* >= 0, got -1\.0 at index 1"):
        bs.softsign_curve([1.0, 2.0], np.eye(2), sigma, 0.1)


def test_softsign_squares_that_leave_float64():
    """g = 1e200: g·g overflowed and ν = g/√(g²) = 0, so along came out 0.0 silently; now
    g (or eps) is named. g = 1e-200 with ε = 0: g·g underflowed and ν was inf; now ν is
    sign(g) as it should be (hypot)."""
    with pytest.raises(ValueError, match=r"g is too large for float64: g @ g overflows"):
        bs.softsign_curve([1e200, 1.0], np.eye(2), [1.0, 1.0], 0.0)
    with pytest.raises(ValueError, match=r"eps = 1e\+200 is too large"):
        bs.softsign_curve([1.0, 1.0], np.eye(2), [1.0, 1.0], 1e200)
    curve = bs.softsign_curve([1e-200, 1.0], [[2.0, 1.0], [1.0, 3.0]], [1.0, 1.0], 0.0)
    assert curve.along == 1.0 and curve.coherent == 7.0 and curve.kappa2 == 2.0, curve


# -------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bs.sqrt_rule(1e-3, 0, 10), r"batch must be in \(0, inf\), got 0"),
        (lambda: bs.linear_rule(-1.0, 1, 10), r"lr must be in \(0, inf\), got -1.0"),
        (lambda: bs.sgd_optimal_lr(10, 0.1, 100, beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (lambda: bs.sgd_transfer(0.1, 10, np.array([1.0, -2.0]), 100), "new_batch"),
        (lambda: bs.sign_optimal_lr(10, 100, beta_noise=0.0), "beta_noise"),
        (lambda: bs.sign_optimal_lr(10, 100, beta_noise=math.inf), "beta_noise"),
        (lambda: bs.beta2_by_half_life(1.0, 1, 2), r"beta2 must be in \[0, 1\)"),
        (lambda: bs.sgd_noise_stats([1, 2], np.eye(3), np.eye(2)), "hessian must have shape"),
        (lambda: bs.sgd_noise_stats([1, 0], np.diag([0, 1]), np.eye(2)), "g\\^T H g"),
        (lambda: bs.li_optimal_lr(10, 1e-3, float("nan")), "peak_batch"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()

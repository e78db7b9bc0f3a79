"""The current noise scale, settled = stable and precise, and the free estimate from the
momentum (a B_simple that keeps climbing, or one known to 50%, is not a number to
recommend from).

References are float64 NumPy written here: the ratio of window means, the delta-method
standard error var(t - R g) / (n mean(g)^2), Su's SNR = (rho^2 - r)/(1 - rho^2).
Synthetic logs have a known B_simple: tr(Sigma)_t = B g2_t (1 + noise).
"""

import json
import math
import warnings

import numpy as np
import pytest

from scaling import noise
from scaling.__main__ import main


def _log(g2, trace, start=0):
    lines = [
        json.dumps({"step": start + i, "g2": float(a), "trace_sigma": float(b)})
        for i, (a, b) in enumerate(zip(g2, trace, strict=True))
    ]
    return noise.read_noise_log(lines)


def _stationary(rng, n, b_simple=50.0, g2=1.0, rel=0.3):
    return g2 + rel * g2 * rng.standard_normal(n), b_simple * g2 * (
        1 + rel * rng.standard_normal(n)
    )


def test_windows_match_float64_reference():
    rng = np.random.default_rng(0)
    g, t = _stationary(rng, 250)
    got = noise.window_estimates(_log(g, t, start=10), window=100)
    # counted from the end: [50, 100, 100]
    assert [(w.first_step, w.last_step, w.count) for w in got] == [
        (10, 59, 50),
        (60, 159, 100),
        (160, 259, 100),
    ]
    for w, (lo, hi) in zip(got, [(0, 50), (50, 150), (150, 250)], strict=True):
        gg, tt = g[lo:hi], t[lo:hi]
        r = tt.mean() / gg.mean()
        se = np.sqrt(np.var(tt - r * gg, ddof=1) / gg.size) / gg.mean()
        assert w.b_simple == pytest.approx(r, rel=1e-12)
        assert w.stderr == pytest.approx(se, rel=1e-10)


def test_stationary_log_settles_and_the_interval_covers_the_truth():
    rng = np.random.default_rng(1)
    covered = settled = 0
    trials = 200
    for _ in range(trials):
        est = noise.settled_noise_scale(_log(*_stationary(rng, 300)), window=100)
        covered += abs(est.b_simple - 50.0) <= 2 * est.stderr
        settled += est.settled
    # a 2-sigma interval: ~95% coverage; two agreeing windows of the same process: ~95%
    assert covered / trials > 0.9, covered
    assert settled / trials > 0.88, settled
    assert est.window == 100 and est.previous is not None


def test_a_climbing_noise_scale_is_not_settled():
    # B_simple grows 1 -> 200 over 300 updates, as early in training
    rng = np.random.default_rng(2)
    n = 300
    truth = np.linspace(1, 200, n)
    g = 1.0 + 0.3 * rng.standard_normal(n)
    t = truth * (1 + 0.3 * rng.standard_normal(n))
    est = noise.settled_noise_scale(_log(g, t), window=100)
    assert not est.settled and est.reason.startswith("still moving")
    # the current value is the last window's, not the whole run's average
    assert est.b_simple == pytest.approx(t[200:].mean() / g[200:].mean(), rel=1e-12)
    assert est.b_simple > 1.3 * (t.mean() / g.mean())


def test_not_settled_reasons():
    rng = np.random.default_rng(3)
    short = noise.settled_noise_scale(_log(*_stationary(rng, 150)), window=100)
    assert not short.settled and short.reason.startswith("only 150 updates")
    assert short.previous is None and short.precise and not short.stable
    g, t = _stationary(rng, 200)
    swamped = noise.settled_noise_scale(_log(g - 5.0, t), window=100)
    assert not swamped.settled and "not measurable" in swamped.reason
    assert swamped.b_simple == math.inf
    noisy = noise.settled_noise_scale(_log(*_stationary(rng, 20, rel=3.0)), window=10)
    assert not noisy.settled and not noisy.precise


def _old_settled(est):
    """The definition this package used before: two windows within 2 combined standard
    errors and a relative error below 50%."""
    gap = abs(est.b_simple - est.previous)
    agree = gap <= 2 * math.hypot(est.stderr, est.previous_stderr)
    return agree and est.stderr / est.b_simple < 0.5


def test_two_noisy_windows_that_agree_are_not_settled():
    """Known B_simple 150, windows of 50 updates with about 30% standard errors: the two
    windows agree because they are too noisy to tell apart, which is not settled."""
    rng = np.random.default_rng(6)
    for _ in range(6):
        est = noise.settled_noise_scale(_log(*_stationary(rng, 100, 150.0, rel=1.5)), 50)
        assert 0.2 < est.stderr / est.b_simple < 0.5, est
        assert _old_settled(est) and est.stable  # what the old rule called settled
        assert not est.settled and not est.precise, est
        assert est.reason.startswith("too uncertain: the standard error is"), est.reason


def test_settled_needs_both_windows_precise():
    # the last window precise, the one before not: the agreement test tells nothing
    rng = np.random.default_rng(7)
    g1, t1 = _stationary(rng, 50, 150.0, rel=3.0)
    g2, t2 = _stationary(rng, 50, 150.0, rel=0.2)
    est = noise.settled_noise_scale(_log(np.r_[g1, g2], np.r_[t1, t2]), window=50)
    assert est.stderr / est.b_simple < 0.1 and est.previous_stderr / est.previous > 0.2
    assert not est.settled and not est.precise
    assert est.reason.startswith("the window before is too uncertain")


def test_settled_and_unsettled_on_known_noise_scales():
    rng = np.random.default_rng(8)
    for truth in (5.0, 150.0, 4000.0):
        est = noise.settled_noise_scale(_log(*_stationary(rng, 400, truth, rel=0.5)), window=100)
        assert est.settled and est.precise and est.stable, est
        assert abs(est.b_simple - truth) <= 3 * est.stderr
        assert est.reason.startswith("stable and precise")
        # a tenfold climb over the same log: precise but moving
        g, t = _stationary(rng, 400, 1.0, rel=0.5)
        climb = np.geomspace(truth / 10, truth, 400)
        moving = noise.settled_noise_scale(_log(g, t * climb), window=100)
        assert moving.precise and not moving.stable and not moving.settled
        assert moving.reason.startswith("still moving")


def test_current_b_simple_is_the_log_estimator_on_arrays():
    rng = np.random.default_rng(9)
    g, t = _stationary(rng, 130, 60.0)
    from_arrays = noise.current_b_simple(g, t, window=40)
    assert from_arrays == noise.settled_noise_scale(_log(g, t), window=40)
    # the default window: a sixth of the updates, 10 to 100
    assert noise.current_b_simple(g, t).window == noise.default_window(130) == 21
    with pytest.raises(ValueError, match="same length"):
        noise.current_b_simple(g, t[:-1])
    with pytest.raises(ValueError, match="finite"):
        noise.current_b_simple([1.0, np.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        noise.current_b_simple(g, t, window=2.5)


@pytest.mark.parametrize(
    "b, se, text",
    [
        (82.7351, 12.13, "83 ± 12"),
        (148.2, 47.0, "148 ± 47"),
        (2034.0, 312.0, "2030 ± 310"),
        (3.4567, 0.1234, "3.46 ± 0.12"),
        (0.01234, 0.00056, "0.01234 ± 0.00056"),
        (12.0, 0.0, "12 ± 0"),
        (12.0, math.inf, "12 ± -"),
        (math.inf, 1.0, "- ± -"),
        (-3.0, 1.0, "- ± -"),
    ],
)
def test_printed_digits_follow_the_standard_error(b, se, text):
    assert noise.format_b_simple(b, se) == text


def test_ratio_logs_use_the_mean_ratio():
    lines = [json.dumps({"step": i, "b_simple": 10.0 + (i % 2)}) for i in range(8)]
    w = noise.window_estimates(noise.read_noise_log(lines), window=4)
    assert [x.b_simple for x in w] == pytest.approx([10.5, 10.5])


def test_ema_window_and_decay():
    assert noise.ema_window(0.99) == pytest.approx(100.0)
    assert noise.ema_decay(100) == pytest.approx(0.99)
    assert noise.ema_decay(noise.ema_window(0.9)) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="window must be in"):
        noise.ema_decay(0.5)
    with pytest.raises(ValueError, match="window must be in"):
        noise.window_estimates(_log([1.0], [1.0]), window=1)


# ---------------------------------------------------------- from the momentum


def _stream(seed, b_simple, batch, steps, dim=64):
    """Batch gradients G + eps/sqrt(B), Sigma diagonal with tr(Sigma) = b_simple |G|^2."""
    rng = np.random.default_rng(seed)
    g_true = rng.standard_normal(dim)
    var = rng.uniform(0.5, 1.5, dim)
    var *= b_simple * (g_true @ g_true) / var.sum()
    # two half-batches per step, so the two-batch estimate sees the same samples
    halves = g_true + rng.standard_normal((steps, 2, dim)) * np.sqrt(var / (batch / 2))
    return g_true, var, halves


@pytest.mark.parametrize("b_simple, batch, beta", [(50.0, 32, 0.9), (400.0, 64, 0.95)])
def test_momentum_estimate_recovers_b_simple_and_agrees_with_two_batch(b_simple, batch, beta):
    steps, burn = 6000, 200
    g_true, var, halves = _stream(0, b_simple, batch, steps)
    truth = var.sum() / (g_true @ g_true)
    grads = halves.mean(axis=1)
    m = np.zeros_like(g_true)
    m2 = g2 = 0.0
    for t in range(steps):
        m = beta * m + (1 - beta) * grads[t]
        if t >= burn:
            m2 += m @ m
            g2 += grads[t] @ grads[t]
    est = noise.momentum_noise_scale(m2 / (steps - burn), g2 / (steps - burn), beta, batch)
    # SNR = |G|^2 / (tr Sigma / B) = B / B_simple
    assert est.b_simple == pytest.approx(truth, rel=0.1)
    assert est.snr == pytest.approx(batch / truth, rel=0.1)
    # the two-batch estimate from the same samples (half batch vs whole)
    small = np.einsum("si,si->s", halves[:, 0], halves[:, 0])
    big = np.einsum("si,si->s", grads, grads)
    e = noise.two_batch_estimates(small.mean(), big.mean(), batch / 2, batch)
    assert e.trace_sigma / e.g2 == pytest.approx(truth, rel=0.1)
    assert est.b_simple == pytest.approx(e.trace_sigma / e.g2, rel=0.15)


def test_momentum_estimate_formula_and_limits():
    # rho^2 = (SNR + r)/(SNR + 1) inverted: worked with |G|^2 = 1, trSigma/B = 4, beta 0.9
    r = 0.1 / 1.9
    est = noise.momentum_noise_scale(1 + 4 * r, 5.0, 0.9, 32)
    assert (est.snr, est.b_simple) == pytest.approx((0.25, 128.0), rel=1e-12)
    assert noise.momentum_noise_scale(0.99 * r * 5.0, 5.0, 0.9, 32) == (0.0, math.inf)  # pure noise
    assert noise.momentum_noise_scale(5.0, 5.0, 0.9, 32) == (math.inf, 0.0)  # no noise
    with pytest.raises(ValueError, match="grad_sq_norm must be in"):
        noise.momentum_noise_scale(1.0, 0.0, 0.9, 32)
    with pytest.raises(ValueError, match="beta must be in"):
        noise.momentum_noise_scale(1.0, 1.0, 1.0, 32)


def _write(path, g, t):
    path.write_text(
        "\n".join(
            json.dumps({"step": i, "g2": float(a), "trace_sigma": float(b)})
            for i, (a, b) in enumerate(zip(g, t, strict=True))
        )
    )


def test_settled_value_in_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    path = tmp_path / "log.jsonl"
    _write(path, *_stationary(rng, 300))
    assert main(["noise", str(path), "--window", "100"]) == 0
    out = capsys.readouterr().out
    want = noise.settled_noise_scale(noise.read_noise_log(path.read_text().splitlines()), 100)
    assert out.splitlines()[1] == want.summary()  # the current value leads
    assert f"current B_simple = {want.text()} (last 100 updates): " in out
    for label in ("start", "middle", "last"):
        assert label in out
    assert "secondary: the EMA over the run" in out
    assert main(["noise", str(path), "--window", "100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["b_simple"] == want.b_simple and data["stderr"] == want.stderr
    assert data["settled"] is want.settled and data["text"] == want.text()
    assert len(data["windows"]) == 3
    # without --window: a sixth of the log, as the demo and ox.current_noise_scale
    assert main(["noise", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["window"] == 50
    assert (
        data["b_simple"]
        == noise.settled_noise_scale(
            noise.read_noise_log(path.read_text().splitlines()), 50
        ).b_simple
    )


def test_noise_json_schema(tmp_path, capsys):
    """--json: the current value leads (b_simple is it), the EMA is b_simple_ema."""
    from scaling.__main__ import NOISE_JSON_KEYS

    rng = np.random.default_rng(10)
    g, t = _stationary(rng, 120, 40.0)
    path = tmp_path / "log.jsonl"
    _write(path, g, t)
    assert main(["noise", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert tuple(data) == NOISE_JSON_KEYS
    kinds = {
        "b_simple": float, "stderr": float, "text": str, "window": int, "settled": bool,
        "precise": bool, "stable": bool, "reason": str, "previous": float,
        "previous_stderr": float, "b_simple_ema": float, "g2_ema": float,
        "trace_sigma_ema": float, "ema": float, "steps": int, "last_step": int,
        "windows": list, "entries": list, "gaps": int,
    }  # fmt: skip
    assert {k: type(v) for k, v in data.items()} == kinds
    assert set(data["windows"][0]) == {"first_step", "last_step", "count", "b_simple", "stderr"}
    assert data["b_simple"] == pytest.approx(t[-20:].mean() / g[-20:].mean(), rel=1e-12)
    assert (
        data["b_simple_ema"] == noise.read_noise_log(path.read_text().splitlines())[-1].b_simple_ema
    )
    # not measurable: null, never a negative number
    _write(path, np.ones(30), -np.ones(30))
    assert main(["noise", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["b_simple"] is None and data["stderr"] is None and not data["settled"]
    assert data["text"] == "- ± -"


def test_plot_draws_the_trajectory(tmp_path, capsys):
    rng = np.random.default_rng(5)
    path = tmp_path / "log.jsonl"
    g, t = _stationary(rng, 120)
    path.write_text(
        "\n".join(
            json.dumps({"step": i, "g2": float(a), "trace_sigma": float(b)})
            for i, (a, b) in enumerate(zip(g, t, strict=True))
        )
    )
    png = tmp_path / "noise.png"
    assert main(["noise", str(path), "--window", "40", "--plot", str(png)]) == 0
    assert (
        png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in capsys.readouterr().out
    )


def test_plot_without_matplotlib_fails_first_with_the_readme_hint(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import -> ImportError
    # the log does not exist: the matplotlib check comes before any reading
    assert main(["noise", "/nonexistent/log.jsonl", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'python -m scaling: error: --plot needs matplotlib: pip install "optax-ext[plot]" '
        '(in a checkout: pip install -e ".[plot]")'
    )


NOT_MEASURABLE_LOGS = {
    # per-step ratios, all negative: their mean was reported as "-300 ± 0"
    "ratios": [{"step": i, "b_simple": -300.0 + (i % 3)} for i in range(30)],
    # split log whose tr(Sigma) is negative: the same
    "negative trace": [{"step": i, "g2": 1.0, "trace_sigma": -300.0} for i in range(30)],
    # split log whose |G|^2 is negative: already "not measurable"
    "negative g2": [{"step": i, "g2": -1.0, "trace_sigma": 300.0} for i in range(30)],
}


@pytest.mark.parametrize("kind", sorted(NOT_MEASURABLE_LOGS))
def test_a_log_with_nothing_measurable_says_so(kind, tmp_path, capsys):
    records = NOT_MEASURABLE_LOGS[kind]
    lines = [json.dumps(r) for r in records]
    est = noise.settled_noise_scale(noise.read_noise_log(lines), window=10)
    assert not est.settled and est.reason.startswith("not measurable"), est
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(lines))
    assert main(["noise", str(path), "--window", "10"]) == 0
    out = capsys.readouterr().out
    assert "current B_simple = - ± - (last 10 updates): NOT settled: not measurable" in out
    assert "-300" not in out and "-299" not in out and "'-': not measurable" in out
    assert main(["noise", str(path), "--window", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert not data["settled"] and data["reason"] == est.reason and data["b_simple"] is None


def test_plot_with_nothing_plottable_says_so_without_a_warning(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in NOT_MEASURABLE_LOGS["ratios"]))
    png = tmp_path / "noise.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" was printed
        assert main(["noise", str(path), "--window", "10", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "plot: nothing to plot (no step or window has a measurable B_simple" in captured.out
    assert f"{png} not written" in captured.out and captured.err == ""
    assert not png.exists()
    assert main(["noise", str(path), "--window", "10", "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] is None

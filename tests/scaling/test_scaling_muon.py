"""Muon's lr-batch rule (Su, 11285) and its scale-convention conversions (Su, 11416).

The expected numbers are written out here from the formulas: s(W) per convention
(moonlight 0.2 sqrt(max(d_in, d_out)), keller sqrt(max(1, d_out/d_in)), mup
sqrt(d_out/d_in), none 1), lr_B = lr_A s_A / s_B, wd_B = wd_A s_B / s_A.
"""

import itertools
import math

import numpy as np
import pytest

from scaling import batch_size as bs
from scaling import muon
from scaling.__main__ import main
from scaling.recommendation import recommend

S = {
    "moonlight": lambda i, o: 0.2 * math.sqrt(max(i, o)),
    "keller": lambda i, o: math.sqrt(max(1.0, o / i)),
    "mup": lambda i, o: math.sqrt(o / i),
    "none": lambda i, o: 1.0,
}


def test_lr_batch_rule_worked_numbers():
    # eta*/eta_max = (1 + Bs/B)^(-1/2): at B = Bs 1/sqrt(2); B = Bs/3: 1/2
    assert bs.muon_optimal_lr(1000, 1000).lr == pytest.approx(2**-0.5, rel=1e-12)
    assert bs.muon_optimal_lr(500, 1500, lr_max=0.04).lr == pytest.approx(0.02, rel=1e-12)
    r = bs.muon_transfer(0.02, 128, 2048, 1000)
    assert r.lr == pytest.approx(0.02 * math.sqrt((1 + 1000 / 128) / (1 + 1000 / 2048)), rel=1e-12)
    assert r.lr == pytest.approx(0.0486673, rel=1e-6) and not r.has_peak
    grid = np.array([1.0, 10, 100, 1e3, 1e4])
    np.testing.assert_allclose(bs.muon_optimal_lr(grid, 100).lr, (1 + 100 / grid) ** -0.5)
    # same form as the sign rule's beta with c = 1, no surge term
    assert bs.muon_optimal_lr(300, 100).lr == pytest.approx(bs.sign_beta(300, 100, c=1.0))


def _surge_reference(batch, b_simple, beta_noise):
    """The mean-field optimum of a sign-like update written out: eta ~ beta S / (D + beta^2 O)
    with D the curvature on the diagonal and O = D / beta_noise^2 off it, normalised to 1
    at an infinite batch (beta = 1)."""
    beta = np.sqrt(batch / (batch + b_simple))
    d, o = 1.0, 1.0 / beta_noise**2
    return (beta / (d + beta**2 * o)) / (1.0 / (d + o))


@pytest.mark.parametrize("beta_noise", [0.3, 0.6, 1.0, 2.5])
def test_surge_term_against_float64_reference(beta_noise):
    grid = np.geomspace(1, 1e5, 41)
    got = bs.muon_optimal_lr(grid, 300.0, beta_noise=beta_noise)
    np.testing.assert_allclose(got.lr, _surge_reference(grid, 300.0, beta_noise), rtol=1e-12)
    if beta_noise < 1:  # the peak where beta = beta_noise
        peak = 300.0 * beta_noise**2 / (1 - beta_noise**2)
        assert got.has_peak and got.peak_batch == pytest.approx(peak, rel=1e-12)
        fine = np.geomspace(peak / 3, peak * 3, 2001)
        curve = bs.muon_optimal_lr(fine, 300.0, beta_noise=beta_noise).lr
        assert fine[np.argmax(curve)] == pytest.approx(peak, rel=2e-3)
        assert bs.muon_transfer(1.0, peak, 10 * peak, 300.0, beta_noise).lr < 1.0  # it falls
    else:
        assert not got.has_peak and np.all(np.diff(got.lr) > 0)
    # no surge (None or inf) is Su's rule; a large beta_noise tends to it
    assert bs.muon_optimal_lr(700, 300, beta_noise=math.inf) == bs.muon_optimal_lr(700, 300)
    assert bs.muon_optimal_lr(700, 300, beta_noise=1e4).lr == pytest.approx(
        bs.muon_optimal_lr(700, 300).lr, rel=1e-7
    )
    with pytest.raises(ValueError, match=r"beta_noise must be in \(0, inf\), got 0.0"):
        bs.muon_optimal_lr(700, 300, beta_noise=0.0)


def test_recommend_and_cli_know_muon(capsys):
    # Su's rule, asked for by beta_noise=inf
    r = recommend("muon", 0.02, 128, 2048, b_simple=1000, weight_decay=0.1, beta_noise=math.inf)
    want = 0.02 * math.sqrt((1 + 1000 / 128) / (1 + 1000 / 2048))
    assert r.new_lr == pytest.approx(want, rel=1e-12) and r.rule == "muon (Su)"
    assert r.new_weight_decay == pytest.approx(0.1 * (0.02 / want) * 16, rel=1e-12)
    assert r.new_beta1 == 0.95 and not r.has_peak and r.beta2 is None
    # the default: the surge fitted to the transfer check
    bn = bs.MUON_BETA_NOISE
    d = recommend("muon", 0.02, 128, 2048, b_simple=1000)
    ratio = _surge_reference(2048.0, 1000.0, bn) / _surge_reference(128.0, 1000.0, bn)
    assert d.new_lr == pytest.approx(0.02 * ratio, rel=1e-12)
    assert d.rule == "muon (Su, with a surge)" and f"beta_noise={bn:g}" in d.reasons["lr"]
    assert d.has_peak and d.peak_batch == pytest.approx(1000 * bn**2 / (1 - bn**2), rel=1e-12)
    fallback = recommend("muon", 0.02, 128, 512)
    assert fallback.new_lr == pytest.approx(0.04) and "fallback" in fallback.rule
    argv = "lr --optimizer muon --lr 0.02 --batch 128 --to 2048 --b-simple 1000".split()
    assert main([*argv, "--beta-noise", "inf"]) == 0
    out = capsys.readouterr().out
    assert "muon (Su)" in out and f"{want:.3g}" in out
    assert main(argv) == 0
    assert f"{d.new_lr:.3g}" in capsys.readouterr().out
    argv = "lr --optimizer adamw --lr 0.02 --batch 128 --to 2048 --b-simple 1000 --rule muon"
    assert main(argv.split()) == 0
    assert f"{d.new_lr:.3g}" in capsys.readouterr().out


def test_shape_scales_and_worked_conversions():
    assert muon.muon_shape_scale(1024, 1024) == pytest.approx(6.4)
    assert muon.muon_shape_scale(768, 3072, "keller") == 2.0
    assert muon.muon_shape_scale(3072, 768, "keller") == 1.0
    assert muon.muon_shape_scale(3072, 768, "mup") == 0.5
    assert muon.muon_shape_scale(5, 7, "none") == 1.0
    # AdamW (3e-4, 0.1) to Muon without a scale, d = 1024: lr x 6.4, wd / 6.4
    r = muon.muon_from_adamw(3e-4, 0.1, 1024, 1024)
    assert (r.lr, r.weight_decay) == pytest.approx((1.92e-3, 0.015625), rel=1e-12)
    # Keller's convention on an MLP up-projection 768 -> 3072: s = 2, moonlight s = 11.0851
    r = muon.muon_from_adamw(3e-4, 0.1, 768, 3072, "keller")
    assert (r.lr, r.weight_decay) == pytest.approx((1.66277e-3, 0.0180422), rel=1e-5)
    # moonlight carries AdamW over unchanged
    assert muon.muon_from_adamw(3e-4, 0.1, 768, 3072, "moonlight") == pytest.approx((3e-4, 0.1))


@pytest.mark.parametrize("a, b", list(itertools.permutations(muon.MUON_SCALES, 2)))
@pytest.mark.parametrize("d_in, d_out", [(768, 3072), (3072, 768), (64, 64), (576, 128)])
def test_conversion_keeps_the_update_and_the_decay_per_step(a, b, d_in, d_out):
    lr, wd = 0.013, 0.07
    r = muon.convert_muon(lr, wd, d_in, d_out, a, b)
    sa, sb = S[a](d_in, d_out), S[b](d_in, d_out)
    assert r.lr * sb == pytest.approx(lr * sa, rel=1e-12)  # same update eta s msign
    assert r.lr * r.weight_decay == pytest.approx(lr * wd, rel=1e-12)  # same eta lambda
    back = muon.convert_muon(r.lr, r.weight_decay, d_in, d_out, b, a)
    assert back == pytest.approx((lr, wd), rel=1e-12)
    assert muon.adamw_from_muon(
        *muon.muon_from_adamw(lr, wd, d_in, d_out, b), d_in, d_out, b
    ) == pytest.approx((lr, wd), rel=1e-12)


def test_flax_kernel_dims():
    assert muon.muon_dims((768, 3072)) == (768, 3072)
    assert muon.muon_dims((3, 3, 64, 128)) == (576, 128)
    # d_in first (Flax): the transposed (PyTorch) layout gives another scale under keller
    assert muon.muon_shape_scale(*muon.muon_dims((768, 3072)), "keller") == 2.0
    assert muon.muon_shape_scale(*muon.muon_dims((3072, 768)), "keller") == 1.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: muon.muon_shape_scale(768, 3072, "torch"), "scale must be one of"),
        (lambda: muon.muon_shape_scale(0, 3072), "d_in must be an int >= 1, got 0"),
        (lambda: muon.muon_shape_scale(768, 3.5), "d_out must be an int >= 1"),
        (lambda: muon.muon_dims((768,)), "kernel shape of >= 2 ints"),
        (lambda: muon.muon_dims((3, 0, 4)), "sizes >= 1"),
        (lambda: muon.convert_muon(-1, 0.1, 4, 4, "none", "mup"), "lr must be in"),
        (lambda: muon.convert_muon(1e-3, math.inf, 4, 4, "none", "mup"), "weight_decay"),
        (lambda: muon.convert_muon(1e308, 0.1, 1, 10**8, "moonlight", "none"), "the lr is inf"),
        (lambda: bs.muon_transfer(1e300, 1e-300, 1e300, 1e300), "the new lr is"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

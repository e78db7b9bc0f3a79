"""Weight-decay rules (Wang & Aitchison 2024, arXiv 2405.13698; Su, kexue.fm/archives/11459):
worked numbers computed by hand, schedules, properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling import weight_decay as wd

close = lambda a, b, rtol=1e-5: np.testing.assert_allclose(a, b, rtol=rtol)
FAST = settings(max_examples=60, deadline=None)
pos = st.floats(1e-6, 1e6, allow_nan=False)


def test_power_lines_and_timescale_worked():
    close(wd.power_lines_tau(3e-4, 0.1, 4e6, 2e12), 0.0666667)
    close(wd.ema_timescale(3e-4, 0.1), 33333.3333)
    close(
        wd.power_lines_weight_decay(3e-4, wd.power_lines_tau(3e-4, 0.1, 4e6, 2e12), 4e6, 2e12),
        0.1,
        rtol=1e-12,
    )
    close(wd.ema_timescale_epochs(3e-4, 0.1, 4e6, 2e12), 0.0666667)


def test_equilibrium_rms_worked():
    close(wd.equilibrium_weight_rms(3e-4, 0.1), 0.0387298)


def test_coupled_independent_roundtrip():
    close(wd.coupled_to_independent(0.1, 1e-3), 1e-4, rtol=1e-12)
    close(wd.independent_to_coupled(1e-4, 1e-3), 0.1, rtol=1e-12)


def test_lion_and_amos_worked():
    r = wd.lion_from_adamw(3e-4, 0.1, k=10)
    close(r.lr, 3e-5)
    close(r.weight_decay, 1.0)
    close(r.lr * r.weight_decay, 3e-4 * 0.1)
    r = wd.amos_sign_hyperparams(1 / math.sqrt(768), 1.11e-3)
    close(r.lr, 4.0054e-5)
    close(r.weight_decay, 0.015381, rtol=3.3e-5)  # half a unit of the 5th digit given


@FAST
@given(lr=pos, lam=pos, b=pos, lr2=pos, b2=pos, n=pos)
def test_transfer_keeps_epoch_timescale(lr, lam, b, lr2, b2, n):
    new = wd.transfer_weight_decay(lam, lr, lr2, b, b2)
    close(
        wd.ema_timescale_epochs(lr2, new, b2, n), wd.ema_timescale_epochs(lr, lam, b, n), rtol=1e-10
    )
    close(wd.transfer_weight_decay(lam, lr, lr, b, b), lam, rtol=1e-12)
    close(wd.transfer_weight_decay(new, lr2, lr, b2, b), lam, rtol=1e-10)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: wd.ema_timescale(0.0, 0.1), r"lr must be in \(0, inf\), got 0.0"),
        (lambda: wd.ema_timescale(1e-3, -1), "weight_decay"),
        (lambda: wd.lion_from_adamw(1e-3, 0.1, k=2), r"k must be in \[3, 10\], got 2"),
        (lambda: wd.amos_sign_hyperparams(0.0, 1e-3), "init_std"),
        (lambda: wd.transfer_weight_decay(0.1, 1e-3, 1e-3, 256, 0), "new_batch"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()

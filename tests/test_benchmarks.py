"""Logic of the benchmark scripts that decides what they report (not their timings)."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_quality  # noqa: E402


def fake_run(best_lr):
    """A loss with its minimum at ``best_lr``, quadratic in log(lr)."""

    def run(name, lr, steps, batch, dtype=None):
        return {"optimizer": name, "lr": lr, "valid_loss": 2.0 + math.log2(lr / best_lr) ** 2}

    return run


@pytest.mark.parametrize(
    "best_factor, want_factors",
    [
        (1.0, [0.25, 0.5, 1.0, 2.0, 4.0]),  # bracketed inside: no extension
        (8.0, [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]),  # doubles until a worse rate
        (1 / 16, [1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0]),  # halves
    ],
)
def test_sweep_extends_until_the_best_rate_is_bracketed(monkeypatch, best_factor, want_factors):
    monkeypatch.setattr(bench_quality, "run", fake_run(0.01 * best_factor))
    rows = bench_quality.sweep_lr("opt", 0.01, steps=1, batch=1)
    assert [r["factor"] for r in rows] == pytest.approx(want_factors)
    best = min(rows, key=lambda r: r["valid_loss"])
    assert best["factor"] == pytest.approx(best_factor)
    assert [r["factor"] for r in rows if r["best_lr_for_optimizer"]] == [best["factor"]]
    assert not any(r["best_at_edge"] for r in rows)


def test_sweep_stops_after_max_extend(monkeypatch):
    monkeypatch.setattr(bench_quality, "run", fake_run(0.01 * 2**20))
    rows = bench_quality.sweep_lr("opt", 0.01, steps=1, batch=1)
    assert len(rows) == len(bench_quality.FACTORS) + bench_quality.MAX_EXTEND
    assert max(r["factor"] for r in rows) == 4.0 * 2**bench_quality.MAX_EXTEND
    assert [r["factor"] for r in rows if r["best_at_edge"]] == [4.0 * 2**bench_quality.MAX_EXTEND]

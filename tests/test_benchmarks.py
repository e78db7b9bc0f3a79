"""Logic of the benchmark scripts that decides what they report (not their timings)."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_quality  # noqa: E402
import bench_transfer  # noqa: E402


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


# ------------------------------------------------------------ bench_transfer's logic


def test_transfer_best_lr_is_the_parabola_minimum_and_none_at_the_edge():
    lrs = 1e-3 * 2.0 ** np.arange(5)
    losses = (np.log(lrs) - np.log(3e-3)) ** 2 + 2.0
    assert bench_transfer.best_lr(lrs, losses) == pytest.approx(3e-3)
    assert bench_transfer.best_lr(lrs, losses[::-1] * 0 + np.arange(5.0)) is None
    assert bench_transfer.best_lr(lrs, -np.arange(5.0)) is None


def test_transfer_reports_measured_over_recommended(monkeypatch):
    """A fake sweep whose best lr grows like B^(1/4), inside the grid: the ratios are the
    measured best over each rule's prediction from the anchor."""
    best_at = lambda b: 3e-3 * (b / 8) ** 0.25

    def make_run(b, make_tx):
        # (lr, seed) losses of a sweep at batch b: a parabola in log lr around best_at(b)
        return lambda lrs: ((np.log(lrs) - math.log(best_at(b))) ** 2)[:, None] + np.zeros((1, 2))

    noise = {"b_simple": 50.0, "stderr": float("nan")}
    out = bench_transfer.transfer("adamw", noise, 8, 7, make_run, 3e-3)
    rows = {r["batch"]: r for r in out["rows"]}
    assert out["anchor_lr"] == pytest.approx(3e-3, rel=1e-6)
    for b in (32, 128):
        assert rows[b]["best_lr"] == pytest.approx(best_at(b), rel=1e-6)
        assert rows[b]["measured_over_sqrt"] == pytest.approx((b / 8) ** -0.25, rel=1e-6)
        assert rows[b]["measured_over_linear"] == pytest.approx((b / 8) ** -0.75, rel=1e-6)
        rec = bench_transfer.scaling.recommend("adamw", out["anchor_lr"], 8, b, b_simple=50.0)
        assert rows[b]["measured_over_recommended"] == pytest.approx(best_at(b) / rec.new_lr)


@pytest.mark.parametrize("best", [5e-2, 1e-4, 3e-3])
def test_transfer_sweep_extends_past_an_edge_until_the_best_is_inside(best):
    calls = []

    def run(lrs):
        calls.append(len(lrs))
        return ((np.log(lrs) - math.log(best)) ** 2)[:, None] * np.ones((1, 2))

    grid = 3e-3 * 2.0 ** (np.arange(7) / 2 - 1.5)
    lrs, losses = bench_transfer.sweep(run, grid)
    assert np.all(np.diff(lrs) > 0) and losses.shape == (len(lrs), 2)
    i = int(np.argmin(losses.mean(axis=1)))
    assert 0 < i < len(lrs) - 1
    assert calls[0] == 7 and all(n == 3 for n in calls[1:])
    assert (len(calls) == 1) == (best == 3e-3)  # extended only when the best was outside
    assert bench_transfer.best_lr(lrs, losses.mean(axis=1)) == pytest.approx(best)


def test_optax_guarded_counterpart_steps_like_its_inner_and_skips_a_nan_step():
    """benchlib.optax_guarded, the like-for-like counterpart of a guarded optimizer:
    on small clean gradients it is its inner optimizer (the clip at norm 1 does nothing),
    a NaN gradient is skipped, and a large one is clipped to norm 1."""
    import jax.numpy as jnp
    import optax
    from benchlib import optax_guarded

    inner = lambda: optax.sgd(0.5)
    tx, plain = optax_guarded(inner()), inner()
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    small = {"a": jnp.full(3, 0.1), "b": jnp.full((2, 2), -0.1)}
    got, state = tx.update(small, tx.init(params), params)
    want, _ = plain.update(small, plain.init(params), params)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    bad = {"a": small["a"].at[1].set(jnp.nan), "b": small["b"]}
    skipped, state = tx.update(bad, state, params)
    assert all(not np.any(np.asarray(u)) for u in skipped.values())
    assert int(state.notfinite_count) == 1
    big = {"a": jnp.full(3, 30.0), "b": jnp.full((2, 2), 40.0)}
    clipped, _ = tx.update(big, state, params)
    norm = np.sqrt(sum(float(jnp.sum(u**2)) for u in clipped.values())) / 0.5
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)


# ------------------------------------------------------------ bench_xla_cpu's counts


def test_xla_cpu_quick_run_measures_every_form(tmp_path):
    """bench_xla_cpu's --quick run completes and reports every form it compares (the
    script itself checks that all forms compute the same numbers). How many kernels
    XLA:CPU compiles is a measurement in results/, not a property the tests hold it to."""
    import bench_xla_cpu

    results = bench_xla_cpu.main(["--quick", "--out", str(tmp_path / "xla_cpu.json")])
    assert (tmp_path / "xla_cpu.json").exists()
    assert results["compile"] and all(r["leaves"] == 16 for r in results["compile"])
    assert {r["form"] for r in results["reductions"]} == set(bench_xla_cpu.REDUCTION_VARIANTS)
    assert {r["form"] for r in results["moments"]} == {"two reductions", "blocks of rows"}
    assert {r["form"] for r in results["parts"]} == {"jnp.mean", "slabs"}
    assert {r["optimizer"] for r in results["steps"]} == {"adafactor", "amos"}


def test_compile_scaling_measures_each_compile_in_its_own_process(tmp_path):
    """bench_compile_scaling: one fresh process per (transform, leaf count), each row with
    its seconds, its own peak memory and the compiled module's instruction count."""
    import bench_compile_scaling

    out = tmp_path / "compile_scaling.json"
    results = bench_compile_scaling.main(["--leaves", "8", "--only", "lion", "--out", str(out)])
    assert out.exists()
    (row,) = results["rows"]
    assert row["transform"] == "optax.lion(β, β)" and row["leaves"] == 8
    assert row["compile_s"] > 0 and row["peak_GB"] >= row["before_GB"] > 0
    assert row["instructions"] > 8


def test_the_benchmarks_index_names_every_script():
    """benchmarks/README.md maps questions to scripts: none is missing, none is stale."""
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    named = set(re.findall(r"`([a-z_0-9]+\.py)", (folder / "README.md").read_text()))
    scripts = {p.name for p in folder.glob("*.py")}
    assert scripts - named == set(), "not in benchmarks/README.md"
    assert named - scripts == set(), "named in benchmarks/README.md, not in benchmarks/"

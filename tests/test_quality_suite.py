"""The quality suite (benchmarks/bench_suite.py): its protocol and what it reports."""

import json
import math
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_suite  # noqa: E402
import suite_tasks  # noqa: E402


def test_quick_run_brackets_each_best_rate_and_reports_consistent_numbers(tmp_path):
    out = str(tmp_path / "quick")
    results = bench_suite.main(["--quick", "--out", out])
    with open(out + ".json") as f:
        assert json.load(f)["tasks"].keys() == results["tasks"].keys() == {"digits_mlp"}
    info = results["tasks"]["digits_mlp"]
    rows = {r["optimizer"]: r for r in info["rows"]}
    assert set(rows) == {"optax.adamw", "tiger"}
    for r in rows.values():
        sweep = {float(k): v for k, v in r["sweep"].items()}
        # the sweep runs the first seed at every rate, the other seed at the best only
        firsts = {lr: v[0] for lr, v in sweep.items()}
        best = max(firsts, key=firsts.get)  # accuracy: higher is better
        assert all(len(v) == (2 if lr == best else 1) for lr, v in sweep.items())
        # the reported best rate is the sweep's best, and worse rates lie on both sides
        assert r["best_lr"] == pytest.approx(best, rel=1e-5)
        assert not r["best_at_edge"]
        assert min(sweep) < best < max(sweep)
        # the reported mean and sd are those of the seeds at that rate
        assert r["seeds"] == pytest.approx(sweep[best])
        assert r["mean"] == pytest.approx(np.mean(r["seeds"]))
        assert r["sd"] == pytest.approx(np.std(r["seeds"], ddof=1))
        assert len(r["seeds"]) == 2
        assert r["curve"][-1] == pytest.approx(r["mean"])
        assert 0.0 <= r["mean"] <= 1.0 and math.isfinite(r["held_out_loss"])
    # AdamW reaches its own final accuracy by the last evaluation at the latest
    assert rows["optax.adamw"]["steps_to_adamw"] <= info["steps"]
    # state bytes per parameter: AdamW's two float32 moments, Tiger's one
    assert rows["optax.adamw"]["state_bytes_per_param"] == pytest.approx(8.0)
    assert rows["tiger"]["state_bytes_per_param"] == pytest.approx(4.0)


def _fake_runner(best_lr, seed_offsets=()):
    """Accuracy peaked at ``best_lr`` (quadratic in log2 lr), shifted by
    ``seed_offsets[seed]`` where given."""

    def grid_runner(task, entry):
        def run(lrs, seeds):
            raise AssertionError("the sweep runs (lr, seed) pairs")

        def pairs(lr_seeds):
            shift = lambda s: seed_offsets[s] if s < len(seed_offsets) else 0.0
            acc = np.array(
                [0.9 - 0.01 * math.log2(lr / best_lr) ** 2 + shift(s) for lr, s in lr_seeds]
            )
            curve = np.repeat(acc[:, None], bench_suite.EVALS, axis=-1)
            calls.append(lr_seeds)
            return curve, curve, curve

        run.pairs = pairs
        return run

    calls = []
    grid_runner.calls = calls

    return grid_runner


@pytest.mark.parametrize("best_factor, n_rates", [(1.0, 5), (16.0, 8), (1 / 32, 9)])
def test_sweep_extends_past_an_edge_until_the_best_is_bracketed(monkeypatch, best_factor, n_rates):
    entry = bench_suite.OPTIMIZERS["optax.adamw"]
    monkeypatch.setattr(bench_suite, "grid_runner", _fake_runner(entry.centre * best_factor))
    task = suite_tasks.Task("t", {}, None, None, None, None, "acc", True, 10, 8, "")
    rows, best, edge = bench_suite.sweep(task, entry)
    assert best == pytest.approx(best_factor)
    assert not edge
    assert len(rows) == n_rates


@pytest.mark.parametrize("moved, programs", [(1.0, 1), (4.0, 4), (1 / 4, 4)])
def test_warm_sweep_brackets_with_three_rates_and_all_seeds_in_one_program(
    monkeypatch, moved, programs
):
    """Warm-started where the best was, one program brackets it when it has not moved;
    when it has, the sweep extends until bracketed and runs the other seeds there."""
    entry = bench_suite.OPTIMIZERS["optax.adamw"]
    runner = _fake_runner(entry.centre * 2.0 * moved)
    monkeypatch.setattr(bench_suite, "grid_runner", runner)
    task = suite_tasks.Task("t", {}, None, None, None, None, "acc", True, 10, 8, "")
    rows, best, edge = bench_suite.sweep(task, entry, seeds=(0, 1, 2), warm=2.0)
    assert best == pytest.approx(2.0 * moved) and not edge
    assert min(rows) < best < max(rows)
    assert len(rows[best]["metric"]) == 3  # every seed at the best rate
    assert len(rows[2.0]["metric"]) == 3  # the first program ran every seed there
    assert all(len(r["metric"]) == 1 for f, r in rows.items() if f not in (best, 2.0))
    assert len(runner.calls) == programs
    assert sorted(s for _, s in runner.calls[0]) == [0, 0, 0, 1, 2]


def test_warm_start_reads_the_task_then_the_same_models_other_task(tmp_path):
    """A sweep starts at its own earlier best; with none on its task, at the best on the
    task training the same model; a best still at the grid's edge is no start at all."""
    adamw, tiger = (bench_suite.OPTIMIZERS[n] for n in ("optax.adamw", "tiger"))
    row = lambda name, lr, edge=False: {"optimizer": name, "best_lr": lr, "best_at_edge": edge}
    earlier = {
        "fortunes_lm": {"rows": [row("optax.adamw", adamw.centre * 2), row("tiger", 1.0, True)]},
        "demo_lm": {"rows": [row("optax.adamw", adamw.centre / 2)]},
        "digits_mlp": {"rows": [row("tiger", tiger.centre * 4)]},
    }
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"tasks": earlier}))
    warm = bench_suite.warm_factors(str(path), bench_suite.OPTIMIZERS)
    start = lambda task, name: bench_suite.warm_factor(warm, task, name)
    assert start("fortunes_lm", "optax.adamw") == (pytest.approx(2.0), "fortunes_lm")
    assert start("demo_lm", "optax.adamw") == (pytest.approx(0.5), "demo_lm")
    assert start("demo_lm", "tiger") == (None, None)  # fortunes' best was at the edge
    assert start("digits_mlp", "tiger") == (pytest.approx(4.0), "digits_mlp")
    assert start("digits_cnn", "tiger") == (None, None)  # another model: no warm start
    assert bench_suite.warm_factors(str(tmp_path / "missing.json"), bench_suite.OPTIMIZERS) == {}


def test_a_warm_sweep_compares_rates_on_the_sweep_seeds_only(monkeypatch):
    """Seeds 1 and 2 are worse everywhere: the warm centre, the only rate where they run
    first, must not lose to its neighbours for that (a cold sweep would pick it)."""
    entry = bench_suite.OPTIMIZERS["optax.adamw"]
    runner = _fake_runner(entry.centre * 2.0, seed_offsets=(0.0, -0.05, -0.05))
    monkeypatch.setattr(bench_suite, "grid_runner", runner)
    task = suite_tasks.Task("t", {}, None, None, None, None, "acc", True, 10, 8, "")
    rows, best, edge = bench_suite.sweep(task, entry, seeds=(0, 1, 2), warm=2.0)
    assert best == 2.0 and not edge and len(runner.calls) == 1
    cold_rows, cold_best, _ = bench_suite.sweep(task, entry, seeds=(0, 1, 2))
    assert cold_best == best


def test_sweep_flags_a_best_rate_still_at_the_edge(monkeypatch):
    entry = bench_suite.OPTIMIZERS["optax.adamw"]
    monkeypatch.setattr(bench_suite, "grid_runner", _fake_runner(entry.centre * 2**20))
    task = suite_tasks.Task("t", {}, None, None, None, None, "acc", True, 10, 8, "")
    rows, best, edge = bench_suite.sweep(task, entry)
    assert edge and best == max(rows) == 4.0 * 2**bench_suite.MAX_EXTEND


def test_steps_to_reach_reads_the_mean_curve_in_the_metrics_direction():
    up = suite_tasks.Task("t", {}, None, None, None, None, "acc", True, 100, 8, "")
    down = suite_tasks.Task("t", {}, None, None, None, None, "loss", False, 100, 8, "")
    curve = {"curve": [0.1 * i for i in range(1, 11)]}
    assert bench_suite.steps_to_reach(up, curve, 0.35) == 40
    assert bench_suite.steps_to_reach(up, curve, 1.5) is None
    assert (
        bench_suite.steps_to_reach(down, {"curve": curve["curve"][::-1]}, 0.35) == 80
    )  # 0.3 at the 8th


@pytest.mark.parametrize("stride", [1, 2])
def test_patch_conv_is_flax_conv(stride):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    conv = suite_tasks.PatchConv(5, stride=stride)
    params = jax.tree.map(lambda a: a + 0.1, conv.init(jax.random.key(1), x))  # bias != 0
    want = nn.Conv(5, (3, 3), strides=stride).apply(params, x)
    np.testing.assert_allclose(conv.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_fortunes_task_says_which_package_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        suite_tasks.load_fortunes(str(tmp_path))

"""The main job end to end: a short run of every optimizer, its log, plot and errors."""

import json
import subprocess
import sys

import pytest
from helpers import one_device_env

from optax_ext import demo

# the demo as a user runs it, on one device, with the suite's compile-time flags: they
# change how fast XLA compiles, not what the demo does
ENV = one_device_env()


def run_demo(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "optax_ext.demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_short_run_writes_log_and_plot_and_recommends(tmp_path):
    log, png = tmp_path / "noise.jsonl", tmp_path / "loss.png"
    out = run_demo(
        "--steps",
        "20",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--accumulation-steps",
        "2",
        "--no-progress",
        "--log",
        str(log),
        "--plot",
        str(png),
    )
    assert out.returncode == 0, out.stderr
    assert "held-out loss" in out.stdout and "recommended muon settings" in out.stdout
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "g2", "trace_sigma", "b_simple_ema"} <= set(records[-1])
    assert png.stat().st_size > 10_000
    # the scaling CLI reads the demo's log
    noise = subprocess.run(
        [sys.executable, "-m", "scaling", "noise", str(log), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert noise.returncode == 0, noise.stderr


@pytest.mark.parametrize("name", sorted(demo.RECIPES))
def test_every_optimizer_learns_a_little(name):
    history = demo.train(
        steps=12, batch_size=8, seq_len=16, optimizer=name, width=32, layers=1, progress=False
    )
    assert history.losses[-1] < history.losses[0], history.losses
    assert history.valid_loss_end < history.valid_loss_start


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "expected an integer >= 1, got '0'"),
        (["--batch-size", "7"], "expected an even integer >= 1 (it is split in halves"),
        (["--optimizer", "sgd"], "invalid choice"),
        (["--lr", "-1"], "expected a number > 0, got '-1'"),
        (["--lr", "inf"], "expected a number > 0 (finite), got 'inf'"),
        (["--log", "/nonexistent/dir/log.jsonl"], "cannot write --log"),
    ],
)
def test_bad_flags_give_one_line_errors(args, message, capsys):
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_flag_exits_2_from_the_command_line():
    out = run_demo("--steps", "0", timeout=60)
    assert out.returncode == 2
    assert "expected an integer >= 1, got '0'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_fails_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert demo.main(["--plot", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        'needs matplotlib: pip install "optax-ext[plot]" (in a checkout: pip install -e ".[plot]")'
        in err
    )
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_plot_hint_is_the_readmes_install_command():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert 'pip install -e ".[plot]"' in readme


def test_model_size_arguments_reach_the_model():
    run = lambda width: (
        demo.train(
            steps=2,
            batch_size=2,
            seq_len=8,
            width=width,
            layers=1,
            progress=False,
            measure_noise=False,
        ).losses
    )
    assert run(16) != run(32)  # another width is another model


def test_help_explains_every_flag():
    text = demo.build_parser().format_help()
    for flag in (
        "--optimizer",
        "--steps",
        "--batch-size",
        "--accumulation-steps",
        "--lr",
        "--log",
        "--plot",
        "--seed",
        "--seq-len",
    ):
        assert flag in text

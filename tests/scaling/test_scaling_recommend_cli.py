"""recommend() against its formulas written out here, and the command line."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.__main__ import main
from scaling.recommendation import FAMILIES, recommend

close = lambda a, b, rtol=1e-10: np.testing.assert_allclose(a, b, rtol=rtol)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- recommend()


def test_sgd_and_sgdm_follow_b_noise_transfer():
    r = recommend("sgd", 0.1, 256, 1024, b_noise=500, weight_decay=5e-4, steps=1000)
    want = 0.1 * (1 + 500 / 256) / (1 + 500 / 1024)
    close(r.new_lr, want)
    close(r.new_weight_decay, 5e-4 * (0.1 / want) * 4)
    close(r.steps_ratio, (1 + 500 / 1024) / (1 + 500 / 256))
    close(r.new_steps, 1000 * r.steps_ratio)
    close(r.new_examples, r.new_steps * 1024)
    assert not r.has_peak and r.peak_batch is None
    m = 0.1 / 1.9
    r = recommend("sgdm", 0.1, 256, 1024, b_noise=500)
    close(r.new_lr, 0.1 * (1 + m * 500 / 256) / (1 + m * 500 / 1024))
    assert r.new_beta1 == 0.9 and "momentum" in r.reasons["beta1"]


def test_adamw_follows_mean_field_curve_and_half_life():
    beta1, bsim = 0.95, 3000.0
    r_ = (1 - beta1) / (1 + beta1)
    f = lambda b: 1 / (r_ * (1 + bsim / b) ** 0.5 + (1 - r_) * (1 + bsim / b) ** -0.5)
    r = recommend("adamw", 3e-4, 64, 512, b_simple=bsim, beta1=beta1, beta2=0.98, weight_decay=0.1)
    close(r.new_lr, 3e-4 * f(512) / f(64))
    close(r.new_beta2, 0.98**8)
    close(r.new_weight_decay, 0.1 * (3e-4 / r.new_lr) * 8)
    close(r.peak_batch, bsim * (1 - beta1) / (3 * beta1 - 1))
    assert r.has_peak and "falls beyond" in r.reasons["lr"]


def test_sign_families_use_surge_form_without_peak_by_default():
    c, k2 = math.pi / 2, 1000.0
    beta = lambda b: (1 + c * k2 / b) ** -0.5
    f = lambda b: 2 * beta(b) / (1 + beta(b) ** 2)
    for family in ("lion", "tiger"):
        r = recommend(family, 1e-4, 128, 2048, b_simple=k2)
        close(r.new_lr, 1e-4 * f(2048) / f(128))
        assert not r.has_peak and "no peak" in r.reasons["lr"]
    r = recommend("lion", 1e-4, 128, 2048, b_simple=k2, beta_noise=0.5)
    assert r.has_peak and r.peak_batch == pytest.approx(523.599, rel=1e-5)


def test_fallback_is_labelled_and_strict_raises():
    r = recommend("adam", 1e-3, 100, 400)
    close(r.new_lr, 2e-3)
    assert "fallback" in r.rule and "fallback" in r.reasons["lr"]
    assert r.steps_ratio is None and "needs a noise scale" in r.reasons["steps"]
    r = recommend("sgd", 0.1, 100, 400)
    close(r.new_lr, 0.4)
    assert "linear" in r.reasons["lr"]
    with pytest.raises(ValueError, match="needs a noise scale"):
        recommend("lion", 1e-4, 100, 400, strict=True)


def test_other_noise_scale_stands_in_and_says_so():
    r = recommend("sgd", 0.1, 256, 1024, b_simple=500)
    close(r.new_lr, 0.1 * (1 + 500 / 256) / (1 + 500 / 1024))
    assert "B_simple used as b_noise" in r.reasons["lr"]


def test_table_and_dict():
    r = recommend("adamw", 3e-4, 256, 1024, b_simple=2000, weight_decay=0.1, steps=1e4)
    text = str(r)
    for word in ("lr", "weight_decay", "beta1", "beta2", "steps", "examples", "reason"):
        assert word in text
    d = json.loads(json.dumps(r.as_dict()))
    assert d["new_lr"] == r.new_lr and d["reasons"]["beta2"] == r.reasons["beta2"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="rmsprop"), "optimizer must be one of"),
        (dict(lr=0.0), r"lr must be in \(0, inf\), got 0.0"),
        (dict(batch=-1), "batch must be"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (dict(beta2=-0.1), "beta2"),
        (dict(b_simple=0.0), "b_simple"),
        # one recommendation per call: NumPy's "only 0-dimensional arrays" named nothing
        (dict(batch=np.array([256.0, 512.0])), r"batch must be a single number.*\(2,\)"),
        (dict(new_batch=np.array([1024.0])), r"new_batch must be a single number"),
        (dict(b_simple=np.array([1e3, 2e3])), r"b_simple must be a single number"),
        (dict(lr="3e-4"), r"lr must be a real number, got '3e-4'"),
        (dict(weight_decay=True), r"weight_decay must be a real number, got True"),
        (dict(strict="no"), r"strict must be a bool"),
    ],
)
def test_recommend_rejects_bad_input(kwargs, match):
    args = dict(optimizer="adamw", lr=1e-3, batch=64, new_batch=128) | kwargs
    with pytest.raises(ValueError, match=match):
        recommend(**args)


@settings(max_examples=30, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    lr=st.floats(1e-6, 1.0),
    batch=st.floats(1, 1e6),
    noise=st.floats(1e-2, 1e6),
    wd=st.floats(0, 1),
)
def test_recommend_to_the_same_batch_changes_nothing(family, lr, batch, noise, wd):
    r = recommend(family, lr, batch, batch, b_noise=noise, weight_decay=wd, beta2=0.99)
    close([r.new_lr, r.new_weight_decay, r.new_beta2, r.steps_ratio], [lr, wd, 0.99, 1.0])


# -------------------------------------------------------------- CLI in-process


def test_cli_lr_json(capsys):
    assert (
        main(
            [
                "lr",
                "--optimizer",
                "adamw",
                "--lr",
                "3e-4",
                "--batch",
                "256",
                "--to",
                "1024",
                "--b-simple",
                "2000",
                "--weight-decay",
                "0.1",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    rec = recommend("adamw", 3e-4, 256, 1024, b_simple=2000, weight_decay=0.1)
    assert out["recommendation"]["new_lr"] == rec.new_lr
    close(out["rules"]["sqrt"]["lr"], 6e-4)
    close(out["rules"]["sde"]["lr"], 6e-4)


def test_cli_tables(capsys, tmp_path):
    assert main(["wd", "--lr", "3e-4", "--weight-decay", "0.1"]) == 0
    assert "0.0387298" in capsys.readouterr().out
    assert main(["laws", "--compute", "1e17", "--json"]) == 0
    close(json.loads(capsys.readouterr().out)["deepseek"]["lr"], 2.33817e-3, rtol=1e-5)
    log = tmp_path / "noise.jsonl"
    log.write_text(
        "".join(
            json.dumps({"step": i, "g2": 4.0, "trace_sigma": 100.0 + i % 2}) + "\n"
            for i in range(20)
        )
    )
    assert main(["noise", str(log), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 20 and 25.0 < out["b_simple"] < 25.25


@pytest.mark.parametrize(
    "argv, match",
    [
        (["lr", "--optimizer", "sgd", "--lr", "0.1", "--batch", "0", "--to", "8"], "--batch"),
        (
            [
                "lr",
                "--optimizer",
                "adam",
                "--lr",
                "1e-3",
                "--batch",
                "8",
                "--to",
                "16",
                "--beta2",
                "1",
            ],
            r"\[0, 1\)",
        ),
        (
            ["lr", "--optimizer", "adam", "--lr", "1e-3", "--batch", "8", "--to", "16", "--strict"],
            "needs a noise scale",
        ),
        (
            [
                "lr",
                "--optimizer",
                "sgd",
                "--lr",
                "1e-3",
                "--batch",
                "8",
                "--to",
                "16",
                "--rule",
                "sgd",
            ],
            "needs --b-noise",
        ),
        (["wd", "--lr", "1e-3", "--weight-decay", "0.1", "--lion-k", "20"], "k must be in"),
        (["laws"], "give --compute"),
        (["noise", "/nonexistent/log.jsonl"], "No such file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(match, err), err


# ------------------------------------------------------------ CLI subprocess


def _run(*argv, stdin=None):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "scaling", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_cli_subprocess_end_to_end(tmp_path):
    p = _run(
        "lr",
        "--optimizer",
        "lion",
        "--lr",
        "1e-4",
        "--batch",
        "128",
        "--to",
        "2048",
        "--b-simple",
        "1000",
        "--json",
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["recommendation"]["has_peak"] is False
    p = _run("lr", "--help")
    assert p.returncode == 0 and "--b-simple" in p.stdout and "--optimizer" in p.stdout


def test_cli_subprocess_bad_input_and_corrupt_log():
    p = _run("lr", "--optimizer", "adamw", "--lr", "-3", "--batch", "64", "--to", "128")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--lr" in p.stderr
    log = '{"step": 0, "b_simple": 12.0}\n{"step": 1, "b_simple": oops}\n'
    p = _run("noise", "-", stdin=log)
    assert p.returncode == 2 and "line 2" in p.stderr and "Traceback" not in p.stderr


def test_recommend_reads_one_row_of_the_rules_table(monkeypatch):
    """A family is its row of ``RULES``: a copy under a new name recommends the same."""
    from scaling import recommendation

    for name in recommendation.FAMILIES:
        monkeypatch.setitem(recommendation.RULES, "copy", recommendation.RULES[name])
        monkeypatch.setattr(recommendation, "FAMILIES", (*recommendation.FAMILIES, "copy"))
        for noise in (dict(b_simple=900.0, b_noise=700.0, stderr=100.0), {}):
            want = recommendation.recommend(name, 1e-3, 64, 512, weight_decay=0.1, **noise)
            got = recommendation.recommend("copy", 1e-3, 64, 512, weight_decay=0.1, **noise)
            assert got.as_dict() | {"optimizer": name} == want.as_dict()
        monkeypatch.undo()

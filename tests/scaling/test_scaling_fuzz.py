"""No traceback from the command line, and no inf/nan from the API, at the edges.

A seeded fuzz calls ``main()`` in-process (fast: no interpreter start per case) on
thousands of argument vectors built from extreme and malformed numbers, and on
malformed noise logs; every case must end with status 0 and finite numbers in the
tables, or status 2 and one line on stderr. Then each edge case reported against the
API is pinned as a regression test.
"""

import contextlib
import io
import json
import math
import random
import re

import pytest

import scaling
import scaling.__main__ as cli_main
from scaling import batch_size as bs
from scaling import laws, noise, weight_decay
from scaling.__main__ import main
from scaling.recommendation import FAMILIES, recommend

NUMBERS = [
    "1e-300",
    "1e300",
    "1e308",
    "1.7e308",
    "5e-324",
    "1e-320",
    "1e400",
    "1e999999",
    "-1",
    "0",
    "-0",
    "nan",
    "inf",
    "-inf",
    "1",
    "2",
    "0.5",
    "0.9",
    "0.999",
    "0.99999999",
    "1e-8",
    "3",
    "256",
    "1024",
    "1e6",
    "abc",
    "",
    "0x10",
    "1_000",
    "  7  ",
    "9" * 400,
    "1e",
    "--",
    "１２",
]
FLAGS = {
    "lr": [
        "--optimizer",
        "--lr",
        "--batch",
        "--to",
        "--b-noise",
        "--b-simple",
        "--beta1",
        "--beta2",
        "--weight-decay",
        "--steps",
        "--beta-noise",
        "--c",
        "--rule",
        "--strict",
        "--json",
    ],
    "wd": [
        "--lr",
        "--weight-decay",
        "--batch",
        "--to",
        "--new-lr",
        "--dataset-size",
        "--lion-k",
        "--json",
    ],
    "laws": ["--compute", "--params", "--tokens", "--loss", "--json"],
    "noise": ["--ema", "--every", "--window", "--json"],
}
REQUIRED = {
    "lr": ["--optimizer", "--lr", "--batch", "--to"],
    "wd": ["--lr", "--weight-decay"],
    "laws": [],
    "noise": [],
}
CHOICES = {
    "--optimizer": [*FAMILIES, "rmsprop"],
    "--rule": ["sqrt", "linear", "sgd", "sgdm", "sign", "adam", "muon", "sde", "x"],
}
SWITCHES = ("--strict", "--json")
GOOD_NUMBERS = ["1e-300", "1e300", "1e-30", "1e30", "1e308", "5e-324", "0.5", "0.9", "3", "1024"]

LOG_LINES = [
    '{"step": %d, "g2": 1.5, "trace_sigma": 40.0}',
    '{"step": %d, "g2": -0.5, "trace_sigma": 40.0}',
    '{"step": %d, "g2": 1e308, "trace_sigma": -1e308}',
    '{"step": %d, "g2": 0, "trace_sigma": 0}',
    '{"step": %d, "b_simple": 12.5}',
    '{"step": %d, "g2": ' + "9" * 400 + ', "trace_sigma": 1}',
    '{"step": ' + "9" * 400 + ', "g2": 1, "trace_sigma": 1}',
    '{"step": %d, "g2": 1, "trace_sigma": 1, "batch_size": 32}',
    '{"step": %d, "g2": 1, "trace_sigma": 1, "batch_size": 64}',
    '{"step": %d, "g2": NaN, "trace_sigma": 1}',
    '{"step": %d, "g2": Infinity, "trace_sigma": 1}',
    '{"step": %d, "g2": 1e400, "trace_sigma": 1}',
    '{"step": %d, "g2": "1", "trace_sigma": 1}',
    '{"step": %d, "g2": null, "trace_sigma": 1}',
    '{"step": true, "b_simple": 1}',
    '{"step": 1.5, "b_simple": 1}',
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    "1" * 5000,
    '{"step": %d, "g2": 1, "trace_sigma"',
    "[1, 2]",
    "null",
    "",
    "   ",
    "\x00\x01",
    '{"step": 3, "b_simple": 1}',
]


def _run(argv, stdin_text=None):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _non_finite_values(text):
    """Table cells (all columns but the free-text last one) that read inf or nan."""
    bad = []
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        for cell in cells[:-1] if len(cells) > 1 else []:
            if cell.lower().lstrip("+-") in ("inf", "nan"):
                bad.append(line)
    return bad


def _check(argv, rc, out, err):
    assert rc in (0, 2), (argv, rc)
    if rc == 2:
        assert err.count("\n") == 1 and err.startswith("python -m scaling"), (argv, err)
        return
    if "--json" in argv:
        # allow_nan=False in the writer: a non-finite number would have raised
        json.loads(out)
    else:
        assert not _non_finite_values(out), (argv, _non_finite_values(out))


def _argv(rng, log_path):
    cmd = rng.choice(list(FLAGS))
    argv = [cmd] + ([str(log_path)] if cmd == "noise" else [])
    numbers = GOOD_NUMBERS if rng.random() < 0.5 else NUMBERS
    for flag in REQUIRED[cmd] + rng.sample(FLAGS[cmd], rng.randint(0, len(FLAGS[cmd]))):
        argv.append(flag)
        if flag in SWITCHES:
            continue
        argv.append(rng.choice(CHOICES.get(flag, numbers)))
    return argv


def _log(rng):
    lines, step = [], 0
    for _ in range(rng.randint(0, 12)):
        step += rng.choice([1, 1, 1, 5, 0, -3])
        line = rng.choice(LOG_LINES[:9] * 4 + LOG_LINES)
        lines.append(line % step if "%d" in line else line)
    return "\n".join(lines)


@pytest.fixture
def one_parser(monkeypatch):
    # Building the argparse tree costs more than the arithmetic; parsers are reusable.
    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)


def test_fuzzed_command_lines_never_raise(tmp_path, one_parser):
    rng = random.Random(20261201)
    cases = clean = 0
    log = tmp_path / "log.jsonl"
    for _ in range(2500):
        argv = _argv(rng, log)
        if argv[0] == "noise":
            log.write_text(_log(rng), encoding="utf-8")
        rc, out, err = _run(argv)
        _check(argv, rc, out, err)
        cases += 1
        clean += rc == 0
    # Not vacuous: a fair share of the vectors reaches the arithmetic and prints a table.
    assert cases == 2500 and clean > 200, clean


def test_fuzzed_noise_logs_never_raise(tmp_path, one_parser):
    rng = random.Random(7)
    path = tmp_path / "noise.jsonl"
    for _ in range(400):
        path.write_bytes(_log(rng).encode("utf-8") + rng.choice([b"", b"\n\xff\xfe", b"\n"]))
        argv = ["noise", str(path)] + rng.choice([[], ["--json"], ["--ema", "0"], ["--every", "1"]])
        _check(argv, *_run(argv))


@pytest.mark.parametrize(
    "argv, match",
    [
        # the cases first reported: each used to raise or print inf
        (
            "lr --optimizer lion --lr 0.1 --batch 1e-300 --to 1e300 --b-simple 1e300 --c 1e300",
            r"beta is 0.0 for batch=1e-300, b_simple=1e\+300, c=1e\+300",
        ),
        (
            "lr --optimizer sgd --lr 0.1 --batch 1e-300 --to 1e300 --b-noise 1",
            r"the new lr is inf for lr=0.1, batch=1e-300, new_batch=1e\+300, b_noise=1.0",
        ),
        ("laws --loss 1e300", r"B_crit is 0.0 for loss=1e\+300"),
        ("lr --optimizer adamw --lr 1e308 --batch 1 --to 4 --b-simple 10", "the new lr is inf"),
        (
            "wd --lr 1e-300 --weight-decay 1e300 --batch 1e-300 --to 1e300",
            r"new weight decay .* outside float64 for --lr 1e-300, --weight-decay 1e\+300, "
            r"--batch 1e-300, --to 1e\+300 \(new lr 1 by the sqrt rule\)",
        ),
        (
            "wd --lr 1e-300 --weight-decay 1e300 --batch 1e300 --to 1e-300",
            "new lr by the sqrt rule is outside float64 .* give --new-lr",
        ),
        (
            "lr --optimizer adamw --lr 1 --batch 1 --to 2 --b-simple " + "9" * 400,
            "expected a number > 0 \\(finite\\)",
        ),
    ],
)
def test_reported_command_lines(argv, match):
    rc, out, err = _run(argv.split())
    assert rc == 2 and err.count("\n") == 1 and re.search(match, err), err
    assert "new_lr" not in err  # an argument the user never passed


def test_far_apart_batches_get_the_finite_answer_and_say_which_rules_cannot():
    argv = "lr --optimizer adamw --lr 0.1 --batch 1e-300 --to 1e300 --b-simple 1e300".split()
    rc, out, _ = _run(argv)
    assert rc == 0 and not _non_finite_values(out)
    # the mean-field curve: 0.1 f(beta2)/f(beta1), f = 1/(r/beta + beta(1-r)),
    # beta1 = sqrt(1e-300/(1e-300 + 1e300)), beta2 = sqrt(1/2), r = 0.1/1.9
    r = 0.1 / 1.9
    f = lambda b: 1 / (r / b + b * (1 - r))
    want = 0.1 * f(0.5**0.5) / f(1e-150 / (1e300**0.5))
    got = recommend("adamw", 0.1, 1e-300, 1e300, b_simple=1e300).new_lr
    assert got == pytest.approx(want, rel=1e-12) and f"{want:.3g}" in out  # 3 digits printed
    assert re.search(r"linear +- +invalid: the new lr is inf", out)
    assert "steps" in out and "leaves float64" in out


def test_wd_error_names_only_given_flags():
    rc, _, err = _run(
        "wd --lr 1e-300 --weight-decay 1e300 --batch 1e-10 --to 1e300 --new-lr 1".split()
    )
    assert rc == 2 and "--new-lr 1" in err and "sqrt rule" not in err


@pytest.mark.parametrize(
    "text, match",
    [
        (
            '{"step": 1, "g2": ' + "9" * 400 + ', "trace_sigma": 1}',
            r"line 1: 'g2' must be a finite number, got 9999.*\(400 characters\)",
        ),
        ('{"a":' * 5000 + "1" + "}" * 5000, "line 1: JSON nested too deeply"),
        ("[" * 100_000, "line 1: JSON nested too deeply"),
        ('{"step": 1, "g2": 1e400, "trace_sigma": 1}', "'g2' must be a finite number, got inf"),
        (
            '{"step": 2, "b_simple": 1}\n{"step": 2, "b_simple": 1}',
            "line 2: step 2 does not come after step 2",
        ),
        (
            '{"step": 1, "b_simple": 1, "batch_size": 32}\n'
            '{"step": 2, "b_simple": 1, "batch_size": 64}',
            "line 2: batch_size changed from 32 to 64 at step 2",
        ),
        ('{"step": ' + "9" * 5000 + ', "b_simple": 1}', "line 1: not valid JSON"),
    ],
)
def test_malformed_logs_name_the_line(tmp_path, text, match):
    path = tmp_path / "log.jsonl"
    path.write_text(text)
    rc, _, err = _run(["noise", str(path)])
    assert rc == 2 and err.count("\n") == 1 and re.search(match, err), err


def test_log_that_is_not_text(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1, "b_simple": 1}\n\xff\xfe')
    rc, _, err = _run(["noise", str(path)])
    assert rc == 2 and "not UTF-8 text" in err


def test_log_with_gaps_is_read():
    entries = noise.read_noise_log(['{"step": 1, "b_simple": 2}', '{"step": 50, "b_simple": 4}'])
    assert [e.step for e in entries] == [1, 50]


# ------------------------------------------------------------------------ the API


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "lr, batch, new_batch, b_simple",
    [
        (0.1, 1e-300, 1e300, 1e300),
        (1e308, 1, 4, 10),
        (1e-300, 1e300, 1e-300, 1),
        (0.1, 1, 1e300, 1e-300),
        (1e-300, 1e-300, 1e-300, 1e300),
    ],
)
def test_recommend_is_finite_or_a_named_error(family, lr, batch, new_batch, b_simple):
    try:
        r = recommend(
            family, lr, batch, new_batch, b_simple=b_simple, weight_decay=0.1, steps=1e300
        )
    except ValueError as e:
        assert re.search(r"lr|batch|weight_decay|b_simple", str(e)), e
        return
    values = [r.new_lr, r.new_weight_decay, r.new_beta2, r.steps_ratio, r.new_steps, r.peak_batch]
    assert all(x is None or math.isfinite(x) for x in values), values
    assert r.new_lr > 0


def test_recommend_rejects_non_finite_and_non_numbers():
    with pytest.raises(ValueError, match=r"lr must be in \(0, inf\), got inf"):
        recommend("adamw", math.inf, 1, 2)
    with pytest.raises(ValueError, match="lr must be a real number, got '1e-3'"):
        recommend("adamw", "1e-3", 1, 2)
    with pytest.raises(ValueError, match="steps must be in"):
        recommend("adamw", 1e-3, 1, 2, steps=math.inf)


def test_two_batch_estimates_need_two_batch_sizes():
    with pytest.raises(ValueError, match="b_small and b_big must differ.*b_small=32, b_big=32"):
        noise.two_batch_estimates(1, 1, 32, 32)
    with pytest.raises(ValueError, match="b_small must be in"):
        noise.two_batch_estimates(1, 1, 0, 32)
    with pytest.raises(ValueError, match=r"\|G\|\^2 is inf for .*g2_big=1e\+308"):
        noise.two_batch_estimates(1, 1e308, 1e300, 1e301)


def test_kaplan_critical_batch_at_the_edges():
    with pytest.raises(ValueError, match="B_crit cannot be computed for loss=1e-300"):
        laws.kaplan_critical_batch(1e-300)
    with pytest.raises(ValueError, match=r"B_crit is 0.0 for loss=1e\+300"):
        laws.kaplan_critical_batch(1e300)
    # the rewritten power keeps the worked number and reaches further than before
    assert round(laws.kaplan_critical_batch(3.0), -2) == 1069100.0
    assert math.isfinite(laws.kaplan_critical_batch(1e-60))


def test_ema_timescale_at_the_edges():
    with pytest.raises(ValueError, match="EMA timescale is inf for lr=1e-200, weight_decay=1e-200"):
        weight_decay.ema_timescale(1e-200, 1e-200)
    # 1/lr/wd: finite where 1/(lr*wd) was a ZeroDivisionError
    assert weight_decay.ema_timescale(1e-150, 1e-150) == pytest.approx(1e300, rel=1e-12)


def test_sign_beta_stays_positive_where_the_ratio_overflows():
    # (1 + c k2/B)^(-1/2) with c k2/B = inf was 0 and then a ZeroDivisionError
    beta = bs.sign_beta(1e-300, 1e300, c=1.0)
    assert beta == pytest.approx(1e-300, rel=1e-12)
    r = bs.adam_transfer(0.1, 1e-300, 1.0, 1e300)
    assert math.isfinite(r.lr) and r.lr > 0


def test_sgd_transfer_with_huge_noise_scale_is_the_linear_rule():
    # (1 + Bn/B1)/(1 + Bn/B2) -> B2/B1 as Bn -> inf; inf/inf before
    assert bs.sgd_transfer(0.1, 256, 1024, 1e308).lr == pytest.approx(0.4, rel=1e-12)


def test_sqrt_rule_far_apart_batches():
    # the ratio 1e600 leaves float64; its square root does not
    assert bs.sqrt_rule(1e-10, 1e-300, 1e300) == pytest.approx(1e290, rel=1e-12)


def test_public_api_still_flat():
    assert scaling.muon_transfer is bs.muon_transfer

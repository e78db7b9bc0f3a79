"""One-way packages: ``scaling`` never loads JAX nor ``optax_ext``, not even lazily;
``optax_ext`` uses scaling's public API.

The measuring transform lives in ``optax_ext.noise_measurement`` (``ox.measure_noise_scale``)
and reads its current value with scaling's estimator.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[2]
HEAVY = ("jax", "jaxlib", "optax", "flax", "optax_ext", "chex")

_PROBE = r"""
import json, sys, tempfile, os, importlib, pkgutil
import scaling
from scaling.__main__ import main
for info in pkgutil.iter_modules(scaling.__path__):  # every module, every public name
    module = importlib.import_module("scaling." + info.name)
    for name in getattr(module, "__all__", ()):
        getattr(module, name)
for name in scaling.__all__:
    getattr(scaling, name)
log = os.path.join(tempfile.mkdtemp(), "noise.jsonl")
with open(log, "w") as f:
    for i in range(300):
        f.write(json.dumps({"step": i, "g2": 1.0 + (i % 3), "trace_sigma": 40.0 + i % 5}) + "\n")
codes = [
    main("lr --optimizer adamw --lr 3e-4 --batch 256 --to 1024 --b-simple 2000".split()),
    main("lr --optimizer muon --lr 0.02 --batch 256 --to 1024 --b-simple 2000".split()),
    main("wd --lr 3e-4 --weight-decay 0.1 --batch 256 --to 1024".split()),
    main("laws --compute 1e20 --loss 3".split()),
    main(["noise", log]),
    main(["noise", log, "--json"]),
]
sys.stdout = sys.__stdout__
print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules
                  if m.split(".")[0] in HEAVY)}))
""".replace("HEAVY", repr(HEAVY))


def _run_probe():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_scaling_and_its_command_line_do_not_import_jax():
    got = _run_probe()
    assert got["codes"] == [0, 0, 0, 0, 0, 0]
    assert got["loaded"] == [], got["loaded"]


def test_scaling_never_imports_optax_ext_or_jax_anywhere():
    # Not at module level, not inside a function, not through a module __getattr__.
    pattern = re.compile(r"^\s*(from|import) (optax_ext|jax|jaxlib|optax|flax|chex)\b")
    for path in (ROOT / "scaling").glob("*.py"):
        text = path.read_text()
        assert "__getattr__" not in text, f"{path.name}: a module __getattr__"
        for line in text.splitlines():
            assert not pattern.match(line), f"{path.name}: imports {line.strip()!r}"


def test_the_transform_names_live_in_optax_ext():
    import optax_ext as ox
    import scaling
    from optax_ext import noise_measurement

    for name in ("measure_noise_scale", "noise_scale", "noise_log_record", "NoiseScaleState"):
        assert getattr(ox.noise_measurement, name) is getattr(noise_measurement, name)
        assert not hasattr(scaling, name) and name not in scaling.__all__
    # one type for the current value, whether read from a log or from the state
    assert ox.noise_measurement.CurrentNoiseScale is scaling.SettledNoiseScale
    assert not hasattr(scaling, "su_coupled_decay_schedules")
    assert callable(ox.schedules.coupled_decay_schedules)
    assert callable(ox.schedules.constant_decay_lr_schedule)


def test_unknown_names_still_raise_attribute_error():
    import pytest

    import scaling
    from scaling import noise, weight_decay

    for module in (scaling, noise, weight_decay):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018
        with pytest.raises(AttributeError, match="no attribute 'measure_noise_scale'"):
            module.measure_noise_scale  # noqa: B018


def test_protocol_names_are_what_the_transform_reads():
    import jax.numpy as jnp

    from optax_ext.noise_measurement import measure_noise_scale, noise_scale
    from scaling.protocol import ACCUMULATION_STEPS, EXTRA_ARGS, MICRO_GRAD_SQ_NORM

    assert EXTRA_ARGS == ("micro_grad_sq_norm", "accumulation_steps", "grads_averaged_over")
    tx = measure_noise_scale(batch_size=8)
    g = {"w": jnp.ones(3)}
    _, s = tx.update(g, tx.init(g), **{MICRO_GRAD_SQ_NORM: jnp.float32(4.0), ACCUMULATION_STEPS: 4})
    assert round(float(noise_scale(s).b_simple), 4) == 4.0


def test_a_closed_pipe_ends_the_command_quietly():
    import subprocess
    import sys

    done = subprocess.run(
        f"{sys.executable} -m scaling lr --optimizer adamw --lr 3e-4 --batch 256 --to 4096 "
        "--b-simple 2000 | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.count("\n") == 1 and done.stderr == ""

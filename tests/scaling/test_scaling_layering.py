"""One-way packages: ``scaling`` never loads JAX; ``optax_ext`` uses scaling's public API.

The measuring transform lives in ``optax_ext.noise_measurement``; the names users already
import from ``scaling`` keep working and are the same objects.
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
import json, sys, tempfile, os
import scaling
from scaling.__main__ import main
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
    assert got["codes"] == [0, 0, 0, 0, 0]
    assert got["loaded"] == [], got["loaded"]


def test_scaling_imports_nothing_of_optax_ext_at_module_level():
    # Lazy names import optax_ext inside a function on first use; no module-level import.
    for path in (ROOT / "scaling").glob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"(from|import) (optax_ext|jax|optax|flax)\b", line):
                raise AssertionError(f"{path.name}: module-level import: {line}")


def test_old_names_are_the_same_objects():
    import scaling
    from optax_ext import noise_measurement as noise_scale
    from optax_ext import schedules
    from scaling import noise, weight_decay

    for name in ("measure_noise_scale", "noise_scale", "noise_log_record", "NoiseScaleState"):
        assert getattr(scaling, name) is getattr(noise_scale, name)
        assert getattr(noise, name) is getattr(noise_scale, name)
    assert scaling.su_coupled_decay_schedules is schedules.coupled_decay_schedules
    assert weight_decay.su_constant_decay_lr_schedule is schedules.constant_decay_lr_schedule
    assert scaling.DecaySchedules is schedules.DecaySchedules
    assert set(scaling._LAZY) <= set(scaling.__all__) and set(scaling._LAZY) <= set(dir(scaling))


def test_unknown_names_still_raise_attribute_error():
    import pytest

    import scaling
    from scaling import noise, weight_decay

    for module in (scaling, noise, weight_decay):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            module.nope  # noqa: B018


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

"""Every Python block of README.md runs as written, and so do its ``python -m scaling`` lines.

The blocks are extracted from the README and executed one by one in a fresh namespace
holding the few names a reader brings along (a small Flax language model ``model``, its
``params``, ``loss_fn(params, apply_fn, batch)``, a ``batch``, a ``state``, ...). A block
may use what an earlier block in the same README section defined, as a reader would.
The only rewrite is the checkpoint directory, which goes to a temporary folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ext as ox

README = Path(__file__).resolve().parents[1] / "README.md"
VOCAB, WIDTH, SEQ = 32, 16, 8


class TinyLM(nn.Module):
    """Embedding, one hidden layer with dropout and a LayerNorm, and a head: Flax names."""

    @nn.compact
    def __call__(self, x):
        h = nn.Embed(VOCAB, WIDTH)(x)
        h = nn.Dense(WIDTH)(nn.relu(nn.Dense(2 * WIDTH)(h)))
        h = nn.Dropout(0.1, deterministic=not self.has_rng("dropout"))(h)
        return nn.Dense(VOCAB, name="head")(nn.LayerNorm()(h))


class Encoder(nn.Module):
    """A sentence encoder for the contrastive block: mean of the tokens, then a Dense."""

    @nn.compact
    def __call__(self, x):
        h = TinyLM()(x).mean(axis=1)
        return nn.Dense(WIDTH)(h)


def loss_fn(params, apply_fn, batch):
    logits = apply_fn({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def python_blocks(text: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` for every fenced Python block."""
    blocks, heading = [], ""
    for part in re.split(r"(^```python\n.*?^```$)", text, flags=re.S | re.M):
        if part.startswith("```python"):
            blocks.append((heading, part.removeprefix("```python\n").removesuffix("```")))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return blocks


def scaling_command_lines(text: str) -> list[str]:
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M):
        for line in block.splitlines():
            for command in line.split(";"):
                command = command.split("#")[0].strip()
                if command.startswith("python -m scaling"):
                    lines.append(command)
    return lines


def fixtures(tmp_path: Path) -> dict:
    model = TinyLM()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, VOCAB, (16, SEQ)))
    params = model.init(jax.random.key(0), x)["params"]
    encoder = Encoder()

    def make_state():
        return ox.training.TrainState.create(apply_fn=model.apply, params=params, tx=ox.tiger(1e-3))

    return {
        **IMPORTS,
        "model": model,
        "params": params,
        "loss_fn": loss_fn,
        "batch": {"x": x, "y": jnp.roll(x, -1, axis=1)},
        "state": make_state(),
        "make_state": make_state,
        "encoder": encoder,
        "encoder_params": encoder.init(jax.random.key(1), x)["params"],
        "queries": jnp.asarray(rng.integers(0, VOCAB, (64, SEQ))),
        "keys": jnp.asarray(rng.integers(0, VOCAB, (64, SEQ))),
        "key": jax.random.key(2),
        "CKPT": str(tmp_path / "ckpt"),
    }


#: What the README's tour says every snippet assumes.
IMPORTS = {"jax": jax, "jnp": jnp, "optax": optax, "ox": ox, "scaling": __import__("scaling")}

TEXT = README.read_text()
BLOCKS = python_blocks(TEXT)


def test_the_readme_has_blocks_to_run():
    assert len(BLOCKS) >= 6 and len(scaling_command_lines(TEXT)) >= 2


SECTIONS = sorted({h for h, _ in BLOCKS})


@pytest.mark.parametrize("section", SECTIONS, ids=[s.split(" (")[0][:40] for s in SECTIONS])
def test_readme_section_runs_as_written(section, tmp_path):
    namespace = fixtures(tmp_path)
    for heading, code in BLOCKS:
        if heading == section:
            code = code.replace('"/abs/ckpt', 'CKPT + "')
            exec(compile(code, f"README.md [{section}]", "exec"), namespace)


@pytest.mark.parametrize("command", scaling_command_lines(TEXT))
def test_readme_scaling_command_runs(command):
    args = shlex.split(command)[1:]
    if any(a.endswith(".jsonl") for a in args):
        pytest.skip("needs the demo's log; the noise command is tested in tests/scaling")
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

"""Orbax checkpoints of a TrainState resume bit-identically in a fresh process.

For every optimizer of ``checkpoint_worker.OPTIMIZERS`` (together they hold every
optimizer-state type of optax-ext) one worker process (``checkpoint_worker.py train``)
trains ``TOTAL_STEPS`` steps without interruption, saving the whole TrainState (step,
params, optimizer state) with ``orbax.checkpoint.StandardCheckpointer`` after ``SAVE_AT``
steps, in the middle of every accumulation cycle and lookahead period. A second, fresh
process (``checkpoint_worker.py resume``) restores all of them into abstract targets
(``jax.eval_shape``), trains the remaining steps, and its final states must equal the
uninterrupted ones bit for bit: same machine, same programs (the second process loads
the first one's compilations from XLA's persistent cache), same inputs. A checkpoint
restored into a train state of another optimizer fails with a message naming both
optimizer-state types.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import checkpoint_worker as worker
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from optax_ext import checkpoint
from optax_ext.noise_measurement import measure_noise_scale
from optax_ext.optimizers.adafactor import adafactor
from optax_ext.optimizers.tiger import tiger
from optax_ext.wrappers.accumulation import accumulate_gradients
from optax_ext.wrappers.quantize import QuantizedArray, quantize_state

WORKER = Path(__file__).with_name("checkpoint_worker.py")
REPO = WORKER.parent.parent
NAMES = list(worker.OPTIMIZERS)
TIMEOUT_S = 180


def _worker_env() -> dict[str, str]:
    """This environment (same XLA flags and devices, so the same compiled programs) with
    this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run_worker(mode: str, root: Path, out: Path) -> dict[str, dict[str, np.ndarray]]:
    """Runs ``checkpoint_worker.py MODE`` on every optimizer; returns ``{name: {path: leaf}}``
    of the final states."""
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            mode,
            str(root),
            str(out),
            *NAMES,
            "--cache",
            str(root / "xla_cache"),
        ],
        cwd=REPO,
        env=_worker_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"{mode} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    leaves = {name: {} for name in NAMES}
    with np.load(out) as f:
        for key in f.files:
            name, path = key.split("|", 1)
            leaves[name][path] = f[key]
    return leaves


def _target(name: str):
    return worker.abstract_state(worker.OPTIMIZERS[name]())


def _mid_cycle_problems(snapshots) -> list[str]:
    """Why the saved states would NOT hold work in progress (none: they all do)."""
    problems = []

    def expect(what, ok):
        if not ok:
            problems.append(what)

    acc = snapshots["accumulate_adamw4"].opt_state
    expect("accumulate_adamw4 mid-cycle", int(acc.mini_step) == worker.SAVE_AT % 4 != 0)
    expect(
        "accumulate_adamw4 has gradients accumulated",
        any(np.any(g != 0) for g in jax.tree.leaves(acc.acc_grads)),
    )
    expect("noise_adax_acc2 mid-cycle", int(snapshots["noise_adax_acc2"].opt_state.mini_step) == 1)
    tiger_count = int(snapshots["tiger_acc3"].opt_state.count)
    expect("tiger_acc3 mid-cycle", tiger_count % 3 == worker.SAVE_AT % 3 != 0)
    inject = snapshots["inject_tiger_acc2"].opt_state.inner_state
    expect("inject_tiger_acc2 mid-cycle", int(inject.count) % 2 == worker.SAVE_AT % 2 != 0)
    sgdm_state = snapshots["sgdm_nesterov_acc3"].opt_state[0]
    expect("sgdm_nesterov_acc3 mid-cycle", int(sgdm_state.count) % 3 == worker.SAVE_AT % 3 != 0)
    expect(
        "sgdm_nesterov_acc3 has gradients accumulated",
        any(np.any(a != 0) for a in jax.tree.leaves(sgdm_state.acc)),
    )
    look = snapshots["lookahead_tiger5"].opt_state
    expect("lookahead_tiger5 mid-period", int(look.count) % 5 == worker.SAVE_AT % 5 != 0)
    fast = jax.tree.leaves(snapshots["lookahead_tiger5"].params)
    expect(
        "lookahead_tiger5 fast weights away from the slow ones",
        any(
            not np.array_equal(s, p) for s, p in zip(jax.tree.leaves(look.slow), fast, strict=True)
        ),
    )
    expect(
        "nan_guard_tiger skipped the NaN step",
        int(snapshots["nan_guard_tiger"].opt_state.skipped_steps) == 1,
    )
    return problems


def _resume_problems(name, snapshot, final, resumed) -> list[str]:
    """How run ``name`` resumed from ``snapshot`` differs from its uninterrupted run."""
    if int(snapshot.step) != worker.SAVE_AT:
        return [f"{name}: checkpoint at step {int(snapshot.step)}, not {worker.SAVE_AT}"]
    if sorted(resumed) != sorted(final):
        return [f"{name}: the resumed state has other leaves than the uninterrupted one"]
    differ = [
        f"{path} (max |diff| {np.max(np.abs(resumed[path] - x.astype(float)))})"
        for path, x in final.items()
        if not np.array_equal(resumed[path], x, equal_nan=True)  # NaN-initialised leaves
    ]
    problems = (
        [f"{name}: {len(differ)} of {len(final)} leaves differ: " + ", ".join(differ[:3])]
        if differ
        else []
    )
    # The resumed part did train: the params moved after the checkpoint.
    saved = worker.state_leaves(snapshot)
    if all(np.array_equal(saved[k], x) for k, x in final.items() if k.startswith(".params")):
        problems.append(f"{name}: the params did not move after the checkpoint")
    return problems


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Every optimizer: train with a checkpoint at SAVE_AT in one process, resume from it
    in a fresh one; final step, params and optimizer state equal to the last bit.

    One test (not one per optimizer) so the two worker processes run once, also under
    pytest-xdist; the message lists every run that differs."""
    finals = _run_worker("train", tmp_path, tmp_path / "uninterrupted.npz")
    resumed = _run_worker("resume", tmp_path, tmp_path / "resumed.npz")
    checkpointer = ocp.StandardCheckpointer()
    snapshots = {
        name: checkpoint.restore_train_state(checkpointer, tmp_path / name, _target(name))
        for name in NAMES
    }
    assert _mid_cycle_problems(snapshots) == []
    problems = [
        p
        for name in NAMES
        for p in _resume_problems(name, snapshots[name], finals[name], resumed[name])
    ]
    assert problems == [], "\n".join(problems)


def _synthetic_state(run):
    """A TrainState of ``run`` (a name, or an abstract target) whose every leaf holds
    distinct values (so a restore that put a value at the wrong path would show), without
    compiling anything."""

    def fill(i, x):
        values = np.arange(np.prod(x.shape, dtype=int)).reshape(x.shape) + 10 * i
        return jax.device_put(values.astype(x.dtype), x.sharding)

    target = _target(run) if isinstance(run, str) else run
    leaves, treedef = jax.tree.flatten(target)
    return jax.tree.unflatten(treedef, [fill(i, x) for i, x in enumerate(leaves)])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(root, states)``: synthetic states of a few runs saved with the signature under
    ``root/<name>``, and tiger_acc3's also by plain Orbax under ``root/plain_tiger_acc3``."""
    root = tmp_path_factory.mktemp("checkpoints")
    checkpointer = ocp.StandardCheckpointer()
    states = {
        name: _synthetic_state(name)
        for name in ("tiger_acc3", "noise_adax_acc2", "lookahead_tiger5")
    }
    for name, state in states.items():
        checkpoint.save_train_state(checkpointer, root / name, state)
    checkpointer.save(root / "plain_tiger_acc3", states["tiger_acc3"])
    checkpointer.wait_until_finished()
    return root, states


def _assert_same_state(restored, expected):
    expected = worker.state_leaves(expected)
    restored = worker.state_leaves(restored)
    assert sorted(restored) == sorted(expected)
    for key, value in restored.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def _signature_of(name):
    return checkpoint.opt_state_signature(_target(name).opt_state)


#: Tiger's state: its guard around the chain of direction, masked decay, scale and lr
TIGER = "NanGuardState[(ScaleByTigerState, MaskedState[EmptyState], EmptyState, EmptyState)]"


def test_signature_names_the_state_types():
    assert _signature_of("tiger_acc3") == TIGER
    assert _signature_of("lookahead_tiger5") == f"LookaheadState[{TIGER}]"
    assert _signature_of("accumulate_adamw4") == (
        "AccumulationState[(ScaleByAdamState, EmptyState, EmptyState)]"
    )
    assert _signature_of("inject_tiger_acc2") == f"InjectStatefulHyperparamsState[{TIGER}]"
    # Per-leaf states inside parameter-shaped dicts appear once, whatever the model.
    assert _signature_of("adafactor_momentum") == (
        "(ScaleByAdafactorState[{FactoredMoment}], EmptyState, MaskedState[EmptyState], EmptyState)"
    )
    params = {
        "a": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)},
        "b": jax.ShapeDtypeStruct((4,), np.float32),
    }
    assert checkpoint.opt_state_signature(jax.eval_shape(tiger(1e-3).init, params)) == TIGER
    # optax.partition's labelled states: the distinct ones, in braces.
    tx = optax.partition({"a": tiger(1e-3), "b": optax.sgd(0.1)}, {"a": "a", "b": "b"})
    assert checkpoint.opt_state_signature(jax.eval_shape(tx.init, params)) == (
        f"PartitionState[{{MaskedState[(EmptyState, EmptyState)], MaskedState[{TIGER}]}}]"
    )


@pytest.mark.parametrize(
    "make_tx, expected_type",
    [
        (lambda: optax.adamw(1e-3), "ScaleByAdamState"),
        (lambda: adafactor(1e-2, momentum=0.9, min_dim_size_to_factor=4), "ScaleByAdafactorState"),
    ],
    ids=["adamw", "adafactor"],
)
def test_restore_into_another_optimizer_names_both_states(checkpoints, make_tx, expected_type):
    root, states = checkpoints
    checkpointer = ocp.StandardCheckpointer()
    target = worker.abstract_state(make_tx())
    with pytest.raises(ValueError, match="another optimizer") as err:
        checkpoint.restore_train_state(checkpointer, root / "tiger_acc3", target)
    message = str(err.value)
    assert f"holds an optimizer state of type {TIGER}" in message
    assert expected_type in message
    assert str(root / "tiger_acc3") in message


def test_same_tree_but_another_optimizer_is_caught(checkpoints):
    """AdaX's state has Adam's fields and shapes (count, mu, nu): with AdaX swapped for
    Adam inside the same wrappers the trees are identical, and Orbax 0.12 restores one
    into the other without a word. Only the recorded signature tells them apart."""
    root = checkpoints[0]
    checkpointer = ocp.StandardCheckpointer()
    target = worker.abstract_state(
        accumulate_gradients(
            optax.chain(measure_noise_scale(batch_size=worker.BATCH), optax.adam(1e-2)), 2
        )
    )
    path = root / "noise_adax_acc2"
    saved = ocp.tree.to_flat_dict(checkpointer.metadata(path).item_metadata)
    assert checkpoint._tree_mismatch(saved, ocp.tree.to_flat_dict(target)) == ""
    with pytest.raises(ValueError, match=r"ScaleByAdaxState.*expects.*ScaleByAdamState"):
        checkpoint.restore_train_state(checkpointer, path, target)


def test_plain_orbax_checkpoint_restores_and_mismatch_is_explained(checkpoints):
    """A checkpoint written by ``checkpointer.save`` (no signature) still restores, and a
    wrong target is reported by path, naming the target's state type."""
    root, states = checkpoints
    checkpointer = ocp.StandardCheckpointer()
    for saved in ("tiger_acc3", "plain_tiger_acc3"):
        restored = checkpoint.restore_train_state(checkpointer, root / saved, _target("tiger_acc3"))
        _assert_same_state(restored, states["tiger_acc3"])
    path = root / "plain_tiger_acc3"

    with pytest.raises(ValueError, match="does not fit the train state") as err:
        checkpoint.restore_train_state(checkpointer, path, worker.abstract_state(optax.adamw(1e-3)))
    message = str(err.value)
    assert "ScaleByAdamState" in message
    assert "opt_state/0/count" in message  # a path the checkpoint lacks
    assert "opt_state/inner_state/0/cycle_length" in message  # the target lacks (Tiger's)


def test_shape_mismatch_is_explained(checkpoints):
    """Same optimizer, another model width: the message names the leaf and both shapes."""
    root = checkpoints[0]
    checkpointer = ocp.StandardCheckpointer()
    target = _target("tiger_acc3")
    kernel = target.params["params"]["Dense_0"]["kernel"]
    wide = jax.ShapeDtypeStruct(
        (kernel.shape[0], kernel.shape[1] + 1), kernel.dtype, sharding=kernel.sharding
    )
    target = target.replace(
        params={
            "params": {
                **target.params["params"],
                "Dense_0": {**target.params["params"]["Dense_0"], "kernel": wide},
            }
        }
    )
    with pytest.raises(
        ValueError,
        match=r"params/params/Dense_0/kernel has shape \(4, 8\) in the "
        r"checkpoint, \(4, 9\) in the target",
    ):
        checkpoint.restore_train_state(checkpointer, root / "tiger_acc3", target)


def test_checkpoint_manager_same_checks(checkpoints, tmp_path):
    """The helpers take an ``ocp.CheckpointManager`` and a step as well."""
    snapshot = checkpoints[1]["lookahead_tiger5"]
    manager = ocp.CheckpointManager(tmp_path / "managed")
    try:
        checkpoint.save_train_state(manager, worker.SAVE_AT, snapshot)
        manager.wait_until_finished()
        restored = checkpoint.restore_train_state(
            manager, worker.SAVE_AT, _target("lookahead_tiger5")
        )
        _assert_same_state(restored, snapshot)
        with pytest.raises(
            ValueError, match=re.escape(f"type LookaheadState[{TIGER}]") + ".*ScaleByAdam"
        ) as err:
            checkpoint.restore_train_state(
                manager, worker.SAVE_AT, worker.abstract_state(optax.adamw(1e-3))
            )
        assert f"step {worker.SAVE_AT} of {tmp_path / 'managed'}" in str(err.value)
    finally:
        manager.close()


@pytest.mark.parametrize("damaged", ["_METADATA", "_CHECKPOINT_METADATA"])
def test_truncated_metadata_file_is_named(checkpoints, tmp_path, damaged):
    """A metadata file cut short (disk full, a killed writer) gives a ValueError naming the
    checkpoint and the file, not a bare JSONDecodeError (or, for the step's metadata, a
    logged error and a silently skipped optimizer check)."""
    import shutil

    path = tmp_path / "tiger_acc3"
    shutil.copytree(checkpoints[0] / "tiger_acc3", path)
    file = path / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="is damaged") as err:
        checkpoint.restore_train_state(ocp.StandardCheckpointer(), path, _target("tiger_acc3"))
    message = str(err.value)
    assert str(file) in message and "not valid JSON" in message
    assert "Restore an earlier checkpoint" in message


def test_truncated_metadata_in_a_checkpoint_manager_is_named(checkpoints, tmp_path):
    manager = ocp.CheckpointManager(tmp_path / "managed")
    try:
        checkpoint.save_train_state(manager, worker.SAVE_AT, checkpoints[1]["tiger_acc3"])
        manager.wait_until_finished()
        (file,) = (tmp_path / "managed").rglob("_METADATA")
        file.write_text(file.read_text()[:10])
        with pytest.raises(ValueError, match=f"step {worker.SAVE_AT} of .* is damaged") as err:
            checkpoint.restore_train_state(manager, worker.SAVE_AT, _target("tiger_acc3"))
        assert str(file) in str(err.value)
    finally:
        manager.close()


def _quantize_adam(**kwargs):
    return quantize_state(optax.adam(1e-2), block=32, min_size=64, **kwargs)


@pytest.mark.parametrize(
    "saved_with, restored_with, match",
    [
        ({}, {"code": "linear"}, r"quantize_state\(code='dynamic'\).*code='linear'.*"),
        ({"code": "linear"}, {}, r"quantize_state\(code='linear'\).*code='dynamic'.*"),
        ({}, {"second_moments": "nothing"}, r"unsigned 8-bit map \(uint8.*the signed one \(int8"),
        ({"second_moments": "nothing"}, {}, r"the signed 8-bit map \(int8.*unsigned one \(uint8"),
    ],
    ids=["dynamic_as_linear", "linear_as_dynamic", "unsigned_as_signed", "signed_as_unsigned"],
)
def test_8bit_state_under_another_map_is_refused(tmp_path, saved_with, restored_with, match):
    """8-bit codes mean something only under the map that wrote them. Orbax restores a
    state saved with quantize_state(code="dynamic") into one built with "linear" (same
    tree, same dtypes: every code misread), and casts uint8 codes to int8 for another
    second_moments (codes above 127 wrap). restore_train_state refuses both, naming the
    argument and the value to build the optimizer with; the same settings restore."""
    checkpointer = ocp.StandardCheckpointer()
    # codes 0, 1, 2, ...: past 127 in the larger leaves, where int8 and uint8 part ways
    state = _synthetic_state(worker.abstract_state(_quantize_adam(**saved_with)))
    assert isinstance(
        state.opt_state.inner_state[0].nu["params"]["Embed_0"]["embedding"], QuantizedArray
    )
    checkpoint.save_train_state(checkpointer, tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpoint.restore_train_state(
        checkpointer, tmp_path / "ckpt", worker.abstract_state(_quantize_adam(**saved_with))
    )
    _assert_same_state(restored, state)
    with pytest.raises(ValueError, match=match) as err:
        checkpoint.restore_train_state(
            checkpointer, tmp_path / "ckpt", worker.abstract_state(_quantize_adam(**restored_with))
        )
    message = str(err.value)
    assert str(tmp_path / "ckpt") in message and "Build the optimizer with" in message
    assert ("code=" if "code" in saved_with | restored_with else "second_moments") in message


@pytest.mark.parametrize(
    "saved_bits, restored_bits", [(8, 4), (4, 8)], ids=["8bit_as_4bit", "4bit_as_8bit"]
)
def test_state_stored_in_other_bits_is_refused(tmp_path, saved_bits, restored_bits):
    """4-bit codes (two per byte, other maps and scales) and 8-bit ones mean nothing
    under each other's decoder. restore_train_state refuses a checkpoint written with
    quantize_state(bits=8) into a train state built with bits=4 and the reverse, naming
    ``bits`` and the value to build with; the same bits restore every leaf."""
    checkpointer = ocp.StandardCheckpointer()
    state = _synthetic_state(worker.abstract_state(_quantize_adam(bits=saved_bits)))
    checkpoint.save_train_state(checkpointer, tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()
    restored = checkpoint.restore_train_state(
        checkpointer, tmp_path / "ckpt", worker.abstract_state(_quantize_adam(bits=saved_bits))
    )
    _assert_same_state(restored, state)
    match = rf"quantize_state\(bits={saved_bits}\).*built with bits={restored_bits}"
    with pytest.raises(ValueError, match=match) as err:
        checkpoint.restore_train_state(
            checkpointer,
            tmp_path / "ckpt",
            worker.abstract_state(_quantize_adam(bits=restored_bits)),
        )
    assert f"quantize_state(..., bits={saved_bits})" in str(err.value)

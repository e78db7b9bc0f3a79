"""Orbax checkpoints of a train state that know which optimizer wrote them.

Every optimizer state of optax-ext is a plain pytree of arrays, so Orbax saves it as it
is: accumulation cycles, lookahead slow weights, parameter EMAs, NaN-guard counters and
noise-scale EMAs included, and a run resumed from a checkpoint is bit-identical to an
uninterrupted one. What Orbax alone does not catch is a checkpoint restored into a train
state built with *another* optimizer whose state has the same tree (AdaX into Adam, say),
or with other 8-bit maps (:func:`~optax_ext.wrappers.quantize.quantize_state`'s ``code``
or ``second_moments``) or another number of ``bits`` (4 or 8), whose codes it would
silently cast or misread:
:func:`save_train_state` records the optimizer state's :func:`opt_state_signature` and
:func:`restore_train_state` checks it and the 8-bit codes' dtypes, naming both state
types (or the ``quantize_state`` argument to change) when they differ::

    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    save_train_state(checkpointer, "/abs/ckpt/700", state)
    checkpointer.wait_until_finished()
    target = jax.eval_shape(make_state)          # the same constructor, abstractly
    state = restore_train_state(checkpointer, "/abs/ckpt/700", target)

Orbax (``pip install "optax-ext[checkpoint]"``) is imported on use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optax

from optax_ext.wrappers.quantize import _CODE_CLASSES, Quantized4State, QuantizedState

__all__ = [
    "opt_state_signature",
    "restore_train_state",
    "save_train_state",
]

_METADATA_KEY = "optax_ext"
#: Orbax's JSON files in a checkpoint directory (the tree's, the step's, the shardings)
_JSON_FILES = ("_METADATA", "_CHECKPOINT_METADATA", "_sharding")


def opt_state_signature(opt_state: Any) -> str:
    """The nesting of state types in an optimizer state, e.g. ``"ScaleByTigerState"`` or
    ``"(ScaleByAdamState, EmptyState, EmptyState)"`` for ``optax.adamw``.

    NamedTuple states appear by class name with their nested states in brackets, chains
    (tuples) in parentheses; the distinct states inside a dict (``optax.partition``'s
    labels, per-leaf states) in braces. Arrays add nothing, so the signature names the
    optimizer, not the model.
    """
    if isinstance(opt_state, optax.MaskedNode):
        return ""  # a masked-out leaf of a parameter-shaped subtree
    if isinstance(opt_state, Mapping):
        inner = ", ".join(sorted(_types_in_dict(opt_state)))
        return f"{{{inner}}}" if inner else ""
    if isinstance(opt_state, tuple | list):
        inner = ", ".join(s for s in map(opt_state_signature, opt_state) if s)
        if hasattr(opt_state, "_fields"):  # a NamedTuple: an optimizer's state
            return type(opt_state).__name__ + (f"[{inner}]" if inner else "")
        return f"({inner})" if inner else ""
    return ""


def _types_in_dict(tree: Mapping) -> set[str]:
    """The distinct non-empty signatures of a dict's values, nested dicts merged."""
    out = set()
    for value in tree.values():
        out |= _types_in_dict(value) if isinstance(value, Mapping) else {opt_state_signature(value)}
    return out - {""}


def _train_state_metadata(state: Any) -> dict[str, Any]:
    """Custom metadata to save with ``state``: its optimizer-state signature."""
    return {_METADATA_KEY: {"opt_state": opt_state_signature(state.opt_state)}}


def _first(keys: set, n: int = 3) -> str:
    shown = ", ".join("/".join(k) for k in sorted(keys)[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _tree_mismatch(saved: Mapping[tuple, Any], target: Mapping[tuple, Any]) -> str:
    """What differs between two flat ``{path: leaf}`` trees (paths, then shapes), or ""."""
    missing, unexpected = set(target) - set(saved), set(saved) - set(target)
    problems = []
    if missing:
        problems.append(f"the checkpoint lacks {_first(missing)}")
    if unexpected:
        problems.append(f"the checkpoint has {_first(unexpected)} that the target lacks")
    shape = lambda x: tuple(getattr(x, "shape", np.shape(x)))
    for path in sorted(set(saved) & set(target)):
        if shape(saved[path]) != shape(target[path]):
            problems.append(
                f"{'/'.join(path)} has shape {shape(saved[path])} in the checkpoint, "
                f"{shape(target[path])} in the target"
            )
            break
    return "; ".join(problems)


#: the class of :func:`quantize`'s result for each ``code``: a state's signature names it
_CODE_CLASS = {code: cls.__name__ for code, cls in _CODE_CLASSES.items()}
_CODE_OF_CLASS = {name: c for c, name in _CODE_CLASS.items()}
_QUANTIZED_CLASS = re.compile(r"\b(" + "|".join(sorted(_CODE_OF_CLASS, key=len)[::-1]) + r")\b")
#: the dtype of 8-bit codes on each of quantize_state's maps
_CODE_DTYPES = {"int8": "signed", "uint8": "unsigned"}


#: the state class of quantize_state for each ``bits``: a state's signature names it
_BITS_OF_STATE = {QuantizedState.__name__: 8, Quantized4State.__name__: 4}
_BITS_STATE = re.compile(r"\b(" + "|".join(_BITS_OF_STATE) + r")\b")


def _bits_mismatch(saved: str, expected: str, where: str) -> str:
    """The message for signatures whose ``quantize_state`` stores in another number of
    bits (8-bit and 4-bit codes have other arrays, maps and packing), or ""."""
    bits = lambda s: sorted({_BITS_OF_STATE[m] for m in _BITS_STATE.findall(s)})
    was, now = bits(saved), bits(expected)
    if was == now or len(was) != 1 or len(now) != 1:
        return ""
    return (
        f"checkpoint at {where} holds optimizer states written with "
        f"quantize_state(bits={was[0]}), but the train state was built with bits={now[0]}: "
        f"{was[0]}-bit codes cannot be read as {now[0]}-bit ones (saved state type {saved}, "
        f"expected {expected}). Build the optimizer with quantize_state(..., bits={was[0]}) "
        "to restore this checkpoint."
    )


def _code_mismatch(saved: str, expected: str, where: str) -> str:
    """The message for two signatures that differ only in the map of their 8-bit codes
    (``quantize_state``'s ``code``), or ""."""
    same_map = lambda s: _QUANTIZED_CLASS.sub(_CODE_CLASS["dynamic"], s)
    if same_map(saved) != same_map(expected):
        return ""
    codes = lambda s: sorted({_CODE_OF_CLASS[m] for m in _QUANTIZED_CLASS.findall(s)})
    was, now = codes(saved), codes(expected)
    if len(was) != 1 or len(now) != 1:
        return ""
    return (
        f"checkpoint at {where} holds 8-bit optimizer states written with "
        f"quantize_state(code={was[0]!r}), but the train state was built with "
        f"code={now[0]!r}: 8-bit codes read right only under the map that wrote them. "
        f"Build the optimizer with quantize_state(..., code={was[0]!r}) to restore this "
        "checkpoint."
    )


def _dtype_name(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    return str(np.dtype(dtype if dtype is not None else np.asarray(x).dtype))


def _codes_mismatch(saved: Mapping[tuple, Any], target: Mapping[tuple, Any], where: str) -> str:
    """The message for 8-bit codes (``.../codes`` leaves) stored on the signed map (int8)
    in one tree and the unsigned one (uint8) in the other, or "": Orbax would cast one
    to the other, and every code above 127 would change its meaning."""
    for path in sorted(set(saved) & set(target)):
        if not path or path[-1] != "codes":
            continue
        was, now = _dtype_name(saved[path]), _dtype_name(target[path])
        if was != now and {was, now} <= set(_CODE_DTYPES):
            return (
                f"checkpoint at {where} stores {'/'.join(path)} on the {_CODE_DTYPES[was]} "
                f"8-bit map ({was} codes), but the train state expects the "
                f"{_CODE_DTYPES[now]} one ({now}): it was written by quantize_state with "
                "another second_moments (which state fields are second moments, stored "
                "unsigned). Build the optimizer with the second_moments it was saved with. "
                "(A checkpoint from a version that matched second_moments against "
                "parameter names, where a module named `v` or `nu` had its momentum stored "
                "unsigned, cannot be read as a momentum: restore its params and start a "
                "fresh optimizer state.)"
            )
    return ""


def _check_checkpoint(metadata: Any, target: Any, where: str) -> None:
    """Raises ``ValueError`` unless a checkpoint (its Orbax ``StepMetadata``) fits
    ``target``: the optimizer-state signature recorded by :func:`save_train_state`
    equals the target's (the message names both, or the ``quantize_state`` map that
    differs), the tree paths and shapes agree (which also covers checkpoints saved
    without the signature), and 8-bit codes keep their map (int8 or uint8)."""
    import orbax.checkpoint as ocp  # optional dependency

    expected = opt_state_signature(target.opt_state)
    saved = (metadata.custom_metadata or {}).get(_METADATA_KEY, {}).get("opt_state")
    if saved is not None and saved != expected:
        raise ValueError(
            _bits_mismatch(saved, expected, where)
            or _code_mismatch(saved, expected, where)
            or f"checkpoint at {where} holds an optimizer state of type {saved}, but the "
            f"train state expects {expected}: was it written by another optimizer?"
        )
    if metadata.item_metadata is not None:
        saved_leaves = ocp.tree.to_flat_dict(metadata.item_metadata)
        target_leaves = ocp.tree.to_flat_dict(target)
        mismatch = _tree_mismatch(saved_leaves, target_leaves)
        if mismatch:
            raise ValueError(
                f"checkpoint at {where} does not fit the train state, whose optimizer "
                f"state is of type {expected}: {mismatch}. Was it written by another "
                "optimizer or model?"
            )
        mismatch = _codes_mismatch(saved_leaves, target_leaves, where)
        if mismatch:
            raise ValueError(mismatch)


def save_train_state(checkpointer: Any, where: Any, state: Any, **kwargs) -> None:
    """Saves ``state`` with its optimizer-state signature in the custom metadata.

    ``checkpointer``: an ``ocp.StandardCheckpointer`` (``where``: a directory) or an
    ``ocp.CheckpointManager`` (``where``: a step). ``kwargs`` go to its ``save``.
    """
    meta = _train_state_metadata(state)
    import orbax.checkpoint as ocp  # optional dependency

    if isinstance(checkpointer, ocp.CheckpointManager):
        checkpointer.save(where, args=ocp.args.StandardSave(state), custom_metadata=meta, **kwargs)
    else:
        checkpointer.save(where, state, custom_metadata=meta, **kwargs)


def restore_train_state(checkpointer: Any, where: Any, target: Any) -> Any:
    """Restores a TrainState into ``target`` (real or ``jax.eval_shape`` abstract) after
    :func:`_check_checkpoint`.

    ``checkpointer``: an ``ocp.StandardCheckpointer`` (``where``: a directory) or an
    ``ocp.CheckpointManager`` (``where``: a step).

    Raises:
      ValueError: the checkpoint was written by another optimizer (the message names
        both optimizer-state types), or its paths or shapes differ from ``target``'s,
        or one of its metadata files is damaged (the message names the file).
    """
    import orbax.checkpoint as ocp  # optional dependency

    manager = isinstance(checkpointer, ocp.CheckpointManager)
    label = f"step {where} of {checkpointer.directory}" if manager else str(where)
    directory = _step_directory(checkpointer, where) if manager else Path(where)
    _check_json_files(directory, label)
    try:
        _check_checkpoint(checkpointer.metadata(where), target, label)
        if manager:
            return checkpointer.restore(where, args=ocp.args.StandardRestore(target))
        return checkpointer.restore(where, target)
    except json.JSONDecodeError as e:  # a file the check above does not know
        raise _damaged(label, directory, e) from e


def _step_directory(manager: Any, step: Any) -> Path | None:
    """The directory holding ``step`` of a ``CheckpointManager`` (None if not found)."""
    root = Path(str(manager.directory))
    candidates = [root / str(step), *root.glob(f"*{step}")]
    return next((p for p in candidates if p.is_dir()), None)


def _check_json_files(directory: Path | None, label: str) -> None:
    """Raises ``ValueError`` naming the first of Orbax's JSON files under ``directory``
    that does not parse (a write cut short: disk full, a killed process)."""
    if directory is None or not directory.is_dir():
        return  # Orbax says what is missing
    for path in sorted(p for name in _JSON_FILES for p in directory.rglob(name)):
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _damaged(label, path, e) from e


def _damaged(label: str, path: Path | None, error: Exception) -> ValueError:
    return ValueError(
        f"checkpoint at {label} is damaged: {path} is not valid JSON ({error}). The file "
        "was probably cut short while being written (a full disk or a killed process). "
        "Restore an earlier checkpoint (with a CheckpointManager: another step from "
        "all_steps()), or delete this one and save it again."
    )

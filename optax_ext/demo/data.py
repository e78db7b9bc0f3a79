"""The demo's corpus: docstrings of Python's standard library as character ids (no download)."""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["CORPUS_MODULES", "CharData", "load_corpus"]

#: Standard-library modules whose docstrings make the corpus (English prose about code).
CORPUS_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "fractions", "functools", "heapq", "inspect", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
    "subprocess", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)  # fmt: skip


@functools.lru_cache(maxsize=4)
def load_corpus(max_chars: int = 400_000) -> str:
    """Concatenates the docstrings of standard-library modules, their classes and functions."""
    parts: list[str] = []
    with warnings.catch_warnings():  # deprecated aliases (typing.re, typing.io) warn on access
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            module = importlib.import_module(name)
            members = [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in [module] + [m for m in members if not inspect.ismodule(m)]:
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and len(doc) > 40 and doc not in parts:
                    parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(c for c in text if c.isascii())[:max_chars]


@dataclass(frozen=True)
class CharData:
    """A character-level corpus as integer ids, split into train and held-out parts."""

    train: np.ndarray
    valid: np.ndarray
    vocab: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str, valid_fraction: float = 0.1) -> CharData:
        vocab = tuple(sorted(set(text)))
        ids = np.frombuffer(text.encode("ascii"), np.uint8)
        lookup = np.zeros(256, np.int32)
        lookup[np.frombuffer("".join(vocab).encode("ascii"), np.uint8)] = np.arange(len(vocab))
        ids = lookup[ids]
        cut = int(len(ids) * (1 - valid_fraction))
        return cls(ids[:cut], ids[cut:], vocab)

    def batches(self, batch_size: int, seq_len: int, seed: int) -> Iterator[np.ndarray]:
        """Endless random windows of ``seq_len + 1`` characters from the training part."""
        rng = np.random.default_rng(seed)
        while True:
            starts = rng.integers(0, len(self.train) - seq_len - 1, size=batch_size)
            yield np.stack([self.train[s : s + seq_len + 1] for s in starts])

    def valid_batch(self, batch_size: int, seq_len: int) -> np.ndarray:
        """A fixed held-out batch: windows evenly spaced over the held-out part."""
        starts = np.linspace(0, len(self.valid) - seq_len - 2, batch_size).astype(int)
        return np.stack([self.valid[s : s + seq_len + 1] for s in starts])

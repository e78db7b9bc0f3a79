"""Shared pieces of the command lines: number arguments and one-line errors.

Both command lines (``python -m scaling`` and ``python -m optax_ext.demo``) answer bad
input with one line on stderr and exit status 2, never a traceback. This module is pure
Python (no JAX), so either can import it without slowing its start.

Example:
  >>> parser = ArgumentParser(prog="tool")
  >>> _ = parser.add_argument("--lr", type=positive_float)
  >>> parser.parse_args(["--lr", "3e-4"]).lr
  0.0003
  >>> run("tool", lambda: parser.parse_args(["--lr", "-1"]))  # prints one line, returns 2
  2
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "PLOT_HINT",
    "UsageError",
    "ArgumentParser",
    "number",
    "positive_float",
    "nonnegative_float",
    "unit_interval",
    "positive_int",
    "positive_even_int",
    "fail",
    "run",
]


#: how to get matplotlib for a ``--plot``, named in every command line's error
PLOT_HINT = 'pip install "optax-ext[plot]" (in a checkout: pip install -e ".[plot]")'


class UsageError(Exception):
    """Bad command-line input; its message is the whole error line."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` (one line, no
    usage dump); :func:`run` prints it and returns status 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is None:
        return f"a number {'>' if low_open else '>='} {low:g}"
    if high is not None and low is None:
        return f"a number {'<' if high_open else '<='} {high:g}"
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return f"a number in {left}{low:g}, {high:g}{right}"


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    even: bool = False,
    why: str = "",
) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a finite number inside an interval.

    Args:
      low, high: bounds (None: unbounded); ``low_open``/``high_open`` exclude them.
      integer: parse an ``int`` (decimal digits only) instead of a ``float``.
      even: also require an even integer; ``why`` says why in the message.

    Returns:
      A function ``str -> float | int`` raising ``argparse.ArgumentTypeError`` with a
      message that says what was expected and what was given.
    """
    kind = "an even integer" if even else "an integer" if integer else "a number"
    rng = _interval(low, high, low_open, high_open).replace("a number", kind)

    def parse(text: str):
        shown = text if len(text) <= 40 else text[:37] + "..."
        try:
            x = int(text) if integer else float(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {rng}, got {shown!r}") from None
        if not integer and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected {rng} (finite), got {shown!r}")
        bad = (
            (low is not None and (x <= low if low_open else x < low))
            or (high is not None and (x >= high if high_open else x > high))
            or (even and x % 2)
        )
        if bad:
            raise argparse.ArgumentTypeError(f"expected {rng}{why}, got {shown!r}")
        return x

    parse.__name__ = kind.split()[-1]
    return parse


#: A finite number > 0 (learning rates, batch sizes, noise scales).
positive_float = number(0.0, low_open=True)
#: A finite number >= 0 (weight decay).
nonnegative_float = number(0.0)
#: A number in [0, 1) (momentum, EMA decays).
unit_interval = number(0.0, 1.0, high_open=True)
#: An integer >= 1 (steps, counts).
positive_int = number(1, integer=True)
#: An even integer >= 2 (a batch split in two halves).
positive_even_int = number(
    1, integer=True, even=True, why=" (it is split in halves to measure the noise scale)"
)


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def fail(prog: str, message: str) -> None:
    """Prints ``prog: error: message`` on one line to stderr and exits with status 2."""
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
    sys.exit(2)


def _silence_stdout() -> None:
    import os

    # Python flushes stdout again at exit; point it at /dev/null so that flush is quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def run(prog: str, body: Callable[[], Any]) -> int:
    """Calls ``body()``; turns bad input into one stderr line and status 2.

    Caught: :class:`UsageError` (printed as is), ``ValueError`` (bad values, bad files),
    ``OSError`` (missing or unreadable files), arithmetic errors and ``RecursionError``
    (input nested too deeply). Anything else is a bug and keeps its traceback.

    Returns:
      0 when ``body`` returns normally, else 2.
    """
    try:
        body()
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        _silence_stdout()
        return 0
    except UsageError as e:
        print(_one_line(str(e)), file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {where}{_one_line(e.strerror or str(e))}", file=sys.stderr)
        return 2
    except (ValueError, ArithmeticError, RecursionError) as e:
        print(f"{prog}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    return 0

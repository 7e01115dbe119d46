"""Argument types and the one error line of the ``xent`` command line.

Every mistake on the command line ends in one line on stderr that names the bad value,
``xent COMMAND: error: …``, and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os

import torch


class UsageError(Exception):
    """A bad command-line value found after parsing (a shape, a device, an output path)."""


def positive_int(text: str) -> int:
    """An integer ≥ 1, or argparse's error naming ``text``."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0, or argparse's error naming ``text``."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0, or argparse's error naming ``text``."""
    value = _float(text)
    if not math.isfinite(value) or value <= 0.0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in ``[0, 1]``, or argparse's error naming ``text``."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def device(text: str) -> torch.device:
    """A device PyTorch knows and this machine has, or argparse's error naming ``text``."""
    try:
        value = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} needs CUDA, which is not available")
    if value.type == "cuda" and value.index is not None:
        if value.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"no such CUDA device: {text!r}")
    return value


def writable_folder(option: str, path: str) -> None:
    """Create ``path`` (a folder for results) or raise :class:`UsageError` naming it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {path!r}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path!r}: the folder is not writable")


def writable_file(option: str, path: str | None) -> None:
    """Raise :class:`UsageError` naming ``path`` unless a file can be written there."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r}: is a folder, not a file")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path!r}: the folder {folder!r} is not writable")


def one_line(message: object) -> str:
    """``message`` as a single line (an exception's text may hold several)."""
    return " ".join(str(message).split())


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

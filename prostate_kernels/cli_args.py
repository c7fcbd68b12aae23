"""Argument types of the `prostate-kernels` command: every value is checked where it is parsed.

Each type raises argparse.ArgumentTypeError with a message naming the value, which the CLI prints as
one line ("error: argument --lr: ...") with exit status 2, before any file is read or written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from prostate_kernels.windows import WHOLE

NumberT = TypeVar("NumberT", int, float)


def _number(text: str, kind: Callable[[str], NumberT]) -> NumberT:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


def overlap_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value < 1.0:  # also false for NaN
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def device_name(text: str) -> str:
    """ "cpu", "cuda" or "cuda:N", and only a device this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    from prostate_kernels.devices import available_device

    try:
        available_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line ("error: ...", exit status 2) without the usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def orientation_code(text: str) -> str | None:
    """--orientation: an orientation code in either case (data/orientation.py), or None for "stored"."""
    from prostate_kernels.data.orientation import CODE_RULE, ORIENTATION_CODES, STORED

    if text == STORED:
        return None
    if text.upper() not in ORIENTATION_CODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an orientation: {CODE_RULE}, or {STORED!r}")
    return text.upper()


def window_size(text: str) -> int | str:
    """One word of --window: a size >= 1, or "whole"."""
    return WHOLE if text == WHOLE else positive_int(text)


class WindowArgument(argparse.Action):
    """--window D H W (three sizes) or --window whole, stored as a 3-tuple or "whole"."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values == [WHOLE]:
            setattr(namespace, self.dest, WHOLE)
            return
        if len(values) != 3 or WHOLE in values:
            raise argparse.ArgumentError(self, f"{' '.join(map(str, values))}: give 3 sizes D H W, or whole")
        setattr(namespace, self.dest, tuple(values))

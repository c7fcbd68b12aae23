"""The one test of "is this argument an integer" behind every argument check of the library."""

from __future__ import annotations

import operator
from typing import SupportsIndex, cast

import torch


def as_int(value: object) -> int | None:
    """A Python, numpy or 0-d torch integer as an int; None for anything else (bools and floats included:
    True is not a size, and 4.0 is refused rather than truncated)."""
    if isinstance(value, (bool, float)) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return None
    try:
        return operator.index(cast(SupportsIndex, value))  # TypeError when it is none
    except TypeError:
        return None

"""Checks shared by the modules, each error naming the module and the value.

Constructor arguments: a count that is not an integer of the allowed range is a ValueError (torch's own
layers accept a 0 or negative channel count and fail later, deep in a conv, with a message that names
neither). Inputs of the modules that are not one op (DenseBlock3d, ASPP3d): checked in full before the
first op runs and before any running statistic moves (an op checks its own inputs)."""

from __future__ import annotations

import numbers

import torch

from prostate_kernels import backend
from prostate_kernels.integers import as_int


def check_count(owner: str, name: str, value: object, least: int = 1) -> int:
    """`value` as an int if it is an integer >= `least` (Python, numpy or 0-d torch integers; not a bool or
    a float); ValueError naming `owner`, `name` and `value` otherwise."""
    count = as_int(value)
    if count is None or count < least:
        kind = "a positive int" if least == 1 else f"an int >= {least}"
        raise ValueError(f"{owner}: {name} {value!r} must be {kind}")
    return count


def check_probability(owner: str, name: str, value: object) -> float:
    """`value` as a float if it is a real number in [0, 1) (a dropout probability; not a bool); ValueError
    naming `owner`, `name` and `value` otherwise (NaN fails the range check)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: {name} {value!r} must be a number in [0, 1)")
    return float(value)


def check_input(owner: str, x: object, in_channels: int, weight: torch.Tensor, training: bool) -> None:
    """ValueError/TypeError naming `owner` and the value: x must be (N, in_channels, D, H, W) with no empty
    spatial axis, floating point, in the dtype (unless autocast is on) and on the device of the module's
    parameters (`weight`, any of its conv weights); training needs more than one value per channel for the
    batch statistics."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner} expects (N, {in_channels}, D, H, W) input, got {shape}")
    if min(x.shape[2:]) < 1:
        raise ValueError(f"{owner}: input of spatial size {tuple(x.shape[2:])} has an empty axis")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be floating point, got {x.dtype}")
    if x.dtype != weight.dtype and backend.autocast_dtype(x.device) is None:
        raise TypeError(
            f"{owner}: x dtype {x.dtype} differs from the parameters' dtype ({weight.dtype}): "
            f"convert one of them (x.to({weight.dtype}) or the module's .to({x.dtype}))"
        )
    if x.device != weight.device:
        raise ValueError(f"{owner}: x is on {x.device} but its parameters are on {weight.device}")
    if training and x.shape[0] > 0 and x[:, 0].numel() <= 1:
        raise ValueError(
            f"{owner}: training needs more than 1 value per channel for the batch statistics, "
            f"got input size {tuple(x.shape)}"
        )

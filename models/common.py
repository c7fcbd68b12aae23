"""Helpers shared by the networks: size checks, their downsampling, parameter counting conventions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CONVENTIONS = ("torch", "keras", "conv")


def check_model_input(x: torch.Tensor, factors: Sequence[int], in_channels: int, model: str) -> None:
    """ValueError naming `model` and the value unless x is an (N, in_channels, *spatial) tensor with as
    many spatial axes as `factors` and each spatial size a multiple of its factor."""
    dims = 2 + len(factors)
    if not isinstance(x, torch.Tensor) or x.dim() != dims or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        axes = "D, H, W" if len(factors) == 3 else "H, W"
        raise ValueError(f"{model} expects a {dims}-D (N, {in_channels}, {axes}) input, got {shape}")
    size = tuple(x.shape[2:])
    if any(s % f for s, f in zip(size, factors, strict=True)):
        raise ValueError(
            f"{model}: input spatial size {size} must be a multiple of {tuple(factors)} "
            "(its total downsampling)"
        )


def downsampling(model: nn.Module) -> tuple[int, int, int]:
    """The total downsampling (D, H, W) that a network of this package declares as `model.downsampling`:
    its input sizes must be multiples of it (a 2-D network's D factor is that of its slice stacks' depth).
    TypeError for a module that declares none."""
    factors = getattr(model, "downsampling", None)
    if not isinstance(factors, tuple) or len(factors) != 3:
        raise TypeError(f"{type(model).__name__} declares no downsampling (D, H, W): got {factors!r}")
    d, h, w = (int(f) for f in factors)
    return d, h, w


def count_parameters(model: nn.Module, convention: str = "torch") -> int:
    """Parameters of `model` counted three ways.

    "torch": every parameter. "keras": parameters plus BatchNorm moving mean and variance (Keras counts
    4 values per BatchNorm channel; the paper's Table 1 uses it). "conv": weights and biases of the
    convolutions and transposed convolutions only (no BatchNorm).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r} is not one of {CONVENTIONS}")
    if convention == "torch":
        return sum(p.numel() for p in model.parameters())
    if convention == "keras":
        stats = sum(
            m.running_mean.numel() + m.running_var.numel()
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None
            and m.running_var is not None
        )
        return sum(p.numel() for p in model.parameters()) + stats
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return sum(
        p.numel() for m in model.modules() if isinstance(m, convs) for p in m.parameters(recurse=False)
    )

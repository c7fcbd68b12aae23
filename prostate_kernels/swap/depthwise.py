"""Depthwise Conv3d (groups == in == out channels) -> DepthwiseConv3d over the same parameter objects."""

from __future__ import annotations

import torch
from torch import nn

from prostate_kernels.nn.separable import DepthwiseConv3d
from prostate_kernels.swap.report import has_hooks


def is_depthwise(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv3d and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    )


def unsupported(conv: nn.Conv3d) -> str | None:
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (the depthwise kernels pad with zeros)"
    if has_hooks(conv):
        return "hooks are registered on it"
    return None


def as_depthwise(conv: nn.Conv3d) -> DepthwiseConv3d:
    """A DepthwiseConv3d holding conv's own weight and bias Parameters (nothing copied; same state_dict)."""
    with torch.device("meta"):  # its own parameters are replaced at once: allocate nothing
        module = DepthwiseConv3d(
            conv.in_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
        )
    module.weight = conv.weight
    module.bias = conv.bias
    module.training = conv.training
    return module


__all__ = ["as_depthwise", "is_depthwise", "unsupported"]

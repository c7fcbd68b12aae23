"""Depthwise Conv3d (groups == in == out channels) -> DepthwiseConv3d over the same parameter objects."""

from __future__ import annotations

from typing import TypeGuard

from torch import nn

from prostate_kernels.nn.separable import DepthwiseConv3d
from prostate_kernels.swap.report import has_hooks


def is_depthwise(conv: nn.Module) -> TypeGuard[nn.Conv3d]:
    return (
        type(conv) is nn.Conv3d and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    )


def unsupported(conv: nn.Conv3d) -> str | None:
    return "hooks are registered on it" if has_hooks(conv) else DepthwiseConv3d.mismatch(conv)


def as_depthwise(conv: nn.Conv3d) -> DepthwiseConv3d:
    """A DepthwiseConv3d holding conv's own weight and bias Parameters (nothing copied; same state_dict)."""
    return DepthwiseConv3d.from_conv(conv, share_parameters=True)


__all__ = ["as_depthwise", "is_depthwise", "unsupported"]

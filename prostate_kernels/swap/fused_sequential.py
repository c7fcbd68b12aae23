"""nn.Sequential runs of BatchNorm3d -> ReLU -> Conv3d computed by the fused op.

The Sequential is replaced by a FusedSequential holding the very same children under the same names, so
the parameters are the same objects and the state_dict is unchanged (loads both ways); only forward
differs: a fusable run of three consecutive children is one apply_bn_relu_conv call.
"""

from __future__ import annotations

import torch
from torch import nn

from prostate_kernels.nn.dense import apply_bn_relu_conv
from prostate_kernels.swap.report import has_hooks


def is_triple(norm: nn.Module, relu: nn.Module, conv: nn.Module) -> bool:
    """The three modules are exactly BatchNorm3d, ReLU, Conv3d (subclasses may compute otherwise)."""
    return type(norm) is nn.BatchNorm3d and type(relu) is nn.ReLU and type(conv) is nn.Conv3d


def unsupported(norm: nn.BatchNorm3d, relu: nn.ReLU, conv: nn.Conv3d) -> str | None:
    """Why the fused op cannot stand in for this triple (None: it can)."""
    if conv.groups != 1:
        return f"grouped Conv3d (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"Conv3d padding_mode {conv.padding_mode!r} (the fused op pads with zeros)"
    if norm.num_features != conv.in_channels:
        return f"BatchNorm3d has {norm.num_features} features but Conv3d takes {conv.in_channels}"
    if any(has_hooks(m) for m in (norm, relu, conv)):
        return "hooks are registered on one of the three modules"
    return None


def fusable_starts(modules: list[nn.Module]) -> list[int]:
    """Indices where a fusable BatchNorm3d -> ReLU -> Conv3d run starts (runs do not overlap)."""
    starts, i = [], 0
    while i + 2 < len(modules):
        if is_triple(*modules[i : i + 3]) and unsupported(*modules[i : i + 3]) is None:
            starts.append(i)
            i += 3
        else:
            i += 1
    return starts


class FusedSequential(nn.Sequential):
    """An nn.Sequential whose BatchNorm3d -> ReLU -> Conv3d runs execute as one fused op (checked at each
    forward, so that editing the Sequential stays safe); every other child runs as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self._modules.values())
        starts = set(fusable_starts(modules))
        i = 0
        while i < len(modules):
            if i in starts:
                x = apply_bn_relu_conv(modules[i], modules[i + 2], x)
                i += 3
            else:
                x = modules[i](x)
                i += 1
        return x


def overrides_forward(sequential: nn.Sequential) -> bool:
    """A Sequential subclass with its own forward: its children are not known to run in order."""
    return type(sequential).forward is not nn.Sequential.forward


__all__ = ["FusedSequential", "fusable_starts", "is_triple", "overrides_forward", "unsupported"]

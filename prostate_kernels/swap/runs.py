"""Runs of consecutive nn.Sequential children that one of the library's ops computes at once.

  bn_relu_conv   BatchNorm3d -> ReLU -> Conv3d                       -> the fused layer (train and eval;
                 a SyncBatchNorm too: the fused layer synchronises its statistics as it would)
  separable      depthwise Conv3d -> BatchNorm3d -> ReLU -> Conv3d 1x1x1 -> BatchNorm3d -> ReLU, or
                 ReLU -> depthwise Conv3d -> BatchNorm3d -> Conv3d 1x1x1 -> BatchNorm3d
                 (DeepLabv3+'s SepConv_BN, depth_activation True / False: SeparableConv3d's computation)
                 -> one kernel in CUDA inference (eval mode, no autograd); otherwise its modules run one
                 by one, where its BatchNorm3d -> ReLU -> Conv3d 1x1x1 is itself a bn_relu_conv run.
Only exact torch.nn classes match (a subclass may compute otherwise); modules with hooks never do.
"""

from __future__ import annotations

from typing import NamedTuple, TypeGuard, cast

import torch
from torch import nn

from prostate_kernels.nn.dense import apply_bn_relu_conv, fusion_mismatch
from prostate_kernels.nn.separable import DepthwiseConv3d, eval_affine
from prostate_kernels.ops.conv_geometry import conv_geometry
from prostate_kernels.ops.depthwise_conv3d import fused_separable_applies, separable_inference
from prostate_kernels.swap.report import has_hooks


class Run(NamedTuple):
    start: int
    length: int
    kind: str  # "bn_relu_conv" | "separable"


def is_triple(norm: nn.Module, relu: nn.Module, conv: nn.Module) -> bool:
    """The three modules are exactly BatchNorm3d (or SyncBatchNorm, as convert_sync_batchnorm leaves it:
    the fused layer takes its process group's statistics), ReLU, Conv3d."""
    return type(norm) in _NORMS and type(relu) is nn.ReLU and type(conv) is nn.Conv3d


_NORMS = (nn.BatchNorm3d, nn.SyncBatchNorm)


def unsupported(norm: nn.BatchNorm3d, relu: nn.ReLU, conv: nn.Conv3d) -> str | None:
    """Why the fused layer cannot stand in for this triple (None: it can)."""
    if any(has_hooks(m) for m in (norm, relu, conv)):
        return "hooks are registered on one of the three modules"
    return fusion_mismatch(norm, conv)


def _depthwise(m: nn.Module) -> TypeGuard[nn.Conv3d]:
    return (
        type(m) in (nn.Conv3d, DepthwiseConv3d)
        and m.groups == m.in_channels == m.out_channels
        and m.bias is None
        and m.padding_mode == "zeros"
    )


def _norm(m: nn.Module, channels: int) -> TypeGuard[nn.BatchNorm3d]:
    return type(m) is nn.BatchNorm3d and m.num_features == channels and m.running_mean is not None


def _pointwise(m: nn.Module, channels: int) -> TypeGuard[nn.Conv3d]:
    return (
        type(m) is nn.Conv3d
        and m.in_channels == channels
        and m.kernel_size == (1, 1, 1)
        and m.stride == (1, 1, 1)
        and m.padding == (0, 0, 0)
        and m.groups == 1
        and m.bias is None
    )


def _separable_at(modules: list[nn.Module], i: int) -> tuple[int, bool] | None:
    """(length, depth_activation) of a separable run starting at i, or None."""
    m = modules[i:]
    relu = [type(x) is nn.ReLU for x in m]
    if len(m) >= 6 and _depthwise(m[0]) and relu[2] and relu[5]:
        c = m[0].in_channels
        if _norm(m[1], c) and _pointwise(m[3], c) and _norm(m[4], m[3].out_channels):
            return (6, True) if not any(has_hooks(x) for x in m[:6]) else None
    if len(m) >= 5 and relu[0] and _depthwise(m[1]):
        c = m[1].in_channels
        if _norm(m[2], c) and _pointwise(m[3], c) and _norm(m[4], m[3].out_channels):
            return (5, False) if not any(has_hooks(x) for x in m[:5]) else None
    return None


def _triple_at(modules: list[nn.Module], i: int) -> bool:
    part = modules[i : i + 3]
    return len(part) == 3 and is_triple(*part) and unsupported(*as_triple(part)) is None


def as_triple(modules: list[nn.Module]) -> tuple[nn.BatchNorm3d, nn.ReLU, nn.Conv3d]:
    """The three modules of a run is_triple matched, typed as what it matched (a SyncBatchNorm as the
    BatchNorm3d it stands for: the same attributes)."""
    norm, relu, conv = modules
    assert isinstance(norm, _NORMS) and isinstance(relu, nn.ReLU) and isinstance(conv, nn.Conv3d)
    return cast(nn.BatchNorm3d, norm), relu, conv


def find_runs(modules: list[nn.Module], separable: bool = True) -> list[Run]:
    """The runs a FusedSequential computes at once, in order, not overlapping; a separable run is taken
    before the BatchNorm -> ReLU -> conv inside it (separable=False: bn_relu_conv runs only)."""
    runs, i = [], 0
    while i < len(modules):
        found = _separable_at(modules, i) if separable else None
        if found:
            runs.append(Run(i, found[0], "separable"))
            i += found[0]
        elif _triple_at(modules, i):
            runs.append(Run(i, 3, "bn_relu_conv"))
            i += 3
        else:
            i += 1
    return runs


def run_bn_relu_conv(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    norm, _, conv = as_triple(modules)
    return apply_bn_relu_conv(norm, conv, x)


def try_separable(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """The separable run as one kernel, or None where that kernel does not apply (training, autograd, not
    the Triton backend, autocast, dtype): the caller then runs the modules."""
    depth_activation = len(modules) == 6
    units = (modules[0], modules[1], modules[3], modules[4]) if depth_activation else modules[1:]
    # what _separable_at matched (the depthwise conv an nn.Conv3d or our DepthwiseConv3d, alike here)
    dw, bn1, pw, bn2 = cast(tuple[nn.Conv3d, nn.BatchNorm3d, nn.Conv3d, nn.BatchNorm3d], tuple(units))
    if (
        any(m.training for m in modules)
        or torch.is_grad_enabled()
        or x.shape[1:2] != (dw.in_channels,)
        or not fused_separable_applies(x, pw.weight)
    ):
        return None
    geometry = conv_geometry(dw.kernel_size, dw.stride, dw.padding, dw.dilation)
    return separable_inference(
        x, dw.weight, eval_affine(bn1), pw.weight, eval_affine(bn2), geometry, depth_activation
    )


__all__ = ["Run", "as_triple", "find_runs", "is_triple", "run_bn_relu_conv", "try_separable", "unsupported"]

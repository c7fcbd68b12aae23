"""Functional API: thin entry points; each op picks its implementation from prostate_kernels.backend."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prostate_kernels import backend, reference
from prostate_kernels.ops.conv_geometry import ConvGeometry, conv_geometry
from prostate_kernels.ops.window_ops import (
    window_accumulate_,
    window_gather,
    window_normalize_,
    window_normalize_by_positions_,
)

__all__ = [
    "bn_relu_conv3d",
    "depthwise_conv3d",
    "window_accumulate_",
    "window_gather",
    "window_normalize_",
    "window_normalize_by_positions_",
]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bn_relu_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 1,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """conv3d(relu(batch_norm(x)), weight, bias): the dense layer BN -> ReLU -> Conv3d in one op.

    Same semantics as `nn.Sequential(nn.BatchNorm3d, nn.ReLU, nn.Conv3d)`: in training, per-channel
    batch mean and biased variance normalise x and running_mean/running_var (if given) are updated once
    with `momentum` and the unbiased variance; otherwise the running statistics normalise. Zero padding
    applies to the normalised activation. On CUDA (backend "auto" or "triton") the normalised activation
    is never written to memory, in forward or backward; elsewhere the PyTorch twin runs.

    Args:
        x: (N, C_in, D, H, W) float32/float16/bfloat16, any strides (a channel slice of a larger
            channels-last buffer is read in place; channels-last is the fast layout).
        weight: (C_out, C_in, kD, kH, kW); bias: (C_out,) or None.
        bn_weight, bn_bias: (C_in,) BatchNorm affine parameters or None (no affine).
        running_mean, running_var: (C_in,) or None (then batch statistics are always used).
    """
    geometry = _check_bn_relu_conv3d_args(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
        stride, padding, dilation,
    )  # fmt: skip
    batch_stats = training or running_mean is None
    if backend.resolve(x.device) == "triton":
        from prostate_kernels.ops.bn_relu_conv3d import bn_relu_conv3d_triton

        return bn_relu_conv3d_triton(
            x,
            weight,
            bias,
            bn_weight,
            bn_bias,
            running_mean,
            running_var,
            batch_stats,
            momentum,
            eps,
            geometry,
        )
    return reference.bn_relu_conv3d(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, batch_stats, momentum, eps,
        geometry.stride, geometry.padding, geometry.dilation,
    )  # fmt: skip


def _check_bn_relu_conv3d_args(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
    stride, padding, dilation,
) -> ConvGeometry:  # fmt: skip
    """ValueError/TypeError naming the offending argument; returns the conv geometry."""
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"bn_relu_conv3d: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 5:
        raise ValueError(f"bn_relu_conv3d: x must be 5-D (N, C_in, D, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(
            f"bn_relu_conv3d: weight must be 5-D (C_out, C_in, kD, kH, kW), got shape {tuple(weight.shape)}"
        )
    c_in, c_out = x.shape[1], weight.shape[0]
    if weight.shape[1] != c_in:
        raise ValueError(
            f"bn_relu_conv3d: weight {tuple(weight.shape)} expects {weight.shape[1]} input channels but x "
            f"{tuple(x.shape)} has {c_in} (grouped convolution is not supported)"
        )
    if not x.is_floating_point():
        raise TypeError(f"bn_relu_conv3d: x must be floating point, got {x.dtype}")
    if backend.resolve(x.device) == "triton" and x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"bn_relu_conv3d: the Triton kernels take float32, float16 or bfloat16 x, got {x.dtype}"
        )
    if weight.dtype != x.dtype and backend.autocast_dtype(x.device) is None:
        raise TypeError(f"bn_relu_conv3d: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    for name, value, size in (
        ("bias", bias, c_out),
        ("bn_weight", bn_weight, c_in),
        ("bn_bias", bn_bias, c_in),
        ("running_mean", running_mean, c_in),
        ("running_var", running_var, c_in),
    ):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"bn_relu_conv3d: {name} must be a torch.Tensor or None, got {type(value).__name__}"
            )
        if tuple(value.shape) != (size,):
            raise ValueError(f"bn_relu_conv3d: {name} must have shape ({size},), got {tuple(value.shape)}")
        if value.device != x.device:
            raise ValueError(f"bn_relu_conv3d: {name} is on {value.device} but x is on {x.device}")
    if weight.device != x.device:
        raise ValueError(f"bn_relu_conv3d: weight is on {weight.device} but x is on {x.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu_conv3d: give both running_mean and running_var, or neither")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_relu_conv3d: momentum {momentum!r} must be a number in [0, 1]")
    if not eps > 0:
        raise ValueError(f"bn_relu_conv3d: eps {eps!r} must be > 0")
    geometry = conv_geometry(weight.shape[2:], stride, padding, dilation)
    geometry.output_size(x.shape[2:])
    if (training or running_mean is None) and x.numel() // max(c_in, 1) <= 1:
        raise ValueError(
            "bn_relu_conv3d: batch statistics need more than 1 value per channel, "
            f"got x of shape {tuple(x.shape)}"
        )
    return geometry


def depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """F.conv3d(x, weight, bias, stride, padding, dilation, groups=C) for weight (C, 1, kD, kH, kW).

    Per-axis stride, padding and dilation (atrous rates of 36 and more are fine). On CUDA (backend
    "auto" or "triton") tiled Triton kernels run forward and backward; elsewhere PyTorch's conv3d.
    """
    op = "depthwise_conv3d"
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D (N, C, D, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 5 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"{op}: weight must have shape ({c}, 1, kD, kH, kW) for x with {c} channels, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must have shape ({c},), got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    if weight.dtype != x.dtype and backend.autocast_dtype(x.device) is None:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    geometry = conv_geometry(weight.shape[2:], stride, padding, dilation)
    geometry.output_size(x.shape[2:])
    if backend.resolve(x.device) == "triton":
        if x.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 x, got {x.dtype}")
        from prostate_kernels.ops.depthwise_conv3d import DepthwiseConv3dFunction

        dtype = backend.autocast_dtype(x.device)
        if dtype is not None:  # conv3d autocasts to the autocast dtype: do the same
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with backend.autocast_off(x.device):
            return DepthwiseConv3dFunction.apply(x, weight, bias, geometry)
    return reference.depthwise_conv3d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation)

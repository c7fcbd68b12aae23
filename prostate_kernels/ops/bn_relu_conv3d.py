"""The fused BatchNorm -> ReLU -> Conv3d op (the dense layer): its one public entry.

bn_relu_conv3d() validates its arguments (errors name the offending value), picks the implementation
(backend.resolve: the Triton kernels of bn_relu_conv3d_triton.py, or the PyTorch twin in reference.py),
applies autocast and dispatches. The Triton side is imported on first use, so that importing the package
stays cheap.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist

from prostate_kernels import backend, reference
from prostate_kernels.ops.batch_norm import update_running_stats_
from prostate_kernels.ops.conv_geometry import ConvGeometry, conv_geometry
from prostate_kernels.ops.sync_batch_norm import synced_batch_stats
from prostate_kernels.ops.tensor_subclasses import takes_tensor_subclasses

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernels take


@takes_tensor_subclasses
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
    *,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """conv3d(relu(batch_norm(x)), weight, bias): the dense layer BN -> ReLU -> Conv3d in one op.

    Same semantics as `nn.Sequential(nn.BatchNorm3d, nn.ReLU, nn.Conv3d)`: in training, per-channel
    batch mean and biased variance normalise x and running_mean/running_var (if given) are updated once
    with `momentum` and the unbiased variance; otherwise the running statistics normalise. Zero padding
    applies to the normalised activation. On CUDA (backend "auto" or "triton") the normalised activation
    is never written to memory, in forward or backward; elsewhere the PyTorch twin runs. Under autocast
    BatchNorm and ReLU run in x's dtype and the conv in the autocast dtype, as in the eager Sequential;
    the weight and bias gradients are float32 sums kept in the parameters' dtype, where eager autocast
    rounds them to the autocast dtype first.

    Args:
        x: (N, C_in, D, H, W) float32/float16/bfloat16, any strides (a channel slice of a larger
            channels-last buffer is read in place; channels-last is the fast layout).
        weight: (C_out, C_in, kD, kH, kW); bias: (C_out,) or None.
        bn_weight, bn_bias: (C_in,) BatchNorm affine parameters or None (no affine).
        running_mean, running_var: (C_in,) or None (then batch statistics are always used).
        training: normalise with the batch's statistics and update the running ones (F.batch_norm's
            `training`; nn.BNReLUConv3d passes what nn.BatchNorm3d would: see its batch_norm_step).
        process_group: with batch statistics, take them over the batches of every process of this
            torch.distributed group together, as nn.SyncBatchNorm does (the input gradient flows through
            them on every process; ops/sync_batch_norm.py). Every process of the group must call the op
            alike. None: this process's batch. nn.BNReLUConv3d passes its norm's group when the norm is an
            nn.SyncBatchNorm in training (sync_batch_norm.sync_group).
    """
    geometry = _check_bn_relu_conv3d_args(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
        stride, padding, dilation, process_group,
    )  # fmt: skip
    batch_stats = training or running_mean is None
    if batch_stats and process_group is not None:
        return _synced(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
                       geometry, process_group)  # fmt: skip
    if backend.resolve(x.device) == "triton" and x.shape[0] > 0:  # an empty batch: the twin, as torch does it
        y, stats = _triton(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps,
                           geometry)  # fmt: skip
        if batch_stats and running_mean is not None:
            mean, var, *_ = stats.unbind(0)
            update_running_stats_([(running_mean, running_var, mean, var)], x.numel() // x.shape[1], momentum)
        return y
    return reference.bn_relu_conv3d(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, batch_stats, momentum, eps,
        geometry.stride, geometry.padding, geometry.dilation,
    )  # fmt: skip


def _triton(x, weight, bias, bn_weight, bn_bias, mean, var, batch_stats, eps, geometry):
    """(y, stats (5, C_in)) from the Triton kernels: batch statistics, or normalised with the given
    (mean, var) (running statistics, or synchronised batch ones: then differentiable w.r.t. them)."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as triton_side

    # autocast as the eager Sequential does it: BatchNorm and ReLU in x's dtype, the conv's operands
    # and output in the autocast dtype. The weight goes in as it is: its relayout for the kernels
    # (weight_taps) casts it in the same copy, and its gradient is summed in float32 and kept in the
    # parameter's dtype (no bfloat16 copy of the weight to save, no cast of its gradient back); the
    # bias is added in float32.
    compute_dtype = backend.autocast_dtype(x.device) or x.dtype
    with backend.autocast_off(x.device):
        conv = (list(geometry.stride), list(geometry.padding), list(geometry.dilation), compute_dtype)
        inputs = (x, weight, bias, bn_weight, bn_bias, mean, var, batch_stats, float(eps), *conv)
        if torch.compiler.is_compiling():  # the custom op: an opaque node torch.compile can trace
            return triton_side.bn_relu_conv3d_forward(*inputs)
        return triton_side.FusedBNReLUConv3d.apply(*inputs)  # eager: less dispatch on the host


def _synced(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, geometry, group):
    """The op in training mode with batch statistics over `group` (nn.SyncBatchNorm's): the statistics
    from sync_batch_norm (differentiable w.r.t. x), the running ones updated with them, then the fused
    op normalising with them as given, differentiable w.r.t. them (the twin for an empty local batch or
    off the Triton engine; both engines make the same collectives)."""
    mean, var, count = synced_batch_stats(x, group)
    if running_mean is not None:
        update_running_stats_([(running_mean, running_var, mean.detach(), var.detach())], count, momentum)
    if backend.resolve(x.device) == "triton" and x.shape[0] > 0:
        y, _ = _triton(x, weight, bias, bn_weight, bn_bias, mean, var, False, eps, geometry)
        return y
    return reference.bn_relu_conv3d_given_stats(
        x, weight, bias, bn_weight, bn_bias, mean, var, eps, geometry.stride, geometry.padding,
        geometry.dilation,
    )  # fmt: skip


def _check_bn_relu_conv3d_args(
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
    stride, padding, dilation, process_group,
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
    if backend.resolve(x.device) == "triton" and x.dtype not in KERNEL_DTYPES:
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
    check_batch_norm_settings("bn_relu_conv3d", eps, momentum)
    geometry = conv_geometry(weight.shape[2:], stride, padding, dilation)
    geometry.output_size(x.shape[2:])
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            "bn_relu_conv3d: process_group must be a torch.distributed ProcessGroup or None, got "
            f"{type(process_group).__name__}"
        )
    # synchronised statistics count every process's values: checked over the group once gathered
    local_stats = (training or running_mean is None) and process_group is None
    if local_stats and x.shape[0] > 0 and x.numel() // max(c_in, 1) <= 1:
        raise ValueError(
            "bn_relu_conv3d: batch statistics need more than 1 value per channel, "
            f"got x of shape {tuple(x.shape)}"
        )
    return geometry


def check_batch_norm_settings(owner: str, eps: object, momentum: object, cumulative: bool = False) -> None:
    """ValueError naming `owner` and the value: momentum a number in [0, 1] (or None, a cumulative
    average, where `cumulative` allows it), eps a number > 0 (NaN is refused)."""
    in_range = (
        isinstance(momentum, numbers.Real)
        and not isinstance(momentum, bool)
        and 0.0 <= float(momentum) <= 1.0
    )
    if not in_range and not (momentum is None and cumulative):
        raise ValueError(f"{owner}: momentum {momentum!r} must be a number in [0, 1]")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
        raise ValueError(f"{owner}: eps {eps!r} must be a number > 0")


__all__ = ["KERNEL_DTYPES", "bn_relu_conv3d", "check_batch_norm_settings"]

"""Readable PyTorch twins of every op: the test oracle, the CPU fallback and the benchmark baseline.

Each twin computes exactly the function of its fast path (same arguments, same shapes, same float32
accumulation) with plain tensor operations. Argument checking happens before dispatch, in ops/.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prostate_kernels.ops.batch_norm import fold_batch_norm

# ---------------------------------------------------------------------------------------------
# Sliding-window stitching. Shapes: volume/output (N, C, D, H, W); weight (N, 1, D, H, W) float32;
# windows (B, C, rd, rh, rw); starts (B, 4) int64 rows (n, z, y, x); importance (rd, rh, rw) float32.
# ---------------------------------------------------------------------------------------------


def _window_index(start: torch.Tensor, roi: tuple[int, ...]) -> tuple[int, slice, slice, slice, slice]:
    n, z, y, x = (int(v) for v in start)
    rd, rh, rw = roi
    return n, slice(None), slice(z, z + rd), slice(y, y + rh), slice(x, x + rw)


def window_gather(
    volume: torch.Tensor, starts: torch.Tensor, roi: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, C, *roi) windows copied out of `volume` at `starts` (into `out` when given)."""
    rd, rh, rw = roi
    if out is None:
        out = volume.new_empty((starts.shape[0], volume.shape[1], rd, rh, rw))
    for b, start in enumerate(starts.cpu()):
        out[b] = volume[_window_index(start, (rd, rh, rw))]
    return out


def window_accumulate_(
    output: torch.Tensor,
    weight: torch.Tensor | None,
    windows: torch.Tensor,
    starts: torch.Tensor,
    importance: torch.Tensor,
) -> None:
    """output[window] += windows[b] * importance (float32); weight[window] += importance, in batch order."""
    roi = tuple(windows.shape[2:])
    for b, start in enumerate(starts.cpu()):
        index = _window_index(start, roi)
        output[index] += windows[b].float() * importance
        if weight is not None:
            weight[index] += importance


def window_normalize_(output: torch.Tensor, weight: torch.Tensor) -> None:
    """output /= weight (broadcast over images when weight has batch 1); voxels of weight <= 0 become 0."""
    covered = weight > 0
    output.copy_(torch.where(covered, output / torch.where(covered, weight, 1.0), 0.0))


def window_normalize_by_positions_(
    output: torch.Tensor, positions: torch.Tensor, importance: torch.Tensor
) -> None:
    """output /= the weight map of windows at positions (P, 3) rows (z, y, x), shared by every image."""
    weight = torch.zeros((1, 1, *output.shape[2:]), dtype=torch.float32, device=output.device)
    roi = tuple(importance.shape)
    for z, y, x in positions.cpu().tolist():
        weight[_window_index(torch.tensor([0, z, y, x]), roi)] += importance
    window_normalize_(output, weight)


# ---------------------------------------------------------------------------------------------
# Dense layer: BatchNorm3d -> ReLU -> Conv3d, exactly as the eager nn.Sequential computes it.
# ---------------------------------------------------------------------------------------------


def bn_relu_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> torch.Tensor:
    """conv3d(relu(batch_norm(x))): batch statistics when training (running ones updated), else running."""
    z = torch.nn.functional.batch_norm(
        x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps
    )
    return torch.nn.functional.conv3d(torch.relu(z), weight, bias, stride, padding, dilation)


def bn_relu_conv3d_given_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> torch.Tensor:
    """conv3d(relu(batch_norm(x))) normalised with the given (C,) mean and biased variance, differentiable
    with respect to them (F.batch_norm is not, w.r.t. running statistics): synchronised BatchNorm's
    normalisation, folded as every engine folds it (batch_norm.fold_batch_norm, torch ops that autograd
    differentiates). BatchNorm in mean's dtype (float32, or float64), the conv in x's, as F.batch_norm
    does."""
    scale, shift, _ = fold_batch_norm(mean, var, bn_weight, bn_bias, eps)
    channel = (1, -1, 1, 1, 1)
    z = x.to(mean.dtype) * scale.view(channel) + shift.view(channel)
    return torch.nn.functional.conv3d(torch.relu(z).to(x.dtype), weight, bias, stride, padding, dilation)


# ---------------------------------------------------------------------------------------------
# Depthwise and separable convolution (DeepLabv3+ SepConv), as the eager layers compute them.
# ---------------------------------------------------------------------------------------------


def depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
) -> torch.Tensor:
    """conv3d with groups = C and weight (C, 1, kD, kH, kW)."""
    return torch.nn.functional.conv3d(x, weight, bias, stride, padding, dilation, groups=x.shape[1])


def separable_inference(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    bn1: tuple[torch.Tensor, torch.Tensor],
    pointwise_weight: torch.Tensor,
    bn2: tuple[torch.Tensor, torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int] | str,
    dilation: Sequence[int],
    depth_activation: bool,
) -> torch.Tensor:
    """[ReLU] -> depthwise -> BN [-> ReLU] -> 1x1x1 -> BN [-> ReLU], BatchNorms as (scale, shift)."""

    def affine(t, bn):
        return t * bn[0].to(t.dtype)[:, None, None, None] + bn[1].to(t.dtype)[:, None, None, None]

    h = x if depth_activation else torch.relu(x)
    h = affine(depthwise_conv3d(h, depthwise_weight, None, stride, padding, dilation), bn1)
    h = torch.relu(h) if depth_activation else h
    h = affine(torch.nn.functional.conv3d(h, pointwise_weight), bn2)
    return torch.relu(h) if depth_activation else h

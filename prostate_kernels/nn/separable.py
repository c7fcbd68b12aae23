"""Depthwise-separable atrous convolution in 3D: DepthwiseConv3d, SeparableConv3d, ASPP3d (DeepLabv3+).

The paper could not build DeepLabv3+ in 3D for want of a 3D separable convolution; these are its 3D
counterparts of the Keras layers it used (SepConv_BN and the ASPP of the Keras DeepLabv3+ port).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prostate_kernels import functional, reference
from prostate_kernels.nn.arguments import check_count, check_input, check_probability
from prostate_kernels.ops.batch_norm import fold_batch_norm
from prostate_kernels.ops.conv_geometry import Triple, conv_geometry, triple
from prostate_kernels.ops.depthwise_conv3d import fused_separable_applies, separable_inference

__all__ = ["ASPP3d", "DepthwiseConv3d", "SeparableConv3d"]

Rate = int | tuple[int, int, int]


class DepthwiseConv3d(nn.Conv3d):
    """nn.Conv3d(channels, channels, kernel_size, groups=channels) on the tiled depthwise kernels (on CUDA;
    PyTorch's conv3d elsewhere). Same parameters and state_dict as that Conv3d."""

    def __init__(
        self,
        channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
    ) -> None:
        channels = check_count("DepthwiseConv3d", "channels", channels)
        super().__init__(
            channels, channels, triple(kernel_size, "kernel_size", positive=True),
            triple(stride, "stride", positive=True),
            padding if isinstance(padding, str) else triple(padding, "padding"),
            triple(dilation, "dilation", positive=True),
            groups=channels, bias=bias,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.depthwise_conv3d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation
        )

    @staticmethod
    def mismatch(conv: nn.Conv3d) -> str | None:
        """Why a DepthwiseConv3d cannot stand in for `conv` (None: it can)."""
        if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
            return (
                "expects a depthwise Conv3d (groups == in == out channels), "
                f"got in={conv.in_channels} out={conv.out_channels} groups={conv.groups}"
            )
        if conv.padding_mode != "zeros":
            return f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
        return None

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, share_parameters: bool = False) -> DepthwiseConv3d:
        """The drop-in for an existing depthwise Conv3d (groups == in == out channels): its weights copied,
        or, with share_parameters, its own weight and bias Parameters and train/eval mode (nothing
        allocated; what prostate_kernels.optimize swaps in)."""
        reason = cls.mismatch(conv)
        if reason:
            raise ValueError(f"from_conv: {reason}")
        settings = (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
        if share_parameters:
            with torch.device("meta"):  # its own parameters are replaced at once
                module = cls(*settings, conv.bias is not None)
            module.weight, module.bias, module.training = conv.weight, conv.bias, conv.training
            return module
        module = cls(*settings, conv.bias is not None)
        module.load_state_dict(conv.state_dict())
        return module.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _same_padding(kernel: Triple, dilation: Triple) -> Triple:
    """Keras' SepConv padding: (effective kernel - 1) / 2 on each side, stride 1 or 2 alike (odd kernels)."""
    (kd, kh, kw), (dd, dh, dw) = kernel, dilation
    return dd * (kd - 1) // 2, dh * (kh - 1) // 2, dw * (kw - 1) // 2


def eval_affine(bn: nn.BatchNorm3d, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm from its running statistics, in `dtype`."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"eval_affine: {bn} keeps no running statistics (track_running_stats=False)")
    scale, shift, _ = fold_batch_norm(
        bn.running_mean.to(dtype), bn.running_var.to(dtype), bn.weight, bn.bias, bn.eps
    )
    return scale.contiguous(), shift.contiguous()


class SeparableConv3d(nn.Module):
    """Depthwise (atrous) conv -> BN -> pointwise 1x1x1 -> BN, the 3D twin of DeepLabv3+'s SepConv_BN.

    depth_activation=False: ReLU before the depthwise conv (Keras' default); True: ReLU after each BN.
    Padding keeps the size at stride 1 ((k - 1) * dilation / 2 per side). Per-axis stride and dilation
    are allowed: the slice axis of an MRI patch is short (16 slices in the paper), so a rate such as
    (2, 12, 12) keeps its taps inside the volume. In inference (eval mode, no autograd) on CUDA the four
    steps run as one kernel that never writes the depthwise output.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        dilation: Rate = 1,
        depth_activation: bool = False,
        eps: float = 1e-3,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels = check_count("SeparableConv3d", "in_channels", in_channels)
        out_channels = check_count("SeparableConv3d", "out_channels", out_channels)
        kernel = triple(kernel_size, "kernel_size", positive=True)
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"SeparableConv3d: kernel_size {kernel} must be odd (the padding is symmetric)")
        dilation = triple(dilation, "dilation", positive=True)
        self.depth_activation = depth_activation
        self.depthwise = DepthwiseConv3d(
            in_channels, kernel, stride, _same_padding(kernel, dilation), dilation, False
        )
        self.depthwise_bn = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum)
        self.pointwise = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm3d(out_channels, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the depthwise op checks the rest; this is for the ReLU that may come first
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"SeparableConv3d: x must be a floating-point torch.Tensor, got {what}")
        if self._fusable(x):
            d = self.depthwise
            geometry = conv_geometry(d.kernel_size, d.stride, d.padding, d.dilation)
            return separable_inference(
                x, d.weight, eval_affine(self.depthwise_bn), self.pointwise.weight,
                eval_affine(self.pointwise_bn), geometry, self.depth_activation,
            )  # fmt: skip
        h = x if self.depth_activation else torch.relu(x)
        h = self.depthwise_bn(self.depthwise(h))
        h = torch.relu(h) if self.depth_activation else h
        h = self.pointwise_bn(self.pointwise(h))
        return torch.relu(h) if self.depth_activation else h

    def _fusable(self, x: torch.Tensor) -> bool:
        """Eval mode without autograd, BatchNorms with running stats, and what the op needs of x."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self.depthwise_bn.running_mean is not None
            and self.pointwise_bn.running_mean is not None
            and fused_separable_applies(x, self.pointwise.weight)
        )

    def reference_inference(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused eval-mode computation (PyTorch twin of the fused kernel)."""
        d = self.depthwise
        dtype = torch.promote_types(x.dtype, torch.float32)  # BatchNorm arithmetic: float32, or float64
        return reference.separable_inference(
            x, d.weight, eval_affine(self.depthwise_bn, dtype), self.pointwise.weight,
            eval_affine(self.pointwise_bn, dtype), d.stride, d.padding, d.dilation, self.depth_activation,
        )  # fmt: skip


class ASPP3d(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3+) in 3D: image pooling, a 1x1x1 branch and one separable
    atrous branch per rate, concatenated in that order, projected by 1x1x1 conv -> BN -> ReLU -> dropout.

    rates: one per atrous branch, each an int or a per-axis (D, H, W) triple; with few slices, give the
    slice axis a smaller rate, e.g. rates=((1, 6, 6), (2, 12, 12), (3, 18, 18)). kernel_size (1, 3, 3)
    makes the atrous branches 2-D convolutions of each slice (how the 2-D DeepLabv3+ runs on these layers).
    Training needs a batch of at least `min_training_batch` images: the image-pooling branch's BatchNorm
    sees one value per image and channel.
    """

    min_training_batch = 2  # read by train's settings check through every module of a model

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[Rate] = (6, 12, 18),
        dropout: float = 0.1,
        kernel_size: int | tuple[int, int, int] = 3,
    ) -> None:
        super().__init__()
        in_channels = check_count("ASPP3d", "in_channels", in_channels)
        out_channels = check_count("ASPP3d", "out_channels", out_channels)
        dropout = check_probability("ASPP3d", "dropout", dropout)
        rates = [triple(r, "rate", positive=True) for r in rates]
        self.rates = tuple(rates)
        self.pool_conv = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.pool_bn = nn.BatchNorm3d(out_channels, eps=1e-5)
        self.conv1x1 = nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.conv1x1_bn = nn.BatchNorm3d(out_channels, eps=1e-5)
        self.atrous = nn.ModuleList(
            SeparableConv3d(
                in_channels, out_channels, kernel_size, dilation=r, depth_activation=True, eps=1e-5
            )
            for r in rates
        )
        self.project = nn.Conv3d((2 + len(rates)) * out_channels, out_channels, 1, bias=False)
        self.project_bn = nn.BatchNorm3d(out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("ASPP3d", x, self.conv1x1.in_channels, self.conv1x1.weight, self.training)
        if self.training and 0 < x.shape[0] < self.min_training_batch:
            raise ValueError(
                f"ASPP3d: training needs a batch of at least {self.min_training_batch} (its image-pooling "
                f"BatchNorm sees one value per image), got input size {tuple(x.shape)}"
            )
        pooled = torch.relu(self.pool_bn(self.pool_conv(x.mean(dim=(2, 3, 4), keepdim=True))))
        branches = [pooled.expand(-1, -1, *x.shape[2:]), torch.relu(self.conv1x1_bn(self.conv1x1(x)))]
        branches += [branch(x) for branch in self.atrous]
        h = torch.relu(self.project_bn(self.project(torch.cat(branches, dim=1))))
        return self.dropout(h)

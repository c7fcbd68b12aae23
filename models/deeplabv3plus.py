"""DeepLabv3+ with the Xception-65 backbone of the Keras port the paper used (section 4.3), in 2D and 3D.

Entry flow (conv 3x3/2 -> 32, conv 3x3 -> 64, three Xception blocks of 128, 256, 728 filters, the first
two of stride 2, the skip to the decoder taken inside the second), middle flow (16 residual Xception
blocks of 728), exit flow (Xception blocks 728-1024-1024 and 1536-1536-2048), ASPP (image pooling, 1x1,
three separable atrous branches, 256 channels, dropout 0.1), decoder (ASPP output up-sampled to the skip,
48-channel skip projection, two separable convs of 256), a 1x1 conv to the logits, up-sampled to the
input size. Output stride 16: entry block 3 of stride 2, ASPP rates (6, 12, 18); output stride 8 (the
paper's rates: middle 2, exit 2 and 4, ASPP 12, 24, 36): entry block 3 of stride 1.

spatial_dims=2 takes (N, C, H, W) (the paper: 13 stacked slices as channels, 256x256) and runs on the
library's 3D layers with one-slice kernels (1, k, k): the same weights as Keras' 2D layers, counted alike.
With 3 inputs and 21 classes this counts 41,258,213, the Keras port's own total; with the paper's 13
inputs and 1 output, 41,255,953 against Table 1's 41,253,023 (0.007% apart).

spatial_dims=3 takes (N, C, D, H, W) and uses 3x3x3 separable atrous convolutions (SeparableConv3d,
ASPP3d). The slice axis is short (16 slices at the paper's patch), so it is downsampled only by the first
two reductions (conv 1 and entry block 1: 4x in total, 16 -> 4 slices) while H and W follow the output
stride, and every atrous rate is 1 along the slices (a rate of 6 or more on 4 slices would reach only
padding). Inputs must be multiples of (4, OS, OS) in 3D and (OS, OS) in 2D.
"""

from __future__ import annotations

import torch
from torch import nn

from prostate_kernels.integers import as_int
from prostate_kernels.nn import ASPP3d, SeparableConv3d
from prostate_kernels.nn.arguments import check_count

from .common import check_model_input
from .resize import resize_aligned


class _Axes:
    """Kernel sizes, strides and rates per axis (D, H, W) for the 2-D or 3-D network."""

    def __init__(self, spatial_dims: int) -> None:
        if as_int(spatial_dims) not in (2, 3):
            raise ValueError(f"DeepLabV3Plus: spatial_dims {spatial_dims!r} must be 2 or 3")
        self.dims = int(spatial_dims)

    def kernel(self, k: int) -> tuple[int, int, int]:
        return (k if self.dims == 3 else 1, k, k)

    def stride(self, s: int, reduces_slices: bool) -> tuple[int, int, int]:
        return (s if self.dims == 3 and reduces_slices else 1, s, s)

    def rate(self, r: int) -> tuple[int, int, int]:
        return (1, r, r)

    def padding(self, k: int) -> tuple[int, int, int]:
        kd, kh, kw = self.kernel(k)
        return (kd - 1) // 2, (kh - 1) // 2, (kw - 1) // 2


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (Keras default epsilon 1e-3) [-> ReLU]."""

    def __init__(
        self,
        axes: _Axes,
        in_ch: int,
        out_ch: int,
        k: int,
        stride: tuple[int, int, int] = (1, 1, 1),
        relu: bool = True,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, axes.kernel(k), stride, axes.padding(k), bias=False)
        self.bn = nn.BatchNorm3d(out_ch, eps=eps)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.relu else x


class XceptionBlock(nn.Module):
    """Three separable convs (the last with the stride); shortcut: 1x1 conv + BN ("conv"), identity
    ("sum") or none. The output of the second separable conv is kept as `skip`."""

    def __init__(
        self,
        axes: _Axes,
        in_ch: int,
        depths: list[int],
        shortcut: str,
        stride: tuple[int, int, int],
        rate: int = 1,
        depth_activation: bool = False,
    ) -> None:
        super().__init__()
        chans = [in_ch, *depths]
        self.convs = nn.ModuleList(
            SeparableConv3d(
                chans[i],
                chans[i + 1],
                axes.kernel(3),
                stride if i == 2 else (1, 1, 1),
                axes.rate(rate),
                depth_activation=depth_activation,
            )  # fmt: skip
            for i in range(3)
        )
        self.shortcut_type = shortcut
        if shortcut == "conv":
            self.shortcut = nn.Conv3d(in_ch, depths[-1], 1, stride, bias=False)
            self.shortcut_bn = nn.BatchNorm3d(depths[-1], eps=1e-3)
        self.skip: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        for i, conv in enumerate(self.convs):
            residual = conv(residual)
            if i == 1:
                self.skip = residual
        if self.shortcut_type == "conv":
            return residual + self.shortcut_bn(self.shortcut(x))
        if self.shortcut_type == "sum":
            return residual + x
        return residual


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ (Xception-65), 2-D or 3-D; output (N, out_channels, *input spatial size) logits.

    width < 1 scales every channel count (rounded to multiples of 8): small variants for CPU tests.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 13,
        out_channels: int = 1,
        output_stride: int = 16,
        middle_blocks: int = 16,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        # checked here, naming this network (torch's layers take 0 or negative channels and fail later)
        in_channels = check_count("DeepLabV3Plus", "in_channels", in_channels)
        self.in_channels = in_channels
        out_channels = check_count("DeepLabV3Plus", "out_channels", out_channels)
        middle_blocks = check_count("DeepLabV3Plus", "middle_blocks", middle_blocks, least=0)
        if as_int(output_stride) not in (8, 16):
            raise ValueError(f"DeepLabV3Plus: output_stride {output_stride!r} must be 8 or 16")
        output_stride = int(output_stride)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
            raise ValueError(f"DeepLabV3Plus: width {width!r} must be in (0, 1]")

        def ch(n: int) -> int:  # channel count scaled by `width` (1.0: the paper's network)
            return n if width == 1 else max(8, round(n * width / 8) * 8)

        axes = _Axes(spatial_dims)
        self.spatial_dims, self.output_stride = spatial_dims, output_stride
        block3_stride, middle_rate, exit_rates, aspp_rates = (
            (2, 1, (1, 2), (6, 12, 18)) if output_stride == 16 else (1, 2, (2, 4), (12, 24, 36))
        )
        c32, c64, c128, c256, c728 = ch(32), ch(64), ch(128), ch(256), ch(728)
        c1024, c1536, c2048, c48 = ch(1024), ch(1536), ch(2048), ch(48)
        self.entry_conv1 = ConvBN(axes, in_channels, c32, 3, axes.stride(2, True))
        self.entry_conv2 = ConvBN(axes, c32, c64, 3)
        self.entry_block1 = XceptionBlock(axes, c64, [c128] * 3, "conv", axes.stride(2, True))
        self.entry_block2 = XceptionBlock(axes, c128, [c256] * 3, "conv", axes.stride(2, False))
        self.entry_block3 = XceptionBlock(axes, c256, [c728] * 3, "conv", axes.stride(block3_stride, False))
        self.middle = nn.Sequential(
            *(
                XceptionBlock(axes, c728, [c728] * 3, "sum", (1, 1, 1), middle_rate)
                for _ in range(middle_blocks)
            )
        )
        self.exit_block1 = XceptionBlock(axes, c728, [c728, c1024, c1024], "conv", (1, 1, 1), exit_rates[0])
        self.exit_block2 = XceptionBlock(
            axes, c1024, [c1536, c1536, c2048], "none", (1, 1, 1), exit_rates[1], depth_activation=True
        )
        self.aspp = ASPP3d(c2048, c256, rates=[axes.rate(r) for r in aspp_rates], kernel_size=axes.kernel(3))
        self.skip_projection = ConvBN(axes, c256, c48, 1, eps=1e-5)
        self.decoder = nn.Sequential(
            SeparableConv3d(c256 + c48, c256, axes.kernel(3), depth_activation=True, eps=1e-5),
            SeparableConv3d(c256, c256, axes.kernel(3), depth_activation=True, eps=1e-5),
        )
        self.head = nn.Conv3d(c256, out_channels, 1)
        self.downsampling = (4 if spatial_dims == 3 else 1, output_stride, output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial_dims == 2:
            check_model_input(x, self.downsampling[1:], self.in_channels, "DeepLabV3Plus(spatial_dims=2)")
            return self._forward_3d(x.unsqueeze(2)).squeeze(2)
        check_model_input(x, self.downsampling, self.in_channels, "DeepLabV3Plus(spatial_dims=3)")
        return self._forward_3d(x)

    def _forward_3d(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = self.entry_block1(self.entry_conv2(self.entry_conv1(x)))
        x = self.entry_block2(x)
        skip = self.entry_block2.skip
        assert skip is not None  # set by entry_block2's forward, just above
        x = self.exit_block2(self.exit_block1(self.middle(self.entry_block3(x))))
        x = resize_aligned(self.aspp(x), skip.shape[2:])
        x = self.decoder(torch.cat([x, self.skip_projection(skip)], dim=1))
        return resize_aligned(self.head(x), size)

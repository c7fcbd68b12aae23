"""U-Net 3D of the paper (section 4.2, Figure 1): 1,605,381 parameters in Keras' count (Table 1).

Blocks: BN -> conv 3x3x3 -> ReLU -> dropout -> conv 3x3x3 -> ReLU (convs without bias), max pooling
between the down blocks, 3x3x3 stride-2 transposed convs halving the channels (no bias) on the way up,
the up blocks starting with BN on the concatenation; a final 1x1x1 conv (with bias) to one logit.

The block order is BN -> conv -> ReLU, so the fused BN -> ReLU -> conv layer does not apply here: U-Net
runs on PyTorch's own layers (cuDNN on the GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prostate_kernels.nn.arguments import check_count, check_probability

from .common import check_model_input


class UNetBlock(nn.Module):
    """BN -> conv3x3x3 -> ReLU -> dropout -> conv3x3x3 -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(self.norm(x)))
        return torch.relu(self.conv2(self.dropout(x)))


class UNet3D(nn.Module):
    """U-Net 3D with len(filters) - 1 down blocks, a bottom block and as many up blocks.

    Input (N, in_channels, D, H, W) with every spatial size a multiple of 2^(len(filters) - 1);
    output (N, 1, D, H, W) logits.
    """

    def __init__(
        self, in_channels: int = 1, filters: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.2
    ) -> None:
        super().__init__()
        filters = list(filters)
        if len(filters) < 2:
            raise ValueError(
                f"UNet3D needs at least 2 filter counts (a down and a bottom block), got {filters}"
            )
        # checked here, naming this network (torch's layers take 0 or negative channels and fail later)
        filters = [check_count("UNet3D", "filters entry", f) for f in filters]
        dropout = check_probability("UNet3D", "dropout", dropout)
        in_channels = check_count("UNet3D", "in_channels", in_channels)
        self.in_channels = in_channels
        self.down = nn.ModuleList()
        channels = in_channels
        for f in filters[:-1]:
            self.down.append(UNetBlock(channels, f, dropout))
            channels = f
        self.bottom = UNetBlock(channels, filters[-1], dropout)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        channels = filters[-1]
        for f in reversed(filters[:-1]):
            self.upsample.append(
                nn.ConvTranspose3d(channels, channels // 2, 3, 2, 1, output_padding=1, bias=False)
            )
            self.up.append(UNetBlock(channels // 2 + f, f, dropout))
            channels = f
        self.head = nn.Conv3d(channels, 1, 1)
        self.downsampling = (2 ** (len(filters) - 1),) * 3  # per axis (D, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(x, self.downsampling, self.in_channels, "UNet3D")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool3d(x, 2)
        x = self.bottom(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.head(x)

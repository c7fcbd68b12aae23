"""Tiramisu 3D (FC-DenseNet in 3D) of the paper (section 4.4), on the library's fused layers.

first conv 3x3x3 -> 48 filters; down path: dense block (output = input + new features) -> transition
down (BN -> ReLU -> 1x1x1 conv, same channels -> dropout -> max pool 2); bottleneck dense block (new
features only); up path: transition up (3x3x3 stride-2 transposed conv, with bias, on the new features of
the block below) -> concatenation with the skip -> dense block (new features only, except the last,
whose output includes its input) -> final 1x1x1 conv (with bias) to one logit. Growth 16, dropout 0.2;
convs without bias except the transposed and the final one.

Counting conv and transposed-conv weights and biases only ("conv" convention), the paper's layouts give
p4a 49,382,353, p3a 22,962,289 (Table 1 prints 22,692,289, two digits swapped) and p3b 23,487,169.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prostate_kernels.nn import BNReLUConv3d, DenseBlock3d
from prostate_kernels.nn.arguments import check_count, check_probability

from .common import check_model_input

P4A_LAYERS = (9, 10, 12, 15, 17, 20, 17, 15, 12)
P3A_LAYERS = (7, 8, 9, 12, 15, 16, 17)
P3B_LAYERS = (12,) * 7
TINY_LAYERS = (2, 2, 2, 2, 2)


class TransitionDown(nn.Module):
    """BN -> ReLU -> 1x1x1 conv (same channels) -> dropout -> max pool 2."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.layer = BNReLUConv3d(channels, channels, kernel_size=1, padding=0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool3d(self.dropout(self.layer(x)), 2)


class Tiramisu3D(nn.Module):
    """FC-DenseNet 3D. layers_per_block: 2 * n_pool + 1 entries (down blocks, bottleneck, up blocks).

    Input (N, in_channels, D, H, W), each spatial size a multiple of 2^n_pool; output (N, 1, D, H, W).
    memory_efficient=False builds the naive torch.cat dense blocks (same state_dict).
    """

    def __init__(
        self,
        layers_per_block: Sequence[int] = P3A_LAYERS,
        growth_rate: int = 16,
        first_conv_filters: int = 48,
        dropout: float = 0.2,
        in_channels: int = 1,
        memory_efficient: bool = True,
    ) -> None:
        super().__init__()
        layers = list(layers_per_block)
        if len(layers) < 3 or len(layers) % 2 == 0:
            raise ValueError(f"layers_per_block {layers} must have 2 * n_pool + 1 >= 3 entries")
        # checked here, naming this network (torch's layers take 0 or negative channels and fail later)
        layers = [check_count("Tiramisu3D", "layers_per_block entry", n) for n in layers]
        growth_rate = check_count("Tiramisu3D", "growth_rate", growth_rate)
        first_conv_filters = check_count("Tiramisu3D", "first_conv_filters", first_conv_filters)
        dropout = check_probability("Tiramisu3D", "dropout", dropout)
        in_channels = check_count("Tiramisu3D", "in_channels", in_channels)
        self.in_channels = in_channels
        n_pool = len(layers) // 2
        self.n_pool, self.downsampling = n_pool, (2**n_pool,) * 3  # per axis (D, H, W)
        self.first_conv = nn.Conv3d(in_channels, first_conv_filters, 3, padding=1, bias=False)
        self.down_blocks, self.transitions_down = nn.ModuleList(), nn.ModuleList()
        channels, skip_channels = first_conv_filters, []
        for i in range(n_pool):
            block = DenseBlock3d(channels, growth_rate, layers[i], dropout, True, memory_efficient)
            self.down_blocks.append(block)
            channels = block.out_channels
            skip_channels.append(channels)
            self.transitions_down.append(TransitionDown(channels, dropout))
        self.bottleneck = DenseBlock3d(
            channels, growth_rate, layers[n_pool], dropout, False, memory_efficient
        )
        new = self.bottleneck.out_channels
        self.transitions_up, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i in range(n_pool):
            last = i == n_pool - 1
            self.transitions_up.append(nn.ConvTranspose3d(new, new, 3, stride=2, padding=1, output_padding=1))
            block_in = new + skip_channels[n_pool - 1 - i]
            block = DenseBlock3d(
                block_in, growth_rate, layers[n_pool + 1 + i], dropout, last, memory_efficient
            )
            self.up_blocks.append(block)
            new = block.out_channels
        self.head = nn.Conv3d(new, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_model_input(x, self.downsampling, self.in_channels, "Tiramisu3D")
        x = self.first_conv(x)
        skips = []
        for block, transition in zip(self.down_blocks, self.transitions_down, strict=True):
            x = block(x)
            skips.append(x)
            x = transition(x)
        x = self.bottleneck(x)
        for transition, block, skip in zip(self.transitions_up, self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([transition(x), skip], dim=1))
        return self.head(x)


def tiramisu3d_p4a(**overrides: Any) -> Tiramisu3D:
    """4 poolings, layers (9, 10, 12, 15, 17, 20, 17, 15, 12): 49,382,353 conv parameters."""
    return Tiramisu3D(**{"layers_per_block": P4A_LAYERS, **overrides})


def tiramisu3d_p3a(**overrides: Any) -> Tiramisu3D:
    """3 poolings, layers (7, 8, 9, 12, 15, 16, 17): 22,962,289 conv parameters (the paper's best)."""
    return Tiramisu3D(**{"layers_per_block": P3A_LAYERS, **overrides})


def tiramisu3d_p3b(**overrides: Any) -> Tiramisu3D:
    """3 poolings, 12 layers in every block: 23,487,169 conv parameters."""
    return Tiramisu3D(**{"layers_per_block": P3B_LAYERS, **overrides})


def tiramisu3d_tiny(**overrides: Any) -> Tiramisu3D:
    """2 poolings, 2 layers per block, growth 4, 8 first filters: for CPU demos and tests."""
    return Tiramisu3D(
        **{"layers_per_block": TINY_LAYERS, "growth_rate": 4, "first_conv_filters": 8, **overrides}
    )

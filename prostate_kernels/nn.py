"""Drop-in modules built on the fused ops (state_dicts compatible with the eager modules they replace)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prostate_kernels import functional

__all__ = ["BNReLUConv3d"]


class BNReLUConv3d(nn.Module):
    """BatchNorm3d -> ReLU -> Conv3d as one fused op; a drop-in for

        nn.Sequential(OrderedDict(norm=nn.BatchNorm3d(in_channels), relu=nn.ReLU(inplace=True),
                                  conv=nn.Conv3d(in_channels, out_channels, kernel_size, ...)))

    with the same state_dict keys (norm.*, conv.*), so weights load both ways. BatchNorm semantics are
    those of nn.BatchNorm3d (momentum=None is a cumulative average; num_batches_tracked counts steps).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] | str = 1,
        dilation: int | tuple[int, int, int] = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        self.norm = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        # The running-statistics bookkeeping of nn.BatchNorm3d.forward, step for step.
        momentum = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:
                momentum = 1.0 / float(norm.num_batches_tracked)
        batch_stats = norm.training or (norm.running_mean is None and norm.running_var is None)
        use_running = not norm.training or norm.track_running_stats
        return functional.bn_relu_conv3d(
            x,
            self.conv.weight,
            self.conv.bias,
            norm.weight,
            norm.bias,
            norm.running_mean if use_running else None,
            norm.running_var if use_running else None,
            batch_stats,
            momentum,
            norm.eps,
            self.conv.stride,
            self.conv.padding,
            self.conv.dilation,
        )

    @classmethod
    def from_sequential(cls, sequential: nn.Sequential) -> BNReLUConv3d:
        """The fused equivalent of an existing Sequential(BatchNorm3d, ReLU, Conv3d), with its weights,
        buffers, settings, device, dtype and train/eval mode (the Sequential is left untouched)."""
        modules = list(sequential.children())
        kinds = (nn.BatchNorm3d, nn.ReLU, nn.Conv3d)
        if len(modules) != 3 or not all(isinstance(m, k) for m, k in zip(modules, kinds, strict=True)):
            found = [type(m).__name__ for m in modules]
            raise ValueError(f"from_sequential expects (BatchNorm3d, ReLU, Conv3d), got {found}")
        norm, _, conv = modules
        if conv.groups != 1:
            raise ValueError(f"from_sequential: grouped Conv3d (groups={conv.groups}) is not supported")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"from_sequential: padding_mode {conv.padding_mode!r} is not supported (only 'zeros')"
            )
        if norm.num_features != conv.in_channels:
            raise ValueError(
                f"from_sequential: BatchNorm3d has {norm.num_features} features "
                f"but Conv3d takes {conv.in_channels}"
            )
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.norm = copy.deepcopy(norm)
        fused.relu = nn.ReLU(inplace=True)
        fused.conv = copy.deepcopy(conv)
        fused.train(sequential.training)
        return fused

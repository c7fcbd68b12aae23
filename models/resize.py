"""Trilinear resize with aligned corners (DeepLabv3+'s up-sampling) whose backward is deterministic under
torch.use_deterministic_algorithms.

PyTorch's CUDA upsample_trilinear3d_backward adds into the input gradient with atomics: it has no
deterministic version (torch.use_deterministic_algorithms(True) raises, train --deterministic's
warn_only warns, and the gradient's last bits change from run to run). The resize is separable: along
each axis every output is a linear mix of two inputs, y = x x_D A_D x_H A_H x_W A_W with A (out, in)
holding each output's two weights. Its adjoint applies the transposes, one matmul per axis, and a matmul
is deterministic (cuBLAS with CUBLAS_WORKSPACE_CONFIG fixed, which deterministic_mode sets). Under the flag
the forward is still F.interpolate's (the same bits as without the flag); only the backward changes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def resize_aligned(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """x (N, C, D, H, W) resized to (N, C, *size): F.interpolate(mode="trilinear", align_corners=True), as
    Keras' resize in the paper's port; x itself when it already has that size. Under
    torch.use_deterministic_algorithms the backward is the matmul adjoint above (any device)."""
    # symbolic sizes stay symbolic (int() would fix a torch.export program's window to the traced one)
    size = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    if torch.are_deterministic_algorithms_enabled() and x.requires_grad:
        return _DeterministicResize.apply(x, size)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


class _DeterministicResize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        ctx.in_size, ctx.in_dtype = tuple(x.shape[2:]), x.dtype
        channels_last = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
        ctx.in_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        return F.interpolate(x, size=size, mode="trilinear", align_corners=True)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # float32 sums for half-precision gradients (the weights too would round in bf16)
        g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        sizes = zip(ctx.in_size, g.shape[2:], strict=True)
        axes = [(2 + a, n_in, n_out) for a, (n_in, n_out) in enumerate(sizes)]
        axes.sort(key=lambda axis: axis[1] / axis[2])  # the largest shrinking first: less work after it
        with torch.autocast(g.device.type, enabled=False):  # the matmuls in g's dtype
            for dim, n_in, n_out in axes:
                if n_in != n_out:
                    weights = aligned_linear_weights(n_out, n_in, g.dtype, g.device)  # (n_out, n_in)
                    g = torch.matmul(g.movedim(dim, -1), weights).movedim(-1, dim)
        return g.to(ctx.in_dtype).contiguous(memory_format=ctx.in_format), None  # in x's layout


@functools.lru_cache(maxsize=64)
def aligned_linear_weights(n_out: int, n_in: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): row o holds the weights of output o's linear interpolation with aligned corners
    (source position o * (n_in - 1) / (n_out - 1), 0 for one output, as PyTorch's), two non-zeros summing
    to 1. Built in float64 on the CPU, then cached on `device` (no host copy on later calls, so a step can
    be captured in a CUDA graph after a warm-up)."""
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    source = torch.arange(n_out, dtype=torch.float64) * scale
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    fraction = source - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, low), 1 - fraction, accumulate=True)
    weights.index_put_((rows, high), fraction, accumulate=True)
    return weights.to(device=device, dtype=dtype)

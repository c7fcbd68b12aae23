"""Per-channel batch statistics (mean, biased variance) of a (N, C, D, H, W) tensor of any strides.

One Triton pass reads the input once: each program reduces a block of BLOCK_M voxels x BLOCK_C channels
to a partial (mean, M2) with a two-step centred sum over its tile (no E[x^2] - E[x]^2 cancellation);
the partials are merged exactly with Chan's formula in float64 (a [programs, C] array, tiny next to x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv, check_voxels, needs_int64
from prostate_kernels.ops.triton_index import block_offsets, voxel, voxel_offsets, widen

BLOCK_M = 256
BLOCK_C = 32


@triton.jit
def _channel_stats_partial_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*
    mean_ptr,  # (P, C) float32: mean of each program's voxels
    m2_ptr,  # (P, C) float32: sum of squared deviations from that mean
    M,  # N * D * H * W
    C,
    D,
    H,
    W,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = block_offsets(pid_m, BLOCK_M)  # int32 voxel indices (check_voxels)
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_c < C)[None, :]
    n, d, h, w = voxel(offs_m, D, H, W)
    row = voxel_offsets(n, d, h, w, sxn, sxd, sxh, sxw, INT64)
    x = tl.load(x_ptr + row[:, None] + widen(offs_c, INT64)[None, :] * sxc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(x, axis=0) / count
    dev = tl.where(mask, x - mean[None, :], 0.0)
    m2 = tl.sum(dev * dev, axis=0)
    out = widen(pid_m, INT64) * C + widen(offs_c, INT64)  # (P, C): int64 with x's offsets
    tl.store(mean_ptr + out, mean, mask=offs_c < C)
    tl.store(m2_ptr + out, m2, mask=offs_c < C)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x (N, C, D, H, W), both float32 (C,)."""
    n, c, d, h, w = x.shape
    m = n * d * h * w
    check_voxels("channel_stats", m)
    programs = cdiv(m, BLOCK_M)
    means = torch.empty((programs, c), dtype=torch.float32, device=x.device)
    m2s = torch.empty_like(means)
    grid = (programs, cdiv(c, BLOCK_C))
    _channel_stats_partial_kernel[grid](
        x, means, m2s, m, c, d, h, w, *x.stride(), INT64=needs_int64(x, means), BLOCK_M=BLOCK_M,
        BLOCK_C=BLOCK_C,
    )  # fmt: skip
    counts = torch.full((programs, 1), float(BLOCK_M), dtype=torch.float64, device=x.device)
    counts[-1] = m - (programs - 1) * BLOCK_M
    means64, m2s64 = means.double(), m2s.double()
    mean = (counts * means64).sum(0) / m
    m2 = m2s64.sum(0) + (counts * (means64 - mean) ** 2).sum(0)
    return mean.float(), (m2 / m).float()


__all__ = ["channel_stats"]

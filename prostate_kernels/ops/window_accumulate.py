"""GPU side of sliding-window stitching: Triton kernels for window gather, accumulation, normalisation.

Shapes (all contiguous): volume/output (N, C, D, H, W); weight (N, 1, D, H, W) float32;
windows (B, C, rd, rh, rw); starts (B, 4) int64 rows (n, z, y, x); importance (rd, rh, rw) float32.
Launchers here assume their arguments were validated by ops/window_ops.py (bounds included).

Grid of every window kernel: axis 0 walks (window b, channel c, window plane z), axis 1 blocks of
BLOCK voxels of that (rh, rw) plane. Windows of one batch may overlap, so accumulation uses float32
atomics: the sum is exact per addition but its order across windows is not fixed on the GPU (the C++
CPU path sums in batch order). Offsets are int64: volumes over 2^31 elements are safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv
from prostate_kernels.windows import starts_of_positions

BLOCK = 1024


@triton.jit
def _window_plane(starts_ptr, C, D, H, W, RD, RH, RW, BLOCK: tl.constexpr):
    """This program's part of one window plane, the one decode of the window kernels' grid: returns
    (plane_id = (b * C + c) * RD + wz, wz, offs: BLOCK positions in the (RH, RW) plane, mask: offs in
    it, volume: each position's element offset in the (N, C, D, H, W) volume at window b's start
    (n, z, y, x) row, plane wz, channel c). All int64."""
    plane_id = tl.program_id(0).to(tl.int64)
    wz = plane_id % RD
    c = (plane_id // RD) % C
    b = plane_id // (RD * C)
    n = tl.load(starts_ptr + b * 4)
    z = tl.load(starts_ptr + b * 4 + 1) + wz
    y0 = tl.load(starts_ptr + b * 4 + 2)
    x0 = tl.load(starts_ptr + b * 4 + 3)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < RH * RW
    volume = (((n * C + c) * D + z) * H + y0 + offs // RW) * W + x0 + offs % RW
    return plane_id, wz, offs, mask, volume


@triton.jit
def _window_gather_kernel(
    volume_ptr,  # (N, C, D, H, W)
    starts_ptr,  # (B, 4) int64
    out_ptr,  # (B, C, RD, RH, RW), dtype of volume
    C,
    D,
    H,
    W,
    RD,
    RH,
    RW,
    BLOCK: tl.constexpr,
):
    plane_id, _, offs, mask, src = _window_plane(starts_ptr, C, D, H, W, RD, RH, RW, BLOCK)
    values = tl.load(volume_ptr + src, mask=mask)
    tl.store(out_ptr + plane_id * RH * RW + offs, values, mask=mask)


@triton.jit
def _window_accumulate_kernel(
    target_ptr,  # output (N, C, D, H, W) float32, or weight (N, 1, D, H, W) when IS_WEIGHT
    windows_ptr,  # (B, C, RD, RH, RW), any float dtype; unused when IS_WEIGHT
    starts_ptr,  # (B, 4) int64
    importance_ptr,  # (RD, RH, RW) float32
    C,  # channels of the target: C for the output, 1 for the weight
    D,
    H,
    W,
    RD,
    RH,
    RW,
    IS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    plane_id, wz, offs, mask, dst = _window_plane(starts_ptr, C, D, H, W, RD, RH, RW, BLOCK)
    weight = tl.load(importance_ptr + wz * RH * RW + offs, mask=mask, other=0.0)
    if IS_WEIGHT:
        contribution = weight
    else:
        window = tl.load(windows_ptr + plane_id * RH * RW + offs, mask=mask, other=0.0)
        contribution = window.to(tl.float32) * weight
    tl.atomic_add(target_ptr + dst, contribution, mask=mask)


@triton.jit
def _window_normalize_kernel(
    output_ptr,  # (N, C, D, H, W) float32, normalised in place
    weight_ptr,  # (N or 1, 1, D, H, W) float32
    C,
    SPATIAL,  # D * H * W
    WEIGHT_SHARED: tl.constexpr,  # weight has batch 1 and serves every image
    BLOCK: tl.constexpr,
):
    # grid: (blocks of the D*H*W voxels, N * C planes); the large extent stays on axis 0
    plane = tl.program_id(1).to(tl.int64)  # = n * C + c
    n = plane // C
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SPATIAL
    if WEIGHT_SHARED:
        w = tl.load(weight_ptr + offs, mask=mask, other=1.0)
    else:
        w = tl.load(weight_ptr + n * SPATIAL + offs, mask=mask, other=1.0)
    o = tl.load(output_ptr + plane * SPATIAL + offs, mask=mask, other=0.0)
    covered = w > 0.0
    o = tl.where(covered, o / tl.where(covered, w, 1.0), 0.0)
    tl.store(output_ptr + plane * SPATIAL + offs, o, mask=mask)


def window_gather(
    volume: torch.Tensor, starts: torch.Tensor, roi: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    _, C, D, H, W = volume.shape
    rd, rh, rw = roi
    if out is None:
        out = volume.new_empty((starts.shape[0], C, rd, rh, rw))
    if out.numel() == 0:
        return out
    grid = (starts.shape[0] * C * rd, cdiv(rh * rw, BLOCK))
    _window_gather_kernel[grid](volume, starts, out, C, D, H, W, rd, rh, rw, BLOCK=BLOCK)
    return out


def window_accumulate_(
    output: torch.Tensor,
    weight: torch.Tensor | None,
    windows: torch.Tensor,
    starts: torch.Tensor,
    importance: torch.Tensor,
) -> None:
    _, C, D, H, W = output.shape
    B, _, rd, rh, rw = windows.shape
    if B == 0 or output.numel() == 0:
        return
    blocks = cdiv(rh * rw, BLOCK)
    _window_accumulate_kernel[(B * C * rd, blocks)](
        output, windows, starts, importance, C, D, H, W, rd, rh, rw, IS_WEIGHT=False, BLOCK=BLOCK
    )
    if weight is not None:
        _accumulate_weight(weight, starts, importance)


def window_normalize_(output: torch.Tensor, weight: torch.Tensor) -> None:
    N, C, D, H, W = output.shape
    if output.numel() == 0:
        return
    spatial = D * H * W
    grid = (cdiv(spatial, BLOCK), N * C)
    _window_normalize_kernel[grid](
        output, weight, C, spatial, WEIGHT_SHARED=weight.shape[0] == 1 and N > 1, BLOCK=BLOCK
    )


def _accumulate_weight(weight: torch.Tensor, starts: torch.Tensor, importance: torch.Tensor) -> None:
    """weight (N, 1, D, H, W) += importance at every start (n, z, y, x)."""
    _, _, D, H, W = weight.shape
    rd, rh, rw = importance.shape
    if starts.shape[0] == 0 or weight.numel() == 0:
        return
    grid = (starts.shape[0] * rd, cdiv(rh * rw, BLOCK))
    # windows_ptr is not read when IS_WEIGHT: importance stands in for it
    _window_accumulate_kernel[grid](
        weight, importance, starts, importance, 1, D, H, W, rd, rh, rw, IS_WEIGHT=True, BLOCK=BLOCK
    )


def window_normalize_by_positions_(
    output: torch.Tensor, positions: torch.Tensor, importance: torch.Tensor
) -> None:
    """On the GPU the (1, 1, D, H, W) weight map is cheap to hold: build it with atomics, then divide."""
    weight = torch.zeros((1, 1, *output.shape[2:]), dtype=torch.float32, device=output.device)
    _accumulate_weight(weight, starts_of_positions(positions), importance)
    window_normalize_(output, weight)

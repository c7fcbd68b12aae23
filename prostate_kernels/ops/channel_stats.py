"""Per-channel batch statistics (mean, biased variance) of a (N, C, D, H, W) tensor of any strides.

One Triton pass reads the input once: each program reduces a block of BLOCK_M voxels x BLOCK_C channels
to a partial (mean, M2) with a two-step centred sum over its tile (no E[x^2] - E[x]^2 cancellation);
a second small kernel merges the partials exactly with Chan's formula in float64 (a [programs, C] array,
tiny next to x). It was 15 torch ops on the host, 1/5 of the fused layer's host cost (bench/host_cost.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv, check_voxels, needs_int64
from prostate_kernels.ops.triton_index import block_offsets, voxel, voxel_offsets, widen

BLOCK_M = 256
BLOCK_C = 32
MERGE_BLOCK_P, MERGE_BLOCK_C = 32, 32  # the merge's tile of partials x channels (float64)


@triton.jit
def _channel_stats_partial_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*
    partials_ptr,  # (2, P, C) float32: mean of each program's voxels, sum of squared deviations from it
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
    tl.store(partials_ptr + out, mean, mask=offs_c < C)
    tl.store(partials_ptr + widen(tl.num_programs(0), INT64) * C + out, m2, mask=offs_c < C)


@triton.jit
def _partials_tile(
    p0, offs_c, mask_c, P, C, M, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr
):
    """(offsets into the (P, C) partials, mask, float64 voxel count of each partial) of the tile of
    partials [p0, p0 + BLOCK_P) x channels offs_c."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    mask = (offs_p < P)[:, None] & mask_c[None, :]
    at = widen(offs_p, INT64)[:, None] * C + offs_c[None, :]
    count = tl.where(offs_p == P - 1, M - (P - 1) * BLOCK_M, BLOCK_M).to(tl.float64)
    return at, mask, count


@triton.jit
def _channel_stats_merge_kernel(
    partials_ptr,  # (2, P, C) float32 partial means and sums of squared deviations, P = cdiv(M, BLOCK_M)
    out_ptr,  # rows of C float32, OUT_ROW apart: mean, biased variance; with FOLD then scale, shift, rstd
    gamma_ptr,  # (C,) BatchNorm weight (HAS_GAMMA)
    beta_ptr,  # (C,) BatchNorm bias (HAS_BETA)
    eps,
    P,
    C,
    M,
    OUT_ROW,
    FOLD: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,  # voxels per partial (the last partial has M - (P - 1) * BLOCK_M)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Chan's merge of the P partials of BLOCK_C channels, in float64: mean = sum(n_p mean_p) / M,
    M2 = sum(M2_p) + sum(n_p (mean_p - mean)^2); two passes over the partials. FOLD: the epilogue also
    folds BatchNorm (_store_fold), in float64 from the unrounded mean and variance."""
    offs_c = block_offsets(tl.program_id(0), BLOCK_C)
    mask_c = offs_c < C
    mean_ptr = partials_ptr
    m2_ptr = partials_ptr + widen(P, INT64) * C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        at, mask, count = _partials_tile(p0, offs_c, mask_c, P, C, M, INT64, BLOCK_M, BLOCK_P)
        part = tl.load(mean_ptr + at, mask=mask, other=0.0).to(tl.float64)
        total += tl.sum(count[:, None] * part, axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        at, mask, count = _partials_tile(p0, offs_c, mask_c, P, C, M, INT64, BLOCK_M, BLOCK_P)
        dev = tl.load(mean_ptr + at, mask=mask, other=0.0).to(tl.float64) - mean[None, :]
        part_m2 = tl.load(m2_ptr + at, mask=mask, other=0.0).to(tl.float64)
        m2 += tl.sum(tl.where(mask, part_m2 + count[:, None] * dev * dev, 0.0), axis=0)
    var = m2 / M
    tl.store(out_ptr + offs_c, mean.to(tl.float32), mask=mask_c)
    tl.store(out_ptr + OUT_ROW + offs_c, var.to(tl.float32), mask=mask_c)
    if FOLD:
        _store_fold(out_ptr + 2 * OUT_ROW, OUT_ROW, mean, var, gamma_ptr, beta_ptr, eps, offs_c, mask_c,
                    HAS_GAMMA, HAS_BETA)  # fmt: skip


@triton.jit
def _store_fold(
    out_ptr, OUT_ROW, mean, var, gamma_ptr, beta_ptr, eps, offs_c, mask_c,
    HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
):  # fmt: skip
    """BatchNorm folded as ops/batch_norm.fold_batch_norm does (rstd = 1 / sqrt(var + eps), scale = gamma *
    rstd, shift = beta - mean * scale), in float64 (mean, var: float64 (BLOCK_C,)), stored as float32 rows
    scale, shift, rstd at out_ptr, OUT_ROW apart."""
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = rstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64) * rstd
    shift = -mean * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64)
    tl.store(out_ptr + offs_c, scale.to(tl.float32), mask=mask_c)
    tl.store(out_ptr + OUT_ROW + offs_c, shift.to(tl.float32), mask=mask_c)
    tl.store(out_ptr + 2 * OUT_ROW + offs_c, rstd.to(tl.float32), mask=mask_c)


@triton.jit
def _batch_norm_fold_kernel(
    mean_ptr,  # (C,) any float dtype, contiguous
    var_ptr,  # (C,) biased variance
    gamma_ptr,  # (C,) BatchNorm weight (HAS_GAMMA)
    beta_ptr,  # (C,) BatchNorm bias (HAS_BETA)
    out_ptr,  # rows of C float32, OUT_ROW apart: [mean, var,] scale, shift, rstd
    eps,
    C,
    OUT_ROW,
    WITH_STATS: tl.constexpr,  # out starts with mean and var (a (5, C) STATS_ROWS tensor)
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """BatchNorm folded from given statistics (a dense block unit's share of its block's statistics, or
    running statistics in eval mode): one launch where fold_batch_norm makes five torch ops."""
    offs_c = block_offsets(tl.program_id(0), BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float64)
    if WITH_STATS:
        tl.store(out_ptr + offs_c, mean.to(tl.float32), mask=mask_c)
        tl.store(out_ptr + OUT_ROW + offs_c, var.to(tl.float32), mask=mask_c)
        out_ptr += 2 * OUT_ROW
    _store_fold(out_ptr, OUT_ROW, mean, var, gamma_ptr, beta_ptr, eps, offs_c, mask_c, HAS_GAMMA, HAS_BETA)


def channel_stats(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per channel of x (N, C, D, H, W), both float32 (C,), rows of one (2, C)
    tensor: two launches (the partials, then their float64 merge) and two allocations, so that its host
    cost stays small. out: a float32 (2, C) view to write them into (channel stride 1; the dense block
    gathers its channels' statistics so, with no concatenation)."""
    mean, var = _launch(x, None, None, 0.0, fold=False, out=out).unbind(0)
    return mean, var


def batch_norm_stats(
    x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(5, C) float32, rows ops/batch_norm.STATS_ROWS (mean, biased variance, scale, shift, rstd): x's
    channel statistics and BatchNorm folded with them (fold_batch_norm's formula; gamma/beta None: 1 and 0)
    in the same two launches, so that the fused layer's forward makes no torch op for its BatchNorm."""
    return _launch(x, gamma, beta, eps, fold=True)


def fold_batch_norm_into(
    mean: torch.Tensor,
    var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """BatchNorm folded from given (C,) statistics into out, float32 rows (scale, shift, rstd) for a (3, C)
    out or rows STATS_ROWS (mean and var copied first) for a (5, C) one; channel stride 1, any row stride
    (a dense block writes each unit's fold into its share of one flat tensor). fold_batch_norm's formula
    in float64, one launch. Returns out."""
    c = mean.shape[0]
    if out.dim() != 2 or out.shape[0] not in (3, 5) or out.shape[1] != c or out.dtype != torch.float32:
        raise ValueError(f"fold_batch_norm_into: out must be float32 (3, {c}) or (5, {c}), got "
                         f"{out.dtype} {tuple(out.shape)}")  # fmt: skip
    if out.stride(1) != 1:
        raise ValueError(f"fold_batch_norm_into: out must have channel stride 1, got {out.stride()}")
    mean, var = (t if t.stride(0) == 1 else t.contiguous() for t in (mean, var))  # the kernel's layout
    _batch_norm_fold_kernel[(cdiv(c, MERGE_BLOCK_C),)](
        mean, var, gamma if gamma is not None else mean, beta if beta is not None else mean, out,
        float(eps), c, out.stride(0), WITH_STATS=out.shape[0] == 5, HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None, BLOCK_C=MERGE_BLOCK_C,
    )  # fmt: skip
    return out


def _launch(x, gamma, beta, eps: float, fold: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """(2, C) [mean, var], or (5, C) [mean, var, scale, shift, rstd] with fold, float32 (written into out
    when given)."""
    n, c, d, h, w = x.shape
    m = n * d * h * w
    check_voxels("channel_stats", m)
    programs = cdiv(m, BLOCK_M)
    partials = torch.empty((2, programs, c), dtype=torch.float32, device=x.device)  # means, M2s
    int64 = needs_int64(x, partials)
    _channel_stats_partial_kernel[(programs, cdiv(c, BLOCK_C))](
        x, partials, m, c, d, h, w, *x.stride(), INT64=int64, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C
    )
    rows = 5 if fold else 2
    if out is None:
        out = torch.empty((rows, c), dtype=torch.float32, device=x.device)
    elif out.shape != (rows, c) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"channel_stats: out must be a float32 ({rows}, {c}) view with channel stride 1")
    _channel_stats_merge_kernel[(cdiv(c, MERGE_BLOCK_C),)](
        partials, out, gamma if gamma is not None else out, beta if beta is not None else out, float(eps),
        programs, c, m, out.stride(0), FOLD=fold, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
        INT64=int64, BLOCK_M=BLOCK_M, BLOCK_P=MERGE_BLOCK_P, BLOCK_C=MERGE_BLOCK_C,
    )  # fmt: skip
    return out


__all__ = ["batch_norm_stats", "channel_stats", "fold_batch_norm_into"]

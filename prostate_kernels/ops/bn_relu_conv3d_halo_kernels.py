"""Halo kernels of the fused BatchNorm -> ReLU -> Conv3d layer at stride 1: each input element normalised
once per output box instead of once per tap. Launchers: ops/bn_relu_conv3d_triton.py.

Notation as in bn_relu_conv3d_kernels.py. The direct kernels there apply scale, shift, ReLU and the
padding mask to every tile they load, 27 times per input element at 3x3x3, and at the dense layers' 16
output channels that prologue is about half of a loop's instructions (sm_90a SASS, tools/sass_loops.py).
Here a program owns boxes of BOX_D x BOX_H x BOX_W output voxels, one after another (a persistent grid:
scratch is per program, not per box). Per block of input channels it normalises the box's halo (the box
grown by (kernel - 1) * dilation per axis; zeros outside the volume: the padding) once into a scratch
tile of its own, in DOT_DTYPE, and each tap's operand is then a shifted window of that tile: a load at a
constant offset, with neither masks nor arithmetic. The scratch is written and read by its own program
only; barriers order each fill against the taps that read it and against the next fill.

The input gradient's kernel (bn_relu_conv3d_dgrad_halo_kernel) has no prologue to save, but the same
structure: per box of input voxels the halo of gy it needs is copied once into the scratch tile, and each
tap reads its window there (at the mirrored offset), with no per-tap index arithmetic or masks.

Tap counts are run-time values: at a constant 27 ptxas unrolled the tap loop, which spilled registers on
sm_80 (bench/results/2026-11-28-halo-kernels.md).
"""

import triton
import triton.language as tl

from prostate_kernels.ops.bn_relu_conv3d_kernels import _input_grad_epilogue, _store_output
from prostate_kernels.ops.dot_operands import dot_operand
from prostate_kernels.ops.triton_index import aligned_count, kernel_tap, voxel_offsets_aligned, widen


@triton.jit
def _box_counts(D, H, W, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """(boxes per image, boxes along H, boxes along W) of BOX_D x BOX_H x BOX_W boxes over a (D, H, W)
    volume (partial boxes at the far edges included)."""
    boxes_h = tl.cdiv(H, BOX_H)
    boxes_w = tl.cdiv(W, BOX_W)
    return tl.cdiv(D, BOX_D) * boxes_h * boxes_w, boxes_h, boxes_w


@triton.jit
def _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D: tl.constexpr, BOX_H: tl.constexpr,
                BOX_W: tl.constexpr):  # fmt: skip
    """(n, od0, oh0, ow0): the image and first output voxel of box number `box` (boxes in (n, d, h, w)
    order, boxes_h x boxes_w per slab of BOX_D output slices)."""
    n = box // boxes_per_image
    od0 = (box % boxes_per_image) // (boxes_h * boxes_w) * BOX_D
    oh0 = (box % (boxes_h * boxes_w)) // boxes_w * BOX_H
    ow0 = box % boxes_w * BOX_W
    return n, od0, oh0, ow0


@triton.jit
def _box_rows(BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, HALO_H: tl.constexpr,
              HALO_W: tl.constexpr):  # fmt: skip
    """(rd, rh, rw, halo_row), each (BOX_D * BOX_H * BOX_W,): row r of a box is output voxel box origin +
    (rd, rh, rw), and its scratch row at tap (0, 0, 0) is halo_row."""
    r = tl.arange(0, BOX_D * BOX_H * BOX_W)
    rd = r // (BOX_H * BOX_W)
    rh = (r // BOX_W) % BOX_H
    rw = r % BOX_W
    return rd, rh, rw, (rd * HALO_H + rh) * HALO_W + rw


@triton.jit
def _fill_halo(
    scratch,  # this program's (HALO_ROWS, BLOCK_K) tile, DOT_DTYPE
    x_image,  # x_ptr + n * sxn: the box's image (gy's, for the input gradient)
    scale_ptr,  # (C_in,) float32, or unused (not NORMALISE)
    shift_ptr,
    offs_k,  # (BLOCK_K,) channels of this block
    C_in,
    i_d0,  # voxel of halo voxel (0, 0, 0) (forward: box origin - padding)
    i_h0,
    i_w0,
    D,
    H,
    W,
    sxc,
    sxd,
    sxh,
    sxw,
    HALO_D: tl.constexpr,
    HALO_H: tl.constexpr,
    HALO_W: tl.constexpr,
    FILL_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    NORMALISE: tl.constexpr = True,
    ALIGN: tl.constexpr = 1,  # sxd, sxh, sxw and C_in are multiples of ALIGN (launch.voxel_alignment)
):
    """scratch[hv, k] = relu(s * x + t) (NORMALISE; else x itself) at halo voxel hv (hd, hh, hw) = voxel
    (i_d0 + hd, i_h0 + hh, i_w0 + hw) of a (D, H, W) volume, channel offs_k[k]; 0 outside the volume and
    past C_in (padding is zero after BN + ReLU). Returns when every thread of the program may read the
    whole tile, and only after every read of the previous fill is done. ALIGN lets the loads along
    channels be vectors where the strides are multiples of 8 only (triton_index.voxel_offsets_aligned)."""
    HALO: tl.constexpr = HALO_D * HALO_H * HALO_W
    mask_k = offs_k < aligned_count(C_in, ALIGN)
    if NORMALISE:
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
    channels = tl.arange(0, BLOCK_K)
    tl.debug_barrier()  # every tap of the previous fill has read the scratch
    for f0 in range(0, HALO, FILL_M):
        hv = f0 + tl.arange(0, FILL_M)
        i_d = i_d0 + hv // (HALO_H * HALO_W)
        i_h = i_h0 + (hv // HALO_W) % HALO_H
        i_w = i_w0 + hv % HALO_W
        valid = (hv < HALO) & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        row = voxel_offsets_aligned(i_d, i_h, i_w, 0, sxd, sxh, sxw, 0, INT64, ALIGN)  # in x_image
        a_mask = valid[:, None] & mask_k[None, :]
        a = tl.load(x_image + row[:, None] + widen(offs_k, INT64)[None, :] * sxc, mask=a_mask, other=0.0)
        if NORMALISE:
            a = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
            a = tl.where(a_mask, a, 0.0)
        # rows past HALO (up to the scratch's multiple of FILL_M) get zeros, never read
        tl.store(
            scratch + hv[:, None] * BLOCK_K + channels[None, :], dot_operand(a, DOT_DTYPE, INPUT_PRECISION)
        )
    tl.debug_barrier()  # the whole halo is in the scratch


@triton.jit
def _window_rows(tap, halo_row, KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr, DLH: tl.constexpr,
                 DLW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr):  # fmt: skip
    """The scratch rows of the box's output voxels at `tap`: their tap-(0, 0, 0) rows shifted by one
    constant."""
    return halo_row + tap_shift(tap, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W)


@triton.jit
def tap_shift(tap, KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr, DLH: tl.constexpr,
              DLW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr):  # fmt: skip
    """How many rows of a (HALO_D, HALO_H, HALO_W) halo tile tap `tap` (dilations DLD, DLH, DLW) reads
    past tap (0, 0, 0): one constant per tap, for every voxel of the box."""
    kd, kh, kw = kernel_tap(tap, KH, KW)
    return (kd * DLD * HALO_H + kh * DLH) * HALO_W + kw * DLW


@triton.jit
def _accumulate_taps(acc, scratch, halo_row, w_ptr, offs_k, K, offs_n, mask_n, N_, taps,
                     KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr, DLH: tl.constexpr,
                     DLW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr, BLOCK_K: tl.constexpr,
                     MIRROR: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     INT64: tl.constexpr):  # fmt: skip
    """acc (BLOCK_M, BLOCK_N) + the sum over taps of window(tap) @ w[tap, offs_k, offs_n], w a (taps, K, N_)
    contiguous weight and window(tap) the box's (BLOCK_M, BLOCK_K) rows of the filled scratch tile at
    `tap`, or at the mirrored tap (taps - 1 - tap: the input gradient, whose tap k reads gy at offset
    (kernel - 1 - k) * dilation of its halo) when MIRROR."""
    for tap in range(taps):
        rows = _window_rows(
            taps - 1 - tap if MIRROR else tap, halo_row, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W
        )
        window = tl.load(scratch + rows[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :])
        w_rows = widen(tap * K + offs_k, INT64) * N_
        w_mask = (offs_k < K)[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + w_rows[:, None] + offs_n[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(window, dot_operand(w, DOT_DTYPE, INPUT_PRECISION), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def bn_relu_conv3d_fwd_halo_kernel(
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    w_ptr,  # (taps, C_in, C_out) contiguous, DOT_DTYPE, as bn_relu_conv3d_fwd_kernel's
    bias_ptr,  # (C_out,) or unused
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    y_ptr,  # (N, C_out, Do, Ho, Wo), strides sy*
    uniform_ptr,  # (N, C_out, Do, Ho, Wo) contiguous float32 dropout draws (DROPOUT) or unused
    scratch_ptr,  # (programs, HALO_ROWS, BLOCK_K) DOT_DTYPE: each program's own halo tile
    drop_p,
    keep_scale,
    N,
    C_in,
    C_out,
    D,
    H,
    W,
    Do,
    Ho,
    Wo,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    syn,
    syc,
    syd,
    syh,
    syw,
    pdd,
    pdh,
    pdw,
    taps,  # KD * KH * KW
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    DLD: tl.constexpr,  # dilation (stride is 1: the launcher sends other strides to the direct kernel)
    DLH: tl.constexpr,
    DLW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BOX_D: tl.constexpr,  # output box: BOX_D x BOX_H x BOX_W voxels (powers of two)
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FILL_M: tl.constexpr,  # halo voxels normalised per step of the fill loop
):
    """y = conv3d(relu(x * s + t), w) + bias (dropout) at stride 1; grid (programs, blocks of C_out)."""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    BLOCK_M: tl.constexpr = BOX_D * BOX_H * BOX_W
    programs = tl.num_programs(0)
    program = tl.program_id(1) * programs + tl.program_id(0)
    scratch = scratch_ptr + widen(program, INT64) * (HALO_ROWS * BLOCK_K)
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    channels = tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out
    boxes_per_image, boxes_h, boxes_w = _box_counts(Do, Ho, Wo, BOX_D, BOX_H, BOX_W)
    for box in range(tl.program_id(0), N * boxes_per_image, programs):
        n, od0, oh0, ow0 = _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W)
        x_image = x_ptr + widen(n, INT64) * sxn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C_in, BLOCK_K):
            offs_k = k0 + channels
            _fill_halo(scratch, x_image, scale_ptr, shift_ptr, offs_k, C_in, od0 - pdd, oh0 - pdh, ow0 - pdw,
                       D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_K, DOT_DTYPE,
                       INPUT_PRECISION, INT64)  # fmt: skip
            acc = _accumulate_taps(acc, scratch, halo_row, w_ptr, offs_k, C_in, offs_n, mask_n, C_out, taps,
                                   KH, KW, DLD, DLH, DLW, HALO_H, HALO_W, BLOCK_K, False, DOT_DTYPE,
                                   INPUT_PRECISION, INT64)  # fmt: skip
        od = od0 + rd
        oh = oh0 + rh
        ow = ow0 + rw
        _store_output(
            acc, n, od, oh, ow, (od < Do) & (oh < Ho) & (ow < Wo), offs_n, mask_n, bias_ptr, y_ptr,
            uniform_ptr, drop_p, keep_scale, C_out, Do, Ho, Wo, syn, syc, syd, syh, syw, HAS_BIAS, DROPOUT,
            INT64,
        )  # fmt: skip


@triton.jit
def bn_relu_conv3d_wgrad_halo_kernel(
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    gy_ptr,  # (N, C_out, Do, Ho, Wo), strides sg*
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    sums_ptr,  # (splits, taps, ci blocks * BLOCK_CI, co blocks * BLOCK_CO) float32, uninitialised: each
    # split's sums over its boxes, per tap (the launcher adds the splits in a fixed order)
    gb_ptr,  # (splits, C_out) float32: each split's sum of gy over its boxes (HAS_BIAS)
    scratch_ptr,  # (programs, ci_blocks, co_blocks, HALO_ROWS, BLOCK_CI) DOT_DTYPE: halo tiles
    N,
    C_in,
    C_out,
    D,
    H,
    W,
    Do,
    Ho,
    Wo,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    sgn,
    sgc,
    sgd,
    sgh,
    sgw,
    pdd,
    pdh,
    pdw,
    taps,  # KD * KH * KW
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    DLD: tl.constexpr,
    DLH: tl.constexpr,
    DLW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BOX_D: tl.constexpr,
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    FILL_M: tl.constexpr,
):
    """Weight gradient at stride 1: sums[split, tap, ci, co] = sum over the split's boxes of a_tap^T @ gy;
    grid (splits, ci blocks, co blocks), one (BLOCK_CI x BLOCK_CO) tile of channels per program.

    Per box the halo of its BLOCK_CI channels is normalised once and gy's (box voxels x BLOCK_CO) tile is
    loaded once; each tap then adds its window's product to that tap's running sum, which lives in the
    program's tile of sums_ptr (27 accumulators do not fit in registers): a load, a dot and a store per
    tap, ordered across boxes by the fill's barriers. The first box loads no sums (masked: zeros), so the
    buffer needs no zero fill; every split has a box (the launcher's splits <= boxes), so every element
    is written. A program's tile is (BLOCK_CI, BLOCK_CO) of the padded (C_in, C_out) plane of its split
    and tap; the launcher adds the splits and copies the sum into the weight's layout.
    (Zeroing the sums in a prologue, or copying them into the weight's layout after the last box, made
    ptxas spill 4-16 B at 4 and 17 of the kernel's 162 variants.)"""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    programs = tl.num_programs(0)
    ci_block = tl.program_id(1)
    co_block = tl.program_id(2)
    program = (tl.program_id(0) * tl.num_programs(1) + ci_block) * tl.num_programs(2) + co_block
    scratch = scratch_ptr + widen(program, INT64) * (HALO_ROWS * BLOCK_CI)
    co_pad = tl.num_programs(2) * BLOCK_CO
    plane = tl.num_programs(1) * BLOCK_CI * co_pad  # a split's (C_in, C_out) sums of one tap, padded
    sums = sums_ptr + widen(tl.program_id(0), INT64) * taps * plane + ci_block * BLOCK_CI * co_pad
    sums += co_block * BLOCK_CO
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    channels = tl.arange(0, BLOCK_CI)
    offs_ci = ci_block * BLOCK_CI + channels
    offs_co = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < C_out
    tile = channels[:, None] * co_pad + tl.arange(0, BLOCK_CO)[None, :]  # a tap's sums, (BLOCK_CI, BLOCK_CO)
    g_sum = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    boxes_per_image, boxes_h, boxes_w = _box_counts(Do, Ho, Wo, BOX_D, BOX_H, BOX_W)
    for box in range(tl.program_id(0), N * boxes_per_image, programs):
        n, od0, oh0, ow0 = _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W)
        _fill_halo(scratch, x_ptr + widen(n, INT64) * sxn, scale_ptr, shift_ptr, offs_ci, C_in, od0 - pdd,
                   oh0 - pdh, ow0 - pdw, D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M,
                   BLOCK_CI, DOT_DTYPE, INPUT_PRECISION, INT64)  # fmt: skip
        od = od0 + rd
        oh = oh0 + rh
        ow = ow0 + rw
        g_row = (
            widen(n, INT64) * sgn + widen(od, INT64) * sgd + widen(oh, INT64) * sgh + widen(ow, INT64) * sgw
        )
        g_mask = ((od < Do) & (oh < Ho) & (ow < Wo))[:, None] & mask_co[None, :]
        g = tl.load(gy_ptr + g_row[:, None] + widen(offs_co, INT64)[None, :] * sgc, mask=g_mask, other=0.0)
        if HAS_BIAS:
            g_sum += tl.sum(g.to(tl.float32), axis=0)
        g = dot_operand(g, DOT_DTYPE, INPUT_PRECISION)
        for tap in range(taps):
            rows = _window_rows(tap, halo_row, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W)
            window = tl.load(scratch + rows[:, None] * BLOCK_CI + channels[None, :])
            acc = tl.load(sums + tap * plane + tile, mask=box != tl.program_id(0), other=0.0)  # 0: first box
            acc = tl.dot(tl.trans(window), g, acc, input_precision=INPUT_PRECISION)
            tl.store(sums + tap * plane + tile, acc)
    if HAS_BIAS:
        if ci_block == 0:  # one program per (split, block of C_out) stores its bias sums
            tl.store(gb_ptr + tl.program_id(0) * C_out + offs_co, g_sum, mask=mask_co)


@triton.jit
def bn_relu_conv3d_dgrad_halo_kernel(
    gy_ptr,  # (N, C_out, Do, Ho, Wo), strides sg*
    w_ptr,  # (taps, C_out, C_in) contiguous, DOT_DTYPE, as bn_relu_conv3d_dgrad_kernel's
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    mean_ptr,  # (C_in,) float32: the mean that normalised x (batch or running)
    rstd_ptr,  # (C_in,) float32
    gz_ptr,  # (N * D * H * W, C_in) float32 scratch: gradient w.r.t. s * x + t (STORE_GZ)
    gx_ptr,  # (N, C_in, D, H, W), strides sd*: grad of x (when not STORE_GZ)
    partial_ptr,  # float32 (2, boxes, C_in), strides (p_plane, p_row, 1): box b's sums over its voxels of
    # gz (plane 0) and gz * xhat (plane 1) in row b (every row written; the launcher adds them in order)
    scratch_ptr,  # (programs, HALO_ROWS, BLOCK_K) DOT_DTYPE: each program's own halo tile of gy
    p_plane,
    p_row,
    N,
    C_in,
    C_out,
    D,
    H,
    W,
    Do,
    Ho,
    Wo,
    sgn,
    sgc,
    sgd,
    sgh,
    sgw,
    sxn,
    sxc,
    sxd,
    sxh,
    sxw,
    sdn,
    sdc,
    sdd,
    sdh,
    sdw,
    pdd,
    pdh,
    pdw,
    taps,  # KD * KH * KW
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    DLD: tl.constexpr,  # dilation (stride 1)
    DLH: tl.constexpr,
    DLW: tl.constexpr,
    STORE_GZ: tl.constexpr,  # training: keep gz for the batch-statistics pass; eval: write gx = gz * s
    ACCUMULATE: tl.constexpr,  # add into gx instead of overwriting it
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BOX_D: tl.constexpr,  # box of input voxels: BOX_D x BOX_H x BOX_W (powers of two)
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_N: tl.constexpr,  # block of C_in (the output of this GEMM)
    BLOCK_K: tl.constexpr,  # block of C_out (the reduction)
    FILL_M: tl.constexpr,
):
    """Input gradient at stride 1, as bn_relu_conv3d_dgrad_kernel computes it; grid (programs, blocks of
    C_in). The gradient at input voxel i is the sum over taps k of gy[i + pad - k * dilation] @ w[k]: per
    box of input voxels and block of C_out channels the program copies the box's halo of gy (the box
    shifted by pad - (kernel - 1) * dilation, grown by (kernel - 1) * dilation; zeros outside the output
    volume) into its scratch tile once, and tap k reads the window at the mirrored offset
    (kernel - 1 - k) * dilation: no per-tap index arithmetic or masks, and the taps' loads hit the
    program's own small tile instead of gathering gy from L2 27 times."""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    BLOCK_M: tl.constexpr = BOX_D * BOX_H * BOX_W
    programs = tl.num_programs(0)
    program = tl.program_id(1) * programs + tl.program_id(0)
    scratch = scratch_ptr + widen(program, INT64) * (HALO_ROWS * BLOCK_K)
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    channels = tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_in
    boxes_per_image, boxes_h, boxes_w = _box_counts(D, H, W, BOX_D, BOX_H, BOX_W)
    for box in range(tl.program_id(0), N * boxes_per_image, programs):
        n, d0, h0, w0 = _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W)
        gy_image = gy_ptr + widen(n, INT64) * sgn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C_out, BLOCK_K):
            offs_k = k0 + channels
            _fill_halo(scratch, gy_image, scale_ptr, shift_ptr, offs_k, C_out, d0 + pdd - (KD - 1) * DLD,
                       h0 + pdh - (KH - 1) * DLH, w0 + pdw - (KW - 1) * DLW, Do, Ho, Wo, sgc, sgd, sgh, sgw,
                       HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_K, DOT_DTYPE, INPUT_PRECISION, INT64,
                       NORMALISE=False)  # fmt: skip
            acc = _accumulate_taps(acc, scratch, halo_row, w_ptr, offs_k, C_out, offs_n, mask_n, C_in, taps,
                                   KH, KW, DLD, DLH, DLW, HALO_H, HALO_W, BLOCK_K, True, DOT_DTYPE,
                                   INPUT_PRECISION, INT64)  # fmt: skip
        d_ = d0 + rd
        h_ = h0 + rh
        w_ = w0 + rw
        mask_m = (d_ < D) & (h_ < H) & (w_ < W)
        offs_m = ((n * D + d_) * H + h_) * W + w_  # the voxels' flat index (the gz scratch's row)
        sum_gz, sum_gz_xhat = _input_grad_epilogue(
            acc, offs_m, n, d_, h_, w_, mask_m, offs_n, mask_n, x_ptr, scale_ptr, shift_ptr, mean_ptr,
            rstd_ptr, gz_ptr, gx_ptr, C_in, sxn, sxc, sxd, sxh, sxw, sdn, sdc, sdd, sdh, sdw, STORE_GZ,
            ACCUMULATE, INT64,
        )  # fmt: skip
        partial = partial_ptr + widen(box, INT64) * p_row + offs_n
        tl.store(partial, sum_gz, mask=mask_n)
        tl.store(partial + p_plane, sum_gz_xhat, mask=mask_n)

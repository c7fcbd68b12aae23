"""Triton kernels of the 3D depthwise (atrous) convolution and the fused separable inference block.

Depthwise: y[n, c, o] = sum over taps k of w[c, k] * x[n, c, o * stride - pad + k * dilation] (+ b[c]).
Every kernel tiles (BLOCK_M voxels) x (BLOCK_C channels) and addresses tensors through their strides:
int32 voxel indices, int32 element offsets or int64 ones when INT64 (see triton_index.py); the taps are
a runtime loop (unrolled, their tiles stayed live together and spilled registers). In channels-last
tensors a tile's channels are contiguous (coalesced loads); in NCDHW its voxels are. The taps re-read
each tile shifted by the dilation: the tile and its halo come from DRAM once and from L1/L2 for the
other taps (Triton gives no explicit control of shared memory, so the reuse is the hardware cache's).
Accumulation is float32 whatever the input dtype. At stride 1 there are halo kernels too, on the fused
layer's halo helpers: depthwise_conv3d_halo_kernel (the forward, and the input gradient as the conv of gy
with the taps reversed) and depthwise_conv3d_wgrad_halo_kernel. The halo of each box is copied once into
the program's scratch tile, and the taps read their windows there.
"""

import triton
import triton.language as tl

from prostate_kernels.ops.bn_relu_conv3d_halo_kernels import (
    _box_counts,
    _box_origin,
    _box_rows,
    _fill_halo,
    tap_shift,
)
from prostate_kernels.ops.dot_operands import dot_operand
from prostate_kernels.ops.triton_index import (
    aligned_count,
    block_offsets,
    kernel_tap,
    voxel,
    voxel_offsets_aligned,
    widen,
)


@triton.jit
def _depthwise_taps(
    x_ptr, w_ptr, n, od, oh, ow, mask_m, offs_c, mask_c, D, H, W, sxn, sxc, sxd, sxh, sxw,
    std, sth, stw, pdd, pdh, pdw, dld, dlh, dlw,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, RELU_IN: tl.constexpr, INT64: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """float32 (BLOCK_M, BLOCK_C) depthwise sums at output voxels (n, od, oh, ow), channels offs_c;
    w_ptr is (C, taps) contiguous; RELU_IN applies ReLU to x first (zero padding stays zero)."""
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    column = widen(offs_c, INT64) * sxc
    for tap in range(KD * KH * KW):
        kd, kh, kw = kernel_tap(tap, KH, KW)
        i_d = od * std - pdd + kd * dld
        i_h = oh * sth - pdh + kh * dlh
        i_w = ow * stw - pdw + kw * dlw
        valid = mask_m & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        row = voxel_offsets_aligned(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw, INT64, ALIGN)
        x_mask = valid[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + row[:, None] + column[None, :], mask=x_mask, other=0.0).to(tl.float32)
        if RELU_IN:
            x = tl.maximum(x, 0.0)
        w = tl.load(w_ptr + offs_c * (KD * KH * KW) + tap, mask=mask_c, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    return acc


@triton.jit
def depthwise_conv3d_fwd_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*
    w_ptr,  # (C, taps) contiguous
    b_ptr,  # (C,) or unused
    y_ptr,  # (N, C, Do, Ho, Wo), strides sy*
    M,  # N * Do * Ho * Wo
    C,
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
    std,
    sth,
    stw,
    pdd,
    pdh,
    pdw,
    dld,
    dlh,
    dlw,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # voxel offsets and channel counts are multiples of ALIGN (launch.voxel_alignment)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < aligned_count(C, ALIGN)
    n, od, oh, ow = voxel(offs_m, Do, Ho, Wo)
    acc = _depthwise_taps(
        x_ptr, w_ptr, n, od, oh, ow, mask_m, offs_c, mask_c, D, H, W, sxn, sxc, sxd, sxh, sxw,
        std, sth, stw, pdd, pdh, pdw, dld, dlh, dlw, KD, KH, KW, False, INT64, ALIGN, BLOCK_M, BLOCK_C,
    )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    out = voxel_offsets_aligned(n, od, oh, ow, syn, syd, syh, syw, INT64, ALIGN)
    mask = mask_m[:, None] & mask_c[None, :]
    tl.store(
        y_ptr + out[:, None] + widen(offs_c, INT64)[None, :] * syc, acc.to(y_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def depthwise_conv3d_dgrad_kernel(
    gy_ptr,  # (N, C, Do, Ho, Wo), strides sg*
    w_ptr,  # (C, taps) contiguous
    gx_ptr,  # (N, C, D, H, W), strides sd*
    M,  # N * D * H * W (input voxels)
    C,
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
    sdn,
    sdc,
    sdd,
    sdh,
    sdw,
    std,
    sth,
    stw,
    pdd,
    pdh,
    pdw,
    dld,
    dlh,
    dlw,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # voxel offsets and channel counts are multiples of ALIGN (launch.voxel_alignment)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # gx[i] = sum over taps of w[tap] * gy[o] where o * stride = i + pad - tap * dilation (the transposed
    # depthwise conv: the flipped kernel in gather form, which also covers stride 2).
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < aligned_count(C, ALIGN)
    n, i_d, i_h, i_w = voxel(offs_m, D, H, W)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(KD * KH * KW):
        kd, kh, kw = kernel_tap(tap, KH, KW)
        nd = i_d + pdd - kd * dld
        nh = i_h + pdh - kh * dlh
        nw = i_w + pdw - kw * dlw
        o_d = nd // std
        o_h = nh // sth
        o_w = nw // stw
        valid = mask_m & (nd >= 0) & (nh >= 0) & (nw >= 0)
        valid = valid & (nd % std == 0) & (nh % sth == 0) & (nw % stw == 0)
        valid = valid & (o_d < Do) & (o_h < Ho) & (o_w < Wo)
        row = voxel_offsets_aligned(n, o_d, o_h, o_w, sgn, sgd, sgh, sgw, INT64, ALIGN)
        g = tl.load(
            gy_ptr + row[:, None] + widen(offs_c, INT64)[None, :] * sgc,
            mask=valid[:, None] & mask_c[None, :],
            other=0.0,
        )
        w = tl.load(w_ptr + offs_c * (KD * KH * KW) + tap, mask=mask_c, other=0.0)
        acc += g.to(tl.float32) * w.to(tl.float32)[None, :]
    dst = voxel_offsets_aligned(n, i_d, i_h, i_w, sdn, sdd, sdh, sdw, INT64, ALIGN)
    mask = mask_m[:, None] & mask_c[None, :]
    tl.store(
        gx_ptr + dst[:, None] + widen(offs_c, INT64)[None, :] * sdc,
        acc.to(gx_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def depthwise_conv3d_wgrad_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*
    gy_ptr,  # (N, C, Do, Ho, Wo), strides sg*
    partial_ptr,  # (programs_m, taps + 1, C) float32: this program's sums; row `taps` is the bias's
    M,  # N * Do * Ho * Wo (the reduction)
    M_PER_PROGRAM,
    C,
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
    std,
    sth,
    stw,
    pdd,
    pdh,
    pdw,
    dld,
    dlh,
    dlw,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # voxel offsets and channel counts are multiples of ALIGN (launch.voxel_alignment)
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Block partial sums: each program reduces its M_PER_PROGRAM voxels for every tap; the launcher
    # adds the programs' partials (a deterministic final reduction, no atomics, no per-weight blocks).
    # Products accumulate elementwise in a (BLOCK_M, BLOCK_C) tile and are summed over voxels once per
    # tap: a sum across the tile's rows crosses warps (shared memory and a barrier), which the loop
    # did at every step before.
    pid_m = tl.program_id(0)
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_c = offs_c < aligned_count(C, ALIGN)
    m_start = pid_m * M_PER_PROGRAM
    m_end = tl.minimum(m_start + M_PER_PROGRAM, M)
    for tap in range(KD * KH * KW):
        kd, kh, kw = kernel_tap(tap, KH, KW)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < m_end
            n, od, oh, ow = voxel(offs_m, Do, Ho, Wo, UNSIGNED=True)
            g_row = voxel_offsets_aligned(n, od, oh, ow, sgn, sgd, sgh, sgw, INT64, ALIGN)
            g_mask = mask_m[:, None] & mask_c[None, :]
            g = tl.load(
                gy_ptr + g_row[:, None] + widen(offs_c, INT64)[None, :] * sgc, mask=g_mask, other=0.0
            ).to(tl.float32)
            i_d = od * std - pdd + kd * dld
            i_h = oh * sth - pdh + kh * dlh
            i_w = ow * stw - pdw + kw * dlw
            valid = mask_m & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
            x_row = voxel_offsets_aligned(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw, INT64, ALIGN)
            x_mask = valid[:, None] & mask_c[None, :]
            x = tl.load(
                x_ptr + x_row[:, None] + widen(offs_c, INT64)[None, :] * sxc, mask=x_mask, other=0.0
            ).to(tl.float32)
            acc += g * x
        tap_sum = tl.sum(acc, axis=0)
        tl.store(partial_ptr + (pid_m * (KD * KH * KW + 1) + tap) * C + offs_c, tap_sum, mask=mask_c)
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < m_end
            n, od, oh, ow = voxel(offs_m, Do, Ho, Wo, UNSIGNED=True)
            g_row = voxel_offsets_aligned(n, od, oh, ow, sgn, sgd, sgh, sgw, INT64, ALIGN)
            g_mask = mask_m[:, None] & mask_c[None, :]
            g = tl.load(
                gy_ptr + g_row[:, None] + widen(offs_c, INT64)[None, :] * sgc, mask=g_mask, other=0.0
            ).to(tl.float32)
            acc += g
        bias_sum = tl.sum(acc, axis=0)
        tl.store(
            partial_ptr + (pid_m * (KD * KH * KW + 1) + KD * KH * KW) * C + offs_c, bias_sum, mask=mask_c
        )


@triton.jit
def _tap_window(windows, tap, KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr, DLH: tl.constexpr,
                DLW: tl.constexpr, HALO_H: tl.constexpr, HALO_W: tl.constexpr,
                BLOCK_C: tl.constexpr):  # fmt: skip
    """The (box voxels, BLOCK_C) window of a halo scratch tile that tap `tap` reads: `windows` (the box's
    rows at tap (0, 0, 0), x its channels) shifted by one constant offset per tap, no masks."""
    return tl.load(windows + tap_shift(tap, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W) * BLOCK_C)


@triton.jit
def depthwise_conv3d_wgrad_halo_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*, channels-last
    gy_ptr,  # (N, C, Do, Ho, Wo), strides sg* (any layout: loaded once per box)
    partial_ptr,  # (programs along boxes, taps + 1, C) float32, uninitialised: each program's sums over
    # its boxes, per tap, and in row `taps` its sum of gy (HAS_BIAS); the launcher adds the programs'
    scratch_ptr,  # (programs along boxes, channel blocks, HALO_ROWS, BLOCK_C) x's dtype: halo tiles
    N,
    C,
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
    DLD: tl.constexpr,  # dilation
    DLH: tl.constexpr,
    DLW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # x's and gy's voxel offsets and C are multiples of ALIGN (launch.voxel_alignment)
    BOX_D: tl.constexpr,  # box of BOX_D x BOX_H x BOX_W voxels (powers of two)
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FILL_M: tl.constexpr,
):
    """Weight gradient at stride 1 through halo tiles; grid (programs along boxes, blocks of C). Program
    (p, cb) owns boxes p, p + P, ... and channel block cb. Per box it copies the halo of x once into its
    scratch tile (as the fused layer's halo kernels do: zeros outside the volume) and loads the box's gy
    once; each tap's window of the tile times gy is summed over the box's voxels (across the program's
    threads) and added to the program's row of the sums. Its first box loads no sums, so the buffer needs
    no zero fill (the launcher gives every program at least one box). 2.4x fewer instructions per
    multiply-add than depthwise_conv3d_wgrad_kernel in sm_90a SASS at 728 channels and dilation 2
    (bench/results/2026-11-28-depthwise-halo-probe.md); that kernel still takes other strides, NCDHW
    or float32 x, and larger halos."""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    programs = tl.num_programs(0)
    first_box = tl.program_id(0)
    scratch = scratch_ptr + widen(tl.program_id(1) * programs + first_box, INT64) * (HALO_ROWS * BLOCK_C)
    c_stride = aligned_count(C, ALIGN)  # C, known to be a multiple of ALIGN: vector access to the sums
    partial = partial_ptr + widen(first_box, INT64) * (taps + 1) * c_stride
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_c = offs_c < aligned_count(C, ALIGN)
    channels = tl.arange(0, BLOCK_C)
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    boxes_per_image, boxes_h, boxes_w = _box_counts(Do, Ho, Wo, BOX_D, BOX_H, BOX_W)  # boxes of gy
    gy_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for box in range(first_box, N * boxes_per_image, programs):
        n, od0, oh0, ow0 = _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W)
        _fill_halo(scratch, x_ptr + widen(n, INT64) * sxn, x_ptr, x_ptr, offs_c, C, od0 - pdd, oh0 - pdh,
                   ow0 - pdw, D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_C,
                   x_ptr.dtype.element_ty, "ieee", INT64, NORMALISE=False, ALIGN=ALIGN)  # fmt: skip
        od, oh, ow = od0 + rd, oh0 + rh, ow0 + rw
        g_row = voxel_offsets_aligned(n, od, oh, ow, sgn, sgd, sgh, sgw, INT64, ALIGN)
        g_mask = ((od < Do) & (oh < Ho) & (ow < Wo))[:, None] & mask_c[None, :]
        g = tl.load(gy_ptr + g_row[:, None] + widen(offs_c, INT64)[None, :] * sgc, mask=g_mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_BIAS:
            gy_sum += tl.sum(g, axis=0)
        windows = scratch + halo_row[:, None] * BLOCK_C + channels[None, :]  # each tap: a constant offset
        for tap in range(taps):
            window = _tap_window(windows, tap, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W, BLOCK_C)
            tap_sum = tl.sum(window.to(tl.float32) * g, axis=0)
            row = partial + tap * c_stride + offs_c
            earlier = tl.load(row, mask=mask_c & (box != first_box), other=0.0)  # the first box: none
            tl.store(row, earlier + tap_sum, mask=mask_c)
    if HAS_BIAS:
        tl.store(partial + taps * c_stride + offs_c, gy_sum, mask=mask_c)


@triton.jit
def depthwise_conv3d_halo_kernel(
    x_ptr,  # (N, C, D, H, W), strides sx*, channels-last: x (forward) or gy (input gradient)
    w_ptr,  # (taps, C) contiguous, taps first: the weight (forward), its taps reversed (input gradient)
    b_ptr,  # (C,) or unused
    y_ptr,  # (N, C, Do, Ho, Wo), strides sy*: y (forward) or gx (input gradient)
    scratch_ptr,  # (programs along boxes, channel blocks, HALO_ROWS, BLOCK_C) x's dtype: halo tiles
    N,
    C,
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
    pdd,  # padding: output voxel o reads input voxels o - pd + k * dilation (negative allowed)
    pdh,
    pdw,
    taps,  # KD * KH * KW
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    DLD: tl.constexpr,  # dilation
    DLH: tl.constexpr,
    DLW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # x's and y's voxel offsets and C are multiples of ALIGN (launch.voxel_alignment)
    BOX_D: tl.constexpr,  # box of BOX_D x BOX_H x BOX_W output voxels (powers of two)
    BOX_H: tl.constexpr,
    BOX_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FILL_M: tl.constexpr,
):
    """Stride-1 depthwise conv through halo tiles, y[o] = sum over taps k of w[k] * x[o - pd + k * dil]
    (+ b); grid (programs along boxes, blocks of C), program (p, cb) owning boxes p, p + P, ... of y's
    volume in channel block cb. Per box it copies the halo of x once into its scratch tile (the fused
    layer's _fill_halo: zeros outside the volume, 16-byte loads through ALIGN) and each tap reads its
    window there at a constant offset, with neither masks nor index arithmetic; sums in float32.
    The input gradient at stride 1 is the same conv of gy: gx[i] = sum over k of w[K - 1 - k] *
    gy[i - ((K - 1) * dil - pd) + k * dil], zero outside gy's volume, so the launcher passes gy, the
    weight's taps reversed and the mirrored padding (K - 1) * dil - pd. The probe of this design
    (tools/depthwise_halo_probe.py) issued about 1.6x fewer instructions per multiply-add than
    depthwise_conv3d_fwd_kernel in sm_90a SASS (bench/results/2026-11-28-depthwise-halo-probe.md)."""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    programs = tl.num_programs(0)
    scratch = scratch_ptr + widen(tl.program_id(1) * programs + tl.program_id(0), INT64) * (
        HALO_ROWS * BLOCK_C
    )
    offs_c = block_offsets(tl.program_id(1), BLOCK_C)
    mask_c = offs_c < aligned_count(C, ALIGN)
    channels = tl.arange(0, BLOCK_C)
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    boxes_per_image, boxes_h, boxes_w = _box_counts(Do, Ho, Wo, BOX_D, BOX_H, BOX_W)  # boxes of y
    windows = scratch + halo_row[:, None] * BLOCK_C + channels[None, :]  # each tap: a constant offset
    for box in range(tl.program_id(0), N * boxes_per_image, programs):
        n, od0, oh0, ow0 = _box_origin(box, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W)
        _fill_halo(scratch, x_ptr + widen(n, INT64) * sxn, x_ptr, x_ptr, offs_c, C, od0 - pdd, oh0 - pdh,
                   ow0 - pdw, D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_C,
                   x_ptr.dtype.element_ty, "ieee", INT64, NORMALISE=False, ALIGN=ALIGN)  # fmt: skip
        acc = tl.zeros((BOX_D * BOX_H * BOX_W, BLOCK_C), dtype=tl.float32)
        for tap in range(taps):
            window = _tap_window(windows, tap, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W, BLOCK_C)
            w = tl.load(w_ptr + tap * aligned_count(C, ALIGN) + offs_c, mask=mask_c, other=0.0)  # vectors
            acc += window.to(tl.float32) * w.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        od, oh, ow = od0 + rd, oh0 + rh, ow0 + rw
        out = voxel_offsets_aligned(n, od, oh, ow, syn, syd, syh, syw, INT64, ALIGN)
        mask = ((od < Do) & (oh < Ho) & (ow < Wo))[:, None] & mask_c[None, :]
        tl.store(y_ptr + out[:, None] + widen(offs_c, INT64)[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def separable_conv3d_inference_kernel(
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    dw_ptr,  # (C_in, taps) contiguous: depthwise weight
    s1_ptr,  # (C_in,) float32: depthwise BatchNorm scale (running statistics)
    t1_ptr,  # (C_in,) float32: its shift
    pw_ptr,  # (C_in, C_out) contiguous, DOT_DTYPE: pointwise weight, transposed
    s2_ptr,  # (C_out,) float32: pointwise BatchNorm scale
    t2_ptr,  # (C_out,) float32
    y_ptr,  # (N, C_out, Do, Ho, Wo), strides sy*
    M,
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
    std,
    sth,
    stw,
    pdd,
    pdh,
    pdw,
    dld,
    dlh,
    dlw,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    RELU_IN: tl.constexpr,  # ReLU before the depthwise (SepConv with depth_activation=False)
    RELU_MID: tl.constexpr,  # ReLU after each BatchNorm (depth_activation=True)
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    ALIGN: tl.constexpr,  # voxel offsets and channel counts are multiples of ALIGN (launch.voxel_alignment)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # block of C_out
    BLOCK_K: tl.constexpr,  # block of C_in
):
    # [ReLU] -> depthwise -> BN [-> ReLU] -> pointwise -> BN [-> ReLU]; the depthwise result of a tile
    # lives in registers only and feeds the pointwise GEMM directly.
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    mask_m = offs_m < M
    n, od, oh, ow = voxel(offs_m, Do, Ho, Wo)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < aligned_count(C_out, ALIGN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < aligned_count(C_in, ALIGN)
        depth = _depthwise_taps(
            x_ptr, dw_ptr, n, od, oh, ow, mask_m, offs_k, mask_k, D, H, W, sxn, sxc, sxd, sxh, sxw,
            std, sth, stw, pdd, pdh, pdw, dld, dlh, dlw, KD, KH, KW, RELU_IN, INT64, ALIGN, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        s1 = tl.load(s1_ptr + offs_k, mask=mask_k, other=0.0)
        t1 = tl.load(t1_ptr + offs_k, mask=mask_k, other=0.0)
        depth = depth * s1[None, :] + t1[None, :]
        if RELU_MID:
            depth = tl.maximum(depth, 0.0)
        depth = tl.where(mask_k[None, :], depth, 0.0)
        pw_mask = mask_k[:, None] & mask_n[None, :]
        pw = tl.load(pw_ptr + offs_k[:, None] * C_out + offs_n[None, :], mask=pw_mask, other=0.0)
        acc = tl.dot(
            dot_operand(depth, DOT_DTYPE, INPUT_PRECISION),
            dot_operand(pw, DOT_DTYPE, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )
    s2 = tl.load(s2_ptr + offs_n, mask=mask_n, other=0.0)
    t2 = tl.load(t2_ptr + offs_n, mask=mask_n, other=0.0)
    acc = acc * s2[None, :] + t2[None, :]
    if RELU_MID:
        acc = tl.maximum(acc, 0.0)
    out = voxel_offsets_aligned(n, od, oh, ow, syn, syd, syh, syw, INT64, ALIGN)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(
        y_ptr + out[:, None] + widen(offs_n, INT64)[None, :] * syc, acc.to(y_ptr.dtype.element_ty), mask=mask
    )

"""Triton kernels of the fused BatchNorm -> ReLU -> Conv3d layer. Launchers: ops/bn_relu_conv3d.py.

Notation: x (N, C_in, D, H, W) the raw input; s, t (C_in,) float32 the BatchNorm scale and shift
(s = gamma * rstd, t = beta - mean * s); a = relu(s * x + t) the normalised activation, which no kernel
writes whole: the kernels here recompute it from x while loading each tile, and the halo kernels
(bn_relu_conv3d_halo_kernels.py: stride 1's forward and gradients) write one box's halo of it (of gy, for
the input gradient) at a time to a scratch tile of their own.
y (N, C_out, Do, Ho, Wo) the conv output; gy its gradient. All tensors are addressed through their
strides (any layout, channel slices of a larger buffer included). Voxel indices are int32 (fewer than
2**31 voxels, checked by the launchers); element offsets are int32 too, or int64 when INT64 (a tensor
of the launch spans 2**31 elements or more; see triton_index.py). In the direct kernels the K
dimension (taps x channel blocks) is one runtime loop, the tap varying fastest: unrolled taps kept
their address tiles live together and spilled registers.

Implicit GEMM: M = voxels, N = channels, K = taps x channels. Layout: with channels-last tensors
(channel stride 1) the K dimension of every tile is contiguous in memory, so tile loads are coalesced
along K and the dense block's shared buffer can be read as channel slices without copies; NCDHW works
too (then loads are contiguous along M).

Dot operands are cast to DOT_DTYPE (float16/bfloat16 on the GPU for half inputs, float32 in the
interpreter, where bfloat16 dots are wrong), and rounded to nearest for TF32 dots (dot_operands.py);
accumulation is always float32.
"""

import triton
import triton.language as tl

from prostate_kernels.ops.dot_operands import dot_operand
from prostate_kernels.ops.triton_index import block_offsets, kernel_tap, voxel, voxel_offsets, widen


@triton.jit
def bn_relu_conv3d_fwd_kernel(
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    w_ptr,  # (taps, C_in, C_out) contiguous, DOT_DTYPE: w[tap, ci, co] = weight[co, ci, kd, kh, kw]
    bias_ptr,  # (C_out,) or unused
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    y_ptr,  # (N, C_out, Do, Ho, Wo), strides sy*
    uniform_ptr,  # (N, C_out, Do, Ho, Wo) contiguous float32 dropout draws (DROPOUT) or unused
    drop_p,  # dropout probability: an output is kept where its draw is >= drop_p
    keep_scale,  # 1 / (1 - drop_p), the kept outputs' factor
    M,  # N * Do * Ho * Wo
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
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,  # the dense block's dropout, applied to the output in the epilogue
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    mask_m = offs_m < M
    n, od, oh, ow = voxel(offs_m, Do, Ho, Wo)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat K loop over (channel block, tap), the tap varying fastest: consecutive steps read the same
    # channels at neighbouring voxels (the 27 taps of one channel block touch a few KB, kept in L1), and
    # num_stages pipelines the loads of the whole loop (a tap loop around a channel loop pipelined only
    # the inner loop, a single step at C_in <= BLOCK_K).
    TAPS = KD * KH * KW  # constexpr
    for k in range(TAPS * tl.cdiv(C_in, BLOCK_K)):
        tap = k % TAPS
        kd, kh, kw = kernel_tap(tap, KH, KW)
        i_d = od * std - pdd + kd * dld
        i_h = oh * sth - pdh + kh * dlh
        i_w = ow * stw - pdw + kw * dlw
        valid = mask_m & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        row = voxel_offsets(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw, INT64)
        offs_k = (k // TAPS) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_in
        a_mask = valid[:, None] & mask_k[None, :]
        a = tl.load(x_ptr + row[:, None] + widen(offs_k, INT64)[None, :] * sxc, mask=a_mask, other=0.0)
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        a = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
        a = tl.where(a_mask, a, 0.0)  # padding is zero *after* BN + ReLU, as in the Sequential
        w_rows = widen(tap * C_in + offs_k, INT64) * C_out
        w = tl.load(
            w_ptr + w_rows[:, None] + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        acc = tl.dot(
            dot_operand(a, DOT_DTYPE, INPUT_PRECISION),
            dot_operand(w, DOT_DTYPE, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )
    _store_output(
        acc, n, od, oh, ow, mask_m, offs_n, mask_n, bias_ptr, y_ptr, uniform_ptr, drop_p, keep_scale,
        C_out, Do, Ho, Wo, syn, syc, syd, syh, syw, HAS_BIAS, DROPOUT, INT64,
    )  # fmt: skip


@triton.jit
def _store_output(
    acc, n, od, oh, ow, mask_m, offs_n, mask_n, bias_ptr, y_ptr, uniform_ptr, drop_p, keep_scale,
    C_out, Do, Ho, Wo, syn, syc, syd, syh, syw,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """The forward kernels' epilogue: y[n, offs_n, od, oh, ow] = acc (BLOCK_M, BLOCK_N) float32 + bias,
    through the dense block's dropout when DROPOUT, where mask_m (per row) and mask_n (per column)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    if DROPOUT:  # seeded_dropout.scale_from_uniform_'s mask and factor, at each output's own draw
        spatial = (od * Ho + oh) * Wo + ow  # the voxel's index within its image
        draw = (widen(n, INT64)[:, None] * C_out + offs_n[None, :]) * (Do * Ho * Wo) + spatial[:, None]
        u = tl.load(uniform_ptr + draw, mask=y_mask, other=0.0)
        acc = tl.where(u >= drop_p, acc * keep_scale, 0.0)
    out = voxel_offsets(n, od, oh, ow, syn, syd, syh, syw, INT64)
    tl.store(
        y_ptr + out[:, None] + widen(offs_n, INT64)[None, :] * syc,
        acc.to(y_ptr.dtype.element_ty),
        mask=y_mask,
    )


@triton.jit
def bn_relu_conv3d_dgrad_kernel(
    gy_ptr,  # (N, C_out, Do, Ho, Wo), strides sg*
    w_ptr,  # (taps, C_out, C_in) contiguous, DOT_DTYPE: w[tap, co, ci] = weight[co, ci, kd, kh, kw]
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    mean_ptr,  # (C_in,) float32: the mean that normalised x (batch or running)
    rstd_ptr,  # (C_in,) float32
    gz_ptr,  # (M, C_in) float32 scratch: gradient w.r.t. s * x + t (STORE_GZ)
    gx_ptr,  # (N, C_in, D, H, W), strides sd*: grad of x (when not STORE_GZ)
    partial_ptr,  # float32 (2, p_rows, C_in) with strides (p_plane, p_row, 1), p_rows = cdiv(M, PARTIAL_M):
    # program m's sums over its BLOCK_M voxels of gz (plane 0) and gz * xhat (plane 1) in row
    # m * BLOCK_M // PARTIAL_M, zeros in its other rows (no atomics: the launcher sums the rows in a fixed
    # order, so the gradients are the same from run to run; every config writes every row, so the
    # buffer needs no zero fill)
    p_plane,
    p_row,
    p_rows,
    M,  # N * D * H * W (input voxels)
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
    STORE_GZ: tl.constexpr,  # training: keep gz for the batch-statistics pass; eval: write gx = gz * s
    ACCUMULATE: tl.constexpr,  # add into gx instead of overwriting it
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # block of C_in (the output of this GEMM)
    BLOCK_K: tl.constexpr,  # block of C_out (the reduction)
    PARTIAL_M: tl.constexpr,  # the smallest candidate BLOCK_M: voxels per row of the partial sums
):
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    mask_m = offs_m < M
    n, d_, h_, w_ = voxel(offs_m, D, H, W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat K loop over (C_out block, tap), the tap varying fastest, as in the forward kernel (with
    # the usual C_out <= BLOCK_K this is the tap loop itself, now pipelined by num_stages).
    TAPS = KD * KH * KW  # constexpr
    for k in range(TAPS * tl.cdiv(C_out, BLOCK_K)):
        tap = k % TAPS
        kd, kh, kw = kernel_tap(tap, KH, KW)
        # output voxel o with o * stride = i + pad - k * dilation, when that is a whole, in-range o
        nd = d_ + pdd - kd * dld
        nh = h_ + pdh - kh * dlh
        nw = w_ + pdw - kw * dlw
        o_d = nd // std
        o_h = nh // sth
        o_w = nw // stw
        valid = mask_m & (nd >= 0) & (nh >= 0) & (nw >= 0)
        valid = valid & (nd % std == 0) & (nh % sth == 0) & (nw % stw == 0)
        valid = valid & (o_d < Do) & (o_h < Ho) & (o_w < Wo)
        row = voxel_offsets(n, o_d, o_h, o_w, sgn, sgd, sgh, sgw, INT64)
        offs_k = (k // TAPS) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C_out
        g = tl.load(
            gy_ptr + row[:, None] + widen(offs_k, INT64)[None, :] * sgc,
            mask=valid[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_rows = widen(tap * C_out + offs_k, INT64) * C_in
        w = tl.load(
            w_ptr + w_rows[:, None] + offs_n[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0
        )
        acc = tl.dot(
            dot_operand(g, DOT_DTYPE, INPUT_PRECISION),
            dot_operand(w, DOT_DTYPE, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )

    sum_gz, sum_gz_xhat = _input_grad_epilogue(
        acc, offs_m, n, d_, h_, w_, mask_m, offs_n, mask_n, x_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
        gz_ptr, gx_ptr, C_in, sxn, sxc, sxd, sxh, sxw, sdn, sdc, sdd, sdh, sdw, STORE_GZ, ACCUMULATE, INT64,
    )  # fmt: skip
    ROWS: tl.constexpr = BLOCK_M // PARTIAL_M  # rows of the partial sums this program owns
    row = tl.program_id(0) * ROWS
    partial = partial_ptr + widen(row, INT64) * p_row + offs_n
    tl.store(partial, sum_gz, mask=mask_n)
    tl.store(partial + p_plane, sum_gz_xhat, mask=mask_n)
    for r in tl.static_range(1, ROWS):  # the rows a PARTIAL_M tile's programs would fill: zeros
        zeros = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tl.store(partial + r * p_row, zeros, mask=mask_n & (row + r < p_rows))
        tl.store(partial + p_plane + r * p_row, zeros, mask=mask_n & (row + r < p_rows))


@triton.jit
def _input_grad_epilogue(
    acc, offs_m, n, d_, h_, w_, mask_m, offs_n, mask_n, x_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
    gz_ptr, gx_ptr, C_in, sxn, sxc, sxd, sxh, sxw, sdn, sdc, sdd, sdh, sdw,
    STORE_GZ: tl.constexpr, ACCUMULATE: tl.constexpr, INT64: tl.constexpr,
):  # fmt: skip
    """The input-gradient kernels' epilogue: acc (BLOCK_M, BLOCK_N) float32, the gradient w.r.t. relu(s * x
    + t) at voxels offs_m (flat index n, d_, h_, w_) and input channels offs_n, through the ReLU mask
    (recomputed from x) gives gz, the gradient w.r.t. s * x + t; stored to the gz scratch (STORE_GZ, for
    the batch-statistics pass) or as gx = gz * s (added to gx when ACCUMULATE). Returns the block's
    (BLOCK_N,) sums over its voxels of gz and of gz * xhat (xhat = (x - mean) * rstd)."""
    mask = mask_m[:, None] & mask_n[None, :]
    x_row = voxel_offsets(n, d_, h_, w_, sxn, sxd, sxh, sxw, INT64)
    x = tl.load(x_ptr + x_row[:, None] + widen(offs_n, INT64)[None, :] * sxc, mask=mask, other=0.0).to(
        tl.float32
    )
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)
    gz = tl.where(mask & (x * scale[None, :] + shift[None, :] > 0.0), acc, 0.0)
    mean = tl.load(mean_ptr + offs_n, mask=mask_n, other=0.0)
    rstd = tl.load(rstd_ptr + offs_n, mask=mask_n, other=0.0)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if STORE_GZ:
        tl.store(gz_ptr + widen(offs_m, INT64)[:, None] * C_in + offs_n[None, :], gz, mask=mask)
    else:
        gx = gz * scale[None, :]
        dst = (
            gx_ptr
            + voxel_offsets(n, d_, h_, w_, sdn, sdd, sdh, sdw, INT64)[:, None]
            + widen(offs_n, INT64)[None, :] * sdc
        )
        if ACCUMULATE:
            gx += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, gx.to(gx_ptr.dtype.element_ty), mask=mask)
    return tl.sum(gz, axis=0), tl.sum(gz * xhat, axis=0)


@triton.jit
def bn_backward_finalize_kernel(
    gz_ptr,  # (M, C) float32: gradient w.r.t. s * x + t
    x_ptr,  # (N, C, D, H, W), strides sx*
    gx_ptr,  # (N, C, D, H, W), strides sd*
    scale_ptr,  # (C,) float32
    mean_ptr,  # (C,) float32 batch mean
    rstd_ptr,  # (C,) float32 batch rstd
    dgamma_ptr,  # (C,) float32: sum of gz * xhat over all M voxels
    dbeta_ptr,  # (C,) float32: sum of gz
    M,
    C,
    D,
    H,
    W,
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
    ACCUMULATE: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Training-mode BatchNorm backward: gx = s * (gz - mean(gz) - xhat * mean(gz * xhat)).
    offs_m = block_offsets(tl.program_id(0), BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    n, d_, h_, w_ = voxel(offs_m, D, H, W)
    gz = tl.load(gz_ptr + widen(offs_m, INT64)[:, None] * C + offs_c[None, :], mask=mask, other=0.0)
    x_row = voxel_offsets(n, d_, h_, w_, sxn, sxd, sxh, sxw, INT64)
    x = tl.load(x_ptr + x_row[:, None] + widen(offs_c, INT64)[None, :] * sxc, mask=mask, other=0.0).to(
        tl.float32
    )
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    rstd = tl.load(rstd_ptr + offs_c, mask=mask_c, other=0.0)
    mean_gz = tl.load(dbeta_ptr + offs_c, mask=mask_c, other=0.0) / M
    mean_gz_xhat = tl.load(dgamma_ptr + offs_c, mask=mask_c, other=0.0) / M
    xhat = (x - mean[None, :]) * rstd[None, :]
    gx = scale[None, :] * (gz - mean_gz[None, :] - xhat * mean_gz_xhat[None, :])
    dst = (
        gx_ptr
        + voxel_offsets(n, d_, h_, w_, sdn, sdd, sdh, sdw, INT64)[:, None]
        + widen(offs_c, INT64)[None, :] * sdc
    )
    if ACCUMULATE:
        gx += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_relu_conv3d_wgrad_kernel(
    x_ptr,  # (N, C_in, D, H, W), strides sx*
    gy_ptr,  # (N, C_out, Do, Ho, Wo), strides sg*
    scale_ptr,  # (C_in,) float32
    shift_ptr,  # (C_in,) float32
    gw_ptr,  # (splits, C_out, C_in, taps) float32: each split's partial sums (the launcher adds them; the
    # conv weight's own layout, so that the sum is the gradient as autograd stores it, with no copy)
    gb_ptr,  # (splits, C_out) float32: each split's partial bias gradient (HAS_BIAS)
    M,  # N * Do * Ho * Wo (output voxels: the reduction)
    M_PER_SPLIT,  # output voxels per program along grid axis 2
    GW_SPLIT_STRIDE,  # taps * C_in * C_out
    TAPS,  # KD * KH * KW
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
    std,
    sth,
    stw,
    pdd,
    pdh,
    pdw,
    dld,
    dlh,
    dlw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_M: tl.constexpr,  # voxels per step (the reduction)
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    # grid: (taps * ci_blocks, co_blocks, splits of M). gw[split, tap] = a_tap^T @ gy over the split's voxels.
    # Plain stores of partial sums, no atomics: an atomic add of the (BLOCK_CI, BLOCK_CO) accumulator
    # spilled registers (measured: 96 registers without spills vs 255 and 552 B spilled with it) and made
    # the result depend on the order of the splits.
    ci_blocks = tl.cdiv(C_in, BLOCK_CI)
    tap = tl.program_id(0) // ci_blocks
    pid_ci = tl.program_id(0) % ci_blocks
    kd, kh, kw = kernel_tap(tap, KH, KW)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_ci = offs_ci < C_in
    mask_co = offs_co < C_out
    scale = tl.load(scale_ptr + offs_ci, mask=mask_ci, other=0.0)
    shift = tl.load(shift_ptr + offs_ci, mask=mask_ci, other=0.0)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    m_start = tl.program_id(2) * M_PER_SPLIT  # voxel indices are int32 (launch.check_voxels)
    m_end = tl.minimum(m_start + M_PER_SPLIT, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        n, od, oh, ow = voxel(offs_m, Do, Ho, Wo, UNSIGNED=True)
        i_d = od * std - pdd + kd * dld
        i_h = oh * sth - pdh + kh * dlh
        i_w = ow * stw - pdw + kw * dlw
        valid = mask_m & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H) & (i_w >= 0) & (i_w < W)
        a_mask = valid[:, None] & mask_ci[None, :]
        x_row = voxel_offsets(n, i_d, i_h, i_w, sxn, sxd, sxh, sxw, INT64)
        a = tl.load(x_ptr + x_row[:, None] + widen(offs_ci, INT64)[None, :] * sxc, mask=a_mask, other=0.0)
        a = tl.maximum(a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
        a = tl.where(a_mask, a, 0.0)
        g_row = voxel_offsets(n, od, oh, ow, sgn, sgd, sgh, sgw, INT64)
        g_mask = mask_m[:, None] & mask_co[None, :]
        g = tl.load(gy_ptr + g_row[:, None] + widen(offs_co, INT64)[None, :] * sgc, mask=g_mask, other=0.0)
        acc = tl.dot(
            tl.trans(dot_operand(a, DOT_DTYPE, INPUT_PRECISION)),
            dot_operand(g, DOT_DTYPE, INPUT_PRECISION),
            acc,
            input_precision=INPUT_PRECISION,
        )
        if HAS_BIAS:
            g_sum += tl.sum(g.to(tl.float32), axis=0)
    split = tl.program_id(2)
    # gw[split, co, ci, tap]: scattered 4-byte stores of a small tensor (taps * C_in * C_out per split);
    # a column vector plus a row vector (a 2D int64 offset product spilled on sm_80)
    gw_cols = widen(split, INT64) * GW_SPLIT_STRIDE + tap + widen(offs_co, INT64) * (C_in * TAPS)
    gw_rows = offs_ci * TAPS
    tl.store(gw_ptr + gw_rows[:, None] + gw_cols[None, :], acc, mask=mask_ci[:, None] & mask_co[None, :])
    if HAS_BIAS:
        if (tap == 0) & (pid_ci == 0):
            tl.store(gb_ptr + split * C_out + offs_co, g_sum, mask=mask_co)

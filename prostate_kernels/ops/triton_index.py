"""Index arithmetic shared by every Triton kernel: tile offsets, their width, and the voxel decode.

Voxel indices are int32 always (launch.check_voxels). INT64 (a constexpr each launcher sets with
launch.needs_int64) says whether some tensor of the launch spans 2**31 elements or more: then indices
are widened to int64 just before they multiply a stride. Otherwise offsets stay int32: half the
registers of int64 ones in every (BLOCK_M, BLOCK_K) address tile.
"""

import triton
import triton.language as tl


@triton.jit
def block_offsets(pid, BLOCK: tl.constexpr):
    """pid * BLOCK + arange(BLOCK): voxel or row indices, int32 (launch.check_voxels keeps them below
    2**31, so that no kernel divides int64 values: 64-bit division is a subroutine with a stack frame,
    whose spills ptxas reports)."""
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def widen(index, INT64: tl.constexpr):
    """`index` as int64 when INT64 (before it multiplies a stride), unchanged otherwise. tl.cast, which
    tensor.to aliases, also takes a constant index (a 0: _fill_halo's image index)."""
    if INT64:
        index = tl.cast(index, tl.int64)
    return index


@triton.jit
def kernel_tap(tap, KH: tl.constexpr, KW: tl.constexpr):
    """Split a flat kernel tap, 0 <= tap < KD * KH * KW in (kd, kh, kw) row-major order (the weights'
    order), into (kd, kh, kw): divisions by constants, no bound check."""
    return tap // (KH * KW), (tap // KW) % KH, tap % KW


@triton.jit
def voxel(offs, S0, S1, S2, UNSIGNED: tl.constexpr = False):
    """Split flat voxel indices (int32, >= 0) over (N, S0, S1, S2) into int32 (n, i0, i1, i2).

    UNSIGNED: divide as uint32, for a decode inside a loop. A signed division by a runtime size compiles
    to the unsigned one plus sign fix-ups (IABS, negations, selects), which a weight gradient's voxel
    loop, decoding every step, paid at each of its rows (sm_90a SASS, instructions per step at Tiramisu
    p3a's widest layer and DeepLabv3+'s 728 channels: bn_relu_conv3d_wgrad_kernel 849 -> 606,
    depthwise_conv3d_wgrad_kernel 654 -> 486; tools/sass_loops.py). Signed for a decode before a loop:
    there the unsigned one made the loops that follow it longer (depthwise forward 138 -> 158), the
    compiler no longer knowing the indices' signs."""
    if UNSIGNED:
        u = offs.to(tl.uint32)
        s0, s1, s2 = tl.cast(S0, tl.uint32), tl.cast(S1, tl.uint32), tl.cast(S2, tl.uint32)  # sizes >= 1
        q2 = u // s2
        q1 = q2 // s1
        n = q1 // s0
        return (
            n.to(tl.int32),
            (q1 - n * s0).to(tl.int32),
            (q2 - q1 * s1).to(tl.int32),
            (u - q2 * s2).to(tl.int32),
        )
    i2 = offs % S2
    i1 = (offs // S2) % S1
    i0 = (offs // (S2 * S1)) % S0
    n = offs // (S2 * S1 * S0)
    return n, i0, i1, i2


@triton.jit
def voxel_offsets(n, i0, i1, i2, sn, s0, s1, s2, INT64: tl.constexpr):
    """Element offset of voxel (n, i0, i1, i2) with strides (sn, s0, s1, s2); int64 when INT64."""
    return widen(n, INT64) * sn + widen(i0, INT64) * s0 + widen(i1, INT64) * s1 + widen(i2, INT64) * s2


@triton.jit
def voxel_offsets_aligned(n, i0, i1, i2, sn, s0, s1, s2, INT64: tl.constexpr, ALIGN: tl.constexpr):
    """voxel_offsets, known to the compiler to be multiples of ALIGN (launch.voxel_alignment: every
    voxel stride is one). Triton learns a stride's divisibility only when it is a multiple of 16: at 728
    channels-last channels (DeepLabv3+'s middle flow) the strides are multiples of 8, and the loads and
    stores along the contiguous channels were 2-byte scalar ones instead of 16-byte vectors (sm_90a
    SASS). The strides are divided by ALIGN and the sum multiplied back (exact: they are multiples), a
    product by a constant that Triton's axis analysis sees; tl.multiple_of's hint on the sum did not
    survive its canonicalisation (absent from the TTIR)."""
    if ALIGN > 1:
        return voxel_offsets(n, i0, i1, i2, sn // ALIGN, s0 // ALIGN, s1 // ALIGN, s2 // ALIGN, INT64) * ALIGN
    return voxel_offsets(n, i0, i1, i2, sn, s0, s1, s2, INT64)


@triton.jit
def aligned_count(count, ALIGN: tl.constexpr):
    """A channel count that is a multiple of ALIGN (launch.voxel_alignment), written so that the compiler
    knows it: a mask `offs < aligned_count(C, ALIGN)` is then constant over ALIGN consecutive channels,
    which the loads and stores it guards need to be vectors."""
    return count // ALIGN * ALIGN

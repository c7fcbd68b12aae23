"""triton_index.voxel: the signed and unsigned decodes of flat voxel indices give torch's integer
arithmetic, through the interpreter, on odd sizes, axes of size 1 and indices up to the int32 limit
(check_voxels' bound)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from prostate_kernels.ops.triton_index import voxel


@triton.jit
def _decode_kernel(out_ptr, START, S0, S1, S2, BLOCK: tl.constexpr, UNSIGNED: tl.constexpr):
    # out (4, BLOCK) int32: (n, i0, i1, i2) of the flat indices START + [0, BLOCK)
    lanes = tl.arange(0, BLOCK)
    n, i0, i1, i2 = voxel(START + lanes, S0, S1, S2, UNSIGNED)
    tl.store(out_ptr + lanes, n)
    tl.store(out_ptr + BLOCK + lanes, i0)
    tl.store(out_ptr + 2 * BLOCK + lanes, i1)
    tl.store(out_ptr + 3 * BLOCK + lanes, i2)


@pytest.mark.parametrize(
    ("sizes", "start"),
    [
        ((7, 9, 11), 0),
        ((1, 1, 5), 3),  # size-1 axes
        ((3, 1, 1), 1),
        ((16, 64, 64), 70_000),  # p3a's patch, the second image
        ((64, 256, 256), 2**31 - 256),  # the last int32 indices: no sign trouble in the unsigned decode
    ],
)
@pytest.mark.parametrize("unsigned", [False, True])
def test_voxel_decodes_like_integer_division(sizes, start, unsigned):
    block = 256
    out = torch.full((4, block), -1, dtype=torch.int32)
    _decode_kernel[(1,)](out, start, *sizes, BLOCK=block, UNSIGNED=unsigned)
    flat = start + torch.arange(block, dtype=torch.int64)
    s0, s1, s2 = sizes
    expected = torch.stack([flat // (s0 * s1 * s2), flat // (s1 * s2) % s0, flat // s2 % s1, flat % s2])
    assert torch.equal(out.long(), expected)

"""The GPU draws of seeded_dropout: Philox in a Triton kernel that reads its seed from device memory.

Imported only when a mask is drawn off the CPU (`import prostate_kernels` does not import Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv, next_power_of_2

_PHILOX_SPAN = 2**32  # tl.rand's counter is uint32: one mask holds fewer elements than this
_UNIFORM_BLOCK = 1024
_APPLY_TILE = 2048  # elements per program of philox_dropout_: BLOCK_S voxels x BLOCK_C channels


def philox_uniform(seeds: torch.Tensor, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Contiguous float32 (shape) on seeds' device: element i is tl.rand(seeds[layer], i), Philox 4x32
    with 10 rounds, uniform in [0, 1). One launch; the seed is read by the kernel, never by the host."""
    out = torch.empty(shape, dtype=torch.float32, device=seeds.device)
    n = out.numel()
    _check_span(tuple(shape), n)
    if n:
        _philox_uniform_kernel[(cdiv(n, _UNIFORM_BLOCK),)](seeds, layer, out, n, BLOCK=_UNIFORM_BLOCK)
    return out


def _check_span(shape: tuple[int, ...], n: int) -> None:
    """ValueError unless a mask of n elements fits Philox's uint32 counter."""
    if n >= _PHILOX_SPAN:
        raise ValueError(f"dropout mask of shape {shape}: {n} elements, at most {_PHILOX_SPAN - 1} per layer")


def philox_dropout_(t: torch.Tensor, seeds: torch.Tensor, layer: int, p: float) -> bool:
    """In place, one launch: t *= the layer's mask, the values of scale_from_uniform_(philox_uniform(seeds,
    layer, t.shape), p) (element i of t in row-major order draws tl.rand(seeds[layer], i), is kept where
    the draw >= p in float32, then scaled by float32(1/(1-p)) in float32, or float64 for a float64 t, as
    torch's mul_ by the float32 mask computes). No draws tensor: where draw, compare, scale and multiply
    were four kernels and three passes over a float32 tensor the size of t, this is one pass over t.

    t: (N, C, *spatial) of any float dtype and strides whose spatial axes collapse into one (contiguous
    and channels-last tensors and their channel slices). False (nothing done) when they do not: the
    caller multiplies by the mask tensor instead."""
    n, c, *spatial = t.shape
    # the spatial axes that index anything, innermost last: each outer stride must be the next inner
    # one's stride times its size, so that voxel s sits at s * stride_s
    axes = [(size, t.stride(2 + i)) for i, size in enumerate(spatial) if size != 1]
    stride_s = axes[-1][1] if axes else 1
    voxels = 1
    for size, stride in reversed(axes):
        if stride != stride_s * voxels:
            return False
        voxels *= size
    _check_span(tuple(t.shape), t.numel())
    if t.numel() == 0:
        return True
    block_c = min(next_power_of_2(c), 32)
    block_s = _APPLY_TILE // block_c
    s_blocks = cdiv(voxels, block_s)
    # images along axis 0 with their voxel blocks: a grid's axis 1 holds at most 65535 programs
    _philox_dropout_kernel[(n * s_blocks, cdiv(c, block_c))](
        t, seeds, layer, float(p), 1.0 / (1.0 - p), c, voxels, s_blocks, t.stride(0), t.stride(1),
        stride_s, BLOCK_S=block_s, BLOCK_C=block_c,
    )  # fmt: skip
    return True


@triton.jit
def _philox_dropout_kernel(
    t_ptr,  # (N, C, S) by strides (sn, sc, ss): S the collapsed spatial axes; scaled in place
    seeds_ptr,  # (L,) int64: one seed per layer, read here (no host copy)
    layer,  # which seed
    drop_p,  # float32: an element is kept where its draw is >= drop_p
    scale,  # float32(1 / (1 - p)): a kept element's factor
    C,
    S,  # voxels per (image, channel); N * C * S < 2**32 (the Philox counter)
    S_BLOCKS,  # blocks of BLOCK_S voxels per image: program (n * S_BLOCKS + block, channel block)
    sn,
    sc,
    ss,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid, pid_c = tl.program_id(0), tl.program_id(1)
    n = (pid // S_BLOCKS).to(tl.int64)
    s = (pid % S_BLOCKS).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    ch = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (s < S)[:, None] & (ch < C)[None, :]
    draw = (n * C + ch[None, :]) * S + s[:, None]  # row-major index of (n, ch, s): philox_uniform's
    seed = tl.load(seeds_ptr + layer)
    keep = tl.rand(seed, draw.to(tl.uint32)) >= drop_p
    factor = tl.where(keep, scale, 0.0)
    address = t_ptr + n * sn + ch[None, :].to(tl.int64) * sc + s[:, None] * ss
    value = tl.load(address, mask=mask)
    # float32 for half types and float32, float64 for float64 (Triton promotes as torch's mul_ does)
    tl.store(address, (value * factor).to(value.dtype), mask=mask)


@triton.jit
def _philox_uniform_kernel(
    seeds_ptr,  # (L,) int64: one seed per layer, read here (no host copy)
    layer,  # which seed
    out_ptr,  # (n,) float32, contiguous
    n,  # elements, < 2**32 (the Philox counter)
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + layer)
    uniform = tl.rand(seed, offsets.to(tl.uint32))
    tl.store(out_ptr + offsets, uniform, mask=offsets < n)

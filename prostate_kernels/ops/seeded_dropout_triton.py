"""The GPU draws of seeded_dropout: Philox in a Triton kernel that reads its seed from device memory.

Imported only when a mask is drawn off the CPU (`import prostate_kernels` does not import Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv

_PHILOX_SPAN = 2**32  # tl.rand's counter is uint32: one mask holds fewer elements than this
_UNIFORM_BLOCK = 1024


def philox_uniform(seeds: torch.Tensor, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Contiguous float32 (shape) on seeds' device: element i is tl.rand(seeds[layer], i), Philox 4x32
    with 10 rounds, uniform in [0, 1). One launch; the seed is read by the kernel, never by the host."""
    out = torch.empty(shape, dtype=torch.float32, device=seeds.device)
    n = out.numel()
    if n >= _PHILOX_SPAN:
        raise ValueError(
            f"dropout mask of shape {tuple(shape)}: {n} elements, at most {_PHILOX_SPAN - 1} per layer"
        )
    if n:
        _philox_uniform_kernel[(cdiv(n, _UNIFORM_BLOCK),)](seeds, layer, out, n, BLOCK=_UNIFORM_BLOCK)
    return out


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

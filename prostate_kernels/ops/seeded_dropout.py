"""Dropout whose mask is a pure function of (seed, shape, p, device): regenerated in backward, never stored.

Every implementation (the Triton dense block, its PyTorch twin and the naive torch.cat block) draws the
mask here, so that the same seeds give the same masks in all three: that is how the tests compare them
with dropout on. The distribution is that of nn.Dropout: zero with probability p, else scaled 1/(1-p).

Seeds are an int64 tensor on the block's device, one per layer (draw_seeds). The draws behind a mask:
  CPU:        torch's CPU generator (Mersenne Twister) seeded with the layer's seed, torch.rand;
  elsewhere:  Philox (tl.rand) in a Triton kernel that reads the seed from device memory.
On a GPU nothing here reads a value back to the host or draws on the CPU: the seeds come from the
device's default generator, whose draws CUDA graphs replay with fresh values, and the mask kernel takes
them where they are. A training step with dropout can therefore be captured in a CUDA graph, and each
replay draws new seeds. (Seeds drawn on the CPU are frozen into a graph at capture, and a generator
created and seeded inside a capture is outside what PyTorch's graph-safe RNG supports.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.ops.launch import cdiv

_PHILOX_SPAN = 2**32  # tl.rand's counter is uint32: one mask holds fewer elements than this
_UNIFORM_BLOCK = 1024


def draw_seeds(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(count,) int64 seeds on `device`, from its default generator (so torch.manual_seed makes runs
    repeatable); a tensor, so that torch.compile traces the draw instead of breaking the graph on a
    .tolist(), and a CUDA graph replays it with fresh values."""
    return torch.randint(0, 2**62, (count,), dtype=torch.int64, device=device)


def dropout_scale(
    seeds: torch.Tensor, layer: int, shape: tuple[int, ...], p: float, device: torch.device
) -> torch.Tensor:
    """float32 (shape) tensor of 0 (dropped) and 1/(1-p) (kept), from seeds[layer]: multiply by it to
    apply the dropout.

    Multiplying a half-precision tensor by it computes in float32 and rounds once, like F.dropout.
    In place on one tensor (uniform draw, >= p as 1.0 or 0.0, then the scale): three kernels and one
    allocation where rand >= p, .to(float32), * scale made four of each (on a GPU each torch op costs
    host time, and the dense block draws each layer's mask twice per step); the masks are the same.
    (bernoulli_ would make two kernels, but draws other masks from the same seeds: the phantom demo's
    held-out Dice went from 0.856 to 0.436 with them, a tiny model's sensitivity to its dropout draws.)
    """
    return scale_from_uniform_(dropout_uniform(seeds, layer, shape, device), p)


def dropout_uniform(
    seeds: torch.Tensor, layer: int, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The mask's draws: contiguous float32 (shape) uniform in [0, 1) from seeds[layer] (seeds: (L,)
    int64 on `device`); the Triton dense block applies the mask from these in its conv kernel's epilogue.
    On the CPU, a generator seeded with the seed; elsewhere Philox in a Triton kernel (see the module)."""
    if seeds.dtype != torch.int64 or seeds.dim() != 1 or not 0 <= layer < seeds.numel():
        raise ValueError(
            f"dropout seeds must be a 1-D int64 tensor with an entry for layer {layer}, got "
            f"{seeds.dtype} {tuple(seeds.shape)}"
        )
    if seeds.device != torch.device(device):
        raise ValueError(f"dropout seeds are on {seeds.device} but the mask is drawn on {device}")
    if torch.device(device).type == "cpu":
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seeds[layer]))
        return torch.rand(shape, generator=generator, device=device)
    return philox_uniform(seeds, layer, shape)


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


def scale_from_uniform_(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """In place: each draw becomes 1/(1-p) where it is >= p (kept), else 0 (dropped). The compare is
    float32 (p rounded to float32), as the conv kernel's epilogue does it."""
    return uniform.ge_(p).mul_(1.0 / (1.0 - p))


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

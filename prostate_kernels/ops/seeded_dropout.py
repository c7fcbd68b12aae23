"""Dropout whose mask is a pure function of (seed, shape, p, device): regenerated in backward, never stored.

Every implementation (the Triton dense block, its PyTorch twin and the naive torch.cat block) draws the
mask here, so that the same seeds give the same masks in all three: that is how the tests compare them
with dropout on. Masks come from torch's own generator (Philox on CUDA, Mersenne Twister on the CPU),
seeded per call; the distribution is that of nn.Dropout: zero with probability p, else scaled 1/(1-p).
"""

from __future__ import annotations

import torch


def draw_seeds(count: int) -> torch.Tensor:
    """(count,) int64 seeds from torch's global CPU generator (so torch.manual_seed makes runs repeatable);
    a tensor, so that torch.compile traces the draw instead of breaking the graph on a .tolist()."""
    return torch.randint(0, 2**62, (count,), dtype=torch.int64)


def dropout_scale(seed: int, shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """float32 (shape) tensor of 0 (dropped) and 1/(1-p) (kept): multiply by it to apply the dropout.

    Multiplying a half-precision tensor by it computes in float32 and rounds once, like F.dropout.
    In place on one tensor (uniform draw, >= p as 1.0 or 0.0, then the scale): three kernels and one
    allocation where rand >= p, .to(float32), * scale made four of each (on a GPU each torch op costs
    host time, and the dense block draws each layer's mask twice per step); the masks are the same.
    (bernoulli_ would make two kernels, but draws other masks from the same seeds: the phantom demo's
    held-out Dice went from 0.856 to 0.436 with them, a tiny model's sensitivity to its dropout draws.)
    """
    return scale_from_uniform_(dropout_uniform(seed, shape, device), p)


def dropout_uniform(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The mask's draws: contiguous float32 (shape) uniform in [0, 1) from a generator seeded with seed
    (the Triton dense block applies the mask from these in its conv kernel's epilogue)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device)


def scale_from_uniform_(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """In place: each draw becomes 1/(1-p) where it is >= p (kept), else 0 (dropped). The compare is
    float32 (p rounded to float32), as the conv kernel's epilogue does it."""
    return uniform.ge_(p).mul_(1.0 / (1.0 - p))

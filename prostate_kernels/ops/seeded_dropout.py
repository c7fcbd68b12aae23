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
    Two kernels (a Bernoulli draw of the kept ones, then the scale): on a GPU each torch op costs host
    time, and the dense block draws each layer's mask twice per step (forward and backward).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    keep = torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(1.0 / (1.0 - p))

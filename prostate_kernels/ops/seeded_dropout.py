"""Dropout whose mask is a pure function of (seed, shape, p, device): regenerated in backward, never stored.

Every implementation (the Triton dense block, its PyTorch twin and the naive torch.cat block) draws the
mask here, so that the same seeds give the same masks in all three: that is how the tests compare them
with dropout on. The distribution is that of nn.Dropout: zero with probability p, else scaled 1/(1-p).

Seeds are an int64 tensor on the block's device, one per layer (draw_seeds). The draws behind a mask:
  CUDA:       Philox (tl.rand) in a Triton kernel that reads the seed from device memory
              (seeded_dropout_triton, imported when first used);
  meta:       no draws (an empty tensor: meta tensors have shapes and no values);
  elsewhere:  the device's generator seeded with the layer's seed, torch.rand (the CPU: Mersenne Twister).
On a GPU nothing here reads a value back to the host or draws on the CPU: the seeds come from the
device's default generator, whose draws CUDA graphs replay with fresh values, and the mask kernel takes
them where they are. A training step with dropout can therefore be captured in a CUDA graph, and each
replay draws new seeds. (Seeds drawn on the CPU are frozen into a graph at capture, and a generator
created and seeded inside a capture is outside what PyTorch's graph-safe RNG supports.)
"""

from __future__ import annotations

import torch


def draw_seeds(count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(count,) int64 seeds on `device`, from its default generator (so torch.manual_seed makes runs
    repeatable); a tensor, so that torch.compile traces the draw instead of breaking the graph on a
    .tolist(), and a CUDA graph replays it with fresh values."""
    return torch.randint(0, 2**62, (count,), dtype=torch.int64, device=device)


def check_seeds(op: str, seeds: torch.Tensor, layer: int | None = None) -> None:
    """ValueError naming op unless seeds is a 1-D int64 tensor (with an entry for `layer` when given)."""
    if (
        seeds.dtype != torch.int64
        or seeds.dim() != 1
        or (layer is not None and not 0 <= layer < seeds.numel())
    ):
        entry = "" if layer is None else f" with an entry for layer {layer}"
        raise ValueError(
            f"{op}: seeds must be a 1-D int64 tensor{entry}, got {seeds.dtype} {tuple(seeds.shape)}"
        )


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


def apply_dropout_(t: torch.Tensor, seeds: torch.Tensor, layer: int, p: float) -> torch.Tensor:
    """In place: t (N, C, *spatial) *= dropout_scale(seeds, layer, t.shape, p, t.device), the same values
    bit for bit; returns t. Off the CPU one Triton kernel draws, compares, scales and multiplies
    (seeded_dropout_triton.philox_dropout_: no draws tensor, one launch instead of four), unless t's
    spatial strides do not collapse into one; on the CPU (torch's generator) the mask tensor is made."""
    _check_draw("apply_dropout_", seeds, layer, t.device)
    if draws_with_philox(t.device) and t.dim() >= 2:
        from prostate_kernels.ops.seeded_dropout_triton import philox_dropout_  # Triton: imported when used

        if philox_dropout_(t, seeds, layer, p):
            return t
    return t.mul_(scale_from_uniform_(_uniform(seeds, layer, tuple(t.shape), t.device), p))


def dropout_uniform(
    seeds: torch.Tensor, layer: int, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The mask's draws: contiguous float32 (shape) uniform in [0, 1) from seeds[layer] (seeds: (L,)
    int64 on `device`); the Triton dense block applies the mask from these in its conv kernel's epilogue.
    On the CPU, a generator seeded with the seed; elsewhere Philox in a Triton kernel (see the module)."""
    _check_draw("dropout_uniform", seeds, layer, device)
    return _uniform(seeds, layer, shape, device)


def _check_draw(op: str, seeds: torch.Tensor, layer: int, device: torch.device | str) -> None:
    """ValueError naming op unless seeds holds layer's seed and is on the device the mask is drawn on."""
    check_seeds(op, seeds, layer)
    if seeds.device != torch.device(device):
        raise ValueError(f"{op}: dropout seeds are on {seeds.device} but the mask is drawn on {device}")


def _uniform(seeds: torch.Tensor, layer: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """dropout_uniform's draws, its arguments already checked: Philox on CUDA; none on the meta device,
    whose tensors have a shape and no values (a forward there propagates shapes); elsewhere a generator of
    the device seeded with the seed."""
    device = torch.device(device)
    if draws_with_philox(device):
        from prostate_kernels.ops.seeded_dropout_triton import philox_uniform  # Triton: imported when used

        return philox_uniform(seeds, layer, shape)
    if device.type == "meta":
        return torch.empty(shape, dtype=torch.float32, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seeds[layer]))
    return torch.rand(shape, generator=generator, device=device)


def draws_with_philox(device: torch.device) -> bool:
    """Whether masks on `device` are drawn by the Philox kernels: on CUDA. (tools/compile_capture.py
    replaces this for its run, where meta tensors stand in for CUDA ones, to record those launches.)"""
    return device.type == "cuda"


def scale_from_uniform_(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """In place: each draw becomes 1/(1-p) where it is >= p (kept), else 0 (dropped). The compare is
    float32 (p rounded to float32), as the conv kernel's epilogue does it."""
    return uniform.ge_(p).mul_(1.0 / (1.0 - p))

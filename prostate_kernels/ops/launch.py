"""Helpers shared by the Triton launchers: autotune candidates, dot precision, output layout, conv args."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.backend import triton_interpreting
from prostate_kernels.ops.conv_geometry import ConvGeometry

INTERPRET = triton_interpreting()
INT32_SPAN = 2**31 - 2**24  # offsets below this fit int32 with room for a tile past the end
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def autotune_configs(options: list[dict], warps_stages: list[tuple[int, int]]) -> list[triton.Config]:
    """Autotuning candidates on the GPU; the first one alone in the interpreter (it cannot benchmark)."""
    if INTERPRET:
        return [triton.Config(options[0], num_warps=4)]
    return [triton.Config(o, num_warps=w, num_stages=s) for o in options for w, s in warps_stages]


def dot_setup(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    """(DOT_DTYPE, INPUT_PRECISION): half inputs keep their dtype; float32 follows cuDNN's TF32 flag."""
    if INTERPRET:
        return tl.float32, "ieee"  # the interpreter computes bfloat16 dots wrongly
    if dtype == torch.float32:
        return tl.float32, "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return _TL_DTYPES[dtype], "ieee"


def conv_args(g: ConvGeometry) -> tuple[int, ...]:
    """stride, padding, dilation per axis, in the order every conv kernel takes them."""
    return (*g.stride, *g.padding, *g.dilation)


def output_like(x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Channels-last output when x is channels-last (channel stride 1), NCDHW otherwise."""
    fmt = torch.channels_last_3d if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)


def needs_int64(*tensors: torch.Tensor, extra: tuple[int, ...] = ()) -> bool:
    """Whether a kernel over these tensors needs int64 offsets: some tensor spans (its largest element
    offset, from its sizes and strides) or holds INT32_SPAN elements or more, or some extra bound does."""
    for t in tensors:
        span = sum(
            (size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True) if size > 0
        )
        if span >= INT32_SPAN or t.numel() >= INT32_SPAN:
            return True
    return any(value >= INT32_SPAN for value in extra)


def check_voxels(op: str, *counts: int) -> None:
    """ValueError when a launch would index more voxels than int32 holds (the kernels' voxel indices)."""
    for count in counts:
        if count >= INT32_SPAN:
            raise ValueError(f"{op}: {count} voxels in one call; at most {INT32_SPAN - 1} are supported")


def prune_spilling(spilling: set[tuple[int, ...]], names: tuple[str, ...]):
    """An `early_config_prune` for triton.autotune that drops the configs `make gpu-compile` measured to
    spill registers (on sm_90a or sm_80, in some dot path or offset width) at this launch's block sizes.

    spilling: tuples of the values of `names` (block sizes, from the config or the launch's keyword
    arguments) followed by num_warps. At least one config always remains (the last one, if every
    candidate is listed: the lists are written so that this does not happen at measured launches).
    """

    def prune(configs, named_args, **kwargs):
        def key(config):
            values = {**kwargs, **config.kwargs}
            return (*(values.get(name) for name in names), config.num_warps)

        kept = [c for c in configs if key(c) not in spilling]
        return kept or configs[-1:]

    return prune

"""Helpers shared by the Triton launchers: autotune candidates, dot precision, output layout, conv args."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from prostate_kernels.backend import triton_interpreting
from prostate_kernels.ops.conv_geometry import ConvGeometry

INTERPRET = triton_interpreting()
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

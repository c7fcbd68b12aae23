"""Geometry of a 3D convolution: per-axis kernel, stride, padding, dilation; output size; checks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from prostate_kernels.integers import as_int

Triple = tuple[int, int, int]


def triple(value: int | Sequence[int], name: str, positive: bool = False) -> Triple:
    """(D, H, W) from an int or a sequence of 3 ints (Python, numpy or 0-d torch integers; bools are not
    ints here); ValueError naming `name` and the value otherwise, or when `positive` and some value is
    below 1."""
    # the hot path (every op call: nn.Conv3d's settings, 4 per conv_geometry)
    if type(value) is tuple and len(value) == 3 and all(type(v) is int for v in value):
        if not positive or min(value) >= 1:
            return cast(Triple, value)
    values: tuple[int | None, ...]
    if (single := as_int(value)) is not None:
        values = (single,) * 3
    elif (isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, str)) or hasattr(
        value, "__array__"
    ):
        values = tuple(as_int(v) for v in cast(Iterable[object], value))
    else:
        values = ()
    ints = tuple(v for v in values if v is not None)
    if len(ints) != 3 or len(values) != 3 or (positive and min(ints) < 1):
        kind = "a positive int or 3 positive ints" if positive else "an int or 3 ints"
        raise ValueError(f"{name} {value!r} must be {kind} (D, H, W)")
    return ints[0], ints[1], ints[2]


@dataclass(frozen=True)
class ConvGeometry:
    """Per-axis (D, H, W) settings of a conv3d with zero padding."""

    kernel: Triple
    stride: Triple
    padding: Triple
    dilation: Triple

    @classmethod
    def of_weight(cls, weight, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
        """The geometry of a conv whose kernel is weight's (C_out, C_in, kD, kH, kW), settings already
        checked by conv_geometry (the custom ops: their fake kernels may see symbolic sizes)."""
        settings = (weight.shape[2:], stride, padding, dilation)
        return cls(*(cast(Triple, tuple(setting)) for setting in settings))

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1] * self.kernel[2]

    def output_size(self, size: Sequence[int]) -> Triple:
        """(Do, Ho, Wo) of an input of spatial size (D, H, W): PyTorch's formula."""
        out = tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, k, st, p, d in zip(
                size, self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )
        if min(out) < 1:
            raise ValueError(
                f"input of spatial size {tuple(size)} is too small for kernel {self.kernel} with padding "
                f"{self.padding} and dilation {self.dilation}: output size would be {out}"
            )
        if out[0] * out[1] * out[2] >= 2**62:  # oneDNN's error for it named neither
            raise ValueError(
                f"padding {self.padding} makes an output of spatial size {out}: more voxels than a tensor "
                "holds"
            )
        return out  # type: ignore[return-value]


def conv_geometry(
    kernel: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
) -> ConvGeometry:
    """Checked ConvGeometry; padding may be "same" (stride 1, odd kernel) or "valid"."""
    kernel = triple(tuple(kernel), "kernel_size")
    stride = triple(stride, "stride")
    dilation = triple(dilation, "dilation")
    if min(kernel) < 1:
        raise ValueError(f"kernel_size {kernel} must be positive")
    if min(stride) < 1:
        raise ValueError(f"stride {stride} must be positive")
    if min(dilation) < 1:
        raise ValueError(f"dilation {dilation} must be positive")
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if stride != (1, 1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
            if any(k % 2 == 0 for k in kernel):
                raise ValueError(f"padding='same' with an even kernel_size {kernel} is not supported")
            padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
        else:
            raise ValueError(f"padding {padding!r} must be an int, 3 ints, 'same' or 'valid'")
    padding = triple(padding, "padding")
    if min(padding) < 0:
        raise ValueError(f"padding {padding} must be >= 0")
    return ConvGeometry(kernel, stride, padding, dilation)

"""Whether training under bf16 autocast is right on this CPU: a probe of PyTorch's bf16 conv3d backward.

Measured 2026-12-07 on an AMD EPYC (Zen 4, AVX512-BF16), torch 2.13.0+cpu and 2.11.0 (oneDNN v3.12.0):
under CPU bf16 autocast the weight gradient of a 3x3x3 conv3d (padding 1) is wrong whenever its input is
2 slices deep: 13 of the 20 such shapes tried (8 to 48 input channels, 4 or 16 outputs, 8x8 or 16x16
slices) were off by 1 to inf times the gradient's largest value, NaN where the freed memory it reads held
NaN, in NCDHW and channels-last alike. Inputs 1 or 3 slices deep, 2 rows or columns, fp32 and fp16, the
forward and the input gradient were right (errors near bf16's rounding, 4e-3). oneDNN's jit_bf16
backward_weights convolution computes it (its avx512_core variant, under ONEDNN_MAX_CPU_ISA, is as
wrong); with oneDNN off the step was 30x slower. The networks meet such inputs at the paper's patches:
the deepest features of Tiramisu 3D p3a and U-Net 3D at 16 slices, of tiramisu3d_tiny at 8, are 2 slices
deep. A training there learnt from wrong gradients, or stopped on a NaN loss "a smaller --lr may help"
would not cure, so train refuses bf16 on a CPU where this probe fails (check_bf16_training).

Another CPU (Intel's AMX picks other oneDNN kernels) may compute it right: the probe, not the CPU's
name, decides. CUDA is not concerned (cuDNN and the library's kernels).
"""

from __future__ import annotations

import functools
import math

import torch

from prostate_kernels.data.errors import ConfigError

PROBE_INPUT = (2, 24, 2, 8, 8)  # (N, C, D, H, W): 2 slices deep, one of the shapes measured wrong
PROBE_OUT_CHANNELS = 16
# relative to the gradient's largest value: right kernels err by bf16's output rounding (about 4e-3 on
# this probe); the faulty one by 1 or more
TOLERANCE = 0.05
PROBE_TEXT = "x".join(map(str, PROBE_INPUT))  # how messages name the probe: 2x24x2x8x8


def is_faulty(error: float) -> bool:
    """Whether a probe_error is past bf16's rounding: the convolution is wrong."""
    return error > TOLERANCE


@functools.cache
def bf16_conv3d_weight_grad_error() -> float:
    """probe_error(), measured once per process."""
    return probe_error()


def probe_error(device: str | torch.device = "cpu") -> float:
    """Largest error of conv3d's weight gradient under bf16 autocast on PROBE_INPUT on `device` (the CPU;
    the GPU suite asks CUDA's too, for its record), relative to the largest value of the exact gradient
    (float64 on the same bf16-rounded operands, on the CPU); inf when it is not finite. A few milliseconds
    (0.5 s when it is the process's first oneDNN convolution)."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_INPUT, generator=g)
    weight = torch.randn((PROBE_OUT_CHANNELS, PROBE_INPUT[1], 3, 3, 3), generator=g) * 0.1
    grad_y = torch.randn((PROBE_INPUT[0], PROBE_OUT_CHANNELS, *PROBE_INPUT[2:]), generator=g)
    with torch.enable_grad():  # (a caller under torch.no_grad still gets its answer)
        x_on, weight_on = x.to(device), weight.to(device).requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = torch.nn.functional.conv3d(x_on, weight_on, padding=1)
        (grad_weight,) = torch.autograd.grad(y, weight_on, grad_y.to(device, y.dtype))
        grad_weight = grad_weight.cpu()
        x64, w64 = (t.detach().to(torch.bfloat16).double() for t in (x, weight))
        w64.requires_grad_()
        y64 = torch.nn.functional.conv3d(x64, w64, padding=1)
        (exact,) = torch.autograd.grad(y64, w64, grad_y.to(torch.bfloat16).double())
    error = ((grad_weight.double() - exact).abs().max() / exact.abs().max()).item()
    return error if math.isfinite(error) else math.inf


def bf16_training_verdict() -> str:
    """The probe's verdict in a phrase, for `prostate-kernels info`'s CPU line."""
    error = bf16_conv3d_weight_grad_error()
    if is_faulty(error):
        return f"bf16 conv3d weight gradients wrong (a probe off by {error:.3g}: train refuses --amp bf16)"
    return f"bf16 conv3d weight gradients right (a probe off by {error:.2g}, bf16's rounding)"


def check_bf16_training(amp_dtype: torch.dtype | None, device: torch.device) -> None:
    """ConfigError when a training would run under bf16 autocast on a CPU whose bf16 conv3d backward
    fails the probe (the module's docstring); nothing is probed for any other dtype or device."""
    if amp_dtype != torch.bfloat16 or device.type != "cpu":
        return
    error = bf16_conv3d_weight_grad_error()
    if is_faulty(error):
        raise ConfigError(
            f"--amp bf16 on this CPU: its PyTorch ({torch.__version__}) computes wrong bf16 conv3d weight "
            f"gradients for inputs 2 slices deep (the networks' deepest features at the paper's patches; a "
            f"probe of {PROBE_TEXT} voxels was off by {error:.3g} of the gradient's "
            "largest value; oneDNN's bf16 convolution): train with --amp off on the CPU"
        )


__all__ = [
    "PROBE_INPUT",
    "PROBE_TEXT",
    "TOLERANCE",
    "bf16_conv3d_weight_grad_error",
    "bf16_training_verdict",
    "check_bf16_training",
    "is_faulty",
    "probe_error",
]

"""3D depthwise (atrous) convolution, and the fused separable inference: their public entries.

depthwise_conv3d() validates, picks the implementation (the Triton kernels of depthwise_conv3d_triton.py
or PyTorch's grouped conv3d, reference.py), applies autocast and dispatches; fused_separable_applies()
says whether SeparableConv3d's eval-mode forward can run as the one fused kernel (separable_inference).
The Triton side is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prostate_kernels import backend, reference
from prostate_kernels.ops.bn_relu_conv3d import KERNEL_DTYPES
from prostate_kernels.ops.conv_geometry import ConvGeometry, conv_geometry
from prostate_kernels.ops.tensor_subclasses import takes_tensor_subclasses

# the CPU's PyTorch path runs channels-last inputs this wide NCDHW (_pytorch_depthwise says why)
CPU_NCDHW_FROM_CHANNELS = 1024

# Under backend "auto", a CUDA x of fewer elements (N * C * D * H * W) takes PyTorch's grouped conv3d
# (NCDHW) instead of the Triton kernels. Below it our forward + backward costs about 1 ms whatever the size
# (host time) and PyTorch's whole op less. Measured forward + backward, batch 2, bf16, 3x3x3, dilation 1
# and 12, ours channels-last against PyTorch NCDHW (bench/results/2026-12-04-nvidia-h200.md): 2.1M
# elements (C=128 8x32x32) and below PyTorch 3.5-11.5x faster (H100 of 2026-11-27: 3.4-7.3x); 11.9M
# (C=728 8x32x32) 0.93x and 1.28x PyTorch's speed (H100 1.02x, 0.88x); 16.8M (C=128 16x64x64) 1.19-1.90x
# and 95M (C=728 16x64x64) 1.88-3.06x. The forward alone splits the same way. 2**23 lies between the
# sizes measured on either side; use_backend("triton") takes the kernels at every size.
TRITON_FROM_ELEMENTS = 2**23


@takes_tensor_subclasses
def depthwise_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """F.conv3d(x, weight, bias, stride, padding, dilation, groups=C) for weight (C, 1, kD, kH, kW).

    Per-axis stride, padding and dilation (atrous rates of 36 and more are fine). On CUDA (backend
    "auto" or "triton") tiled Triton kernels run forward and backward; elsewhere PyTorch's conv3d.
    Under autocast the kernels compute in the autocast dtype as conv3d does (x and the weight rounded to
    it, the output in it); the weight and bias gradients are float32 sums kept in the parameters' dtype,
    where eager autocast rounds them to the autocast dtype first.
    """
    op = "depthwise_conv3d"
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{op}: x must be 5-D (N, C, D, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight.dim() != 5 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"{op}: weight must have shape ({c}, 1, kD, kH, kW) for x with {c} channels, "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c,)):
        shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{op}: bias must have shape ({c},), got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be floating point, got {x.dtype}")
    if weight.dtype != x.dtype and backend.autocast_dtype(x.device) is None:
        raise TypeError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    geometry = conv_geometry(weight.shape[2:], stride, padding, dilation)
    geometry.output_size(x.shape[2:])
    if implementation(x) == "triton":
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16 x, got {x.dtype}")
        from prostate_kernels.ops import depthwise_conv3d_triton as triton_side

        dtype = backend.autocast_dtype(x.device)
        if dtype is not None:  # conv3d autocasts to the autocast dtype: do the same with x; the
            # weight's relayout for the kernels casts it (the float32 parameter is saved for backward and
            # its gradient stays float32), the bias is added in float32
            x = x.to(dtype)
        conv = (list(geometry.stride), list(geometry.padding), list(geometry.dilation))
        with backend.autocast_off(x.device):
            if torch.compiler.is_compiling():  # the custom op: an opaque node torch.compile can trace
                return triton_side.depthwise_conv3d_forward(x, weight, bias, *conv)
            return triton_side.DepthwiseConv3dFunction.apply(x, weight, bias, *conv)  # eager: less dispatch
    return _pytorch_depthwise(x, weight, bias, geometry)


def implementation(x: torch.Tensor) -> str:
    """What depthwise_conv3d runs for x: backend.resolve's choice ("triton" or "torch"), except that under
    "auto" a CUDA x of fewer than TRITON_FROM_ELEMENTS elements takes PyTorch ("torch")."""
    chosen = backend.resolve(x.device)
    if chosen == "triton" and backend.get_backend() == "auto" and x.numel() < TRITON_FROM_ELEMENTS:
        return "torch"
    return chosen


def runs_ncdhw(device_type: str, channels: int) -> bool:
    """Whether PyTorch's grouped conv3d (_pytorch_depthwise) takes a channels-last x of `channels`
    channels on this kind of device as NCDHW: always on CUDA, from CPU_NCDHW_FROM_CHANNELS on the CPU."""
    return device_type == "cuda" or (device_type == "cpu" and channels >= CPU_NCDHW_FROM_CHANNELS)


def _pytorch_depthwise(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geometry: ConvGeometry
) -> torch.Tensor:
    """PyTorch's grouped conv3d, in x's layout; a channels-last x where runs_ncdhw says so is computed
    NCDHW and its output handed back channels-last.

    On CUDA, cuDNN's channels-last depthwise conv3d takes 11-127x NCDHW's time for forward + backward
    (H200, bf16, batch 2, 3x3x3, dilation 1 and 12, C=128 and 728, 4x16x16 to 16x64x64: 16.4 against
    0.19 ms at C=728 4x16x16, 1039 against 8.2 ms at C=728 16x64x64; the H100 alike) and 0.64-6.1x its
    time forward, so there it always runs NCDHW (the layout copies are timed with it in
    bench/bench_depthwise.py's "ours, auto" rows below TRITON_FROM_ELEMENTS).
    PyTorch's CPU depthwise conv3d (oneDNN) is slower channels-last for wide layers. Measured forward +
    backward, batch 2, 3x3x3, rates (1, r, r), 2 cores, NCDHW with both conversions against
    channels-last: 2048 channels at 4x4x4 15.6 against 35.1 ms (rates 1, 2, 4: 2.3-2.7x slower
    channels-last), at 4x8x8 1.1-1.5x slower; 1024 channels at 4x4x4, rate 2, 1.2x slower; 728 channels
    and fewer, channels-last is as fast or up to 3x faster. DeepLabv3+ 3D's exit flow and ASPP (1024 to
    2048 channels) are such layers (bench/bench_memory_format.py measures the network's step)."""
    conv = (geometry.stride, geometry.padding, geometry.dilation)
    channels_last = torch.channels_last_3d
    if (
        runs_ncdhw(x.device.type, x.shape[1])
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=channels_last)
    ):
        # Tensor.to: a (C, 1, kD, kH, kW) weight's channels-last strides also count as contiguous, and
        # PyTorch would then still pick channels-last
        weight = weight.to(memory_format=torch.contiguous_format)
        y = reference.depthwise_conv3d(x.contiguous(), weight, bias, *conv)
        return y.to(memory_format=channels_last)
    return reference.depthwise_conv3d(x, weight, bias, *conv)


def fused_separable_applies(x: torch.Tensor, pointwise_weight: torch.Tensor) -> bool:
    """Whether the fused separable inference kernel can take x: the Triton backend, a kernel dtype shared
    with the weights, autocast off (the module also requires eval mode, no autograd, running stats)."""
    return (
        x.dim() == 5
        and x.dtype in KERNEL_DTYPES
        and pointwise_weight.dtype == x.dtype
        and backend.autocast_dtype(x.device) is None
        and backend.resolve(x.device) == "triton"
    )


@takes_tensor_subclasses
def separable_inference(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    bn1: tuple[torch.Tensor, torch.Tensor],
    pointwise_weight: torch.Tensor,
    bn2: tuple[torch.Tensor, torch.Tensor],
    geometry: ConvGeometry,
    depth_activation: bool,
) -> torch.Tensor:
    """[ReLU] -> depthwise -> BN [-> ReLU] -> 1x1x1 -> BN [-> ReLU] as one Triton kernel (eval-mode
    BatchNorms as float32 (scale, shift)); only where fused_separable_applies(x, pointwise_weight)."""
    from prostate_kernels.ops import depthwise_conv3d_triton

    return depthwise_conv3d_triton.separable_inference(
        x, depthwise_weight, *bn1, pointwise_weight, *bn2, list(geometry.stride), list(geometry.padding),
        list(geometry.dilation), depth_activation,
    )  # fmt: skip


__all__ = [
    "depthwise_conv3d",
    "fused_separable_applies",
    "implementation",
    "runs_ncdhw",
    "separable_inference",
]

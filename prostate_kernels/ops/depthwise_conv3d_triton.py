"""3D depthwise (atrous) convolution on Triton: launchers, custom ops, fused separable inference.

The ops' entries (validation, backend, autocast) are in ops/depthwise_conv3d.py; arguments are checked there.
"""

from __future__ import annotations

from typing import cast

import torch

from prostate_kernels.layout import contiguous_in, grad_like
from prostate_kernels.ops import depthwise_conv3d_kernels as kernels
from prostate_kernels.ops.conv_geometry import ConvGeometry
from prostate_kernels.ops.launch import (
    ANY,
    autotune_configs,
    bucketed_autotune,
    cdiv,
    check_voxels,
    conv_args,
    dot_setup,
    needs_int64,
    next_power_of_2,
    output_like,
    prune_spilling,
    voxel_alignment,
)
from prostate_kernels.ops.once_differentiable import once_differentiable

WGRAD_BLOCK_M = 64


# Tiles for channels-last (wide in C) and NCDHW (wide in M) tensors; the autotuner keys on the strides'
# layout through C and the dtype.
_TILES = [
    {"BLOCK_M": 64, "BLOCK_C": 32},
    {"BLOCK_M": 32, "BLOCK_C": 64},
    {"BLOCK_M": 16, "BLOCK_C": 128},
    {"BLOCK_M": 256, "BLOCK_C": 4},
    {"BLOCK_M": 128, "BLOCK_C": 8},
]
_WARPS_STAGES = [(4, 2), (8, 2)]
_fwd = bucketed_autotune(
    autotune_configs(_TILES, _WARPS_STAGES),
    ["M", "C", "KD", "KH", "KW", "sxc", "syc", "INT64", "ALIGN"],
    ("M",),
)(kernels.depthwise_conv3d_fwd_kernel)
_dgrad = bucketed_autotune(
    autotune_configs(_TILES, _WARPS_STAGES),
    ["M", "C", "KD", "KH", "KW", "sgc", "sdc", "INT64", "ALIGN"],
    ("M",),
)(kernels.depthwise_conv3d_dgrad_kernel)
# Separable configs that spill registers at some launch (measured by `make gpu-compile`, see
# bench/results/<date>-compile-report.md), as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot path, int64)
# (launch.prune_spilling): at every dot path and offset width.
_SEPARABLE_SPILLS = {
    (128, 128, 32, 4, ANY, ANY),
    (128, 128, 32, 8, ANY, ANY),
    (64, 128, 32, 4, ANY, ANY),
    (64, 128, 32, 8, ANY, ANY),
    (64, 128, 64, 4, ANY, ANY),
    # 64 output channels (first captured 2026-11-28 on channels-last activations), float32 IEEE dots only
    (128, 64, 32, 4, "fp32-ieee", ANY),
    (64, 64, 32, 8, "fp32-ieee", ANY),
}
_separable = bucketed_autotune(
    autotune_configs(
        [{"BLOCK_M": 64, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_K": 64}],
        _WARPS_STAGES,
    ),
    key=["M", "C_in", "C_out", "KD", "KH", "KW", "INPUT_PRECISION", "INT64", "ALIGN"],
    bucketed=("M",),
    prune_configs_by={
        "early_config_prune": prune_spilling(_SEPARABLE_SPILLS, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    },
)(kernels.separable_conv3d_inference_kernel)


def depthwise_forward(
    x, weight, bias, geometry: ConvGeometry, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise conv of x (N, C, D, H, W), written into `out` (any strides) when given."""
    n, c, d, h, w = x.shape
    do, ho, wo = geometry.output_size((d, h, w))
    y = output_like(x, (n, c, do, ho, wo), x.dtype) if out is None else out
    m = n * do * ho * wo
    check_voxels("depthwise_conv3d", m, n * d * h * w)
    # the weight as the kernels read it, in x's dtype (under autocast the float32 parameter, cast here)
    if _takes_halo(x, geometry):
        w_taps_first = contiguous_in(weight.reshape(c, geometry.taps).t(), x.dtype)
        _halo_depthwise(x, w_taps_first, bias, y, geometry, geometry.padding)
        return y
    w_taps = contiguous_in(weight.reshape(c, geometry.taps), x.dtype)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_C"]))

    _fwd[grid](
        x, w_taps, bias if bias is not None else w_taps, y, m, c, d, h, w, do, ho, wo,
        *x.stride(), *y.stride(), *conv_args(geometry),
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], HAS_BIAS=bias is not None,
        INT64=needs_int64(x, y), ALIGN=voxel_alignment(x, y),
    )  # fmt: skip
    return y


def depthwise_input_grad(gy, weight, x_shape, x_like: torch.Tensor, geometry: ConvGeometry) -> torch.Tensor:
    n, c, d, h, w = x_shape
    _, _, do, ho, wo = gy.shape
    gx = torch.empty_like(x_like, memory_format=torch.preserve_format)
    if _takes_halo(gy, geometry):  # the conv of gy with the taps reversed and the padding mirrored
        reversed_taps = contiguous_in(weight.reshape(c, geometry.taps).flip(1).t(), gy.dtype)
        mirrored = tuple((k - 1) * dil - p for k, dil, p in zip(geometry.kernel, geometry.dilation,
                                                                 geometry.padding, strict=True))  # fmt: skip
        _halo_depthwise(gy, reversed_taps, None, gx, geometry, mirrored)
        return gx
    m = n * d * h * w
    w_taps = contiguous_in(weight.reshape(c, geometry.taps), gy.dtype)

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(c, meta["BLOCK_C"]))

    _dgrad[grid](
        gy, w_taps, gx, m, c, d, h, w, do, ho, wo, *gy.stride(), *gx.stride(), *conv_args(geometry),
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], INT64=needs_int64(gy, gx),
        ALIGN=voxel_alignment(gy, gx),
    )  # fmt: skip
    return gx


# The halo kernels: depthwise_conv3d_halo_kernel (forward, and the input gradient as the conv of gy) and
# depthwise_conv3d_wgrad_halo_kernel. One tile each, 4 warps, no pipelining (the configurations compiled
# without spills in bench/results/2026-11-28-depthwise-halo-probe.md). They take stride 1 where the tensor
# whose halos they fill (x; gy for the input gradient) is channels-last, in any dtype (the scratch is in
# that dtype), while the fused layer's halo kernels are on (one switch:
# bn_relu_conv3d_triton.set_halo_kernels) and the halo fits HALO_MAX_ROWS (dilation 2 at 3x3x3: 768);
# other launches take the direct kernels. The weight gradient loads gy once per box, in any layout (the
# networks' backward may hand it NCDHW), except in float32: there an NCDHW gy spilled on sm_80.
_HALO_BOX = {"BOX_D": 4, "BOX_H": 4, "BOX_W": 8, "FILL_M": 128}
HALO_TILE = {**_HALO_BOX, "BLOCK_C": 32}
HALO_WGRAD_TILE = {**_HALO_BOX, "BLOCK_C": 64}
HALO_MAX_ROWS = 768


def _takes_halo(filled: torch.Tensor, geometry: ConvGeometry) -> bool:
    """Whether a launch whose halo kernel would fill halos of `filled` takes it (see above)."""
    from prostate_kernels.ops import (
        bn_relu_conv3d_triton as fused,
    )  # the halo switch and box sizes live there

    return (
        fused.HALO_KERNELS
        and geometry.stride == (1, 1, 1)
        and filled.stride(1) == 1  # the halo fills along channels
        and fused._halo_rows(_HALO_BOX, geometry) <= HALO_MAX_ROWS
    )


def _halo_grid(
    source: torch.Tensor, geometry: ConvGeometry, out_volume: tuple[int, int, int, int], tile: dict
):
    """((programs, channel blocks), scratch) of a halo kernel's persistent grid over the boxes of
    out_volume (N, Do, Ho, Wo): at most halo_programs_wanted programs in all, each with one box at least
    (the weight gradient's first box writes its row of sums), each with a scratch tile of source's dtype
    per channel block (HALO_ROWS x BLOCK_C)."""
    from prostate_kernels.ops import bn_relu_conv3d_triton as fused

    c_blocks = cdiv(source.shape[1], tile["BLOCK_C"])
    boxes = fused._halo_boxes(tile, out_volume)
    programs = max(1, min(boxes, fused.halo_programs_wanted(source.device) // c_blocks))
    rows = fused._halo_rows(tile, geometry)  # the kernel's HALO_ROWS
    scratch = torch.empty((programs * c_blocks * rows * tile["BLOCK_C"],), dtype=source.dtype,
                          device=source.device)  # fmt: skip
    return (programs, c_blocks), scratch


def _halo_constexprs(geometry: ConvGeometry, tile: dict) -> dict:
    """A halo kernel's kernel size, dilation, tile and launch settings."""
    (kd, kh, kw), (dld, dlh, dlw) = geometry.kernel, geometry.dilation
    return dict(KD=kd, KH=kh, KW=kw, DLD=dld, DLH=dlh, DLW=dlw, num_warps=4, num_stages=1, **tile)


def _halo_depthwise(
    source, w_taps_first, bias, out, geometry: ConvGeometry, padding: tuple[int, ...]
) -> None:
    """out (N, C, Do, Ho, Wo) = the stride-1 depthwise conv of source (N, C, D, H, W) with (taps, C)
    weights and `padding` (the input gradient's may be negative), through depthwise_conv3d_halo_kernel."""
    n, c, d, h, w = source.shape
    do, ho, wo = out.shape[2:]
    grid, scratch = _halo_grid(source, geometry, (n, do, ho, wo), HALO_TILE)
    kernels.depthwise_conv3d_halo_kernel[grid](
        source, w_taps_first, bias if bias is not None else w_taps_first, out, scratch, n, c, d, h, w,
        do, ho, wo, *source.stride(), *out.stride(), *padding, geometry.taps, HAS_BIAS=bias is not None,
        INT64=needs_int64(source, out, extra=(scratch.numel(),)), ALIGN=voxel_alignment(source, out),
        **_halo_constexprs(geometry, HALO_TILE),
    )  # fmt: skip


def _halo_weight_grad(x, gy, geometry: ConvGeometry, with_bias: bool) -> torch.Tensor:
    """The (programs, taps + 1, C) partial sums through depthwise_conv3d_wgrad_halo_kernel (every program
    writes its row)."""
    n, c, d, h, w = x.shape
    do, ho, wo = gy.shape[2:]
    grid, scratch = _halo_grid(x, geometry, (n, do, ho, wo), HALO_WGRAD_TILE)  # boxes of gy
    partial = torch.empty((grid[0], geometry.taps + 1, c), dtype=torch.float32, device=x.device)
    kernels.depthwise_conv3d_wgrad_halo_kernel[grid](
        x, gy, partial, scratch, n, c, d, h, w, do, ho, wo, *x.stride(), *gy.stride(), *geometry.padding,
        geometry.taps, HAS_BIAS=with_bias,
        INT64=needs_int64(x, gy, extra=(partial.numel(), scratch.numel())), ALIGN=voxel_alignment(x, gy),
        **_halo_constexprs(geometry, HALO_WGRAD_TILE),
    )  # fmt: skip
    return partial


def depthwise_weight_grad(
    x, gy, geometry: ConvGeometry, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of weight (C, 1, kD, kH, kW) float32, any strides: backward_impl's grad_like lays it out as the
    weight; grad of bias (C,) float32 or None)."""
    n, c, d, h, w = x.shape
    # float32 with a gy not channels-last: 255 registers and 60-72 B spilled on sm_80 (sweep of 2026-12-03)
    if _takes_halo(x, geometry) and (x.dtype != torch.float32 or gy.stride(1) == 1):
        sums = _halo_weight_grad(x, gy, geometry, with_bias).sum(dim=0)  # the programs', in a fixed order
        return _weight_and_bias_grads(sums, geometry, with_bias)
    _, _, do, ho, wo = gy.shape
    m = n * do * ho * wo
    block_c = 64 if x.stride(1) == 1 else 16
    # enough programs to fill the GPU; each one's gy chunk (M_PER_PROGRAM x BLOCK_C) stays in L2 across taps
    per_program = max(WGRAD_BLOCK_M, min(4096, cdiv(m, 256)) // WGRAD_BLOCK_M * WGRAD_BLOCK_M)
    programs = cdiv(m, per_program)
    partial = torch.empty((programs, geometry.taps + 1, c), dtype=torch.float32, device=x.device)
    grid = (programs, cdiv(c, block_c))
    kernels.depthwise_conv3d_wgrad_kernel[grid](
        x, gy, partial, m, per_program, c, d, h, w, do, ho, wo, *x.stride(), *gy.stride(),
        *conv_args(geometry),
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], HAS_BIAS=with_bias,
        INT64=needs_int64(x, gy, extra=(partial.numel(),)), ALIGN=voxel_alignment(x, gy),
        BLOCK_M=WGRAD_BLOCK_M, BLOCK_C=block_c,
    )  # fmt: skip
    sums = partial.sum(dim=0)  # (taps + 1, C): the final reduction over programs
    return _weight_and_bias_grads(sums, geometry, with_bias)


def _weight_and_bias_grads(sums: torch.Tensor, geometry: ConvGeometry, with_bias: bool):
    """(grad weight, grad bias or None) from the (taps + 1, C) sums (the last row: the bias's): the weight's
    a (C, 1, kD, kH, kW) view, which backward_impl's grad_like copies once into the weight's layout."""
    grad_w = sums[: geometry.taps].t().unflatten(1, geometry.kernel).unsqueeze(1)
    return grad_w, (sums[geometry.taps] if with_bias else None)


# The op as torch.library custom ops with fake kernels and autograd (see bn_relu_conv3d_triton.py): opaque
# nodes that torch.compile traces through. A gradient that is not wanted comes back as an empty tensor.


def forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """The op's forward with its conv settings as int lists (the kernel size is the weight's)."""
    return depthwise_forward(x, weight, bias, ConvGeometry.of_weight(weight, stride, padding, dilation))


depthwise_conv3d_forward = torch.library.custom_op(
    "prostate_kernels::depthwise_conv3d_forward", forward_impl, mutates_args=()
)


@depthwise_conv3d_forward.register_fake
def _(x, weight, bias, stride, padding, dilation):
    n, c, *size = x.shape
    return output_like(
        x, (n, c, *ConvGeometry.of_weight(weight, stride, padding, dilation).output_size(size)), x.dtype
    )


def backward_impl(gy, x, weight, stride, padding, dilation, has_bias, needs) -> list[torch.Tensor | None]:
    """[grad x, grad weight, grad bias], None where needs[i] is False or there is no bias (grad weight
    and grad bias are views of one sum)."""
    geometry = ConvGeometry.of_weight(weight, stride, padding, dilation)
    grads: list[torch.Tensor | None] = [None] * 3
    if needs[0]:
        grads[0] = depthwise_input_grad(gy, weight, x.shape, x, geometry)
    if needs[1] or needs[2]:
        gw, gb = depthwise_weight_grad(x, gy, geometry, has_bias)
        grads[1] = grad_like(gw, weight) if needs[1] else None
        grads[2] = gb.to(weight.dtype) if needs[2] and gb is not None else None
    return grads


@torch.library.custom_op("prostate_kernels::depthwise_conv3d_backward", mutates_args=())
def depthwise_conv3d_backward(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    has_bias: bool,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """backward_impl as a custom op: (grad x, grad weight, grad bias), each empty where needs[i] is False;
    grad bias copied out of the weight's sums, whose last row it is (a custom op's outputs never alias,
    and each starts its own storage, as its fake kernel's do: torch.library.opcheck compares offsets)."""
    grads = backward_impl(gy, x, weight, stride, padding, dilation, has_bias, needs)
    if grads[2] is not None:
        grads[2] = grads[2].clone()
    filled = tuple(g if g is not None else x.new_empty((0,)) for g in grads)
    return cast(tuple[torch.Tensor, torch.Tensor, torch.Tensor], filled)


@depthwise_conv3d_backward.register_fake
def _(gy, x, weight, stride, padding, dilation, has_bias, needs):
    wanted = (
        torch.empty_like(x, memory_format=torch.preserve_format),
        torch.empty_like(weight),  # grad_like's strides
        weight.new_empty((weight.shape[0] if has_bias else 0,)),
    )
    return tuple(t if need else x.new_empty((0,)) for t, need in zip(wanted, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.settings = (stride, padding, dilation, bias is not None)


def _gradients(ctx, gy, backward) -> tuple:
    x, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grads = backward(gy, x, weight, *ctx.settings, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None)


def _backward(ctx, gy):
    return _gradients(ctx, gy, torch.ops.prostate_kernels.depthwise_conv3d_backward)


depthwise_conv3d_forward.register_autograd(_backward, setup_context=_setup_context)


class DepthwiseConv3dFunction(torch.autograd.Function):
    """The same op for eager execution, as FusedBNReLUConv3d is for the fused layer: the same forward and
    backward functions without the custom ops' dispatch (and without copying the weight and bias
    gradients apart). The entry picks the custom op only while torch.compile traces."""

    @staticmethod
    def forward(ctx, *inputs):
        y = forward_impl(*inputs)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    @once_differentiable(
        "depthwise_conv3d",
        'under prostate_kernels.use_backend("torch") it is grouped conv3d and can be differentiated twice',
    )
    def backward(ctx, gy):
        return _gradients(ctx, gy, backward_impl)


@torch.library.custom_op("prostate_kernels::separable_conv3d_inference", mutates_args=())
def separable_inference(
    x: torch.Tensor,
    depthwise_weight: torch.Tensor,
    bn1_scale: torch.Tensor,
    bn1_shift: torch.Tensor,
    pointwise_weight: torch.Tensor,
    bn2_scale: torch.Tensor,
    bn2_shift: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    depth_activation: bool,
) -> torch.Tensor:
    """[ReLU] -> depthwise -> BN [-> ReLU] -> 1x1x1 -> BN [-> ReLU] in one kernel (eval-mode BatchNorms
    given as float32 (scale, shift)); the depthwise output is never written. A custom op (inference only:
    no autograd) so that torch.compile traces through it."""
    geometry = ConvGeometry.of_weight(depthwise_weight, stride, padding, dilation)
    bn1, bn2 = (bn1_scale, bn1_shift), (bn2_scale, bn2_shift)
    n, c_in, d, h, w = x.shape
    c_out = pointwise_weight.shape[0]
    do, ho, wo = geometry.output_size((d, h, w))
    y = output_like(x, (n, c_out, do, ho, wo), x.dtype)
    m = n * do * ho * wo
    check_voxels("separable_conv3d", m, n * d * h * w)
    dot_dtype, precision = dot_setup(x.dtype)
    pw = contiguous_in(pointwise_weight.reshape(c_out, c_in).t(), x.dtype)  # (C_in, C_out)
    block_n = max(16, min(128, next_power_of_2(c_out)))

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(c_out, block_n))

    _separable[grid](
        x, depthwise_weight.reshape(c_in, geometry.taps).contiguous(), bn1[0], bn1[1], pw, bn2[0], bn2[1], y,
        m, c_in, c_out, d, h, w, do, ho, wo, *x.stride(), *y.stride(), *conv_args(geometry),
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2],
        RELU_IN=not depth_activation, RELU_MID=depth_activation,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, INT64=needs_int64(x, y), ALIGN=voxel_alignment(x, y),
        BLOCK_N=block_n,
    )  # fmt: skip
    return y


@separable_inference.register_fake
def _(x, depthwise_weight, bn1_scale, bn1_shift, pointwise_weight, bn2_scale, bn2_shift, stride, padding,
      dilation, depth_activation):  # fmt: skip
    n, _, *size = x.shape
    out_size = ConvGeometry.of_weight(depthwise_weight, stride, padding, dilation).output_size(size)
    return output_like(x, (n, pointwise_weight.shape[0], *out_size), x.dtype)

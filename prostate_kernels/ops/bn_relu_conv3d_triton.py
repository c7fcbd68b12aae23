"""Fused BatchNorm -> ReLU -> Conv3d: launchers of the Triton kernels and the custom ops over them.

Forward: batch statistics (training) -> conv whose loads apply scale/shift + ReLU: at stride 1 the halo
kernel (each input element normalised once per output box, into a per-program scratch tile that the 27
taps read), otherwise the direct kernel (normalised at every tap). Backward: weight and bias gradients
(one kernel: halo or direct, as the forward; per-program partial sums added in a fixed order), input
gradient through conv, ReLU mask and BatchNorm with the per-channel reductions in its epilogue (one
kernel, halo or direct: per-box or per-program partial sums, then one fixed-order sum, so that every
gradient is the same from run to run), then, in training mode, the batch-statistics term (one
elementwise kernel). No kernel of forward or backward uses atomics. Saved for backward: the input x
itself and per-channel vectors, nothing else.
The op's entry (validation, backend, autocast) is ops/bn_relu_conv3d.py; arguments are checked there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import triton.language as tl

from prostate_kernels.layout import contiguous_in, grad_like
from prostate_kernels.ops import bn_relu_conv3d_halo_kernels as halo_jit
from prostate_kernels.ops import bn_relu_conv3d_kernels as kernels
from prostate_kernels.ops.batch_norm import given_stats_grads
from prostate_kernels.ops.channel_stats import batch_norm_stats, fold_batch_norm_into
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
    torch_dtype,
)
from prostate_kernels.ops.once_differentiable import once_differentiable

# Configs that spill registers at some launch, measured by `make gpu-compile` (every launch of Tiramisu
# 3D p3a, DeepLabv3+ 3D and a DenseNet-BC block, every dot path, int32 and int64 offsets, sm_90a and
# sm_80; report: bench/results/<date>-compile-report.md): pruned at the launches of their dot path and
# offset width (launch.prune_spilling; ANY: all of them).
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, dot path, int64)
_FWD_SPILLS = {
    (128, 16, 64, 4, ANY, ANY), (128, 16, 64, 8, ANY, ANY), (128, 64, 64, 4, ANY, ANY),
    (128, 16, 32, 4, ANY, ANY), (128, 64, 32, 8, ANY, ANY),  # these two: 8 B on sm_80 (the flat K loop)
    (128, 32, 64, 4, "fp16", ANY),  # 16 B on sm_80
    (64, 16, 32, 4, "fp32-ieee", True),  # 8 B on sm_80 with the dense block's dropout epilogue
}  # fmt: skip
_DGRAD_SPILLS = {
    (128, 64, 16, 4, ANY, ANY), (128, 64, 16, 8, ANY, ANY), (64, 64, 16, 4, ANY, ANY),
    (128, 32, 32, 4, ANY, ANY), (128, 64, 32, 4, ANY, ANY), (128, 64, 32, 8, ANY, ANY),
    (128, 32, 16, 8, "fp32-ieee", ANY),  # 4 B on sm_90a since the zero rows of the partial sums (2026-11-28)
}  # fmt: skip
# (BLOCK_M, BLOCK_CI, BLOCK_CO, warps, dot path, int64). At the dense layers' C_out = 16 the weight
# gradient's tensor-core dot is (BLOCK_CI x BLOCK_M) @ (BLOCK_M x 16): sm_90a's wgmma needs BLOCK_CI >= 64
# (64 rows per warpgroup), and BLOCK_CI = 32 falls back to Ampere's mma.sync. The 64- and 128-channel
# tiles spill only with float32 IEEE dots or int64 offsets, so they stay candidates elsewhere.
_WGRAD_SPILLS = {
    (128, 32, 16, 8, "fp32-ieee", ANY),  # 8 B on sm_90a
    (64, 64, 16, 4, ANY, True),  # 4-12 B
    (64, 128, 16, 4, ANY, True),  # 492 B bf16, 864 B TF32 on sm_90a
    (64, 128, 16, 8, "fp32-ieee", True),  # 40-52 B
    (32, 128, 16, 4, ANY, ANY),  # fp32-ieee 4 B int32, 56 B int64 on sm_90a; bf16, fp16, TF32 4 B on sm_80
    (64, 128, 32, 8, "fp32-ieee", ANY),  # 16 B on sm_90a
    (64, 128, 64, 4, "fp32-ieee", ANY), (64, 128, 64, 4, "fp32-tf32", ANY),  # 4-204 B
    (32, 128, 64, 4, "fp32-tf32", ANY),  # 36 B on sm_80
    (64, 32, 64, 4, ANY, ANY),  # 4 B on sm_90a with TF32 (the partial sums stored in the weight's layout)
    (128, 32, 64, 8, "bf16", ANY), (128, 32, 64, 8, "fp16", ANY),  # 8 B on sm_80
    # since the unsigned voxel decode (2026-11-28; 4 B unless said): int64 launches
    (128, 32, 16, 4, ANY, True),  # bf16/fp16 on sm_90a; TF32 16 B, fp32-ieee 28 B on sm_80
    (128, 32, 16, 8, "fp32-tf32", True), (64, 32, 16, 4, "fp32-ieee", True),
    (32, 128, 16, 8, "fp32-ieee", True),
    (32, 128, 32, 8, "fp32-ieee", ANY),  # sm_90a, int32
}  # fmt: skip

WARPS_STAGES = [(4, 3), (8, 3)]
FWD_TILES = [{"BLOCK_M": 128, "BLOCK_K": 32}, {"BLOCK_M": 64, "BLOCK_K": 32}, {"BLOCK_M": 128, "BLOCK_K": 64}]
DGRAD_TILES = [
    {"BLOCK_M": 128, "BLOCK_K": 16},
    {"BLOCK_M": 64, "BLOCK_K": 16},
    {"BLOCK_M": 128, "BLOCK_K": 32},
]
# the first: the interpreter's (and the default); the 64- and 128-channel tiles are the wgmma ones at C_out 16
WGRAD_TILES = [
    {"BLOCK_M": 128, "BLOCK_CI": 32}, {"BLOCK_M": 64, "BLOCK_CI": 32}, {"BLOCK_M": 64, "BLOCK_CI": 64},
    {"BLOCK_M": 64, "BLOCK_CI": 128}, {"BLOCK_M": 32, "BLOCK_CI": 128},
]  # fmt: skip

_fwd = bucketed_autotune(
    autotune_configs(FWD_TILES, WARPS_STAGES),
    key=["C_in", "C_out", "M", "KD", "KH", "KW", "DOT_DTYPE", "INPUT_PRECISION", "INT64"],
    bucketed=("C_in", "M"),
    prune_configs_by={"early_config_prune": prune_spilling(_FWD_SPILLS, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))},
)(kernels.bn_relu_conv3d_fwd_kernel)

_dgrad = bucketed_autotune(
    autotune_configs(DGRAD_TILES, WARPS_STAGES),
    key=["C_in", "C_out", "M", "KD", "KH", "KW", "DOT_DTYPE", "INPUT_PRECISION", "STORE_GZ", "INT64"],
    bucketed=("C_in", "M"),
    restore_value=["gx_ptr"],
    prune_configs_by={"early_config_prune": prune_spilling(_DGRAD_SPILLS, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))},
)(kernels.bn_relu_conv3d_dgrad_kernel)

_wgrad = bucketed_autotune(
    autotune_configs(WGRAD_TILES, WARPS_STAGES),
    key=["C_in", "C_out", "M", "KH", "KW", "DOT_DTYPE", "INPUT_PRECISION", "INT64"],
    bucketed=("C_in", "M"),
    prune_configs_by={
        "early_config_prune": prune_spilling(_WGRAD_SPILLS, ("BLOCK_M", "BLOCK_CI", "BLOCK_CO"))
    },
)(kernels.bn_relu_conv3d_wgrad_kernel)

# The halo forward (stride 1): output boxes (BOX_D, BOX_H, BOX_W) of 128 voxels, 32 channels per halo fill;
# the first the default. Also compiled and counted (sm_90a SASS, tools/sass_loops.py) and dropped: 32
# channels x 4x8x8 boxes (no fewer instructions per voxel, scratch 40 KB per program) and 64 channels x
# 4x4x8 (its tap loop stayed a loop: more instructions per channel, scratch 49 KB per program).
HALO_FILL_M = 128  # halo voxels normalised per step of the fill
HALO_TILES = [
    {"BOX_D": 4, "BOX_H": 4, "BOX_W": 8, "BLOCK_K": 32, "FILL_M": HALO_FILL_M},
    {"BOX_D": 2, "BOX_H": 8, "BOX_W": 8, "BLOCK_K": 32, "FILL_M": HALO_FILL_M},
]
# Pipelined (num_stages 3), the taps' window loads become cp.async.cg, which bypasses L1: every tap then
# re-reads its window from L2. Unpipelined (1) they are ld.global, cached in L1. Which is faster only a
# GPU can tell (the tap windows total 27x the input's bytes at 3x3x3), so both are candidates.
HALO_WARPS_STAGES = [(4, 3), (8, 3), (4, 1)]  # (8, 1) spilled on sm_80 at every dot path
# (BOX_D, BOX_H, BOX_W, BLOCK_N, num_stages, warps, dot path, int64), as _FWD_SPILLS (4-84 B, 128 registers)
_HALO_SPILLS = {
    (4, 4, 8, 16, 3, 4, "fp32-ieee", ANY), (2, 8, 8, 16, 3, 4, "fp32-ieee", ANY),  # sm_80, and sm_90a
    (4, 4, 8, 16, 3, 8, "fp32-ieee", True), (2, 8, 8, 16, 3, 8, "fp32-ieee", True),  # sm_80
}  # fmt: skip
# The halo weight gradient: one tile (BLOCK_CO the launch's), its warps and stages autotuned. Its spills
# (BLOCK_CO, num_stages, warps, dot path, int64), all with float32 dots (40-420 B, 255 registers): the
# float32 IEEE launches with int64 offsets spilled at every candidate and take the direct kernel instead.
HALO_WGRAD_TILE = {"BOX_D": 4, "BOX_H": 4, "BOX_W": 8, "BLOCK_CI": 32, "FILL_M": HALO_FILL_M}
_HALO_WGRAD_SPILLS = {
    (16, 3, 8, "fp32-ieee", ANY), (32, 3, 4, "fp32-ieee", ANY),
    (16, 1, 4, "fp32-tf32", True), (16, 3, 4, "fp32-tf32", True),
    (64, 1, 4, "fp32-ieee", ANY), (64, 3, 4, "fp32-ieee", ANY),
    (64, 1, 4, "fp32-tf32", ANY), (64, 3, 4, "fp32-tf32", ANY),
}  # fmt: skip
# The halo input gradient: one tile, warps and stages autotuned; its partial sums have a row per box, so
# every candidate must have the same boxes. Its blocks of input channels are at most HALO_DGRAD_BLOCK_N:
# with 64 the epilogue (a 128 x 64 tile of x, gz and xhat beside the accumulator) spilled 20-376 B at 87
# of the kernel's 312 captured variants, every 4-warp bf16 and fp16 one among them.
HALO_DGRAD_TILE = {"BOX_D": 4, "BOX_H": 4, "BOX_W": 8, "BLOCK_K": 16, "FILL_M": HALO_FILL_M}
HALO_DGRAD_BLOCK_N = 32
# Its spills (BLOCK_N, num_stages, warps, dot path, int64), all with float32 dots (8-24 B); with float32
# IEEE dots and int64 offsets every candidate spilled, and those launches take the direct kernel.
_HALO_DGRAD_SPILLS = {
    (32, 3, 8, "fp32-tf32", True), (16, 3, 8, "fp32-ieee", ANY), (32, 3, 4, "fp32-ieee", True),
    (32, 3, 8, "fp32-ieee", True), (32, 1, 4, "fp32-ieee", True),
}  # fmt: skip
HALO_KERNELS = True  # stride 1 takes the halo kernels (forward and both gradients); set_halo_kernels()


def _takes_halo(geometry: ConvGeometry) -> bool:
    """Whether this conv runs through the halo kernels (stride 1, unless direct_kernels() is on)."""
    return HALO_KERNELS and geometry.stride == (1, 1, 1)


def _gradient_takes_halo(geometry: ConvGeometry, dot_dtype: tl.dtype, precision: str, int64: bool) -> bool:
    """_takes_halo for the two gradients, except with float32 IEEE dots and int64 offsets: both halo
    gradient kernels spilled at every candidate there (compile sweeps), so those launches take the direct
    kernels."""
    return _takes_halo(geometry) and not (precision == "ieee" and dot_dtype == tl.float32 and int64)


def set_halo_kernels(enabled: bool) -> bool:
    """From now on stride-1 convs take the halo kernels (True, the default) or the direct ones (False, as
    for other strides); returns the setting it replaces. For a whole process, e.g. a GPU run whose halo
    kernels failed their checks (bench/gpu_suite.py --direct-kernels); direct_kernels() and halo_kernels()
    set it for a block."""
    global HALO_KERNELS
    previous, HALO_KERNELS = HALO_KERNELS, bool(enabled)
    return previous


@contextlib.contextmanager
def _halo_kernels_set(enabled: bool) -> Iterator[None]:
    previous = set_halo_kernels(enabled)
    try:
        yield
    finally:
        set_halo_kernels(previous)


def direct_kernels() -> contextlib.AbstractContextManager[None]:
    """Within the block every forward, weight gradient and input gradient takes the direct kernel
    (bn_relu_conv3d_fwd_kernel, _wgrad_kernel, _dgrad_kernel), stride 1 included: to compare the two kinds
    (bench, GPU checks, tests)."""
    return _halo_kernels_set(False)


def conv_kernels_in_use() -> str:
    """Which kernels stride-1 convs take now, in words (the benchmarks' result headers say it)."""
    if HALO_KERNELS:
        return "halo kernels for stride 1 (the default), direct for other strides"
    return "direct kernels for every stride (set_halo_kernels(False))"


def halo_kernels() -> contextlib.AbstractContextManager[None]:
    """Within the block stride 1 takes the halo kernels even where set_halo_kernels(False) turned them off
    (the GPU checks and tile timings of the halo kernels themselves)."""
    return _halo_kernels_set(True)


_wgrad_halo = bucketed_autotune(
    autotune_configs([HALO_WGRAD_TILE], HALO_WARPS_STAGES),
    key=["C_in", "C_out", "Do", "Ho", "Wo", "KD", "KH", "KW", "DOT_DTYPE", "INPUT_PRECISION", "INT64"],
    bucketed=("C_in", "Do", "Ho", "Wo"),
    prune_configs_by={"early_config_prune": prune_spilling(_HALO_WGRAD_SPILLS, ("BLOCK_CO", "num_stages"))},
)(halo_jit.bn_relu_conv3d_wgrad_halo_kernel)

_dgrad_halo = bucketed_autotune(
    autotune_configs([HALO_DGRAD_TILE], HALO_WARPS_STAGES),
    key=[
        "C_in",
        "C_out",
        "D",
        "H",
        "W",
        "KD",
        "KH",
        "KW",
        "DOT_DTYPE",
        "INPUT_PRECISION",
        "STORE_GZ",
        "INT64",
    ],
    bucketed=("C_in", "D", "H", "W"),
    restore_value=["gx_ptr"],
    prune_configs_by={"early_config_prune": prune_spilling(_HALO_DGRAD_SPILLS, ("BLOCK_N", "num_stages"))},
)(halo_jit.bn_relu_conv3d_dgrad_halo_kernel)

_fwd_halo = bucketed_autotune(
    autotune_configs(HALO_TILES, HALO_WARPS_STAGES),
    key=["C_in", "C_out", "Do", "Ho", "Wo", "KD", "KH", "KW", "DOT_DTYPE", "INPUT_PRECISION", "INT64"],
    bucketed=("C_in", "Do", "Ho", "Wo"),
    prune_configs_by={
        "early_config_prune": prune_spilling(
            _HALO_SPILLS, ("BOX_D", "BOX_H", "BOX_W", "BLOCK_N", "num_stages")
        )
    },
)(halo_jit.bn_relu_conv3d_fwd_halo_kernel)

DGRAD_MIN_BLOCK_M = min(tile["BLOCK_M"] for tile in DGRAD_TILES)  # sizes the input gradient's partial sums
FINALIZE_BLOCK_M = 64
FINALIZE_BLOCK_C = 32
SCRATCH_BYTES = 64 * 2**20  # bound of the float32 gz scratch of the training-mode input gradient


def _block_for(channels: int) -> int:
    """A dot-compatible (>= 16, power of two) block covering up to 64 channels."""
    return max(16, min(64, next_power_of_2(channels)))


def weight_taps(weight: torch.Tensor, order: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The conv weight permuted to `order` and made contiguous in dtype: one copy, the cast to the autocast
    dtype included (the float32 parameter is read once), none where the permuted weight already is both;
    the kernels index it as (taps, rows, cols) from its pointer, so no reshape is needed."""
    return contiguous_in(weight.permute(order), dtype)


def conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    geometry: ConvGeometry,
    compute_dtype: torch.dtype,
    out: torch.Tensor | None = None,
    dropout: tuple[torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """y = conv3d(relu(x * scale + shift), weight) + bias, written into `out` (any strides) when given.
    dropout: (uniform, p), y's dropout applied as seeded_dropout.scale_from_uniform_ does, from the
    contiguous float32 draws `uniform` shaped like y (the dense block's seeded masks)."""
    n, c_in, d, h, w = x.shape
    c_out = weight.shape[0]
    do, ho, wo = geometry.output_size((d, h, w))
    if out is None:
        out = output_like(x, (n, c_out, do, ho, wo), compute_dtype)
    dot_dtype, precision = dot_setup(compute_dtype)
    # (C_out, C_in, kd, kh, kw) -> (taps, C_in, C_out): each K-row of the weight tile is contiguous
    w_taps = weight_taps(weight, (2, 3, 4, 1, 0), compute_dtype)
    m = n * do * ho * wo
    check_voxels("bn_relu_conv3d", m, n * d * h * w)
    block_n = _block_for(c_out)
    uniform, p = dropout if dropout is not None else (scale, 0.0)
    if dropout is not None and (
        uniform.shape != out.shape or not uniform.is_contiguous() or uniform.dtype != torch.float32
    ):
        raise ValueError(f"conv_forward: dropout draws {uniform.dtype} {tuple(uniform.shape)} must be "
                         f"contiguous float32 shaped like the output {tuple(out.shape)}")  # fmt: skip

    if _takes_halo(geometry):
        _halo_forward(x, w_taps, bias, scale, shift, out, uniform, p, dropout is not None, geometry,
                      (do, ho, wo), dot_dtype, precision, block_n)  # fmt: skip
        return out

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]), cdiv(c_out, block_n))

    _fwd[grid](
        x, w_taps, bias if bias is not None else scale, scale, shift, out, uniform, p, 1.0 / (1.0 - p),
        m, c_in, c_out, d, h, w, do, ho, wo, *x.stride(), *out.stride(), *conv_args(geometry),
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], HAS_BIAS=bias is not None,
        DROPOUT=dropout is not None, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        INT64=needs_int64(x, out, uniform), BLOCK_N=block_n,
    )  # fmt: skip
    return out


def _halo_rows(tile: dict, geometry: ConvGeometry) -> int:
    """Rows of one program's scratch tile (bn_relu_conv3d_fwd_halo_kernel's HALO_ROWS) for a tile."""
    halo = 1
    for box, k, dil in zip((tile["BOX_D"], tile["BOX_H"], tile["BOX_W"]), geometry.kernel, geometry.dilation,
                           strict=True):  # fmt: skip
        halo *= box + (k - 1) * dil
    return cdiv(halo, tile["FILL_M"]) * tile["FILL_M"]


def _halo_forward(x, w_taps, bias, scale, shift, out, uniform, p, dropout, geometry, out_size, dot_dtype,
                  precision, block_n) -> None:  # fmt: skip
    """conv_forward through bn_relu_conv3d_fwd_halo_kernel (stride 1): a persistent grid of at most
    halo_programs_wanted programs per block of output channels, each with its scratch tile (one buffer
    sized for the largest candidate tile, so that the autotuner may launch any of them)."""
    n, c_in = x.shape[:2]
    c_out = out.shape[1]
    do, ho, wo = out_size
    n_blocks = cdiv(c_out, block_n)
    wanted = halo_programs_wanted(x.device)

    def programs(tile: dict) -> int:
        return min(wanted, _halo_boxes(tile, (n, do, ho, wo)))

    elements = max(programs(t) * _halo_rows(t, geometry) * t["BLOCK_K"] for t in HALO_TILES) * n_blocks
    scratch = torch.empty((elements,), dtype=torch_dtype(dot_dtype), device=x.device)

    def grid(meta):
        if programs(meta) * _halo_rows(meta, geometry) * meta["BLOCK_K"] * n_blocks > elements:
            raise ValueError(f"bn_relu_conv3d halo forward: tile {meta} needs more scratch than the largest "
                             "of HALO_TILES, which sized it")  # fmt: skip
        return (programs(meta), n_blocks)

    _fwd_halo[grid](
        x, w_taps, bias if bias is not None else scale, scale, shift, out, uniform, scratch, p,
        1.0 / (1.0 - p), n, c_in, c_out, *x.shape[2:], do, ho, wo, *x.stride(), *out.stride(),
        *geometry.padding, geometry.taps,
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], DLD=geometry.dilation[0],
        DLH=geometry.dilation[1], DLW=geometry.dilation[2], HAS_BIAS=bias is not None,
        DROPOUT=dropout, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
        INT64=needs_int64(x, out, uniform, extra=(scratch.numel(),)), BLOCK_N=block_n,
    )  # fmt: skip


def halo_programs_wanted(device: torch.device) -> int:
    """Programs per block of output channels of the halo forward's persistent grid: 4 per SM on a GPU (their
    scratch tiles stay in L2), 4 elsewhere (the interpreter runs them one after another)."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def conv_weight_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    geometry: ConvGeometry,
    compute_dtype: torch.dtype,
    with_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of weight (C_out, C_in, kd, kh, kw) float32 contiguous, grad of bias (C_out,) float32 or
    None)."""
    n, c_in, d, h, w = x.shape
    _, c_out, do, ho, wo = gy.shape
    m = n * do * ho * wo
    dot_dtype, precision = dot_setup(compute_dtype)
    block_co = _block_for(c_out)
    if _gradient_takes_halo(geometry, dot_dtype, precision, needs_int64(x, gy)):
        return _halo_weight_grad(x, gy, scale, shift, geometry, dot_dtype, precision, block_co, with_bias)
    # Split the voxel reduction so that the grid fills the GPU (each split writes its partial sums).
    tiles = geometry.taps * cdiv(c_in, 64) * cdiv(c_out, block_co)
    splits = max(1, min(cdiv(wgrad_programs_wanted(x.device), tiles), cdiv(m, 256)))
    m_per_split = cdiv(cdiv(m, splits), 256) * 256  # a multiple of every BLOCK_M
    splits = cdiv(m, m_per_split)
    # Each split writes its partial sums (every element: the splits cover M, every tile is stored), in
    # the weight's layout: their sum is the gradient as autograd keeps it (no copy to the parameter's
    # strides when it is stored, as a permuted sum needed).
    gw = torch.empty((splits, c_out, c_in, *geometry.kernel), dtype=torch.float32, device=x.device)
    gb = torch.empty((splits, c_out), dtype=torch.float32, device=x.device) if with_bias else gw

    def grid(meta):
        return (geometry.taps * cdiv(c_in, meta["BLOCK_CI"]), cdiv(c_out, block_co), splits)

    _wgrad[grid](
        x, gy, scale, shift, gw, gb, m, m_per_split, geometry.taps * c_in * c_out, geometry.taps,
        c_in, c_out, d, h, w, do, ho, wo, *x.stride(), *gy.stride(), *conv_args(geometry),
        KH=geometry.kernel[1], KW=geometry.kernel[2], HAS_BIAS=with_bias,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, INT64=needs_int64(x, gy, extra=(gw.numel(),)),
        BLOCK_CO=block_co,
    )  # fmt: skip
    # one split: its partial sums are the gradient (a view, no reduction kernel)
    grad_bias = (gb[0] if splits == 1 else gb.sum(0)) if with_bias else None
    return (gw[0] if splits == 1 else gw.sum(0)), grad_bias


def _halo_weight_grad(x, gy, scale, shift, geometry, dot_dtype, precision, block_co, with_bias):
    """conv_weight_grad through bn_relu_conv3d_wgrad_halo_kernel (stride 1): a persistent grid of splits x
    blocks of C_in x blocks of C_out programs (about halo_programs_wanted in all), each summing its boxes'
    products per tap into its split's (taps, C_in, C_out) sums (no zero fill); the splits are then added
    in a fixed order and the sum copied into the weight's layout."""
    n, c_in = x.shape[:2]
    c_out, do, ho, wo = gy.shape[1:]
    tile = HALO_WGRAD_TILE
    _refuse_other_tiles(_wgrad_halo, tile, "halo weight gradient")
    block_ci, taps = tile["BLOCK_CI"], geometry.taps
    ci_blocks, co_blocks = cdiv(c_in, block_ci), cdiv(c_out, block_co)
    if taps * ci_blocks * block_ci * co_blocks * block_co >= 2**31:  # the kernel's per-split offsets: int32
        raise ValueError(f"bn_relu_conv3d: a weight of {taps} taps x {c_in} x {c_out} channels is beyond the "
                         "halo weight gradient's int32 offsets within one split")  # fmt: skip
    boxes = _halo_boxes(tile, (n, do, ho, wo))
    # splits <= boxes: every program has a first box, which writes its sums (the buffer is not zeroed)
    splits = max(1, min(boxes, cdiv(halo_programs_wanted(x.device), ci_blocks * co_blocks)))
    programs = (splits, ci_blocks, co_blocks)
    sums = torch.empty((splits, taps, ci_blocks * block_ci, co_blocks * block_co), dtype=torch.float32,
                       device=x.device)  # fmt: skip
    scratch = torch.empty((*programs, _halo_rows(tile, geometry), block_ci), dtype=torch_dtype(dot_dtype),
                          device=x.device)  # fmt: skip
    gb = torch.empty((splits, c_out), dtype=torch.float32, device=x.device) if with_bias else sums
    _wgrad_halo[programs](
        x, gy, scale, shift, sums, gb, scratch, n, c_in, c_out, *x.shape[2:], do, ho, wo, *x.stride(),
        *gy.stride(), *geometry.padding, taps,
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], DLD=geometry.dilation[0],
        DLH=geometry.dilation[1], DLW=geometry.dilation[2], HAS_BIAS=with_bias, DOT_DTYPE=dot_dtype,
        INPUT_PRECISION=precision, INT64=needs_int64(x, gy, extra=(sums.numel(), scratch.numel())),
        BLOCK_CO=block_co,
    )  # fmt: skip
    # the sum over splits reads the buffer in its own order (a sum of the permuted buffer, straight into the
    # weight's layout, cost the CPU 1.6 ms per layer of Tiramisu 3D p3a: bench/host_cost.py --model); the
    # gradient is a (C_out, C_in, kD, kH, kW) view of the (taps, C_in, C_out) sum, which grad_like then
    # copies into the weight's own layout, NCDHW or channels-last (one copy either way)
    summed = sums[0] if splits == 1 else sums.sum(0)
    grad_weight = summed.permute(2, 1, 0)[:c_out, :c_in].unflatten(2, geometry.kernel)
    return grad_weight, ((gb[0] if splits == 1 else gb.sum(0)) if with_bias else None)


def wgrad_programs_wanted(device: torch.device) -> int:
    """Programs the weight-gradient grid should reach to fill the device (4 per SM on a GPU; 1 elsewhere,
    where one split is the fastest). Tests patch it to run several splits through the interpreter."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def conv_input_grad(
    x: torch.Tensor,
    gy: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    geometry: ConvGeometry,
    compute_dtype: torch.dtype,
    batch_stats: bool,
    grad_input: torch.Tensor | None = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of x, sum over voxels of gz * xhat, sum of gz), gz the gradient w.r.t. the BN output.

    batch_stats: x was normalised with its own batch statistics (training mode), so the gradient also
    flows through mean and variance; this needs a float32 scratch of gz, bounded by SCRATCH_BYTES by
    working on blocks of input channels in turn. grad_input: write (or, with accumulate, add) there.
    Deterministic: the per-channel sums are per-program partial sums added in a fixed order (no atomics).
    """
    n, c_in, d, h, w = x.shape
    m = n * d * h * w
    if grad_input is None:
        grad_input = torch.empty_like(x, memory_format=torch.preserve_format)
    int64 = needs_int64(gy, x, grad_input, extra=(m * c_in,))  # as every block's launch, or wider
    halo = _gradient_takes_halo(geometry, *dot_setup(compute_dtype), int64)
    # (sum of gz, sum of gz * xhat) per box of the halo kernel, or per DGRAD_MIN_BLOCK_M voxels of the direct
    # one: every row written by the kernel (a larger direct tile's program fills the rows of its voxels'
    # smaller-tile programs, one with its sums, the rest 0)
    rows = _halo_boxes(HALO_DGRAD_TILE, (n, d, h, w)) if halo else cdiv(m, DGRAD_MIN_BLOCK_M)
    partials = torch.empty((2, rows, c_in), dtype=torch.float32, device=x.device)
    chunk = c_in
    if batch_stats and m * c_in * 4 > SCRATCH_BYTES:
        chunk = max(64, SCRATCH_BYTES // (m * 4) // 64 * 64)
    gz = torch.empty((m, min(chunk, c_in)), dtype=torch.float32, device=x.device) if batch_stats else partials
    if chunk >= c_in:  # one block: no slicing (each slice is a torch op on the host)
        dbeta, dgamma = _input_grad_block(
            x, gy, weight, scale, shift, mean, rstd, geometry, compute_dtype, batch_stats, grad_input,
            accumulate, gz, partials, halo,
        )  # fmt: skip
        return grad_input, dgamma, dbeta
    dbeta, dgamma = (torch.empty((c_in,), dtype=torch.float32, device=x.device) for _ in range(2))
    for c0 in range(0, c_in, chunk):
        c = slice(c0, min(c0 + chunk, c_in))
        dbeta[c], dgamma[c] = _input_grad_block(
            x[:, c], gy, weight[:, c], scale[c], shift[c], mean[c], rstd[c], geometry, compute_dtype,
            batch_stats, grad_input[:, c], accumulate, gz, partials[:, :, c], halo,
        )  # fmt: skip
    return grad_input, dgamma, dbeta


def _input_grad_block(
    x, gy, weight, scale, shift, mean, rstd, geometry, compute_dtype, batch_stats, grad_input, accumulate,
    gz, partials, halo,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """conv_input_grad on one block of input channels (x, weight, vectors, grad_input and the (2, rows, C)
    partials sliced alike), through the halo kernel (halo: the partials have a row per box) or the direct
    one; returns the block's float32 (C,) sum of gz and (C,) sum of gz * xhat, two
    allocations (the custom ops return them as two gradients, which must not alias)."""
    n, c_in, d, h, w = x.shape
    _, c_out, do, ho, wo = gy.shape
    m = n * d * h * w
    dot_dtype, precision = dot_setup(compute_dtype)
    # (C_out, C_in, kd, kh, kw) -> (taps, C_out, C_in)
    w_taps = weight_taps(weight, (2, 3, 4, 0, 1), compute_dtype)
    block_n = _block_for(c_in)
    int64 = needs_int64(gy, x, grad_input, extra=(m * c_in, partials.stride(0) * 2))  # gz scratch, partials
    launch = _halo_input_grad if halo else _direct_input_grad
    launch(gy, w_taps, x, scale, shift, mean, rstd, gz, grad_input, partials, geometry, dot_dtype, precision,
           block_n, batch_stats, accumulate, int64)  # fmt: skip
    # fixed-order reductions over the programs' rows: the same result on every run
    sum_gz, sum_gz_xhat = partials[0].sum(0), partials[1].sum(0)
    if batch_stats:
        grid2 = (cdiv(m, FINALIZE_BLOCK_M), cdiv(c_in, FINALIZE_BLOCK_C))
        kernels.bn_backward_finalize_kernel[grid2](
            gz, x, grad_input, scale, mean, rstd, sum_gz_xhat, sum_gz, m, c_in, d, h, w,
            *x.stride(), *grad_input.stride(), ACCUMULATE=accumulate, INT64=int64,
            BLOCK_M=FINALIZE_BLOCK_M, BLOCK_C=FINALIZE_BLOCK_C,
        )  # fmt: skip
    return sum_gz, sum_gz_xhat


def _direct_input_grad(gy, w_taps, x, scale, shift, mean, rstd, gz, grad_input, partials, geometry, dot_dtype,
                       precision, block_n, batch_stats, accumulate, int64) -> None:  # fmt: skip
    """_input_grad_block's conv through bn_relu_conv3d_dgrad_kernel (any stride): a program per BLOCK_M
    voxels and block of input channels."""
    n, c_in, d, h, w = x.shape
    c_out, do, ho, wo = gy.shape[1:]
    m = n * d * h * w

    def grid(meta):
        programs = cdiv(m, meta["BLOCK_M"])
        if programs > partials.shape[1]:
            raise ValueError(
                f"bn_relu_conv3d input gradient: BLOCK_M {meta['BLOCK_M']} is below the smallest tile's "
                f"{DGRAD_MIN_BLOCK_M}, which sized the partial sums"
            )
        return (programs, cdiv(c_in, block_n))

    _dgrad[grid](
        gy, w_taps, x, scale, shift, mean, rstd, gz, grad_input, partials, partials.stride(0),
        partials.stride(1), partials.shape[1], m, c_in, c_out, d, h, w, do, ho, wo, *gy.stride(), *x.stride(),
        *grad_input.stride(), *conv_args(geometry), KD=geometry.kernel[0], KH=geometry.kernel[1],
        KW=geometry.kernel[2], STORE_GZ=batch_stats, ACCUMULATE=accumulate,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, INT64=int64, BLOCK_N=block_n,
        PARTIAL_M=DGRAD_MIN_BLOCK_M,
    )  # fmt: skip


def _halo_input_grad(gy, w_taps, x, scale, shift, mean, rstd, gz, grad_input, partials, geometry, dot_dtype,
                     precision, block_n, batch_stats, accumulate, int64) -> None:  # fmt: skip
    """_input_grad_block's conv through bn_relu_conv3d_dgrad_halo_kernel (stride 1): a persistent grid of at
    most halo_programs_wanted programs per block of input channels, each with its scratch tile; a partial
    sums row per box of input voxels."""
    n, c_in, d, h, w = x.shape
    c_out, do, ho, wo = gy.shape[1:]
    tile = HALO_DGRAD_TILE
    _refuse_other_tiles(_dgrad_halo, tile, "halo input gradient")
    boxes = _halo_boxes(tile, (n, d, h, w))
    block_n = min(block_n, HALO_DGRAD_BLOCK_N)
    n_blocks = cdiv(c_in, block_n)
    programs = min(halo_programs_wanted(x.device), boxes)
    scratch = torch.empty((programs * n_blocks, _halo_rows(tile, geometry), tile["BLOCK_K"]),
                          dtype=torch_dtype(dot_dtype), device=x.device)  # fmt: skip
    _dgrad_halo[(programs, n_blocks)](
        gy, w_taps, x, scale, shift, mean, rstd, gz, grad_input, partials, scratch, partials.stride(0),
        partials.stride(1), n, c_in, c_out, d, h, w, do, ho, wo, *gy.stride(), *x.stride(),
        *grad_input.stride(), *geometry.padding, geometry.taps,
        KD=geometry.kernel[0], KH=geometry.kernel[1], KW=geometry.kernel[2], DLD=geometry.dilation[0],
        DLH=geometry.dilation[1], DLW=geometry.dilation[2], STORE_GZ=batch_stats, ACCUMULATE=accumulate,
        DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, INT64=int64 or needs_int64(extra=(scratch.numel(),)),
        BLOCK_N=block_n,
    )  # fmt: skip


def _refuse_other_tiles(tuned, tile: dict, kernel: str) -> None:
    """ValueError naming the pinned tile when `tuned` (a halo gradient's autotuner, whose buffers are laid
    out for its one tile) is pinned to another tile; other warps and stages may be pinned."""
    pinned = tuned.pinned
    if pinned is not None and any(pinned.get(key) != value for key, value in tile.items()):
        raise ValueError(f"bn_relu_conv3d {kernel}: its buffers are laid out for {tile}; pin that tile, "
                         f"with other warps and stages only, not {pinned}")  # fmt: skip


def _halo_boxes(tile: dict, size: tuple[int, int, int, int]) -> int:
    """Boxes of a halo tile over a (N, D, H, W) volume: the halo kernels' unit of work."""
    n, d, h, w = size
    return n * cdiv(d, tile["BOX_D"]) * cdiv(h, tile["BOX_H"]) * cdiv(w, tile["BOX_W"])


def batch_norm_affine(
    x: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_stats: bool,
    eps: float,
) -> torch.Tensor:
    """(5, C_in) float32, rows batch_norm.STATS_ROWS (mean, var, scale, shift, rstd), from x's batch
    statistics (folded in the statistics kernel) or the running ones; a new tensor either way (the running
    statistics are updated by the op's entry, not here)."""
    if batch_stats:
        return batch_norm_stats(x, bn_weight, bn_bias, eps)
    if running_mean is None or running_var is None:  # the op's entry makes batch_stats True then
        raise ValueError("batch_norm_affine: without batch statistics the running ones are needed")
    out = torch.empty((5, x.shape[1]), dtype=torch.float32, device=x.device)
    return fold_batch_norm_into(running_mean, running_var, bn_weight, bn_bias, eps, out)


# ---------------------------------------------------------------------------------------------------
# The op as torch.library custom ops (forward and backward, with fake kernels and autograd), so that
# torch.compile traces through it (the ops are opaque nodes in its graph) instead of breaking the graph.
# Conv settings travel as int lists (the kernel size is the weight's); a gradient that is not wanted
# comes back as an empty tensor (custom ops cannot return None).


def forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_stats: bool,
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, stats): y = conv3d(relu(x * scale + shift), weight) + bias in compute_dtype; stats (5, C_in)
    float32, rows mean, var, scale, shift, rstd: what backward needs (and mean and var what the entry
    updates the running statistics with). Functional: nothing is written in place, which is what lets
    autograd be registered on it."""
    stats = batch_norm_affine(x, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps)
    _, _, scale, shift, _ = stats.unbind(0)
    geometry = ConvGeometry.of_weight(weight, stride, padding, dilation)
    y = conv_forward(x, weight, bias, scale, shift, geometry, compute_dtype)
    return y, stats


bn_relu_conv3d_forward = torch.library.custom_op(
    "prostate_kernels::bn_relu_conv3d_forward", forward_impl, mutates_args=()
)


@bn_relu_conv3d_forward.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, batch_stats, eps, stride, padding,
      dilation, compute_dtype):  # fmt: skip
    n, c_in, *size = x.shape
    out_size = ConvGeometry.of_weight(weight, stride, padding, dilation).output_size(size)
    y = output_like(x, (n, weight.shape[0], *out_size), compute_dtype)
    return y, x.new_empty((5, c_in), dtype=torch.float32)


def backward_impl(gy, x, weight, stats, batch_stats, stride, padding, dilation, compute_dtype, has_bias,
                  bn_dtype, needs) -> list[torch.Tensor | None]:  # fmt: skip
    """[grad x, grad weight, grad bias, grad bn weight, grad bn bias, grad mean, grad var], None where
    needs[i] is False (needs: those seven, in that order) or where there is no such parameter; stats: the
    forward's (5, C_in). The last two are the gradients w.r.t. statistics given to normalise with
    (batch_stats False: running statistics, or a synchronised BatchNorm's batch ones, ops/sync_batch_norm.py):
    batch_norm.given_stats_grads of the same per-channel sums as the BatchNorm parameters' gradients."""
    mean, _, scale, shift, rstd = stats.unbind(0)
    geometry = ConvGeometry.of_weight(weight, stride, padding, dilation)
    grads: list[torch.Tensor | None] = [None] * 7
    stats_grads = not batch_stats and (needs[5] or needs[6])
    if needs[1] or needs[2]:
        gw, gb = conv_weight_grad(x, gy, scale, shift, geometry, compute_dtype, has_bias)
        if needs[1]:
            grads[1] = grad_like(gw, weight)
        if needs[2] and gb is not None:
            grads[2] = gb.to(weight.dtype)
    if needs[0] or needs[3] or needs[4] or stats_grads:
        gx, dgamma, dbeta = conv_input_grad(x, gy, weight, scale, shift, mean, rstd, geometry, compute_dtype,
                                            batch_stats)  # fmt: skip
        if needs[0]:
            grads[0] = gx
        if needs[3]:
            grads[3] = dgamma.to(bn_dtype)
        if needs[4]:
            grads[4] = dbeta.to(bn_dtype)
        if stats_grads:
            g_mean, g_var = given_stats_grads(scale, rstd, dgamma, dbeta)
            grads[5], grads[6] = (g_mean if needs[5] else None), (g_var if needs[6] else None)
    return grads


# x, weight, bias, bn weight, bn bias, given mean, given var (custom ops infer their schema from this)
_SevenGrads = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


def _backward_op_impl(
    gy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stats: torch.Tensor,
    batch_stats: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    compute_dtype: torch.dtype,
    has_bias: bool,
    bn_dtype: torch.dtype,
    needs: list[bool],
) -> _SevenGrads:
    """backward_impl as a custom op: each missing gradient an empty tensor (custom ops return no None),
    distinct ones, since a custom op's outputs never alias."""
    grads = backward_impl(gy, x, weight, stats, batch_stats, stride, padding, dilation, compute_dtype,
                          has_bias, bn_dtype, needs)  # fmt: skip
    filled = tuple(g if g is not None else x.new_empty((0,)) for g in grads)
    return cast(_SevenGrads, filled)


bn_relu_conv3d_backward = torch.library.custom_op(
    "prostate_kernels::bn_relu_conv3d_backward", _backward_op_impl, mutates_args=()
)


@bn_relu_conv3d_backward.register_fake
def _(gy, x, weight, stats, batch_stats, stride, padding, dilation, compute_dtype, has_bias, bn_dtype,
      needs):  # fmt: skip
    c_out, c_in = weight.shape[:2]
    wanted = (
        torch.empty_like(x, memory_format=torch.preserve_format),
        torch.empty_like(weight),  # grad_like's strides
        weight.new_empty((c_out if has_bias else 0,)),
        x.new_empty((c_in,), dtype=bn_dtype),
        x.new_empty((c_in,), dtype=bn_dtype),
        x.new_empty((c_in,), dtype=torch.float32),  # the given statistics' gradients
        x.new_empty((c_in,), dtype=torch.float32),
    )
    return tuple(t if need else x.new_empty((0,)) for t, need in zip(wanted, needs, strict=True))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, bn_weight, _, _, _, batch_stats, _, stride, padding, dilation, compute_dtype = inputs
    _, stats = output
    ctx.save_for_backward(x, weight, stats)
    ctx.settings = (batch_stats, stride, padding, dilation, compute_dtype, bias is not None,
                    bn_weight.dtype if bn_weight is not None else torch.float32)  # fmt: skip
    ctx.set_materialize_grads(False)  # no zero gradient made for the statistics (a torch op per step)


_NO_GRADS = (None,) * 13  # one per input of the op


def _gradients(ctx, gy, backward) -> tuple:
    if gy is None:  # y took no part in what backward differentiates (gradients are not materialised)
        return _NO_GRADS
    x, weight, stats = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:7])  # x, weight, bias, bn weight and bias, given mean and var
    grads = backward(gy, x, weight, stats, *ctx.settings, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *([None] * 6))


def _backward(ctx, gy, _stats):
    return _gradients(ctx, gy, torch.ops.prostate_kernels.bn_relu_conv3d_backward)


bn_relu_conv3d_forward.register_autograd(_backward, setup_context=_setup_context)


class FusedBNReLUConv3d(torch.autograd.Function):
    """The same op for eager execution: the same forward_impl, setup and backward_impl, without the
    custom ops' dispatch, which cost 170-260 us more host time per forward + backward on the 2-core CPU
    (launches stubbed; the layer is host-bound on the H100 below the largest shapes). The entry picks the
    custom op only while torch.compile traces (torch.compiler.is_compiling())."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        _setup_context(ctx, inputs, outputs)
        ctx.mark_non_differentiable(outputs[1])
        return outputs

    @staticmethod
    @once_differentiable(
        "bn_relu_conv3d (the fused BatchNorm-ReLU-Conv3d layer)",
        'under prostate_kernels.use_backend("torch") the layer is plain PyTorch ops and can be '
        "differentiated twice",
    )
    def backward(ctx, gy, _stats):
        return _gradients(ctx, gy, backward_impl)

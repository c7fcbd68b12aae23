"""Depthwise halo kernels (forward, weight gradient), compiled only: sm_90a loop counts against the direct
kernels'.

Not library kernels (bench/results/2026-11-28-depthwise-halo-probe.md says why, and what they
measure). Both are the fused layer's halo kernels without the dot: a persistent program owns units of one
output box x BLOCK_C channels, copies the box's halo once into its own scratch tile (`_fill_halo`,
NORMALISE=False; zeros outside the volume), and each tap reads its window there at a constant offset,
with no masks. The weight gradient also loads the box's gy once, and per tap sums window x gy over the
box's voxels (across the program's threads) into its own row of float32 sums.
Compiled for a channels-last launch (channel stride specialised to 1, other strides divisible by 16)
with Triton's compiler; no GPU is needed and nothing runs.

    env -u TRITON_INTERPRET python tools/depthwise_halo_probe.py [--kernel forward|weight-gradient]
        [--scratch fp32|bf16] [--weights taps-first|channels-first] [--row-arithmetic] [--block-c 32]
        [--warps 4]

Prints registers and spills (sm_90a, sm_80) and each loop's instructions, and the warp-instructions per
1000 element-taps of the tap loop (tools/sass_loops.py counts the direct kernel the same way).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prostate_kernels.ops.bn_relu_conv3d_halo_kernels import (  # noqa: E402
    _box_counts,
    _box_origin,
    _box_rows,
    _fill_halo,
    _window_rows,
)
from prostate_kernels.ops.triton_index import widen  # noqa: E402


@triton.jit
def depthwise_fwd_halo_probe(
    x_ptr, w_ptr, b_ptr, y_ptr, scratch_ptr, N, C, D, H, W, sxn, sxc, sxd, sxh, sxw, syn, syc, syd, syh, syw,
    pdd, pdh, pdw, taps, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr,
    DLH: tl.constexpr, DLW: tl.constexpr, HAS_BIAS: tl.constexpr, INT64: tl.constexpr,
    TAPS_FIRST: tl.constexpr,  # weights (taps, C) contiguous, else (C, taps)
    UNIT_POINTERS: tl.constexpr,  # window pointers formed once per unit, else rows per tap
    SCRATCH_DTYPE: tl.constexpr, BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
    BLOCK_C: tl.constexpr, FILL_M: tl.constexpr,
):  # fmt: skip
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    programs = tl.num_programs(0)
    scratch = scratch_ptr + widen(tl.program_id(0), INT64) * (HALO_ROWS * BLOCK_C)
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    channels = tl.arange(0, BLOCK_C)
    c_blocks = tl.cdiv(C, BLOCK_C)
    boxes_per_image, boxes_h, boxes_w = _box_counts(D, H, W, BOX_D, BOX_H, BOX_W)
    for unit in range(tl.program_id(0), N * boxes_per_image * c_blocks, programs):
        offs_c = (unit % c_blocks) * BLOCK_C + channels
        mask_c = offs_c < C
        n, od0, oh0, ow0 = _box_origin(
            unit // c_blocks, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W
        )
        _fill_halo(scratch, x_ptr + widen(n, INT64) * sxn, x_ptr, x_ptr, offs_c, C, od0 - pdd, oh0 - pdh,
                   ow0 - pdw, D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_C,
                   SCRATCH_DTYPE, "ieee", INT64, False)  # fmt: skip
        acc = tl.zeros((BOX_D * BOX_H * BOX_W, BLOCK_C), dtype=tl.float32)
        base = scratch + halo_row[:, None] * BLOCK_C + channels[None, :]
        for tap in range(taps):
            if UNIT_POINTERS:
                kd, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
                window = tl.load(base + ((kd * DLD * HALO_H + kh * DLH) * HALO_W + kw * DLW) * BLOCK_C)
            else:
                rows = _window_rows(tap, halo_row, KH, KW, DLD, DLH, DLW, HALO_H, HALO_W)
                window = tl.load(scratch + rows[:, None] * BLOCK_C + channels[None, :])
            if TAPS_FIRST:
                w = tl.load(w_ptr + tap * C + offs_c, mask=mask_c, other=0.0)
            else:
                w = tl.load(w_ptr + offs_c * taps + tap, mask=mask_c, other=0.0)
            acc += window.to(tl.float32) * w.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        od, oh, ow = od0 + rd, oh0 + rh, ow0 + rw
        out = widen(n, INT64) * syn + widen(od, INT64) * syd + widen(oh, INT64) * syh + widen(ow, INT64) * syw
        mask = ((od < D) & (oh < H) & (ow < W))[:, None] & mask_c[None, :]
        tl.store(y_ptr + out[:, None] + widen(offs_c, INT64)[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=mask)  # fmt: skip


@triton.jit
def depthwise_wgrad_halo_probe(
    x_ptr, gy_ptr, sums_ptr, scratch_ptr, N, C, D, H, W, sxn, sxc, sxd, sxh, sxw, sgn, sgc, sgd, sgh, sgw,
    pdd, pdh, pdw, taps, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DLD: tl.constexpr,
    DLH: tl.constexpr, DLW: tl.constexpr, INT64: tl.constexpr, SCRATCH_DTYPE: tl.constexpr,
    BOX_D: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_C: tl.constexpr,
    FILL_M: tl.constexpr,
):  # fmt: skip
    """The weight gradient the same way: per unit the halo of x once, the box's gy once (registers), and
    per tap the window times gy summed over the box's voxels (across the program's threads), added to the
    program's own (taps, C) row of float32 sums (zeros at the start; the host would add the programs')."""
    HALO_D: tl.constexpr = BOX_D + (KD - 1) * DLD
    HALO_H: tl.constexpr = BOX_H + (KH - 1) * DLH
    HALO_W: tl.constexpr = BOX_W + (KW - 1) * DLW
    HALO_ROWS: tl.constexpr = (HALO_D * HALO_H * HALO_W + FILL_M - 1) // FILL_M * FILL_M
    programs = tl.num_programs(0)
    scratch = scratch_ptr + widen(tl.program_id(0), INT64) * (HALO_ROWS * BLOCK_C)
    sums = sums_ptr + widen(tl.program_id(0), INT64) * taps * C
    rd, rh, rw, halo_row = _box_rows(BOX_D, BOX_H, BOX_W, HALO_H, HALO_W)
    channels = tl.arange(0, BLOCK_C)
    c_blocks = tl.cdiv(C, BLOCK_C)
    boxes_per_image, boxes_h, boxes_w = _box_counts(D, H, W, BOX_D, BOX_H, BOX_W)
    for unit in range(tl.program_id(0), N * boxes_per_image * c_blocks, programs):
        offs_c = (unit % c_blocks) * BLOCK_C + channels
        mask_c = offs_c < C
        n, od0, oh0, ow0 = _box_origin(
            unit // c_blocks, boxes_per_image, boxes_h, boxes_w, BOX_D, BOX_H, BOX_W
        )
        _fill_halo(scratch, x_ptr + widen(n, INT64) * sxn, x_ptr, x_ptr, offs_c, C, od0 - pdd, oh0 - pdh,
                   ow0 - pdw, D, H, W, sxc, sxd, sxh, sxw, HALO_D, HALO_H, HALO_W, FILL_M, BLOCK_C,
                   SCRATCH_DTYPE, "ieee", INT64, False)  # fmt: skip
        od, oh, ow = od0 + rd, oh0 + rh, ow0 + rw
        g_row = (
            widen(n, INT64) * sgn + widen(od, INT64) * sgd + widen(oh, INT64) * sgh + widen(ow, INT64) * sgw
        )
        g_mask = ((od < D) & (oh < H) & (ow < W))[:, None] & mask_c[None, :]
        g = tl.load(gy_ptr + g_row[:, None] + widen(offs_c, INT64)[None, :] * sgc, mask=g_mask, other=0.0)
        g = g.to(tl.float32)
        base = scratch + halo_row[:, None] * BLOCK_C + channels[None, :]
        for tap in range(taps):
            kd, kh, kw = tap // (KH * KW), (tap // KW) % KH, tap % KW
            window = tl.load(base + ((kd * DLD * HALO_H + kh * DLH) * HALO_W + kw * DLW) * BLOCK_C)
            tap_sum = tl.sum(window.to(tl.float32) * g, axis=0)
            row = sums + tap * C + offs_c
            tl.store(row, tl.load(row, mask=mask_c, other=0.0) + tap_sum, mask=mask_c)


def main(argv: list[str] | None = None) -> int:
    import sass_loops
    from ptxas_log import parse_ptxas_log
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kernel", choices=("forward", "weight-gradient"), default="forward")
    parser.add_argument("--scratch", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--weights", choices=("taps-first", "channels-first"), default="taps-first")
    parser.add_argument("--row-arithmetic", action="store_true", help="window rows per tap, not per unit")
    parser.add_argument("--block-c", type=int, default=32)
    parser.add_argument("--warps", type=int, default=4)
    args = parser.parse_args(argv)
    forward = args.kernel == "forward"
    pointers = ("x_ptr", "w_ptr", "b_ptr", "y_ptr") if forward else ("x_ptr", "gy_ptr")
    signature = dict.fromkeys(pointers, "*bf16")
    if not forward:
        signature["sums_ptr"] = "*fp32"
    signature["scratch_ptr"] = f"*{args.scratch}"
    other = ("syn", "syc", "syd", "syh", "syw") if forward else ("sgn", "sgc", "sgd", "sgh", "sgw")
    sizes = ("N", "C", "D", "H", "W", "sxn", "sxc", "sxd", "sxh", "sxw", *other, "pdd", "pdh", "pdw", "taps")
    signature.update(dict.fromkeys(sizes, "i32"))
    constexprs = dict(sxc=1, KD=3, KH=3, KW=3, DLD=1, DLH=1, DLW=1, INT64=False,
                      SCRATCH_DTYPE=tl.float32 if args.scratch == "fp32" else tl.bfloat16, BOX_D=4, BOX_H=4,
                      BOX_W=8, BLOCK_C=args.block_c, FILL_M=128)  # fmt: skip
    if forward:
        constexprs.update(HAS_BIAS=False, TAPS_FIRST=args.weights == "taps-first",
                          UNIT_POINTERS=not args.row_arithmetic)  # fmt: skip
    else:
        constexprs[other[1]] = 1  # gy channels-last too
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    names = list(signature)
    aligned = [
        *[n for n in names if n.endswith("_ptr")],
        "C",
        "sxn",
        "sxd",
        "sxh",
        "sxw",
        other[0],
        *other[2:],
    ]
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    fn = depthwise_fwd_halo_probe if forward else depthwise_wgrad_halo_probe
    source = ASTSource(fn, signature, constexprs, attrs)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    options = {"num_warps": args.warps, "num_stages": 1}
    for arch in (90, 80):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        report = parse_ptxas_log(printed.getvalue())
        print(f"sm_{arch}: {report.registers} registers, spills {report.spill_stores}/{report.spill_loads} B")
        if arch == 90:
            cubin = kernel.asm["cubin"]
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "kernel.cubin").write_bytes(cubin)
        sass = subprocess.run([str(cuobjdump), "-sass", str(Path(tmp, "kernel.cubin"))], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    loops = sass_loops.loops(sass)
    for loop in loops:
        print(f"loop {loop['start']}..{loop['end']}: {loop['instructions']} instructions"
              f"{' (innermost)' if loop['innermost'] else ''}; {loop['top']}")  # fmt: skip
    tap_loop = [loop for loop in loops if loop["innermost"]][-1]  # the fill's loop comes first
    per_1000 = tap_loop["instructions"] * args.warps * 1000 / (128 * args.block_c)
    print(f"tap loop: {per_1000:.0f} warp-instructions per 1000 element-taps (128 voxels x {args.block_c} "
          "channels per step)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

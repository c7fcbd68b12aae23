"""The operands of every tl.dot in the library's kernels: cast to DOT_DTYPE and, for TF32 dots, rounded.

Triton's TF32 dot feeds float32 registers to the tensor cores, which ignore the low 13 mantissa bits:
truncation, not rounding (triton-lang/triton issue 4574). Truncation errors all point towards zero, so
they add up in long sums instead of cancelling: measured on an H100 at Tiramisu p3a's dense layer
(bench/results/2026-11-27-nvidia-h100-80gb-hbm3-run2-gpu-correctness.md), our TF32 errors were
2.6-3.4x those of cuDNN's TF32, which rounds its inputs to nearest. Here each operand is rounded by
cvt.rna.tf32.f32 first (one instruction; NaN and inf kept), as cuBLAS and cuDNN do. An integer-add
version (same results, testable in the interpreter) spilled registers in the weight-gradient kernel
(168 registers, 4 B spilled at its default config on sm_90a); the interpreter never takes this path
(launch.dot_setup gives it IEEE dots).
"""

import triton
import triton.language as tl

TF32_ROUND = tl.constexpr("cvt.rna.tf32.f32 $0, $1;")


@triton.jit
def dot_operand(x, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """x as an operand of tl.dot(..., input_precision=INPUT_PRECISION) in DOT_DTYPE."""
    x = x.to(DOT_DTYPE)
    if INPUT_PRECISION == "tf32":
        x = tl.inline_asm_elementwise(TF32_ROUND, "=r, r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return x

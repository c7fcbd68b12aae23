"""Run by test_dot_operands.py in a fresh process without TRITON_INTERPRET: compiles a small dot kernel
for sm_90a with TF32 and with IEEE operands (ops/dot_operands.py) and prints how many cvt.rna.tf32.f32
instructions each PTX holds, as JSON."""

import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from prostate_kernels.ops.dot_operands import dot_operand


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, INPUT_PRECISION: tl.constexpr):
    offs = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
    a = dot_operand(tl.load(a_ptr + offs), tl.float32, INPUT_PRECISION)
    b = dot_operand(tl.load(b_ptr + offs), tl.float32, INPUT_PRECISION)
    tl.store(c_ptr + offs, tl.dot(a, b, input_precision=INPUT_PRECISION))


counts = {}
for precision in ("tf32", "ieee"):
    source = ASTSource(dot_kernel, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32",
                                    "INPUT_PRECISION": "constexpr"}, {(3,): precision})  # fmt: skip
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    counts[precision] = ptx.count("cvt.rna.tf32.f32")
print(json.dumps(counts))

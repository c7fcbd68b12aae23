"""Run by test_compile_gate.py in a fresh process without TRITON_INTERPRET (the interpreter patches
triton.language while it runs kernels, so a test process that interpreted kernels cannot compile any):
compiles a small good kernel, a broken one and one with an atomic add through
tools/gpu_compile.compile_variant and prints the results as JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import triton.language as tl  # noqa: E402
from compile_capture import Variant  # noqa: E402
from gpu_compile import _VARIANTS, compile_variant, summary  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def broken_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, tl.dot(a, a))  # 1-D operands: tl.dot rejects them at compile time


def atomic_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(y_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0.0)))  # order of programs varies


def job(fn):
    jit = JITFunction(fn)
    options = make_backend(GPUTarget("cuda", 90, 32)).parse_options({"num_warps": 4})
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    variant = Variant(jit.module, fn.__name__, 90, (), (), (), (), "BLOCK=128", "fp32", True)
    return variant, (jit, signature, {(3,): 128}, {}, options)


_VARIANTS[:] = [job(copy_kernel), job(broken_kernel), job(atomic_kernel)]
results = [compile_variant(i) for i in range(3)]
print(
    json.dumps(
        {
            "results": [
                {
                    "kernel": r.variant.kernel,
                    "ok": r.ok,
                    "verdict": r.verdict,
                    "registers": r.registers,
                    "spill_bytes": r.spill_bytes,
                    "atomics": r.atomics,
                    "error": r.error,
                }
                for r in results
            ],
            "summary": summary(results),
        }
    )
)

"""The GPU compile gate (tools/gpu_compile.py): its ptxas log parser, and a kernel that cannot compile is
reported as failed (the gate can fail). The gate itself is a command (`make gpu-compile`), not a test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
if not TOOLS.is_dir():
    pytest.skip(f"tools/ is not beside the tests ({TOOLS})", allow_module_level=True)
sys.path.insert(0, str(TOOLS))

import triton.language as tl  # noqa: E402
from compile_capture import Variant  # noqa: E402
from gpu_compile import Result, compile_variant, summary  # noqa: E402
from ptxas_log import parse_ptxas_log  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'bn_relu_conv3d_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for bn_relu_conv3d_fwd_kernel
    2888 bytes stack frame, 6512 bytes spill stores, 7164 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2888 bytes cumulative stack size
ptxas info    : Compile time = 492.282 ms
"""


def test_the_parser_reads_registers_and_spills():
    report = parse_ptxas_log(LOG)
    assert (report.registers, report.spill_stores, report.spill_loads, report.stack_frame) == (
        255,
        6512,
        7164,
        2888,
    )
    assert report.spills
    clean = parse_ptxas_log(
        "ptxas info    : Used 96 registers, used 1 barriers\n    0 bytes spill stores, 0 bytes spill loads"
    )
    assert clean.registers == 96 and not clean.spills
    with pytest.raises(ValueError, match="no 'Used N registers'"):
        parse_ptxas_log("ptxas fatal   : something else")


def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _broken(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, tl.dot(a, a))  # 1-D operands: tl.dot rejects them at compile time


def _variant(fn) -> tuple:
    """A compile job as the capture records it (JITFunction built directly: the interpreter's
    @triton.jit would return an interpreted function, which Triton's compiler does not take)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    jit = JITFunction(fn)
    options = make_backend(GPUTarget("cuda", 90, 32)).parse_options({"num_warps": 4})
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    variant = Variant(jit.module, fn.__name__, 90, (), (), (), (), "BLOCK=128", "fp32", True)
    return variant, (jit, signature, {(3,): 128}, {}, options)


def test_a_kernel_compiles_and_reports_its_registers(monkeypatch):
    import gpu_compile

    monkeypatch.setattr(gpu_compile, "_VARIANTS", [_variant(_copy)])
    result = compile_variant(0)
    assert result.ok and result.verdict == "ok", result.error
    assert 0 < result.registers <= 255 and result.spill_bytes == 0


def test_a_kernel_that_does_not_compile_fails_the_gate(monkeypatch):
    import gpu_compile

    monkeypatch.setattr(gpu_compile, "_VARIANTS", [_variant(_broken)])
    result = compile_variant(0)
    assert not result.ok and result.verdict == "FAILED" and result.error
    assert "1 failed to compile" in summary([result])
    assert isinstance(result, Result)

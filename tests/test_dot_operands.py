"""TF32 dot operands are rounded to nearest by cvt.rna.tf32.f32 (as cuBLAS and cuDNN round theirs), not
truncated as Triton's TF32 dot alone would (ops/dot_operands.py); IEEE operands are left alone.

The instruction only exists on the GPU, so this checks the compiled code: a small kernel compiled for
sm_90a by Triton's own compiler (no GPU needed) in a process without the interpreter. Its effect on
accuracy is checked on a GPU by bench/gpu_checks.py (TF32 error within 2x eager's)."""

from __future__ import annotations

from cli_helpers import run_probe


def test_tf32_operands_are_rounded_by_cvt_rna_and_ieee_operands_untouched():
    counts = run_probe("dot_operands_probe.py")
    assert counts["tf32"] >= 2 and counts["ieee"] == 0

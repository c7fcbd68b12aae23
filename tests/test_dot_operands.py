"""TF32 dot operands are rounded to nearest by cvt.rna.tf32.f32 (as cuBLAS and cuDNN round theirs), not
truncated as Triton's TF32 dot alone would (ops/dot_operands.py); IEEE operands are left alone.

The instruction only exists on the GPU, so this checks the compiled code: a small kernel compiled for
sm_90a by Triton's own compiler (no GPU needed) in a process without the interpreter. Its effect on
accuracy is checked on a GPU by bench/gpu_checks.py (TF32 error within 2x eager's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_tf32_operands_are_rounded_by_cvt_rna_and_ieee_operands_untouched():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = Path(__file__).resolve().parent / "dot_operands_probe.py"
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["tf32"] >= 2 and counts["ieee"] == 0

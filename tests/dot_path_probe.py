"""Run by test_compile_gate.py in a fresh process without TRITON_INTERPRET: captures a fused layer followed
by a plain torch conv (meta tensors, forward and backward) under each dot path of tools/gpu_compile.py and
prints, as JSON, what the captured launches' dots multiply per path and how many mismatches the gate's
check finds (on the capture, and on the capture with one variant relabelled)."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import torch  # noqa: E402
from compile_capture import RECORDER, capturing  # noqa: E402
from gpu_compile import DOT_PATHS, _dot_settings, dot_path_mismatches  # noqa: E402

from prostate_kernels.nn import BNReLUConv3d  # noqa: E402

with capturing():
    for path in DOT_PATHS:
        with torch.device("meta"):
            model = torch.nn.Sequential(BNReLUConv3d(20, 16), torch.nn.Conv3d(16, 4, 1))
            x = torch.empty(2, 20, 4, 6, 6, requires_grad=True)
        with _dot_settings(path):
            model(x).float().sum().backward()

dots = {path: sorted({v.dot for v in RECORDER.variants if v.path == path and v.dot}) for path in DOT_PATHS}
first = next(v for v in RECORDER.variants if v.path == "bf16" and v.dot)
relabelled = [*RECORDER.variants, dataclasses.replace(first, path="fp16")]
print(
    json.dumps(
        {
            "dots": dots,
            "mismatches": len(dot_path_mismatches(RECORDER.variants)),
            "mismatches_relabelled": len(dot_path_mismatches(relabelled)),
        }
    )
)

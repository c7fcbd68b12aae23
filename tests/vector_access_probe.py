"""Run by test_compile_gate.py in a fresh process without TRITON_INTERPRET: captures a DepthwiseConv3d
with 728 channels-last bf16 channels (DeepLabv3+'s middle flow; strides multiples of 8, not 16) on meta
tensors, compiles each depthwise kernel's default variant for sm_90a with Triton's compiler, and prints as
JSON how many global loads and stores of each width the SASS holds (tools/sass_loops.sass_of: cuobjdump,
bundled with Triton)."""

import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import torch  # noqa: E402
from compile_capture import RECORDER, capturing  # noqa: E402
from sass_loops import sass_of  # noqa: E402

from prostate_kernels.nn import DepthwiseConv3d  # noqa: E402
from prostate_kernels.ops.bn_relu_conv3d_triton import direct_kernels  # noqa: E402

with capturing():
    with torch.device("meta"):
        layer = DepthwiseConv3d(728, 3, padding=2, dilation=2).to(torch.bfloat16)
        x = torch.empty(2, 728, 4, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    y = layer(x.requires_grad_(True))
    y.backward(torch.empty_like(y))  # the weight gradient: the halo kernel (stride 1, channels-last bf16)
    with direct_kernels():  # and the direct one, as at other strides, NCDHW or float32
        y = layer(x)
        y.backward(torch.empty_like(y))

counts = {}
for variant, (fn, signature, constexprs, attrs, options) in RECORDER.variants.items():
    if variant.arch != 90 or not variant.default_config or variant.kernel in counts:
        continue
    sass = sass_of(fn, signature, constexprs, attrs, options)
    counts[variant.kernel] = dict(collections.Counter(re.findall(r"\b(?:LDG|STG)\.E[.\w]*", sass)))
print(json.dumps(counts))

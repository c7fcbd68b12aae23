"""Run by test_compile_gate.py in a fresh process without TRITON_INTERPRET: tools/compile_capture.capturing()
with a second Python kernel for the Meta key refused, as torch 2.11 refuses it (the cache warmer crashed
there on register_kernel("meta") on the first H200 run, 2026-12-04), around one fused layer's forward and
backward on meta tensors. Prints the launches recorded, whether the ops' fake functions were swapped back
after the block, and whether a meta call outside the block still launches nothing."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import torch  # noqa: E402
from torch._library.custom_ops import CustomOpDef  # noqa: E402

real_register_kernel = CustomOpDef.register_kernel


def refuse_meta(self, device_types, fn=None, /):
    """torch 2.11's answer to register_kernel("meta") once a fake is registered (2.13 overrides it)."""
    if device_types == "meta":
        raise RuntimeError("This is not allowed since there's already a kernel registered from python")
    return real_register_kernel(self, device_types, fn)


CustomOpDef.register_kernel = refuse_meta

from compile_capture import RECORDER, capturing  # noqa: E402

import prostate_kernels.ops.bn_relu_conv3d_triton as fused  # noqa: E402
from prostate_kernels import nn as pk_nn  # noqa: E402

ops = [v for v in vars(fused).values() if isinstance(v, CustomOpDef)]
fakes_before = [op._abstract_fn for op in ops]
layer = pk_nn.BNReLUConv3d(8, 4, kernel_size=3, padding=1).to("meta")
x = torch.empty(1, 8, 4, 6, 6, device="meta", requires_grad=True)
with capturing():
    layer(x).sum().backward()
recorded = len(RECORDER.variants)
kernels = sorted({v.kernel for v in RECORDER.variants})
RECORDER.variants.clear()
layer(x.detach().requires_grad_()).sum().backward()  # outside: the fake kernels again, no launch
print(json.dumps({
    "recorded": recorded,
    "kernels": kernels,
    "recorded_after": len(RECORDER.variants),
    "fakes_restored": [op._abstract_fn for op in ops] == fakes_before,
    "ops": len(ops),
}))  # fmt: skip

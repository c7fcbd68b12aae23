"""Run by test_cuda_graph_safety.py in a fresh process without TRITON_INTERPRET: training steps (forward +
backward) of the library's layers and networks on meta tensors, through the GPU launch paths (Triton
launches recorded by tools/compile_capture.py, not run), watched by a TorchDispatchMode that lists every
aten op a CUDA graph capture cannot hold:
  - a value read back to the host (.item(), .tolist(), int(t), bool(t): aten._local_scalar_dense) or an
    op whose output size depends on values (nonzero, masked_select, unique): a device synchronisation,
    an error inside a capture;
  - any op touching a CPU tensor: a host value copied in (frozen into the graph at capture) or a draw
    from the CPU generator (the same draw at every replay).
Prints {workload: {"ops": {reason: count}, "where": {reason: [library frames]}, "error": str | None}}.
"""

import collections
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import torch  # noqa: E402
from compile_capture import capturing  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


class CaptureHazards(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.where: dict[str, list[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:  # noted before it runs: on meta tensors it raises
            self._note(f"{name} (reads device values on the host)")
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if name not in SYNCING and any(t.device.type == "cpu" for t in tensors):
            self._note(f"{name} on a CPU tensor")
        return out

    def _note(self, reason: str) -> None:
        self.ops[reason] += 1
        frames = [f for f in traceback.extract_stack()[:-2] if "prostate_kernels" in f.filename]
        self.where.setdefault(reason, [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:]])


def workloads() -> dict:
    from prostate_kernels.models import build_model

    from prostate_kernels.nn import ASPP3d, BNReLUConv3d, DenseBlock3d, DepthwiseConv3d, SeparableConv3d

    shape = (2, 12, 6, 8, 10)
    with torch.device("meta"):
        return {
            "BNReLUConv3d": (BNReLUConv3d(12, 16), shape),
            "DenseBlock3d dropout 0.2": (DenseBlock3d(12, 8, 3, dropout=0.2), shape),
            "DenseBlock3d bn_size 4 dropout 0.2": (DenseBlock3d(12, 8, 2, dropout=0.2, bn_size=4), shape),
            "DepthwiseConv3d": (DepthwiseConv3d(16, 3, padding=2, dilation=2), (2, 16, 6, 8, 10)),
            "SeparableConv3d": (SeparableConv3d(16, 24, 3, dilation=(1, 2, 2)), (2, 16, 6, 8, 10)),
            "ASPP3d": (ASPP3d(16, 24, rates=(2, 4, 6)), (2, 16, 6, 8, 10)),
            "tiramisu3d_tiny": (build_model("tiramisu3d_tiny"), (2, 1, 8, 16, 16)),
            "unet3d": (build_model("unet3d"), (2, 1, 16, 32, 32)),
            "deeplabv3plus_3d": (build_model("deeplabv3plus_3d"), (2, 1, 16, 32, 32)),
        }  # fmt: skip


def main() -> None:
    results = {}
    cases = workloads()
    with capturing():
        for name, (module, shape) in cases.items():
            module.train()
            x = torch.empty(shape, device="meta", requires_grad=True).to(memory_format=torch.channels_last_3d)
            hazards, error = CaptureHazards(), None
            try:
                with hazards:
                    module(x).float().sum().backward()
            except Exception as e:  # reported: the test names the workload and the error
                error = f"{type(e).__name__}: {str(e)[:300]}"
            results[name] = {"ops": dict(hazards.ops), "where": hazards.where, "error": error}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
